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
from _tiny import PROMPT_LEN, assert_error_within_torch_own, generate_scores, prompt, rel_err, twin
from _tiny_gpt_oss import tiny_gpt_oss
from transformers import DynamicCache

import headinfer
from headinfer.prefill import cache_kwarg_name

TOL = 1e-4
NEW_TOKENS = 12


@cache
def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = tiny_gpt_oss()
    reference = twin(model)
    return headinfer.patch(model, chunk_size=97, block_size=16), reference


@cache
def _eager_logits() -> torch.Tensor:
    with torch.no_grad():
        return _pair()[1](prompt()).logits


@cache
def _eager_generate() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    out = generate_scores(_pair()[1], NEW_TOKENS)
    return out.sequences, out.scores


def _generate(model: torch.nn.Module, **kw: object):
    return generate_scores(model, NEW_TOKENS, **kw)


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
    with pytest.warns(UserWarning, match="not in headinfer's store"):
        out = _generate(model, **{cache_kwarg_name(model): dynamic})
    sequences, scores = _eager_generate()
    assert torch.equal(out.sequences, sequences)
    assert max(rel_err(g, r) for g, r in zip(out.scores, scores)) < TOL


def test_sinks_are_converted_once_and_follow_the_parameter() -> None:
    model = tiny_gpt_oss(seed=3)
    reference = twin(model)
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
    assert_error_within_torch_own(tiny_gpt_oss(dtype=torch.bfloat16))


@pytest.mark.parametrize("past", [0, 300])
def test_prefill_two_part_merge_adds_the_sink_once(past: int, monkeypatch) -> None:
    # The GPU prefill's merge (prefill_attention._two_part) on the CPU: its fused kernels (cuDNN,
    # efficient; CUDA only) stand in as exact float64 attention returning (out, lse), so only
    # the merge is under test: chunk-over-itself and chunk-over-past by log-sum-exp, the sink
    # one more term of the final denominator (also with no past).
    import headinfer.prefill_attention as pa

    def fused(q, k, v, causal, scale):
        s = (q.double() @ k.double().transpose(-1, -2)) * scale
        if causal:
            keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril(s.shape[-1] - s.shape[-2])
            s = s.masked_fill(~keep, float("-inf"))
        return (s.softmax(-1) @ v.double()).to(q.dtype), torch.logsumexp(s, -1).float()

    monkeypatch.setattr(pa, "_fused", fused)
    g = torch.Generator().manual_seed(past)
    n, grp, c, d = 2, 3, 50, 16
    q = torch.randn(1, n * grp, c, d, generator=g) * 2
    k = torch.randn(n, past + c, d, generator=g) * 2
    v = torch.randn(n, past + c, d, generator=g)
    sinks = torch.randn(n * grp, generator=g) * 3
    kp, vp = (None, None) if past == 0 else (k[:, :past], v[:, :past])
    got = pa._two_part(q, kp, vp, k[:, past:], v[:, past:], d**-0.5, sinks)[0]
    s = q[0].double() @ k.double().repeat_interleave(grp, 0).transpose(1, 2) * d**-0.5
    keep = torch.ones(c, past + c, dtype=torch.bool).tril(past)
    s = torch.cat(
        [s.masked_fill(~keep, float("-inf")), sinks.double()[:, None, None].expand(-1, c, 1)], -1
    )
    want = s.softmax(-1)[..., :-1] @ v.double().repeat_interleave(grp, 0)
    assert rel_err(got, want) < 1e-5
