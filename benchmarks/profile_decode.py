"""Where a decode step's time goes: torch.profiler over a few decode steps after one prefill.

A Llama-3-8B-shaped model (random bf16 weights, run under ``shared/peers/card.py --gib 24``),
patched with the defaults; after ``--context`` tokens of prefill, ``--warmup`` steps (the CPU
share's trial decides in them), then ``--steps`` profiled steps in each of two modes: the
default as it decided, and the GPU alone. Prints, per mode: wall time per step, the GPU's busy
share (the union of every kernel and copy interval over the wall time), time per step in each
kind of GPU work (decode kernels, staged pieces, merges, copies, the model's own kernels) and
the idle gaps; writes the Chrome traces (gzipped) and a JSON summary to $OUT.

    python card.py --gib 24 -- python benchmarks/profile_decode.py --context 131072
    python card.py --gib 24 -- python benchmarks/profile_decode.py --context 716800 \
        --kv-dtype int8 --gpu-budget 23GiB
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import time

import torch
from _common import llama8b
from torch.profiler import ProfilerActivity, profile

import headinfer
from headinfer.prefill import cache_kwarg_name

KINDS = {
    "attend_partial": "decode kernel (resident / zero-copy)",
    "attend_staged": "decode kernel (staged pieces)",
    "merge_partials": "merge",
    "Memcpy HtoD": "copy engine H2D",
    "Memcpy DtoH": "copy D2H",
    "append_kv": "append",
}


def summarize(prof, steps: int, wall: float) -> dict:
    """GPU busy share, time per step by kind, and idle gaps, from the profiler's events."""
    spans = []
    by_kind: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start = e.time_range.start
        end = e.time_range.end
        spans.append((start, end))
        kind = next((v for k, v in KINDS.items() if k in e.name), "model kernels")
        by_kind[kind] = by_kind.get(kind, 0.0) + (end - start) / 1e6
    spans.sort()
    busy, gaps, cur = 0.0, [], None
    for a, b in spans:
        if cur is None:
            cur = [a, b]
        elif a <= cur[1]:
            cur[1] = max(cur[1], b)
        else:
            busy += cur[1] - cur[0]
            gaps.append(a - cur[1])
            cur = [a, b]
    if cur is not None:
        busy += cur[1] - cur[0]
    gaps.sort(reverse=True)
    return {
        "s_per_step": round(wall / steps, 4),
        "gpu_busy_share": round(busy / 1e6 / wall, 3),
        "gpu_seconds_per_step_by_kind": {k: round(v / steps, 4) for k, v in by_kind.items()},
        "idle_gaps_over_50us_per_step": sum(1 for g in gaps if g > 50) / steps,
        "largest_gaps_ms": [round(g / 1e3, 2) for g in gaps[:5]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--warmup", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--kv-dtype", default="exact", choices=("exact", "int8"))
    ap.add_argument("--gpu-budget", default=None, help="patch(gpu_budget=...), e.g. 23GiB")
    args = ap.parse_args()
    cfg, model = llama8b()
    headinfer.patch(model, chunk_size=4096, gpu_budget=args.gpu_budget)
    name = cache_kwarg_name(model)
    cache = headinfer.HeadInferCache(model, kv_dtype=args.kv_dtype)
    cache.expected_new_tokens = 2 * (args.warmup + args.steps) + 2
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.context), device="cuda")
    out_dir = os.environ.get("OUT", ".")
    summary = {
        "device": torch.cuda.get_device_name(),
        "context": args.context,
        "kv_dtype": args.kv_dtype,
    }
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache})
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(args.warmup):
            nxt = model(input_ids=nxt, use_cache=True, **{name: cache}).logits[:, -1:].argmax(-1)
            nxt.cpu()
        summary["share_plan"] = {k: cache.share_plan()[k] for k in ("mode", "trial", "rates")}
        for mode in ("default", "gpu_alone"):
            if mode == "gpu_alone":
                cache._trial = None  # a fixed mode: the share off
                rates = cache.store.share_rates
                if rates is not None:
                    cache.store.share_rates = (rates[0], 0.0, *rates[2:])
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t = time.perf_counter()
                for _ in range(args.steps):
                    logits = model(input_ids=nxt, use_cache=True, **{name: cache}).logits
                    nxt = logits[:, -1:].argmax(-1)
                    nxt.cpu()  # as generate() reads each token
                torch.cuda.synchronize()
                wall = time.perf_counter() - t
            summary[mode] = summarize(prof, args.steps, wall)
            summary[mode]["reader"] = cache.store.host_reader_used
            print(mode, json.dumps(summary[mode]), flush=True)
            trace = os.path.join(out_dir, f"decode_{mode}_{args.kv_dtype}_{args.context}.json")
            prof.export_chrome_trace(trace)
            with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
                shutil.copyfileobj(f, g)
            os.remove(trace)
    result = f"profile_decode_{args.kv_dtype}_{args.context}.json"
    with open(os.path.join(out_dir, result), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
