"""headinfer.plan: parameter counts from configs, the planner shared with the runtime, floors."""

from __future__ import annotations

import pytest
import torch
from _tiny import CASES, MULTIMODAL, have, tiny_config, tiny_model, tiny_multimodal

import headinfer
from headinfer import planner
from headinfer.floor_rates import Rates
from headinfer.kv_dtype import kv_token_bytes
from headinfer.plan import (
    attention_flops,
    longest_context,
    longest_figures,
    make_plan,
    parameter_count,
    parse_dtype,
)
from headinfer.plan_report import render_plan
from headinfer.spec import model_spec

VARIANTS = (
    {"tie_word_embeddings": True},
    {"tie_word_embeddings": False},
    {"attention_bias": True},
    {"mlp_bias": True},
    {"head_dim": 32},  # head_dim * heads != hidden_size
)
#: Every family as tested, both embedding tyings, and the other variants on Llama and Gemma-2.
COUNTED = (
    [(case, {}) for case in CASES]
    + [(case, {"tie_word_embeddings": not tiny_config(case).tie_word_embeddings}) for case in CASES]
    + [(case, o) for case in ("llama", "gemma2") for o in VARIANTS]
)


@pytest.mark.parametrize(
    ("family", "overrides"), COUNTED, ids=lambda o: ",".join(o) if isinstance(o, dict) else o
)
def test_parameter_count_matches_the_real_model(family: str, overrides: dict) -> None:
    # MoE experts, shared experts, sinks, q/k norms, fused projections, tied embeddings.
    if not have(family):
        pytest.skip(f"transformers has no {family} model")
    model = tiny_model(family, **overrides)
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MULTIMODAL)
def test_parameter_count_of_a_multimodal_wrapper(name: str) -> None:
    model = tiny_multimodal(name)
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", list(CASES))
def test_plan_works_for_every_family_from_its_config(family: str) -> None:
    if not have(family):
        pytest.skip(f"transformers has no {family} model")
    config = tiny_config(family)
    plan = make_plan(config, context=1000, gpu_budget=1 << 30, chunk_size=64)
    spec = model_spec(config)
    assert plan["family"] == spec.family and plan["windows"] == list(spec.windows)
    assert plan["params"] == parameter_count(config) > 0
    assert "KV total" in render_plan(plan)


def test_parameter_count_rejects_other_families() -> None:
    from transformers import GPT2Config

    with pytest.raises(headinfer.UnsupportedModelError, match="gpt2"):
        parameter_count(GPT2Config())


def test_parse_dtype() -> None:
    assert parse_dtype("bf16") == parse_dtype("BFloat16") == "bfloat16"
    assert parse_dtype("fp16") == "float16"
    assert parse_dtype("f32") == "float32"
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        parse_dtype("int8")


def test_attention_flops_full_and_window() -> None:
    llama = model_spec(tiny_config("llama"))
    s = 300
    assert attention_flops(llama, s) == 2 * 3 * 4 * 16 * s * s
    qwen2 = model_spec(tiny_config("qwen2"))  # layer 0 full, layers 1-2 a 48-token window
    w = 48
    assert attention_flops(qwen2, s) == 2 * 4 * 16 * s * s + 2 * 4 * 4 * 16 * (s * w - w * w / 2)
    # A window longer than the context is full attention.
    assert attention_flops(qwen2, 40) == attention_flops(llama, 40)


