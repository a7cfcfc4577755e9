"""Is the GPU's side of an int8 decode held back by its copies or by its kernel?

One layer of a Llama-3-8B-shaped cache (8 kv heads, 32 q heads, d=128, bf16) of ``--tokens``
tokens, exact and int8, GPU only (no CPU share): all blocks pinned on the host and read by each
host reader (``copy``: the staging ring, at each ``--pieces`` size; ``zero-copy``), then all in
device memory (the kernel alone). Prints GB/s of stored KV per decode step beside the pinned
memcpy rate measured in the same run (in one copy, and in copies of 1-16 MiB);
``$OUT/probe_staged.json`` gets the rows.

Usage: python benchmarks/probe_staged.py [--tokens 262144] [--pieces 16MiB,64MiB]
"""

from __future__ import annotations

import argparse

import torch
from _common import cuda_time, h2d_gbs, write_out

from headinfer import _core
from headinfer.sizes import parse_bytes

HKV, HQ, D = 8, 32, 128


def store(tokens: int, kv: str | None, on_host: bool) -> _core.KVStore:
    bs = 4096 if kv is None else 7710
    st = _core.KVStore(
        1,
        HKV,
        D,
        "bfloat16",
        block_size=bs,
        device=0,
        device_budget=0 if on_host else 1 << 40,
        max_len=tokens + bs,
        kv_dtype=kv,
    )
    st.cpu_heads = 0
    st.cpu_share_min_tokens = 1 << 40
    stream = torch.cuda.current_stream().cuda_stream
    for _ in range(0, tokens, 8192):
        k = torch.randn(HKV, 8192, D, device="cuda", dtype=torch.bfloat16)
        st.append(0, k, k, stream=stream)
    torch.cuda.synchronize()
    return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--pieces", default="16MiB,64MiB")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    stream = torch.cuda.current_stream().cuda_stream
    h2d = h2d_gbs()
    print(f"pinned memcpy H2D: {h2d:.1f} GB/s", flush=True)
    chunks = {mib: round(h2d_gbs(mib << 20), 1) for mib in (1, 2, 4, 16)}
    print(f"the same in copies of 1, 2, 4, 16 MiB: {chunks} GB/s", flush=True)
    q = torch.randn(HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    rows = []
    for kv in (None, "int8"):
        for on_host in (True, False):
            st = store(args.tokens, kv, on_host)
            readers = [("copy", p) for p in args.pieces.split(",")] + [("zero-copy", None)]
            for reader, piece in readers if on_host else [("device", None)]:
                if on_host:
                    st.host_reader = reader
                    if piece:
                        st.staging_piece_bytes = parse_bytes(piece, "--pieces")
                t = cuda_time(
                    lambda st=st: st.attend(0, q, out, D**-0.5, stream=stream), args.iters
                )
                nbytes = st.bytes_used()
                row = {
                    "kv": kv or "exact",
                    "reader": reader if on_host else "device",
                    "used": st.host_reader_used if on_host else "device",
                    "piece": piece,
                    "tokens": args.tokens,
                    "ms": round(t * 1e3, 3),
                    "gb_per_s": round(nbytes / t / 1e9, 1),
                    "x_memcpy": round(nbytes / t / 1e9 / h2d, 3),
                }
                rows.append(row)
                print(row, flush=True)
            del st
            torch.cuda.synchronize()
    write_out(
        "probe_staged.json",
        {
            "h2d_gbs": h2d,
            "h2d_by_copy_mib": chunks,
            "device": torch.cuda.get_device_name(),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
