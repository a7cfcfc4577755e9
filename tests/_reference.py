"""Standard attention in float64: what every test of the op compares against."""

from __future__ import annotations

import torch


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    softcap: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ``q`` (``[hq, lq, d]``, query ``i`` at position ``lk - lq + i``) over
    ``k``, ``v`` (``[hkv, lk, d]``, GQA groups of ``hq // hkv``), in float64. ``window``: a query
    sees the last ``window`` positions, itself included; ``sinks`` (``[hq]``): gpt-oss's sink
    logit joins each softmax and is dropped after it, as transformers' eager attention does."""
    hq, lq, _ = q.shape
    hkv, lk, _ = k.shape
    g = hq // hkv
    kk = k.double().repeat_interleave(g, 0)
    vv = v.double().repeat_interleave(g, 0)
    s = q.double() @ kk.transpose(1, 2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(lk - lq, lk, device=q.device)[:, None]
    j = torch.arange(lk, device=q.device)[None]
    mask = j > i
    if window is not None:
        mask |= i - j >= window
    s = s.masked_fill(mask, float("-inf"))
    if sinks is None:
        return s.softmax(-1) @ vv
    col = sinks.double()[:, None, None].expand(hq, lq, 1)
    return torch.cat([s, col], -1).softmax(-1)[..., :-1] @ vv
