"""``KVStore.checkpoint/commit/rollback`` on CUDA stores (``src/store/checkpoint.rs``): a step
whose appends cross sliding-window block boundaries, undone or kept, with device-resident,
host-resident (pinned) and mixed blocks, with work still in flight when the step ends.

Each test runs under a watchdog (``faulthandler.dump_traceback_later``) that dumps every
thread's stack and exits if it hangs.
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
HKV, G, D, BLOCK, WINDOW = 2, 2, 64, 32, 70


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _store(dtype, budget_pairs, cpu_heads=0):
    pair = 2 * BLOCK * D * torch.tensor([], dtype=dtype).element_size()
    store = _core.KVStore(
        2,
        HKV,
        D,
        str(dtype).removeprefix("torch."),
        block_size=BLOCK,
        windows=[WINDOW, None],
        device=0,
        device_budget=budget_pairs * pair,
        max_len=4096,
        cpu_heads=cpu_heads,
    )
    store.cpu_share_min_tokens = 0
    return store


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _append(store, k, v):
    for layer in range(2):
        store.append(layer, k, v, stream=_stream())


def _read(store, q):
    """Per layer: decode attention of q, and the held keys and values (gathered)."""
    got = []
    for layer in range(2):
        out = torch.full_like(q, float("nan"))
        store.attend(layer, q, out, D**-0.5, None, store.windows[layer], _stream())
        a, n = store.retained_start(layer), store.seq_len(layer)
        ko = torch.empty(HKV, n - a, D, device=DEV, dtype=q.dtype)
        vo = torch.empty_like(ko)
        store.gather(layer, 0, HKV, a, n, ko, vo, stream=_stream())
        got.append((a, n, out, ko, vo))
    store.finish_step()
    torch.cuda.synchronize()
    return got


def _same(x, y):
    """The same positions and keys/values, bit for bit; attention outputs equal up to the
    summation order (two stores whose blocks sit in different places read them by different
    readers: the resident kernel, the copy engine's pieces)."""

    def close(a, b):
        tol = 1e-5 if a.dtype == torch.float32 else 8e-3  # a last-bit difference of bf16
        return torch.equal(a, b) or (a - b).abs().max().item() <= tol * b.abs().max().item()

    return all(
        t[:2] == u[:2] and close(t[2], u[2]) and torch.equal(t[3], u[3]) and torch.equal(t[4], u[4])
        for t, u in zip(x, y)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "budget_pairs,cpu_heads",
    [(0, 0), (0, 1), (5, 0), (1000, 0)],
    ids=["host", "host-shared", "mixed", "device"],
)
def test_rollback_restores_attention_exactly(dtype, budget_pairs, cpu_heads):
    torch.manual_seed(11)
    n0 = 100
    k = torch.randn(HKV, 400, D, device=DEV, dtype=dtype)
    v = torch.randn(HKV, 400, D, device=DEV, dtype=dtype)
    q = torch.randn(HKV * G, 1, D, device=DEV, dtype=dtype)
    store = _store(dtype, budget_pairs, cpu_heads)
    _append(store, k[:, :n0], v[:, :n0])
    before = _read(store, q)
    reserved = store.bytes_reserved()
    store.checkpoint()
    assert store.in_step
    # Chunks that carry the window past every block held at the checkpoint, with attention
    # queued between them and nothing synchronized before the rollback.
    a = n0
    for n in (37, 64, 1, 90):
        kn = torch.randn(HKV, n, D, device=DEV, dtype=dtype)
        _append(store, kn, torch.randn_like(kn))
        out = torch.empty_like(q)
        store.attend(0, q, out, D**-0.5, None, WINDOW, _stream())
        a += n
    assert store.retained_start(0) >= n0, "the window let go of every block held before"
    assert store.bytes_reserved() > reserved
    store.rollback()
    assert not store.in_step
    after = _read(store, q)
    assert _same(after, before)
    for layer, window in ((0, WINDOW), (1, None)):
        ref = reference(q, k[:, :n0], v[:, :n0], D**-0.5, window=window)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert (after[layer][2].double() - ref).abs().max().item() < tol
    # The store continues from there exactly as one that never took the step.
    twin = _store(dtype, budget_pairs, cpu_heads)
    _append(twin, k[:, :n0], v[:, :n0])
    for s in (store, twin):
        _append(s, k[:, n0:300], v[:, n0:300])
    assert _same(_read(store, q), _read(twin, q))


@pytest.mark.parametrize("budget_pairs", [0, 5, 1000], ids=["host", "mixed", "device"])
def test_commit_keeps_the_step_and_releases_the_kept_blocks(budget_pairs):
    torch.manual_seed(12)
    dtype = torch.float32
    k = torch.randn(HKV, 400, D, device=DEV, dtype=dtype)
    v = torch.randn(HKV, 400, D, device=DEV, dtype=dtype)
    q = torch.randn(HKV * G, 1, D, device=DEV, dtype=dtype)
    store, twin = _store(dtype, budget_pairs), _store(dtype, budget_pairs)
    for s in (store, twin):
        _append(s, k[:, :100], v[:, :100])
    store.checkpoint()
    for s in (store, twin):
        for a, b in ((100, 137), (137, 230)):
            _append(s, k[:, a:b], v[:, a:b])
    store.commit()
    assert not store.in_step
    assert _same(_read(store, q), _read(twin, q))
    reserved = store.bytes_reserved()
    for s in (store, twin):
        _append(s, k[:, 230:262], v[:, 230:262])  # one block more: reuses a released one
    if budget_pairs != 5:  # mixed: a fresh device block within the budget may come first
        assert store.bytes_reserved() == reserved
    assert _same(_read(store, q), _read(twin, q))


def test_rebalance_inside_a_step_then_rollback():
    torch.manual_seed(13)
    dtype = torch.bfloat16
    pair = 2 * BLOCK * D * 2
    k = torch.randn(HKV, 400, D, device=DEV, dtype=dtype)
    v = torch.randn(HKV, 400, D, device=DEV, dtype=dtype)
    q = torch.randn(HKV * G, 1, D, device=DEV, dtype=dtype)
    store = _store(dtype, 3)
    _append(store, k[:, :100], v[:, :100])
    before = _read(store, q)
    store.checkpoint()
    _append(store, k[:, 100:190], v[:, 100:190])
    store.device_budget = 40 * pair
    store.rebalance(_stream())  # promotes the layers' host blocks; kept ones stay where they are
    _append(store, k[:, 190:230], v[:, 190:230])
    store.device_budget = pair
    store.rebalance(_stream())  # and demotes
    store.rollback()
    assert _same(_read(store, q), before)
    store.device_budget = 40 * pair
    store.rebalance(_stream())
    assert _same(_read(store, q), before)
    # Growth still works after the moves.
    _append(store, k[:, 100:300], v[:, 100:300])
    ref = reference(q, k[:, :300], v[:, :300], D**-0.5)
    out = _read(store, q)[1][2]
    assert (out.double() - ref).abs().max().item() < 2e-2
