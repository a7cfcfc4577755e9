"""The GPU path: memory planning, and attention over a CUDA ``KVStore``.

Decode (a few queries) runs headinfer's own kernel straight over the store's blocks, wherever
they sit: device memory, or pinned host memory read over PCIe by the kernel itself. A prefill
chunk is compute-bound, so it runs the fastest exact fused attention torch has (measured in
``benchmarks/probe_prefill_attention.py``): the chunk's keys over themselves (square causal)
and over the stored past (no mask) as two cuDNN calls merged by their log-sum-exp. The past of
the next (layer, head group) is copied out of the store on a side stream while this one
computes, into one of two staging buffers. Gemma-2's soft-capping (which fused kernels lack)
runs headinfer's kernel over the staged keys; sliding windows run SDPA with a band mask.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import _core

__all__ = [
    "GpuPlan",
    "PrefillState",
    "cuda_missing",
    "current_stream",
    "parse_bytes",
    "plan_figures",
    "plan_memory",
    "prefill_attention",
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


@functools.cache
def cuda_missing() -> str | None:
    """Why the CUDA driver or NVRTC cannot be loaded (``None``: they can); probed once."""
    return _core.cuda_status()


# torch's raw current-stream getter skips Stream object creation: this runs for every layer of
# every decode step.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(t: torch.Tensor) -> int | None:
    """The handle of torch's current stream on ``t``'s device; ``None`` for a CPU tensor."""
    if not t.is_cuda:
        return None
    if _raw_stream is not None:
        return _raw_stream(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


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
) -> _core.Plan:
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
        ``_core.plan``'s typed ``Plan`` (``.to_dict()`` for JSON).
    """
    shape = _core.ModelShape(
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
    )
    return _core.plan(
        shape,
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
    if prefill and not figures.fits_gpu:
        logger.warning(
            "gpu_budget %.2f GiB is below weights + working set + staging + margin (%.2f GiB): "
            "every KV byte goes to the host",
            budget / 2**30,
            (weights + figures.activation_bytes + figures.staging_bytes + figures.margin_bytes)
            / 2**30,
        )
    return GpuPlan(
        context=context,
        prefill=prefill,
        kv_device_bytes=figures.kv_device_bytes,
        heads_per_group=figures.heads_per_group,
        figures=figures.to_dict(),
    )


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """Fused attention with its log-sum-exp: ``(out [B,H,L,D], lse [B,H,L] f32)``.

    cuDNN for 16-bit inputs (the fastest measured), the memory-efficient kernel otherwise.
    """
    length = q.shape[2]
    if q.dtype in (torch.bfloat16, torch.float16) and PrefillState.cudnn_ok:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, causal, False, scale=scale
            )[:2]
            return out, lse.reshape(q.shape[0], q.shape[1], -1)[..., :length].float()
        except RuntimeError as exc:  # an arch or shape cuDNN does not take
            logger.info("cuDNN attention unavailable (%s); using the efficient kernel", exc)
            PrefillState.cudnn_ok = False
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale
    )[:2]
    return out, lse.reshape(q.shape[0], q.shape[1], -1)[..., :length].float()


