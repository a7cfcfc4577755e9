"""Where a decode step's time goes: torch.profiler over a few decode steps after one prefill.

A Llama-3-8B-shaped model (random bf16 weights, run under ``shared/peers/card.py --gib 24``),
patched with the defaults, a cache of ``--kv-dtype``: after ``--context`` tokens of prefill,
``--warmup`` steps (the CPU share's trial decides in them), then ``--steps`` profiled steps.
Prints wall time per step, the GPU's busy share (the union of every kernel and copy interval
over the wall time), time per step in each kind of GPU work (decode kernels, staged pieces,
merges, copies, the model's own kernels), the idle gaps, the CPU share's figures
(``bench_kv_int8.share_figures``) and the copy engine's own (``copy_engine``: whether its copies
ran slow or it sat idle); writes the Chrome trace (gzipped) and a JSON summary to $OUT. One
kv dtype a process: the profiler's buffers stay on the device after it, and a second cache no
longer fits a 24 GiB card's plan (seen: "CUDA context and kernels 6.72 GiB").

    python card.py --gib 24 -- python benchmarks/profile_decode.py --context 262144 \
        --kv-dtype int8 --gpu-budget 23GiB
"""

from __future__ import annotations

import argparse
import faulthandler
import gzip
import json
import os
import shutil
import time

import torch
from _common import llama8b
from bench_kv_int8 import share_figures, timelines
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


def copy_engine(events: list[dict], steps: int) -> dict:
    """The copy engine's host-to-device copies in a Chrome trace's events, per step: how many,
    their bytes, the time they ran (their union), the rate of each large copy while it ran
    (median and quartiles: slow copies mean a shared memory), and the idle gaps between them by
    size (idle time means the copies were not queued or waited for a buffer)."""
    h2d = sorted(
        (e["ts"], e["ts"] + e["dur"], e.get("args", {}).get("bytes", 0))
        for e in events
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")
    )
    if not h2d:
        return {}
    busy, gaps, cur = 0.0, [], list(h2d[0][:2])
    for a, b, _ in h2d[1:]:
        if a <= cur[1]:
            cur[1] = max(cur[1], b)
        else:
            busy += cur[1] - cur[0]
            gaps.append(a - cur[1])
            cur = [a, b]
    busy += cur[1] - cur[0]
    total = sum(n for _, _, n in h2d)
    rates = sorted(n / (b - a) / 1e3 for a, b, n in h2d if n >= 1 << 20 and b > a)
    q = [rates[int(f * (len(rates) - 1))] for f in (0.25, 0.5, 0.75)] if rates else []
    buckets = {"under_10us": (0, 10), "10_100us": (10, 100), "100us_1ms": (100, 1e3)}
    buckets["over_1ms"] = (1e3, float("inf"))
    return {
        "copies_per_step": round(len(h2d) / steps),
        "gib_per_step": round(total / steps / 2**30, 3),
        "busy_s_per_step": round(busy / 1e6 / steps, 4),
        "gbs_while_busy": round(total / busy / 1e3, 1),
        "copy_gbs_quartiles": [round(x, 1) for x in q],
        "idle_s_per_step_by_gap": {
            k: round(sum(g for g in gaps if lo <= g < hi) / 1e6 / steps, 4)
            for k, (lo, hi) in buckets.items()
        },
        "gaps_per_step_by_size": {
            k: round(sum(1 for g in gaps if lo <= g < hi) / steps, 1)
            for k, (lo, hi) in buckets.items()
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--warmup", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--kv-dtype", default="exact", choices=("exact", "int8"))
    ap.add_argument("--gpu-budget", default=None, help="patch(gpu_budget=...), e.g. 23GiB")
    ap.add_argument("--watchdog", type=float, default=600, help="seconds in all")
    args = ap.parse_args()
    cfg, model = llama8b()
    headinfer.patch(model, chunk_size=4096, gpu_budget=args.gpu_budget)
    name = cache_kwarg_name(model)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.context), device="cuda")
    out_dir = os.environ.get("OUT", ".")
    kv_dtype = args.kv_dtype
    faulthandler.dump_traceback_later(args.watchdog, exit=True)
    cache = headinfer.HeadInferCache(model, kv_dtype=None if kv_dtype == "exact" else kv_dtype)
    cache.expected_new_tokens = 2 * (args.warmup + args.steps) + 2
    summary = {"device": torch.cuda.get_device_name(), "context": args.context}
    summary["kv_dtype"] = kv_dtype
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache})
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(args.warmup):
            nxt = model(input_ids=nxt, use_cache=True, **{name: cache}).logits[:, -1:].argmax(-1)
            nxt.cpu()
        before = timelines(cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for _ in range(args.steps):
                logits = model(input_ids=nxt, use_cache=True, **{name: cache}).logits
                nxt = logits[:, -1:].argmax(-1)
                nxt.cpu()  # as generate() reads each token
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
    summary.update(summarize(prof, args.steps, wall))
    summary["reader"] = [p.store.host_reader_used for p in cache.stores if p.store.is_cuda]
    summary["share"] = share_figures(cache, before, args.steps)
    trace = os.path.join(out_dir, f"decode_{kv_dtype}_{args.context}.json")
    prof.export_chrome_trace(trace)
    with open(trace) as f:
        summary["copy_engine"] = copy_engine(json.load(f).get("traceEvents", []), args.steps)
    with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
        shutil.copyfileobj(f, g)
    os.remove(trace)
    print(kv_dtype, json.dumps(summary), flush=True)
    with open(os.path.join(out_dir, f"profile_decode_{kv_dtype}_{args.context}.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
