"""Several GPUs (issue 11): a model whose layers ``device_map`` spreads over two GPUs, and
tensor parallelism over two GPUs under torchrun (nccl); both exact against eager on one GPU.

Skipped with fewer than two GPUs. Each test runs under a watchdog: a hang dumps every thread's
stack and fails the run.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _multi import check_tensor_parallel
from _tiny import prompt, tiny_model

import headinfer

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)

CASES = ("llama", "mistral", "gemma2", "qwen2")


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _split_map(model: torch.nn.Module) -> dict[str, int]:
    # Layers 0-1, the embeddings and the head (tied to them in Gemma-2) on cuda:0; layer 2
    # and the final norm on cuda:1.
    device_map = {f"model.{n}": 0 for n, _ in model.model.named_children() if n != "layers"}
    device_map.update({"model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1})
    device_map.update({"model.norm": 1, "lm_head": 0})
    return device_map


def _spread(model: torch.nn.Module) -> torch.nn.Module:
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=_split_map(model))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("on_host", [False, True], ids=["planned", "kv_on_host"])
def test_device_map_two_gpus_exact(
    case: str, on_host: bool, request: pytest.FixtureRequest
) -> None:
    if on_host:
        request.getfixturevalue("kv_on_host")
    ids = prompt(300)
    reference = tiny_model(case).to("cuda:0")
    with torch.no_grad():
        want = reference(ids.to("cuda:0")).logits.cpu()
        want_tokens = reference.generate(ids.to("cuda:0"), max_new_tokens=8, do_sample=False)
    del reference
    model = _spread(tiny_model(case))
    headinfer.patch(model, chunk_size=64, progress=False)
    try:
        cache = headinfer.HeadInferCache(model)
        kw = {model._headinfer.cache_name: cache}
        with torch.no_grad():
            got = model(ids.to("cuda:0"), use_cache=True, **kw).logits.cpu()
            tokens = model.generate(ids.to("cuda:0"), max_new_tokens=8, do_sample=False)
    finally:
        headinfer.unpatch(model)
    assert [(str(p.device), p.layers) for p in cache.stores] == [
        ("cuda:0", [0, 1]),
        ("cuda:1", [2]),
    ]
    assert all(p.store.is_cuda for p in cache.stores)
    if on_host:
        assert all(p.store.device_bytes_used() == 0 for p in cache.stores)
    assert (got - want).abs().max().item() < 1e-4
    assert torch.equal(tokens.cpu(), want_tokens.cpu())
    figures = cache.memory_by_device()
    assert set(figures) == {"cuda:0", "cuda:1"}
    assert sum(f["used"] for f in figures.values()) == cache.bytes_used()


def test_device_map_budget_per_gpu() -> None:
    model = _spread(tiny_model("llama"))
    free = [torch.cuda.mem_get_info(i)[0] for i in range(2)]
    budget = {0: free[0], "cuda:1": free[1]}
    headinfer.patch(model, chunk_size=64, progress=False, gpu_budget=budget)
    try:
        with torch.no_grad():
            model.generate(prompt(300).to("cuda:0"), max_new_tokens=4, do_sample=False)
        cache = headinfer.HeadInferCache(model)
        kw = {model._headinfer.cache_name: cache}
        with torch.no_grad():
            model(prompt(300).to("cuda:0"), use_cache=True, **kw)
        # Each GPU planned against its own budget, for its own layers.
        plans = [p.plan for p in cache.stores]
        assert all(plan is not None for plan in plans)
        assert [plan.figures["kv_total_bytes"] for plan in plans] == [
            2 * plans[1].figures["kv_total_bytes"],
            plans[1].figures["kv_total_bytes"],
        ]
        # A budget dict without one of the GPUs the layers run on is refused, naming it.
        headinfer.patch(model, chunk_size=64, progress=False, gpu_budget={0: free[0]})
        with pytest.raises(ValueError, match="no budget for cuda:1"):
            model.generate(prompt(300).to("cuda:0"), max_new_tokens=4, do_sample=False)
    finally:
        headinfer.unpatch(model)


def test_tensor_parallel_two_gpus_exact(tmp_path: Path) -> None:
    check_tensor_parallel(tmp_path, ("llama", "qwen2"), nproc=2, cpu=False)
