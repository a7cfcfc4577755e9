"""headinfer.kv_dtype: the names, the bytes per token the planners count, and the int8 format
as the store holds it (against the torch reference in ``_int8``)."""

from __future__ import annotations

import math

import pytest
import torch
from _int8 import quantize_dequantize
from _tiny import prompt, tiny_model

import headinfer
from headinfer import _core
from headinfer.kv_dtype import check_kv_dtype, kv_row_bytes, kv_token_bytes, store_kv_dtype

ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}


@pytest.mark.parametrize(
    ("value", "checked"), [(None, "exact"), ("exact", "exact"), ("int8", "int8"), (" INT8", "int8")]
)
def test_check_kv_dtype(value: str | None, checked: str) -> None:
    assert check_kv_dtype(value) == checked


@pytest.mark.parametrize(
    ("value", "error"), [("fp8", ValueError), ("bfloat16", ValueError), (8, TypeError)]
)
def test_check_kv_dtype_names_the_argument(value: object, error: type) -> None:
    with pytest.raises(error, match=r"^kv_dtype: .*'exact'.*'int8'"):
        check_kv_dtype(value)


def test_store_argument() -> None:
    assert store_kv_dtype("exact") is None
    assert store_kv_dtype("int8") == "int8"


@pytest.mark.parametrize("dtype", list(ELEM))
@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 80, 96, 128, 256])
def test_row_bytes(dtype: str, head_dim: int) -> None:
    assert kv_row_bytes(head_dim, dtype) == head_dim * ELEM[dtype]
    assert kv_row_bytes(head_dim, dtype, dtype) == head_dim * ELEM[dtype]  # a store's name
    # int8: the values, a bf16 scale per group of gcd(head_dim, 32), padded to 8 bytes.
    values_and_scales = head_dim + 2 * head_dim // math.gcd(head_dim, 32)
    int8 = kv_row_bytes(head_dim, dtype, "int8")
    assert values_and_scales <= int8 < values_and_scales + 8 and int8 % 8 == 0
    assert int8 < head_dim * ELEM[dtype]
    assert kv_token_bytes(3, head_dim, dtype, "int8") == 2 * 3 * int8


def test_row_bytes_of_llama_3_8b() -> None:
    # 32 layers x 8 kv heads of 128: 128 KiB per token in bf16, 68 KiB in int8 (53%).
    assert 32 * kv_token_bytes(8, 128, "bfloat16") == 131_072
    assert 32 * kv_token_bytes(8, 128, "bfloat16", "int8") == 69_632


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 48, 64, 128])
def test_store_reads_back_the_reference_format(dtype: torch.dtype, head_dim: int) -> None:
    # What the store holds is what tests/_int8.py computes, bit for bit; the bytes it holds
    # are kv_row_bytes' (what the planners and the host memory check count).
    name = str(dtype).removeprefix("torch.")
    store = _core.KVStore(1, 3, head_dim, name, block_size=16, kv_dtype="int8")
    g = torch.Generator().manual_seed(head_dim)
    k = torch.randn(3, 40, head_dim, generator=g).to(dtype)
    v = torch.randn(3, 40, head_dim, generator=g).to(dtype)
    k[0, 5] = 0.0  # a zero row
    k[1, 7, 3] = 300.0  # an outlier: its group's scale follows it, the other groups keep theirs
    store.append(0, k, v)
    kk, vv = torch.empty_like(k), torch.empty_like(v)
    store.read(0, 0, 40, kk, vv)
    assert torch.equal(kk, quantize_dequantize(k))
    assert torch.equal(vv, quantize_dequantize(v))
    assert store.bytes_used() == 40 * kv_token_bytes(3, head_dim, name, "int8")


