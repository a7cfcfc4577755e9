"""The 8-bit KV mode against the exact one on the Llama-3-8B shape: capacity, decode, prefill,
and the logits' error, beside this host's floors.

A Llama-3-8B-shaped model (random bf16 weights) patched with the defaults; run it under
``shared/peers/card.py --gib 24`` for an emulated 24 GiB card. This host's rates first (the
copy engine alone, and the CPU's read beside the copy engine: the "host floor" divides the host
KV bytes by their sum). Then:

- ``--loss-context`` (e.g. 131072): the last position's logits after a chunked prefill with the
  exact cache, with the int8 cache, and after a one-shot prefill (one chunk) with the exact
  cache: the int8 error relative to exact, beside bf16's own noise (chunked vs one-shot). The
  one-shot prefill needs the whole card: run this phase without ``card.py``;
- ``--exact-context`` (e.g. 716800): one prefill and ``--steps`` greedy decode steps with the
  exact cache (the defaults), its memory released after;
- ``--contexts`` (e.g. 716800,1048576): one int8 cache, prefilled to the first context,
  decoded, then prefilled on to the next (the cache grows; nothing is prefilled twice), and so
  on. At a context the exact run also reached, the greedy tokens are compared;
- ``--alt-staging-mib`` (e.g. 128), ``--alt-rings`` (e.g. 32x6,64x3: MiB a piece x buffers),
  ``--alt-threads`` (e.g. 14): after each decode, more steps with the copy engine's staging
  pieces of that size, then with each staging ring (a deeper one runs further ahead of the
  GPU's kernels), then with the CPU share on that many threads.

Each decode reports where its shared steps spent their time (``timeline_s_per_token``).

    python benchmarks/bench_kv_int8.py --loss-context 131072 --exact-context 0 --contexts ""
    python card.py --gib 24 -- python benchmarks/bench_kv_int8.py --exact-context 716800 \\
        --contexts 716800,1048576

Writes $OUT/bench_kv_int8.json (the loss phase alone: bench_kv_int8_loss.json; or ./...),
updated after each phase.
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
from bench_decode import host_read_beside_copy

import headinfer
from headinfer import _core
from headinfer.planner import process_device_bytes
from headinfer.prefill import cache_kwarg_name


class MemoryTrace:
    """Polls this process's device memory (NVML) every 20 ms on a thread of its own, and keeps
    each phase's highest sample with what it was made of: torch's reserved bytes, headinfer's
    device blocks, and the rest (the CUDA context, kernels, stream-ordered workspaces)."""

    def __init__(self) -> None:
        self.phase = "start"
        self.peaks: dict[str, dict] = {}
        self._stop = threading.Event()
        self._dev = torch.device("cuda", torch.cuda.current_device())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            used = process_device_bytes(self._dev)
            if used is None:
                return  # NVML cannot report this process: card.py's peak is all there is
            torch_res = torch.cuda.memory_reserved(self._dev)
            blocks = _core.device_block_bytes()
            peak = self.peaks.get(self.phase)
            if peak is None or used > peak["nvml_gib"] * 2**30:
                self.peaks[self.phase] = {
                    "nvml_gib": round(used / 2**30, 3),
                    "torch_reserved_gib": round(torch_res / 2**30, 3),
                    "device_blocks_gib": round(blocks / 2**30, 3),
                    "other_gib": round((used - torch_res - blocks) / 2**30, 3),
                }

    def stop(self) -> dict[str, dict]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def prefill(model, cache, name: str, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds to run ``ids`` (``[1, n]``) into ``cache`` (chunked by the patch), and the last
    position's logits (f32)."""
    with torch.inference_mode():
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache})
        torch.cuda.synchronize()
    return time.perf_counter() - t, out.logits[:, -1].float()


def timelines(cache) -> list[dict]:
    """Each CUDA store's ``share_timeline`` (sums since its first shared step), as
    ``share_plan()["timeline"]`` lists them, without the plan's per-layer split."""
    return [p.store.share_timeline for p in cache.stores if p.store.is_cuda]


