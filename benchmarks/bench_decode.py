"""Decode speed by host reader and CPU share, one prefill, beside this host's floors.

A Llama-3-8B-shaped model (random bf16 weights) patched with the defaults (run it under
``shared/peers/card.py --gib 24`` for an emulated 24 GiB card). This host's rates first:
pinned H2D by the copy engine (1 GiB), and 15 threads summing pinned float32 while the copy
engine runs (both at once: the "host floor" divides by their sum). One prefill of
``--context`` tokens; then greedy decode steps from that cache:

- ``default``: what a user gets (the faster reader by the measured rates; the CPU share on
  where predicted faster, kept by the first steps' trial only where measured faster);
- ``gpu_zero_copy`` / ``gpu_copy``: the GPU alone, reading host blocks in place / staged by
  the copy engine;
- ``shared_copy``: the copy engine and the CPU share by rates, no trial.

Each mode crops back to the prompt first, so all decode the same tokens; the tokens must match
(logits within bf16 rounding: the summation order differs).

Then, with ``--peer-contexts``, transformers' layer-wise offload (``DynamicCache(offloading=
True)``, 8K chunks) on the same model, unpatched.

    python card.py --gib 24 -- python benchmarks/bench_decode.py --contexts 8192,131072

Writes $OUT/bench_decode_<context>.json and peer_{offloaded,standard}_<context>.json (or
./...).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import threading
import time

import torch
from _common import decode, h2d_gbs, host_floors, llama8b

import headinfer
from headinfer.prefill import cache_kwarg_name


def host_read_beside_copy(gib: int = 4, threads: int = 15) -> tuple[float, float]:
    """GB/s of ``threads`` threads summing ``gib`` GiB of pinned float32, and of the copy
    engine moving pinned memory to the GPU, both at once."""
    src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    host = torch.ones(gib << 28, dtype=torch.float32).pin_memory()
    stop = threading.Event()
    copied = [0, 0.0]

    def copy_loop() -> None:
        s = torch.cuda.Stream()
        t = time.perf_counter()
        with torch.cuda.stream(s):
            while not stop.is_set():
                dst.copy_(src, non_blocking=True)
                s.synchronize()
                copied[0] += src.numel()
        copied[1] = time.perf_counter() - t

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    th = threading.Thread(target=copy_loop)
    th.start()
    time.sleep(0.2)
    host.sum()  # warm-up
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        host.sum()
    cpu = reps * host.numel() * 4 / (time.perf_counter() - t) / 1e9
    stop.set()
    th.join()
    torch.set_num_threads(before)
    return cpu, copied[0] / copied[1] / 1e9


def peer(model, cfg, context: int, steps: int, chunk: int = 8192, offloading: bool = True) -> dict:
    """transformers' own cache, as ``shared/peers/baseline_hf.py`` runs it: the layer-wise
    offload (``DynamicCache(offloading=True)``, chunked prefill) or, with ``offloading=False``,
    standard attention with a plain ``DynamicCache`` (``chunk`` >= ``context``: one-shot
    prefill): prefill seconds and decode s/token, or OOM."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, context), device="cuda")
    cache = DynamicCache(config=cfg, offloading=offloading)
    try:
        with torch.inference_mode():
            torch.cuda.synchronize()
            t = time.perf_counter()
            for s in range(0, context, chunk):
                out = model(
                    input_ids=ids[:, s : s + chunk],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t
            nxt = out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(2 + steps):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        r = {"prefill_s": round(prefill, 2), "s_per_token": round(sum(times[2:]) / steps, 4)}
    except torch.OutOfMemoryError:
        r = {"oom": True}
    del cache, ids
    gc.collect()
    torch.cuda.empty_cache()
    return r


def run_context(model, cfg, context: int, args, rates_beside: tuple[float, float, float]):
    """One prefill of ``context`` tokens, then every mode's decode steps; the results."""
    gbs, cpu_gbs, copy_beside = rates_beside
    name = cache_kwarg_name(model)
    cache = headinfer.HeadInferCache(model)
    modes = args.modes.split(",")
    cache.expected_new_tokens = 16 + args.steps
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, context), device="cuda")
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "context": context,
        "copy_engine_gbs": round(gbs, 1),
        "cpu_read_beside_copy_gbs": round(cpu_gbs, 1),
        "copy_beside_cpu_gbs": round(copy_beside, 1),
    }
    with torch.inference_mode():
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache})
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t
        first = out.logits[:, -1:].argmax(-1)
        print(f"prefill {context} tokens: {prefill:.1f} s", flush=True)
        results["prefill_s"] = round(prefill, 2)
        store = cache.store
        plan = cache.share_plan()
        rates = plan["rates"]
        results["share_plan"] = {k: plan[k] for k in ("mode", "reason", "threads", "rates")}
        runs = {}
        for mode in modes:
            faulthandler.dump_traceback_later(args.watchdog, exit=True)
            cache.crop(context)
            # Every mode decodes the same tokens; the default's first 8 steps are its trial's
            # (1 warm-up, 3 with the share and 3 without), the others' first 2 a warm-up.
            skip = 8 if mode == "default" else 2
            if mode != "default":
                cache._trial = None  # a fixed mode: no trial toggling the share
                store.host_reader = "zero-copy" if mode == "gpu_zero_copy" else "copy"
                on = mode == "shared_copy" and rates is not None
                if rates is not None:
                    r = (rates["pcie"], rates["cpu"] if on else 0.0, rates["device"])
                    store.share_rates = (*r, rates["handoff"], rates["copy"])
            print(f"{mode}: reader {store.host_reader_used}", flush=True)
            tokens, logits, spt = decode(model, cache, name, first, 8 + args.steps, skip)
            runs[mode] = (tokens, logits)
            # The floors of the bytes the decode steps read from the host (decode's plan).
            fl = host_floors(cache, gbs, cpu_gbs, copy_beside)
            for key in ("host_kv_gib", "pcie_floor_s", "host_floor_s"):
                results.setdefault(key, fl[key])
            results[mode] = {
                "s_per_token": round(spt, 4),
                "reader": store.host_reader_used,
                "x_pcie_floor": round(spt / fl["pcie_floor_s"], 3) if fl["pcie_floor_s"] else None,
                "x_host_floor": round(spt / fl["host_floor_s"], 3) if fl["host_floor_s"] else None,
                "tokens": tokens,
            }
            if mode == "default":
                results[mode]["trial"] = cache.share_plan()["trial"]
            print(json.dumps(results[mode]), flush=True)
            faulthandler.cancel_dump_traceback_later()
        base = runs[modes[0]]
        results["same_tokens"] = {m: r[0] == base[0] for m, r in runs.items()}
    del cache
    gc.collect()
    torch.cuda.empty_cache()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="131072", help="comma-separated token counts")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    ap.add_argument("--watchdog", type=float, default=300, help="seconds per decode phase")
    ap.add_argument(
        "--modes", default="default,gpu_zero_copy,gpu_copy,shared_copy", help="comma-separated"
    )
    ap.add_argument(
        "--peer-contexts",
        default="",
        help="comma-separated contexts at which to run transformers' offloaded cache too",
    )
    ap.add_argument(
        "--standard-contexts",
        default="",
        help="comma-separated contexts at which to run standard attention (one-shot prefill)",
    )
    args = ap.parse_args()
    cpu_gbs, copy_beside = host_read_beside_copy()
    gbs = h2d_gbs()
    # The probes' pinned buffers go back to the host (torch's pinned cache would keep them).
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    print(f"copy engine {gbs:.1f} GB/s; CPU beside it {cpu_gbs:.1f} + {copy_beside:.1f} GB/s")
    cfg, model = llama8b()
    headinfer.patch(model, chunk_size=4096)
    out_dir = os.environ.get("OUT", ".")
    for context in [int(c) for c in args.contexts.split(",") if c]:
        results = run_context(model, cfg, context, args, (gbs, cpu_gbs, copy_beside))
        print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}))
        with open(os.path.join(out_dir, f"bench_decode_{context}.json"), "w") as f:
            json.dump(results, f, indent=1)
    peers = [("offloaded", int(c), True) for c in args.peer_contexts.split(",") if c] + [
        ("standard", int(c), False) for c in args.standard_contexts.split(",") if c
    ]
    if peers:
        headinfer.unpatch(model)
    for kind, context, offloading in peers:
        r = {"context": context, "device": torch.cuda.get_device_name()}
        chunk = 8192 if offloading else context
        r.update(peer(model, cfg, context, args.steps, chunk=chunk, offloading=offloading))
        print(f"transformers {kind}:", json.dumps(r), flush=True)
        with open(os.path.join(out_dir, f"peer_{kind}_{context}.json"), "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