def test_cache_holds_its_kv_dtype() -> None:
    model = headinfer.patch(tiny_model("llama"), chunk_size=97, block_size=16, kv_dtype="int8")
    assert model._headinfer.kv_dtype == "int8"
    cache = headinfer.HeadInferCache(model)  # patch()'s
    assert cache.kv_dtype == "int8"
    with torch.no_grad():
        model(prompt(), **{_cache_name(model): cache})
    assert cache.store.kv_dtype == "int8"
    spec = cache.spec
    per_token = spec.num_layers * kv_token_bytes(
        spec.num_kv_heads, spec.head_dim, "float32", "int8"
    )
    assert cache.bytes_used() == prompt().shape[1] * per_token
    assert "kv_dtype=int8" in repr(cache)
    # Given explicitly, it wins over patch()'s; a config alone gives the exact default.
    assert headinfer.HeadInferCache(model, kv_dtype="exact").kv_dtype == "exact"
    assert headinfer.HeadInferCache(model.config).kv_dtype == "exact"
    assert headinfer.HeadInferCache(model.config, kv_dtype="int8").kv_dtype == "int8"


def test_generate_makes_int8_caches() -> None:
    model = headinfer.patch(tiny_model("qwen2"), chunk_size=97, block_size=16, kv_dtype="int8")
    out = model.generate(prompt(), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out[_cache_name(model)].store.kv_dtype == "int8"
    headinfer.patch(model, kv_dtype="exact")  # patching again changes it
    out = model.generate(prompt(), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out[_cache_name(model)].store.kv_dtype == "float32"


def test_a_cache_of_transformers_warns_that_it_is_not_int8() -> None:
    from transformers import DynamicCache

    model = headinfer.patch(tiny_model("llama"), kv_dtype="int8")
    cache = DynamicCache(config=model.config)
    said = "not in headinfer's store, nor in kv_dtype='int8'"
    with torch.no_grad(), pytest.warns(UserWarning, match=said):
        model(prompt(20), **{_cache_name(model): cache})


def test_with_patch_restores_the_kv_dtype() -> None:
    model = headinfer.patch(tiny_model("llama"), kv_dtype="int8")
    with headinfer.patch(model, kv_dtype="exact"):
        assert model._headinfer.kv_dtype == "exact"
    assert model._headinfer.kv_dtype == "int8"


def test_exact_is_the_default_and_unchanged() -> None:
    # kv_dtype="exact" is the default, bit for bit: the same logits as a patch without it.
    ids = prompt()
    model = headinfer.patch(tiny_model("gemma2"), chunk_size=97, block_size=16)
    assert model._headinfer.kv_dtype == "exact"
    with torch.no_grad():
        default = model(ids, logits_to_keep=0).logits
        headinfer.patch(model, chunk_size=97, block_size=16, kv_dtype="exact")
        explicit = model(ids, logits_to_keep=0).logits
    assert torch.equal(default, explicit)
    cache = headinfer.HeadInferCache(model)
    assert cache.kv_dtype == "exact" and "kv_dtype" not in repr(cache)


def test_int8_host_memory_check_counts_int8_bytes() -> None:
    # A limit that holds the prompt's int8 KV but not its exact KV.
    model = headinfer.patch(tiny_model("llama"), chunk_size=97, block_size=16)
    spec = headinfer.HeadInferCache(model).spec
    tokens = prompt().shape[1]
    blocks = -(-tokens // 16)
    exact = (
        spec.num_layers * blocks * 16 * kv_token_bytes(spec.num_kv_heads, spec.head_dim, "float32")
    )
    int8 = (
        spec.num_layers
        * blocks
        * 16
        * kv_token_bytes(spec.num_kv_heads, spec.head_dim, "float32", "int8")
    )
    assert int8 < exact
    limit = (int8 + exact) // 2
    with torch.no_grad():
        cache = headinfer.HeadInferCache(model, host_memory_limit=limit, kv_dtype="int8")
        model(prompt(), **{_cache_name(model): cache})
        assert cache.get_seq_length() == tokens
        cache = headinfer.HeadInferCache(model, host_memory_limit=limit)
        with pytest.raises(headinfer.OutOfHostMemoryError):
            model(prompt(), **{_cache_name(model): cache})


def _cache_name(model: torch.nn.Module) -> str:
    from headinfer.prefill import cache_kwarg_name

    return cache_kwarg_name(model)
