"""Draw benchmarks/bench_decode.png from the JSON files bench_decode.py writes.

Decode seconds per token against context length (log-log) for each mode (the default, the GPU
alone by zero-copy reads and by the copy engine, the copy engine with the CPU share),
transformers' offloaded cache where it ran, and this host's two floors: the PCIe floor (host
KV bytes / copy-engine rate) and the host floor (host KV bytes / (copy engine + CPU read rate,
measured together)). Needs matplotlib.

Usage: python benchmarks/plot_decode.py benchmarks/results [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = {
    "default": ("headinfer default", "tab:green", "-"),
    "gpu_zero_copy": ("GPU alone, zero-copy", "tab:blue", "-"),
    "gpu_copy": ("GPU alone, copy engine", "tab:purple", "-"),
    "shared_copy": ("copy engine + CPU share", "tab:olive", "-"),
}


def main(folder: str, out: str) -> None:
    runs = sorted(
        (json.loads(p.read_text()) for p in Path(folder).glob("bench_decode_*.json")),
        key=lambda r: r["context"],
    )

    def peer(kind: str) -> list[dict]:
        files = Path(folder).glob(f"peer_{kind}_*.json")
        return sorted((json.loads(p.read_text()) for p in files), key=lambda r: r["context"])

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ctx = sorted({r["context"] for r in runs})
    for key, (label, color, style) in MODES.items():
        pts = [(r["context"], r[key]["s_per_token"]) for r in runs if key in r]
        if pts:
            ax.plot(*zip(*pts), style, marker="o", color=color, label=label)
    for kind, label, color in (
        ("offloaded", "transformers offloaded cache", "tab:orange"),
        ("standard", "standard attention (transformers)", "tab:gray"),
    ):
        done = [p for p in peer(kind) if "s_per_token" in p]
        if done:
            ax.plot(
                [p["context"] for p in done],
                [p["s_per_token"] for p in done],
                "-",
                marker="s",
                color=color,
                label=label,
            )
    for key, label, style in (
        ("pcie_floor_s", "PCIe floor (copy engine)", "--"),
        ("host_floor_s", "host floor (copy engine + CPU)", ":"),
    ):
        pts = [(r["context"], r[key]) for r in runs if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), style, color="black", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode s/token")
    if runs:
        r = runs[-1]
        ax.set_title(
            f"Llama-3-8B shape, bf16, emulated 24 GiB card\n{r['device']}: copy engine "
            f"{r['copy_engine_gbs']} GB/s, CPU {r['cpu_read_beside_copy_gbs']} GB/s beside it",
            fontsize=9,
        )
        ax.set_xticks(ctx, [f"{c // 1024}K" for c in ctx])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "benchmarks/bench_decode.png")
