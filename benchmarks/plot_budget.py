"""Draw benchmarks/bench_budget.png from the JSON that bench_budget.py writes: the NVML peak of
each run against its ``gpu_budget`` (the diagonal is the bound), one marker per context; a run
refused before prefill is drawn on the axis with an x. Needs matplotlib.

Usage: python benchmarks/plot_budget.py results/bench_budget.json [OUT.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str, out: str) -> None:
    data = json.loads(Path(path).read_text())
    fig, ax = plt.subplots(figsize=(6, 4.5))
    budgets = sorted({r["budget_gib"] for r in data["runs"]})
    ax.plot(
        [min(budgets) - 1, max(budgets) + 1],
        [min(budgets) - 1, max(budgets) + 1],
        "k--",
        lw=1,
        label="budget (the bound)",
    )
    for context, marker in ((32768, "o"), (131072, "s")):
        done = [r for r in data["runs"] if r["context"] == context and "peak_gib_device_wide" in r]
        ax.plot(
            [r["budget_gib"] for r in done],
            [r["peak_gib_device_wide"] for r in done],
            marker,
            ms=8,
            label=f"{context // 1024}K tokens: NVML peak",
        )
        for r in data["runs"]:
            if r["context"] == context and "refused" in r:
                ax.plot(
                    r["budget_gib"],
                    min(budgets) - 1,
                    "x",
                    color="tab:red",
                    ms=10,
                    label=f"{context // 1024}K: refused before prefill",
                )
    ax.axhline(
        data.get("model_loaded_gib_nvml", 0),
        color="tab:gray",
        lw=1,
        ls=":",
        label="model loaded (NVML)",
    )
    ax.set_xlabel("gpu_budget (GiB)")
    ax.set_ylabel("process device memory, NVML peak (GiB)")
    ax.set_title(f"gpu_budget as a bound: {data['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "benchmarks/bench_budget.png")
