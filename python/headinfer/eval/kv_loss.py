"""What a lossy KV cache (``kv_dtype="int8"``) costs, measured against the exact cache.

``measure(model, input_ids)`` feeds the tokens chunk by chunk through the patched model twice in
lockstep, once into an exact ``HeadInferCache`` and once into a ``kv_dtype`` one, and compares
the next-token distributions at every position: the KL divergence KL(exact || lossy) (mean,
median and largest) and the share of positions whose greedy (argmax) token is the same. Both
runs see the same tokens (teacher forcing), so the distributions differ by what the stored keys
and values lost, accumulated through the layers; a chunk's queries read their own chunk's keys
from the store too, so every key and value the model attends to went through the format.
llama.cpp measures its KV cache types the same way (``llama-perplexity --kl-divergence``).

``benchmarks/kv_int8_loss.py`` runs it on SmolLM2-135M for README's figures;
``tests/eval/test_kv_loss.py`` holds the mean KL to its bound in CI.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

import headinfer

from ..prefill import cache_kwarg_name

__all__ = ["KvLoss", "measure"]

#: Rows of logits compared at a time in float64 (keeps the float64 copies small).
_ROWS = 64


@dataclass(frozen=True)
class KvLoss:
    """The loss of ``kv_dtype`` against the exact cache over ``positions`` next-token
    distributions (KL divergences in nats)."""

    kv_dtype: str
    positions: int
    chunk_size: int
    mean_kl: float
    median_kl: float
    max_kl: float
    #: Positions whose argmax token is the same in both runs, and their share.
    greedy_equal: int
    greedy_agreement: float
    #: Bytes each cache holds after the last token.
    exact_bytes: int
    lossy_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _compare(exact: torch.Tensor, lossy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``[n, vocab]`` logits: KL(softmax(exact) || softmax(lossy)) in float64, and
    whether the argmaxes are equal."""
    kls, same = [], []
    for start in range(0, exact.shape[0], _ROWS):
        p = torch.log_softmax(exact[start : start + _ROWS].double(), dim=-1)
        q = torch.log_softmax(lossy[start : start + _ROWS].double(), dim=-1)
        kls.append((p.exp() * (p - q)).sum(dim=-1))
        same.append(p.argmax(dim=-1) == q.argmax(dim=-1))
    return torch.cat(kls), torch.cat(same)


def measure(
    model: Any, input_ids: torch.Tensor, *, kv_dtype: str = "int8", chunk_size: int = 512
) -> KvLoss:
    """Compare ``kv_dtype`` with the exact cache on ``input_ids`` (``[1, n]``, on the model's
    device), in chunks of ``chunk_size`` tokens.

    ``model`` is patched for the call (``with headinfer.patch(model, ...)``: left as it was);
    the ``input_ids.shape[1]`` positions' distributions are compared (the last one predicts the
    token after the text).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected [1, n] token ids, got {tuple(input_ids.shape)}")
    start = time.perf_counter()
    kls, same = [], []
    with headinfer.patch(model, chunk_size=chunk_size), torch.inference_mode():
        name = cache_kwarg_name(model)
        exact = headinfer.HeadInferCache(model, kv_dtype="exact")
        lossy = headinfer.HeadInferCache(model, kv_dtype=kv_dtype)
        for first in range(0, input_ids.shape[1], chunk_size):
            chunk = input_ids[:, first : first + chunk_size]
            ref = model(chunk, logits_to_keep=0, **{name: exact}).logits[0]
            got = model(chunk, logits_to_keep=0, **{name: lossy}).logits[0]
            kl, eq = _compare(ref, got)
            kls.append(kl)
            same.append(eq)
    kl_all, same_all = torch.cat(kls), torch.cat(same)
    equal = int(same_all.sum())
    return KvLoss(
        kv_dtype=lossy.kv_dtype,
        positions=kl_all.numel(),
        chunk_size=chunk_size,
        mean_kl=float(kl_all.mean()),
        median_kl=float(kl_all.median()),
        max_kl=float(kl_all.max()),
        greedy_equal=equal,
        greedy_agreement=equal / kl_all.numel(),
        exact_bytes=exact.bytes_used(),
        lossy_bytes=lossy.bytes_used(),
        seconds=time.perf_counter() - start,
    )
