"""What the benchmark scripts share: the Llama-3-8B-shaped model and CUDA-event timing."""

from __future__ import annotations

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


def h2d_gbs() -> float:
    """Pinned host-to-device copy bandwidth, GB/s, over 1 GiB."""
    src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    return src.numel() / cuda_time(lambda: dst.copy_(src, non_blocking=True)) / 1e9


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
