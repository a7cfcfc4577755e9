"""The Rust core on CUDA tensors: store, decode kernel, gather, dense op, memory.

Each result is checked against attention computed by torch in float64 on the same inputs;
bf16 and f16 against twice PyTorch's own error (SDPA in that dtype) against that reference.
"""

from __future__ import annotations

import gc

import pytest
import torch
from _reference import reference

from headinfer import _core

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"


def torch_error(q, k, v, scale, ref):
    """PyTorch's own error in q's dtype (SDPA on GQA-expanded inputs, no window/softcap)."""
    hq, lq, _ = q.shape
    g = hq // k.shape[0]
    lk = k.shape[1]
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[None],
        k.repeat_interleave(g, 0)[None],
        v.repeat_interleave(g, 0)[None],
        attn_mask=mask,
        scale=scale,
    )[0]
    return (out.double() - ref).abs().max().item()


def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def make_store(hkv, d, dtype, *, layers=1, block=64, windows=None, budget=0, max_len=1 << 16):
    return _core.KVStore(
        layers,
        hkv,
        d,
        str(dtype).removeprefix("torch."),
        block_size=block,
        windows=windows,
        device=0,
        device_budget=budget,
        max_len=max_len,
    )


def fill(store, layer, k, v, chunks):
    """Appends k, v [hkv, L, d] in chunks of the given lengths."""
    stream = torch.cuda.current_stream().cuda_stream
    a = 0
    for n in chunks:
        store.append(layer, k[:, a : a + n], v[:, a : a + n], stream=stream)
        a += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budget_blocks", [0, 3, 1000])  # all host, mixed, all device
@pytest.mark.parametrize("hkv,g,d", [(2, 4, 128), (3, 3, 64), (1, 2, 256)])
def test_decode_and_chunks_match_reference(dtype, budget_blocks, hkv, g, d):
    torch.manual_seed(hkv * 100 + d)
    L, block = 1000, 64
    k = torch.randn(hkv, L, d, device=DEV, dtype=dtype)
    v = torch.randn(hkv, L, d, device=DEV, dtype=dtype)
    budget = budget_blocks * 2 * block * d * k.element_size()
    store = make_store(hkv, d, dtype, block=block, budget=budget)
    fill(store, 0, k, v, [300, 1, 77, 500, 122])
    stream = torch.cuda.current_stream().cuda_stream
    scale = d**-0.5
    for lq in [1, 5, 122]:
        q = torch.randn(hkv * g, lq, d, device=DEV, dtype=dtype)
        out = torch.full_like(q, float("nan"))
        store.attend(0, q, out, scale, stream=stream)
        ref = reference(q, k, v, scale)
        err = (out.double() - ref).abs().max().item()
        if dtype == torch.float32:
            assert rel(out, ref) < 1e-4, (lq, err)
        else:
            assert err <= 2 * torch_error(q, k, v, scale, ref) + 1e-6, (lq, err)
    if budget_blocks == 1000:
        assert store.device_bytes_used() == store.bytes_used()
    if budget_blocks == 0:
        assert store.device_bytes_reserved() == 0


@pytest.mark.parametrize("softcap,window", [(None, 100), (30.0, None), (50.0, 70)])
def test_softcap_and_window(softcap, window):
    torch.manual_seed(1)
    hkv, g, d, L = 2, 2, 64, 700
    dtype = torch.float32
    k = torch.randn(hkv, L, d, device=DEV, dtype=dtype)
    v = torch.randn(hkv, L, d, device=DEV, dtype=dtype)
    store = make_store(hkv, d, dtype, block=32, windows=[window], budget=10 * 2 * 32 * d * 4)
    fill(store, 0, k, v, [200, 300, 199, 1])
    if window:
        assert store.retained_start(0) > 0
    q = torch.randn(hkv * g, 1, d, device=DEV, dtype=dtype)
    out = torch.empty_like(q)
    store.attend(
        0,
        q,
        out,
        0.1,
        softcap=softcap,
        window=window,
        stream=torch.cuda.current_stream().cuda_stream,
    )
    assert rel(out, reference(q, k, v, 0.1, softcap=softcap, window=window)) < 1e-4


