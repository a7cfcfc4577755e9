"""The CPU share of decode on the GPU machine: no hang however much work is queued, failures
raise in their step and leave the cache usable, and the B10 boundary checks (gather strides,
devices, the default stream).

Every test runs under a watchdog: a hang dumps every thread's stack and ends the process
instead of stalling the run. Run under `timeout` as well.
"""

from __future__ import annotations

import faulthandler

import pytest
import torch
from _reference import reference
from _tiny import float64_twin, prompt, tiny_model, twin

import headinfer
from headinfer import _core
from headinfer.prefill import cache_kwarg_name

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
    _core._inject_failure(None)


def host_store(layers, hkv, d, n, *, block=256, cpu_heads=1, dtype=torch.float32):
    """A store whose KV sit in pinned host memory, `n` random tokens per layer, the CPU
    taking `cpu_heads` heads of every decode."""
    store = _core.KVStore(
        layers,
        hkv,
        d,
        str(dtype).removeprefix("torch."),
        block_size=block,
        device=0,
        device_budget=0,
        max_len=n + 4 * block,
        cpu_heads=cpu_heads,
    )
    store.cpu_share_min_tokens = 0
    kv = []
    for layer in range(layers):
        k = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
        v = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
        store.append(layer, k, v)
        kv.append((k, v))
    return store, kv


def test_queued_shared_decodes_never_hang_and_stay_exact():
    """Many layers of shared decode queued back to back, each step appending a token (new
    pinned blocks are allocated while the stream waits on the CPU), several steps between
    host waits: the shape that hung at 128K when a host function blocked the driver's thread."""
    torch.manual_seed(0)
    layers, hkv, g, d, n, block = 8, 4, 4, 128, 40_000, 512
    store, kv = host_store(layers, hkv, d, n, block=block, cpu_heads=3)
    assert store.cpu_split(0) is not None
    scale = d**-0.5
    q = torch.randn(hkv * g, 1, d, device=DEV)
    new = [[] for _ in range(layers)]
    checks = []
    for step in range(600):  # crosses a block boundary: allocations while work is queued
        for layer in range(layers):
            k1 = torch.randn(hkv, 1, d, device=DEV)
            store.append(layer, k1, k1)
            new[layer].append(k1)
            out = torch.empty_like(q)
            store.attend(layer, q, out, scale)
            if step % 97 == 0:
                checks.append((layer, len(new[layer]), out))
        if step % 8 == 7:
            store.finish_step()
    store.finish_step()
    torch.cuda.synchronize()
    for layer, count, out in checks:
        tail = torch.cat(new[layer][:count], 1)
        k = torch.cat([kv[layer][0], tail], 1)
        v = torch.cat([kv[layer][1], tail], 1)
        assert (out.double() - reference(q, k, v, scale)).abs().max() < 1e-4, (layer, count)


