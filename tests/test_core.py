"""The Rust core from Python: the dense attention op and the KVStore, against naive torch."""

from __future__ import annotations

import pytest
import torch
from _reference import reference

from headinfer import _core

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Error against the float64 reference, relative to max |ref|: f32 accumulation either way.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


CASES = [
    # hq, hk, lq, lk, d, softcap, window
    (4, 4, 1, 1, 16, None, None),
    (4, 2, 7, 7, 16, None, None),
    (8, 2, 1, 300, 32, None, None),
    (8, 1, 33, 129, 64, 5.0, None),
    (6, 3, 17, 200, 16, None, 31),
    (4, 2, 1, 257, 128, 30.0, 64),
    (2, 2, 64, 64, 8, None, 1),
]


def _random_qkvo(
    g: torch.Generator, dtype: torch.dtype, hq: int, hk: int, lq: int, lk: int, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[hq, lq, d]``, k and v ``[hk, lk, d]`` (q and k scaled by 2 for sharper scores),
    and an ``out`` ``[hq, lq, d]`` of NaNs that the op must overwrite."""
    q = (torch.randn(hq, lq, d, generator=g) * 2).to(dtype)
    k = (torch.randn(hk, lk, d, generator=g) * 2).to(dtype)
    v = torch.randn(hk, lk, d, generator=g).to(dtype)
    return q, k, v, torch.full((hq, lq, d), float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("hq,hk,lq,lk,d,softcap,window", CASES)
def test_attention_matches_naive(
    dtype: torch.dtype,
    hq: int,
    hk: int,
    lq: int,
    lk: int,
    d: int,
    softcap: float | None,
    window: int | None,
) -> None:
    g = torch.Generator().manual_seed(hq * 1000 + lk)
    q, k, v, out = _random_qkvo(g, dtype, hq, hk, lq, lk, d)
    scale = d**-0.5
    _core.attention(q, k, v, out, scale, softcap, window)
    assert rel(out, reference(q, k, v, scale, softcap=softcap, window=window)) < TOL[dtype]


def test_attention_takes_strided_views() -> None:
    # [B, L, H, D] tensors seen as [H, L, D] through x[0].transpose(0, 1): no copies needed.
    g = torch.Generator().manual_seed(0)
    q4 = torch.randn(1, 5, 4, 16, generator=g)
    k4 = torch.randn(1, 9, 2, 16, generator=g)
    v4 = torch.randn(1, 9, 2, 16, generator=g)
    out4 = torch.zeros(1, 5, 4, 16)
    q, k, v = (t[0].transpose(0, 1) for t in (q4, k4, v4))
    _core.attention(q, k, v, out4[0].transpose(0, 1), 0.25)
    ref = reference(q, k, v, 0.25)
    assert rel(out4[0].transpose(0, 1), ref) < 1e-5


def _qkvo(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [
        torch.randn(4, 3, 16, dtype=dtype),
        torch.randn(2, 8, 16, dtype=dtype),
        torch.randn(2, 8, 16, dtype=dtype),
        torch.empty(4, 3, 16, dtype=dtype),
    ]


@pytest.mark.parametrize("index,name", list(enumerate(["query", "key", "value", "out"])))
def test_attention_wrong_dtype_names_argument(index: int, name: str) -> None:
    args = _qkvo()
    args[index] = args[index].to(torch.float16 if index else torch.float64)
    with pytest.raises((TypeError, ValueError), match=name):
        _core.attention(*args, 0.25)


@pytest.mark.parametrize(
    "index,name,shape",
    [
        # A mismatch between two arguments may be blamed on either; a wrong rank on its own.
        (1, "key|value|query", (2, 8, 8)),
        (2, "key|value", (2, 7, 16)),
        (3, "out", (4, 2, 16)),
        (0, "query|key|out", (3, 3, 16)),
        (0, "query", (4, 3)),
        (1, "key", (2, 8)),
        (3, "out", (4, 3, 16, 1)),
    ],
)
def test_attention_wrong_shape_names_argument(index: int, name: str, shape: tuple) -> None:
    args = _qkvo()
    args[index] = torch.randn(*shape)
    with pytest.raises(ValueError, match=name):
        _core.attention(*args, 0.25)


def test_attention_rejects_head_dim_stride() -> None:
    args = _qkvo()
    args[1] = torch.randn(2, 16, 8).transpose(1, 2)  # head_dim stride 8
    with pytest.raises(ValueError, match="key"):
        _core.attention(*args, 0.25)


def test_attention_rejects_non_tensor() -> None:
    args: list = _qkvo()
    args[0] = [[1.0]]
    with pytest.raises(TypeError, match="query"):
        _core.attention(*args, 0.25)


# --- sinks (gpt-oss) ---------------------------------------------------------------------------

SINK_CASES = [
    # hq, hk, lq, lk, d, softcap, window
    (4, 4, 1, 1, 16, None, None),  # the sink beside a single key
    (8, 2, 7, 90, 16, None, None),  # GQA, a chunk of queries
    # One decode row over 5000 keys: the op splits them into ranges merged by log-sum-exp, so
    # a sink counted per range instead of per row would show.
    (8, 1, 1, 5000, 64, None, None),
    (6, 2, 1, 5000, 32, 30.0, 3000),  # ... with softcap and window combined
    (8, 2, 33, 400, 64, 5.0, 50),  # prefill-shaped, softcap and window
    (2, 2, 64, 64, 8, None, 1),  # window 1: each row's own key and the sink
]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("hq,hk,lq,lk,d,softcap,window", SINK_CASES)
def test_attention_with_sinks_matches_naive(
    dtype: torch.dtype,
    hq: int,
    hk: int,
    lq: int,
    lk: int,
    d: int,
    softcap: float | None,
    window: int | None,
) -> None:
    g = torch.Generator().manual_seed(hq * 1000 + lk + 7)
    q, k, v, out = _random_qkvo(g, dtype, hq, hk, lq, lk, d)
    # Sinks around the scores' size (some far above and below), so that they matter.
    sinks = torch.randn(hq, generator=g) * 3
    sinks[0] = 40.0
    sinks[-1] = -40.0
    scale = d**-0.5
    _core.attention(q, k, v, out, scale, softcap, window, sinks=sinks)
    ref = reference(q, k, v, scale, softcap=softcap, window=window, sinks=sinks)
    assert rel(out, ref) < TOL[dtype]
    # The sinks are not ignored: without them the result is another one.
    assert rel(reference(q, k, v, scale, softcap=softcap, window=window), ref) > 10 * TOL[dtype]


def test_attention_sinks_argument_is_checked() -> None:
    q, k, v, out = _qkvo()  # 4 query heads
    for bad, err, match in [
        (torch.zeros(3), ValueError, r"sinks: expected shape \[num_q_heads\] = \[4\]"),
        (torch.zeros(1, 4), ValueError, "sinks: expected shape"),
        (torch.zeros(4, dtype=torch.float64), TypeError, "sinks: must be float32"),
        (torch.zeros(4, dtype=torch.bfloat16), TypeError, "sinks: must be float32"),
        (torch.zeros(8)[::2], ValueError, "sinks: must be contiguous"),
        ([0.0] * 4, TypeError, "sinks: expected a float32 tensor"),
    ]:
        with pytest.raises(err, match=match):
            _core.attention(q, k, v, out, 0.25, sinks=bad)
    store = _store()
    store.append(0, k, v)
    with pytest.raises(ValueError, match="sinks: expected shape"):
        store.attend(0, q, out, 0.25, sinks=torch.zeros(2))
    # None is no sinks, and a correct call still works after the errors.
    store.attend(0, q, out, 0.25, sinks=None)
    assert rel(out, reference(q, k, v, 0.25)) < 1e-5


@pytest.mark.parametrize("softcap,window", [(None, None), (10.0, None), (None, 20), (3.0, 33)])
def test_store_attend_with_sinks_matches_naive(softcap: float | None, window: int | None) -> None:
    # Keys appended in chunks across blocks of 16 (several segments per head); GQA 4:2.
    s = _store(windows=[window, None])
    g = torch.Generator().manual_seed(5)
    ks = torch.randn(2, 1500, 16, generator=g) * 2
    vs = torch.randn(2, 1500, 16, generator=g)
    sinks = torch.randn(4, generator=g) * 3
    for start, end in [(0, 37), (37, 38), (38, 1499), (1499, 1500)]:
        q = torch.randn(4, end - start, 16, generator=g) * 2
        s.append(0, ks[:, start:end], vs[:, start:end])
        out = torch.empty(4, end - start, 16)
        s.attend(0, q, out, 0.25, softcap, window, sinks=sinks)
        seen_k, seen_v = ks[:, :end], vs[:, :end]
        ref = reference(q, seen_k, seen_v, 0.25, softcap=softcap, window=window, sinks=sinks)
        assert rel(out, ref) < 1e-5


# --- KVStore ---------------------------------------------------------------------------------


def _store(**kw: object) -> _core.KVStore:
    base: dict = dict(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_size=16)
    base.update(kw)
    return _core.KVStore(**base)


def test_store_properties() -> None:
    s = _store(windows=[None, 24])
    assert (s.num_layers, s.num_kv_heads, s.head_dim) == (2, 2, 16)
    assert s.dtype == "float32" and s.block_size == 16
    assert s.windows == [None, 24]
    assert s.seq_len(0) == 0 and s.retained_start(1) == 0
    assert s.bytes_used() == 0


def test_a_cpu_store_stages_nothing() -> None:
    s = _store()
    assert (s.staging_piece_bytes, s.staging_buffers, s.staging_bytes) == (0, 0, 0)
    for name in ("staging_piece_bytes", "staging_buffers"):
        with pytest.raises(ValueError, match=f"^{name}: a CPU store stages nothing"):
            setattr(s, name, 4)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_store_append_read_roundtrip(dtype: str) -> None:
    s = _store(dtype=dtype)
    t = DTYPES[dtype]
    chunks = [torch.randn(2, n, 16).to(t) for n in (5, 16, 1, 40)]
    vals = [torch.randn(2, n, 16).to(t) for n in (5, 16, 1, 40)]
    for k, v in zip(chunks, vals):
        s.append(0, k, v)
    full_k, full_v = torch.cat(chunks, 1), torch.cat(vals, 1)
    assert s.seq_len(0) == 62 and s.seq_len(1) == 0
    k_out, v_out = torch.empty(2, 62, 16, dtype=t), torch.empty(2, 62, 16, dtype=t)
    s.read(0, 0, 62, k_out, v_out)
    assert torch.equal(k_out, full_k) and torch.equal(v_out, full_v)
    k_out, v_out = torch.empty(2, 20, 16, dtype=t), torch.empty(2, 20, 16, dtype=t)
    s.read(0, 13, 33, k_out, v_out)
    assert torch.equal(k_out, full_k[:, 13:33]) and torch.equal(v_out, full_v[:, 13:33])
    assert s.bytes_used() >= 2 * full_k.numel() * full_k.element_size()
    assert s.bytes_reserved() >= s.bytes_used()


def test_store_append_strided_view() -> None:
    s = _store()
    k4 = torch.randn(1, 7, 2, 16)  # [B, L, H, D]
    v4 = torch.randn(1, 7, 2, 16)
    s.append(1, k4[0].transpose(0, 1), v4[0].transpose(0, 1))
    out = torch.empty(2, 7, 16), torch.empty(2, 7, 16)
    s.read(1, 0, 7, *out)
    assert torch.equal(out[0], k4[0].transpose(0, 1)) and torch.equal(out[1], v4[0].transpose(0, 1))


def test_store_append_checks_arguments() -> None:
    s = _store()
    with pytest.raises(TypeError, match="key"):
        s.append(0, torch.randn(2, 3, 16, dtype=torch.float16), torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="key"):
        s.append(0, torch.randn(3, 3, 16), torch.randn(3, 3, 16))
    with pytest.raises(ValueError, match="value"):
        s.append(0, torch.randn(2, 3, 16), torch.randn(2, 4, 16))
    with pytest.raises((ValueError, IndexError), match="layer"):
        s.append(5, torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    assert s.seq_len(0) == 0


@pytest.mark.parametrize("softcap,window", [(None, None), (10.0, None), (None, 20), (3.0, 33)])
def test_store_attend_matches_naive(softcap: float | None, window: int | None) -> None:
    s = _store(windows=[window, None])
    g = torch.Generator().manual_seed(3)
    ks = torch.randn(2, 90, 16, generator=g) * 2
    vs = torch.randn(2, 90, 16, generator=g)
    for start, end in [(0, 37), (37, 38), (38, 90)]:
        q = torch.randn(4, end - start, 16, generator=g) * 2
        s.append(0, ks[:, start:end], vs[:, start:end])
        out = torch.empty(4, end - start, 16)
        s.attend(0, q, out, 0.25, softcap, window)
        ref = reference(q, ks[:, :end], vs[:, :end], 0.25, softcap=softcap, window=window)
        assert rel(out, ref) < 1e-5


def test_store_window_drops_old_blocks() -> None:
    s = _store(windows=[None, 20])
    k = torch.randn(2, 200, 16)
    v = torch.randn(2, 200, 16)
    for layer in range(2):
        for start in range(0, 200, 50):
            s.append(layer, k[:, start : start + 50], v[:, start : start + 50])
            out = torch.empty(2, 50, 16)
            s.attend(layer, torch.randn(2, 50, 16), out, 0.25, None, s.windows[layer])
    assert s.seq_len(1) == 200 and s.retained_start(0) == 0
    # The window needs positions > 200 - 20; whole blocks before that may go.
    assert 0 < s.retained_start(1) <= 200 - 20 + 1
    held = 200 - s.retained_start(1)
    out = torch.empty(2, held, 16), torch.empty(2, held, 16)
    s.read(1, s.retained_start(1), 200, *out)
    assert torch.equal(out[0], k[:, s.retained_start(1) :])
    with pytest.raises(ValueError):
        s.read(1, 0, 200, torch.empty(2, 200, 16), torch.empty(2, 200, 16))
    assert s.bytes_used() < 2 * 2 * 200 * 16 * 4 * 2


def test_store_crop_and_clear() -> None:
    s = _store()
    k, v = torch.randn(2, 50, 16), torch.randn(2, 50, 16)
    s.append(0, k, v)
    s.append(1, k, v)
    s.crop(30)
    assert s.seq_len(0) == 30 and s.seq_len(1) == 30
    s.crop(40)  # longer than held: nothing to drop
    assert s.seq_len(0) == 30
    s.append(0, k[:, 30:], v[:, 30:])
    out = torch.empty(2, 50, 16), torch.empty(2, 50, 16)
    s.read(0, 0, 50, *out)
    assert torch.equal(out[0], k) and torch.equal(out[1], v)
    reserved = s.bytes_reserved()
    s.clear()
    assert s.seq_len(0) == 0 and s.seq_len(1) == 0 and s.bytes_used() == 0
    assert s.bytes_reserved() <= reserved


def test_store_crop_refuses_dropped_window_and_keeps_state() -> None:
    s = _store(num_layers=1, windows=[16])
    for _ in range(4):
        s.append(0, torch.randn(2, 32, 16), torch.randn(2, 32, 16))
        s.attend(0, torch.randn(2, 32, 16), torch.empty(2, 32, 16), 0.25, None, 16)
    assert s.retained_start(0) > 0
    with pytest.raises(ValueError):
        s.crop(1)
    assert s.seq_len(0) == 128
    s.crop(127)  # still within what the window kept
    assert s.seq_len(0) == 127


def test_store_rollback_restores_what_a_window_let_go_of() -> None:
    s = _store(windows=[20, None])
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 200, 16, generator=g), torch.randn(2, 200, 16, generator=g)
    q = torch.randn(4, 1, 16, generator=g)

    def state() -> list:
        got = []
        for layer in range(2):
            a, n = s.retained_start(layer), s.seq_len(layer)
            kv = torch.empty(2, n - a, 16), torch.empty(2, n - a, 16)
            s.read(layer, a, n, *kv)
            out = torch.empty(4, 1, 16)
            s.attend(layer, q, out, 0.25, None, s.windows[layer])
            got.append((a, n, kv, out))
        return got

    def same(x: list, y: list) -> bool:
        return all(
            a == b
            and torch.equal(t[2][0], u[2][0])
            and torch.equal(t[2][1], u[2][1])
            and torch.equal(t[3], u[3])
            for t, u in zip(x, y)
            for a, b in zip(t[:2], u[:2])
        )

    for layer in range(2):
        s.append(layer, k[:, :40], v[:, :40])
    before, reserved_before = state(), s.bytes_reserved()
    assert not s.in_step
    s.checkpoint()
    assert s.in_step
    for a, b in [(40, 57), (57, 90), (90, 150)]:  # the window crosses many blocks
        for layer in range(2):
            s.append(layer, torch.randn(2, b - a, 16), torch.randn(2, b - a, 16))
    assert s.retained_start(0) > 40
    reserved = s.bytes_reserved()
    assert reserved > reserved_before
    s.rollback()
    assert not s.in_step
    assert same(state(), before)
    assert s.bytes_reserved() == reserved  # kept for reuse
    # Committed: the state is what the step made.
    s.checkpoint()
    for layer in range(2):
        s.append(layer, k[:, 40:150], v[:, 40:150])
    s.commit()
    assert s.seq_len(0) == 150 and not s.in_step
    for layer in range(2):
        s.append(layer, k[:, 150:], v[:, 150:])
    a = s.retained_start(0)
    out = torch.empty(2, 200 - a, 16), torch.empty(2, 200 - a, 16)
    s.read(0, a, 200, *out)
    assert torch.equal(out[0], k[:, a:]) and torch.equal(out[1], v[:, a:])


def test_store_rollback_without_a_step_raises_and_commit_does_nothing() -> None:
    s = _store(windows=[20, None])
    s.append(0, torch.randn(2, 30, 16), torch.randn(2, 30, 16))
    s.commit()
    with pytest.raises(ValueError, match="^checkpoint: no step is open"):
        s.rollback()
    s.checkpoint()
    s.append(0, torch.randn(2, 30, 16), torch.randn(2, 30, 16))
    s.clear()  # ends the step
    assert not s.in_step
    with pytest.raises(ValueError, match="checkpoint"):
        s.rollback()
    assert s.seq_len(0) == 0


def test_store_out_of_host_memory_leaves_store_unchanged() -> None:
    block_bytes = 2 * 2 * 16 * 16 * 4  # k and v, 2 heads, 16 tokens, 16 dims, f32
    s = _store(num_layers=1, host_memory_limit=4 * block_bytes)
    s.append(0, torch.randn(2, 40, 16), torch.randn(2, 40, 16))
    used = s.bytes_used()
    with pytest.raises(_core.OutOfHostMemoryError) as info:
        s.append(0, torch.randn(2, 100, 16), torch.randn(2, 100, 16))
    assert info.value.needed > info.value.available
    assert isinstance(info.value, MemoryError) and isinstance(info.value, _core.HeadInferError)
    assert s.seq_len(0) == 40 and s.bytes_used() == used
    s.append(0, torch.randn(2, 20, 16), torch.randn(2, 20, 16))  # still fits: usable
    assert s.seq_len(0) == 60


def test_store_rejects_bad_construction() -> None:
    with pytest.raises((ValueError, TypeError), match="dtype"):
        _store(dtype="float64")
    with pytest.raises(ValueError, match="windows"):
        _store(windows=[None])


# --- Planner ---------------------------------------------------------------------------------


def _shape(**kw: object) -> _core.ModelShape:
    base: dict = dict(
        num_layers=32,
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        hidden_size=4096,
        intermediate_size=14336,
        vocab_size=128256,
        elem_bytes=2,
        weight_bytes=16_060_000_000,
        windows=[None] * 32,
    )
    base.update(kw)
    return _core.ModelShape(**base)


def test_plan_counts_kv_in_the_store_row_bytes() -> None:
    # int8 rows of a Llama-3-8B head (136 bytes) against bf16's 256: the planner counts the
    # stored bytes, the staging stays at the model's dtype (staged rows are dequantized).
    int8_row = _core.kv_row_bytes(128, "bfloat16", "int8")
    exact, int8 = _shape(), _shape(kv_row_bytes=int8_row)
    assert int8.kv_bytes_per_token_layer == 2 * 8 * int8_row
    kw: dict = dict(context=1 << 20, chunk_size=8192, gpu_budget=24 << 30, margin=1 << 29)
    pe, pq = (
        _core.plan(exact, staging_cap=1 << 30, **kw),
        _core.plan(int8, staging_cap=1 << 30, **kw),
    )
    assert pq.kv_total_bytes * 256 == pe.kv_total_bytes * int8_row
    assert (pq.staging_bytes, pq.kv_device_bytes) == (pe.staging_bytes, pe.kv_device_bytes)


def test_plan_is_typed_and_its_dict_has_every_figure() -> None:
    shape = _shape()
    assert shape.kv_bytes_per_token_layer * shape.num_layers == 131_072
    p = _core.plan(
        shape,
        context=128 * 1024,
        chunk_size=8192,
        gpu_budget=24 << 30,
        margin=1 << 29,
        staging_cap=1 << 30,
    )
    assert isinstance(p, _core.Plan)
    assert p.kv_total_bytes == 16 << 30
    assert p.kv_device_bytes + p.kv_host_bytes == p.kv_total_bytes
    assert p.margin_bytes == 1 << 29 and p.fits_gpu
    d = p.to_dict()
    assert set(d) == {
        "weight_bytes",
        "activation_bytes",
        "heads_per_group",
        "staging_bytes",
        "kv_device_bytes",
        "kv_total_bytes",
        "kv_host_bytes",
        "margin_bytes",
        "fits_gpu",
    }
    assert all(d[k] == getattr(p, k) for k in d)
    with pytest.raises(AttributeError):
        p.kv_device_bytes = 0  # type: ignore[misc]


def test_plan_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="^chunk_size:"):
        _core.plan(_shape(), context=10, chunk_size=0, gpu_budget=1, margin=0, staging_cap=1)
    with pytest.raises(ValueError, match="^windows:"):
        _core.plan(
            _shape(windows=[None]), context=10, chunk_size=1, gpu_budget=1, margin=0, staging_cap=1
        )


# --- CPU share policy and failure hooks ------------------------------------------------------


def test_cpu_heads_belongs_to_cuda_stores_and_is_checked() -> None:
    s = _store()
    assert s.cpu_heads == 0 and s.cpu_split(0) is None
    with pytest.raises(ValueError, match="^cpu_heads:"):
        _store(cpu_heads=1)
    with pytest.raises(ValueError, match="^cpu_heads:"):
        s.cpu_heads = 1
    with pytest.raises(ValueError, match="^cpu_heads: must be between 0 and 2"):
        _store(cpu_heads=3)
    with pytest.raises(ValueError, match="^layer:"):
        s.cpu_split(5)
    s.finish_step()  # a CPU store has no CPU share: nothing to wait for
    # Rates belong to CUDA stores too; the share's thread pool is anyone's.
    assert s.share_rates is None
    with pytest.raises(ValueError, match="^share_rates:"):
        s.share_rates = (51e9, 40e9, 2.5e12, 1e-4)
    s.share_rates = None
    # No rates, nothing to balance; no shared step read.
    assert s.share_balance is None and s.share_steps == (0, 0)
    s.share_threads = 2
    assert s.share_threads == 2
    s.share_threads = 0
    assert s.share_threads == 0


def test_injected_allocation_failure_raises_and_leaves_the_store_usable() -> None:
    torch.manual_seed(0)
    s = _store(block_size=4)
    k = torch.randn(2, 10, 16)
    v = torch.randn(2, 10, 16)
    s.append(0, k[:, :6], v[:, :6])
    try:
        # The next fresh block (positions 8..12) fails after one succeeds.
        _core._inject_failure("alloc", after=1)
        with pytest.raises(_core.HeadInferError, match="injected failure at alloc"):
            s.append(0, k[:, 6:], v[:, 6:])
    finally:
        _core._inject_failure(None)
    assert s.seq_len(0) == 6
    s.append(0, k[:, 6:], v[:, 6:])
    ko, vo = torch.empty(2, 10, 16), torch.empty(2, 10, 16)
    s.read(0, 0, 10, ko, vo)
    assert torch.equal(ko, k) and torch.equal(vo, v)


def test_inject_failure_names_unknown_points() -> None:
    with pytest.raises(ValueError, match="^point: unknown failure point"):
        _core._inject_failure("nowhere")


def test_a_failure_inside_a_decode_step_raises_there_and_the_cache_continues() -> None:
    """A block allocation fails in the middle of a decode step (some layers appended): the
    step raises, the cache rolls back to the last complete token, and decoding on from there
    gives the tokens of a run that never failed."""
    from _tiny import prompt, tiny_model, twin

    import headinfer
    from headinfer.prefill import cache_kwarg_name

    model = tiny_model("llama")
    ref = twin(model)
    ids = prompt(40)
    want = ref.generate(ids, max_new_tokens=12, do_sample=False)
    headinfer.patch(model, block_size=8, chunk_size=16)
    cache = headinfer.HeadInferCache(model)
    name = cache_kwarg_name(model)
    with torch.no_grad():
        out = model(ids, use_cache=True, **{name: cache})
        tokens = [int(out.logits[0, -1].argmax())]
        failed = False
        while len(tokens) < 12:
            n = cache.get_seq_length()
            step = torch.tensor([[tokens[-1]]])
            if n == 48 and not failed:
                # Position 48 starts a block: layer 0 allocates two (one a head), layer 1 fails.
                _core._inject_failure("alloc", after=2)
                try:
                    with pytest.raises(_core.HeadInferError, match="injected failure at alloc"):
                        model(step, use_cache=True, **{name: cache})
                finally:
                    _core._inject_failure(None)
                failed = True
                assert cache.get_seq_length() == n
                assert all(cache.store.seq_len(i) == n for i in range(cache.store.num_layers))
                continue
            out = model(step, use_cache=True, **{name: cache})
            tokens.append(int(out.logits[0, -1].argmax()))
    assert failed
    assert tokens == want[0, ids.shape[1] :].tolist()


def test_cpu_isa_is_a_known_set_that_passed_its_self_check() -> None:
    isa = _core.cpu_isa()
    assert isa in {"scalar", "avx2", "avx512"}
    assert _core.cpu_isa() == isa, "chosen once"
    failures = _core.cpu_isa_failures()
    assert isinstance(failures, list)
    # A set passed over is wider than the one chosen and says why.
    order = ["scalar", "avx2", "avx512"]
    for f in failures:
        name, _, reason = f.partition(": ")
        assert order.index(name) > order.index(isa) and reason, f