def share_figures(cache, since: list[dict], steps: int) -> dict:
    """How the GPU read host blocks (``reader``, per store) and what the CPU share balanced
    by, in GB/s: the probe's CPU rate, the rates each store's splits balance by now (the
    CPU's and the GPU's, as its layers' own steps showed them: mean, least and most over
    the layers), what the share's tasks computed at, and the layer
    steps read (and those the GPU waited in); and where the timed ``steps`` spent their time
    since the ``timelines`` taken before them, in seconds a token (``gpu_own``,
    ``gpu_waited``, ``cpu_busy``, ``cpu_idle``: see ``KVStore.share_timeline``; the layer
    steps read lag the GPU by a token)."""
    plan = cache.share_plan()
    probe = (plan.get("rates") or {}).get("cpu")
    measured = [m and round(m[0] / 1e9, 1) for m in plan.get("cpu_measured", [])]
    now = plan.get("timeline") or []
    counts = ("gpu_steps", "cpu_tasks")
    per_token = [
        {k: round((t[k] - b.get(k, 0.0)) / (1 if k in counts else steps), 4) for k in t}
        for t, b in zip(now, since or [{}] * len(now))
    ]

    def spread(rates: list[float]) -> list[float]:
        gbs = [r / 1e9 for r in rates]
        return [round(sum(gbs) / len(gbs), 1), round(min(gbs), 1), round(max(gbs), 1)]

    return {
        "share": plan["mode"],
        "reader": plan.get("host_reader"),
        "cpu_probe_gbs": probe and round(probe / 1e9, 1),
        "balanced_gbs": [
            b and {"cpu": spread([c for c, _ in b]), "gpu": spread([g for _, g in b])}
            for b in plan.get("balance", [])
        ],
        "cpu_measured_gbs": measured,
        "steps": plan.get("steps"),
        "timeline_s_per_token": per_token,
    }


def timed_decode(model, cache, name: str, first, steps: int, skip: int = 8):
    """``steps`` timed greedy steps after ``skip`` untimed ones: (tokens, s per token, the
    share's figures over the timed steps)."""
    before: list[list[dict]] = []
    with torch.inference_mode():
        tokens, _, spt = decode(
            model,
            cache,
            name,
            first,
            skip + steps,
            skip=skip,
            mark=lambda: before.append(timelines(cache)),
        )
    return tokens, spt, share_figures(cache, before[0] if before else [], steps)


def alt_decode(model, cache, name: str, last: int, steps: int, ring: tuple, threads: int):
    """The same decode on, from token ``last``, with the copy engine's staging ring of
    ``ring`` = (MiB a piece, buffers; 0: as is) or the CPU share on ``threads`` threads (0: as
    is); the defaults are restored after."""
    piece_mib, buffers = ring
    stores = [p.store for p in cache.stores if p.store.is_cuda]
    default = [(s.staging_piece_bytes, s.staging_buffers, s.share_threads) for s in stores]
    for s in stores:
        if piece_mib:
            s.staging_piece_bytes = piece_mib << 20
        if buffers:
            s.staging_buffers = buffers
        if threads:
            s.share_threads = threads
    try:
        first = torch.tensor([[last]], device="cuda")
        tokens, spt, figures = timed_decode(model, cache, name, first, steps, skip=2)
    finally:
        for s, (b, n, t) in zip(stores, default):
            s.staging_piece_bytes = b
            s.staging_buffers = n
            if t:
                s.share_threads = t
    return {
        "piece_mib": piece_mib,
        "buffers": buffers,
        "threads": threads,
        "s_per_token": round(spt, 4),
        **figures,
        "tokens": tokens,
    }


def parse_rings(text: str) -> list[tuple[int, int]]:
    """``--alt-rings``: "32x6,64x3" -> [(32, 6), (64, 3)] (MiB a piece, buffers)."""
    rings = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        mib, sep, n = item.partition("x")
        if not (sep and mib.isdigit() and n.isdigit()) or int(n) < 2 or int(mib) < 1:
            raise SystemExit(f"--alt-rings: want MiBxBUFFERS items like 32x6, got {item!r}")
        rings.append((int(mib), int(n)))
    return rings


