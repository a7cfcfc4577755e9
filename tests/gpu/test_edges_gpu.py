"""issue 7 B3-B6, B9 on the GPU: what the CPU tests check, where CUDA changes the path (pinned
and device blocks, the store's block table, prefill staging, the planner).

Each test runs under a watchdog (``faulthandler.dump_traceback_later``) that dumps every
thread's stack and exits if it hangs.
"""

from __future__ import annotations

import faulthandler
import gc
from typing import Any

import pytest
import torch
from _tiny import prompt, rel_err, tiny_model, twin

import headinfer
from headinfer import _core
from headinfer.prefill import cache_kwarg_name

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"
TOL = 1e-4


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def _model(family: str, **kw: Any) -> tuple[Any, Any]:
    model = tiny_model(family, **kw).to(DEV)
    reference = twin(model)
    headinfer.patch(model, chunk_size=64, block_size=16)
    return model, reference


@pytest.mark.parametrize("budget", ["resident", "streamed"])
def test_deleted_cache_frees_pinned_and_device_blocks_without_gc(
    no_gc: None, budget: str, request: pytest.FixtureRequest
) -> None:
    if budget == "streamed":
        request.getfixturevalue("kv_on_host")
    model, _ = _model("llama")
    torch.cuda.synchronize()
    _core.release_pinned_pool()
    in_caches = _core.pinned_bytes() - _core.pinned_pool_bytes()
    device = _core.device_block_bytes()
    cache = headinfer.HeadInferCache(model)
    with torch.no_grad():
        out = model(prompt(300).to(DEV), **{cache_kwarg_name(model): cache})
    assert cache.bytes_reserved() > 0
    del cache, out
    torch.cuda.synchronize()
    assert _core.pinned_bytes() - _core.pinned_pool_bytes() == in_caches
    assert _core.device_block_bytes() == device
    with torch.no_grad():
        model.generate(prompt(300).to(DEV), max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    assert _core.pinned_bytes() - _core.pinned_pool_bytes() == in_caches
    assert _core.device_block_bytes() == device


@pytest.mark.parametrize("budget", ["resident", "streamed"])
def test_generate_past_max_positions_as_transformers(
    budget: str, request: pytest.FixtureRequest
) -> None:
    if budget == "streamed":
        request.getfixturevalue("kv_on_host")
    model, reference = _model("llama", max_position_embeddings=40)
    ids = prompt(36).to(DEV)
    got = model.generate(ids, max_new_tokens=12, do_sample=False)
    want = reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert got.shape == (1, 48)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "keep",
    [0, 3, -5, 1000, torch.tensor([5, 100, 299]), torch.tensor([[7, 7, 1]]), torch.tensor([])],
    ids=["0", "3", "-5", "1000", "1d", "2d", "empty"],
)
def test_logits_to_keep_as_transformers(keep, kv_on_host: None) -> None:
    model, reference = _model("gemma2")
    ids = prompt(300).to(DEV)
    if isinstance(keep, torch.Tensor):
        keep = keep.long().to(DEV)
    with torch.no_grad():
        got = model(ids, logits_to_keep=keep).logits
        want = reference(ids, logits_to_keep=keep).logits
    assert got.shape == want.shape
    if want.numel():
        assert rel_err(got, want) < TOL


def test_out_of_range_logits_to_keep_raises_without_a_device_assert(kv_on_host: None) -> None:
    # The unpatched model would index out of bounds on the GPU (a device-side assert that ends
    # the CUDA context); the patched one checks the positions on the host, before any chunk.
    model, reference = _model("llama")
    ids = prompt(300).to(DEV)
    with torch.no_grad(), pytest.raises(IndexError, match="index 300 is out of bounds"):
        model(ids, logits_to_keep=torch.tensor([5, 300], device=DEV))
    with torch.no_grad():
        got = model(ids, logits_to_keep=1).logits
        want = reference(ids, logits_to_keep=1).logits
    assert rel_err(got, want) < TOL


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen2"])
@pytest.mark.parametrize("budget", ["resident", "streamed"])
@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt])
def test_error_in_chunked_prefill(
    family: str, budget: str, exc_type: type, request: pytest.FixtureRequest
) -> None:
    if budget == "streamed":
        request.getfixturevalue("kv_on_host")
    model, reference = _model(family)
    ids = prompt(300).to(DEV)
    cache = headinfer.HeadInferCache(model)
    kw = {cache_kwarg_name(model): cache}
    with torch.no_grad():
        model(ids[:, :100], **kw)
    calls = [0]
    exc = exc_type("injected")

    def hook(*args: Any) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise exc

    handle = model.model.layers[1].register_forward_hook(hook)
    try:
        with torch.no_grad(), pytest.raises(exc_type) as info:
            model(ids[:, 100:292], **kw)
    finally:
        handle.remove()
    assert info.value is exc
    held = cache.get_seq_length()
    assert held == 100  # exact rollback, sliding windows included (KVStore.checkpoint)
    assert all(cache.store.seq_len(i) == held for i in range(cache.spec.num_layers))
    with torch.no_grad():
        got = model(ids[:, held : held + 8], **kw).logits
        want = reference(ids[:, : held + 8]).logits[:, held:]
    assert rel_err(got, want) < TOL


def test_request_larger_than_host_memory_refused_before_any_chunk(kv_on_host: None) -> None:
    # Every KV byte on the host; tiny Llama float32, 16-token blocks: 2 KiB a pair.
    model = headinfer.patch(
        tiny_model("llama").to(DEV),
        chunk_size=64,
        block_size=16,
        host_memory_limit=100 << 10,
    )
    calls = [0]
    model.model.layers[0].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    with torch.no_grad(), pytest.raises(headinfer.OutOfHostMemoryError) as info:
        model(prompt(300).to(DEV))
    assert calls == [0]
    assert info.value.needed == 114 * 2048
    with pytest.raises(headinfer.OutOfHostMemoryError, match="200 tokens"):
        model.generate(prompt(100).to(DEV), max_new_tokens=100, do_sample=False)
    assert calls == [0]


def test_cache_dtype_with_a_config() -> None:
    from _tiny import tiny_config

    cache = headinfer.HeadInferCache(tiny_config("llama"), dtype=torch.bfloat16)
    k = torch.randn(1, 2, 5, 16, device=DEV)
    with pytest.raises(TypeError, match="expected bfloat16"):
        cache.update(k, k, 0)
    cache.update(k.bfloat16(), k.bfloat16(), 0)
    assert cache.store.dtype == "bfloat16" and cache.store.is_cuda
