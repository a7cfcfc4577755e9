"""``gpu_budget`` bounds the process's device memory, as NVML counts it, not only torch's.

A mid-sized Llama (random bf16 weights) whose KV at the test's context is larger than what the
budget leaves: the process's NVML figure, polled during ``generate()``, stays within the budget;
a budget that cannot hold the weights and the working set is refused before prefill.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import threading
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import headinfer

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pynvml = pytest.importorskip("pynvml")

GIB = 1 << 30


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _model() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=1 << 18,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def _process_bytes(handle) -> int | None:
    pid = os.getpid()
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if p.pid == pid:
            return p.usedGpuMemory
    return None


@pytest.mark.parametrize(("kv_dtype", "room_gib"), [("exact", 4.5), ("int8", 3.0)])
def test_nvml_peak_within_budget_during_generate(kv_dtype, room_gib):
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(0))
    model = _model()
    torch.cuda.synchronize()
    if _process_bytes(handle) is None:
        pytest.skip("NVML does not report this process (container process ids differ)")
    # The budget bounds all the process holds by NVML: what it holds before (the weights, the
    # CUDA context, and what earlier tests in this process left: cuBLAS's and cuDNN's
    # workspaces, compiled kernels; 3.2 GiB after test_share and test_int8 on an H200), and
    # `room_gib` more. KV: 16 layers x 4 heads x 128 x 2 x 2 B = 32 KiB a token (int8: 17
    # KiB); 96K tokens = 3 GiB (1.6 GiB), of which the room holds about half on the GPU.
    budget = _process_bytes(handle) + int(room_gib * GIB)
    headinfer.patch(model, chunk_size=4096, gpu_budget=budget, kv_dtype=kv_dtype)
    peak = 0
    running = True

    def poll() -> None:
        nonlocal peak
        while running:
            peak = max(peak, _process_bytes(handle) or 0)
            time.sleep(0.005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        ids = torch.randint(0, 32000, (1, 96 * 1024), device="cuda")
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
    finally:
        running = False
        thread.join()
        headinfer.unpatch(model)
    assert out.shape[1] == ids.shape[1] + 4
    assert peak <= budget, f"NVML peak {peak / GIB:.2f} GiB over budget {budget / GIB:.2f} GiB"
    del model, out
    gc.collect()
    torch.cuda.empty_cache()


def test_budget_below_working_set_refused_before_prefill():
    model = _model()
    weights = torch.cuda.memory_allocated()
    headinfer.patch(model, gpu_budget=weights + 256 * (1 << 20))
    cache = headinfer.HeadInferCache(model)
    name = headinfer.prefill.cache_kwarg_name(model)
    ids = torch.randint(0, 32000, (1, 8192), device="cuda")
    try:
        with (
            pytest.raises(headinfer.OutOfDeviceMemoryError, match="gpu_budget") as info,
            torch.inference_mode(),
        ):
            model(input_ids=ids, **{name: cache})
        assert info.value.needed > info.value.available
        assert cache.get_seq_length() == 0
    finally:
        headinfer.unpatch(model)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def test_prefill_after_decode_gives_torch_back_the_demoted_room():
    """Decode fills the room a prefill's activations had with promoted blocks; the next prefill
    demotes them, and torch's cap must grow back to what that prefill's plan gives torch, or
    torch runs out under its own cap (seen extending an int8 cache to 1M tokens with a budget).
    """
    from headinfer.planner import DEFAULT_MARGIN
    from headinfer.prefill import cache_kwarg_name

    model = _model()
    weights = torch.cuda.memory_allocated()
    budget = weights + int(4.5 * GIB)  # KV at 104K tokens: 3.25 GiB, more than the room left
    headinfer.patch(model, chunk_size=4096, gpu_budget=budget)
    cache = headinfer.HeadInferCache(model)
    name = cache_kwarg_name(model)
    n = 96 * 1024
    ids = torch.randint(0, 32000, (1, n + 1 + 8192), device="cuda")
    try:
        with torch.inference_mode():
            model(input_ids=ids[:, :n], use_cache=True, logits_to_keep=1, **{name: cache})
            model(input_ids=ids[:, n : n + 1], use_cache=True, **{name: cache})  # decode
            held_decode = cache.memory()["device_reserved"]
            out = model(
                input_ids=ids[:, n + 1 :], use_cache=True, logits_to_keep=1, **{name: cache}
            )
        torch.cuda.synchronize()
        assert cache.get_seq_length() == ids.shape[1]
        assert torch.isfinite(out.logits).all()
        held = cache.memory()["device_reserved"]
        assert held < held_decode, "the second prefill should have demoted blocks"
        plan = cache._plan
        assert plan is not None and plan.prefill
        f = plan.figures
        need = f["weight_bytes"] + f["activation_bytes"] + f["staging_bytes"] + DEFAULT_MARGIN
        cap = torch.cuda.get_per_process_memory_fraction(0) * torch.cuda.mem_get_info()[1]
        assert cap >= need - (16 << 20), (
            f"torch capped at {cap / GIB:.2f} GiB, plan needs {need / GIB:.2f}"
        )
        assert cap + held + f["context_bytes"] <= budget + (16 << 20)
    finally:
        headinfer.unpatch(model)
    del model, cache
    gc.collect()
    torch.cuda.empty_cache()