def test_dense_op_and_gather_match():
    torch.manual_seed(2)
    hkv, g, d, L = 2, 4, 128, 513
    dtype = torch.bfloat16
    k = torch.randn(hkv, L, d, device=DEV, dtype=dtype)
    v = torch.randn(hkv, L, d, device=DEV, dtype=dtype)
    q = torch.randn(hkv * g, 40, d, device=DEV, dtype=dtype)
    out = torch.empty_like(q)
    _core.attention(q, k, v, out, d**-0.5, stream=torch.cuda.current_stream().cuda_stream)
    ref = reference(q, k, v, d**-0.5)
    assert (out.double() - ref).abs().max().item() <= 2 * torch_error(q, k, v, d**-0.5, ref) + 1e-6
    store = make_store(hkv, d, dtype, block=64, budget=2 * 2 * 64 * d * 2)
    fill(store, 0, k, v, [500, 13])
    ko = torch.empty(1, L - 100, d, device=DEV, dtype=dtype)
    vo = torch.empty_like(ko)
    store.gather(0, 1, 1, 100, L, ko, vo, stream=torch.cuda.current_stream().cuda_stream)
    assert torch.equal(ko[0], k[1, 100:]) and torch.equal(vo[0], v[1, 100:])


def test_crop_then_append_and_errors():
    torch.manual_seed(3)
    hkv, d = 2, 64
    k = torch.randn(hkv, 300, d, device=DEV)
    v = torch.randn(hkv, 300, d, device=DEV)
    store = make_store(hkv, d, torch.float32, block=32, budget=4 * 2 * 32 * d * 4, max_len=512)
    fill(store, 0, k, v, [300])
    store.crop(150)
    k2 = torch.randn(hkv, 50, d, device=DEV)
    v2 = torch.randn(hkv, 50, d, device=DEV)
    fill(store, 0, k2, v2, [50])
    kk = torch.cat([k[:, :150], k2], 1)
    vv = torch.cat([v[:, :150], v2], 1)
    q = torch.randn(hkv, 1, d, device=DEV)
    out = torch.empty_like(q)
    store.attend(0, q, out, 0.125, stream=torch.cuda.current_stream().cuda_stream)
    assert rel(out, reference(q, kk, vv, 0.125)) < 1e-4
    with pytest.raises(ValueError, match="max_len"):
        big = torch.randn(hkv, 400, d, device=DEV)
        fill(store, 0, big, big, [400])
    assert store.seq_len(0) == 200
    with pytest.raises(TypeError, match="query"):
        store.attend(0, q.cpu(), out.cpu(), 0.125)
    with pytest.raises(TypeError, match="dtype"):
        store.attend(0, q.half(), out.half(), 0.125)
    store.attend(0, q, out, 0.125, stream=torch.cuda.current_stream().cuda_stream)
    assert rel(out, reference(q, kk, vv, 0.125)) < 1e-4


def test_memory_returns_to_start_over_cycles():
    gc.collect()  # stores earlier tests left to the cyclic collector (and their staging)
    torch.cuda.synchronize()
    _core.release_pinned_pool()
    start_pinned = _core.pinned_bytes()
    start_dev = _core.device_block_bytes()
    peak_pinned = 0
    for i in range(20):
        store = make_store(2, 128, torch.bfloat16, layers=2, block=256, budget=4 * 2 * 256 * 256)
        k = torch.randn(2, 3000, 128, device=DEV, dtype=torch.bfloat16)
        fill(store, 0, k, k, [3000])
        fill(store, 1, k, k, [1000, 2000])
        assert store.host_bytes_reserved() > 0 and store.device_bytes_reserved() > 0
        del store
        gc.collect()
        peak_pinned = max(peak_pinned, _core.pinned_bytes())
        if i == 0:
            after_first = _core.pinned_bytes()
    assert _core.pinned_bytes() == after_first, "the pool is reused, not grown"
    assert _core.device_block_bytes() == start_dev
    _core.release_pinned_pool()
    # Releasing the pool also frees what earlier tests left in it.
    assert _core.pinned_bytes() <= start_pinned


