"""Byte sizes as users write them (``"20GiB"``, ``24e9``) and as reports print them."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_bytes"]


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: int | str, name: str = "gpu_budget") -> int:
    """``20GiB``, ``"512 MB"``, ``24e9`` or an int of bytes; binary units either way."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected bytes (int) or a size like '20GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{name}: must be positive, got {value}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", value.lower())
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2)])
    raise ValueError(f"{name}: expected bytes or a size like '20GiB', got {value!r}")


def format_bytes(n: float) -> str:
    """``1.50 GiB``, ``12.0 MiB`` or ``0``."""
    if n >= 2**30:
        return f"{n / 2**30:,.2f} GiB"
    if n == 0:
        return "0"
    return f"{n / 2**20:,.1f} MiB"
