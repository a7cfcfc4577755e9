"""Byte sizes as users write them (``"20GiB"``, ``24e9``) and as reports print them, and
numbers of tokens as context lengths are quoted (``128K``, ``1M``)."""

from __future__ import annotations

import math
import numbers
import re

__all__ = ["format_bytes", "parse_bytes", "parse_context"]


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)i?b?\s*")


def parse_bytes(value: int | float | str, name: str = "gpu_budget") -> int:
    """``"20GiB"``, ``"512 MB"``, ``"2e10"``, ``24e9`` or an int of bytes; binary units either way.

    Raises:
        TypeError: ``value`` is not an int, a float or a str (a bool included).
        ValueError: not a size, or not at least one byte (zero, negative, NaN, infinite).
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise TypeError(
            f"{name}: expected bytes (an int) or a size like '20GiB', "
            f"got {type(value).__name__} {value!r}"
        )
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.lower())
        if m is None:
            raise ValueError(f"{name}: expected bytes or a size like '20GiB', got {value!r}")
        size: float = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        size = value
    if not math.isfinite(size) or size < 1:
        raise ValueError(f"{name}: must be at least 1 byte (and finite), got {value!r}")
    return int(size)


def format_bytes(n: float) -> str:
    """``1.50 GiB``, ``12.0 MiB`` or ``0``."""
    if n >= 2**30:
        return f"{n / 2**30:,.2f} GiB"
    if n == 0:
        return "0"
    return f"{n / 2**20:,.1f} MiB"


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