@pytest.mark.slow
def test_llama8b_shaped_128k_shared_decode_finishes():
    """A Llama-3-8B-shaped store (32 layers, 8 kv heads of 128, bf16) at 128K tokens, all on
    the host, cpu_heads=3: decode steps with appends finish (16 GiB pinned; a few seconds)."""
    torch.manual_seed(5)
    layers, hkv, g, d, n, block = 32, 8, 4, 128, 131_072, 4096
    store, kv = host_store(layers, hkv, d, n, block=block, cpu_heads=3, dtype=torch.bfloat16)
    del kv
    q = torch.randn(hkv * g, 1, d, device=DEV, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    for _ in range(20):
        for layer in range(layers):
            k1 = torch.randn(hkv, 1, d, device=DEV, dtype=torch.bfloat16)
            store.append(layer, k1, k1)
            store.attend(layer, q, out, d**-0.5)
        store.finish_step()
    torch.cuda.synchronize()
    assert store.seq_len(0) == n + 20 and out.isfinite().all()


@pytest.mark.parametrize("point", ["cpu_share", "cpu_share_panic"])
def test_a_failed_cpu_share_raises_in_its_step_and_the_next_step_is_exact(point):
    torch.manual_seed(1)
    hkv, g, d, n = 2, 4, 64, 3000
    store, kv = host_store(2, hkv, d, n, block=128, cpu_heads=2)
    q = torch.randn(hkv * g, 1, d, device=DEV)
    out = torch.empty_like(q)
    _core._inject_failure(point, after=1)  # the second layer's CPU share fails
    for layer in range(2):
        store.attend(layer, q, out, d**-0.5)  # queued: returns at once
    with pytest.raises(_core.HeadInferError, match=f"injected failure at {point}|injected panic"):
        store.finish_step()
    torch.cuda.synchronize()  # the stream was released: no hang
    store.finish_step()  # raised once
    for layer in range(2):
        out = torch.full_like(q, float("nan"))
        store.attend(layer, q, out, d**-0.5)
        store.finish_step()
        ref = reference(q, *kv[layer], d**-0.5)
        assert (out.double() - ref).abs().max() < 1e-4


def test_a_failed_launch_raises_at_once_and_the_store_stays_usable():
    torch.manual_seed(2)
    hkv, g, d, n = 2, 2, 64, 2000
    store, kv = host_store(1, hkv, d, n, block=128, cpu_heads=1)
    q = torch.randn(hkv * g, 1, d, device=DEV)
    out = torch.empty_like(q)
    for after in (0, 1):  # the partial kernel, then the merge
        _core._inject_failure("launch", after=after)
        with pytest.raises(_core.HeadInferError, match="injected failure at launch"):
            store.attend(0, q, out, d**-0.5)
        store.finish_step()
        torch.cuda.synchronize()
    store.attend(0, q, out, d**-0.5)
    store.finish_step()
    assert (out.double() - reference(q, *kv[0], d**-0.5)).abs().max() < 1e-4
    _core._inject_failure("alloc")
    k1 = torch.randn(hkv, 200, d, device=DEV)
    with pytest.raises(_core.HeadInferError, match="injected failure at alloc"):
        store.append(0, k1, k1)
    assert store.seq_len(0) == n


def _decode_with_failure(model, ids, steps, fail_at, point):
    """Greedy decode through an explicit cache; the step at `fail_at` tokens fails once (the
    point armed to fire in its second layer) and is retried."""
    name = cache_kwarg_name(model)
    cache = headinfer.HeadInferCache(model)
    failed = False
    with torch.no_grad():
        out = model(ids, use_cache=True, **{name: cache})
        tokens = [int(out.logits[0, -1].argmax())]
        while len(tokens) < steps:
            n = cache.get_seq_length()
            step = torch.tensor([[tokens[-1]]], device=DEV)
            if n == fail_at and not failed:
                _core._inject_failure(point, after=1)
                with pytest.raises(_core.HeadInferError, match="injected"):
                    model(step, use_cache=True, **{name: cache})
                _core._inject_failure(None)
                failed = True
                assert cache.get_seq_length() == n, "rolled back to the last complete token"
                continue
            out = model(step, use_cache=True, **{name: cache})
            tokens.append(int(out.logits[0, -1].argmax()))
    assert failed
    return tokens


@pytest.mark.parametrize("point", ["cpu_share", "cpu_share_panic", "launch"])
def test_a_failure_in_a_decode_step_raises_there_and_generation_continues_exactly(
    point, kv_on_host
):
    base = tiny_model("llama", max_position_embeddings=4096)
    ref = twin(base).to(DEV)
    model = twin(base).to(DEV)
    ids = prompt(600).to(DEV)
    want = ref.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
    # All KV on the host, the CPU taking one kv head of every decode.
    headinfer.patch(model, chunk_size=256, block_size=64, cpu_heads=1)
    import headinfer.cache as cache_mod

    ensure = cache_mod.HeadInferCache._ensure_store

    def short_shares_too(self, dtype, device):
        store = ensure(self, dtype, device)
        store.cpu_share_min_tokens = 0
        return store

    cache_mod.HeadInferCache._ensure_store = short_shares_too
    try:
        got = _decode_with_failure(model, ids, 16, 600 + 5, point)
    finally:
        cache_mod.HeadInferCache._ensure_store = ensure
    assert got == want


def test_gather_writes_each_output_with_its_own_strides():
    """B10: value_out with other strides than key_out (the fast copy path and the kernel)."""
    torch.manual_seed(3)
    hkv, d, n = 3, 64, 700
    store = _core.KVStore(
        1, hkv, d, "float32", block_size=64, device=0, device_budget=1 << 20, max_len=1024
    )
    k = torch.randn(hkv, n, d, device=DEV)
    v = torch.randn(hkv, n, d, device=DEV)
    store.append(0, k, v)
    a, b = 100, 650
    # Rows contiguous in both, heads far apart in value_out only: the copy-engine path.
    ko = torch.full((2, b - a, d), float("nan"), device=DEV)
    vbig = torch.full((2, 2 * (b - a), d), float("nan"), device=DEV)
    vo = vbig[:, : b - a]
    store.gather(0, 1, 2, a, b, ko, vo)
    torch.cuda.synchronize()
    assert torch.equal(ko, k[1:3, a:b]) and torch.equal(vo, v[1:3, a:b])
    assert vbig[:, b - a :].isnan().all(), "nothing written outside value_out"
    # Rows strided in key_out, packed in value_out: the kernel path.
    kbig = torch.full((b - a, 2, d), float("nan"), device=DEV)
    ko = kbig.transpose(0, 1)
    vo = torch.full((2, b - a, d), float("nan"), device=DEV)
    store.gather(0, 0, 2, a, b, ko, vo)
    torch.cuda.synchronize()
    assert torch.equal(ko, k[0:2, a:b]) and torch.equal(vo, v[0:2, a:b])


def test_stream_none_is_torchs_current_stream():
    """B10: without a stream, work is ordered on torch's current stream, not the legacy one."""
    torch.manual_seed(4)
    hkv, g, d, n = 2, 2, 64, 4096
    store = _core.KVStore(
        1, hkv, d, "float32", block_size=256, device=0, device_budget=1 << 30, max_len=n
    )
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        k = torch.randn(hkv, n, d, device=DEV)
        v = torch.randn(hkv, n, d, device=DEV)
        # A long op on `side` just before: an unordered append would read k, v too early.
        for _ in range(20):
            k = k * 1.0
        store.append(0, k, v)
        q = torch.randn(hkv * g, 1, d, device=DEV)
        out = torch.empty_like(q)
        store.attend(0, q, out, d**-0.5)
        side.synchronize()
    assert (out.double() - reference(q, k, v, d**-0.5)).abs().max() < 1e-4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_tensor_on_another_gpu_is_refused_by_name():
    store = _core.KVStore(1, 2, 64, "float32", device=0, device_budget=0, max_len=1024)
    k = torch.randn(2, 10, 64, device="cuda:1")
    with pytest.raises(ValueError, match="^key: is on cuda:1"):
        store.append(0, k, k)
    q = torch.randn(2, 1, 64, device="cuda:1")
    with pytest.raises(ValueError, match="^query: is on cuda:1"):
        store.attend(0, q, torch.empty_like(q), 0.1)
    k0 = torch.randn(2, 10, 64, device="cuda:0")
    with pytest.raises(ValueError, match="^key: is on cuda:0"):
        _core.attention(q, k0, k0, torch.empty_like(q), 0.1)


# --- the split from measured rates (planner.plan_share, policy::balance) ----------------------

#: CPU rate as a fraction of the PCIe rate: the CPU's share of the host bytes is about
#: ratio / (1 + ratio) (with a free hand-off and a fast HBM): thin, about half, most.
RATIOS = [0.1, 1.0, 4.0]


def _uneven(store, layer):
    """The store's split of `layer` now: it cuts heads unevenly (some heads' shares differ)
    or leaves some heads to the GPU, and every cut is a block start."""
    split = store.cpu_split(layer)
    assert split is not None
    n = store.seq_len(layer)
    start = store.retained_start(layer)
    assert all(f == n or (f - start) % store.block_size == 0 for f in split), split
    return split


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio", RATIOS)
def test_rate_split_cuts_heads_and_blocks_unevenly_and_is_exact(ratio, dtype):
    """A store with some device blocks before the host ones (uneven per head: 3 kv heads, a
    partial last block), the CPU taking a balanced share of (head, block range)s on a pool of
    its own, against a float64 reference (bf16: within twice torch's own error)."""
    torch.manual_seed(2)
    hkv, g, d, n, block = 3, 4, 128, 5000, 256
    es = torch.empty((), dtype=dtype).element_size()
    store = _core.KVStore(
        1,
        hkv,
        d,
        str(dtype).removeprefix("torch."),
        block_size=block,
        device=0,
        # Four block pairs on the device, the rest (and the partial last block) on the host.
        device_budget=4 * 2 * block * d * es,
        max_len=n + 4 * block,
    )
    k = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
    v = torch.randn(hkv, n, d, device=DEV, dtype=dtype)
    store.append(0, k, v)
    store.share_threads = 2
    store.share_rates = (1e9, ratio * 1e9, 1e15, 0.0)
    split = _uneven(store, 0)
    assert any(f < n for f in split)
    scale = d**-0.5
    q = torch.randn(hkv * g, 1, d, device=DEV, dtype=dtype)
    out = torch.empty_like(q)
    store.attend(0, q, out, scale)
    store.finish_step()
    torch.cuda.synchronize()
    want = reference(q, k, v, scale)
    ours = (out.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert ours < 1e-4
    else:
        kk = k.repeat_interleave(g, 0)
        vv = v.repeat_interleave(g, 0)
        std = ((q @ kk.transpose(1, 2)) * scale).softmax(-1) @ vv
        torch_err = (std.double() - want).abs().max().item()
        assert ours <= 2 * torch_err + 1e-3, (ours, torch_err)


def test_the_gpu_probe_measures_plausible_rates_quickly():
    """The real probe: bounded in time, its buffers freed (device and pinned figures back
    where they were), rates in a plausible range for a PCIe link and HBM."""
    import time

    torch.cuda.synchronize()
    before = (_core.device_block_bytes(), _core.pinned_bytes(), torch.cuda.mem_get_info()[0])
    t = time.perf_counter()
    pcie, device, copy = _core.measure_gpu_rates(0, "bfloat16", 128, 4)
    took = time.perf_counter() - t
    after = (_core.device_block_bytes(), _core.pinned_bytes(), torch.cuda.mem_get_info()[0])
    assert took < 5.0, took  # the kernels' first compile included
    assert 1e9 < pcie < 200e9, pcie
    assert 1e9 < copy < 200e9, copy
    assert pcie < device < 20e12, device
    assert before[0] == after[0] and after[1] <= before[1]
    assert abs(before[2] - after[2]) < 64 << 20  # the probe's buffers were freed
    t = time.perf_counter()
    _core.measure_gpu_rates(0, "bfloat16", 128, 4)
    assert time.perf_counter() - t < 1.0  # compiled once: the probe itself is short
    # An int8 store's rates: its own kernel over its rows (bytes as held), the copy engine
    # as before; its buffers freed too.
    before = (_core.pinned_bytes(), torch.cuda.mem_get_info()[0])
    for kv_dtype in ("int8", "bfloat16", None):
        p, d, c = _core.measure_gpu_rates(0, "bfloat16", 128, 4, kv_dtype=kv_dtype)
        assert 1e9 < p < 200e9 and p < d < 20e12 and 1e9 < c < 200e9, (kv_dtype, p, d, c)
    after = (_core.pinned_bytes(), torch.cuda.mem_get_info()[0])
    assert after[0] <= before[0] and abs(before[1] - after[1]) < 64 << 20


def test_the_default_plan_on_this_machine_is_visible_and_exact(monkeypatch, tmp_path):
    """cpu_heads="auto" on the GPU machine: the planner measures (once), saves the rates, and
    the cache says what it chose; decode stays exact whatever it chose."""
    monkeypatch.setenv("HEADINFER_RATES_FILE", str(tmp_path / "rates.json"))
    model = tiny_model("llama").to(DEV)
    ref = twin(model)
    headinfer.patch(model, chunk_size=97, block_size=16, cpu_heads="auto")
    cache = headinfer.HeadInferCache(model)
    ids = prompt().to(DEV)
    name = cache_kwarg_name(model)
    with torch.no_grad():
        got = model(ids, use_cache=True, **{name: cache}).logits
        want = ref(ids, use_cache=True).logits
    assert (got - want).abs().max().item() < 1e-4
    plan = cache.share_plan()
    assert plan["mode"] in ("off", "rates"), plan
    assert len(plan["split"]) == model.config.num_hidden_layers
    if plan["mode"] == "rates":
        assert (tmp_path / "rates.json").exists()
        assert plan["rates"]["pcie"] > 0 and plan["threads"] >= 7


def test_an_int8_cache_measures_the_cpus_int8_rate(monkeypatch, tmp_path):
    """The CPU's probe over int8 rows runs beside the copy engine, and an int8 cache's rates
    are measured over them and saved under the int8 key."""
    import json

    rate, fixed = _core.measure_cpu_rate(
        "bfloat16", 128, 4, threads=2, bytes=32 << 20, seconds=0.05, beside_copy=0, kv_dtype="int8"
    )
    assert rate > 1e6 and 0 < fixed < 1.0
    monkeypatch.setenv("HEADINFER_RATES_FILE", str(tmp_path / "rates.json"))
    model = tiny_model("llama").to(DEV)
    headinfer.patch(model, chunk_size=97, block_size=16, cpu_heads="auto", kv_dtype="int8")
    cache = headinfer.HeadInferCache(model)
    with torch.no_grad():
        model(prompt().to(DEV), use_cache=True, **{cache_kwarg_name(model): cache})
    saved = json.loads((tmp_path / "rates.json").read_text())
    assert len(saved) == 1 and next(iter(saved)).endswith(" | kv_dtype int8"), saved
    assert cache.share_plan()["rates"]["cpu"] == next(iter(saved.values()))["cpu"]


def _forced_rates(monkeypatch, ratio):
    """Every new cache shares by rates giving the CPU about ratio / (1 + ratio) of the host
    bytes (free hand-off), on 2 threads, whatever this host's cores and measured rates."""
    import headinfer.cache as cache_mod
    from headinfer.planner import SharePlan
    from headinfer.share import ShareRates

    def plan(cpu_heads, **kw):
        rates = ShareRates(pcie=1e9, cpu=ratio * 1e9, device=1e15, handoff=0.0)
        # No trial: the test checks the split itself, whatever the timings.
        return SharePlan("rates", "forced by the test", threads=2, rates=rates, trial=False)

    monkeypatch.setattr(cache_mod, "plan_share", plan)


def _cap_resident(monkeypatch, blocks):
    """Cap the planner's resident KV at `blocks` block pairs of 16 tokens (0: all on the
    host), as tests/gpu/test_families_gpu.py does: device blocks first, host ones after."""
    import headinfer.cache as cache_mod

    original = cache_mod.plan_memory

    def capped(*args, **kwargs):
        plan = original(*args, **kwargs)
        spec = args[1]
        block = 2 * 16 * spec.head_dim * torch.empty((), dtype=kwargs["dtype"]).element_size()
        plan.kv_device_bytes = min(plan.kv_device_bytes, blocks * block)
        return plan

    monkeypatch.setattr(cache_mod, "plan_memory", capped)


STEPS = 8


@pytest.mark.parametrize("device_blocks", [0, 5])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
def test_every_family_float32_matches_eager_with_the_rate_split(
    family, ratio, device_blocks, monkeypatch
):
    """Patched decode with the rate-based split (all KV on the host, or the first blocks on
    the GPU), float32 within 1e-4 of eager; the split really cuts."""
    from _tiny import rel_err

    _forced_rates(monkeypatch, ratio)
    _cap_resident(monkeypatch, device_blocks)
    model = tiny_model(family).to(DEV)
    ref = twin(model)
    headinfer.patch(model, chunk_size=97, block_size=16)
    ids = prompt().to(DEV)
    name = cache_kwarg_name(model)
    cache = headinfer.HeadInferCache(model)
    n = ids.shape[1] - STEPS
    with torch.no_grad():
        out = model(ids[:, :n], use_cache=True, **{name: cache})
        got = [out.logits[:, -1]]
        for i in range(n, ids.shape[1] - 1):
            got.append(model(ids[:, i : i + 1], use_cache=True, **{name: cache}).logits[:, -1])
        want = ref(ids, use_cache=True).logits[:, n - 1 : ids.shape[1] - 1]
    # A sliding window drops its first (device) blocks and the freed device room takes the
    # next new blocks, after host ones; a head laid out so has no host suffix for the CPU
    # (qwen2: only layer 0 is full, and with 5 device blocks none is left splittable). Where
    # no window recycles device blocks, the balance must cut.
    text = model.config.get_text_config()
    windows = getattr(text, "sliding_window", None) and "sliding_attention" in (
        getattr(text, "layer_types", None) or ["sliding_attention"]
    )
    recycles = device_blocks > 0 and bool(windows)
    if not recycles:
        plan = cache.share_plan()
        # The split cut: the CPU ran tasks (whether it still cuts after the last step depends
        # on the rates those steps showed: at a CPU rate of 0.1 a tiny model's layers may
        # learn that a block is too much for the CPU, as happened once in session 16).
        # The shared steps' timeline: both sides' time, read a step after the GPU passed it.
        t = plan["timeline"][0]
        assert t["cpu_tasks"] > 0, "the split never cut"
        assert t["cpu_busy"] > 0 and t["cpu_idle"] >= 0, t
        assert t["gpu_steps"] > 0 and t["gpu_own"] > 0 and t["gpu_waited"] >= 0, t
        steps, waited = plan["steps"][0]
        assert steps == t["gpu_steps"] and 0 <= waited <= steps, plan["steps"]
        # Each layer balances by the rates its own steps showed: the shared ones moved off
        # the probe's.
        balance = plan["balance"][0]
        assert len(balance) == text.num_hidden_layers, balance
        assert any(cpu != plan["rates"]["cpu"] for cpu, _ in balance), balance
    assert rel_err(torch.stack(got, 1), want) < 1e-4


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
def test_every_family_bfloat16_within_twice_torch_error_with_the_rate_split(
    family, ratio, monkeypatch
):
    """As above in bfloat16, all KV on the host: within twice torch's own error against
    float64."""
    _forced_rates(monkeypatch, ratio)
    _cap_resident(monkeypatch, 0)
    base = tiny_model(family)
    exact = float64_twin(base)
    std = twin(base).to(DEV, torch.bfloat16)
    model = twin(base).to(DEV, torch.bfloat16)
    headinfer.patch(model, chunk_size=97, block_size=16)
    ids = prompt().to(DEV)
    name = cache_kwarg_name(model)
    n = ids.shape[1] - STEPS

    def decode(m, ids, cache=None):
        with torch.no_grad():
            kw = {} if cache is None else {name: cache}
            out = m(ids[:, :n], use_cache=True, **kw)
            c = out.get(name)
            got = [out.logits[:, -1]]
            for i in range(n, ids.shape[1] - 1):
                out = m(ids[:, i : i + 1], use_cache=True, **{name: c})
                c = out.get(name)
                got.append(out.logits[:, -1])
        return torch.stack(got, 1), c

    want, _ = decode(exact, ids.cpu())
    want = want.to(DEV)
    torch_err = (decode(std, ids)[0].double() - want).abs().max().item()
    cache = headinfer.HeadInferCache(model)
    got, cache = decode(model, ids, cache)
    assert any(s is not None for s in cache.share_plan()["split"]), "the split never cut"
    ours = (got.double() - want).abs().max().item()
    assert ours <= 2 * torch_err + 1e-3, (ours, torch_err)
