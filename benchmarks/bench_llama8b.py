"""Peers and headinfer on one GPU, one budget, beside the physical floors.

A Llama-3-8B-shaped model (random bf16 weights) under a 24 GiB budget, as
``shared/peers/baseline_hf.py`` measures the peers: standard (one-shot prefill), chunked
prefill, transformers' layer-wise offload (``DynamicCache(offloading=True)``) and headinfer
(``patch(model, gpu_budget="24GiB")``). For each context: prefill seconds, decode seconds per
token, peak GPU GiB (torch's peak reserved plus headinfer's device blocks). Measured in the
same run: pinned H2D bandwidth, bf16 matmul and causal SDPA rates, from which the floors:
decode = bytes read from the host per token / H2D; prefill = attention FLOPs / SDPA rate +
linear FLOPs / matmul rate.

Usage: python benchmarks/bench_llama8b.py [--plan peers,headinfer] [--long 716800]
Writes $OUT/bench_llama8b.json (or ./bench_llama8b.json); benchmarks/plot.py draws it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torch.nn.functional as F
from _common import cuda_time, h2d_gbs, llama8b
from transformers import DynamicCache

import headinfer

GIB = 1 << 30
CHUNK = 8192


def _matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / cuda_time(lambda: a @ a) / 1e12


def _sdpa_tflops(s: int = 32768) -> float:
    q = torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True), iters=3)
    return 2 * 32 * 128 * s * s / t / 1e12


def measure_machine() -> dict[str, float]:
    """H2D GB/s (pinned, 1 GiB), bf16 matmul TFLOP/s (8192^3), causal SDPA TFLOP/s (32K)."""
    m = {"h2d_gbs": h2d_gbs(), "matmul_tflops": _matmul_tflops(), "sdpa_tflops": _sdpa_tflops()}
    torch.cuda.empty_cache()
    return {k: round(v, 1) for k, v in m.items()}


def floors(cfg, params: int, s: int, host_bytes: int, m: dict) -> dict[str, float]:
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * 128 * s * s
    linear = 2 * params * s
    return {
        "prefill_floor_s": round(
            attn / (m["sdpa_tflops"] * 1e12) + linear / (m["matmul_tflops"] * 1e12), 2
        ),
        "decode_floor_s": round(host_bytes / (m["h2d_gbs"] * 1e9), 4),
    }


def peak_gib(cache=None) -> float:
    dev = cache.memory()["device_reserved"] if isinstance(cache, headinfer.HeadInferCache) else 0
    return round((torch.cuda.max_memory_reserved() + dev) / GIB, 2)


def run(model, cfg, mode: str, s: int, budget_gib: float, decode_steps: int = 8) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, cfg.vocab_size, (1, s), device="cuda")
    name = headinfer.prefill.cache_kwarg_name(model)
    if mode == "headinfer":
        cache = headinfer.HeadInferCache(model)
        cache.expected_new_tokens = decode_steps + 2
    else:
        cache = DynamicCache(config=cfg, offloading=(mode == "offload"))
    try:
        with torch.inference_mode():
            torch.cuda.synchronize()
            t = time.time()
            if mode in ("standard", "headinfer"):
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache})
            else:
                for a in range(0, s, CHUNK):
                    out = model(
                        input_ids=ids[:, a : a + CHUNK],
                        use_cache=True,
                        logits_to_keep=1,
                        **{name: cache},
                    )
            torch.cuda.synchronize()
            prefill = time.time() - t
            # Peak GPU use per phase: torch's peak reserved plus headinfer's device blocks
            # (which change only between phases).
            peak = peak_gib(cache)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(2):  # warm-up, not timed
                nxt = (
                    model(input_ids=nxt, use_cache=True, **{name: cache}).logits[:, -1:].argmax(-1)
                )
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.time()
            for _ in range(decode_steps):
                nxt = (
                    model(input_ids=nxt, use_cache=True, **{name: cache}).logits[:, -1:].argmax(-1)
                )
            torch.cuda.synchronize()
            decode = (time.time() - t) / decode_steps
        r = {
            "mode": mode,
            "S": s,
            "prefill_s": round(prefill, 2),
            "decode_s": round(decode, 4),
            "peak_gib": max(peak, peak_gib(cache)),
        }
        if mode == "headinfer":
            mem = cache.memory()
            r["cpu_heads"] = cache.store.cpu_heads
            r["kv_device_gib"] = round(mem["device_used"] / GIB, 2)
            r["kv_host_gib"] = round((mem["used"] - mem["device_used"]) / GIB, 2)
            r["host_bytes"] = mem["used"] - mem["device_used"]
    except torch.OutOfMemoryError:
        r = {"mode": mode, "S": s, "oom": True}
    del cache, ids
    gc.collect()
    torch.cuda.empty_cache()
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="peers,headinfer")
    ap.add_argument("--budget-gib", type=float, default=24.0)
    ap.add_argument("--long", type=int, default=0, help="one headinfer run at this context")
    ap.add_argument("--long-budget", default="weights+2GiB")
    args = ap.parse_args()
    total = torch.cuda.get_device_properties(0).total_memory
    cfg, model = llama8b()
    weights = torch.cuda.memory_allocated()
    params = sum(p.numel() for p in model.parameters())
    m = measure_machine()
    print("machine:", m, f"weights {weights / GIB:.2f} GiB", flush=True)
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "machine": m,
        "weights_gib": round(weights / GIB, 2),
        "budget_gib": args.budget_gib,
        "runs": [],
    }
    plan = args.plan.split(",")
    if args.long:
        budget = weights + 2 * GIB if args.long_budget == "weights+2GiB" else args.long_budget
        headinfer.patch(model, chunk_size=4096, gpu_budget=budget)
        r = run(model, cfg, "headinfer", args.long, 0, decode_steps=2)
        r.update(floors(cfg, params, args.long, r.get("host_bytes", 0), m))
        r["gpu_budget_gib"] = round(budget / GIB, 2) if isinstance(budget, int) else budget
        results["runs"].append(r)
        plan = []
    torch.cuda.set_per_process_memory_fraction(args.budget_gib * GIB / total)
    if "peers" in plan:
        for mode, lens in [
            ("standard", [1024, 8192, 16384, 24576, 32768]),
            ("chunked", [8192, 32768, 49152]),
            ("offload", [32768, 131072]),
        ]:
            for s in lens:
                r = run(model, cfg, mode, s, args.budget_gib)
                r.update(floors(cfg, params, s, 0, m))
                results["runs"].append(r)
                if r.get("oom"):
                    break
    if "headinfer" in plan:
        # The GPU alone reading the host KV over PCIe (cpu_heads=0), then cpu_heads="auto": the
        # planner's CPU share from measured rates (on where the host has the cores).
        variants = [
            ("headinfer GPU-only", 0, [1024, 8192, 16384, 32768, 131072, 131072]),
            ("headinfer, CPU share", "auto", [1024, 131072]),
        ]
        for label, cpu_heads, lens in variants:
            headinfer.patch(
                model, chunk_size=CHUNK, gpu_budget=f"{args.budget_gib}GiB", cpu_heads=cpu_heads
            )
            for s in lens:
                r = run(model, cfg, "headinfer", s, args.budget_gib)
                r.update(floors(cfg, params, s, r.get("host_bytes", 0), m))
                r["mode"] = label
                results["runs"].append(r)
        headinfer.unpatch(model)
    out_dir = os.environ.get("OUT", ".")
    name = "bench_llama8b_long.json" if args.long else "bench_llama8b.json"
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
