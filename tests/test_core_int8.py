"""The 8-bit KV format of the Rust core from Python: a CPU store with ``kv_dtype="int8"``
against the same op over its dequantized keys and values, and against exact attention."""

from __future__ import annotations

import math

import pytest
import torch
from _reference import reference

from headinfer import _core


def _store(kv_dtype: str | None, dtype: str = "float32", d: int = 64, **kw) -> _core.KVStore:
    return _core.KVStore(2, 2, d, dtype, block_size=16, kv_dtype=kv_dtype, **kw)


def test_kv_row_bytes_counts_values_scales_and_padding() -> None:
    # 128 int8 values + 4 bf16 scales; 64 + 2 scales padded to 72; exact: head_dim * size.
    assert _core.kv_row_bytes(128, "bfloat16", "int8") == 136
    assert _core.kv_row_bytes(64, "float32", "int8") == 72
    assert _core.kv_row_bytes(128, "bfloat16") == 256
    assert _core.kv_row_bytes(128, "bfloat16", "bfloat16") == 256
    with pytest.raises(ValueError, match="kv_dtype"):
        _core.kv_row_bytes(128, "bfloat16", "int4")
    with pytest.raises(ValueError, match="head_dim"):
        _core.kv_row_bytes(0, "bfloat16", "int8")


def test_kv_dtype_is_checked_and_reported() -> None:
    assert _store(None).kv_dtype == "float32"
    assert _store("float32").kv_dtype == "float32"
    assert _store("int8").kv_dtype == "int8"
    with pytest.raises(ValueError, match="kv_dtype"):
        _store("float16")  # another dtype than the store's is not a KV format
    with pytest.raises(ValueError, match="kv_dtype"):
        _store("fp8")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_read_returns_values_within_half_a_step(dtype: str) -> None:
    tdt = getattr(torch, dtype)
    s = _store("int8", dtype)
    g = torch.Generator().manual_seed(0)
    k = (torch.randn(2, 40, 64, generator=g) * 3).to(tdt)
    v = torch.randn(2, 40, 64, generator=g).to(tdt)
    k[0, 5, 7] = 50.0  # an outlier: only its group's scale grows
    s.append(0, k[:, :17], v[:, :17])
    s.append(0, k[:, 17:], v[:, 17:])
    ko, vo = torch.empty_like(k), torch.empty_like(v)
    s.read(0, 0, 40, ko, vo)
    for x, y in [(k, ko), (v, vo)]:
        groups = x.float().reshape(2, 40, 2, 32)
        step = groups.abs().amax(-1, keepdim=True) / 127 * (1 + 2**-7)
        err = (y.float().reshape(2, 40, 2, 32) - groups).abs()
        # Half a step, plus the output dtype's own rounding of the dequantized value.
        out_ulp = groups.abs().amax(-1, keepdim=True) * (2**-8 if dtype != "float32" else 0)
        assert bool((err <= step / 2 + out_ulp + 1e-30).all())
    # The outlier's group is coarse; the next group of that row keeps its own fine scale.
    assert float((ko[0, 5, 32:].float() - k[0, 5, 32:].float()).abs().max()) < 0.1


@pytest.mark.parametrize("softcap,window", [(None, None), (10.0, None), (None, 20)])
def test_attend_equals_the_op_over_the_dequantized_cache(
    softcap: float | None, window: int | None
) -> None:
    s = _store("int8", windows=[window, None])
    g = torch.Generator().manual_seed(3)
    ks = torch.randn(2, 90, 64, generator=g) * 2
    vs = torch.randn(2, 90, 64, generator=g)
    for start, end in [(0, 37), (37, 38), (38, 90)]:
        q = torch.randn(4, end - start, 64, generator=g) * 2
        s.append(0, ks[:, start:end], vs[:, start:end])
        out = torch.empty(4, end - start, 64)
        s.attend(0, q, out, 0.125, softcap, window)
        lo = s.retained_start(0)
        kd, vd = torch.empty(2, end - lo, 64), torch.empty(2, end - lo, 64)
        s.read(0, lo, end, kd, vd)
        # Positions the window dropped are never seen: any values stand in for them.
        kfull = torch.cat([torch.zeros(2, lo, 64), kd], 1)
        vfull = torch.cat([torch.zeros(2, lo, 64), vd], 1)
        ref = reference(q, kfull, vfull, 0.125, softcap=softcap, window=window)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
        exact = reference(q, ks[:, :end], vs[:, :end], 0.125, softcap=softcap, window=window)
        assert float((out - exact).abs().max() / exact.abs().max()) < 0.05


def test_int8_holds_about_half_the_bytes_of_bf16() -> None:
    sizes = {}
    for kv in [None, "int8"]:
        s = _core.KVStore(1, 4, 128, "bfloat16", block_size=64, kv_dtype=kv)
        s.append(0, torch.randn(4, 640, 128).bfloat16(), torch.randn(4, 640, 128).bfloat16())
        sizes[kv] = s.bytes_used()
    assert math.isclose(sizes["int8"] / sizes[None], 136 / 256)
