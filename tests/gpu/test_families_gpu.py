"""Every family on the GPU, patched, against standard attention: prefill and decode, with the
KV fully resident on the GPU, fully streamed from pinned host memory, mixed, and shared with the
CPU, across block, chunk and window boundaries (each case of tests/_tiny.py, incl. the text
towers of two image-text models, and gpt-oss with its sink logits). float32 within 1e-4
of eager; bfloat16 within twice PyTorch's own error against a float64 reference (as
flash-attention's tests judge it)."""

from __future__ import annotations

import faulthandler
import gc

import pytest
import torch
from _tiny import (
    FAMILIES,
    MULTIMODAL,
    float64_twin,
    prompt,
    rel_err,
    tiny_model,
    tiny_multimodal,
    twin,
)

import headinfer
from headinfer import _core
from headinfer.prefill import cache_kwarg_name

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"
STEPS = 8
# Residencies: everything on the GPU; nothing (all KV streamed from the host, staged by the copy
# engine or, "zero-copy", read in place; "shared": with the CPU attending over one kv head's
# host blocks in decode); "mixed": a few blocks on the GPU and the rest on the host, with
# prefill head groups of one. The planner's resident KV is capped in
# `_residency` (a gpu_budget too small for the working set is refused before prefill).
BUDGETS = {"resident": None, "streamed": None, "zero-copy": None, "mixed": None, "shared": None}
#: Resident KV block pairs allowed per residency (None: what the planner gives).
RESIDENT_BLOCKS = {"resident": None, "streamed": 0, "zero-copy": 0, "mixed": 5, "shared": 0}
#: How the GPU reads host blocks per residency: the copy engine's staging, except
#: "zero-copy" (the kernel reads mapped pinned memory in place).
READERS = {"zero-copy": "zero-copy"}


@pytest.fixture(autouse=True)
def _watchdog():
    """A hung stream or kernel dumps every thread's stack and ends the run after 5 minutes."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _residency(request, monkeypatch):
    """For "mixed": cap the planner's resident KV at 5 block pairs and stage one kv head at a
    time, so tests cross residency and head-group boundaries inside one layer."""
    budget = (
        request.node.callspec.params.get("budget") if hasattr(request.node, "callspec") else None
    )
    import headinfer.cache as cache_mod

    monkeypatch.setenv("HEADINFER_HOST_READER", READERS.get(budget, "copy"))
    if budget == "shared":
        # All KV on the host, the CPU attending over one kv head's share during decode (the
        # tests patch with cpu_heads=1 for it), however short the host part is.
        ensure = cache_mod.HeadInferCache._ensure_store

        def short_shares_too(self, dtype, device):
            store = ensure(self, dtype, device)
            store.cpu_share_min_tokens = 0
            return store

        monkeypatch.setattr(cache_mod.HeadInferCache, "_ensure_store", short_shares_too)
    blocks = RESIDENT_BLOCKS.get(budget)
    if blocks is None:
        return

    original = cache_mod.plan_memory

    def capped(*args, **kwargs):
        plan = original(*args, **kwargs)
        spec = args[1]
        block = 2 * 16 * spec.head_dim * torch.empty((), dtype=kwargs["dtype"]).element_size()
        plan.kv_device_bytes = min(plan.kv_device_bytes, blocks * block)
        if budget == "mixed":
            plan.heads_per_group = 1
        return plan

    monkeypatch.setattr(cache_mod, "plan_memory", capped)


def _logits(model, ids, cache=None, **kw):
    """Prefill logits of every position, then STEPS teacher-forced decode steps' logits."""
    name = cache_kwarg_name(model)
    with torch.no_grad():
        n = ids.shape[1] - STEPS
        args = {} if cache is None else {name: cache}
        out = model(ids[:, :n], use_cache=True, **args, **kw)
        cache = out.get(name)
        steps = [out.logits[:, -1]]
        for i in range(n, ids.shape[1] - 1):
            out = model(ids[:, i : i + 1], use_cache=True, **{name: cache})
            cache = out.get(name)
            steps.append(out.logits[:, -1])
    return torch.cat([out_prefill_all(model, ids[:, :n])] + [s[:, None] for s in steps], 1)


