"""The planner's front: the GPU budget split for a CUDA cache (weights, working set, staging, KV).

The arithmetic is Rust's (``src/plan.rs``, ``_core.plan``); this module gathers its inputs from
torch (what the weights hold, the free memory) and is the one caller both the runtime and
``headinfer plan`` go through, so they cannot disagree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _core

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_STAGING_CAP",
    "DIRECT_ROWS",
    "GpuPlan",
    "plan_figures",
    "plan_memory",
]

logger = logging.getLogger("headinfer")

#: Bytes kept free for what torch holds beyond the weights and one step's tensors: measured
#: about 1.1 GiB in steady decode of a Llama-3-8B shape on an H200 (cuBLAS workspaces,
#: allocator rounding), plus room for the CUDA context and cuDNN workspaces.
DEFAULT_MARGIN = 5 << 28  # 1.25 GiB
#: Largest staging buffer (keys and values of one head group of one layer).
DEFAULT_STAGING_CAP = 1 << 30
#: Queries x heads per kv head up to which decode reads the blocks directly.
DIRECT_ROWS = 8


@dataclass
class GpuPlan:
    """Where a CUDA cache puts its bytes, for one expected context length and phase."""

    context: int
    prefill: bool
    kv_device_bytes: int
    heads_per_group: int
    figures: dict[str, Any] = field(default_factory=dict)


def plan_figures(
    config: Any,
    spec: Any,
    *,
    elem_bytes: int,
    weight_bytes: int,
    context: int,
    chunk_size: int,
    gpu_budget: int,
    prefill: bool = True,
    margin: int = DEFAULT_MARGIN,
    staging_cap: int = DEFAULT_STAGING_CAP,
) -> dict[str, Any]:
    """The Rust planner's split of ``gpu_budget`` bytes for ``context`` tokens; pure arithmetic.

    The one call into ``_core.plan`` that both the runtime (``plan_memory``) and
    ``headinfer plan`` (which knows only the config) make, so they cannot disagree.

    Args:
        config: the model's (text) config: ``hidden_size``, ``intermediate_size``,
            ``vocab_size``.
        spec: its ``ModelSpec`` (layers, heads, head size, windows).
        elem_bytes: bytes per element of activations and KV.
        weight_bytes: bytes of the weights on the GPU.

    Returns:
        ``_core.plan``'s byte counts (see its docstring).
    """
    return _core.plan(
        num_layers=spec.num_layers,
        num_q_heads=spec.num_q_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        hidden_size=config.hidden_size,
        intermediate_size=getattr(config, "intermediate_size", 4 * config.hidden_size),
        vocab_size=config.vocab_size,
        elem_bytes=elem_bytes,
        weight_bytes=weight_bytes,
        windows=list(spec.windows),
        context=max(context, 1),
        chunk_size=chunk_size,
        gpu_budget=gpu_budget,
        margin=margin,
        staging_cap=staging_cap,
        prefill=prefill,
    )


def plan_memory(
    config: Any,
    spec: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    context: int,
    chunk_size: int,
    gpu_budget: int | None,
    held_by_store: int = 0,
    prefill: bool = True,
) -> GpuPlan:
    """Split the GPU budget for ``context`` tokens (the Rust planner in ``src/plan.rs``).

    The weights are what torch holds now; the budget defaults to everything this process could
    use (free memory plus what torch and the store already hold). A prefill needs room for a
    chunk's activations and the staging buffers; decode gives that room to the KV.
    """
    free, _total = torch.cuda.mem_get_info(device)
    held_by_torch = torch.cuda.memory_reserved(device)
    # What torch holds now: the weights and whatever the caller keeps alive.
    weights = torch.cuda.memory_allocated(device)
    budget = gpu_budget if gpu_budget is not None else free + held_by_torch + held_by_store
    figures = plan_figures(
        config,
        spec,
        elem_bytes=torch.empty((), dtype=dtype).element_size(),
        weight_bytes=weights,
        context=context,
        chunk_size=chunk_size,
        gpu_budget=budget,
        prefill=prefill,
    )
    if prefill and not figures["fits_gpu"]:
        logger.warning(
            "gpu_budget %.2f GiB is below weights + working set + staging + margin (%.2f GiB): "
            "every KV byte goes to the host",
            budget / 2**30,
            (weights + figures["activation_bytes"] + figures["staging_bytes"] + DEFAULT_MARGIN)
            / 2**30,
        )
    return GpuPlan(
        context=context,
        prefill=prefill,
        kv_device_bytes=figures["kv_device_bytes"],
        heads_per_group=figures["heads_per_group"],
        figures=figures,
    )
