"""Draw benchmarks/bench_llama8b.png from the JSON that bench_llama8b.py writes.

Three panels against context length: prefill seconds, decode seconds per token (with the
decode floor of headinfer's host bytes), peak GPU GiB (with the budget). Needs matplotlib.
Usage: python benchmarks/plot.py results/bench_llama8b.json [results/bench_llama8b_long.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "standard": "tab:gray",
    "chunked": "tab:blue",
    "offload": "tab:orange",
    "headinfer": "tab:green",
    "headinfer, CPU share": "tab:olive",
    "headinfer, weights + 2 GiB": "tab:purple",
}


def main(paths: list[str]) -> None:
    runs, meta = [], {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        meta = meta or data
        for r in data["runs"]:
            if r.get("oom"):
                continue
            if "gpu_budget_gib" in r:  # the longest-context run, under its own budget
                r = dict(r, mode="headinfer, weights + 2 GiB")
            runs.append(r)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, color in COLORS.items():
        rs = sorted({r["S"]: r for r in runs if r["mode"] == mode}.values(), key=lambda r: r["S"])
        if not rs:
            continue
        xs = [r["S"] / 1024 for r in rs]
        axes[0].plot(xs, [r["prefill_s"] for r in rs], "o-", color=color, label=mode)
        axes[1].plot(xs, [r["decode_s"] for r in rs], "o-", color=color, label=mode)
        axes[2].plot(xs, [r["peak_gib"] for r in rs], "o-", color=color, label=mode)
        if mode.startswith("headinfer"):
            axes[0].plot(
                xs,
                [r["prefill_floor_s"] for r in rs],
                "--",
                color=color,
                alpha=0.5,
                label=f"{mode}: FLOP floor",
            )
            axes[1].plot(
                xs,
                [max(r["decode_floor_s"], 1e-3) for r in rs],
                "--",
                color=color,
                alpha=0.5,
                label=f"{mode}: PCIe floor",
            )
    axes[2].axhline(meta["budget_gib"], color="red", lw=1, ls=":", label="budget")
    for ax, title in zip(axes, ["prefill (s)", "decode (s / token)", "peak GPU (GiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    m = meta["machine"]
    fig.suptitle(
        f"Llama-3-8B shape, bf16, {meta['budget_gib']:.0f} GiB budget, {meta['device']}: "
        f"H2D {m['h2d_gbs']} GB/s, SDPA {m['sdpa_tflops']} TFLOP/s, matmul {m['matmul_tflops']}"
    )
    fig.tight_layout()
    out = Path(__file__).with_name("bench_llama8b.png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
