"""Does the copy engine slow down as the pinned memory it reads grows?

At 1,048,576 int8 tokens the GPU's side of a decode read 40 GB/s of host blocks where it read 47
at 716,800 (session 14), with the same pieces and copies. One suspect is the host's address
translation for the copy engine's reads (4 KiB pages: more of them to translate as the
footprint grows). This times host-to-device copies of ``--copy`` bytes spread evenly over
pinned buffers of each ``--footprints`` size, in two kinds of pinned memory:

- ``hostalloc``: ``cudaHostAlloc`` (torch's pinned tensors; what headinfer's blocks use);
- ``thp``: anonymous memory advised to transparent huge pages, then ``cudaHostRegister``.

Prints GB/s per (kind, footprint) and the host's THP setting; ``$OUT/probe_footprint.json``
gets the rows.

Usage: python benchmarks/probe_footprint.py [--footprints 1,16,32] [--copy 16MiB]
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import time
from pathlib import Path

import torch
from _common import cuda_time, write_out

from headinfer.sizes import parse_bytes

TOTAL = 4 << 30  # bytes copied per measurement


def rate(src: torch.Tensor, step: int) -> float:
    """GB/s of copies of ``step`` bytes from ``src`` (uint8, pinned), spread evenly over it."""
    n = src.numel()
    count = TOTAL // step
    stride = max(step, (n - step) // count // step * step)
    offsets = [(i * stride) % (n - step + 1) // step * step for i in range(count)]
    dst = torch.empty(step, dtype=torch.uint8, device="cuda")

    def copy() -> None:
        for a in offsets:
            dst.copy_(src[a : a + step], non_blocking=True)

    return count * step / cuda_time(copy, iters=2) / 1e9


def thp_pinned(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """``nbytes`` of anonymous memory in transparent huge pages (where the kernel gives them),
    touched, and registered with CUDA as pinned."""
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)
    t = torch.frombuffer(mm, dtype=torch.uint8)
    t.view(-1, 4096)[:, 0] = 1  # fault every page in
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: {err}")
    return mm, t


def huge_kib() -> int | None:
    """AnonHugePages of this process, KiB."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--footprints", default="1,16,32", help="GiB, comma-separated")
    ap.add_argument("--copy", default="16MiB", help="bytes per copy")
    args = ap.parse_args()
    step = parse_bytes(args.copy, "--copy")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    rows: list[dict] = []
    print(f"THP: {thp.read_text().strip() if thp.exists() else 'unknown'}", flush=True)
    for gib in (int(g) for g in args.footprints.split(",")):
        n = gib << 30
        for kind in ("hostalloc", "thp"):
            t0 = time.perf_counter()
            mm = None
            if kind == "hostalloc":
                src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
                src.view(-1, 4096)[:, 0] = 1
            else:
                mm, src = thp_pinned(n)
            setup = time.perf_counter() - t0
            row = {
                "kind": kind,
                "footprint_gib": gib,
                "copy_bytes": step,
                "gb_per_s": round(rate(src, step), 1),
                "setup_s": round(setup, 1),
                "anon_huge_gib": round((huge_kib() or 0) / 2**20, 1),
            }
            print(row, flush=True)
            rows.append(row)
            if mm is not None:
                torch.cuda.cudart().cudaHostUnregister(src.data_ptr())
                del src
                with contextlib.suppress(BufferError):  # a view still exported: unmapped at exit
                    mm.close()
            else:
                del src
                torch.cuda.empty_cache()
                empty_host = getattr(torch._C, "_host_emptyCache", None)
                if empty_host is not None:
                    empty_host()  # torch's pinned cache gives the buffer back
    setting = thp.read_text().strip() if thp.exists() else None
    write_out("probe_footprint.json", {"thp": setting, "rows": rows})


if __name__ == "__main__":
    main()
