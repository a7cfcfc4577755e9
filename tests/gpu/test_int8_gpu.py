"""The 8-bit KV format on the GPU (kernels/attention.cu built with KV_INT8): a CUDA store with
``kv_dtype="int8"`` against a CPU store of the same format fed the same inputs.

- The stored bytes: the GPU quantizes at append (``append_kv``) and the CPU in src/quant.rs by
  one rule, so both hold the same bytes; ``gather`` (the GPU's dequantization) and ``read`` (the
  CPU's) must then return identical values, NaN groups, ties and underflowing scales included.
- Attention: each reader of the GPU (resident blocks, host blocks read zero-copy, host blocks
  staged by the copy engine, the CPU share) against the CPU store's op over the same bytes:
  equal up to f32 summation order (f32 outputs within 1e-5; 16-bit outputs within one rounding
  of the output dtype), and against float64 attention over the dequantized keys and values.
- The prefill path: chunks appended, the stored past gathered (for int8: staged by the copy
  engine and dequantized by a kernel in device memory), prefill attention of each chunk.
- The exact mode is unchanged: its own kernels (not the int8 ones) and its bytes as given.
"""

from __future__ import annotations

import faulthandler

import pytest
import torch
from _reference import reference

from headinfer import _core

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"


@pytest.fixture(autouse=True)
def _watchdog():
    """A hung stream dumps every thread's stack and ends the run after 5 minutes."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pair(hkv, d, dtype, *, n, block, device_blocks, window=None, reader="copy", piece_rows=None):
    """A CUDA int8 store (``device_blocks`` (key, value) block pairs of device memory, the rest
    pinned on the host, read by ``reader``) and a CPU int8 store of the same shape."""
    row = _core.kv_row_bytes(d, _name(dtype), "int8")
    cuda = _core.KVStore(
        1,
        hkv,
        d,
        _name(dtype),
        block_size=block,
        windows=[window],
        device=0,
        device_budget=device_blocks * 2 * block * row,
        max_len=n + 64 * block,
        kv_dtype="int8",
    )
    cuda.host_reader = reader
    if piece_rows is not None:
        cuda.staging_piece_bytes = 2 * piece_rows * row
    cpu = _core.KVStore(
        1, hkv, d, _name(dtype), block_size=block, windows=[window], kv_dtype="int8"
    )
    return cuda, cpu, row


def _append(cuda, cpu, k, v):
    """Appends ``k``, ``v`` (``[hkv, n, d]`` on the GPU) to both stores."""
    cuda.append(0, k, v)
    cpu.append(0, k.cpu(), v.cpu())


def _stored(cuda, cpu, a, b, dtype):
    """Positions ``a..b`` of every head, dequantized by the GPU (``gather``) and by the CPU
    (``read``)."""
    hkv, d = cuda.num_kv_heads, cuda.head_dim
    kg = torch.full((hkv, b - a, d), 7.0, dtype=dtype, device=DEV)
    vg = torch.full_like(kg, 7.0)
    cuda.gather(0, 0, hkv, a, b, kg, vg)
    kc = torch.empty(hkv, b - a, d, dtype=dtype)
    vc = torch.empty_like(kc)
    cpu.read(0, a, b, kc, vc)
    torch.cuda.synchronize()
    return (kg.cpu(), vg.cpu()), (kc, vc)


def _same(a, b):
    """Identical values (NaN where the other has NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _same_strided_gather(cuda, kc, vc, a, b):
    """Head 1's positions ``a..b`` gathered into strided outputs equal the CPU's (``kc``, ``vc``:
    every head's positions from 0)."""
    d, dtype = cuda.head_dim, kc.dtype
    kk = torch.zeros(1, b - a, 2 * d, dtype=dtype, device=DEV)[..., d:]
    vv = torch.zeros(1, b - a, 3 * d, dtype=dtype, device=DEV)[..., :d]
    cuda.gather(0, 1, 1, a, b, kk, vv)
    torch.cuda.synchronize()
    _same(kk.cpu(), kc[1:, a:b])
    _same(vv.cpu(), vc[1:, a:b])


def _special(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``[hkv, n, d]`` f32, n >= 8, d >= 64) with the groups the quantizer treats apart:
    all zeros, a NaN, infinities, an outlier, values so small that amax / 127 underflows in
    f32, and ties (x / scale = k + 1/2 with scale exactly 1: they round to even)."""
    x = x.clone()
    x[0, 0] = 0.0
    x[0, 1, 3] = float("nan")
    x[0, 2, 5] = float("inf")
    x[-1, 3, -1] = float("-inf")
    x[0, 4] *= 1e3
    x[0, 5, 7] = 300.0
    x[0, 6, :32] = 1e-44  # f32 subnormals: the scale underflows to 0 (bf16/f16 flush them)
    ties = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5, -0.5, 126.5, -126.5])
    x[0, 7, :32] = ties.repeat(4)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 80])
def test_the_gpu_stores_the_bytes_the_cpu_stores(dtype, d):
    """Quantized on the GPU and on the CPU from the same inputs, in a prefill chunk and
    single tokens, in device and in host blocks: gather (GPU) and read (CPU) agree exactly,
    and every finite group lies within half a step of its input."""
    torch.manual_seed(0)
    hkv, n, block = 2, 300, 64
    cuda, cpu, _ = _pair(hkv, d, dtype, n=n, block=block, device_blocks=3)
    x = _special(torch.randn(hkv, n, d) * 3)
    k = x.to(dtype).to(DEV)
    v = (torch.randn(hkv, n, d) * 0.01).to(dtype).to(DEV)
    _append(cuda, cpu, k[:, :200], v[:, :200])
    for t in range(200, n):
        _append(cuda, cpu, k[:, t : t + 1], v[:, t : t + 1])
    assert 0 < cuda.device_bytes_used() < cuda.bytes_used()  # both kinds of blocks
    (kg, vg), (kc, vc) = _stored(cuda, cpu, 0, n, dtype)
    _same(kg, kc)
    _same(vg, vc)
    # A range that starts and ends inside blocks, from head 1 only, into strided outputs.
    _same_strided_gather(cuda, kc, vc, 37, 137)
    # The special groups as the rule makes them.
    g = 32 if d % 32 == 0 else 16
    assert bool(kg[0, 0].eq(0).all())
    assert bool(kg[0, 1, :g].isnan().all()) and not bool(kg[0, 1, g:].isnan().any())
    assert bool(kg[0, 2, :g].isnan().all())
    assert bool(kg[-1, 3, -g:].isnan().all())
    if dtype == torch.float32:
        assert bool(kg[0, 6, :32].eq(0).all())  # underflowing scale: q = 0
    ties = [127.0, 2.0, -4.0, 0.0, 2.0, -0.0, 126.0, -126.0]
    assert kg[0, 7, :8].float().tolist() == ties
    # Half a step (scale = amax / 127 rounded up to bf16, within 2^-7 of it, and f32's own
    # rounding) plus the output dtype's rounding.
    xs = k.float().cpu().reshape(hkv, n, d // g, g)
    finite = xs.isfinite().all(-1, keepdim=True)
    amax = xs.abs().amax(-1, keepdim=True)
    step = amax / 127 * (1 + 2**-6)
    ulp = amax * (0 if dtype == torch.float32 else 2**-8)
    err = (kg.float().reshape(hkv, n, d // g, g) - xs).abs()
    assert bool((err <= step / 2 + ulp + 1e-30)[finite.expand_as(err)].all())


def _check_attention(cuda, cpu, q, dtype, scale, softcap, window):
    """The CUDA store's attention of ``q`` against the CPU store's and against float64 over
    the dequantized keys and values."""
    out = torch.full_like(q, float("nan"))
    cuda.attend(0, q, out, scale, softcap=softcap, window=window)
    cuda.finish_step()
    ref_out = torch.empty(q.shape, dtype=dtype)
    cpu.attend(0, q.cpu(), ref_out, scale, softcap, window)
    torch.cuda.synchronize()
    assert not bool(out.isnan().any())
    got = out.cpu().float()
    # Summation order only: f32 outputs within 1e-5; 16-bit ones within one output rounding.
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got, ref_out.float(), rtol=rtol, atol=3e-5)
    if dtype != torch.float32:
        # `gather` and `read` give the dequantized values rounded to the dtype, which moves
        # peaked scores by more than summation order would: the f64 reference over the exact
        # dequantized values is the CPU op's test (tests/rust/attention/cpu.rs), and the GPU
        # matched the CPU above.
        return
    # Against float64 over what the store holds (the positions a window dropped stand as 0).
    lo, end = cuda.retained_start(0), cuda.seq_len(0)
    (kd, vd), _ = _stored(cuda, cpu, lo, end, dtype)
    hkv, d = cuda.num_kv_heads, cuda.head_dim
    kf = torch.cat([torch.zeros(hkv, lo, d), kd.float()], 1)
    vf = torch.cat([torch.zeros(hkv, lo, d), vd.float()], 1)
    want = reference(q.cpu().float(), kf, vf, scale, softcap=softcap, window=window)
    err = float((got.double() - want).abs().max())
    assert err < 1e-4, err


# (kv heads, group, head_dim, tokens, block, device blocks, window, softcap, piece rows)
CASES = {
    "resident": (2, 4, 128, 2000, 128, 64, None, None, None),
    "host": (2, 4, 128, 2000, 128, 0, None, None, None),
    "mixed-pieces": (3, 2, 64, 3001, 64, 5, None, None, 150),
    "window": (2, 4, 128, 3000, 128, 2, 700, None, 300),
    "softcap": (1, 8, 64, 1500, 64, 1, None, 30.0, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reader", ["copy", "zero-copy"])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches_the_cpu_store(case, reader, dtype):
    """A prompt in two chunks, then decode steps (append a token, attend), read by each of
    the GPU's readers, against the CPU store's op over the same bytes."""
    torch.manual_seed(1)
    hkv, g, d, n, block, dev_blocks, window, softcap, piece_rows = CASES[case]
    cuda, cpu, _ = _pair(
        hkv,
        d,
        dtype,
        n=n,
        block=block,
        device_blocks=dev_blocks,
        window=window,
        reader=reader,
        piece_rows=piece_rows,
    )
    k = (torch.randn(hkv, n + 4, d, device=DEV) * 2).to(dtype)
    v = torch.randn(hkv, n + 4, d, device=DEV).to(dtype)
    _append(cuda, cpu, k[:, : n // 3], v[:, : n // 3])
    _append(cuda, cpu, k[:, n // 3 : n], v[:, n // 3 : n])
    assert cuda.host_reader_used == reader
    if dev_blocks == 0:
        assert cuda.device_bytes_used() == 0
    elif case == "resident":
        assert cuda.device_bytes_used() == cuda.bytes_used()
    scale = d**-0.5
    for t in range(n, n + 4):
        _append(cuda, cpu, k[:, t : t + 1], v[:, t : t + 1])
        q = torch.randn(hkv * g, 1, d, device=DEV).to(dtype)
        _check_attention(cuda, cpu, q, dtype, scale, softcap, window)
    if reader == "copy" and dev_blocks < 64:
        assert cuda.staging_bytes > 0


def test_decode_with_the_cpu_share_matches_the_cpu_store():
    """The CPU's share of a decode step reads the int8 host blocks too (its rows merged with
    the GPU's by log-sum-exp), with the copy engine staging the rest."""
    torch.manual_seed(2)
    hkv, g, d, n, block = 4, 4, 128, 3000, 64
    cuda, cpu, _ = _pair(hkv, d, torch.bfloat16, n=n, block=block, device_blocks=6)
    cuda.cpu_heads = 2
    cuda.cpu_share_min_tokens = 0
    cuda.share_threads = 2
    k = torch.randn(hkv, n + 3, d, device=DEV).bfloat16()
    v = torch.randn(hkv, n + 3, d, device=DEV).bfloat16()
    _append(cuda, cpu, k[:, :n], v[:, :n])
    for t in range(n, n + 3):
        _append(cuda, cpu, k[:, t : t + 1], v[:, t : t + 1])
        q = torch.randn(hkv * g, 1, d, device=DEV).bfloat16()
        _check_attention(cuda, cpu, q, torch.bfloat16, d**-0.5, None, None)
    assert cuda.cpu_split(0) is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device_blocks", [0, 100])
@pytest.mark.parametrize("piece_rows", [None, 50])
def test_chunked_prefill_through_gather(dtype, device_blocks, piece_rows):
    """What the prefill path does per chunk: append it, gather the stored past into T tensors
    (int8 rows are not the outputs' bytes: the copy engine stages them piece by piece and a
    kernel dequantizes them; 50-row pieces cut blocks across pieces), attend; the gathered
    past equals the CPU's, and the store's own prefill attention (q_len = chunk) agrees with
    float64 over it."""
    torch.manual_seed(3)
    hkv, g, d, n, block, chunk = 2, 3, 128, 1100, 64, 300
    cuda, cpu, _ = _pair(
        hkv, d, dtype, n=n, block=block, device_blocks=device_blocks, piece_rows=piece_rows
    )
    k = (torch.randn(hkv, n, d, device=DEV) * 2).to(dtype)
    v = torch.randn(hkv, n, d, device=DEV).to(dtype)
    scale = d**-0.5
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        _append(cuda, cpu, k[:, a:b], v[:, a:b])
        # Rows-contiguous outputs: the exact mode's copy-engine case, the kernel's for int8.
        (kg, vg), (kc, vc) = _stored(cuda, cpu, 0, b, dtype)
        _same(kg, kc)
        _same(vg, vc)
        q = torch.randn(hkv * g, b - a, d, device=DEV).to(dtype)
        _check_attention(cuda, cpu, q, dtype, scale, None, None)
    # One head from inside a block to inside another, into strided outputs.
    _same_strided_gather(cuda, kc, vc, 99, 799)


def test_a_window_layers_gather_starts_at_its_retained_keys():
    """A sliding window drops whole blocks below it: the gather of what is retained starts at
    the layer's first held position, inside the block table's later entries."""
    torch.manual_seed(5)
    hkv, d, block, window = 2, 64, 32, 70
    cuda, cpu, _ = _pair(hkv, d, torch.bfloat16, n=400, block=block, device_blocks=2, window=window)
    k = torch.randn(hkv, 400, d, device=DEV).bfloat16()
    for a in range(0, 400, 100):
        _append(cuda, cpu, k[:, a : a + 100], -k[:, a : a + 100])
    lo = cuda.retained_start(0)
    assert 0 < lo <= 400 - window
    (kg, vg), (kc, vc) = _stored(cuda, cpu, lo, 400, torch.bfloat16)
    _same(kg, kc)
    _same(vg, vc)


def test_the_staging_piece_counts_int8_rows():
    """The copy engine moves the 8-bit bytes: a piece must hold one int8 key and value row
    (2 x 72 bytes at head_dim 64), not one of the dtype's."""
    cuda, cpu, row = _pair(2, 64, torch.float32, n=600, block=64, device_blocks=0)
    assert row == 72
    with pytest.raises(ValueError, match=r"^staging_piece_bytes:.*\(144 bytes\)"):
        cuda.staging_piece_bytes = 128
    cuda.staging_piece_bytes = 144  # one row pair: every piece a single key
    k = torch.randn(2, 300, 64, device=DEV)
    _append(cuda, cpu, k, k)
    q = torch.randn(2, 1, 64, device=DEV)
    _check_attention(cuda, cpu, q, torch.float32, 0.125, None, None)


def _exact_run(dtype, k, v, q):
    """An exact CUDA store of k, v, all on the host read zero-copy: its gathered keys and
    values and its attention of q."""
    hkv, n, d = k.shape
    s = _core.KVStore(1, hkv, d, _name(dtype), block_size=64, device=0, max_len=n + 64)
    assert s.kv_dtype == _name(dtype)
    s.host_reader = "zero-copy"
    s.append(0, k, v)
    ko, vo = torch.empty_like(k), torch.empty_like(v)
    s.gather(0, 0, hkv, 0, n, ko, vo)
    out = torch.empty_like(q)
    s.attend(0, q, out, d**-0.5)
    torch.cuda.synchronize()
    return ko, vo, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_exact_mode_is_unchanged(dtype):
    """An exact store holds its inputs bit for bit and attends with the exact kernels, also
    after int8 kernels of the same (dtype, head_dim) were compiled and used in the process:
    the same bits before and after."""
    torch.manual_seed(4)
    k = torch.randn(2, 500, 128, device=DEV).to(dtype)
    v = torch.randn(2, 500, 128, device=DEV).to(dtype)
    q = torch.randn(8, 1, 128, device=DEV).to(dtype)
    ko, vo, before = _exact_run(dtype, k, v, q)
    assert torch.equal(ko, k) and torch.equal(vo, v)
    want = reference(q, k, v, 128**-0.5)
    assert float((before.double() - want).abs().max()) < (1e-5 if dtype == torch.float32 else 2e-2)
    cuda, cpu, _ = _pair(2, 128, dtype, n=500, block=64, device_blocks=0, reader="zero-copy")
    _append(cuda, cpu, k, v)
    _check_attention(cuda, cpu, q, dtype, 128**-0.5, None, None)
    ko2, vo2, after = _exact_run(dtype, k, v, q)
    assert torch.equal(ko2, k) and torch.equal(vo2, v)
    assert torch.equal(after, before)