def alternatives(model, cache, name: str, last: int, args) -> list[dict]:
    """``alt_decode`` for each of ``--alt-staging-mib``, ``--alt-rings`` and ``--alt-threads``
    asked for."""
    runs = [((args.alt_staging_mib, 0), 0)] if args.alt_staging_mib else []
    runs += [(ring, 0) for ring in parse_rings(args.alt_rings)]
    runs += [((0, 0), args.alt_threads)] if args.alt_threads else []
    out = []
    for ring, threads in runs:
        out.append(alt_decode(model, cache, name, last, args.steps, ring, threads))
        last = out[-1]["tokens"][-1]
    return out


def release(cache) -> None:
    """Frees a cache's memory, host and device, pinned pool included (the next cache's blocks
    may have another size)."""
    cache.crop(0)
    del cache
    gc.collect()
    torch.cuda.empty_cache()
    _core.release_pinned_pool()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="716800,1048576", help="int8 contexts, ascending")
    ap.add_argument("--exact-context", type=int, default=716800, help="0: none")
    ap.add_argument("--loss-context", type=int, default=0, help="0: no logit-error phase")
    ap.add_argument("--steps", type=int, default=6, help="timed decode steps")
    ap.add_argument("--gpu-budget", default=None, help="patch(gpu_budget=...), e.g. 23GiB")
    ap.add_argument(
        "--alt-staging-mib",
        type=int,
        default=0,
        help="after each decode, the same with staging pieces of this size (0: not)",
    )
    ap.add_argument(
        "--alt-rings",
        default="",
        help="after each decode, the same with each staging ring, MiBxBUFFERS (e.g. 32x6,64x3)",
    )
    ap.add_argument(
        "--alt-threads",
        type=int,
        default=0,
        help="after each decode, the same with the CPU share on this many threads (0: not)",
    )
    ap.add_argument("--watchdog", type=float, default=900, help="seconds per phase")
    args = ap.parse_args()
    only_loss = not args.contexts and not args.exact_context
    out_name = "bench_kv_int8_loss.json" if only_loss else "bench_kv_int8.json"
    out_path = os.path.join(os.environ.get("OUT", "."), out_name)
    cpu_gbs, copy_beside = host_read_beside_copy()
    gbs = h2d_gbs()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    rates = (gbs, cpu_gbs, copy_beside)
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "copy_engine_gbs": round(gbs, 1),
        "cpu_read_beside_copy_gbs": round(cpu_gbs, 1),
        "copy_beside_cpu_gbs": round(copy_beside, 1),
    }
    print(json.dumps(res), flush=True)

    trace = MemoryTrace()

    def save() -> None:
        # dict() copies in one step under the GIL: the trace thread may add a phase meanwhile.
        with open(out_path, "w") as f:
            json.dump({**res, "memory_peaks": dict(trace.peaks)}, f, indent=1)

    cfg, model = llama8b()
    headinfer.patch(model, chunk_size=4096, gpu_budget=args.gpu_budget)
    name = cache_kwarg_name(model)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    longest = max(contexts + [args.exact_context, args.loss_context])
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, longest), device="cuda")

    if args.loss_context:
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
        n = args.loss_context
        logits = {}
        for label, kv, chunk in [
            ("exact", None, 4096),
            ("int8", "int8", 4096),
            ("exact_one_shot", None, n),
        ]:
            headinfer.unpatch(model)
            headinfer.patch(model, chunk_size=chunk, gpu_budget=args.gpu_budget)
            cache = headinfer.HeadInferCache(model, kv_dtype=kv)
            secs, logits[label] = prefill(model, cache, name, ids[:, :n])
            print(f"loss phase: {label} prefill {n} in {secs:.1f} s", flush=True)
            release(cache)
            del cache
        headinfer.unpatch(model)
        headinfer.patch(model, chunk_size=4096, gpu_budget=args.gpu_budget)
        ref = logits["exact"]

        def rel(x: torch.Tensor) -> float:
            return float((x - ref).norm() / ref.norm())

        res["loss"] = {
            "context": n,
            "int8_rel_logit_err": rel(logits["int8"]),
            "bf16_noise_rel_logit_err": rel(logits["exact_one_shot"]),
            "int8_same_argmax": bool(logits["int8"].argmax() == ref.argmax()),
            "int8_max_abs_err": float((logits["int8"] - ref).abs().max()),
            "bf16_noise_max_abs_err": float((logits["exact_one_shot"] - ref).abs().max()),
        }
        print(json.dumps(res["loss"]), flush=True)
        save()
        faulthandler.cancel_dump_traceback_later()

    exact_tokens = None
    if args.exact_context:
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
        n = args.exact_context
        trace.phase = f"exact prefill {n}"
        cache = headinfer.HeadInferCache(model)
        cache.expected_new_tokens = 32 + 2 * args.steps
        secs, logits = prefill(model, cache, name, ids[:, :n])
        print(f"exact: prefill {n} in {secs:.1f} s", flush=True)
        first = logits.argmax(-1, keepdim=True)
        r = {"context": n, "prefill_s": round(secs, 2)}
        trace.phase = f"exact decode {n}"
        tokens, spt, figures = timed_decode(model, cache, name, first, args.steps)
        exact_tokens = tokens
        r.update(host_floors(cache, *rates))
        r.update(
            s_per_token=round(spt, 4),
            x_host_floor=round(spt / r["host_floor_s"], 3) if r["host_floor_s"] else None,
            **figures,
            tokens=tokens,
        )
        r["alternatives"] = alternatives(model, cache, name, tokens[-1], args)
        res["exact"] = r
        print(json.dumps(r), flush=True)
        save()
        release(cache)
        del cache  # this frame's reference too, or its blocks stay allocated
        _core.release_pinned_pool()  # and they went to the pool as it dropped
        faulthandler.cancel_dump_traceback_later()

    if not contexts:
        return
    cache = headinfer.HeadInferCache(model, kv_dtype="int8")
    cache.expected_new_tokens = 32 + 2 * args.steps
    done = 0
    res["int8"] = []
    prefill_total = 0.0
    for n in contexts:
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
        cache.crop(done)  # drop the decoded tokens: the prompt goes on from `done`
        trace.phase = f"int8 prefill {n}"
        try:
            secs, logits = prefill(model, cache, name, ids[:, done:n])
        except Exception as e:  # noqa: BLE001 - recorded: the capacity is the finding
            res["int8"].append({"context": n, "error": f"{type(e).__name__}: {e}"})
            print(f"int8: prefill to {n} failed: {e!r}", flush=True)
            save()
            break
        prefill_total += secs
        done = n
        print(f"int8: prefill {n} ({prefill_total:.1f} s in all)", flush=True)
        first = logits.argmax(-1, keepdim=True)
        r = {"context": n, "prefill_s_cumulative": round(prefill_total, 2)}
        trace.phase = f"int8 decode {n}"
        tokens, spt, figures = timed_decode(model, cache, name, first, args.steps)
        r.update(host_floors(cache, *rates))
        r.update(
            s_per_token=round(spt, 4),
            x_host_floor=round(spt / r["host_floor_s"], 3) if r["host_floor_s"] else None,
            **figures,
            tokens=tokens,
        )
        r["alternatives"] = alternatives(model, cache, name, tokens[-1], args)
        if exact_tokens is not None and n == args.exact_context:
            r["same_tokens_as_exact"] = sum(a == b for a, b in zip(tokens, exact_tokens))
            r["x_exact_decode"] = round(spt / res["exact"]["s_per_token"], 3)
            r["x_exact_prefill"] = round(prefill_total / res["exact"]["prefill_s"], 3)
        res["int8"].append(r)
        print(json.dumps(r), flush=True)
        save()
        faulthandler.cancel_dump_traceback_later()
    res["nvml_note"] = "peak device memory: card.py's report; per phase: memory_peaks"
    print(json.dumps(trace.stop()), flush=True)
    save()


if __name__ == "__main__":
    main()
