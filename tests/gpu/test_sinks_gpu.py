"""gpt-oss's attention sinks on the GPU: the decode kernel (the sink folded once per row by the
split merge), the shared CPU+GPU decode (CPU rows merged without the sink, the GPU adding it
once), the dense op, the prefill two-part path, and a tiny gpt-oss against eager in every
residency.

Each result is checked against a float64 reference with the sink as one more logit; bf16 and
f16 against twice PyTorch's own error. Every test runs under a watchdog: a hang dumps every
thread's stack and ends the process. Run under `timeout` as well.
"""

from __future__ import annotations

import faulthandler

import pytest
import torch
from _reference import reference
from _tiny import prompt, rel_err
from _tiny_gpt_oss import tiny_gpt_oss

import headinfer
from headinfer import _core
from headinfer.prefill import cache_kwarg_name
from headinfer.prefill_attention import _two_part

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"
WATCHDOG_S = 240


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def torch_error(q, k, v, scale, ref, sinks):
    """PyTorch's own error in q's dtype: eager gpt-oss attention (scores, sink column, softmax
    in q's dtype) on GQA-expanded inputs."""
    hq, lq, _ = q.shape
    g = hq // k.shape[0]
    lk = k.shape[1]
    kk = k.repeat_interleave(g, 0)
    vv = v.repeat_interleave(g, 0)
    s = q @ kk.transpose(1, 2) * scale
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    s = s.masked_fill(~mask, float("-inf"))
    col = sinks.to(q.dtype)[:, None, None].expand(hq, lq, 1)
    p = torch.cat([s, col], -1).softmax(-1)[..., :-1]
    return ((p @ vv).double() - ref).abs().max().item()


def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def make_store(hkv, d, dtype, *, block=64, windows=None, budget=0, max_len=1 << 16, cpu_heads=0):
    store = _core.KVStore(
        1,
        hkv,
        d,
        str(dtype).removeprefix("torch."),
        block_size=block,
        windows=windows,
        device=0,
        device_budget=budget,
        max_len=max_len,
        cpu_heads=cpu_heads,
    )
    store.cpu_share_min_tokens = 0
    return store


def fill(store, k, v, chunks):
    a = 0
    for n in chunks:
        store.append(0, k[:, a : a + n], v[:, a : a + n], stream=stream())
        a += n