def _two_part(
    q: torch.Tensor,
    k_past: torch.Tensor | None,
    v_past: torch.Tensor | None,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a chunk: over its own keys and over the whole past, merged.

    Args:
        q: ``[1, n * g, C, D]``, contiguous (the group's query heads).
        k_past, v_past: ``[n, P, D]`` or ``None`` when the chunk starts the sequence.
        k_new, v_new: ``[n, C, D]``, the chunk's own keys and values.

    Returns:
        ``[1, n * g, C, D]``.
    """
    n, c, d = k_new.shape
    g = q.shape[1] // n
    kc = k_new.repeat_interleave(g, 0)[None]
    vc = v_new.repeat_interleave(g, 0)[None]
    out_c, lse_c = _fused(q, kc, vc, True, scale)
    if k_past is None or k_past.shape[1] == 0:
        return out_c
    # Every chunk query sees every past key: fold the group into the query axis (no GQA copy).
    qf = q.reshape(1, n, g * c, d)
    out_p, lse_p = _fused(qf, k_past[None], v_past[None], False, scale)
    out_p = out_p.reshape(1, n * g, c, d)
    lse_p = lse_p.reshape(1, n * g, c)
    m = torch.maximum(lse_p, lse_c)
    wp = torch.exp(lse_p - m).unsqueeze(-1)
    wc = torch.exp(lse_c - m).unsqueeze(-1)
    merged = out_p.float().mul_(wp).add_(out_c.float().mul_(wc)).div_(wp + wc)
    return merged.to(q.dtype)


class PrefillState:
    """Per cache: the side stream and the staged past of the next (layer, head group)."""

    #: Flips to False once cuDNN refuses; then the efficient kernel serves.
    cudnn_ok = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)
        # (layer, h0, n, lo, end) -> (k, v, event) staged on the side stream
        self.staged: dict[tuple[int, int, int, int, int], tuple[torch.Tensor, ...]] = {}

    def stage(self, store: Any, key: tuple[int, int, int, int, int]) -> None:
        """Copy a unit's past out of the store on the side stream (no wait here)."""
        layer, h0, n, lo, end = key
        if key in self.staged or end <= lo:
            return
        main = torch.cuda.current_stream(self.device)
        # Allocated on the main stream, so freeing it there later is safe.
        k = torch.empty((n, end - lo, store.head_dim), device=self.device, dtype=_dtype(store))
        v = torch.empty_like(k)
        ready = torch.cuda.Event()
        ready.record(main)  # the blocks' appends precede this point on the main stream
        self.side.wait_event(ready)
        store.gather(layer, h0, n, lo, end, k, v, stream=self.side.cuda_stream)
        done = torch.cuda.Event()
        done.record(self.side)
        self.staged[key] = (k, v, done)

    def take(self, store: Any, key: tuple[int, int, int, int, int]):
        """The unit's past keys and values on the main stream: staged ones, or copied now."""
        layer, h0, n, lo, end = key
        if end <= lo:
            return None, None
        got = self.staged.pop(key, None)
        main = torch.cuda.current_stream(self.device)
        if got is None:
            k = torch.empty((n, end - lo, store.head_dim), device=self.device, dtype=_dtype(store))
            v = torch.empty_like(k)
            store.gather(layer, h0, n, lo, end, k, v, stream=main.cuda_stream)
            return k, v
        k, v, done = got
        main.wait_event(done)
        return k, v

    def clear(self) -> None:
        self.staged.clear()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(store: Any) -> torch.dtype:
    return _DTYPES[store.dtype]


def prefill_attention(
    store: Any,
    state: PrefillState,
    heads_per_group: int,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    softcap: float | None,
    window: int | None,
) -> None:
    """Attention of a prefill chunk of ``layer`` whose keys were just appended to ``store``.

    Args:
        query: ``[1, num_q_heads, C, D]``.
        key, value: ``[1, num_kv_heads, C, D]``, the chunk's own keys and values.
        out: ``[1, C, num_q_heads, D]``, written.
    """
    c = query.shape[2]
    hkv = store.num_kv_heads
    g = query.shape[1] // hkv
    end = store.seq_len(layer)
    past_end = end - c
    lo = store.retained_start(layer)
    if window is not None:
        lo = max(lo, past_end + 1 - window)
    q = query.contiguous()
    stream = current_stream(query)
    groups = [(h0, min(heads_per_group, hkv - h0)) for h0 in range(0, hkv, heads_per_group)]
    for i, (h0, n) in enumerate(groups):
        unit = (layer, h0, n, lo, past_end)
        k_past, v_past = state.take(store, unit)
        # Stage the next unit: this layer's next group, else the next layer's first group
        # (its past ends where this chunk starts, like ours).
        if i + 1 < len(groups):
            h1, n1 = groups[i + 1]
            state.stage(store, (layer, h1, n1, lo, past_end))
        elif layer + 1 < store.num_layers:
            nxt = layer + 1
            nlo = store.retained_start(nxt)
            nwin = store.windows[nxt]
            if nwin is not None:
                nlo = max(nlo, past_end + 1 - nwin)
            state.stage(store, (nxt, 0, groups[0][1], nlo, past_end))
        qg = q[:, h0 * g : (h0 + n) * g]
        kn = key[0, h0 : h0 + n]
        vn = value[0, h0 : h0 + n]
        if softcap is not None or window is not None:
            kk = kn if k_past is None else torch.cat([k_past, kn], 1)
            vv = vn if v_past is None else torch.cat([v_past, vn], 1)
            if softcap is not None:
                o = torch.empty_like(qg[0])
                _core.attention(qg[0], kk, vv, o, scale, softcap, window, stream=stream)
                o = o[None]
            else:
                s = kk.shape[1]
                i_pos = torch.arange(c, device=q.device)[:, None] + (s - c)
                j_pos = torch.arange(s, device=q.device)[None]
                band = (j_pos <= i_pos) & (i_pos - j_pos < window)
                o = F.scaled_dot_product_attention(
                    qg, kk[None], vv[None], attn_mask=band, scale=scale, enable_gqa=True
                )
        else:
            o = _two_part(qg, k_past, v_past, kn, vn, scale)
        out[0, :, h0 * g : (h0 + n) * g] = o[0].transpose(0, 1)
