"""How much of a decode's host-resident KV the CPU takes (going below the PCIe-only floor).

On a CUDA cache whose KV spills to pinned host memory, the GPU's decode kernel reads those
blocks over PCIe (about 51 GB/s on the H200 host); the host's cores can read the same memory
at the same time. For kv heads ``0..c`` the CPU attends over their host blocks while the GPU
reads everything else, and the GPU merges the two by log-sum-exp (``KVStore.attend`` with
``host_share``; the machinery is ``src/cuda/share.rs``). This module picks ``c``.
"""

from __future__ import annotations

import os

import torch

__all__ = ["MIN_HOST_TOKENS", "default_cpu_heads"]

#: Bytes per second one core of the CPU kernel reads from pinned memory while the GPU streams
#: the rest (measured on the 16-core H200 host: 38 GB/s on 16 threads), and what the GPU
#: kernel reads over PCIe (51 GB/s); see BENCHMARKS.md.
_CORE_GBS = 2.4
_PCIE_GBS = 51.0
#: Below this many host tokens in a head, the hand-off costs more than the CPU saves.
MIN_HOST_TOKENS = 8192


def default_cpu_heads(num_kv_heads: int) -> int:
    """Kv heads whose host blocks the CPU takes: its share of host plus PCIe bandwidth."""
    cores = min(os.cpu_count() or 1, torch.get_num_threads() or 1)
    cpu = _CORE_GBS * cores
    return min(num_kv_heads, 16, round(num_kv_heads * cpu / (cpu + _PCIE_GBS)))
