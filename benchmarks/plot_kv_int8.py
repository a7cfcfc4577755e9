"""Draw benchmarks/bench_kv_int8.png from the JSON that bench_kv_int8.py writes: decode seconds
per token against context (exact and int8) beside each one's host floor (host KV bytes over the
copy engine's rate plus the CPU's, measured at once), and the cumulative prefill time. Runs of
separate processes can be given together (their ``exact`` and ``int8`` entries are merged).

With ``--timeline``, benchmarks/share_timeline.png instead: where the CPU share's decode steps
spent their time (``timeline_s_per_token``), per run and mode one bar for the GPU's side (its
own part, then waiting for the CPU's rows, then the rest of the step) and one for the CPU's
(its tasks computing, then idle), in seconds a token.

With ``--alternatives``, one bar per decode and per alternative after it (``--alt-rings``,
``--alt-staging-mib``, ``--alt-threads``): seconds a token over the run's host floor, beside
issue 15's 1.3 x. Needs matplotlib.

Usage: python benchmarks/plot_kv_int8.py OUT.png RESULT.json [RESULT.json ...]
       python benchmarks/plot_kv_int8.py --timeline OUT.png LABEL=RESULT.json [...]
       python benchmarks/plot_kv_int8.py --alternatives OUT.png LABEL=RESULT.json [...]
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
            if r["x_host_floor"] is not None:  # None: no KV bytes left on the host
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
    _save(fig, out)


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


def timeline(out: str, specs: list[str]) -> None:
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
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, out)


def _alt_name(a: dict) -> str:
    """What an alternative changed: its staging ring or its threads."""
    if a.get("threads"):
        return f"{a['threads']} threads"
    if a.get("buffers"):
        return f"ring {a['piece_mib']} MiB x {a['buffers']}"
    return f"{a['piece_mib']} MiB pieces"


def alternatives(out: str, specs: list[str]) -> None:
    bars = []  # (label, x floor)
    for spec in specs:
        label, path = spec.split("=", 1)
        data = json.loads(Path(path).read_text())
        runs = ([("exact", data["exact"])] if "exact" in data else []) + [
            ("int8", r) for r in data.get("int8", []) if "s_per_token" in r
        ]
        for mode, r in runs:
            floor = r["host_floor_s"]
            if not floor:
                continue
            head = f"{label}\n{mode} {r['context']:,}"
            bars.append((f"{head}\ndefault", r["s_per_token"] / floor))
            for a in r.get("alternatives", []):
                bars.append((f"{head}\n{_alt_name(a)}", a["s_per_token"] / floor))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(bars)), 4.5))
    ax.bar(range(len(bars)), [x for _, x in bars], 0.6, color="tab:orange")
    for i, (_, x) in enumerate(bars):
        ax.annotate(f"{x:.2f}", (i, x), ha="center", va="bottom", fontsize=8)
    ax.axhline(1.3, color="k", ls="--", lw=1, label="issue 15's target: 1.3 x")
    ax.set_xticks(range(len(bars)), [n for n, _ in bars], fontsize=7)
    ax.set_ylabel("seconds a token / host floor")
    ax.set_title("decode against the host floor, one process (Llama-3-8B shape, 24 GiB card)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, out)


def _save(fig, out: str) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    args = sys.argv[1:]
    draw = main
    if args[:1] == ["--timeline"]:
        draw, args = timeline, args[1:]
    elif args[:1] == ["--alternatives"]:
        draw, args = alternatives, args[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    draw(args[0], args[1:])
