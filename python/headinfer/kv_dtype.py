"""``kv_dtype``: how the store holds keys and values, and what that costs in bytes.

``"exact"`` (the default) stores them as the model computes them (its float32, bfloat16 or
float16): attention is the same function as standard attention. ``"int8"`` (opt-in) stores each
token's key and value vector of each kv head as int8 with one bfloat16 scale per group of
``gcd(head_dim, 32)`` values (symmetric, computed when the token is appended); every reader
dequantizes on load and accumulates in float32. It is lossy: README's "8-bit KV cache" gives the
measured loss (KL divergence, greedy agreement, RULER).

The byte counts are the store's own (``_core.kv_row_bytes``), so the planner, the host memory
check and ``headinfer plan`` count what the store allocates.
"""

from __future__ import annotations

from typing import Any

from . import _core

__all__ = ["KV_DTYPES", "check_kv_dtype", "kv_row_bytes", "kv_token_bytes", "store_kv_dtype"]

#: The formats, the default first.
KV_DTYPES = ("exact", "int8")


def check_kv_dtype(value: Any, name: str = "kv_dtype") -> str:
    """``"exact"`` (also for ``None``) or ``"int8"``; ``TypeError``/``ValueError`` naming
    ``name`` for anything else."""
    if value is None:
        return "exact"
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected 'exact' or 'int8', got {type(value).__name__} {value!r}")
    kv_dtype = value.strip().lower()
    if kv_dtype not in KV_DTYPES:
        raise ValueError(
            f"{name}: expected 'exact' (the default: keys and values as the model computes "
            f"them) or 'int8' (8-bit, opt-in, lossy), got {value!r}"
        )
    return kv_dtype


def store_kv_dtype(kv_dtype: str) -> str | None:
    """``KVStore``'s ``kv_dtype`` argument for a checked ``kv_dtype`` (``None``: exact)."""
    return None if kv_dtype == "exact" else kv_dtype


def kv_row_bytes(head_dim: int, dtype: str, kv_dtype: str = "exact") -> int:
    """Bytes the store holds for one token's key (or value) of one kv head.

    Args:
        head_dim: the head size.
        dtype: the model's dtype as the store names it (``"bfloat16"``, ...).
        kv_dtype: ``"exact"``, ``"int8"``, or a store's own ``KVStore.kv_dtype``.
    """
    return _core.kv_row_bytes(head_dim, dtype, store_kv_dtype(kv_dtype))


def kv_token_bytes(num_kv_heads: int, head_dim: int, dtype: str, kv_dtype: str = "exact") -> int:
    """Bytes of one token's keys and values of one layer (every kv head)."""
    return 2 * num_kv_heads * kv_row_bytes(head_dim, dtype, kv_dtype)
