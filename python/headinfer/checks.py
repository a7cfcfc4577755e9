"""Argument checks shared by ``patch()`` and ``HeadInferCache()``.

Each returns the checked value or raises ``TypeError`` (wrong type) or ``ValueError`` (bad
value), naming the argument, before anything is changed.
"""

from __future__ import annotations

import numbers
from typing import Any

from .sizes import parse_bytes

__all__ = ["check_cpu_heads", "check_optional_positive_int", "check_positive_int", "check_size"]

#: Most kv heads the CPU can share in decode (the Rust share worker's limit).
MAX_CPU_HEADS = 16


def check_positive_int(value: Any, name: str) -> int:
    """An int ``>= 1``; a float, even ``64.0``, is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: must be positive, got {value}")
    return int(value)


def check_optional_positive_int(value: Any, name: str) -> int | None:
    """``None`` or an int ``>= 1``."""
    return None if value is None else check_positive_int(value, name)


def check_size(value: Any, name: str) -> int | None:
    """``None``, or bytes as ``parse_bytes`` reads them (an int or a size like ``"64GiB"``)."""
    return None if value is None else parse_bytes(value, name)


def check_cpu_heads(value: Any, num_kv_heads: int) -> int | str | None:
    """``None`` or ``"auto"`` (the default: the planner decides from measured rates), or an
    int in ``0..=min(16, num_kv_heads)`` (an override: that many kv heads; 0 turns the CPU
    share off)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(f"cpu_heads: expected an int or 'auto', got {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"cpu_heads: expected an int or 'auto', got {type(value).__name__} {value!r}"
        )
    most = min(MAX_CPU_HEADS, num_kv_heads)
    if not 0 <= int(value) <= most:
        raise ValueError(f"cpu_heads: must be between 0 and {most}, got {value}")
    return int(value)
