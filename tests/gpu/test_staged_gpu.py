"""The copy engine as a decode reader (src/attention/staged.rs): a layer's host blocks staged
into device buffers piece by piece while the kernel attends over the previous piece. Against
float64 for each reader ("copy" and "zero-copy"), with pieces that cut blocks unevenly, device
blocks before host ones, windows and soft-capping, the CPU share on and off, appends between
steps (fresh blocks), and through patch() for every family. float32 within 1e-4; bfloat16
within twice torch's own error."""

from __future__ import annotations

import faulthandler

import pytest
import torch
from _reference import reference
from _tiny import FAMILIES, prompt, rel_err, tiny_model, twin

import headinfer
from headinfer import _core
from headinfer.prefill import cache_kwarg_name

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"
READERS = ["copy", "zero-copy"]


@pytest.fixture(autouse=True)
def _watchdog():
    """A hung stream dumps every thread's stack and ends the run after 5 minutes."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _store(hkv, d, n, *, block, device_blocks, dtype, window=None, reader="copy", piece=None):
    es = torch.empty((), dtype=dtype).element_size()
    store = _core.KVStore(
        1,
        hkv,
        d,
        str(dtype).removeprefix("torch."),
        block_size=block,
        windows=[window],
        device=0,
        device_budget=device_blocks * 2 * block * d * es,
        max_len=n + 64 * block,
    )
    store.host_reader = reader
    if piece is not None:
        store.staging_piece_bytes = piece
    return store


def _check(out, q, k, v, scale, dtype, **kw):
    want = reference(q, k, v, scale, **kw)
    ours = (out.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert ours < 1e-4, ours
    else:
        g = q.shape[0] // k.shape[0]
        kk, vv = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        s = (q @ kk.transpose(1, 2)) * scale
        if kw.get("softcap"):
            s = kw["softcap"] * torch.tanh(s / kw["softcap"])
        lk, lq = k.shape[1], q.shape[1]
        i = torch.arange(lk - lq, lk, device=DEV)[:, None]
        j = torch.arange(lk, device=DEV)[None]
        mask = j > i
        if kw.get("window"):
            mask |= i - j >= kw["window"]
        std = s.masked_fill(mask, float("-inf")).softmax(-1) @ vv
        torch_err = (std.double() - want).abs().max().item()
        assert ours <= 2 * torch_err + 1e-3, (ours, torch_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "case",
    [
        # (kv heads, group, head_dim, tokens, block, device blocks, window, softcap, piece rows)
        (3, 4, 128, 5000, 256, 4, None, None, 700),  # pieces cut blocks unevenly
        (2, 1, 64, 3001, 128, 0, None, 30.0, None),  # all on the host, soft-capping
        (4, 8, 128, 4100, 256, 6, 1000, None, 300),  # a window: only its blocks staged
        (1, 3, 256, 999, 64, 1, None, None, 65),  # one kv head of 256, 65-row pieces
    ],
)
def test_each_reader_is_exact(case, reader, dtype):
    torch.manual_seed(3)
    hkv, g, d, n, block, dev_blocks, window, softcap, piece_rows = case
    es = torch.empty((), dtype=dtype).element_size()
    piece = None if piece_rows is None else 2 * piece_rows * d * es
    store = _store(
        hkv,
        d,
        n,
        block=block,
        device_blocks=dev_blocks,
        dtype=dtype,
        window=window,
        reader=reader,
        piece=piece,
    )
    k = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
    v = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
    store.append(0, k, v)
    assert store.host_reader_used == reader
    scale = d**-0.5
    # Several queries per head too (8-row CTAs); a window's store keeps only what the last
    # query needs, so one query there.
    for q_len in (1,) if window else (1, 3):
        q = torch.randn(hkv * g, q_len, d, device=DEV, dtype=dtype)
        out = torch.full_like(q, float("nan"))
        store.attend(0, q, out, scale, softcap=softcap, window=window)
        store.finish_step()
        torch.cuda.synchronize()
        assert not out.isnan().any()
        _check(out, q, k, v, scale, dtype, softcap=softcap, window=window)
    if reader == "copy":
        assert store.staging_bytes > 0
    else:
        assert store.staging_bytes == 0


@pytest.mark.parametrize("cpu_heads", [0, 2])
def test_decode_steps_with_appends_stay_exact(cpu_heads):
    """Steps that append a token before attending (the fresh block copies after the append),
    across block boundaries, with pieces of 2.5 blocks, the CPU taking a share or not."""
    torch.manual_seed(4)
    hkv, g, d, n, block = 4, 4, 128, 2000, 64
    store = _store(
        hkv,
        d,
        n,
        block=block,
        device_blocks=3,
        dtype=torch.float32,
        piece=2 * (5 * block // 2) * d * 4,
    )
    store.cpu_heads = cpu_heads
    store.cpu_share_min_tokens = 0
    store.share_threads = 2
    k = torch.randn(hkv, n, d, device=DEV)
    v = torch.randn(hkv, n, d, device=DEV)
    store.append(0, k, v)
    scale = d**-0.5
    outs, ks, vs = [], [k], [v]
    for _ in range(150):
        k1 = torch.randn(hkv, 1, d, device=DEV)
        v1 = torch.randn(hkv, 1, d, device=DEV)
        store.append(0, k1, v1)
        ks.append(k1)
        vs.append(v1)
        q = torch.randn(hkv * g, 1, d, device=DEV)
        out = torch.empty_like(q)
        store.attend(0, q, out, scale)
        outs.append((out, q, torch.cat(ks, 1), torch.cat(vs, 1)))
    store.finish_step()
    torch.cuda.synchronize()
    if cpu_heads:
        assert store.cpu_split(0) is not None
    for out, q, kk, vv in outs[::10] + outs[-1:]:
        _check(out, q, kk, vv, scale, torch.float32)


def test_the_piece_size_is_checked_and_the_ring_is_remade():
    store = _store(2, 64, 600, block=64, device_blocks=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="^staging_piece_bytes:"):
        store.staging_piece_bytes = 100  # under one key and one value row (512 bytes)
    with pytest.raises(ValueError, match="^staging_piece_bytes:"):
        store.staging_piece_bytes = 1000  # not a multiple of 16
    k = torch.randn(2, 600, 64, device=DEV)
    store.append(0, k, k)
    q = torch.randn(2, 1, 64, device=DEV)
    out = torch.empty_like(q)
    store.attend(0, q, out, 0.125)
    torch.cuda.synchronize()
    first = store.staging_bytes
    store.staging_piece_bytes = 2 * 100 * 64 * 4
    store.attend(0, q, out, 0.125)
    torch.cuda.synchronize()
    assert store.staging_bytes != first and store.staging_bytes > 0
    _check(out, q, k, k, 0.125, torch.float32)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_float32_matches_eager_with_each_reader(
    family, reader, kv_on_host, monkeypatch
):
    """Patched prefill and decode with every KV byte on the host, read by `reader`, against
    eager: float32 within 1e-4."""
    monkeypatch.setenv("HEADINFER_HOST_READER", reader)
    model = tiny_model(family).to(DEV)
    ref = twin(model)
    headinfer.patch(model, chunk_size=97, block_size=16, cpu_heads=0)
    ids = prompt().to(DEV)
    name = cache_kwarg_name(model)
    cache = headinfer.HeadInferCache(model)
    n = ids.shape[1] - 6
    with torch.no_grad():
        out = model(ids[:, :n], use_cache=True, **{name: cache})
        got = [out.logits[:, -1]]
        for i in range(n, ids.shape[1] - 1):
            got.append(model(ids[:, i : i + 1], use_cache=True, **{name: cache}).logits[:, -1])
        want = ref(ids, use_cache=True).logits[:, n - 1 : ids.shape[1] - 1]
    assert rel_err(torch.stack(got, 1), want) < 1e-4
    assert cache.share_plan()["host_reader"] == [reader]


def test_the_buffer_count_is_checked_and_the_ring_is_remade():
    # Pieces of two keys each: a decode over 600 keys cycles the ring many times, so a ring of
    # two buffers and one of nine both reuse every buffer within one step.
    store = _store(2, 64, 600, block=64, device_blocks=0, dtype=torch.float32, piece=2 * 2 * 64 * 4)
    assert store.staging_buffers == 3
    with pytest.raises(ValueError, match="^staging_buffers:"):
        store.staging_buffers = 1
    k = torch.randn(2, 600, 64, device=DEV)
    v = torch.randn(2, 600, 64, device=DEV)
    store.append(0, k, v)
    q = torch.randn(2, 1, 64, device=DEV)
    for buffers in (2, 9, 3):
        store.staging_buffers = buffers
        out = torch.empty_like(q)
        store.attend(0, q, out, 0.125)
        torch.cuda.synchronize()
        assert store.staging_buffers == buffers
        assert store.staging_bytes == buffers * store.staging_piece_bytes
        _check(out, q, k, v, 0.125, torch.float32)
