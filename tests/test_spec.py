"""headinfer.spec: every family's attention read from its config and its modules, and the
reasons given for the architectures headinfer cannot run."""

from __future__ import annotations

import pytest
import torch
import transformers
from _tiny import CASES, FAMILIES, MULTIMODAL, have, prompt, tiny_config, tiny_model
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import headinfer
from headinfer.attention import headinfer_attention
from headinfer.prefill import cache_kwarg_name
from headinfer.spec import attention_modules, family_info, model_spec


@pytest.mark.parametrize("case", list(CASES))
def test_modules_agree_with_config(case: str) -> None:
    model = tiny_model(case)
    spec = model_spec(model)
    assert spec == model_spec(model.config)
    modules = attention_modules(model)
    assert [m.layer_idx for m in modules] == list(range(spec.num_layers))
    for m, window in zip(modules, spec.windows):
        assert m.scaling == pytest.approx(spec.scale, rel=1e-12)
        # Where the module keeps the window it passes, it is the spec's.
        if getattr(m, "sliding_window", "absent") != "absent" and case not in ("exaone4",):
            assert m.sliding_window == window, (m.layer_idx, m.sliding_window, window)


def test_every_supported_family_has_an_exactness_test() -> None:
    tested = {model_spec(tiny_config(c)).family for c in FAMILIES if have(c)}
    assert set(headinfer.SUPPORTED_FAMILIES) == tested | {"qwen2_vl"}
    assert "qwen2_vl" in MULTIMODAL
    assert "gpt_oss" in headinfer.SUPPORTED_FAMILIES


@pytest.mark.parametrize(
    ("case", "windows"),
    [
        ("llama", (None, None, None)),
        ("mistral", (64, 64, 64)),  # every layer, whatever layer_types would say
        ("mixtral", (64, 64, 64)),
        ("qwen3_moe", (64, 64, 64)),
        ("phi3", (64, 64, 64)),
        ("qwen2", (None, 48, 48)),
        ("qwen3", (None, 48, 48)),
        ("gemma2", (40, None, 40)),
        ("gemma3", (40, None, 40)),
        ("olmo3", (48, None, 48)),
        ("cohere2", (48, None, 48)),
        ("ministral", (48, None, 48)),
        ("exaone4", (48, None, 48)),
        ("smollm3", (None, 48, None)),  # sliding where no RoPE and use_sliding_window
        ("gpt_oss", (32, None, 32)),
    ],
)
def test_per_layer_windows(case: str, windows: tuple) -> None:
    if not have(case):
        pytest.skip(f"transformers {transformers.__version__} lacks {case}")
    assert model_spec(tiny_config(case)).windows == windows


def test_scale_and_softcap_from_the_config() -> None:
    assert model_spec(tiny_config("gemma2")).scale == 24**-0.5
    assert model_spec(tiny_config("gemma2")).softcap == 5.0
    assert model_spec(tiny_config("gemma3")).softcap is None  # Gemma-3 passes no softcap
    assert model_spec(tiny_config("granite")).scale == 0.2
    nemo = model_spec(tiny_config("mistral_nemo"))
    assert nemo.head_dim == 32 and nemo.scale == 32**-0.5


def _config(model_type: str, **kw: object):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    return CONFIG_MAPPING[model_type](**kw)


@pytest.mark.parametrize(
    ("model_type", "kwargs", "why"),
    [
        ("deepseek_v3", {}, "multi-head latent attention"),
        ("deepseek_v2", {}, "multi-head latent attention"),
        ("qwen3_next", {}, "linear-attention or state-space"),
        ("jamba", {}, "linear-attention or state-space"),
        ("falcon_h1", {}, "state-space"),
        ("mamba", {}, "state-space"),
        ("t5", {}, "encoder-decoder"),
        ("bart", {}, "encoder-decoder"),
        ("mllama", {}, "cross-attention"),
        ("llama4_text", {}, "chunked attention"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional"),
        ("qwen2_moe", {"use_sliding_window": True, "max_window_layers": 1}, "ignores the window"),
        ("gpt2", {}, "model_type 'gpt2'"),
    ],
)
def test_unsupported_architectures_say_why(model_type: str, kwargs: dict, why: str) -> None:
    config = _config(model_type, **kwargs)
    with pytest.raises(headinfer.UnsupportedModelError, match=why) as info:
        model_spec(config)
    # ... and what is supported.
    assert "supported families: llama" in str(info.value)


def test_modules_that_disagree_with_the_config_are_refused() -> None:
    model = tiny_model("llama")
    model.config.num_key_value_heads = 4  # the k_proj still projects 2 heads
    with pytest.raises(headinfer.UnsupportedModelError, match="projects 2 kv heads"):
        headinfer.patch(model)
    assert not headinfer.is_patched(model)


def test_family_info_names() -> None:
    assert family_info("gemma3").model_type == "gemma3_text"
    assert family_info("gpt_oss").sinks
    with pytest.raises(headinfer.UnsupportedModelError, match="bert"):
        family_info("bert")


def test_attention_refuses_non_causal_calls() -> None:
    model = tiny_model("gpt_oss")
    module = attention_modules(model)[0]
    q = torch.randn(1, 4, 5, 16)
    k = v = torch.randn(1, 2, 5, 16)
    with pytest.raises(headinfer.HeadInferError, match="causal"):
        headinfer_attention(module, q, k, v, None, is_causal=False)


def test_window_the_model_passes_must_be_the_stores() -> None:
    # Mistral's attention reads config.sliding_window at run time: changed after the cache was
    # made, it no longer matches what the store keeps, which must raise, not run.
    model = headinfer.patch(tiny_model("mistral"), chunk_size=97, block_size=16)
    cache = headinfer.HeadInferCache(model)
    model.config.sliding_window = 32
    with pytest.raises(headinfer.HeadInferError, match="sliding_window=32"), torch.no_grad():
        model(prompt(100), **{cache_kwarg_name(model): cache})
    assert cache.get_seq_length() == 0


def test_readme_table_lists_every_supported_family() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = {line.split("`")[1] for line in rows}
    assert named == set(headinfer.SUPPORTED_FAMILIES)
