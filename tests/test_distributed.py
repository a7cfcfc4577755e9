"""headinfer.distributed: several GPUs' worth of logic that runs on the CPU.

- Tensor parallelism for real: two processes (torchrun, gloo) load a tiny model with
  transformers' ``tp_plan="auto"``, each rank's cache holds its own kv head, and logits and greedy
  tokens equal one unpatched eager process.
- The cache over several stores (what a ``device_map`` over GPUs gives), run here with both
  stores on the CPU: the store machinery, exact against eager (the devices themselves are
  tested in tests/gpu/test_multi_gpu.py).
- The pure parts: layer grouping, per-GPU budgets, TP plan matching, rank shares.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _multi import check_tensor_parallel
from _tiny import prompt, tiny_config, tiny_model

import headinfer
import headinfer.cache as cache_mod
from headinfer.distributed import (
    _style,
    budget_for,
    check_gpu_budget,
    group_layers,
    local_world_size,
    rank_threads,
    tp_split,
)
from headinfer.errors import UnsupportedModelError
from headinfer.spec import attention_modules, model_spec, rank_spec

#: The families of the two-process test: full attention, and sliding windows with biases.
TP_CASES = ("llama", "qwen2")


def test_tensor_parallel_two_ranks_exact(tmp_path: Path) -> None:
    check_tensor_parallel(tmp_path, TP_CASES, nproc=2, cpu=True)


def _two_stores(devices):
    # Two stores on the CPU: layer 0 and 1 in one, the rest in the other.
    return [(torch.device("cpu"), [0, 1]), (torch.device("cpu"), list(range(2, len(devices))))]


@pytest.mark.parametrize("case", ["llama", "mistral", "gemma2"])
def test_cache_over_two_stores_exact(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(case)
    ids = prompt(300)
    with torch.no_grad():
        want = model(ids).logits
        want_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    monkeypatch.setattr(cache_mod, "group_layers", _two_stores)
    headinfer.patch(model, chunk_size=64, block_size=16, progress=False)
    try:
        cache = headinfer.HeadInferCache(model)
        with torch.no_grad():
            got = model(ids, use_cache=True, **{model._headinfer.cache_name: cache}).logits
            tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    finally:
        headinfer.unpatch(model)
    assert [p.layers for p in cache.stores] == [[0, 1], [2]]
    assert [p.store.num_layers for p in cache.stores] == [2, 1]
    assert (got - want).abs().max().item() < 1e-4
    assert torch.equal(tokens, want_tokens)
    assert cache.get_seq_length(2) == 300
    assert set(cache.memory_by_device()) == {"cpu"}  # both stores on the one device
    assert cache.bytes_used() == sum(p.store.bytes_used() for p in cache.stores)
    with pytest.raises(headinfer.HeadInferError, match="one store per device"):
        _ = cache.store
    held = [p.store.seq_len(i) for p in cache.stores for i in range(len(p.layers))]
    if case != "llama":
        # A window already dropped what 100 needs: refused, and no store cropped.
        with pytest.raises(ValueError, match="cannot crop to 100"):
            cache.crop(100)
        assert held == [p.store.seq_len(i) for p in cache.stores for i in range(len(p.layers))]
    cache.crop(290 if case != "llama" else 100)
    want_len = 290 if case != "llama" else 100
    assert all(p.store.seq_len(i) == want_len for p in cache.stores for i in range(len(p.layers)))
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.get_seq_length(2) == 0


def test_two_stores_roll_back_together(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    monkeypatch.setattr(cache_mod, "group_layers", _two_stores)
    headinfer.patch(model, chunk_size=64, block_size=16, progress=False)
    cache = headinfer.HeadInferCache(model)
    kw = {model._headinfer.cache_name: cache}
    with torch.no_grad():
        model(prompt(100), use_cache=True, **kw)
        layer = attention_modules(model)[2]
        original = layer.forward

        def fail(*args, **kwargs):
            raise RuntimeError("boom in the last layer")

        layer.forward = fail
        with pytest.raises(RuntimeError, match="boom"):
            model(prompt(150)[:, 100:], use_cache=True, **kw)
        layer.forward = original
    headinfer.unpatch(model)
    # The chunks that ran through the first store's layers were undone there too.
    assert [p.store.seq_len(i) for p in cache.stores for i in range(len(p.layers))] == [100] * 3


def test_group_layers_keeps_first_appearance_order() -> None:
    cpu, a, b = torch.device("cpu"), torch.device("cuda", 1), torch.device("cuda", 0)
    assert group_layers([cpu] * 3) == [(cpu, [0, 1, 2])]
    assert group_layers([a, a, b, b, a]) == [(a, [0, 1, 4]), (b, [2, 3])]


def test_gpu_budget_per_device() -> None:
    assert check_gpu_budget(None) is None
    assert check_gpu_budget("1GiB") == 1 << 30
    budgets = check_gpu_budget({0: "1GiB", "cuda:1": 2 << 30, torch.device("cuda", 2): "1MiB"})
    assert budgets == {0: 1 << 30, 1: 2 << 30, 2: 1 << 20}
    assert budget_for(budgets, torch.device("cuda", 1)) == 2 << 30
    assert budget_for(5, torch.device("cuda", 3)) == 5
    with pytest.raises(ValueError, match=r"gpu_budget: no budget for cuda:3.*cuda:0, cuda:1"):
        budget_for(budgets, torch.device("cuda", 3))
    with pytest.raises(ValueError, match="given twice"):
        check_gpu_budget({0: 1, "cuda:0": 2})
    with pytest.raises(ValueError, match="cuda:N"):
        check_gpu_budget({"cpu": 1})
    with pytest.raises(TypeError, match="gpu_budget"):
        check_gpu_budget({1.5: 1})
    with pytest.raises(ValueError, match="gpu_budget"):
        check_gpu_budget({0: "lots"})
    with pytest.raises(ValueError, match="gpu_budget"):
        headinfer.patch(tiny_model("llama"), gpu_budget={"cpu": 1})


def test_tp_plan_styles_match_layer_patterns() -> None:
    plan = {
        "model.layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.qkv_proj": "colwise_gather_output",
    }
    assert _style(plan, "model.layers.12.self_attn.k_proj") == "colwise"
    assert _style(plan, "model.language_model.layers.0.self_attn.qkv_proj") == (
        "colwise_gather_output"
    )
    assert _style(plan, "model.layers.1.self_attn.q_proj") is None


def test_rank_spec_splits_heads_evenly_or_refuses() -> None:
    spec = model_spec(tiny_config("llama"))
    half = rank_spec(spec, 2)
    assert (half.num_q_heads, half.num_kv_heads, half.tp_size) == (2, 1, 2)
    assert rank_spec(spec, 1) is spec
    with pytest.raises(UnsupportedModelError, match="cannot be split evenly over 4"):
        rank_spec(spec, 4)


def test_tp_split_of_models_without_tp() -> None:
    model = tiny_model("llama")
    assert tp_split(model, attention_modules(model)) == (1, None)
    assert model_spec(model).tp_size == 1


def test_tp_split_refuses_local_shards_that_disagree_with_the_plan() -> None:
    # The plan says colwise over 2 ranks, but the weights are whole: not a split headinfer
    # can hold (it would size the cache for the wrong heads).
    model = tiny_model("llama")
    model._tp_size = 2
    model._tp_plan = {"model.layers.*.self_attn." + p: "colwise" for p in ("q_proj", "k_proj")}
    model._tp_plan["model.layers.*.self_attn.v_proj"] = "colwise"
    split, why = tp_split(model, attention_modules(model))
    assert split == 1 and "q_proj holds 64 of 64 output rows" in why
    with pytest.raises(UnsupportedModelError, match="output rows"):
        model_spec(model)
    # A plan that gathers the projections' outputs leaves every head on every rank.
    model._tp_plan = {k: "colwise_gather_output" for k in model._tp_plan}
    assert tp_split(model, attention_modules(model)) == (1, None)


def test_local_world_size_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert local_world_size() == 2
    cores = len(os.sched_getaffinity(0))
    assert rank_threads() == max(cores // 2, 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert local_world_size() == 1
