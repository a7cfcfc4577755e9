"""The CPU attention's decode rate over a CPU store, exact (bf16) and int8, at some thread counts.

One decode step (one query per q head) of one layer over ``--tokens`` keys, Llama-3-8B's shape
by default (8 kv heads, GQA group 4, head_dim 128), through ``_core.KVStore.attend``: the
kernels the CPU share runs. The rate is the stored bytes read (keys and values, in the store's
own format: 256 bytes a row in bf16, 136 in int8) per second of the whole call, the median of
``--calls`` calls after a first. Needs no GPU and no Rust (``cargo bench --bench
bench_cpu_attend`` measures the same per instruction set where Rust is).

rayon's pool takes its size at first use, so each thread count runs in a process of its own
(``RAYON_NUM_THREADS``)::

    python benchmarks/cpu_kv_rate.py --tokens 262144 --threads 1,15 --json rate.json

Prints one line per (threads, kv dtype); ``--json`` writes them as a list.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(tokens: int, heads: int, head_dim: int, group: int, calls: int) -> list[dict]:
    """This process's rates, one dict per kv dtype."""
    import torch

    from headinfer import _core

    torch.manual_seed(0)
    k = torch.randn(heads, tokens, head_dim, dtype=torch.bfloat16)
    q = torch.randn(heads * group, 1, head_dim, dtype=torch.bfloat16)
    out = torch.empty(heads * group, 1, head_dim, dtype=torch.bfloat16)
    rows = []
    for kv in (None, "int8"):
        store = _core.KVStore(1, heads, head_dim, "bfloat16", kv_dtype=kv)
        for a in range(0, tokens, 16384):
            store.append(0, k[:, a : a + 16384], k[:, a : a + 16384])
        scale = head_dim**-0.5
        store.attend(0, q, out, scale)
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            store.attend(0, q, out, scale)
            times.append(time.perf_counter() - t)
        seconds = statistics.median(times)
        row_bytes = _core.kv_row_bytes(head_dim, "bfloat16", kv)
        stored = 2 * heads * tokens * row_bytes
        rows.append(
            {
                "kv_dtype": kv or "exact",
                "threads": int(os.environ.get("RAYON_NUM_THREADS", "0")) or os.cpu_count(),
                "tokens": tokens,
                "seconds": seconds,
                "best_seconds": min(times),
                "stored_bytes": stored,
                "gb_per_s": stored / seconds / 1e9,
                "ns_per_key_head": seconds / (tokens * heads) * 1e9,
            }
        )
        del store
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated counts")
    ap.add_argument("--heads", type=int, default=8, help="kv heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4, help="q heads per kv head")
    ap.add_argument("--calls", type=int, default=7, help="timed calls (median)")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (args.tokens, args.heads, args.head_dim, args.group, args.calls)
    if args.child:
        print(json.dumps(measure(*shape)))
        return
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--child", "--tokens", str(args.tokens)]
        cmd += ["--heads", str(args.heads), "--head-dim", str(args.head_dim)]
        cmd += ["--group", str(args.group), "--calls", str(args.calls)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        for row in json.loads(done.stdout.strip().splitlines()[-1]):
            rows.append(row)
            ms, gbs, ns = row["seconds"] * 1e3, row["gb_per_s"], row["ns_per_key_head"]
            print(
                f"threads {row['threads']:>3} {row['kv_dtype']:>5}: {ms:8.2f} ms, "
                f"{gbs:6.1f} GB/s stored, {ns:6.2f} ns per key and kv head",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
