"""``benchmarks/cpu_kv_rate.py`` runs as its docstring says: a process per thread count, a row
per (threads, kv dtype), the stored bytes in each format's own row size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_kv_rate.py"


def test_rows_per_thread_count_and_kv_dtype(tmp_path):
    out = tmp_path / "rate.json"
    cmd = [sys.executable, str(_PATH), "--tokens", "4096", "--threads", "1,2", "--calls", "2"]
    cmd += ["--heads", "2", "--head-dim", "64", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [(r["threads"], r["kv_dtype"]) for r in rows] == [
        (1, "exact"),
        (1, "int8"),
        (2, "exact"),
        (2, "int8"),
    ]
    # Keys and values of 2 heads x 4096 tokens: bf16 rows of 64 x 2 bytes; int8 rows of 64
    # values and 2 bf16 scales (groups of 32), padded to 8 bytes.
    for r in rows:
        row_bytes = 128 if r["kv_dtype"] == "exact" else 72
        assert r["stored_bytes"] == 2 * 2 * 4096 * row_bytes
        assert r["seconds"] >= r["best_seconds"] > 0
        assert abs(r["gb_per_s"] - r["stored_bytes"] / r["seconds"] / 1e9) < 1e-9
    assert len(done.stdout.strip().splitlines()) == 4
