"""The patched forward against the unpatched one at its edges: ``logits_to_keep`` of every kind,
errors and interrupts in the middle of a chunked prefill, positions past
``max_position_embeddings``."""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytest
import torch
from _tiny import prompt, rel_err, tiny_model, twin

import headinfer
from headinfer.prefill import cache_kwarg_name

TOL = 1e-4
LENGTH = 40

# Every kind of logits_to_keep transformers takes, and ones it refuses (out of range, negative
# positions, wrong shapes and dtypes); the patched forward must give the same logits or raise
# the same exception.
KEEPS: dict[str, Any] = {
    "int 0 (all)": 0,
    "int 1": 1,
    "int 5": 5,
    "int = length": LENGTH,
    "int > length": 100,
    "negative int": -3,
    "negative int < -length": -100,
    "bool True": True,
    "list": [5, 17],
    "1d": torch.tensor([5, 17, 39]),
    "1d unordered, repeated": torch.tensor([39, 5, 5, 0]),
    "1d negative": torch.tensor([-1, -40, 3]),
    "1d out of range": torch.tensor([5, 100]),
    "1d negative out of range": torch.tensor([-41]),
    "1d empty": torch.tensor([], dtype=torch.long),
    "0d": torch.tensor(7),
    "2d": torch.tensor([[5, 17, 20]]),
    "2d out of range": torch.tensor([[5, 100]]),
    "2d negative": torch.tensor([[-1]]),
    "2d batch 2": torch.tensor([[1, 2], [3, 4]]),
    "bool 1d": torch.arange(LENGTH) % 7 == 0,
    "bool 1d wrong length": torch.ones(5, dtype=torch.bool),
    "bool 2d": (torch.arange(LENGTH) % 5 == 1)[None],
    "float tensor": torch.tensor([1.0, 2.0]),
}


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as exc:  # the exception itself is what is compared
        return "raised", exc


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = tiny_model("gemma2")  # final-logit soft-capping applies to the kept logits
    reference = twin(model)
    headinfer.patch(model, chunk_size=16, block_size=16)
    return model, reference


@pytest.mark.parametrize("chunk_size", [16, 64], ids=["chunked", "one chunk"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no cache"])
@pytest.mark.parametrize("name", list(KEEPS))
def test_logits_to_keep_as_transformers(
    models: tuple[torch.nn.Module, torch.nn.Module], name: str, chunk_size: int, use_cache: bool
) -> None:
    model, reference = models
    headinfer.patch(model, chunk_size=chunk_size, block_size=16)
    keep = KEEPS[name]
    ids = prompt(LENGTH)
    with torch.no_grad():
        want = _outcome(lambda: reference(ids, logits_to_keep=keep, use_cache=False).logits)
        got = _outcome(lambda: model(ids, logits_to_keep=keep, use_cache=use_cache).logits)
    assert got[0] == want[0], (got, want)
    if want[0] == "raised":
        assert type(got[1]) is type(want[1])
        assert str(got[1]) == str(want[1])
        return
    assert got[1].shape == want[1].shape
    assert got[1].dtype == want[1].dtype
    if want[1].numel():
        assert rel_err(got[1], want[1]) < TOL


def test_out_of_range_logits_to_keep_leaves_the_cache_untouched(
    models: tuple[torch.nn.Module, torch.nn.Module],
) -> None:
    model, _ = models
    headinfer.patch(model, chunk_size=16, block_size=16)
    cache = headinfer.HeadInferCache(model)
    with torch.no_grad():
        model(prompt(20), **{cache_kwarg_name(model): cache})
        with pytest.raises(IndexError):
            kw = {cache_kwarg_name(model): cache}
            model(prompt(LENGTH), logits_to_keep=torch.tensor([5, 100]), **kw)
    assert cache.get_seq_length() == 20


@pytest.mark.parametrize("keep", [0, 5])
def test_labels_with_logits_to_keep_as_transformers(
    models: tuple[torch.nn.Module, torch.nn.Module], keep: int
) -> None:
    model, reference = models
    headinfer.patch(model, chunk_size=16, block_size=16)
    ids = prompt(LENGTH)
    with torch.no_grad():
        want = _outcome(lambda: reference(ids, labels=ids, logits_to_keep=keep).loss)
        got = _outcome(lambda: model(ids, labels=ids, logits_to_keep=keep).loss)
    assert got[0] == want[0], (got, want)
    if want[0] == "ok":
        assert rel_err(got[1], want[1]) < TOL
    else:
        assert type(got[1]) is type(want[1]) and str(got[1]) == str(want[1])


# --- An error or an interrupt in chunk k of a chunked prefill -----------------------------------

PREFIX, NEW, CHUNK = 100, 96, 32


class Boom(RuntimeError):
    pass


def _fail_on_call(layer: torch.nn.Module, k: int, exc: BaseException) -> Any:
    """A forward hook on a decoder layer that raises ``exc`` on its ``k``-th call (from 0)."""
    calls = [0]

    def hook(*args: Any) -> None:
        calls[0] += 1
        if calls[0] == k + 1:
            raise exc

    return layer.register_forward_hook(hook)


def _interrupted(family: str, k: int, exc: BaseException) -> tuple[Any, ...]:
    """Prefill PREFIX tokens, then NEW more in chunks of CHUNK; chunk ``k`` raises ``exc`` in
    the middle layer (the layers before it have appended that chunk, the one after has not)."""
    model = headinfer.patch(tiny_model(family), chunk_size=CHUNK, block_size=16)
    ids = prompt(PREFIX + NEW + 8)
    cache = headinfer.HeadInferCache(model)
    kw = {cache_kwarg_name(model): cache}
    with torch.no_grad():
        model(ids[:, :PREFIX], **kw)
    handle = _fail_on_call(model.model.layers[1], k, exc)
    try:
        with torch.no_grad(), pytest.raises(type(exc)) as info:
            model(ids[:, PREFIX : PREFIX + NEW], **kw)
    finally:
        handle.remove()
    return model, ids, cache, kw, info.value


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt])
def test_error_in_chunked_prefill_propagates_unchanged(family: str, exc_type: type) -> None:
    exc = exc_type("injected in chunk 2")
    model, ids, cache, kw, raised = _interrupted(family, 2, exc)
    assert raised is exc  # the very exception, not a HeadInferError made of it
    # Whatever the cache holds now, every layer holds it, and it continues exactly.
    held = cache.get_seq_length()
    assert held == PREFIX  # exact, sliding windows included
    assert all(cache.store.seq_len(i) == held for i in range(cache.spec.num_layers))
    with torch.no_grad():
        got = model(ids[:, held : held + 8], **kw).logits
        want = twin(model)(ids[:, : held + 8]).logits[:, held:]
    assert rel_err(got, want) < TOL


