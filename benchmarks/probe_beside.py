"""The copy engine and the CPU share's own kernels, each alone and both at once.

The host floor takes the CPU's plain read beside the copy engine (``host_read_beside_copy``);
a shared decode runs the share's attention kernels instead, int8 or exact, on its threads.
This measures what the pair gives with those kernels: the copy engine moving ``--piece``
copies from ``--bytes`` of pinned memory to the GPU (the staging ring's size of copy), and
``_core.measure_cpu_rate`` on ``--threads`` threads, alone and at once::

    python benchmarks/probe_beside.py --threads 15 --json beside.json
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import threading
import time

import torch

from headinfer import _core
from headinfer.sizes import parse_bytes


class CopyLoop:
    """Copies of ``piece`` bytes, round the pinned buffer, on a stream of its own until
    stopped; ``gbs()`` is their rate."""

    def __init__(self, nbytes: int, piece: int) -> None:
        self.src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        self.dst = torch.empty(piece * 4, dtype=torch.uint8, device="cuda")
        self.piece = piece
        self.stop = threading.Event()
        self.moved = 0
        self.secs = 0.0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        stream = torch.cuda.Stream()
        n = self.src.numel() // self.piece
        i = 0
        t = time.perf_counter()
        with torch.cuda.stream(stream):
            while not self.stop.is_set():
                for _ in range(16):
                    a = (i % n) * self.piece
                    b = (i % 4) * self.piece
                    self.dst[b : b + self.piece].copy_(
                        self.src[a : a + self.piece], non_blocking=True
                    )
                    i += 1
                stream.synchronize()
                self.moved += 16 * self.piece
        self.secs = time.perf_counter() - t

    def __enter__(self) -> CopyLoop:
        self.thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def gbs(self) -> float:
        return self.moved / self.secs / 1e9


def cpu_gbs(kv: str | None, threads: int, nbytes: int, seconds: float) -> float:
    rate, _ = _core.measure_cpu_rate(
        "bfloat16", 128, 4, threads=threads, bytes=nbytes, seconds=seconds, kv_dtype=kv
    )
    return rate / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=15)
    ap.add_argument("--bytes", default="1GiB", help="host KV the CPU reads, and pinned copied")
    ap.add_argument("--piece", default="16MiB", help="bytes of each copy")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    faulthandler.dump_traceback_later(20 * args.seconds + 60, exit=True)
    nbytes, piece = parse_bytes(args.bytes), parse_bytes(args.piece)
    rows = []
    with CopyLoop(nbytes, piece) as c:
        time.sleep(args.seconds)
    rows.append({"what": "copy engine alone", "copy_gbs": round(c.gbs(), 1)})
    for kv in ("int8", None):
        name = kv or "exact"
        alone = cpu_gbs(kv, args.threads, nbytes, args.seconds)
        with CopyLoop(nbytes, piece) as c:
            beside = cpu_gbs(kv, args.threads, nbytes, args.seconds)
        rows.append({"what": f"{name} kernel alone", "cpu_gbs": round(alone, 1)})
        rows.append(
            {
                "what": f"{name} kernel beside the copy engine",
                "cpu_gbs": round(beside, 1),
                "copy_gbs": round(c.gbs(), 1),
                "sum_gbs": round(beside + c.gbs(), 1),
            }
        )
    for r in rows:
        print(json.dumps({"threads": args.threads, **r}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