def test_the_pool_lets_go_of_blocks_another_format_cannot_use():
    # An exact cache dropped leaves its pinned blocks in the pool; an int8 cache's blocks have
    # another size, so the pool keeps for them only their own (a store reclaims this way when
    # the host's free memory falls short, as bench_kv_int8 found: exact 716,800, then int8).
    gc.collect()
    torch.cuda.synchronize()
    _core.release_pinned_pool()
    start = _core.pinned_bytes()
    k = torch.randn(2, 3000, 128, device=DEV, dtype=torch.bfloat16)
    exact = make_store(2, 128, torch.bfloat16, block=256)
    fill(exact, 0, k, k, [3000])
    del exact
    gc.collect()
    held = _core.pinned_bytes() - start
    assert held >= 2 * 2 * 3000 * 128 * 2 and _core.pinned_pool_bytes() >= held
    # (The int8 store's block table may come from the pool: one buffer of the exact's.)
    q8 = _core.KVStore(
        1, 2, 128, "bfloat16", block_size=256, device=0, max_len=4096, kv_dtype="int8"
    )
    fill(q8, 0, k, k, [3000])
    before = _core.pinned_bytes()
    kept = _core.release_pinned_pool(keep=256 * _core.kv_row_bytes(128, "bfloat16", "int8"))
    # The exact blocks are unpinned (at least their keys' and values' bytes); the int8
    # store's slab stays, and its rest is what the pool keeps.
    assert before - _core.pinned_bytes() >= 2 * 2 * 3000 * 128 * 2
    assert kept <= _core.pinned_pool_bytes() < held
    assert q8.host_bytes_reserved() > 0
    del q8
    gc.collect()
    assert _core.release_pinned_pool(keep=12345) == 0, "nothing pooled of that size"
    _core.release_pinned_pool()
    assert _core.pinned_bytes() <= start


