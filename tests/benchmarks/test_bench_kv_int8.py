"""``benchmarks/bench_kv_int8.py``'s ``--alt-rings`` reads MiBxBUFFERS items and refuses others
by name (the bench itself needs a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_kv_int8  # noqa: E402


def test_rings_parse():
    assert bench_kv_int8.parse_rings("") == []
    assert bench_kv_int8.parse_rings("32x6, 64x3") == [(32, 6), (64, 3)]


@pytest.mark.parametrize("bad", ["32", "32x1", "x6", "0x4", "32x6x2", "a x6"])
def test_rings_refused(bad):
    with pytest.raises(SystemExit, match="^--alt-rings:"):
        bench_kv_int8.parse_rings(bad)
