"""The attention function transformers calls on a patched model, registered as ``"headinfer"``.

transformers appends the new keys/values to the cache (``cache.update``) and then calls the
registered attention function with the module, q, k, v and a mask; the cache itself is not an
argument. The patched forward passes it down as the keyword ``headinfer_cache`` (models forward
unknown keywords to their attention function through ``**kwargs``), so each call finds its own
cache and two models or two caches in one process never meet. Without one (a ``DynamicCache``,
``use_cache=False``) the same Rust op runs on the k, v transformers hands over.

No q x kv mask is ever built: causality, the chunk's offset and the sliding window are arguments
of the op, and ``headinfer_mask`` returns ``None`` for transformers' mask factory.

gpt-oss's learned per-head sink logits (``module.sinks``) go to the op as its ``sinks`` argument,
converted to float32 once per layer and kept on the module (``_SINKS_CACHE``) until the
parameter changes; ``unpatch`` drops them.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import _core
from .cache import HeadInferCache
from .device import check_device, current_stream
from .errors import HeadInferError

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CACHE_KWARG",
    "headinfer_attention",
    "headinfer_mask",
    "register",
]

#: The name under which the attention and mask functions are registered.
ATTN_IMPLEMENTATION = "headinfer"
#: The keyword that carries the cache from the patched forward to the attention function.
CACHE_KWARG = "headinfer_cache"
#: The module attribute holding ``(parameter, its version, float32 copy)`` of its sinks.
_SINKS_CACHE = "_headinfer_sinks"


def _sinks(module: torch.nn.Module, query: torch.Tensor, kwargs: dict[str, Any]):
    """The module's sink logits as the op takes them: ``[num_q_heads]`` float32, contiguous,
    on the query's device; ``None`` for a model without sinks.

    Converted once per layer and reused while the parameter is unchanged (its in-place version
    counter and identity), so the decode hot path does no conversion.
    """
    sinks = getattr(module, "sinks", None)
    for name in ("s_aux", "sinks"):  # the keywords attention functions get them by
        if sinks is None:
            sinks = kwargs.get(name)
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks: expected a tensor, got {type(sinks).__name__}")
    if hasattr(sinks, "to_local"):  # a DTensor under tensor parallelism: this rank's heads
        sinks = sinks.to_local()
    cached = module.__dict__.get(_SINKS_CACHE)
    if (
        cached is not None
        and cached[0] is sinks
        and cached[1] == sinks._version
        and cached[2].device == query.device
    ):
        return cached[2]
    f32 = sinks.detach().to(device=query.device, dtype=torch.float32).contiguous()
    module.__dict__[_SINKS_CACHE] = (sinks, sinks._version, f32)
    return f32


def drop_sink_caches(model: torch.nn.Module) -> None:
    """Forget the float32 sinks ``headinfer_attention`` kept on the model's modules."""
    for m in model.modules():
        m.__dict__.pop(_SINKS_CACHE, None)


#: Keywords some attention modules pass that change the result; never silently ignored.
_UNSUPPORTED_KWARGS = {
    "indices": "sparse attention over selected keys",
    "block_indices": "sparse attention over selected blocks",
    "position_bias": "a position bias added to the scores",
}


def _head_view(x: torch.Tensor, name: str) -> torch.Tensor:
    # [1, H, L, D] -> [H, L, D] without a copy; the op needs only head_dim stride 1.
    if x.shape[0] != 1:
        raise ValueError(f"{name}: headinfer holds batch size 1, got shape {tuple(x.shape)}")
    view = x[0]
    return view if view.stride(-1) == 1 or view.shape[-1] == 1 else view.contiguous()


def headinfer_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention through the Rust op, for transformers' ``AttentionInterface``.

    Args:
        module: the attention module (``layer_idx``, ``is_causal``, ``head_dim``).
        query: ``[1, num_q_heads, q_len, head_dim]``; the last ``q_len`` positions.
        key: ``[1, num_kv_heads, kv_len, head_dim]``; unused when a ``HeadInferCache`` is passed
            as ``headinfer_cache`` (the store holds the keys).
        value: ``[1, num_kv_heads, kv_len, head_dim]``; likewise.
        attention_mask: must be ``None`` (headinfer builds no mask tensor).
        scaling: score scale (default ``head_dim ** -0.5``); Gemma-2's comes from
            ``query_pre_attn_scalar``.
        dropout: must be 0 (inference only).
        sliding_window: query at position ``p`` sees keys ``j`` with ``p - j < sliding_window``.
        softcap: scores become ``softcap * tanh(score / softcap)`` (Gemma-2).
        kwargs: ``headinfer_cache``; gpt-oss's ``s_aux`` (its sinks, also ``module.sinks``:
            ``[num_q_heads]``, one logit per head in every softmax's denominator) and
            ``sinks`` are honoured.

    Returns:
        ``(out, None)``: ``out`` is ``[1, q_len, num_q_heads, head_dim]``, the layout the model
        reshapes into its output projection; attention weights are never materialised.
    """
    check_device(query, "query")
    if attention_mask is not None:
        raise HeadInferError(
            "headinfer attention got an explicit attention mask; custom and padding masks are "
            "not supported (attention is causal, with the model's sliding window)"
        )
    if dropout:
        raise HeadInferError(f"dropout: headinfer is for inference, got {dropout}")
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise HeadInferError("headinfer implements causal attention only")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise HeadInferError(
                f"{type(module).__name__} passes {name}= to attention "
                f"({_UNSUPPORTED_KWARGS[name]}), which the headinfer op does not compute"
            )
    batch, num_q_heads, q_len, head_dim = query.shape
    scale = float(scaling) if scaling is not None else head_dim**-0.5
    softcap = float(softcap) if softcap else None
    # Written through a [H, L, D] view of the [B, L, H, D] result: no transpose copy afterwards.
    out = query.new_empty((batch, q_len, num_q_heads, head_dim))
    sinks = _sinks(module, query, kwargs)
    cache = kwargs.get(CACHE_KWARG)
    if cache is not None:
        if not isinstance(cache, HeadInferCache):
            raise TypeError(f"{CACHE_KWARG}: expected a HeadInferCache, got {type(cache).__name__}")
        _head_view(query, "query")  # batch check
        layer = cast(int, module.layer_idx)  # transformers sets it on every attention module
        cache.attend(layer, query, key, value, out, scale, softcap, sliding_window, sinks)
        return out, None
    q = _head_view(query, "query")
    k = _head_view(key, "key")
    v = _head_view(value, "value")
    stream = current_stream(q)
    if q.is_cuda and v.stride() != k.stride():
        # The GPU op reads keys and values with one set of strides.
        k, v = k.contiguous(), v.contiguous()
    _core.attention(
        q, k, v, out[0].transpose(0, 1), scale, softcap, sliding_window, stream=stream, sinks=sinks
    )
    return out, None


def headinfer_mask(*args: Any, **kwargs: Any) -> None:
    """Mask factory for transformers' ``AttentionMaskInterface``: no mask tensor, ever."""
    return None


def register() -> None:
    """Register the attention and mask functions under ``"headinfer"`` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, headinfer_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, headinfer_mask)