@pytest.mark.parametrize("n", [997, 4099, 33333])
def test_lengths_that_split_unevenly(n):
    """Key ranges per CTA that are not multiples of the warp step (once a deadlock)."""
    torch.manual_seed(n)
    hkv, g, d = 8, 4, 128
    k = torch.randn(hkv, n, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(hkv, n, d, device=DEV, dtype=torch.bfloat16)
    store = make_store(hkv, d, torch.bfloat16, block=256, budget=0, max_len=n + 1)
    fill(store, 0, k, v, [n])
    q = torch.randn(hkv * g, 1, d, device=DEV, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    store.attend(0, q, out, d**-0.5, stream=torch.cuda.current_stream().cuda_stream)
    ref = reference(q, k, v, d**-0.5)
    assert (out.double() - ref).abs().max().item() <= 2 * torch_error(q, k, v, d**-0.5, ref) + 1e-6


@pytest.mark.parametrize("split", [False, True])
def test_the_copy_engine_waits_for_appends_still_queued(split):
    """The copy engine reads host blocks on a stream of its own: a decode step queued right
    after appends that the GPU has not run yet (the stream held back by a long kernel) sees the
    appended rows, not what the reused blocks held before. ``split``: the positions come in
    two appends (a prefill, then the step's token), else in one."""
    torch.manual_seed(11)
    hkv, g, d, n = 2, 4, 128, 4000
    k, v = (torch.randn(hkv, n, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    store = make_store(hkv, d, torch.bfloat16, block=256, budget=0, max_len=n + 1)
    store.host_reader = "copy"
    stream = torch.cuda.current_stream().cuda_stream
    fill(store, 0, -k, -v, [n])  # stale rows the blocks keep after the crop
    torch.cuda.synchronize()
    store.crop(0)
    q = torch.randn(hkv * g, 1, d, device=DEV, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    torch.cuda._sleep(2_000_000_000)  # about a second: the appends below wait behind it
    fill(store, 0, k, v, [n - 1, 1] if split else [n])
    store.attend(0, q, out, d**-0.5, stream=stream)
    ref = reference(q, k, v, d**-0.5)
    assert (out.double() - ref).abs().max().item() <= 2 * torch_error(q, k, v, d**-0.5, ref) + 1e-6


def test_rebalance_moves_blocks_both_ways_and_keeps_results():
    torch.manual_seed(4)
    hkv, g, d, n, block = 2, 4, 128, 2000, 128
    k = torch.randn(hkv, n, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(hkv, n, d, device=DEV, dtype=torch.bfloat16)
    pair = 2 * block * d * 2
    store = make_store(hkv, d, torch.bfloat16, layers=2, block=block, budget=3 * pair)
    fill(store, 0, k, v, [n])
    fill(store, 1, k, v, [700, 1300])
    stream = torch.cuda.current_stream().cuda_stream
    q = torch.randn(hkv * g, 1, d, device=DEV, dtype=torch.bfloat16)

    def check():
        for layer in (0, 1):
            out = torch.full_like(q, float("nan"))
            store.attend(layer, q, out, d**-0.5, stream=stream)
            ref = reference(q, k, v, d**-0.5)
            assert (out.double() - ref).abs().max().item() <= 2 * torch_error(
                q, k, v, d**-0.5, ref
            ) + 1e-6

    check()
    assert store.device_bytes_reserved() == 3 * pair
    store.device_budget = 20 * pair
    assert store.rebalance(stream) == (17, 0)
    assert store.device_bytes_reserved() == 20 * pair
    check()
    store.device_budget = pair
    promoted, demoted = store.rebalance(stream)
    assert promoted == 0 and demoted == 19
    assert store.device_bytes_reserved() == pair
    check()
    fill(store, 0, k[:, :10], v[:, :10], [10])  # growth still works after the moves
    assert store.seq_len(0) == n + 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cpu_heads", [1, 2, 3])
@pytest.mark.parametrize("softcap,window", [(None, None), (20.0, 700)])
def test_shared_decode_cpu_and_gpu_match_reference(dtype, cpu_heads, softcap, window):
    """The CPU attends over the host blocks of the first kv heads while the GPU reads the rest;
    the merged result is the same function."""
    torch.manual_seed(5 + cpu_heads)
    hkv, g, d, n, block = 3, 2, 64, 2000, 128
    k = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
    v = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
    pair = 2 * block * d * k.element_size()
    # With a window, dropped device blocks are reused for later positions, which breaks the
    # device-then-host order a share needs: keep everything on the host there.
    budget = 0 if window else 7 * pair
    store = make_store(hkv, d, dtype, block=block, budget=budget, windows=[window])
    fill(store, 0, k, v, [1500, 500])
    assert store.cpu_split(0) is None  # cpu_heads is 0: the GPU alone
    store.cpu_heads = cpu_heads
    store.cpu_share_min_tokens = 0
    share = store.cpu_split(0)
    assert share is not None and len(share) == cpu_heads
    assert all(s % block == 0 and s < n for s in share)
    stream = torch.cuda.current_stream().cuda_stream
    q = torch.randn(hkv * g, 1, d, device=DEV, dtype=dtype)
    out = torch.full_like(q, float("nan"))
    store.attend(0, q, out, d**-0.5, softcap, window, stream)
    store.finish_step()
    ref = reference(q, k, v, d**-0.5, softcap=softcap, window=window)
    if dtype == torch.float32:
        assert rel(out, ref) < 1e-4
    else:
        store.cpu_heads = 0
        plain = torch.empty_like(q)
        store.attend(0, q, plain, d**-0.5, softcap, window, stream)
        store.cpu_heads = cpu_heads
        err_plain = (plain.double() - ref).abs().max().item()
        assert (out.double() - ref).abs().max().item() <= 2 * err_plain + 1e-2
    # Many layers' worth of shared decodes queued back to back, then one wait.
    outs = [torch.full_like(q, float("nan")) for _ in range(6)]
    for o in outs:
        store.attend(0, q, o, d**-0.5, softcap, window, stream)
    store.finish_step()
    torch.cuda.synchronize()
    assert all(torch.equal(o, out) for o in outs)
    # A query that is not one contiguous row per head goes to the GPU alone, still exact.
    q2 = torch.randn(hkv * g, 2, d, device=DEV, dtype=dtype)
    o2 = torch.empty_like(q2)
    store.attend(0, q2[:, 1:], o2[:, 1:], d**-0.5, softcap, window, stream)
    store.cpu_heads = 0
    o3 = torch.empty_like(q2)
    store.attend(0, q2[:, 1:], o3[:, 1:], d**-0.5, softcap, window, stream)
    assert torch.equal(o2[:, 1:], o3[:, 1:])
