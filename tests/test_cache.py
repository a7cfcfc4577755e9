"""HeadInferCache: the transformers Cache API, reuse, crop, memory errors, isolation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _tiny import prompt, rel_err, tiny_config, tiny_model, twin

import headinfer
from headinfer.prefill import cache_kwarg_name

TOL = 1e-4


def _kw(model: torch.nn.Module, cache: object) -> dict:
    """The cache keyword this transformers version's forward/generate takes."""
    return {cache_kwarg_name(model): cache}


def _greedy(model: torch.nn.Module, ids: torch.Tensor, n: int, **kw: object):
    return model.generate(
        ids,
        max_new_tokens=n,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )


def _patched_and_eager(family: str, chunk_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny model of ``family``, patched, and its unpatched twin (the reference)."""
    model = tiny_model(family)
    reference = twin(model)
    headinfer.patch(model, chunk_size=chunk_size, block_size=16)
    return model, reference


def _prefilled(
    model: torch.nn.Module, ids: torch.Tensor, **kwargs: Any
) -> headinfer.HeadInferCache:
    """A new ``HeadInferCache(model, **kwargs)`` holding ``ids``."""
    cache = headinfer.HeadInferCache(model, **kwargs)
    with torch.no_grad():
        model(ids, **_kw(model, cache))
    return cache


def _assert_continues(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    cache: headinfer.HeadInferCache,
    ids: torch.Tensor,
    start: int,
) -> None:
    """``model`` run on ``ids[:, start:]`` after ``cache`` holds ``ids[:, :start]`` gives the
    reference's logits for the whole of ``ids`` from ``start`` on."""
    with torch.no_grad():
        got = model(ids[:, start:], **_kw(model, cache)).logits
        want = reference(ids).logits[:, start:]
    assert rel_err(got, want) < TOL


def test_cache_from_model_or_config() -> None:
    model = tiny_model("gemma2")
    a = headinfer.HeadInferCache(model, block_size=16)
    b = headinfer.HeadInferCache(model.config, block_size=16)
    assert a.store.dtype == "float32"  # from the model, up front
    with pytest.raises(headinfer.HeadInferError):
        b.store  # noqa: B018 - from the config: made by the first update
    assert len(a) == len(b) == 3
    assert a.is_sliding == [True, False, True]
    assert list(a.windows) == [40, None, 40]
    assert a.get_seq_length() == b.get_seq_length() == 0
    assert not a.is_compileable
    assert a.get_mask_sizes(5, 0) == (5, 0)


def test_layer_api_matches_dynamic_cache_semantics() -> None:
    model = headinfer.patch(tiny_model("mistral"), chunk_size=64, block_size=16)
    cache = _prefilled(model, prompt(100))
    assert cache.get_seq_length() == 100
    # Sliding window 64: a chunk of 5 queries at 100.. sees keys from 100 - 64 + 1 on.
    assert cache.get_mask_sizes(5, 0) == (100 + 5 - 37, 37)
    assert cache.layers[0].get_max_length() == 64
    assert cache.bytes_used() > 0 and cache.bytes_reserved() >= cache.bytes_used()
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.bytes_used() == 0


def test_explicit_cache_reuse_and_continuation() -> None:
    # Prefill, then continue from the kept cache in a second call: same as one eager run.
    model, reference = _patched_and_eager("qwen2", chunk_size=50)
    ids = prompt(300)
    cache = _prefilled(model, ids[:, :180])
    _assert_continues(model, reference, cache, ids, 180)
    assert cache.get_seq_length() == 300


def test_prefix_reuse_with_crop() -> None:
    # Prefill a document once; after each answer crop back to it and ask again.
    model = tiny_model("llama")
    headinfer.patch(model, chunk_size=64, block_size=16)
    doc, q1, q2 = prompt(200, seed=5), prompt(12, seed=6), prompt(9, seed=7)
    cache = _prefilled(model, doc)
    assert cache.get_seq_length() == 200

    first = _greedy(model, torch.cat([doc, q1], 1), 8, **_kw(model, cache))
    assert cache.get_seq_length() > 200
    cache.crop(200)
    assert cache.get_seq_length() == 200
    second = _greedy(model, torch.cat([doc, q2], 1), 8, **_kw(model, cache))

    fresh = _greedy(model, torch.cat([doc, q2], 1), 8)
    assert torch.equal(second.sequences, fresh.sequences)
    for got, want in zip(second.scores, fresh.scores):
        assert rel_err(got, want) < TOL
    fresh1 = _greedy(model, torch.cat([doc, q1], 1), 8)
    assert torch.equal(first.sequences, fresh1.sequences)


def test_crop_conventions() -> None:
    model = headinfer.patch(tiny_model("llama"), chunk_size=64, block_size=16)
    cache = _prefilled(model, prompt(50))
    cache.crop(0)  # transformers: crop(0) removes nothing
    assert cache.get_seq_length() == 50
    cache.crop(80)  # longer than held: nothing
    assert cache.get_seq_length() == 50
    cache.crop(-10)  # transformers: drop the last 10
    assert cache.get_seq_length() == 40
    cache.crop(25)  # keep the first 25
    assert cache.get_seq_length() == 25
    assert all(cache.store.seq_len(i) == 25 for i in range(3))


def test_crop_into_dropped_window_refused_and_cache_kept() -> None:
    model, reference = _patched_and_eager("mistral", chunk_size=64)
    ids = prompt(300)
    cache = _prefilled(model, ids[:, :250])
    with pytest.raises(ValueError):
        cache.crop(20)
    assert cache.get_seq_length() == 250
    _assert_continues(model, reference, cache, ids, 250)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_cache_in_unpatched_model_reads_back(family: str) -> None:
    # Any attention implementation gets the keys/values its mask expects from the store.
    model = tiny_model(family)
    reference = twin(model)
    ids = prompt(300)
    cache = headinfer.HeadInferCache(model, block_size=16)
    with torch.no_grad():
        parts = [model(ids[:, s : s + 75], **_kw(model, cache)).logits for s in range(0, 300, 75)]
        want = reference(ids).logits
    assert rel_err(torch.cat(parts, 1), want) < TOL


def test_out_of_host_memory_leaves_cache_usable() -> None:
    model, reference = _patched_and_eager("llama", chunk_size=64)
    ids = prompt(300)
    probe = _prefilled(model, ids[:, :120])
    limit = probe.bytes_reserved() * 2  # room for 120 more tokens, not for 180
    cache = headinfer.HeadInferCache(model, host_memory_limit=limit)
    with torch.no_grad():
        model(ids[:, :120], **_kw(model, cache))
        with pytest.raises(headinfer.OutOfHostMemoryError) as info:
            model(ids[:, 120:], **_kw(model, cache))
        assert info.value.needed > info.value.available
        assert cache.get_seq_length() == 120
        assert all(cache.store.seq_len(i) == 120 for i in range(3))
        _assert_continues(model, reference, cache, ids[:, :200], 120)


def test_patch_host_memory_limit_reaches_generate() -> None:
    model = headinfer.patch(
        tiny_model("llama"), chunk_size=64, block_size=16, host_memory_limit=4096
    )
    with pytest.raises(headinfer.OutOfHostMemoryError):
        model.generate(prompt(300), max_new_tokens=2)


def test_two_models_two_caches_interleaved() -> None:
    llama, mistral = tiny_model("llama", seed=1), tiny_model("mistral", seed=2)
    refs = {"llama": twin(llama), "mistral": twin(mistral)}
    models = {"llama": headinfer.patch(llama, 64, 16), "mistral": headinfer.patch(mistral, 50, 16)}
    ids = {"a": prompt(240, seed=11), "b": prompt(240, seed=12)}
    caches = {
        (m, s): headinfer.HeadInferCache(models[m]) for m in models for s in ids
    }  # two models x two sequences
    got: dict = {key: [] for key in caches}
    with torch.no_grad():
        for start in range(0, 240, 80):
            for (m, s), cache in caches.items():
                out = models[m](ids[s][:, start : start + 80], **_kw(models[m], cache))
                got[(m, s)].append(out.logits)
        for m, s in caches:
            want = refs[m](ids[s]).logits
            assert rel_err(torch.cat(got[(m, s)], 1), want) < TOL


def test_cache_for_other_model_rejected() -> None:
    model = headinfer.patch(tiny_model("llama"), 64, 16)
    other = headinfer.HeadInferCache(tiny_config("llama", num_hidden_layers=2))
    with pytest.raises(ValueError, match="cache"):
        model(prompt(10), **_kw(model, other))


# --- Freed on last reference, as a DynamicCache is (no cycle for the cyclic GC to find) --------


@pytest.fixture
def no_gc():
    import gc

    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _live_caches() -> int:
    import gc

    # gc.get_objects() lists every tracked object still alive, cycles awaiting the GC included.
    return sum(type(o) is headinfer.HeadInferCache for o in gc.get_objects())


def test_deleted_cache_frees_its_store_without_gc(no_gc: None) -> None:
    import gc
    import weakref

    model = headinfer.patch(tiny_model("mistral"), chunk_size=64, block_size=16)
    cache = headinfer.HeadInferCache(model)
    with torch.no_grad():
        out = model(prompt(200), **_kw(model, cache))
    store = cache.store
    # Only the cache's device store holds the store, so the store goes when the cache goes.
    (holder,) = gc.get_referrers(store)
    (part,) = cache.stores
    assert holder is part or holder is vars(part)
    del store, holder, part
    gone = weakref.ref(cache)
    layer = cache.layers[0]
    del cache, out
    assert gone() is None
    with pytest.raises(headinfer.HeadInferError, match="deleted"):
        layer.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    assert layer.get_seq_length() == 0


def test_caches_made_by_forward_and_generate_are_freed_without_gc(no_gc: None) -> None:
    model = headinfer.patch(tiny_model("gemma2"), chunk_size=64, block_size=16, progress=True)
    before = _live_caches()
    with torch.no_grad():
        out = model(prompt(150))
        assert isinstance(out.past_key_values, headinfer.HeadInferCache)
        assert _live_caches() == before + 1
        del out
        assert _live_caches() == before
        model(prompt(150), use_cache=False)
        assert _live_caches() == before
        tokens = model.generate(prompt(150), max_new_tokens=4, do_sample=False)
        assert tokens.shape == (1, 154)
        assert _live_caches() == before
        scores = _greedy(model, prompt(150), 3)
        assert _live_caches() == before + 1  # the output holds its cache, as with DynamicCache
        del scores
        assert _live_caches() == before


def test_dtype_with_a_config_is_the_store_dtype() -> None:
    cache = headinfer.HeadInferCache(tiny_config("llama"), dtype=torch.float16)
    k = torch.randn(1, 2, 5, 16)
    with pytest.raises(TypeError, match="key: dtype is float32, expected float16"):
        cache.update(k, k, 0)
    assert cache.get_seq_length() == 0
    keys, _ = cache.update(k.half(), k.half(), 0)
    assert cache.store.dtype == "float16" and cache.layers[0].dtype == torch.float16
    assert torch.equal(keys, k.half())
    with pytest.raises(TypeError, match="dtype"):
        headinfer.HeadInferCache(tiny_config("llama"), dtype=torch.float64)


def test_dtype_given_for_a_model_of_another_dtype_is_refused_by_name() -> None:
    model = headinfer.patch(tiny_model("llama"), chunk_size=16, block_size=16)  # float32
    cache = headinfer.HeadInferCache(model, dtype=torch.float16)
    with torch.no_grad(), pytest.raises(TypeError, match="key: dtype is float32, expected float16"):
        model(prompt(40), **_kw(model, cache))
    assert cache.get_seq_length() == 0


# --- Host memory checked before prefill, for the whole request --------------------------------


def _layer_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]

    def count(*args: object) -> None:
        calls[0] += 1

    model.model.layers[0].register_forward_hook(count)
    return calls


