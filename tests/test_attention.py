"""The registered attention function: layout, registration, both paths, kwargs delivery."""

from __future__ import annotations

import pytest
import torch
from _tiny import FAMILIES, prompt, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

import headinfer
from headinfer.attention import CACHE_KWARG, headinfer_attention, headinfer_mask, register


def test_registered_under_headinfer() -> None:
    register()
    assert AttentionInterface()["headinfer"] is headinfer_attention
    assert AttentionMaskInterface()["headinfer"] is headinfer_mask
    assert headinfer_mask(batch_size=1, q_length=3, kv_length=3) is None


class _Module(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.layer_idx = 0


@pytest.mark.parametrize("q_len,kv_len", [(1, 17), (9, 9), (5, 40)])
def test_dense_path_matches_eager(q_len: int, kv_len: int) -> None:
    g = torch.Generator().manual_seed(q_len)
    # q/k/v as the models make them: [B, L, H, D] projections seen as [B, H, L, D].
    q = torch.randn(1, q_len, 6, 16, generator=g).transpose(1, 2)
    k = torch.randn(1, kv_len, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(1, kv_len, 2, 16, generator=g).transpose(1, 2)
    module = _Module(3)
    out, weights = headinfer_attention(module, q, k, v, None, scaling=0.3)
    assert weights is None
    assert out.shape == (1, q_len, 6, 16)
    causal = torch.full((q_len, kv_len), float("-inf")).triu(kv_len - q_len + 1)
    ref, _ = eager_attention_forward(module, q, k, v, causal[None, None], scaling=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_store_path_writes_layout_and_consumes_chunk() -> None:
    model = tiny_model("llama")
    cache = headinfer.HeadInferCache(model, block_size=16)
    k = torch.randn(1, 2, 7, 16)
    v = torch.randn(1, 2, 7, 16)
    q = torch.randn(1, 4, 7, 16)
    module = model.model.layers[1].self_attn
    with cache.bound():
        returned = cache.update(k, v, 1)
        assert returned[0] is k  # bound: nothing read back
        out, _ = headinfer_attention(module, q, k, v, None, scaling=0.25, **{CACHE_KWARG: cache})
    dense, _ = headinfer_attention(module, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out, dense)


def test_unconsumed_append_is_caught_and_rolled_back() -> None:
    cache = headinfer.HeadInferCache(tiny_model("llama"), block_size=16)
    k = torch.randn(1, 2, 7, 16)
    unconsumed = pytest.raises(headinfer.HeadInferError, match="did not run through headinfer")
    with unconsumed, cache.bound():
        cache.update(k, k, 0)
    assert cache.get_seq_length() == 0


def test_wrong_cache_object_in_kwarg() -> None:
    q = torch.randn(1, 4, 1, 16)
    kv = torch.randn(1, 2, 1, 16)
    with pytest.raises(TypeError, match=CACHE_KWARG):
        headinfer_attention(_Module(2), q, kv, kv, None, **{CACHE_KWARG: object()})


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_reaches_attention_in_every_family(family: str) -> None:
    # The patched forward's keyword reaches the attention function of every layer.
    model = headinfer.patch(tiny_model(family), chunk_size=64, block_size=16)
    seen: list[int] = []
    original = AttentionInterface._global_mapping["headinfer"]

    def spy(module: torch.nn.Module, *args: object, **kwargs: object) -> object:
        assert isinstance(kwargs.get(CACHE_KWARG), headinfer.HeadInferCache)
        seen.append(module.layer_idx)
        return original(module, *args, **kwargs)

    AttentionInterface.register("headinfer", spy)
    try:
        with torch.no_grad():
            model(prompt(10))
    finally:
        register()
    assert seen == [0, 1, 2]


def test_out_is_written_through_strided_view() -> None:
    # The [H, L, D] view of the [B, L, H, D] output must be filled in place: every value
    # written (torch.empty may hold anything), and each where eager attention puts it.
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 5, 16, generator=g)
    k = torch.randn(1, 2, 5, 16, generator=g)
    v = torch.randn(1, 2, 5, 16, generator=g)
    module = _Module(2)
    out, _ = headinfer_attention(module, q, k, v, None, scaling=0.25)
    assert out.is_contiguous() and out.shape == (1, 5, 4, 16)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    ref, _ = eager_attention_forward(module, q, k, v, causal[None, None], scaling=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
