"""What headinfer needs to know about a model's attention: its ``ModelSpec``.

headinfer replaces two things of a transformers model: the attention function (the registered
``"headinfer"`` implementation) and the KV cache. That is exact for every decoder-only model
whose attention layers project q, k, v per head, append k, v to a standard causal cache and call
transformers' attention interface; what happens before (RoPE of any kind, q/k norms, MoE
feed-forwards) is the model's own code and stays as it is. What the op and the store must know is
read from the config and, when a model object is given, checked against its attention modules:
layers, query and kv heads, head size, scale, soft-capping and the sliding window of each layer.

``SUPPORTED_FAMILIES`` lists the families whose tiny-config exactness tests run in this
repository (tests/test_families.py); a model outside it is refused, with the reason where its
structure is one headinfer cannot run (multi-head latent attention, linear-attention or
state-space layers, cross-attention, encoder-decoders, bidirectional or chunked attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from transformers import PretrainedConfig

from .distributed import tp_split
from .errors import UnsupportedModelError

__all__ = [
    "SUPPORTED_FAMILIES",
    "FamilyInfo",
    "ModelSpec",
    "attention_modules",
    "family_info",
    "model_spec",
    "rank_spec",
    "runnable_spec",
]

# How a family's model decides each layer's sliding window (read in its modeling file):
#: no layer slides, whatever the config holds (the model builds only a causal mask);
NO_WINDOW = "none"
#: ``config.sliding_window`` in every layer (the model ignores ``layer_types``);
EVERY_LAYER = "every_layer"
#: ``config.sliding_window`` in the layers whose ``layer_types`` entry is ``"sliding_attention"``.
BY_LAYER_TYPE = "layer_types"


@dataclass(frozen=True)
class FamilyInfo:
    """What headinfer knows about one family, from its transformers modeling file."""

    #: ``model_type`` of the text model's config (a multimodal wrapper's text tower).
    model_type: str
    #: How its layers get their sliding window: NO_WINDOW, EVERY_LAYER or BY_LAYER_TYPE.
    windows: str
    #: What in it matters to headinfer, for the README's table and error messages.
    special: str
    #: Config attribute of the score scale's denominator (``scale = value ** -0.5``), or of the
    #: scale itself when ``scale_is_multiplier``; ``None``: ``head_dim ** -0.5``.
    scale_from: str | None = None
    scale_is_multiplier: bool = False
    #: Config attribute of the logit soft-capping the attention passes as ``softcap=``.
    softcap_from: str | None = None
    #: Learned per-head sink logits in each softmax's denominator (``module.sinks``).
    sinks: bool = False


_FAMILIES: dict[str, FamilyInfo] = {
    f.model_type: f
    for f in (
        FamilyInfo("llama", NO_WINDOW, "RoPE scaling (llama3, yarn, ...) applied before the op"),
        FamilyInfo("mistral", EVERY_LAYER, "sliding window in every layer; head_dim may differ"),
        FamilyInfo("mixtral", EVERY_LAYER, "MoE feed-forward; sliding window in every layer"),
        FamilyInfo("qwen2", BY_LAYER_TYPE, "q/k/v biases; sliding layers from max_window_layers"),
        FamilyInfo("qwen2_moe", BY_LAYER_TYPE, "MoE with a shared expert; q/k/v biases"),
        FamilyInfo("qwen3", BY_LAYER_TYPE, "per-head q/k RMSNorm before RoPE"),
        FamilyInfo("qwen3_moe", EVERY_LAYER, "MoE; per-head q/k RMSNorm"),
        FamilyInfo(
            "gemma2",
            BY_LAYER_TYPE,
            "logit soft-capping; alternating sliding/full layers; query_pre_attn_scalar",
            scale_from="query_pre_attn_scalar",
            softcap_from="attn_logit_softcapping",
        ),
        FamilyInfo(
            "gemma3_text",
            BY_LAYER_TYPE,
            "5 sliding : 1 full layers with different RoPE bases; q/k norm; query_pre_attn_scalar",
            scale_from="query_pre_attn_scalar",
        ),
        FamilyInfo("phi3", EVERY_LAYER, "fused qkv projection; LongRoPE (Phi-3/Phi-4)"),
        FamilyInfo("olmo2", NO_WINDOW, "q/k RMSNorm over all heads"),
        FamilyInfo("olmo3", BY_LAYER_TYPE, "q/k RMSNorm; sliding/full layers"),
        FamilyInfo(
            "granite",
            NO_WINDOW,
            "attention_multiplier as the score scale",
            scale_from="attention_multiplier",
            scale_is_multiplier=True,
        ),
        FamilyInfo("cohere2", BY_LAYER_TYPE, "3 sliding : 1 full layers; RoPE only in sliding"),
        FamilyInfo("smollm3", BY_LAYER_TYPE, "layers without RoPE (NoPE)"),
        FamilyInfo("ministral", BY_LAYER_TYPE, "sliding/full layers from layer_types"),
        FamilyInfo("glm4", NO_WINDOW, "partial RoPE; extra post-norms"),
        FamilyInfo("exaone4", BY_LAYER_TYPE, "q/k norm; sliding/full layers (RoPE only sliding)"),
        FamilyInfo("qwen2_vl_text", BY_LAYER_TYPE, "text tower of Qwen2-VL; 3D (M-)RoPE"),
        FamilyInfo(
            "gpt_oss",
            BY_LAYER_TYPE,
            "learned attention sinks; alternating 128-token windows; MoE",
            sinks=True,
        ),
    )
}

#: Family names as users know them (the text model's ``model_type`` where they differ).
_NAMES = {"gemma3_text": "gemma3", "qwen2_vl_text": "qwen2_vl"}

#: Families that ``patch()`` runs, each tested against eager attention (tests/test_families.py).
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_NAMES.get(t, t) for t in _FAMILIES)


@dataclass(frozen=True)
class ModelSpec:
    """What the store and the op need to know about a model's attention.

    Under tensor parallelism (``tp_size > 1``) it describes one rank's share: ``num_q_heads``
    and ``num_kv_heads`` are the heads this rank's attention modules compute.
    """

    family: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    #: Per layer, the sliding window in tokens, or ``None`` for full attention.
    windows: tuple[int | None, ...]
    max_positions: int | None
    #: Score scale (``q @ k * scale``), as the attention modules pass it.
    scale: float | None = None
    #: Logit soft-capping (``softcap * tanh(score / softcap)``), or ``None``.
    softcap: float | None = None
    #: Whether each softmax has a learned per-head sink logit (gpt-oss).
    sinks: bool = False
    #: Ranks the heads are split over by tensor parallelism (1: none).
    tp_size: int = 1


def family_info(family: str) -> FamilyInfo:
    """The ``FamilyInfo`` of a family name (``"gemma3"``) or text ``model_type``."""
    for model_type, name in _NAMES.items():
        if family == name:
            family = model_type
    try:
        return _FAMILIES[family]
    except KeyError:
        raise UnsupportedModelError(f"model_type {family!r}", SUPPORTED_FAMILIES) from None


def _text_config(config: Any) -> Any:
    if hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def _refuse(family: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{family} ({why})", SUPPORTED_FAMILIES)


#: Config attributes that mark layers headinfer's per-head KV store cannot hold.
_STATE_SPACE_KEYS = (
    "mamba_d_state",
    "mamba_n_heads",
    "ssm_state_size",
    "state_size",
    "linear_num_key_heads",
    "linear_key_head_dim",
    "hybrid_override_pattern",
    "attn_layer_period",
)


def _check_structure(config: Any, text: Any, family: str) -> None:
    """Raise ``UnsupportedModelError`` saying why, for structures headinfer cannot run."""
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        raise _refuse(
            family,
            "an encoder-decoder model: headinfer runs decoder-only causal language models",
        )
    if getattr(text, "kv_lora_rank", None):
        raise _refuse(
            family,
            f"multi-head latent attention: its cache holds a compressed latent (kv_lora_rank="
            f"{text.kv_lora_rank}), not per-head keys and values",
        )
    kinds = set(getattr(text, "layer_types", None) or ())
    if getattr(text, "attention_chunk_size", None) or "chunked_attention" in kinds:
        raise _refuse(family, "chunked attention: each chunk attends only within itself")
    if kinds - {"full_attention", "sliding_attention"}:
        other = sorted(kinds - {"full_attention", "sliding_attention"})
        raise _refuse(
            family,
            f"hybrid layers {other}: linear-attention or state-space layers keep a recurrent "
            "state, not a KV cache",
        )
    if any(getattr(text, key, None) for key in _STATE_SPACE_KEYS) or family.startswith(
        ("mamba", "rwkv")
    ):
        raise _refuse(
            family,
            "state-space or linear-attention layers keep a recurrent state, not a KV cache",
        )
    if getattr(text, "add_cross_attention", False) or getattr(text, "cross_attention_layers", None):
        raise _refuse(family, "cross-attention layers attend over another sequence")
    if getattr(text, "use_bidirectional_attention", False) or not getattr(text, "is_causal", True):
        raise _refuse(family, "bidirectional attention: headinfer's attention is causal")
    if getattr(text, "alibi", False) or getattr(text, "use_alibi", False):
        raise _refuse(family, "ALiBi position biases are added to the scores inside attention")
    if not getattr(text, "num_attention_heads", None):
        raise _refuse(family, "no attention heads in its config: not a transformer decoder")


def _window_value(text: Any) -> int | None:
    window = getattr(text, "sliding_window", None)
    return int(window) if window else None


def _windows(info: FamilyInfo, text: Any, num_layers: int) -> tuple[int | None, ...]:
    window = _window_value(text)
    if info.windows == NO_WINDOW or window is None:
        return (None,) * num_layers
    if info.windows == EVERY_LAYER:
        return (window,) * num_layers
    layer_types = list(getattr(text, "layer_types", None) or ())
    if len(layer_types) != num_layers:
        raise _refuse(
            info.model_type,
            f"layer_types has {len(layer_types)} entries for {num_layers} layers",
        )
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def _spec_from_config(family: str, info: FamilyInfo, text: Any) -> ModelSpec:
    num_layers = int(text.num_hidden_layers)
    num_q_heads = int(text.num_attention_heads)
    num_kv_heads = int(getattr(text, "num_key_value_heads", None) or num_q_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // num_q_heads)
    if num_q_heads % num_kv_heads:
        raise _refuse(
            family, f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads"
        )
    windows = _windows(info, text, num_layers)
    if info.model_type == "qwen2_moe" and any(w is not None for w in windows):
        # Its mask slides in layer_types' sliding layers but its attention passes no window,
        # so transformers' own implementations disagree; no released Qwen-MoE slides.
        raise _refuse(
            family,
            "use_sliding_window=True: Qwen2-MoE's attention ignores the window its mask applies",
        )
    if info.scale_from is None:
        scale = head_dim**-0.5
    elif info.scale_is_multiplier:
        scale = float(getattr(text, info.scale_from))
    else:
        scale = getattr(text, info.scale_from) ** -0.5
    softcap = getattr(text, info.softcap_from, None) if info.softcap_from else None
    return ModelSpec(
        family=family,
        num_layers=num_layers,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        windows=windows,
        max_positions=getattr(text, "max_position_embeddings", None),
        scale=scale,
        softcap=float(softcap) if softcap else None,
        sinks=info.sinks,
    )


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of the text decoder, in layer order.

    They are the modules with a ``layer_idx`` and q/k/v projections (``k_proj`` or a fused
    ``qkv_proj``); a vision tower's attention has no ``layer_idx``.
    """
    found = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
        and (hasattr(m, "k_proj") or hasattr(m, "qkv_proj"))
    ]
    return sorted(found, key=lambda m: cast(int, m.layer_idx))


