"""gpt-oss (learned per-head attention sinks), patched, against the same weights with eager.

Each softmax of a gpt-oss attention layer has one more logit, ``module.sinks[h]``, with no
value. The tiny model below has alternating sliding (window 40) and full layers, GQA 4:2, and
sinks large enough to matter; chunked prefill crosses the windows and decode runs the store.
"""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
from _tiny import PROMPT_LEN, VOCAB, prompt, rel_err
from transformers import DynamicCache, GptOssConfig, GptOssForCausalLM

import headinfer
from headinfer.prefill import cache_kwarg_name

TOL = 1e-4
NEW_TOKENS = 12


def tiny_gpt_oss(dtype: torch.dtype = torch.float32, seed: int = 0) -> GptOssForCausalLM:
    """A 3-layer gpt-oss (sliding, full, sliding; 4 q heads over 2 kv heads; 4 experts)."""
    config = GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=40,
        max_position_embeddings=512,
        # gpt-oss's YaRN, its original length scaled down with the model (512 / 32).
        rope_parameters={
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 16,
            "rope_theta": 150000.0,
        },
        attn_implementation="eager",
        # Plain loops over the experts: they also run in float64 (the reference below).
        experts_implementation="eager",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Peaked attention (windows matter) and sinks of the scores' size (they matter).
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            if name.endswith("self_attn.sinks"):
                p.copy_(torch.randn(p.shape) * 2.0)
    return model.to(dtype).eval()


def _twin(model: torch.nn.Module) -> torch.nn.Module:
    return headinfer.unpatch(copy.deepcopy(model))


@cache
def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = tiny_gpt_oss()
    reference = _twin(model)
    return headinfer.patch(model, chunk_size=97, block_size=16), reference


@cache
def _eager_logits() -> torch.Tensor:
    with torch.no_grad():
        return _pair()[1](prompt()).logits


@cache
def _eager_generate() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    out = _pair()[1].generate(
        prompt(),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences, out.scores


def _generate(model: torch.nn.Module, **kw: object):
    return model.generate(
        prompt(),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )


def test_the_tiny_model_is_what_the_tests_need() -> None:
    model, reference = _pair()
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert headinfer.patch(model).__dict__["_headinfer"].spec.windows == (40, None, 40)
    # The sinks change the result: eager with them silenced differs far beyond the tolerance.
    silenced = copy.deepcopy(reference)
    with torch.no_grad():
        for layer in silenced.model.layers:
            layer.self_attn.sinks.fill_(-1e9)
        assert rel_err(silenced(prompt()).logits, _eager_logits()) > 100 * TOL


@pytest.mark.parametrize("chunk_size", [64, 97, 512])
def test_forward_logits_match_eager(chunk_size: int) -> None:
    model, _ = _pair()
    headinfer.patch(model, chunk_size=chunk_size, block_size=16)
    with torch.no_grad():
        out = model(prompt(), logits_to_keep=0)
    assert rel_err(out.logits, _eager_logits()) < TOL
    assert isinstance(out.get(cache_kwarg_name(model)), headinfer.HeadInferCache)


def test_generate_matches_eager() -> None:
    # Chunked prefill, then decode steps through the store, each with the sinks.
    model, _ = _pair()
    headinfer.patch(model, chunk_size=97, block_size=16)
    out = _generate(model)
    sequences, scores = _eager_generate()
    assert torch.equal(out.sequences, sequences)
    assert len(out.scores) == NEW_TOKENS
    for got, ref in zip(out.scores, scores):
        assert rel_err(got, ref) < TOL
    cache = out.get(cache_kwarg_name(model))
    assert cache.get_seq_length() == PROMPT_LEN + NEW_TOKENS - 1


def test_generate_with_dynamic_cache_uses_dense_op() -> None:
    model, _ = _pair()
    headinfer.patch(model, chunk_size=97, block_size=16)
    dynamic = DynamicCache(config=model.config)
    out = _generate(model, **{cache_kwarg_name(model): dynamic})
    sequences, scores = _eager_generate()
    assert torch.equal(out.sequences, sequences)
    assert max(rel_err(g, r) for g, r in zip(out.scores, scores)) < TOL


def test_sinks_are_converted_once_and_follow_the_parameter() -> None:
    model = tiny_gpt_oss(seed=3)
    reference = _twin(model)
    headinfer.patch(model, chunk_size=64, block_size=16)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        model(prompt(100))
        first = attn.__dict__["_headinfer_sinks"][2]
        assert first.dtype == torch.float32 and first.is_contiguous()
        model(prompt(100))
        assert attn.__dict__["_headinfer_sinks"][2] is first  # no conversion per call
        # An in-place change of the parameter (e.g. loading weights) is picked up.
        for m in (model, reference):
            for layer in m.model.layers:
                layer.self_attn.sinks.add_(1.5)
        got = model(prompt(100)).logits
        assert attn.__dict__["_headinfer_sinks"][2] is not first
        assert rel_err(got, reference(prompt(100)).logits) < TOL
    headinfer.unpatch(model)
    assert all("_headinfer_sinks" not in m.__dict__ for m in model.modules())


def test_bfloat16_error_within_torch_own() -> None:
    # As flash-attention's tests do: our error against a float64 run at most twice eager's own.
    model = tiny_gpt_oss(dtype=torch.bfloat16)
    eager = _twin(model)
    exact = _twin(model).to(torch.float64)
    headinfer.patch(model, chunk_size=97, block_size=16)
    ids = prompt()
    with torch.no_grad():
        ref = exact(ids).logits
        ours = rel_err(model(ids).logits, ref)
        theirs = rel_err(eager(ids).logits, ref)
    assert ours <= 2 * theirs + 1e-6
