"""Draw benchmarks/bench_kv_int8.png from the JSON that bench_kv_int8.py writes: decode seconds
per token against context (exact and int8) beside each one's host floor (host KV bytes over the
copy engine's rate plus the CPU's, measured at once), and the cumulative prefill time. Runs of
separate processes can be given together (their ``exact`` and ``int8`` entries are merged).
Needs matplotlib.

Usage: python benchmarks/plot_kv_int8.py OUT.png RESULT.json [RESULT.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _runs(paths: list[str]) -> dict[str, list[dict]]:
    """Per mode, the runs that completed, by context."""
    out: dict[str, list[dict]] = {"exact": [], "int8": []}
    for p in paths:
        data = json.loads(Path(p).read_text())
        if "exact" in data:
            out["exact"].append(data["exact"])
        out["int8"].extend(r for r in data.get("int8", []) if "s_per_token" in r)
    for runs in out.values():
        runs.sort(key=lambda r: r["context"])
    return out


def main(out: str, paths: list[str]) -> None:
    runs = _runs(paths)
    fig, (dec, pre) = plt.subplots(1, 2, figsize=(11, 4.5))
    for mode, color in (("exact", "tab:blue"), ("int8", "tab:orange")):
        rs = runs[mode]
        if not rs:
            continue
        x = [r["context"] / 1e6 for r in rs]
        dec.plot(x, [r["s_per_token"] for r in rs], "o-", color=color, label=f"{mode}: decode")
        floor = [r["host_floor_s"] for r in rs]
        dec.plot(x, floor, "x--", color=color, label=f"{mode}: host floor")
        prefill = [r.get("prefill_s", r.get("prefill_s_cumulative")) for r in rs]
        pre.plot(x, prefill, "o-", color=color, label=mode)
        for xi, r in zip(x, rs):
            dec.annotate(f"{r['x_host_floor']:.2f}x", (xi, r["s_per_token"]), fontsize=8)
    dec.set_xlabel("context (million tokens)")
    dec.set_ylabel("seconds per token")
    dec.set_title("decode, Llama-3-8B shape, emulated 24 GiB card")
    dec.set_ylim(bottom=0)
    dec.legend(fontsize=8)
    pre.set_xlabel("context (million tokens)")
    pre.set_ylabel("prefill seconds (cumulative)")
    pre.set_title("prefill")
    pre.set_ylim(bottom=0)
    pre.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
