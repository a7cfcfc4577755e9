"""``benchmarks/cpu_kv_rate.py`` runs as its docstring says: a row per (threads, kv dtype), the
rate in the store's own bytes, the time per key from its format's row size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_kv_rate.py"


def test_rows_per_thread_count_and_kv_dtype(tmp_path):
    out = tmp_path / "rate.json"
    cmd = [sys.executable, str(_PATH), "--bytes", "8MiB", "--threads", "1,2", "--seconds", "0.05"]
    cmd += ["--head-dim", "64", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [(r["threads"], r["kv_dtype"]) for r in rows] == [
        (1, "exact"),
        (1, "int8"),
        (2, "exact"),
        (2, "int8"),
    ]
    # A key's K and V rows of one kv head: bf16 rows of 64 x 2 bytes; int8 rows of 64 values
    # and 2 bf16 scales (groups of 32), padded to 8 bytes.
    for r in rows:
        row_bytes = 128 if r["kv_dtype"] == "exact" else 72
        assert r["bytes"] == 8 << 20 and r["gb_per_s"] > 0 and r["fixed_s"] > 0
        ns = 2 * row_bytes / (r["gb_per_s"] * 1e9) * 1e9
        assert abs(r["ns_per_key_head"] - ns) < 1e-6 * ns
    assert len(done.stdout.strip().splitlines()) == 4
