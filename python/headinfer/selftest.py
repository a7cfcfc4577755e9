"""The exactness self-test of ``headinfer check``: every supported family's tiny random model
(``headinfer.tiny``, no download; the image-text models' text towers too), patched, against the
same weights with eager attention.

Per family and mode, a prefill of most of a 300-token prompt in two forwards (odd chunks that
cross the windows and the blocks), then teacher-forced decode steps; the logits of every
position against the eager model's forward over the whole prompt. Modes: ``cpu`` (float32);
with a GPU, ``resident`` (every KV byte on the GPU), ``streamed`` (every KV byte moved to
pinned host memory after the first forward and after the first decode step, so the second
forward's past and the other decode steps are read from the host) and ``shared`` (streamed,
with the CPU attending over one kv head's host blocks in decode), each in float32 (within
1e-4 of eager) and bfloat16 (an error against a float64 run at most twice eager attention's
own, as flash-attention's tests judge it).

``HEADINFER_SELFTEST_FAIL=family[,family...]`` is a TEST-ONLY hook, as the Rust failure points
are: it adds a small error to those families' headinfer logits, so that tests can see a
failing self-test reported and the command exit 1.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .patch import patch, unpatch
from .prefill import cache_kwarg_name
from .tiny import FAMILIES, MULTIMODAL, PROMPT_LEN, float64_copy, have, prompt, tiny_model

__all__ = ["CASES", "FAIL_ENV", "MODES", "Result", "run_self_test"]

logger = logging.getLogger("headinfer")

#: TEST-ONLY: families whose logits get an error added (see the module docstring).
FAIL_ENV = "HEADINFER_SELFTEST_FAIL"
#: The modes, in order; the GPU ones run only where there is a GPU.
MODES = ("cpu", "resident", "streamed", "shared")
#: float32's tolerance: max |ours - eager| / max |eager| over every logit.
FLOAT32_TOL = 1e-4
#: Decode steps after the prefill.
STEPS = 6


@dataclass
class Result:
    """One family in one mode and dtype: ``ok``, the error measured and what it was held to
    (``limit``), or the exception that stopped it (``error``)."""

    family: str
    mode: str
    dtype: str
    ok: bool
    err: float | None = None
    limit: float | None = None
    error: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    return float((got - ref).abs().max() / ref.abs().max())


def _on_host(cache: Any) -> None:
    # Every KV block to pinned host memory: the decode kernel (and the prefill's gather) then
    # read the past over the link. The cache replans at its next phase change only.
    for part in cache.stores:
        store = part.store
        if store.is_cuda:
            store.device_budget = 0
            store.rebalance(torch.cuda.current_stream(part.device).cuda_stream)


def _logits(model: Any, ids: torch.Tensor, mode: str) -> torch.Tensor:
    """``[1, len, vocab]``: two prefill forwards through one cache, then decode steps."""
    from .cache import HeadInferCache

    name = cache_kwarg_name(model)
    length = ids.shape[1]
    first, prefilled = length // 2, length - STEPS
    cache = HeadInferCache(model)
    # The first forward plans for the whole prompt; the second, within that plan, does not
    # replan (which would move blocks back to the GPU). Decode replans once, at its first step.
    cache.expected_new_tokens = length - first
    host = mode in ("streamed", "shared")
    with torch.no_grad():
        parts = [model(ids[:, :first], use_cache=True, **{name: cache}).logits]
        cache.expected_new_tokens = 0
        if host:
            _on_host(cache)
            if mode == "shared":
                for part in cache.stores:
                    part.store.cpu_share_min_tokens = 0  # however short the host part is
        parts.append(model(ids[:, first:prefilled], use_cache=True, **{name: cache}).logits)
        for i in range(prefilled, length):
            parts.append(model(ids[:, i : i + 1], use_cache=True, **{name: cache}).logits)
            if host and i == prefilled:
                _on_host(cache)
    if host and cache.memory()["device_used"] != 0:
        # Not what this mode is meant to test: say so rather than pass on resident KV.
        raise RuntimeError(f"{mode}: KV left on the GPU ({cache.memory()})")
    return torch.cat(parts, dim=1)


def _perturb(family: str, logits: torch.Tensor) -> torch.Tensor:
    failing = {f.strip() for f in os.environ.get(FAIL_ENV, "").split(",") if f.strip()}
    if family in failing:
        return logits + 1e-2 * logits.abs().max()
    return logits


def _one(family: str, mode: str, dtype: torch.dtype) -> Result:
    start = time.perf_counter()
    dtype_name = str(dtype).removeprefix("torch.")
    result = Result(family, mode, dtype_name, ok=False)
    device = "cpu" if mode == "cpu" else "cuda"
    try:
        base = tiny_model(family)
        ids = prompt(PROMPT_LEN)
        model = copy.deepcopy(base).to(device, dtype)
        patch(
            model,
            chunk_size=97,
            block_size=16,
            cpu_heads=1 if mode == "shared" else None,
        )
        try:
            got = _perturb(family, _logits(model, ids.to(device), mode))
        finally:
            unpatch(model)
        with torch.no_grad():
            if dtype == torch.float32:
                eager = copy.deepcopy(base).to(device)
                result.err = _rel_err(got, eager(ids.to(device)).logits)
                result.limit = FLOAT32_TOL
            else:
                exact = float64_copy(base)(ids).logits
                std = copy.deepcopy(base).to(device, dtype)(ids.to(device)).logits
                result.err = _rel_err(got, exact)
                result.limit = 2 * _rel_err(std, exact) + 1e-6
        result.ok = result.err <= result.limit
    except Exception as exc:  # a self-test reports every failure, it does not stop at one
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    result.seconds = time.perf_counter() - start
    return result


#: What the self-test runs: every family's tiny model, then the image-text models whose text
#: towers are supported (text prompts).
CASES = FAMILIES + MULTIMODAL


def _plan(gpu: bool) -> Iterator[tuple[str, str, torch.dtype]]:
    for family in CASES:
        yield family, "cpu", torch.float32
        if gpu:
            for dtype in (torch.float32, torch.bfloat16):
                for mode in MODES[1:]:
                    yield family, mode, dtype


def run_self_test(
    *,
    gpu: bool | None = None,
    families: tuple[str, ...] | None = None,
    progress: Callable[[Result, int, int], None] | None = None,
) -> list[Result]:
    """Runs every family (or ``families``) on the CPU in float32 and, with ``gpu`` (default:
    where CUDA is usable), in each GPU mode in float32 and bfloat16. A family the installed
    transformers lacks is left out. ``progress(result, done, total)`` after each run."""
    if gpu is None:
        from . import _core

        gpu = torch.cuda.is_available() and _core.cuda_status() is None
    wanted = set(families) if families is not None else None
    runs = [r for r in _plan(gpu) if (wanted is None or r[0] in wanted) and have(r[0])]
    results = []
    # On a small host, torch's second thread and the store's workers contend on tiny models.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, (family, mode, dtype) in enumerate(runs):
            result = _one(family, mode, dtype)
            if not result.ok:
                logger.info("self-test %s %s %s failed: %s", family, mode, dtype, result)
            results.append(result)
            if progress is not None:
                progress(result, i + 1, len(runs))
    finally:
        torch.set_num_threads(threads)
    return results
