"""What the benchmark scripts share: the Llama-3-8B-shaped model, CUDA-event timing, the pinned
copy rate, and writing results under ``$OUT``."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def llama8b(max_positions: int = 1 << 21) -> tuple[LlamaConfig, Any]:
    """Llama-3-8B's shape with random bf16 weights on the GPU, sdpa attention, as
    ``shared/peers/baseline_hf.py`` builds it. Returns ``(config, model)``."""
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=max_positions,
        rope_theta=500000.0,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    return cfg, model


def cuda_time(fn: Callable[[], Any], iters: int = 5) -> float:
    """Seconds per call of ``fn``, by CUDA events, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def h2d_gbs(chunk: int | None = None) -> float:
    """Pinned host-to-device copy bandwidth, GB/s, over 1 GiB: in one copy, or in copies of
    ``chunk`` bytes (each copy costs the copy engine time of its own)."""
    total = 1 << 30
    src = torch.empty(total, dtype=torch.uint8).pin_memory()
    dst = torch.empty(total, dtype=torch.uint8, device="cuda")
    step = chunk or total

    def copy() -> None:
        for a in range(0, total, step):
            dst[a : a + step].copy_(src[a : a + step], non_blocking=True)

    return total / cuda_time(copy) / 1e9


def host_floors(cache, gbs: float, cpu_gbs: float, copy_beside: float) -> dict[str, float]:
    """The cache's KV bytes held in host memory now and their floors, in seconds a decode
    step: over the copy engine alone (``gbs``) and over the copy engine and the CPU at once
    (``copy_beside`` + ``cpu_gbs``, measured together). Read it after a decode step: decode's
    plan moves blocks to the GPU that the prefill's kept room for activations, so the host
    holds fewer bytes than after the prompt."""
    mem = cache.memory()
    host = mem["used"] - mem["device_used"]
    return {
        "kv_gib": round(mem["used"] / 2**30, 2),
        "host_kv_gib": round(host / 2**30, 2),
        "pcie_floor_s": round(host / (gbs * 1e9), 4),
        "host_floor_s": round(host / ((copy_beside + cpu_gbs) * 1e9), 4),
    }


def write_out(name: str, data: Any) -> None:
    """``data`` as JSON in ``$OUT/name``, where ``$OUT`` is set (the device runs' results)."""
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(data, f)


def decode(model, cache, name: str, first: torch.Tensor, steps: int, skip: int = 2, mark=None):
    """Greedy decode steps from ``first`` (``[1, 1]``) on ``cache`` (passed as ``name``), each
    token read back as generate() reads it; returns (tokens, the last logits, mean seconds of
    the steps after the first ``skip``). ``mark``: called once the first ``skip`` are done."""
    tokens, nxt, logits, times = [], first, None, []
    for i in range(steps):
        torch.cuda.synchronize()
        if i == skip and mark is not None:
            mark()
        t = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, **{name: cache})
        logits = out.logits[:, -1].float()
        nxt = logits.argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        tokens.append(int(nxt))
    steady = times[skip:] or times
    print("  steps: " + " ".join(f"{x:.3f}" for x in times), flush=True)
    return tokens, logits, sum(steady) / len(steady)
