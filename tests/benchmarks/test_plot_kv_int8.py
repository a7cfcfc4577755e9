"""``benchmarks/plot_kv_int8.py --alternatives`` draws a bar per decode and per alternative
from a result file as ``bench_kv_int8.py`` writes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "plot_kv_int8.py"


def test_alternatives_plot(tmp_path):
    decode = {"context": 1048576, "s_per_token": 0.69, "host_floor_s": 0.56}
    alts = [
        {"piece_mib": 64, "buffers": 3, "threads": 0, "s_per_token": 0.67},
        {"piece_mib": 0, "buffers": 0, "threads": 16, "s_per_token": 0.7},
    ]
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"int8": [{**decode, "alternatives": alts}]}))
    out = tmp_path / "alt.png"
    cmd = [sys.executable, str(_PATH), "--alternatives", str(out), f"host={res}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