def test_make_plan_figures_and_floors() -> None:
    config = tiny_config("mistral")
    rates = Rates(sdpa_tflops=100, matmul_tflops=200, h2d_gbs=10)
    budget = 4 << 30
    plan = make_plan(
        config, context=400, gpu_budget=budget, chunk_size=64, dtype="fp16", rates=rates
    )
    spec = model_spec(config)
    params = parameter_count(config)
    assert plan["params"] == params and plan["weight_bytes"] == 2 * params
    per_token_layer = 2 * 2 * 16 * 2
    assert plan["kv_bytes_per_token_layer"] == per_token_layer
    # Every Mistral layer slides (window 64): it holds at most window + chunk tokens.
    assert plan["kv_total_bytes"] == 3 * min(400, 64 + 64) * per_token_layer
    for phase in ("prefill", "decode"):
        p = plan[phase]
        assert p["kv_device_bytes"] + p["kv_host_bytes"] == p["kv_total_bytes"]
        parts = (
            "context_bytes",
            "weight_bytes",
            "activation_bytes",
            "staging_bytes",
            "margin_bytes",
        )
        assert p["gpu_bytes"] == sum(p[k] for k in parts) + p["kv_device_bytes"]
        assert p["gpu_bytes"] <= budget
    # Decode stages no prefill head groups, only the copy engine's fixed ring (3 x 32 MiB).
    assert plan["decode"]["staging_bytes"] == 96 << 20
    f = plan["floors"]
    assert f["prefill_attention_flops"] == attention_flops(spec, 400)
    assert f["prefill_linear_flops"] == 2 * params * 400
    want = f["prefill_attention_flops"] / 100e12 + f["prefill_linear_flops"] / 200e12
    assert f["prefill_s"] == pytest.approx(want)
    assert f["decode_s_per_token"] == plan["decode"]["kv_host_bytes"] / 10e9


def test_tight_budget_puts_kv_on_the_host_and_says_so() -> None:
    config = tiny_config("llama")
    plan = make_plan(config, context=500, gpu_budget=1 << 20, chunk_size=64, dtype="fp32")
    assert not plan["prefill"]["fits_gpu"]
    assert plan["prefill"]["kv_host_bytes"] == plan["kv_total_bytes"] > 0
    assert plan["floors"]["decode_s_per_token"] > 0
    text = render_plan(plan)
    assert "fits the budget: NO" in text and "raise --gpu-budget" in text
    assert "read over PCIe per token" in text


def test_render_plan_lists_every_place() -> None:
    plan = make_plan(tiny_config("gemma2"), context=300, gpu_budget=4 << 30, label="tiny")
    text = render_plan(plan)
    for row in (
        "weights",
        "activations",
        "staging",
        "margin",
        "resident KV",
        "host KV",
        "KV total",
        "floors",
        "prefill",
        "decode",
    ):
        assert row in text
    assert "tiny (gemma2)" in text and "with a 40-token window" in text


@pytest.mark.parametrize("kv_dtype", ["exact", "int8"])
def test_runtime_and_plan_share_the_planner(monkeypatch: pytest.MonkeyPatch, kv_dtype: str) -> None:
    # plan_memory (the CUDA cache's) and make_plan (headinfer plan) give the same split when
    # the weights torch holds are the weights the config implies. Fake the CUDA queries.
    config = tiny_config("qwen2")
    weights = parameter_count(config) * 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: weights)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: weights)
    spec = model_spec(config)
    kw = {"context": 450, "chunk_size": 128, "kv_dtype": kv_dtype}
    roomy = make_plan(config, gpu_budget=1 << 40, **kw)["prefill"]
    # A budget with room for half the KV beside the prefill's fixed part: some on each side.
    budget = roomy["gpu_bytes"] - roomy["kv_total_bytes"] // 2
    planned = make_plan(config, gpu_budget=budget, **kw)
    assert 0 < planned["prefill"]["kv_device_bytes"] < planned["kv_total_bytes"]
    for prefill in (True, False):
        runtime = planner.plan_memory(
            config,
            spec,
            device=torch.device("cuda"),
            dtype=torch.bfloat16,
            context=450,
            chunk_size=128,
            gpu_budget=budget,
            prefill=prefill,
            kv_dtype=kv_dtype,
        )
        phase = planned["prefill" if prefill else "decode"]
        assert {k: phase[k] for k in runtime.figures} == runtime.figures


