"""The int8 KV format in torch (the reference the tests hold ``kv_dtype="int8"`` to), and an
eager cache that stores its keys and values through it.

The format (``src/quant.rs``): per token and kv head, groups of ``gcd(head_dim, 32)`` values
share one scale, ``amax / 127`` rounded up to bfloat16; each value is ``rint(x / scale)``
clamped to [-127, 127] and reads back as ``q * scale`` in float32. A zero group reads back as
zeros; a group holding a NaN or an infinity as NaN.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import DynamicCache

GROUP = 32


def _scale_up_to_bf16(a: torch.Tensor) -> torch.Tensor:
    # Round positive float32 values up to the next bfloat16 (exact when already one).
    bits = a.contiguous().view(torch.int32)
    up = torch.where(bits & 0xFFFF != 0, bits + 0x10000, bits) & ~0xFFFF
    return up.view(torch.float32)


def quantize_dequantize(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``[..., head_dim]``) through the int8 format, back in ``x``'s dtype (float32
    arithmetic; exact in float32, rounded once more to a lower precision)."""
    head_dim = x.shape[-1]
    group = math.gcd(head_dim, GROUP)
    f = x.float().reshape(*x.shape[:-1], head_dim // group, group)
    amax = f.abs().amax(dim=-1, keepdim=True)
    scale = _scale_up_to_bf16(amax / 127.0)
    q = torch.where(scale > 0, f / torch.where(scale > 0, scale, 1.0), 0.0)
    out = q.round().clamp(-127, 127) * scale
    bad = ~torch.isfinite(f).all(dim=-1, keepdim=True)
    out = torch.where(bad, torch.nan, out)
    return out.reshape(x.shape).to(x.dtype)


class Int8DynamicCache(DynamicCache):
    """transformers' ``DynamicCache`` whose keys and values go through the int8 format as they
    are stored: eager attention over what ``kv_dtype="int8"`` holds."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(
            quantize_dequantize(key_states), quantize_dequantize(value_states), *args, **kwargs
        )
