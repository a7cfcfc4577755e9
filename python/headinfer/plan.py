"""What ``headinfer plan`` computes: where every byte of a long-context run would sit, from the
model's config alone (no weights loaded), whether it fits this machine, the longest context that
does, and the time floors no implementation beats.

The split of the GPU budget is the runtime's own: ``headinfer.planner.plan_figures``, the one call
into the Rust planner (``src/plan.rs``) that a CUDA ``HeadInferCache`` makes too. What the
runtime measures (the bytes of the weights torch holds), this module computes from the config:
``parameter_count(config)``, from the model built on the meta device. The config comes from
``model_config.load_config``, the rates from ``floor_rates``, the report from ``plan_report``.

Floors, at the rates of ``floor_rates`` (the H200's, or this machine's measured host-read rate):

- prefill: attention FLOPs / SDPA rate + ``2 * params * S`` / matmul rate, where the causal
  attention of ``S`` tokens costs ``2 * q_heads * head_dim * S**2`` per full layer (a window
  layer: ``4 * q_heads * head_dim * (S*w - w**2/2)``);
- decode: the KV bytes that sit in host memory, read over PCIe once per token / H2D rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

from .floor_rates import Rates
from .host_memory import mem_available as _mem_available
from .kv_dtype import KV_DTYPES, check_kv_dtype, kv_row_bytes
from .planner import DEFAULT_CONTEXT_BYTES, DEFAULT_MARGIN, DEFAULT_STAGING_CAP, plan_figures
from .spec import ModelSpec, model_spec, rank_spec

__all__ = [
    "CONTEXT_SEARCH_LIMIT",
    "DEFAULT_CHUNK_SIZE",
    "KV_DTYPES",
    "SPLITS",
    "attention_flops",
    "default_budget",
    "fits",
    "gpu_shares",
    "longest_context",
    "longest_figures",
    "make_plan",
    "machine_figures",
    "parameter_count",
    "parse_dtype",
]

#: How a model spreads over several GPUs: ``layers`` (``device_map``: each GPU runs some
#: layers, one after another) or ``heads`` (tensor parallelism under torchrun: every GPU runs
#: every layer for its share of the heads).
SPLITS = ("layers", "heads")

#: The chunk size ``patch`` uses by default.
DEFAULT_CHUNK_SIZE = 4096
#: The budget planned for when none is given and this machine has no GPU.
DEFAULT_BUDGET_WITHOUT_GPU = 24 << 30

_DTYPE_NAMES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "f32": "float32",
    "float32": "float32",
    "float": "float32",
}
_ELEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def parse_dtype(name: str) -> str:
    """``bf16``, ``fp16``, ``fp32`` (or the torch names) -> the store's dtype name."""
    try:
        return _DTYPE_NAMES[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"dtype: expected bf16, fp16 or fp32 (or bfloat16, float16, float32), got {name!r}"
        ) from None


def _text_config(config: Any) -> Any:
    if hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def parameter_count(config: Any) -> int:
    """Parameters of the model ``config`` describes, as ``model.parameters()`` counts them.

    The model is built on PyTorch's meta device (shapes only: no memory, no weights read), as
    ``AutoModelForCausalLM`` (or ``AutoModelForImageTextToText`` for a multimodal wrapper)
    builds it from this config, so every family's parts count exactly as loading it would:
    MoE experts and routers, shared experts, tied embeddings (once), biases, q/k norms, sinks,
    a vision tower. A quantized checkpoint's bytes are not its parameters times a dtype's size
    (e.g. gpt-oss's MXFP4 experts); the count is of parameters.

    Raises:
        UnsupportedModelError: a model headinfer cannot run (``model_spec`` says why).
    """
    model_spec(config)  # refuses what headinfer cannot run, before building anything
    model = _meta_model(config)
    return sum(p.numel() for p in model.parameters())


