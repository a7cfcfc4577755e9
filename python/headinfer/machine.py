"""What this machine is and how fast it moves KV bytes: the first two parts of ``headinfer check``.

``environment()`` reports the versions, CUDA (driver and NVRTC found, or why not), each GPU,
the host's cores, the instruction set the CPU kernels chose, RAM and the pinned-memory limit.
``measure()`` times, now: pinned copy-engine host-to-device copies (torch, CUDA events), the
decode kernel's read rate over host and over device memory and the CPU share's rate (the
probes of ``share.measure_rates``, ``_core.measure_*``), and saves the share's rates where the
runtime and ``headinfer plan`` read them (``share.rates_path()``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import resource
import time
from typing import Any

import torch

from . import _core
from .host_memory import mem_available
from .kv_dtype import check_kv_dtype, store_kv_dtype
from .share import (
    cpu_model,
    machine_key,
    measure_rates,
    physical_cores,
    rates_path,
    save_rates,
    share_threads,
)

__all__ = ["environment", "measure", "measure_h2d", "mem_total"]

logger = logging.getLogger("headinfer")

#: Bytes each copy-engine probe moves (large enough that the copy's fixed cost is noise).
H2D_BYTES = 256 << 20
#: Copies timed; the best counts (the link's rate, not the host's noise).
H2D_REPEATS = 4


def mem_total() -> int | None:
    """The host's RAM (``MemTotal``), if the OS says."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _memlock() -> int | None:
    # RLIMIT_MEMLOCK bounds page-locked memory a process may lock itself; CUDA's pinned
    # allocations are not counted against it by the driver, so it is reported, not enforced.
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def environment() -> dict[str, Any]:
    """This machine's software and hardware, as ``headinfer check`` reports them (JSON-ready)."""
    import transformers

    cuda = _core.cuda_status()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(
                {
                    "index": i,
                    "name": props.name,
                    "memory_bytes": int(total),
                    "free_bytes": int(free),
                    "compute_capability": f"{props.major}.{props.minor}",
                }
            )
    return {
        "headinfer": _core.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_cuda": torch.version.cuda,
        "cuda_ok": cuda is None,
        "cuda_status": cuda or "the driver and NVRTC load",
        "gpus": gpus,
        "cpu": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "share_threads": share_threads(),
        "cpu_isa": _core.cpu_isa(),
        "cpu_isa_failures": list(_core.cpu_isa_failures()),
        "ram_total_bytes": mem_total(),
        "ram_available_bytes": mem_available(),
        "memlock_limit_bytes": _memlock(),
        "pinned_bytes_held": _core.pinned_bytes(),
    }


def measure_h2d(device: int = 0, nbytes: int = H2D_BYTES, repeats: int = H2D_REPEATS) -> float:
    """Bytes per second of a pinned host buffer's copy to GPU ``device`` (the copy engine, as
    staging uses it): the best of ``repeats`` copies of ``nbytes``, timed with CUDA events."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
    stream = torch.cuda.Stream(device)
    best = float("inf")
    with torch.cuda.stream(stream):
        dev.copy_(host, non_blocking=True)  # warm-up: first-touch and context costs
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dev.copy_(host, non_blocking=True)
            end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    del host, dev
    return nbytes / best


def measure(
    *, dtype: str, head_dim: int, group: int, save: bool = True, kv_dtype: str = "exact"
) -> dict[str, Any]:
    """This machine's rates for decode of ``dtype`` KV with heads of ``head_dim`` and ``group``
    query heads per kv head, held as ``kv_dtype`` (``"exact"`` or ``"int8"``: the CPU share's
    rate is its kernel's over that format, in its stored bytes), measured now (a few seconds).

    Returns ``{"rates": {name: bytes/s or s}, "seconds", "key", "saved_to", "gpu",
    "kv_dtype"}``: with a
    GPU, every field of ``share.ShareRates`` (the CPU share's inputs: the decode kernel over
    host memory, ``pcie``; over device memory, ``device``; the CPU share, ``cpu``; its fixed
    cost, ``handoff``; and any other the probes measure) plus ``h2d_copy``, the pinned
    copy-engine rate; the share's rates are saved under this machine's key (``save``).
    Without a GPU: the CPU share's rate alone, not saved (the rates file is a GPU host's).
    """
    start = time.perf_counter()
    kv_dtype = check_kv_dtype(kv_dtype)
    threads = max(share_threads(), 1)
    out: dict[str, Any] = {
        "key": None,
        "saved_to": None,
        "gpu": None,
        "threads": threads,
        "kv_dtype": kv_dtype,
    }
    rates: dict[str, float] = {}
    if torch.cuda.is_available() and _core.cuda_status() is None:
        index = torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        out["gpu"] = name
        share = measure_rates(
            index,
            dtype=dtype,
            head_dim=head_dim,
            group=group,
            threads=share_threads(),
            kv_dtype=kv_dtype,
        )
        rates.update({f.name: float(getattr(share, f.name)) for f in dataclasses.fields(share)})
        rates["h2d_copy"] = measure_h2d(index)
        key = machine_key(
            name,
            dtype=dtype,
            head_dim=head_dim,
            group=group,
            threads=share_threads(),
            cores=physical_cores(),
            kv_dtype=kv_dtype,
        )
        out["key"] = key
        if save:
            try:
                out["saved_to"] = str(save_rates(key, share))
            except OSError as exc:
                logger.warning("could not save the rates to %s: %s", rates_path(), exc)
    else:
        cpu, fixed = _core.measure_cpu_rate(
            dtype, head_dim, group, threads=threads, kv_dtype=store_kv_dtype(kv_dtype)
        )
        rates.update({"cpu": cpu, "handoff": fixed})
    out["rates"] = rates
    out["seconds"] = time.perf_counter() - start
    return out