def sinks_for(hq, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(hq, generator=g) * 3
    s[0] = 40.0  # the sink takes the whole softmax
    s[-1] = -40.0  # the sink changes nothing
    return s.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budget_blocks", [0, 3, 1000])  # all host, mixed, all device
@pytest.mark.parametrize("hkv,g,d", [(2, 4, 128), (8, 8, 64), (1, 2, 256)])
def test_decode_kernel_folds_the_sink_once_per_row(dtype, budget_blocks, hkv, g, d):
    # 20000 keys: the kernel splits every row's keys into many CTAs merged by log-sum-exp; a
    # sink counted per split would be far off the reference.
    torch.manual_seed(hkv * 100 + d)
    n, block = 20_000, 64
    k = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
    v = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
    budget = budget_blocks * 2 * block * d * k.element_size()
    store = make_store(hkv, d, dtype, block=block, budget=budget)
    fill(store, k, v, [7000, 1, 12_999])
    sinks = sinks_for(hkv * g, seed=d)
    scale = d**-0.5
    for lq in [1, 5, 122]:
        q = torch.randn(hkv * g, lq, d, device=DEV, dtype=dtype)
        out = torch.full_like(q, float("nan"))
        store.attend(0, q, out, scale, stream=stream(), sinks=sinks)
        ref = reference(q, k, v, scale, sinks=sinks)
        if dtype == torch.float32:
            assert rel(out, ref) < 1e-4, lq
        else:
            err = (out.double() - ref).abs().max().item()
            assert err <= 2 * torch_error(q, k, v, scale, ref, sinks) + 1e-6, (lq, err)
        assert rel(reference(q, k, v, scale), ref) > 1e-2  # the sinks matter


@pytest.mark.parametrize("softcap,window", [(None, 100), (30.0, None), (50.0, 70)])
def test_decode_kernel_sinks_with_softcap_and_window(softcap, window):
    torch.manual_seed(1)
    hkv, g, d, n = 2, 2, 64, 700
    k = torch.randn(hkv, n, d, device=DEV)
    v = torch.randn(hkv, n, d, device=DEV)
    budget = 10 * 2 * 32 * d * 4
    store = make_store(hkv, d, torch.float32, block=32, windows=[window], budget=budget)
    fill(store, k, v, [200, 300, 199, 1])
    sinks = sinks_for(hkv * g, seed=2)
    q = torch.randn(hkv * g, 1, d, device=DEV)
    out = torch.empty_like(q)
    store.attend(0, q, out, 0.1, softcap, window, stream=stream(), sinks=sinks)
    assert rel(out, reference(q, k, v, 0.1, sinks=sinks, softcap=softcap, window=window)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_decode_adds_the_sink_once(dtype):
    # The CPU attends over kv heads 0..cpu_heads of the host blocks, the GPU over the rest; the
    # GPU's merge adds the sink once per row (the CPU's rows come without it).
    torch.manual_seed(4)
    hkv, g, d, n, block = 4, 4, 128, 30_000, 256
    store = make_store(hkv, d, dtype, block=block, budget=0, max_len=n + 4 * block, cpu_heads=3)
    k = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
    v = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
    store.append(0, k, v, stream=stream())
    assert store.cpu_split(0) is not None
    sinks = sinks_for(hkv * g, seed=5)
    scale = d**-0.5
    for _ in range(3):
        q = torch.randn(hkv * g, 1, d, device=DEV, dtype=dtype)
        out = torch.full_like(q, float("nan"))
        store.attend(0, q, out, scale, stream=stream(), sinks=sinks)
        store.finish_step()
        ref = reference(q, k, v, scale, sinks=sinks)
        if dtype == torch.float32:
            assert rel(out, ref) < 1e-4
        else:
            err = (out.double() - ref).abs().max().item()
            assert err <= 2 * torch_error(q, k, v, scale, ref, sinks) + 1e-6, err


def test_dense_op_with_sinks_and_its_checks():
    torch.manual_seed(2)
    hkv, g, d, n = 2, 4, 64, 1500
    for dtype in [torch.float32, torch.bfloat16]:
        k = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
        v = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
        sinks = sinks_for(hkv * g, seed=3)
        for lq, softcap, window in [(1, None, None), (40, None, 64), (300, 20.0, 100)]:
            q = torch.randn(hkv * g, lq, d, device=DEV, dtype=dtype)
            out = torch.empty_like(q)
            _core.attention(q, k, v, out, d**-0.5, softcap, window, stream=stream(), sinks=sinks)
            ref = reference(q, k, v, d**-0.5, sinks=sinks, softcap=softcap, window=window)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert rel(out, ref) < tol, (dtype, lq)
    q = torch.randn(hkv * g, 1, d, device=DEV)
    k = torch.randn(hkv, 10, d, device=DEV)
    out = torch.empty_like(q)
    with pytest.raises(TypeError, match="sinks"):
        _core.attention(q, k, k, out, 0.1, stream=stream(), sinks=torch.zeros(hkv * g))
    with pytest.raises(TypeError, match="sinks: must be float32"):
        _core.attention(
            q, k, k, out, 0.1, stream=stream(), sinks=torch.zeros(hkv * g, device=DEV).half()
        )
    with pytest.raises(ValueError, match="sinks: expected shape"):
        _core.attention(q, k, k, out, 0.1, stream=stream(), sinks=torch.zeros(3, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("past", [0, 300])
def test_prefill_two_part_merge_folds_the_sink(dtype, past):
    # The cuDNN (bf16) / efficient (f32) path: the chunk over itself and over the past, merged
    # by log-sum-exp, with the sink one more term of the final denominator.
    torch.manual_seed(6)
    n, g, c, d = 2, 4, 200, 64
    q = torch.randn(1, n * g, c, d, device=DEV, dtype=dtype)
    k = torch.randn(n, past + c, d, device=DEV, dtype=dtype)
    v = torch.randn(n, past + c, d, device=DEV, dtype=dtype)
    sinks = sinks_for(n * g, seed=7)
    # As the store's gather and the model hand them over: contiguous past, strided chunk.
    kp, vp = (None, None) if past == 0 else (k[:, :past].contiguous(), v[:, :past].contiguous())
    out = _two_part(q, kp, vp, k[:, past:], v[:, past:], d**-0.5, sinks)
    ref = reference(q[0], k, v, d**-0.5, sinks=sinks)
    if dtype == torch.float32:
        assert rel(out[0], ref) < 1e-4
    else:
        err = (out[0].double() - ref).abs().max().item()
        assert err <= 2 * torch_error(q[0], k, v, d**-0.5, ref, sinks) + 1e-6, err


#: Resident KV block pairs the planner may give, per residency (None: what it gives). With 0
#: every KV byte is read from pinned host memory ("shared": the CPU attending over one kv
#: head's host blocks in decode); "mixed" also stages one kv head at a time in prefill.
RESIDENT_BLOCKS = {"resident": None, "streamed": 0, "mixed": 5, "shared": 0}
STEPS = 8


def _residency(monkeypatch, residency):
    """Caps the planner's resident KV as ``RESIDENT_BLOCKS`` says (a tiny ``gpu_budget`` is
    refused before prefill, so the plan is capped instead)."""
    import headinfer.cache as cache_mod

    if residency == "shared":
        ensure = cache_mod.HeadInferCache._ensure_store

        def short_shares_too(self, dtype, device):
            store = ensure(self, dtype, device)
            store.cpu_share_min_tokens = 0  # shares however short the host part
            return store

        monkeypatch.setattr(cache_mod.HeadInferCache, "_ensure_store", short_shares_too)
    blocks = RESIDENT_BLOCKS[residency]
    if blocks is None:
        return
    original = cache_mod.plan_memory

    def capped(*args, **kwargs):
        plan = original(*args, **kwargs)
        spec = args[1]
        block = 2 * 16 * spec.head_dim * torch.empty((), dtype=kwargs["dtype"]).element_size()
        plan.kv_device_bytes = min(plan.kv_device_bytes, blocks * block)
        if residency == "mixed":
            plan.heads_per_group = 1
        return plan

    monkeypatch.setattr(cache_mod, "plan_memory", capped)


def _logits(model, ids):
    """Prefill logits of every position, then STEPS teacher-forced decode steps' logits."""
    name = cache_kwarg_name(model)
    with torch.no_grad():
        n = ids.shape[1] - STEPS
        out = model(ids[:, :n], use_cache=True)
        prefill = out.logits
        cache = out.get(name)
        steps = []
        for i in range(n, ids.shape[1]):
            out = model(ids[:, i : i + 1], use_cache=True, **{name: cache})
            cache = out.get(name)
            steps.append(out.logits)
    return torch.cat([prefill, *steps], 1)


def _patched(model, residency):
    return headinfer.patch(
        model, chunk_size=97, block_size=16, cpu_heads=1 if residency == "shared" else None
    )


@pytest.mark.parametrize("residency", list(RESIDENT_BLOCKS))
def test_tiny_gpt_oss_float32_matches_eager(residency, monkeypatch):
    _residency(monkeypatch, residency)
    ref = tiny_gpt_oss().to(DEV)
    model = _patched(tiny_gpt_oss().to(DEV), residency)
    ids = prompt().to(DEV)
    assert rel_err(_logits(model, ids), _logits(ref, ids)) < 1e-4


@pytest.mark.parametrize("residency", ["resident", "streamed"])
def test_tiny_gpt_oss_bfloat16_within_twice_torch_error(residency, monkeypatch):
    _residency(monkeypatch, residency)
    exact = tiny_gpt_oss().to(DEV, torch.float64)
    std = tiny_gpt_oss().to(DEV, torch.bfloat16)
    model = _patched(tiny_gpt_oss().to(DEV, torch.bfloat16), residency)
    ids = prompt().to(DEV)
    want = _logits(exact, ids)
    torch_err = (_logits(std, ids).double() - want).abs().max().item()
    ours = (_logits(model, ids).double() - want).abs().max().item()
    assert ours <= 2 * torch_err + 1e-3, (ours, torch_err)
