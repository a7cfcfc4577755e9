"""``PatchSettings``: what ``patch()`` was given for one model and what it found out about it.

Its own module, below both ``patch`` (which makes it) and ``prefill`` (which the patched
forward reads it in), so neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .spec import ModelSpec

__all__ = ["PatchSettings"]


@dataclass
class PatchSettings:
    """What ``patch()`` was given, and what it found out about the model."""

    spec: ModelSpec
    chunk_size: int
    block_size: int | None
    host_memory_limit: int | None
    gpu_budget: int | dict[int, int] | None
    cpu_heads: int | str | None
    #: ``"exact"`` or ``"int8"`` (``kv_dtype.KV_DTYPES``): how the caches it makes store KV.
    kv_dtype: str
    progress: bool
    progress_delay: float
    #: The model forward's keyword for the cache: "cache" (>= 5.24) or "past_key_values".
    cache_name: str
    #: The forward's named parameters, in order, to turn positional arguments into keywords.
    forward_params: tuple[str, ...]
    takes_logits_to_keep: bool
    #: Whether the "cache that is not a HeadInferCache" warning was given (once per model).
    warned_cache: bool = False
    #: What patch() replaced, for unpatch(): instance attributes (or _MISSING) and the config's.
    saved: dict[str, Any] = field(default_factory=dict)
