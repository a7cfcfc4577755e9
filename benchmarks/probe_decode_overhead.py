"""Where does a short-context decode step spend its time, headinfer against standard?

Llama-3-8B shape, random bf16 weights, 8K context, fully resident. Standard (sdpa,
DynamicCache) and headinfer decode are timed in alternation (so clocks and caches treat them
alike), then one headinfer decode run is profiled with cProfile (host time per function).
Usage: python benchmarks/probe_decode_overhead.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
from _common import llama8b
from transformers import DynamicCache

import headinfer
from headinfer.prefill import cache_kwarg_name

STEPS = 30


def decode(model, cache, name, nxt, steps=STEPS):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        nxt = model(input_ids=nxt, use_cache=True, **{name: cache}).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps, nxt


def main() -> None:
    cfg, model = llama8b(max_positions=1 << 17)
    name = cache_kwarg_name(model)
    ids = torch.randint(0, cfg.vocab_size, (1, 8192), device="cuda")
    with torch.inference_mode():
        std = DynamicCache(config=cfg)
        nxt_s = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: std}).logits
        nxt_s = nxt_s[:, -1:].argmax(-1)
        headinfer.patch(model, chunk_size=8192, gpu_budget="40GiB")
        hi = headinfer.HeadInferCache(model)
        hi.expected_new_tokens = 8 * STEPS
        nxt_h = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: hi}).logits
        nxt_h = nxt_h[:, -1:].argmax(-1)
        for rnd in range(3):
            headinfer.unpatch(model)
            ts, nxt_s = decode(model, std, name, nxt_s)
            headinfer.patch(model, chunk_size=8192, gpu_budget="40GiB")
            th, nxt_h = decode(model, hi, name, nxt_h)
            print(
                f"round {rnd}: standard {ts * 1e3:.2f} ms, headinfer {th * 1e3:.2f} ms, "
                f"ratio {th / ts:.3f}",
                flush=True,
            )
        prof = cProfile.Profile()
        prof.enable()
        decode(model, hi, name, nxt_h, steps=10)
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue()[:6000])


if __name__ == "__main__":
    main()
