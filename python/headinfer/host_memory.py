"""The host memory a context needs, checked before a forward runs rather than at the chunk that
crosses the limit.

The store checks every append too (``OutOfHostMemoryError`` from Rust); this check runs once,
before prefill, on the blocks the whole prompt (and the new tokens ``generate`` will add) ends
up holding, so a request that cannot fit fails before any chunk is computed. It counts what the
store will hold at the end (a lower bound of its peak), so it never refuses a request the store
would take.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import _core
from .errors import OutOfHostMemoryError
from .kv_dtype import kv_row_bytes
from .sizes import format_bytes

__all__ = ["blocks_for", "check_host_memory", "mem_available", "pair_bytes"]


def mem_available() -> int | None:
    """Bytes the host can still give without swapping (``MemAvailable``), if the OS says."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pair_bytes(store: _core.KVStore) -> int:
    """Bytes of one block of keys and its block of values (in the store's ``kv_dtype``)."""
    return 2 * store.block_size * kv_row_bytes(store.head_dim, store.dtype, store.kv_dtype)


def blocks_for(context: int, windows: Sequence[int | None], block_size: int) -> int:
    """Blocks per kv head, summed over layers, that a store holds after ``context`` tokens.

    A full layer holds every token; a sliding layer holds from its window's first position,
    rounded down to a block (as ``KVStore`` drops whole blocks).
    """
    total = 0
    for window in windows:
        start = 0
        if window is not None:
            start = max(context + 1 - window, 0) // block_size * block_size
        total += -(-(context - start) // block_size)
    return total


def check_host_memory(
    store: _core.KVStore | Sequence[tuple[_core.KVStore, int]],
    context: int,
    limit: int | None,
    device_blocks: int = 0,
) -> None:
    """Raise ``OutOfHostMemoryError`` if ``context`` tokens cannot fit in host memory.

    Args:
        store: the cache's store (its geometry, and the host blocks it already holds), or
            ``(store, device_blocks)`` for each store of a cache over several devices, which
            share ``limit`` and the host.
        context: tokens the cache will hold after this call (and the generation it is part of).
        limit: the cache's ``host_memory_limit`` (``None``: what the host has).
        device_blocks: block pairs (keys and values) that sit in device memory instead.
    """
    stores = [(store, device_blocks)] if isinstance(store, _core.KVStore) else list(store)
    needed = 0
    reserved = 0
    for one, on_device in stores:
        pairs = blocks_for(context, one.windows, one.block_size) * one.num_kv_heads
        needed += max(pairs - on_device, 0) * pair_bytes(one)
        reserved += one.host_bytes_reserved()
    fresh = needed - reserved
    if fresh <= 0:
        return
    available = mem_available()
    if limit is not None:
        room = max(limit - reserved, 0)
        available = room if available is None else min(available, room)
    if available is None or fresh <= available:
        return
    exc = OutOfHostMemoryError(
        f"{context} tokens need {format_bytes(needed)} of host memory for their KV cache "
        f"({format_bytes(fresh)} more than the cache holds), but {format_bytes(available)} is "
        "available (host_memory_limit, or the host's free memory); nothing was computed"
    )
    exc.needed = fresh
    exc.available = available
    raise exc