def test_int8_plan_counts_int8_bytes() -> None:
    # The same plan but for the KV's bytes: weights, working set, staging (the prefill
    # stages the past dequantized, in the model's dtype) and margin are the exact plan's.
    config = tiny_config("mistral")
    spec = model_spec(config)
    kw = {"context": 400, "chunk_size": 64, "dtype": "bf16"}
    roomy = make_plan(config, gpu_budget=4 << 30, **kw)
    # Room for half the exact KV: the int8 KV has the same room and puts less on the host.
    budget = roomy["prefill"]["gpu_bytes"] - roomy["kv_total_bytes"] // 2
    exact = make_plan(config, gpu_budget=budget, **kw)
    int8 = make_plan(config, gpu_budget=budget, kv_dtype="int8", **kw)
    assert (exact["kv_dtype"], int8["kv_dtype"]) == ("exact", "int8")
    per_token = kv_token_bytes(spec.num_kv_heads, spec.head_dim, "bfloat16", "int8")
    assert int8["kv_bytes_per_token_layer"] == per_token < exact["kv_bytes_per_token_layer"]
    ratio = (int8["kv_bytes_per_token_layer"], exact["kv_bytes_per_token_layer"])
    assert int8["kv_total_bytes"] * ratio[1] == exact["kv_total_bytes"] * ratio[0]
    for phase in ("prefill", "decode"):
        e, q = exact[phase], int8[phase]
        for key in ("weight_bytes", "activation_bytes", "staging_bytes", "margin_bytes"):
            assert e[key] == q[key], (phase, key)
        assert e["fits_gpu"] == q["fits_gpu"] and e["heads_per_group"] == q["heads_per_group"]
        assert q["kv_device_bytes"] + q["kv_host_bytes"] == q["kv_total_bytes"]
        assert q["gpu_bytes"] <= budget
    p_exact, p_int8 = exact["prefill"], int8["prefill"]
    assert p_exact["kv_host_bytes"] > 0 and p_int8["kv_device_bytes"] == p_exact["kv_device_bytes"]
    assert p_int8["kv_host_bytes"] < p_exact["kv_host_bytes"]
    text = render_plan(int8)
    assert "bfloat16, int8 KV" in text and "int8 with its scales" in text
    assert "int8" not in render_plan(exact)
    with pytest.raises(ValueError, match="^kv_dtype: "):
        make_plan(config, gpu_budget=budget, kv_dtype="fp8", **kw)


def test_longest_context_per_kv_dtype() -> None:
    config = tiny_config("llama")
    kw = {"gpu_budget": 4 << 30, "chunk_size": 64, "dtype": "bfloat16"}
    host = 64 << 20
    exact = longest_context(config, host_bytes=host, **kw)
    int8 = longest_context(config, host_bytes=host, kv_dtype="int8", **kw)
    assert exact is not None and int8 is not None
    # The tiny Llama's rows of 16 values: 32 bytes in bf16, 24 in int8 (values, a scale,
    # padding to 8 bytes). At most 32/24 times as many tokens: the prefill's staging (the past
    # dequantized, in bf16) grows with the context and leaves less room for KV on the GPU.
    assert exact < int8 <= exact * 32 / 24
    for kv_dtype, n in (("exact", exact), ("int8", int8)):
        fits = make_plan(config, context=n, kv_dtype=kv_dtype, **kw)["host_kv_bytes"]
        over = make_plan(config, context=n + 1, kv_dtype=kv_dtype, **kw)["host_kv_bytes"]
        assert fits <= host < over, kv_dtype
    plan = make_plan(config, context=1000, **kw)
    longest = longest_figures(config, plan, host, kv_dtypes=("exact", "int8"))
    assert longest["kv_dtype"] == "exact" and longest["with_host"] == exact
    assert longest["by_kv_dtype"]["int8"]["with_host"] == int8
    resident = longest["by_kv_dtype"]["int8"]["resident"]
    assert resident == longest_context(config, resident=True, kv_dtype="int8", **kw)
    assert resident > longest["resident"]