def out_prefill_all(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=True).logits


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_float32_matches_eager(family, budget):
    model = tiny_model(family).to(DEV)
    ref = twin(model)
    headinfer.patch(
        model,
        chunk_size=97,
        block_size=16,
        gpu_budget=BUDGETS[budget],
        cpu_heads=1 if budget == "shared" else None,
    )
    ids = prompt().to(DEV)
    got = _logits(model, ids)
    want = _logits(ref, ids)
    assert rel_err(got, want) < 1e-4
    if budget == "mixed":
        cache = headinfer.HeadInferCache(model)
        with torch.no_grad():
            model(ids, use_cache=True, **{cache_kwarg_name(model): cache})
        m = cache.memory()
        assert 0 < m["device_used"] < m["used"], m


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_within_twice_torch_error(family, budget):
    base = tiny_model(family)
    exact = float64_twin(base)  # on the CPU, MoE experts in their plain loop
    std = twin(base).to(DEV, torch.bfloat16)
    model = twin(base).to(DEV, torch.bfloat16)
    headinfer.patch(
        model,
        chunk_size=97,
        block_size=16,
        gpu_budget=BUDGETS[budget],
        cpu_heads=1 if budget == "shared" else None,
    )
    ids = prompt().to(DEV)
    want = _logits(exact, ids.cpu()).to(DEV)
    torch_err = (_logits(std, ids).double() - want).abs().max().item()
    ours = (_logits(model, ids).double() - want).abs().max().item()
    assert ours <= 2 * torch_err + 1e-3, (ours, torch_err)


@pytest.mark.parametrize("budget", ["streamed"])
def test_generate_greedy_matches_and_memory_is_placed(budget):
    base = tiny_model("llama", max_position_embeddings=4096)
    model = twin(base).to(DEV)
    ref = twin(base).to(DEV)
    ids = prompt(1500).to(DEV)
    want = ref.generate(ids, max_new_tokens=20, do_sample=False)
    headinfer.patch(model, chunk_size=512, block_size=64)
    cache = headinfer.HeadInferCache(model)
    name = cache_kwarg_name(model)
    got = model.generate(ids, max_new_tokens=20, do_sample=False, **{name: cache})
    assert torch.equal(got, want)
    mem = cache.memory()
    assert mem["device_used"] == 0 and mem["host_reserved"] > 0  # all streamed


def test_cache_memory_returns_to_start_over_20_cycles():
    model = tiny_model("mistral", max_position_embeddings=4096).to(DEV)
    headinfer.patch(model, chunk_size=256, block_size=64)
    ids = prompt(900).to(DEV)
    name = cache_kwarg_name(model)
    seen = []
    for _ in range(20):
        cache = headinfer.HeadInferCache(model)
        with torch.no_grad():
            model(ids, use_cache=True, **{name: cache})
        assert cache.memory()["device_reserved"] > 0
        del cache
        gc.collect()
        torch.cuda.synchronize()
        seen.append(
            (_core.device_block_bytes(), torch.cuda.memory_allocated(), _core.pinned_bytes())
        )
    assert all(dev == 0 for dev, _, _ in seen), "device blocks are freed with the cache"
    assert len(set(seen[1:])) == 1, f"memory grows over cycles: {seen}"


@pytest.mark.parametrize("budget", ["resident", "streamed"])
@pytest.mark.parametrize("name", MULTIMODAL)
def test_multimodal_text_prompt_float32_matches_eager(name, budget):
    model = tiny_multimodal(name).to(DEV)
    ref = twin(model)
    headinfer.patch(model, chunk_size=97, block_size=16, gpu_budget=BUDGETS[budget])
    ids = prompt().to(DEV)
    assert rel_err(_logits(model, ids), _logits(ref, ids)) < 1e-4


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_gpt_oss_float32_matches_eager(budget):
    model = tiny_model("gpt_oss").to(DEV)
    ref = twin(model)
    headinfer.patch(
        model,
        chunk_size=97,
        block_size=16,
        gpu_budget=BUDGETS[budget],
        cpu_heads=1 if budget == "shared" else None,
    )
    ids = prompt().to(DEV)
    assert rel_err(_logits(model, ids), _logits(ref, ids)) < 1e-4