def test_prompt_larger_than_host_memory_refused_before_any_chunk() -> None:
    # Tiny Llama in float32, blocks of 16 tokens: a block pair (keys and values of one head) is
    # 2 KiB, 300 tokens take 19 x 2 heads x 3 layers = 114 pairs, 228 KiB. The first chunks fit.
    model = headinfer.patch(
        tiny_model("llama"), chunk_size=64, block_size=16, host_memory_limit=100 << 10
    )
    calls = _layer_calls(model)
    cache = headinfer.HeadInferCache(model)
    with torch.no_grad(), pytest.raises(headinfer.OutOfHostMemoryError) as info:
        model(prompt(300), **_kw(model, cache))
    assert calls == [0]  # no chunk ran
    assert info.value.needed == 114 * 2048 and info.value.available == 100 << 10
    assert "300 tokens" in str(info.value)
    assert cache.get_seq_length() == 0 and cache.bytes_reserved() == 0
    with torch.no_grad():
        model(prompt(40), **_kw(model, cache))  # what fits still runs
    assert cache.get_seq_length() == 40


def test_generation_larger_than_host_memory_refused_before_prefill() -> None:
    # A 100-token prompt fits in 100 KiB (7 x 6 pairs); with 100 new tokens it does not (13 x 6).
    model = headinfer.patch(
        tiny_model("llama"), chunk_size=64, block_size=16, host_memory_limit=100 << 10
    )
    calls = _layer_calls(model)
    with pytest.raises(headinfer.OutOfHostMemoryError, match="200 tokens"):
        model.generate(prompt(100), max_new_tokens=100, do_sample=False)
    assert calls == [0]
    out = model.generate(prompt(100), max_new_tokens=10, do_sample=False)
    assert out.shape == (1, 110)


def test_sliding_window_counts_only_its_window() -> None:
    from headinfer.host_memory import blocks_for

    assert blocks_for(300, [None], 16) == 19
    # Window 64 at 300 tokens: from position 237, rounded down to 224: 76 tokens, 5 blocks.
    assert blocks_for(300, [64], 16) == 5
    assert blocks_for(10, [64, None], 16) == 2
    model = headinfer.patch(
        tiny_model("mistral"), chunk_size=64, block_size=16, host_memory_limit=100 << 10
    )
    with torch.no_grad():
        out = model(prompt(500))  # 5 blocks per head and layer at most: it fits
    assert out.past_key_values.get_seq_length() == 500
