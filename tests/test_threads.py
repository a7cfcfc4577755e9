"""Threads: two caches of one model used from two threads at once give exactly what each gives
alone; one cache driven from two threads at once is refused with a clear error, and the cache
is never left corrupt (it continues exactly as a run that never saw the other thread)."""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
import torch
from _tiny import prompt, tiny_model

import headinfer
from headinfer import HeadInferError
from headinfer.prefill import cache_kwarg_name

NEW = 6


def _model() -> Any:
    return headinfer.patch(tiny_model("mistral"), chunk_size=37, block_size=8)


def _generate(model: Any, ids: torch.Tensor, cache: Any = None) -> list[int]:
    kw = {} if cache is None else {cache_kwarg_name(model): cache}
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, **kw
        )
    return out[0, ids.shape[1] :].tolist()


def _together(*fns: Callable[[], Any]) -> list[Any]:
    """Runs ``fns`` on their own threads, started at once; each one's result or exception."""
    barrier = threading.Barrier(len(fns))
    results: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "a thread hung"
    return results


@pytest.mark.parametrize("explicit", [True, False])
def test_two_caches_of_one_model_on_two_threads_are_exact(explicit: bool) -> None:
    model = _model()
    prompts = [prompt(150, seed=1), prompt(90, seed=2)]
    alone = [_generate(model, ids) for ids in prompts]
    for _ in range(3):

        def job(ids: torch.Tensor) -> Callable[[], list[int]]:
            cache = headinfer.HeadInferCache(model) if explicit else None
            return lambda: _generate(model, ids, cache)

        results = _together(*(job(ids) for ids in prompts))
        for got, want in zip(results, alone):
            assert not isinstance(got, BaseException), repr(got)
            assert got == want


def test_one_cache_on_two_threads_is_refused_and_never_corrupt() -> None:
    model = _model()
    kw_name = cache_kwarg_name(model)
    doc = prompt(120, seed=3)
    cache = headinfer.HeadInferCache(model, croppable=True)  # crops back past the window
    with torch.no_grad():
        model(doc, **{kw_name: cache})
    parts = [prompt(200, seed=4), prompt(200, seed=5)]
    for _ in range(4):
        start = cache.get_seq_length()

        def forward(ids: torch.Tensor) -> Callable[[], Any]:
            def run() -> Any:
                with torch.no_grad():
                    return model(ids, **{kw_name: cache}).logits

            return run

        results = _together(*(forward(ids) for ids in parts))
        errors = [r for r in results if isinstance(r, BaseException)]
        for e in errors:
            assert isinstance(e, HeadInferError), repr(e)
            assert "another thread" in str(e), str(e)
        # What is in the cache is what the calls that returned appended, whole, in some order.
        done = [ids for ids, r in zip(parts, results) if not isinstance(r, BaseException)]
        assert cache.get_seq_length() == start + sum(ids.shape[1] for ids in done)
        cache.crop(start)
    # The cache continues exactly as one that only ever saw the document.
    fresh = headinfer.HeadInferCache(model)
    with torch.no_grad():
        model(doc, **{kw_name: fresh})
    question = prompt(20, seed=6)
    ids = torch.cat([doc, question], dim=1)
    assert _generate(model, ids, cache) == _generate(model, ids, fresh)


def test_a_second_thread_is_refused_while_the_first_is_inside_a_forward() -> None:
    # Deterministic overlap: in the middle of the first thread's forward (after layer 1), a
    # second thread runs a forward on the same cache and is waited for.
    model = _model()
    kw_name = cache_kwarg_name(model)
    ids, other = prompt(100, seed=7), prompt(50, seed=8)
    cache = headinfer.HeadInferCache(model)
    inner: list[Any] = []

    def second() -> None:
        try:
            with torch.no_grad():
                inner.append(model(other, **{kw_name: cache}).logits)
        except BaseException as exc:
            inner.append(exc)

    def hook(*_: Any) -> None:
        if threading.current_thread() is threading.main_thread() and not inner:
            t = threading.Thread(target=second)
            t.start()
            t.join(timeout=120)
            assert inner, "the second thread hung"

    handle = model.model.layers[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            got = model(ids, **{kw_name: cache}).logits
    finally:
        handle.remove()
    assert len(inner) == 1 and isinstance(inner[0], HeadInferError), inner
    assert "another thread" in str(inner[0])
    # The first thread's forward and its cache are as if the second had never tried.
    assert cache.get_seq_length() == ids.shape[1]
    fresh = headinfer.HeadInferCache(model)
    with torch.no_grad():
        want = model(ids, **{kw_name: fresh}).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    question = prompt(10, seed=9)
    both = torch.cat([ids, question], dim=1)
    assert _generate(model, both, cache) == _generate(model, both, fresh)
