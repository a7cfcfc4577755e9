"""Draw where the CPU share's decode steps spent their time (``timeline_s_per_token`` in the
JSON that bench_kv_int8.py writes): per run and mode, one bar for the GPU's side (its own part,
then waiting for the CPU's rows, then the rest of the step) and one for the CPU's (its tasks
computing, then idle), in seconds a token. Needs matplotlib.

Usage: python benchmarks/plot_share_timeline.py OUT.png LABEL=RESULT.json [LABEL=RESULT.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _entries(label: str, path: str) -> list[tuple[str, dict]]:
    """(name, decode result) of each mode in one result file that has a timeline."""
    data = json.loads(Path(path).read_text())
    runs = ([data["exact"]] if "exact" in data else []) + data.get("int8", [])
    out = []
    for r in runs:
        if r.get("timeline_s_per_token"):
            mode = "int8" if "prefill_s_cumulative" in r else "exact"
            out.append((f"{label}\n{mode} {r['context']:,}", r))
    return out


def main(out: str, specs: list[str]) -> None:
    entries = [e for spec in specs for e in _entries(*spec.split("=", 1))]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(entries)), 4.5))
    for i, (_, r) in enumerate(entries):
        t = r["timeline_s_per_token"][0]
        step = r["s_per_token"]
        rest = max(step - t["gpu_own"] - t["gpu_waited"], 0.0)
        gpu = [
            (t["gpu_own"], "tab:blue", "GPU: own part"),
            (t["gpu_waited"], "tab:red", "GPU: waits for the CPU's rows"),
            (rest, "tab:gray", "GPU: rest of the step"),
        ]
        cpu = [
            (t["cpu_busy"], "tab:green", "CPU: tasks computing"),
            (t["cpu_idle"], "tab:olive", "CPU: idle between tasks"),
        ]
        for x, parts in ((i - 0.2, gpu), (i + 0.2, cpu)):
            bottom = 0.0
            for v, color, label in parts:
                ax.bar(x, v, 0.38, bottom=bottom, color=color, label=label if i == 0 else None)
                bottom += v
        ax.plot([i - 0.4, i + 0.4], [step, step], "k--", lw=1)
    ax.set_xticks(range(len(entries)), [n for n, _ in entries])
    ax.set_ylabel("s a token: GPU (left), CPU (right)")
    ax.set_title("Where a shared decode step goes (Llama-3-8B shape, emulated 24 GiB card)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