def _meta_model(config: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    errors = []
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except ValueError as exc:  # this auto class has no model for the config
            errors.append(str(exc).splitlines()[0])
    raise ValueError(f"config: transformers builds no causal LM from it ({'; '.join(errors)})")


def _attention_pairs(context: int, window: int | None) -> float:
    # (query, key) pairs of causal attention over `context` tokens, continuous approximation.
    if window is None or window >= context:
        return context * context / 2
    return context * window - window * window / 2


def attention_flops(spec: ModelSpec, context: int) -> float:
    """FLOPs of the attention (scores and weighted values) of a causal prefill of ``context``.

    ``2 * q_heads * head_dim * S**2`` per full layer; window layers see at most their window.
    """
    per_pair = 4 * spec.num_q_heads * spec.head_dim
    return float(sum(per_pair * _attention_pairs(context, w) for w in spec.windows))


def gpu_shares(
    config: Any, spec: ModelSpec, params: int, gpus: int, split: str
) -> list[dict[str, Any]]:
    """What each of ``gpus`` GPUs holds: ``layers`` (indices), ``spec`` (its share of the
    attention), ``params`` (its weights' parameters).

    ``split="heads"`` (tensor parallelism): every GPU runs every layer for 1/gpus of the q and
    kv heads, and holds 1/gpus of the weights (transformers' TP plans split the embeddings,
    attention, feed-forward and output projection). ``split="layers"`` (``device_map``):
    contiguous runs of layers, the first GPUs one layer more where they do not divide evenly;
    the input embeddings on the first GPU and an untied output projection on the last.

    Raises:
        UnsupportedModelError: the heads do not split evenly over ``gpus``.
        ValueError: more GPUs than layers, or an unknown ``split``.
    """
    if gpus < 1:
        raise ValueError(f"gpus: must be positive, got {gpus}")
    layers = spec.num_layers
    if split == "heads":
        share = rank_spec(spec, gpus)
        return [
            {"gpu": i, "layers": list(range(layers)), "spec": share, "params": params // gpus}
            for i in range(gpus)
        ]
    if split != "layers":
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if gpus > layers:
        raise ValueError(f"gpus: {gpus} GPUs for {layers} layers; at most one GPU per layer")
    text = _text_config(config)
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    embed = int(getattr(text, "vocab_size", 0) or 0) * hidden
    tied = bool(
        getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
    )
    head = 0 if tied else embed
    per_layer = max(params - embed - head, 0) / layers
    shares, start = [], 0
    for i in range(gpus):
        n = layers // gpus + (1 if i < layers % gpus else 0)
        mine = list(range(start, start + n))
        start += n
        count = round(n * per_layer) + (embed if i == 0 else 0) + (head if i == gpus - 1 else 0)
        sub = replace(spec, num_layers=n, windows=tuple(spec.windows[j] for j in mine))
        shares.append({"gpu": i, "layers": mine, "spec": sub, "params": count})
    return shares


def _phases(
    text: Any,
    spec: ModelSpec,
    *,
    elem: int,
    weight_bytes: int,
    context: int,
    chunk_size: int,
    gpu_budget: int,
    row_bytes: int,
) -> dict[str, dict[str, Any]]:
    phases = {
        phase: plan_figures(
            text,
            spec,
            elem_bytes=elem,
            weight_bytes=weight_bytes,
            context=context,
            chunk_size=chunk_size,
            # As the runtime does where NVML cannot measure it: the CUDA context comes first.
            gpu_budget=max(gpu_budget - DEFAULT_CONTEXT_BYTES, 0),
            prefill=phase == "prefill",
            kv_row_bytes=row_bytes,
        )
        for phase in ("prefill", "decode")
    }
    for figures in phases.values():
        figures["context_bytes"] = DEFAULT_CONTEXT_BYTES
        figures["gpu_bytes"] = (
            figures["context_bytes"]
            + figures["weight_bytes"]
            + figures["activation_bytes"]
            + figures["staging_bytes"]
            + figures["margin_bytes"]
            + figures["kv_device_bytes"]
        )
    return phases


def _total(per_gpu: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    # All GPUs together: bytes summed, fits when every GPU fits, the smallest head group.
    figures = [g[phase] for g in per_gpu]
    total = {k: sum(f[k] for f in figures) for k in figures[0] if k.endswith("_bytes")}
    total["fits_gpu"] = all(f["fits_gpu"] for f in figures)
    total["heads_per_group"] = min(f["heads_per_group"] for f in figures)
    return total


def make_plan(
    config: Any,
    *,
    context: int,
    gpu_budget: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: str = "bfloat16",
    rates: Rates | None = None,
    label: str | None = None,
    gpus: int = 1,
    split: str = "layers",
    kv_dtype: str = "exact",
    params: int | None = None,
) -> dict[str, Any]:
    """Every figure of ``headinfer plan``, from the config alone (JSON-ready, bytes as ints).

    ``prefill`` and ``decode`` are the Rust planner's splits of ``gpu_budget`` for the two
    phases (the runtime replans when the phase changes: decode needs no staging, so more KV
    stays on the GPU). Weights: ``parameter_count(config)`` elements of ``dtype``; KV:
    ``kv_dtype``'s bytes per token (``"exact"``: ``dtype``; ``"int8"``: 8-bit with scales).
    ``params``: ``parameter_count(config)`` where the caller counted it already.

    With ``gpus > 1`` the model is spread over that many GPUs (``split``: see ``gpu_shares``),
    ``gpu_budget`` is each GPU's, and ``per_gpu`` holds each GPU's plan; ``prefill`` and
    ``decode`` are then the sums over the GPUs (``fits_gpu``: every GPU fits). Each GPU reads
    its own host KV over its own link, so the decode floor is the slowest GPU's; the prefill
    floor divides by the GPUs under tensor parallelism only (``device_map`` runs the layers
    one GPU after another).
    """
    if context <= 0:
        raise ValueError(f"context: must be positive, got {context}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
    rates = rates or Rates()
    dtype = parse_dtype(dtype)
    kv_dtype = check_kv_dtype(kv_dtype)
    elem = _ELEM_BYTES[dtype]
    spec = model_spec(config)
    row_bytes = kv_row_bytes(spec.head_dim, dtype, kv_dtype)
    text = _text_config(config)
    params = parameter_count(config) if params is None else params
    weight_bytes = params * elem
    per_gpu = []
    for share in gpu_shares(config, spec, params, gpus, split):
        sub = share.pop("spec")
        phases = _phases(
            text,
            sub,
            elem=elem,
            weight_bytes=share["params"] * elem,
            context=context,
            chunk_size=chunk_size,
            gpu_budget=gpu_budget,
            row_bytes=row_bytes,
        )
        share.update(
            num_layers=sub.num_layers,
            num_q_heads=sub.num_q_heads,
            num_kv_heads=sub.num_kv_heads,
            weight_bytes=share.pop("params") * elem,
            **phases,
        )
        per_gpu.append(share)
    if gpus == 1:
        phases = {phase: per_gpu[0][phase] for phase in ("prefill", "decode")}
    else:
        phases = {phase: _total(per_gpu, phase) for phase in ("prefill", "decode")}
    attn = attention_flops(spec, context)
    linear = 2.0 * params * context
    prefill_s = attn / (rates.sdpa_tflops * 1e12) + linear / (rates.matmul_tflops * 1e12)
    if split == "heads":
        prefill_s /= gpus
    decode_host = phases["decode"]["kv_host_bytes"]
    slowest_link = max(g["decode"]["kv_host_bytes"] for g in per_gpu)
    full = [w for w in spec.windows if w is None]
    multi = {}
    if gpus > 1:
        multi = {"gpus": gpus, "split": split, "per_gpu": per_gpu}
    return {
        "model": label or getattr(config, "_name_or_path", "") or spec.family,
        "family": spec.family,
        "num_layers": spec.num_layers,
        "num_q_heads": spec.num_q_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "windows": list(spec.windows),
        "full_attention_layers": len(full),
        "max_position_embeddings": spec.max_positions,
        "dtype": dtype,
        "kv_dtype": kv_dtype,
        "elem_bytes": elem,
        "params": params,
        "weight_bytes": weight_bytes,
        "context": context,
        "chunk_size": chunk_size,
        "gpu_budget": gpu_budget,
        "margin_bytes": DEFAULT_MARGIN,
        "staging_cap": DEFAULT_STAGING_CAP,
        "kv_bytes_per_token_layer": 2 * spec.num_kv_heads * row_bytes,
        "kv_total_bytes": phases["prefill"]["kv_total_bytes"],
        "prefill": phases["prefill"],
        "decode": phases["decode"],
        # Pinned host memory the cache needs at its peak (prefill keeps less KV on the GPU).
        "host_kv_bytes": max(p["kv_host_bytes"] for p in phases.values()),
        "floors": {
            "prefill_attention_flops": attn,
            "prefill_linear_flops": linear,
            "prefill_s": prefill_s,
            "decode_host_bytes_per_token": decode_host,
            "decode_s_per_token": slowest_link / (rates.h2d_gbs * 1e9),
            **asdict(rates),
        },
        **multi,
    }


def machine_figures(plan: dict[str, Any]) -> dict[str, Any]:
    """Whether ``plan`` fits this machine: each planned GPU's free memory (GPU 0's for one;
    ``gpu_free_bytes`` is the least free of them) and the host's available RAM."""
    import torch

    gpu: dict[str, Any] = {"gpu": None, "gpu_free_bytes": None, "gpu_total_bytes": None}
    fits_gpu = None
    if torch.cuda.is_available():
        per_gpu = plan.get("per_gpu") or [plan]
        count = torch.cuda.device_count()
        fits_gpu = bool(plan["prefill"]["fits_gpu"]) and len(per_gpu) <= count
        frees = []
        for i, share in enumerate(per_gpu[:count]):
            free, total = torch.cuda.mem_get_info(i)
            frees.append(free)
            peak = max(share[phase]["gpu_bytes"] for phase in ("prefill", "decode"))
            fits_gpu = fits_gpu and peak <= free
        gpu = {
            "gpu": torch.cuda.get_device_name(0),
            "gpu_free_bytes": min(frees),
            "gpu_total_bytes": total,
            "gpu_count": count,
        }
    ram = _mem_available()
    return {
        **gpu,
        "fits_gpu": fits_gpu,
        "ram_available_bytes": ram,
        "fits_ram": None if ram is None else plan["host_kv_bytes"] <= ram,
    }


def fits(plan: dict[str, Any]) -> bool:
    """Whether the run fits: the budget holds weights, working set, staging and margin, and,
    where ``plan["machine"]`` says, this GPU's free memory and this host's available RAM."""
    machine = plan.get("machine") or {}
    return (
        bool(plan["prefill"]["fits_gpu"])
        and machine.get("fits_gpu") is not False
        and machine.get("fits_ram") is not False
    )


#: Where ``longest_context`` stops looking (a context that fits beyond it is reported as None).
CONTEXT_SEARCH_LIMIT = 1 << 40


def longest_context(
    config: Any,
    *,
    gpu_budget: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: str = "bfloat16",
    host_bytes: int | None = None,
    resident: bool = False,
    gpus: int = 1,
    split: str = "layers",
    kv_dtype: str = "exact",
) -> int | None:
    """The longest context, in tokens, whose plan fits ``gpu_budget`` and ``host_bytes``.

    The same planner as ``make_plan``, searched (doubling, then bisection; every figure grows
    with the context): a context fits when the budget holds weights, working set, staging and
    margin, and its host KV fits ``host_bytes`` (``resident``: no host KV at all, every KV byte
    on the GPU). Returns 0 when not even one token fits, ``None`` when there is no limit below
    ``CONTEXT_SEARCH_LIMIT`` tokens (no RAM figure, or only sliding-window layers).
    """
    params = parameter_count(config)  # once, not once per context tried

    def ok(context: int) -> bool:
        plan = make_plan(
            config,
            context=context,
            gpu_budget=gpu_budget,
            chunk_size=chunk_size,
            dtype=dtype,
            gpus=gpus,
            split=split,
            kv_dtype=kv_dtype,
            params=params,
        )
        if not plan["prefill"]["fits_gpu"]:
            return False
        if resident:
            return plan["host_kv_bytes"] == 0
        return host_bytes is None or plan["host_kv_bytes"] <= host_bytes

    if not ok(1):
        return 0
    low, high = 1, 2
    while ok(high):
        if high >= CONTEXT_SEARCH_LIMIT:
            return None
        low, high = high, high * 2
    while high - low > 1:  # ok(low), not ok(high)
        mid = (low + high) // 2
        if ok(mid):
            low = mid
        else:
            high = mid
    return low


def default_budget() -> tuple[int, str]:
    """The budget to plan for when none is given: GPU 0's free memory, else 24 GiB."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return free, "this GPU's free memory"
    return DEFAULT_BUDGET_WITHOUT_GPU, "24 GiB (no GPU here; set --gpu-budget)"


def longest_figures(
    config: Any,
    plan: dict[str, Any],
    host_bytes: int | None,
    kv_dtypes: Sequence[str] = (),
) -> dict[str, Any]:
    """``plan``'s ``longest_context`` entry: the longest context under its budget and
    ``host_bytes`` of host RAM (``with_host``), and the longest with no KV on the host
    (``resident``), in the plan's ``kv_dtype``; ``by_kv_dtype``: both figures for each of
    ``kv_dtypes`` too (``headinfer plan`` gives ``KV_DTYPES``: what 8-bit KV would hold)."""
    kwargs = {
        "gpu_budget": plan["gpu_budget"],
        "chunk_size": plan["chunk_size"],
        "dtype": plan["dtype"],
        "gpus": plan.get("gpus", 1),
        "split": plan.get("split", "layers"),
    }
    own = plan.get("kv_dtype", "exact")
    by_kv_dtype = {}
    for kv_dtype in dict.fromkeys((own, *kv_dtypes)):
        by_kv_dtype[kv_dtype] = {
            "with_host": longest_context(
                config, host_bytes=host_bytes, kv_dtype=kv_dtype, **kwargs
            ),
            "resident": longest_context(config, resident=True, kv_dtype=kv_dtype, **kwargs),
        }
    return {
        **by_kv_dtype[own],
        "host_bytes": host_bytes,
        "kv_dtype": own,
        "by_kv_dtype": by_kv_dtype,
    }
