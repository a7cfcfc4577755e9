"""Decode with the CPU sharing the host KV (``cpu_heads``) against the GPU alone, one prefill.

A Llama-3-8B-shaped model (random bf16 weights) patched with the defaults (run it under
``shared/peers/card.py --gib 24`` for an emulated 24 GiB card). One prefill of ``--context``
tokens; then, from that same cache, greedy decode steps with the GPU alone, a crop back to the
prompt, and the same steps with the CPU taking ``cpu_heads`` kv heads. The tokens must be the
same and the logits within bf16 rounding (the summation order differs); the speed of each is
seconds per token, beside the PCIe-only floor (host KV bytes / pinned H2D bandwidth).

    python card.py --gib 24 -- python benchmarks/bench_share.py --context 131072 --cpu-heads 3

Writes $OUT/bench_share_<context>.json (or ./...).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import time

import torch
from _common import decode, h2d_gbs, llama8b

import headinfer
from headinfer.prefill import cache_kwarg_name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--cpu-heads", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--watchdog", type=float, default=120, help="seconds per decode phase")
    args = ap.parse_args()
    cfg, model = llama8b()
    gbs = h2d_gbs()
    headinfer.patch(model, chunk_size=4096)
    name = cache_kwarg_name(model)
    cache = headinfer.HeadInferCache(model)
    cache.expected_new_tokens = args.steps + 2
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, args.context), device="cuda")
    with torch.inference_mode():
        torch.cuda.synchronize()
        t = time.time()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache})
        torch.cuda.synchronize()
        prefill = time.time() - t
        first = out.logits[:, -1:].argmax(-1)
        print(f"prefill {args.context} tokens: {prefill:.1f} s", flush=True)
        results = {"device": torch.cuda.get_device_name(), "context": args.context}
        results["prefill_s"] = round(prefill, 2)
        results["h2d_gbs"] = round(gbs, 1)
        runs = {}
        for heads in (0, args.cpu_heads):
            # A hang dumps every thread's stack and ends the run instead of stalling it.
            faulthandler.dump_traceback_later(args.watchdog, exit=True)
            cache.crop(args.context)
            cache.store.cpu_heads = heads
            tokens, logits, spt = decode(model, cache, name, first, args.steps)
            mem = cache.memory()
            host = mem["used"] - mem["device_used"]
            runs[heads] = (tokens, logits)
            results[f"cpu_heads_{heads}"] = {
                "s_per_token": round(spt, 4),
                "host_kv_gib": round(host / 2**30, 2),
                "pcie_floor_s": round(host / (gbs * 1e9), 4),
                "ratio_to_pcie_floor": round(spt / (host / (gbs * 1e9)), 3) if host else None,
                "tokens": tokens,
            }
            print(json.dumps(results[f"cpu_heads_{heads}"]), flush=True)
            faulthandler.cancel_dump_traceback_later()
        (t0, l0), (t1, l1) = runs[0], runs[args.cpu_heads]
        results["same_tokens"] = t0 == t1
        results["max_abs_logit_diff"] = float((l0 - l1).abs().max())
        results["logit_scale"] = float(l0.abs().max())
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("cpu_heads")}))
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, f"bench_share_{args.context}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
