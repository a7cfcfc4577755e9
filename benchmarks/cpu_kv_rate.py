"""The CPU share's decode rate, exact (bf16) and int8, at some thread counts.

``_core.measure_cpu_rate`` (the probe ``headinfer check`` and the runtime use) at each thread
count on a pool of its own: decode attention of ``--group`` query heads per kv head over
``--bytes`` of keys and values (8 kv heads of ``--head-dim``) in host memory, int8 rows
quantized by the store's quantizer. The rate is in bytes as the store holds them (256 a row in
bf16 at head_dim 128, 136 in int8). Needs no GPU and no Rust (``cargo bench --bench
bench_cpu_attend`` measures the same kernels per instruction set where Rust is)::

    python benchmarks/cpu_kv_rate.py --bytes 1GiB --threads 1,15 --json rate.json

Prints one line per (threads, kv dtype); ``--json`` writes them as a list.
"""

from __future__ import annotations

import argparse
import json
import os

from headinfer import _core
from headinfer.sizes import parse_bytes

KV_HEADS = 8


def measure(threads: int, nbytes: int, head_dim: int, group: int, seconds: float) -> list[dict]:
    """The rates on `threads` threads, one dict per kv dtype."""
    rows = []
    for kv in (None, "int8"):
        rate, fixed = _core.measure_cpu_rate(
            "bfloat16", head_dim, group, threads=threads, bytes=nbytes, seconds=seconds, kv_dtype=kv
        )
        row_bytes = _core.kv_row_bytes(head_dim, "bfloat16", kv)
        rows.append(
            {
                "kv_dtype": kv or "exact",
                "threads": threads,
                "bytes": nbytes,
                "gb_per_s": rate / 1e9,
                "fixed_s": fixed,
                # Per key (its K and V rows) of one kv head.
                "ns_per_key_head": 2 * row_bytes / rate * 1e9,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bytes", default="256MiB", help="keys and values read per run")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated counts")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--group", type=int, default=4, help="q heads per kv head")
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement (3-16 runs)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    nbytes = parse_bytes(args.bytes, "--bytes")
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for row in measure(threads, nbytes, args.head_dim, args.group, args.seconds):
            rows.append(row)
            gbs, ns = row["gb_per_s"], row["ns_per_key_head"]
            print(
                f"threads {threads:>3} {row['kv_dtype']:>5}: {gbs:6.1f} GB/s stored, "
                f"{ns:6.2f} ns per key and kv head",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
