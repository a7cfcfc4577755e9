"""``headinfer check``: does headinfer work on this machine, and how fast will it be.

Four parts, in order (each reported as it finishes, progress on stderr):

1. the environment (``machine.environment``);
2. this machine's rates, measured now and saved where the runtime and ``headinfer plan`` read
   them (``machine.measure``), the CPU share's over KV held as ``kv_dtype`` says;
3. the exactness self-test of every supported family (``selftest.run_self_test``);
4. what to expect for ``model`` at ``context`` tokens under ``gpu_budget``: the plan of
   ``headinfer plan`` (the same planner, with the rates it would use now, so after step 2 this
   machine's), its decode floor per token and the longest context that fits.

``run_check`` returns the report (JSON-ready); ``render`` writes it for people.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .floor_rates import plan_rates
from .kv_dtype import check_kv_dtype
from .machine import environment, measure
from .plan import (
    DEFAULT_CHUNK_SIZE,
    default_budget,
    longest_figures,
    machine_figures,
    make_plan,
    parse_dtype,
)
from .selftest import Result, run_self_test
from .sizes import format_bytes
from .spec import model_spec

__all__ = [
    "DEFAULT_CONTEXT",
    "DEFAULT_MODEL_LABEL",
    "default_config",
    "expect",
    "render",
    "run_check",
    "share_estimate",
]

#: The shape predicted for when no model is given.
DEFAULT_MODEL_LABEL = "Llama-3-8B shape"
#: The context predicted for when none is given.
DEFAULT_CONTEXT = 128 << 10


def default_config() -> Any:
    """A Llama-3-8B-shaped config (32 layers, 32 q / 8 kv heads of 128, 128K positions)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
    )


def expect(
    config: Any,
    label: str,
    *,
    context: int,
    gpu_budget: int | None,
    dtype: str = "bfloat16",
    chunk_size: int | None = None,
    rates: dict[str, float] | None = None,
    kv_dtype: str = "exact",
) -> dict[str, Any]:
    """What to expect for ``config``: ``headinfer plan``'s figures for the same inputs (its
    rates: this machine's where measured; KV bytes of ``kv_dtype``), and with this run's
    measured GPU rates, an estimate of a decode step with the GPU alone (resident KV at the
    device rate, host KV at the decode kernel's host rate)."""

    source = ""
    if gpu_budget is None:
        gpu_budget, source = default_budget()
    dtype = parse_dtype(dtype)
    plan = make_plan(
        config,
        context=context,
        gpu_budget=gpu_budget,
        chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
        dtype=dtype,
        rates=plan_rates(config, dtype),
        label=label,
        kv_dtype=kv_dtype,
    )
    ram = machine_figures(plan)["ram_available_bytes"]  # as `plan` reads it
    longest = longest_figures(config, plan, ram)
    decode = plan["decode"]
    out: dict[str, Any] = {
        "model": label,
        "dtype": dtype,
        "kv_dtype": plan["kv_dtype"],
        "context": context,
        "gpu_budget": gpu_budget,
        "gpu_budget_source": source,
        "fits_gpu": bool(plan["prefill"]["fits_gpu"]),
        "kv_device_bytes": decode["kv_device_bytes"],
        "kv_host_bytes": decode["kv_host_bytes"],
        "decode_s_per_token": plan["floors"]["decode_s_per_token"],
        "prefill_s": plan["floors"]["prefill_s"],
        "rates_source": plan["floors"]["source"],
        "h2d_gbs": plan["floors"]["h2d_gbs"],
        "longest_context": longest["with_host"],
        "longest_context_resident": longest["resident"],
        "ram_available_bytes": ram,
        "gpu_alone_s_per_token": None,
        "cpu_share_s_per_token": None,
    }
    if rates and rates.get("pcie") and rates.get("device"):
        out["gpu_alone_s_per_token"] = (
            decode["kv_device_bytes"] / rates["device"] + decode["kv_host_bytes"] / rates["pcie"]
        )
        out["cpu_share_s_per_token"] = share_estimate(
            rates,
            device_bytes=decode["kv_device_bytes"],
            host_bytes=decode["kv_host_bytes"],
            layers=plan["num_layers"],
        )
    return out


