"""What ``headinfer plan`` computes: where every byte of a long-context run would sit, from the
model's config alone (no weights loaded), and the time floors no implementation beats.

The split of the GPU budget is the runtime's own: ``headinfer.planner.plan_figures``, the one call
into the Rust planner (``src/plan.rs``) that a CUDA ``HeadInferCache`` makes too. What the
runtime measures (the bytes of the weights torch holds), this module computes from the config:
``parameter_count(config)``, from the model built on the meta device.

Floors, at rates measured on an H200 (BENCHMARKS.md, 2026-11-26: causal SDPA 656.6 TFLOP/s,
bf16 matmul 798.5 TFLOP/s, pinned host-to-device copies 55.5 GB/s), rounded down:

- prefill: attention FLOPs / SDPA rate + ``2 * params * S`` / matmul rate, where the causal
  attention of ``S`` tokens costs ``2 * q_heads * head_dim * S**2`` per full layer (a window
  layer: ``4 * q_heads * head_dim * (S*w - w**2/2)``);
- decode: the KV bytes that sit in host memory, read over PCIe once per token / H2D rate.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .host_memory import mem_available as _mem_available
from .planner import DEFAULT_CONTEXT_BYTES, DEFAULT_MARGIN, DEFAULT_STAGING_CAP, plan_figures
from .share import load_rates, machine_key, physical_cores, rates_path, share_threads
from .sizes import format_bytes
from .spec import ModelSpec, model_spec, rank_spec

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SPLITS",
    "ModelNotFoundError",
    "Rates",
    "attention_flops",
    "default_budget",
    "fits",
    "format_bytes",
    "gpu_shares",
    "load_config",
    "longest_context",
    "longest_figures",
    "make_plan",
    "machine_figures",
    "measured_rates",
    "parameter_count",
    "parse_context",
    "parse_dtype",
    "plan_rates",
    "plot_plan",
    "render_plan",
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

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFoundError(ValueError):
    """A model name or path that leads to no config; the message says what to give instead."""


#: Where the default rates come from.
H200_SOURCE = "H200 constants (BENCHMARKS.md); run `headinfer check` on a GPU host to measure it"


@dataclass(frozen=True)
class Rates:
    """Machine rates for the floors (defaults: an H200, as measured in BENCHMARKS.md), and
    where they come from (``source``, for the report)."""

    sdpa_tflops: float = 650.0
    matmul_tflops: float = 790.0
    h2d_gbs: float = 55.0
    source: str = H200_SOURCE


def measured_rates(
    *, dtype: str, head_dim: int, group: int, defaults: Rates | None = None
) -> Rates:
    """``defaults`` (H200 constants) with this machine's measured host-read rate for the decode
    floor, where ``headinfer check`` (or the runtime's CPU share) measured it: the decode
    kernel's read rate over pinned host memory (``ShareRates.pcie``), from the rates file entry
    of this GPU and host for this ``dtype``, ``head_dim`` and ``group``, else any entry of this
    GPU and host (the link's rate barely depends on the kernel's shape). ``defaults``
    unchanged where there is no GPU or no entry; ``source`` says which.
    """
    import torch

    defaults = defaults or Rates()
    if not torch.cuda.is_available():
        return defaults
    gpu = torch.cuda.get_device_name(torch.cuda.current_device())
    cores = physical_cores()
    key = machine_key(
        gpu, dtype=dtype, head_dim=head_dim, group=group, threads=share_threads(cores), cores=cores
    )
    path = rates_path()
    found = load_rates(key, path)
    if found is None:
        prefix = " | ".join(key.split(" | ")[:4]) + " | "  # GPU, CPU, cores, threads
        try:
            keys = sorted(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            keys = []
        for other in keys:
            if other.startswith(prefix):
                found = load_rates(other, path)
                if found is not None:
                    key = other
                    break
    if found is None:
        return defaults
    return replace(
        defaults,
        h2d_gbs=found.pcie / 1e9,
        source=f"this machine's decode read rate over host memory, measured ({path}: {key})",
    )


def plan_rates(
    config: Any,
    dtype: str,
    sdpa_tflops: float | None = None,
    matmul_tflops: float | None = None,
    h2d_gbs: float | None = None,
) -> Rates:
    """The rates ``headinfer plan`` and ``headinfer check`` use for ``config`` in ``dtype``:
    what is given, else this machine's measured host-read rate (``measured_rates``), else the
    H200 constants.

    Raises:
        UnsupportedModelError: a model headinfer cannot run.
    """
    rates = Rates()
    if sdpa_tflops is not None:
        rates = replace(rates, sdpa_tflops=sdpa_tflops)
    if matmul_tflops is not None:
        rates = replace(rates, matmul_tflops=matmul_tflops)
    if h2d_gbs is not None:
        return replace(rates, h2d_gbs=h2d_gbs, source="--h2d-gbs")
    spec = model_spec(config)
    return measured_rates(
        dtype=parse_dtype(dtype),
        head_dim=spec.head_dim,
        group=spec.num_q_heads // spec.num_kv_heads,
        defaults=rates,
    )


def parse_dtype(name: str) -> str:
    """``bf16``, ``fp16``, ``fp32`` (or the torch names) -> the store's dtype name."""
    try:
        return _DTYPE_NAMES[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"dtype: expected bf16, fp16 or fp32 (or bfloat16, float16, float32), got {name!r}"
        ) from None


_TOKEN_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_context(text: str) -> int:
    """A number of tokens: ``131072``, ``1_000_000``, ``1,000,000``, or with a binary suffix as
    context lengths are usually quoted: ``128K`` = 131,072, ``1M`` = 1,048,576, ``1.5M``."""
    m = re.fullmatch(
        r"\s*([0-9]*\.?[0-9]+)\s*([kmg]?)\s*", text.replace("_", "").replace(",", "").lower()
    )
    if m is None:
        raise ValueError(
            f"context: expected a number of tokens like 131072, 128K or 1M, got {text!r}"
        )
    value = int(float(m.group(1)) * _TOKEN_UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"context: must be positive, got {text!r}")
    return value


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


def load_config(model: str, gguf_file: str | None = None) -> tuple[Any, str]:
    """The config of ``model``: ``smollm2``, a local folder (or GGUF file), or a Hub id.

    Only ``config.json`` (or a GGUF file's metadata) is read; no weights.

    Returns:
        ``(config, label)``: the label names the model in reports.

    Raises:
        ModelNotFoundError: nothing there, a folder without ``config.json``, an unknown name.
    """
    from transformers import AutoConfig

    if model.strip().lower() == "smollm2":
        return _smollm2_config(), "SmolLM2-135M-Instruct"
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_pretrained(AutoConfig, str(path.parent), gguf_file=path.name), path.name
    if path.is_file():
        # A config.json itself.
        return _from_pretrained(AutoConfig, str(path)), path.parent.name or str(path)
    if path.is_dir():
        if gguf_file is not None:
            return _from_pretrained(AutoConfig, str(path), gguf_file=gguf_file), gguf_file
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"--model {model}: the folder has no config.json; point --model at a Hugging "
                "Face model folder (config.json and weights, as save_pretrained writes it), or "
                "name its GGUF file with --gguf-file"
            )
        return _from_pretrained(AutoConfig, str(path)), path.name
    if model.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"--model {model}: no such file or folder")
    if not _HUB_ID.fullmatch(model):
        raise ModelNotFoundError(
            f"--model {model}: unknown model; give 'smollm2' (the bundled SmolLM2-135M), a "
            "local model folder with a config.json, or a Hugging Face Hub id such as "
            "'Qwen/Qwen2.5-7B-Instruct'"
        )
    try:
        kwargs = {} if gguf_file is None else {"gguf_file": gguf_file}
        return AutoConfig.from_pretrained(model, **kwargs), model
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"--model {model}: not a local folder and not loadable from the Hugging Face Hub "
            f"({first}); download it first (hf download {model}) or pass its local folder"
        ) from exc