def _proj_heads(proj: Any, head_dim: int) -> int | None:
    out = getattr(proj, "out_features", None)
    return None if out is None else out // head_dim


def _check_modules(model: torch.nn.Module, spec: ModelSpec) -> None:
    """Check that the attention modules run what the config says; raise what disagrees."""
    modules = attention_modules(model)
    family = spec.family
    if [m.layer_idx for m in modules] != list(range(spec.num_layers)):
        raise _refuse(
            family,
            f"found attention modules for layers {[m.layer_idx for m in modules]}, expected "
            f"one per layer 0..{spec.num_layers - 1}: not a standard decoder stack",
        )
    for m in modules:
        where = f"layer {m.layer_idx}'s {type(m).__name__}"
        if not getattr(m, "is_causal", True):
            raise _refuse(family, f"{where} is not causal")
        head_dim = getattr(m, "head_dim", spec.head_dim)
        if head_dim != spec.head_dim:
            raise _refuse(family, f"{where} has head_dim {head_dim}, config {spec.head_dim}")
        if hasattr(m, "k_proj"):
            kv = _proj_heads(m.k_proj, head_dim)
            q = _proj_heads(getattr(m, "q_proj", None), head_dim)
        else:
            out = _proj_heads(m.qkv_proj, head_dim)
            q = spec.num_q_heads
            kv = None if out is None else (out - q) // 2
        if kv is not None and kv != spec.num_kv_heads:
            raise _refuse(family, f"{where} projects {kv} kv heads, config {spec.num_kv_heads}")
        if q is not None and q != spec.num_q_heads:
            raise _refuse(family, f"{where} projects {q} query heads, config {spec.num_q_heads}")
        scaling = getattr(m, "scaling", None)
        want = spec.scale if spec.scale is not None else float("nan")
        if scaling is not None and not math.isclose(float(scaling), want, rel_tol=1e-6):
            raise _refuse(family, f"{where} scales scores by {scaling}, config {spec.scale}")
        if (getattr(m, "sinks", None) is not None) != spec.sinks:
            raise _refuse(family, f"{where} has attention sinks the config does not announce")


