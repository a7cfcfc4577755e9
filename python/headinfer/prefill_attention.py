"""Attention of a prefill chunk on the GPU, over the keys it just appended and the stored past.

A prefill chunk is compute-bound, so it runs the fastest exact fused attention torch has
(measured in ``benchmarks/probe_prefill_attention.py``): the chunk's keys over themselves
(square causal) and over the stored past (no mask) as two cuDNN calls merged by their
log-sum-exp. The past of the next (layer, head group) is copied out of the store on a side
stream while this one computes, into one of two staging buffers (by the copy engine; an int8
store's rows go through its staging ring and are dequantized on the device). Gemma-2's
soft-capping (which fused kernels lack) runs headinfer's kernel over the staged keys; sliding
windows run SDPA with a band mask. gpt-oss's sink logits join the two-part merge as one more
logit with no value (once per row); its windowed layers run headinfer's kernel, which takes
them.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
import torch.nn.functional as F

from . import _core
from .device import current_stream

__all__ = ["PrefillState", "prefill_attention"]

logger = logging.getLogger("headinfer")


#: cuDNN's query rows (and, causal, key rows) are padded up to a multiple of this: torch keeps
#: a compiled cuDNN graph per shape for the life of the thread (its MHAGraphCache has no
#: bound), so every new prompt length grew the process by about 100 KiB (GPU soak, tiny
#: Llama: +1.24% RSS over 270 calls). Padded rows come last, so no real query sees them.
CUDNN_ROWS = 256


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` (``[B, H, L, D]``) with zero rows appended up to ``rows``."""
    if x.shape[2] == rows:
        return x
    out = x.new_zeros((x.shape[0], x.shape[1], rows, x.shape[3]))
    out[:, :, : x.shape[2]] = x
    return out


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """Fused attention with its log-sum-exp: ``(out [B,H,L,D], lse [B,H,L] f32)``.

    cuDNN for 16-bit inputs (the fastest measured), the memory-efficient kernel otherwise.
    For cuDNN, the query rows (and, causal, the keys: the chunk's own) are padded to a
    multiple of ``CUDNN_ROWS``: the padded keys lie after every real query, which the causal
    mask keeps them from; the padded queries' rows are dropped.
    """
    length = q.shape[2]
    if q.dtype in (torch.bfloat16, torch.float16) and PrefillState.cudnn_ok:
        rows = -(-length // CUDNN_ROWS) * CUDNN_ROWS
        qp = _pad_rows(q, rows)
        if causal:
            k, v = _pad_rows(k, rows), _pad_rows(v, rows)
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                qp, k, v, None, True, 0.0, causal, False, scale=scale
            )[:2]
            lse = lse.reshape(q.shape[0], q.shape[1], -1)[..., :length].float()
            return out[:, :, :length], lse
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
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a chunk: over its own keys and over the whole past, merged.

    Args:
        q: ``[1, n * g, C, D]``, contiguous (the group's query heads).
        k_past, v_past: ``[n, P, D]`` or ``None`` when the chunk starts the sequence.
        k_new, v_new: ``[n, C, D]``, the chunk's own keys and values.
        sinks: ``[n * g]`` float32 sink logits (gpt-oss), or ``None``: each joins its head's
            softmax denominators once, in the final merge.

    Returns:
        ``[1, n * g, C, D]``.
    """
    n, c, d = k_new.shape
    g = q.shape[1] // n
    kc = k_new.repeat_interleave(g, 0)[None]
    vc = v_new.repeat_interleave(g, 0)[None]
    out_c, lse_c = _fused(q, kc, vc, True, scale)
    sink = None if sinks is None else sinks[None, :, None]  # [1, n * g, 1]
    if k_past is None or v_past is None or k_past.shape[1] == 0:  # they come together
        if sink is None:
            return out_c
        # exp(lse) / (exp(lse) + exp(sink)): the keys' share of the softmax.
        return out_c.float().mul_(torch.sigmoid(lse_c - sink).unsqueeze(-1)).to(q.dtype)
    # Every chunk query sees every past key: fold the group into the query axis (no GQA copy).
    qf = q.reshape(1, n, g * c, d)
    out_p, lse_p = _fused(qf, k_past[None], v_past[None], False, scale)
    out_p = out_p.reshape(1, n * g, c, d)
    lse_p = lse_p.reshape(1, n * g, c)
    m = torch.maximum(lse_p, lse_c)
    if sink is not None:
        m = torch.maximum(m, sink)
    wp = torch.exp(lse_p - m).unsqueeze(-1)
    wc = torch.exp(lse_c - m).unsqueeze(-1)
    den = wp + wc
    if sink is not None:
        den = den + torch.exp(sink - m).unsqueeze(-1)
    merged = out_p.float().mul_(wp).add_(out_c.float().mul_(wc)).div_(den)
    return merged.to(q.dtype)


class PrefillState:
    """Per cache: the side stream and the staged past of the next (layer, head group)."""

    #: Flips to False once cuDNN refuses; then the efficient kernel serves.
    cudnn_ok = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # High priority: an int8 store's gather runs a short dequantizing kernel per staged
        # piece here, which must not queue behind the chunk's attention kernels.
        self.side = torch.cuda.Stream(device, priority=-1)
        # (layer, h0, n, lo, end) -> (k, v, event) staged on the side stream
        self.staged: dict[
            tuple[int, int, int, int, int], tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]
        ] = {}

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
    sinks: torch.Tensor | None = None,
) -> None:
    """Attention of a prefill chunk of ``layer`` whose keys were just appended to ``store``.

    Args:
        query: ``[1, num_q_heads, C, D]``.
        key, value: ``[1, num_kv_heads, C, D]``, the chunk's own keys and values.
        out: ``[1, C, num_q_heads, D]``, written.
        sinks: ``[num_q_heads]`` float32 on the query's device (gpt-oss), or ``None``.
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
        sg = None if sinks is None else sinks[h0 * g : (h0 + n) * g]
        if softcap is not None or window is not None:
            kk = kn if k_past is None else torch.cat([k_past, kn], 1)
            vv = vn if v_past is None else torch.cat([v_past, vn], 1)
            if softcap is not None or sg is not None:
                # Our kernel: soft-capping, and sinks with the window (SDPA gives no LSE here).
                if kk.stride() != vv.stride():  # it reads both with one set of strides
                    kk, vv = kk.contiguous(), vv.contiguous()
                o = torch.empty_like(qg[0])
                _core.attention(qg[0], kk, vv, o, scale, softcap, window, stream=stream, sinks=sg)
                o = o[None]
            else:
                s = kk.shape[1]
                i_pos = torch.arange(c, device=q.device)[:, None] + (s - c)
                j_pos = torch.arange(s, device=q.device)[None]
                band = (j_pos <= i_pos) & (i_pos - j_pos < cast(int, window))  # set: no softcap
                o = F.scaled_dot_product_attention(
                    qg, kk[None], vv[None], attn_mask=band, scale=scale, enable_gqa=True
                )
        else:
            o = _two_part(qg, k_past, v_past, kn, vn, scale, sg)
        out[0, :, h0 * g : (h0 + n) * g] = o[0].transpose(0, 1)