def share_estimate(
    rates: dict[str, float], *, device_bytes: float, host_bytes: float, layers: int
) -> float | None:
    """Seconds of a decode step with the CPU share, from measured ``rates`` (``pcie``,
    ``device``, ``cpu``, ``handoff``): per layer (the bytes spread evenly over ``layers``), the
    host bytes the CPU takes so that both sides finish together, as the share's policy cuts
    them (``attention/policy.rs``: ``balance``; whole blocks there, continuous here), or the
    GPU alone where sharing is not faster. ``None`` without a CPU rate or host bytes."""
    pcie, device, cpu, handoff = (rates.get(k, 0.0) for k in ("pcie", "device", "cpu", "handoff"))
    if not (pcie > 0 and device > 0 and cpu > 0 and host_bytes > 0 and layers > 0):
        return None
    dev, host = device_bytes / layers, host_bytes / layers
    alone = dev / device + host / pcie
    taken = min(max((alone - handoff) / (1 / pcie + 1 / cpu), 0.0), host)
    shared = max(alone - taken / pcie, handoff + taken / cpu)
    return layers * min(alone, shared)


def run_check(
    config: Any | None = None,
    label: str = DEFAULT_MODEL_LABEL,
    *,
    context: int = DEFAULT_CONTEXT,
    gpu_budget: int | None = None,
    dtype: str = "bfloat16",
    chunk_size: int | None = None,
    save: bool = True,
    self_test: bool = True,
    say: Callable[[str], None] | None = None,
    kv_dtype: str = "exact",
) -> dict[str, Any]:
    """The report of ``headinfer check`` (see the module docstring); ``say`` gets progress.
    ``kv_dtype`` (``"exact"`` or ``"int8"``): the KV format the CPU share's rate is measured
    over and the prediction plans."""

    def note(text: str) -> None:
        if say is not None:
            say(text)

    start = time.perf_counter()
    config = default_config() if config is None else config
    spec = model_spec(config)  # UnsupportedModelError before anything is measured
    kv_dtype = check_kv_dtype(kv_dtype)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    note("environment...")
    report["environment"] = environment()
    note("measuring this machine's rates...")
    report["rates"] = measure(
        dtype=parse_dtype(dtype),
        head_dim=spec.head_dim,
        group=spec.num_q_heads // spec.num_kv_heads,
        save=save,
        kv_dtype=kv_dtype,
    )
    results: list[Result] = []
    if self_test:
        note("self-test: every family against eager attention...")

        def progress(r: Result, done: int, total: int) -> None:
            verdict = "PASS" if r.ok else "FAIL"
            note(f"  [{done}/{total}] {r.family} {r.mode} {r.dtype}: {verdict}")

        results = run_self_test(progress=progress)
    report["self_test"] = [r.as_dict() for r in results]
    report["self_test_ok"] = all(r.ok for r in results)
    note("what to expect...")
    report["expect"] = expect(
        config,
        label,
        context=context,
        gpu_budget=gpu_budget,
        dtype=dtype,
        chunk_size=chunk_size,
        rates=report["rates"]["rates"],
        kv_dtype=kv_dtype,
    )
    report["seconds"] = time.perf_counter() - start
    return report


def _rate(name: str, value: float) -> str:
    if name == "handoff":
        return f"{value * 1e6:.0f} us"
    return f"{value / 1e9:.1f} GB/s"


_RATE_NAMES = {
    "pcie": "decode kernel over pinned host memory",
    "device": "decode kernel over device memory",
    "cpu": "CPU share (its threads over host KV)",
    "handoff": "CPU share's fixed cost per step",
    "h2d_copy": "pinned copy-engine host-to-device",
}


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1000:.2f} ms"