def model_spec(model_or_config: torch.nn.Module | PretrainedConfig) -> ModelSpec:
    """The attention geometry of a model, from its config and, given a model, its modules.

    A multimodal wrapper (e.g. Gemma-3's image-text model) is described by its text decoder.

    Raises:
        UnsupportedModelError: the model's attention is one headinfer cannot run (the message
            says why), its family is not among ``SUPPORTED_FAMILIES``, or its attention modules
            disagree with its config.
    """
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
    config = model.config if model is not None else model_or_config
    text = _text_config(config)
    model_type = getattr(text, "model_type", None) or type(text).__name__
    family = _NAMES.get(model_type, model_type)
    _check_structure(config, text, family)
    info = _FAMILIES.get(model_type)
    if info is None:
        raise UnsupportedModelError(f"model_type {family!r}", SUPPORTED_FAMILIES)
    spec = _spec_from_config(family, info, text)
    if model is not None:
        _check_modules(model, spec)
        spec = _rank_share(model, spec)
    return spec


def rank_spec(spec: ModelSpec, tp_size: int) -> ModelSpec:
    """One rank's share of ``spec`` when tensor parallelism splits its heads over ``tp_size``
    ranks (as transformers' ``colwise`` q/k/v projections do).

    Raises:
        UnsupportedModelError: the heads do not split evenly (transformers refuses those too).
    """
    if tp_size == 1:
        return spec
    if spec.num_kv_heads % tp_size or spec.num_q_heads % tp_size:
        raise _refuse(
            spec.family,
            f"{spec.num_q_heads} query and {spec.num_kv_heads} kv heads cannot be split evenly "
            f"over {tp_size} tensor-parallel ranks",
        )
    return replace(
        spec,
        num_q_heads=spec.num_q_heads // tp_size,
        num_kv_heads=spec.num_kv_heads // tp_size,
        tp_size=tp_size,
    )


def _rank_share(model: torch.nn.Module, spec: ModelSpec) -> ModelSpec:
    # Under tensor parallelism each rank's attention computes only its heads: the spec says so.
    split, why = tp_split(model, attention_modules(model))
    if why is not None:
        raise _refuse(spec.family, why)
    return rank_spec(spec, split)


def runnable_spec(model: torch.nn.Module) -> ModelSpec:
    """``model_spec(model)`` of a model ``patch()`` runs (every supported family runs)."""
    return model_spec(model)
