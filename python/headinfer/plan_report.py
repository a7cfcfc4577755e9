"""``headinfer plan``'s report: the figures of ``plan.make_plan`` as text (``render_plan``) and as
a plot (``plot_plan``: where the bytes sit, and the longest context against the GPU budget).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plan import CONTEXT_SEARCH_LIMIT, fits, longest_context
from .sizes import format_bytes

__all__ = ["plot_plan", "render_plan"]


def _count(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n:,.0f}"


def _seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1000:.2f} ms"


def render_plan(plan: dict[str, Any]) -> str:
    """The human-readable report of ``make_plan`` (and ``machine`` figures, if present)."""
    p, d = plan["prefill"], plan["decode"]
    kv_dtype = plan.get("kv_dtype", "exact")
    windows = sorted({w for w in plan["windows"] if w is not None})
    sliding = plan["num_layers"] - plan["full_attention_layers"]
    geometry = (
        f"{plan['num_layers']} layers"
        + (f" ({sliding} with a {'/'.join(map(str, windows))}-token window)" if sliding else "")
        + f", {plan['num_q_heads']} q / {plan['num_kv_heads']} kv heads of {plan['head_dim']}"
    )
    lines = [
        f"model     {plan['model']} ({plan['family']}): {geometry}, "
        f"{_count(plan['params'])} parameters, {plan['dtype']}"
        + (f", {kv_dtype} KV" if kv_dtype != "exact" else ""),
    ]
    ctx = f"context   {plan['context']:,} tokens"
    limit = plan["max_position_embeddings"]
    if limit is not None and plan["context"] > limit:
        ctx += f" (beyond max_position_embeddings {limit:,}: forced)"
    lines.append(ctx)
    heads = p["heads_per_group"]
    lines += [
        f"prefill   chunks of {plan['chunk_size']:,} tokens, head groups of {heads} kv head"
        + ("s" if heads != 1 else ""),
        f"budget    {format_bytes(plan['gpu_budget'])} of GPU memory"
        + (" per GPU" if "per_gpu" in plan else "")
        + (f" ({plan['gpu_budget_source']})" if plan.get("gpu_budget_source") else ""),
    ]
    if "per_gpu" in plan:
        lines += _render_gpus(plan)
    lines += [
        "",
        f"{'where the bytes sit' + (' (all GPUs)' if 'per_gpu' in plan else ''):<34}"
        f"{'prefill':>14}{'decode':>14}",
    ]
    rows = [
        ("GPU  CUDA context (estimate)", "context_bytes"),
        ("GPU  weights", "weight_bytes"),
        ("GPU  activations (one chunk)", "activation_bytes"),
        ("GPU  staging (2 head groups)", "staging_bytes"),
        ("GPU  margin", "margin_bytes"),
        ("GPU  resident KV", "kv_device_bytes"),
        ("GPU  total", "gpu_bytes"),
        ("host KV (pinned)", "kv_host_bytes"),
        ("KV total", "kv_total_bytes"),
    ]
    for name, key in rows:
        lines.append(f"  {name:<32}{format_bytes(p[key]):>14}{format_bytes(d[key]):>14}")
    per_token = plan["kv_bytes_per_token_layer"] * plan["num_layers"]
    lines.append(
        f"  (KV: {per_token:,} bytes per token over all layers"
        + (f", {kv_dtype} with its scales" if kv_dtype != "exact" else "")
        + (", window layers hold at most window + chunk" if sliding else "")
        + ")"
    )
    budget_verdict = "yes"
    if not p["fits_gpu"]:
        need = max(g["prefill"]["gpu_bytes"] for g in plan.get("per_gpu") or [plan])
        budget_verdict = (
            f"NO: context, weights, working set, staging and margin need "
            f"{format_bytes(need)}" + (" on a GPU" if "per_gpu" in plan else "") + "; "
            "every KV byte would sit in host memory (raise --gpu-budget)"
        )
    lines += ["", f"fits the budget: {budget_verdict}"]
    m = plan.get("machine")
    if m is not None:
        if m["gpu"] is None:
            lines.append("this GPU: no GPU here")
        else:
            verdict = "yes" if m["fits_gpu"] else "NO"
            lines.append(
                f"this GPU: {m['gpu']}, {format_bytes(m['gpu_free_bytes'])} free of "
                f"{format_bytes(m['gpu_total_bytes'])}: fits {verdict}"
            )
        if m["ram_available_bytes"] is None:
            lines.append("this RAM: unknown (no /proc/meminfo)")
        else:
            verdict = "yes" if m["fits_ram"] else "NO"
            lines.append(
                f"this RAM: {format_bytes(m['ram_available_bytes'])} available for "
                f"{format_bytes(plan['host_kv_bytes'])} of host KV: fits {verdict}"
            )
    longest = plan.get("longest_context")
    if longest is not None:
        lines.append(_render_longest(longest))
    if "machine" in plan:
        lines.append("overall: fits" if fits(plan) else "overall: does NOT fit (exit status 1)")
    f = plan["floors"]
    lines += [
        "",
        f"floors (SDPA {f['sdpa_tflops']:g} TFLOP/s, matmul {f['matmul_tflops']:g} TFLOP/s: "
        f"H200 unless set; host-to-device {f['h2d_gbs']:.3g} GB/s: {f['source']})",
        f"  prefill  {_seconds(f['prefill_s'])}: attention {f['prefill_attention_flops']:.3g} "
        f"FLOP + linear {f['prefill_linear_flops']:.3g} FLOP",
    ]
    if f["decode_host_bytes_per_token"]:
        lines.append(
            f"  decode   {_seconds(f['decode_s_per_token'])}/token: "
            f"{format_bytes(f['decode_host_bytes_per_token'])} of host KV read over PCIe per token"
        )
    else:
        lines.append("  decode   no KV in host memory: bound by GPU memory bandwidth, not PCIe")
    return "\n".join(lines)


def _render_gpus(plan: dict[str, Any]) -> list[str]:
    gpus, split = plan["gpus"], plan["split"]
    if split == "heads":
        how = (
            f"gpus      {gpus}, tensor parallelism (torchrun): every GPU runs every layer for "
            f"its {plan['per_gpu'][0]['num_kv_heads']} of {plan['num_kv_heads']} kv heads"
        )
    else:
        how = f"gpus      {gpus}, device_map: each GPU runs its layers, one GPU after another"
    lines = [
        how,
        "",
        f"{'per GPU':<16}{'holds':<22}{'weights':>11}{'GPU peak':>11}{'GPU KV':>11}{'host KV':>11}",
    ]
    for g in plan["per_gpu"]:
        if split == "heads":
            holds = f"{g['num_kv_heads']} kv / {g['num_q_heads']} q heads"
        else:
            first, last = g["layers"][0], g["layers"][-1]
            holds = f"layers {first}-{last}" if last != first else f"layer {first}"
        peak = max(g[p]["gpu_bytes"] for p in ("prefill", "decode"))
        lines.append(
            f"  {'cuda:' + str(g['gpu']):<14}{holds:<22}{format_bytes(g['weight_bytes']):>11}"
            f"{format_bytes(peak):>11}{format_bytes(g['decode']['kv_device_bytes']):>11}"
            f"{format_bytes(g['decode']['kv_host_bytes']):>11}"
        )
    return lines


def _tokens(n: int | None) -> str:
    return f"more than {CONTEXT_SEARCH_LIMIT:,}" if n is None else f"{n:,}"


def _render_longest(longest: dict[str, Any]) -> str:
    host = longest["host_bytes"]
    if longest["with_host"] == 0 and longest["resident"] == 0:
        return (
            "longest context: none (the budget does not hold weights, working set, staging "
            "and margin)"
        )
    where = (
        f"this budget and {format_bytes(host)} of host RAM"
        if host is not None
        else "this budget (host RAM unknown: no limit from it)"
    )
    resident = longest["resident"]
    line = f"longest context: {_tokens(longest['with_host'])} tokens ({where}); " + (
        f"{_tokens(resident)} with every KV byte on the GPU"
        if resident
        else "none with every KV byte on the GPU"
    )
    by_kv_dtype = longest.get("by_kv_dtype") or {}
    if len(by_kv_dtype) < 2:
        return line
    rows = [line, f"  {'KV dtype':<12}{'with host RAM':>20}{'all KV on the GPU':>22}"]
    for kv_dtype, figures in by_kv_dtype.items():
        rows.append(
            f"  {kv_dtype:<12}{_tokens(figures['with_host']):>20}"
            f"{_tokens(figures['resident']) if figures['resident'] else 'none':>22}"
        )
    return "\n".join(rows)


#: The parts of the GPU budget in the plot, bottom to top: (plan key, label, colour).
_PARTS = (
    ("weight_bytes", "weights", "#4c72b0"),
    ("activation_bytes", "working set (one chunk)", "#dd8452"),
    ("staging_bytes", "staging (2 head groups)", "#937860"),
    ("margin_bytes", "margin", "#c0c0c0"),
    ("kv_device_bytes", "KV on the GPU", "#55a868"),
)


def plot_plan(
    config: Any, plan: dict[str, Any], path: str | Path, host_bytes: int | None = None
) -> None:
    """Draw ``plan`` into a PNG at ``path``: where the bytes sit in each phase (a stacked bar:
    the GPU budget's parts, then the KV in host memory above the budget line), and the longest
    context against the GPU budget (with host RAM ``host_bytes``, and with all KV on the GPU).

    Needs matplotlib (the Agg backend: no display).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = float(1 << 30)
    fig, (bars, curve) = plt.subplots(1, 2, figsize=(12, 5.6), width_ratios=[1, 1.5])

    phases = ("prefill", "decode")
    for x, phase in enumerate(phases):
        bottom = 0.0
        for key, label, colour in _PARTS:
            height = plan[phase][key] / gib
            bars.bar(x, height, bottom=bottom, color=colour, label=label if x == 0 else None)
            bottom += height
        host = plan[phase]["kv_host_bytes"] / gib
        bars.bar(
            x,
            host,
            bottom=bottom,
            color="white",
            edgecolor="#55a868",
            hatch="//",
            label="KV in host memory" if x == 0 else None,
        )
        total = bottom + host
        bars.annotate(
            f"GPU {format_bytes(plan[phase]['gpu_bytes'])}\nhost {format_bytes(host * gib)}",
            (x, total),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    budget = plan["gpu_budget"] / gib
    bars.axhline(budget, color="black", linestyle="--", linewidth=1)
    bars.annotate(
        f"GPU budget {format_bytes(plan['gpu_budget'])}",
        (0.5, budget),
        ha="center",
        va="bottom",
        fontsize="small",
    )
    bars.set_xticks(range(len(phases)), phases)
    bars.set_xlim(-0.5, len(phases) - 0.5)
    bars.set_ylabel("GiB")
    tallest = max(sum(plan[p][k] for k, _, _ in _PARTS) + plan[p]["kv_host_bytes"] for p in phases)
    bars.set_ylim(0, max(tallest / gib, budget) * 1.2)
    kv = plan.get("kv_dtype", "exact")
    bars.set_title(
        f"{plan['model']}: {plan['context']:,} tokens, {plan['dtype']}"
        + (f", {kv} KV" if kv != "exact" else "")
    )
    bars.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)

    # Longest context against the GPU budget: from what weights, working set and margin need,
    # to twice this budget (or 80 GiB, whichever is more).
    low = plan["weight_bytes"] + plan["prefill"]["activation_bytes"] + plan["margin_bytes"]
    high = max(2 * plan["gpu_budget"], 80 << 30)
    budgets = [low + (high - low) * i / 40 for i in range(1, 41)]
    kwargs = {
        "chunk_size": plan["chunk_size"],
        "dtype": plan["dtype"],
        "gpus": plan.get("gpus", 1),
        "split": plan.get("split", "layers"),
        "kv_dtype": plan.get("kv_dtype", "exact"),
    }
    resident = [
        longest_context(config, gpu_budget=int(b), resident=True, **kwargs) for b in budgets
    ]
    xs = [b / gib for b in budgets]
    curve.plot(xs, [r or float("nan") for r in resident], label="every KV byte on the GPU")
    if host_bytes is not None:
        with_host = [
            longest_context(config, gpu_budget=int(b), host_bytes=host_bytes, **kwargs)
            for b in budgets
        ]
        curve.plot(
            xs,
            [r or float("nan") for r in with_host],
            label=f"with {format_bytes(host_bytes)} of host RAM",
        )
    curve.axvline(budget, color="black", linestyle="--", linewidth=1, label="this budget")
    curve.axhline(
        plan["context"], color="tab:red", linestyle=":", linewidth=1, label="this context"
    )
    limit = plan.get("max_position_embeddings")
    if limit is not None:
        curve.axhline(limit, color="gray", linestyle="-.", linewidth=1, label="model positions")
    curve.set_yscale("log")
    curve.set_xlabel("GPU budget (GiB)")
    curve.set_ylabel("longest context (tokens)")
    curve.set_title("longest context that fits")
    curve.grid(True, which="major", alpha=0.3)
    curve.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