def render(report: dict[str, Any]) -> str:
    """The report for people: one section per part, a line per family."""
    env = report["environment"]
    lines = [
        f"headinfer {env['headinfer']} (torch {env['torch']}, transformers "
        f"{env['transformers']}, Python {env['python']}), {report['date']}",
        "",
        "environment",
        f"  CUDA        {'yes' if env['cuda_ok'] else 'no'}: {env['cuda_status']}"
        + (f" (torch built for CUDA {env['torch_cuda']})" if env["torch_cuda"] else ""),
    ]
    if env["gpus"]:
        for g in env["gpus"]:
            lines.append(
                f"  GPU {g['index']}       {g['name']}, {format_bytes(g['memory_bytes'])}, "
                f"{format_bytes(g['free_bytes'])} free (compute {g['compute_capability']})"
            )
    else:
        lines.append("  GPU         none (the CPU path runs)")
    isa = env["cpu_isa"] + (
        f" (passed over: {'; '.join(env['cpu_isa_failures'])})" if env["cpu_isa_failures"] else ""
    )
    ram = env["ram_total_bytes"]
    avail = env["ram_available_bytes"]
    memlock = env["memlock_limit_bytes"]
    lines += [
        f"  CPU         {env['cpu']}: {env['physical_cores']} physical cores, "
        f"{env['logical_cpus']} CPUs; CPU share threads {env['share_threads']}",
        f"  CPU kernels {isa}",
        f"  RAM         {format_bytes(ram) if ram else 'unknown'}, "
        f"{format_bytes(avail) if avail else 'unknown'} available",
        f"  pinned      memlock limit {format_bytes(memlock) if memlock else 'unlimited'}; "
        f"{format_bytes(env['pinned_bytes_held'])} held by headinfer",
        "",
    ]
    r = report["rates"]
    where = f"on {r['gpu']}" if r["gpu"] else "no GPU: the CPU share's rate only"
    kv = r.get("kv_dtype", "exact")
    over = "" if kv == "exact" else f", the CPU share over {kv} KV"
    lines.append(f"rates (measured now in {r['seconds']:.1f} s, {where}{over})")
    for name, value in r["rates"].items():
        lines.append(f"  {_RATE_NAMES.get(name, name):<40}{_rate(name, value):>14}")
    if r["saved_to"]:
        lines.append(f"  saved to {r['saved_to']}")
    lines.append("")
    tests = report["self_test"]
    if tests:
        lines.append("self-test (tiny random models against eager attention)")
        for t in tests:
            verdict = "PASS" if t["ok"] else "FAIL"
            what = (
                f"error {t['err']:.2e} (limit {t['limit']:.2e})"
                if t["error"] is None
                else t["error"]
            )
            lines.append(f"  {t['family']:<14}{t['mode']:<10}{t['dtype']:<10}{verdict}  {what}")
        passed = sum(t["ok"] for t in tests)
        lines.append(f"  {passed} of {len(tests)} passed")
        lines.append("")
    e = report["expect"]
    budget = format_bytes(e["gpu_budget"]) + (
        f", {e['gpu_budget_source']}" if e["gpu_budget_source"] else ""
    )
    lines += [
        f"what to expect: {e['model']}, {e['context']:,} tokens, {e['dtype']}"
        + ("" if e.get("kv_dtype", "exact") == "exact" else f", {e['kv_dtype']} KV"),
        f"  GPU budget          {budget}",
        f"  KV in decode        {format_bytes(e['kv_device_bytes'])} on the GPU, "
        f"{format_bytes(e['kv_host_bytes'])} in host memory"
        + ("" if e["fits_gpu"] else " (the budget does NOT hold weights and working set)"),
        f"  decode floor        {_seconds(e['decode_s_per_token'])}/token "
        f"(host KV at {e['h2d_gbs']:.3g} GB/s: {e['rates_source']})",
    ]
    if e["gpu_alone_s_per_token"] is not None:
        lines.append(
            f"  decode, GPU alone   {_seconds(e['gpu_alone_s_per_token'])}/token "
            "(resident KV at the device rate, host KV at the host rate, measured now)"
        )
    if e["cpu_share_s_per_token"] is not None:
        lines.append(
            f"  decode, CPU share   {_seconds(e['cpu_share_s_per_token'])}/token "
            "(the CPU's threads taking part of the host KV at its rate, measured now; "
            "cpu_heads='auto')"
        )
    longest = e["longest_context"]
    lines.append(
        "  longest context     "
        + ("no limit found" if longest is None else f"{longest:,} tokens")
        + (
            f" (this budget and {format_bytes(e['ram_available_bytes'])} of RAM)"
            if e["ram_available_bytes"]
            else ""
        )
    )
    verdict = "PASS" if report["self_test_ok"] else "FAIL (exit status 1)"
    if not tests:
        verdict = "not run (--no-self-test)"
    lines += ["", f"self-test: {verdict} ({report['seconds']:.0f} s)"]
    return "\n".join(lines)