def _from_pretrained(auto: Any, where: str, **kwargs: Any) -> Any:
    try:
        return auto.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"--model {where}: cannot read its config ({first})") from exc


def _smollm2_config() -> Any:
    """SmolLM2's config: the cached folder's if it was built, else the GGUF's metadata."""
    from transformers import AutoConfig

    from .smollm2 import _SMOLLM2_DIRNAME, cache_dir, smollm2_gguf_path

    folder = cache_dir() / _SMOLLM2_DIRNAME
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(str(folder))
    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"--model smollm2: {exc}") from exc
    return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


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
        ).to_dict()
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
) -> dict[str, Any]:
    """Every figure of ``headinfer plan``, from the config alone (JSON-ready, bytes as ints).

    ``prefill`` and ``decode`` are the Rust planner's splits of ``gpu_budget`` for the two
    phases (the runtime replans when the phase changes: decode needs no staging, so more KV
    stays on the GPU). Weights: ``parameter_count(config)`` elements of ``dtype``.

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
    elem = _ELEM_BYTES[dtype]
    spec = model_spec(config)
    text = _text_config(config)
    params = parameter_count(config)
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
        "elem_bytes": elem,
        "params": params,
        "weight_bytes": weight_bytes,
        "context": context,
        "chunk_size": chunk_size,
        "gpu_budget": gpu_budget,
        "margin_bytes": DEFAULT_MARGIN,
        "staging_cap": DEFAULT_STAGING_CAP,
        "kv_bytes_per_token_layer": 2 * spec.num_kv_heads * spec.head_dim * elem,
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
) -> int | None:
    """The longest context, in tokens, whose plan fits ``gpu_budget`` and ``host_bytes``.

    The same planner as ``make_plan``, searched (doubling, then bisection; every figure grows
    with the context): a context fits when the budget holds weights, working set, staging and
    margin, and its host KV fits ``host_bytes`` (``resident``: no host KV at all, every KV byte
    on the GPU). Returns 0 when not even one token fits, ``None`` when there is no limit below
    ``CONTEXT_SEARCH_LIMIT`` tokens (no RAM figure, or only sliding-window layers).
    """

    def ok(context: int) -> bool:
        plan = make_plan(
            config,
            context=context,
            gpu_budget=gpu_budget,
            chunk_size=chunk_size,
            dtype=dtype,
            gpus=gpus,
            split=split,
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
    windows = sorted({w for w in plan["windows"] if w is not None})
    sliding = plan["num_layers"] - plan["full_attention_layers"]
    geometry = (
        f"{plan['num_layers']} layers"
        + (f" ({sliding} with a {'/'.join(map(str, windows))}-token window)" if sliding else "")
        + f", {plan['num_q_heads']} q / {plan['num_kv_heads']} kv heads of {plan['head_dim']}"
    )
    lines = [
        f"model     {plan['model']} ({plan['family']}): {geometry}, "
        f"{_count(plan['params'])} parameters, {plan['dtype']}",
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
    return f"longest context: {_tokens(longest['with_host'])} tokens ({where}); " + (
        f"{_tokens(resident)} with every KV byte on the GPU"
        if resident
        else "none with every KV byte on the GPU"
    )


def longest_figures(config: Any, plan: dict[str, Any], host_bytes: int | None) -> dict[str, Any]:
    """``plan``'s ``longest_context`` entry: the longest context under its budget and
    ``host_bytes`` of host RAM, and the longest with no KV on the host."""
    kwargs = {
        "gpu_budget": plan["gpu_budget"],
        "chunk_size": plan["chunk_size"],
        "dtype": plan["dtype"],
        "gpus": plan.get("gpus", 1),
        "split": plan.get("split", "layers"),
    }
    return {
        "with_host": longest_context(config, host_bytes=host_bytes, **kwargs),
        "resident": longest_context(config, resident=True, **kwargs),
        "host_bytes": host_bytes,
    }


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
    bars.set_title(f"{plan['model']}: {plan['context']:,} tokens, {plan['dtype']}")
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