def test_rollback_without_a_store_checkpoint_crops_warns_and_notes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Without the store's checkpoint the cache can only crop, and Mistral's window (64) has
    # let go of blocks that position PREFIX needs by chunk 2: the fallback says what is left.
    monkeypatch.setattr(headinfer.HeadInferCache, "_checkpoint", lambda self: False)
    with caplog.at_level(logging.WARNING, logger="headinfer"):
        _, _, cache, _, raised = _interrupted("mistral", 2, Boom("injected"))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not be rolled back to its 100 tokens" in m for m in messages), messages
    # Exceptions take notes from Python 3.11 on (add_note); before, the warning alone says it.
    if sys.version_info >= (3, 11):
        notes = getattr(raised, "__notes__", [])
        assert any(f"holds the first {cache.get_seq_length()}" in n for n in notes), notes


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_error_in_the_first_chunked_prefill_leaves_an_empty_cache_quietly(
    family: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The first forward creates the store, so there is no checkpoint yet: the rollback crops
    # to 0, which works whatever the window let go of (chunk 4 starts at 128, past the window).
    model = headinfer.patch(tiny_model(family), chunk_size=CHUNK, block_size=16)
    ids = prompt(PREFIX + NEW + 8)
    cache = headinfer.HeadInferCache(model)
    kw = {cache_kwarg_name(model): cache}
    handle = _fail_on_call(model.model.layers[1], 4, Boom("injected"))
    try:
        with (
            caplog.at_level(logging.WARNING, logger="headinfer"),
            torch.no_grad(),
            pytest.raises(Boom),
        ):
            model(ids[:, : PREFIX + NEW], **kw)
    finally:
        handle.remove()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(cache.store.seq_len(i) == 0 for i in range(cache.spec.num_layers))
    with torch.no_grad():
        got = model(ids[:, :PREFIX], **kw).logits
        want = twin(model)(ids[:, :PREFIX]).logits
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize(
    ("family", "k"),
    [
        ("llama", 0),
        ("llama", 2),
        ("mistral", 0),  # nothing dropped yet
        ("mistral", 2),  # the window let go of blocks the rollback needs: the store kept them
        ("gemma2", 2),
        ("qwen2", 2),
    ],
)
@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt])
def test_error_in_chunked_prefill_rolls_back_exactly(family: str, k: int, exc_type: type) -> None:
    model, ids, cache, kw, _ = _interrupted(family, k, exc_type("injected"))
    assert cache.get_seq_length() == PREFIX
    assert all(cache.store.seq_len(i) == PREFIX for i in range(cache.spec.num_layers))
    # Continuing gives what an uninterrupted run gives, bit for bit.
    fresh = headinfer.HeadInferCache(model)
    fresh_kw = {cache_kwarg_name(model): fresh}
    with torch.no_grad():
        got = model(ids[:, PREFIX : PREFIX + NEW], **kw).logits
        model(ids[:, :PREFIX], **fresh_kw)
        want = model(ids[:, PREFIX : PREFIX + NEW], **fresh_kw).logits
    assert torch.equal(got, want)
