"""The CPU share's inputs: the cores it may use and the rates it balances, measured once per
machine and cached in a small JSON file.

The decision itself is the planner's (``planner.plan_share``); the per-step split is Rust's
(``src/attention/policy.rs``: ``balance``), from the rates found here.

Rates file: ``$HEADINFER_RATES_FILE``, else ``$XDG_CACHE_HOME/headinfer/rates.json``, else
``~/.cache/headinfer/rates.json``; one entry per key (GPU name, CPU model, physical cores,
share threads, dtype, head size, GQA group, and for a store of another ``kv_dtype`` than
``"exact"``, that kv dtype: the CPU's kernel over int8 rows reads fewer stored bytes per second
than over exact ones, so an int8 store has rates of its own, and an exact store's key is what
it always was). ``HEADINFER_REPROBE=1`` measures again and rewrites the entry.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import _core
from .kv_dtype import check_kv_dtype, store_kv_dtype

__all__ = [
    "REPROBE_ENV",
    "RATES_FILE_ENV",
    "ShareRates",
    "cpu_model",
    "kv_label",
    "load_rates",
    "machine_key",
    "measure_rates",
    "physical_cores",
    "rates_path",
    "save_rates",
    "share_threads",
]

logger = logging.getLogger("headinfer")

#: Set to a path: where the rates are cached.
RATES_FILE_ENV = "HEADINFER_RATES_FILE"
#: Set to 1: measure the rates again, whatever the file holds.
REPROBE_ENV = "HEADINFER_REPROBE"
#: The file's format; entries of another version are measured again (2: the copy engine's
#: rate, and the CPU's measured beside it; 3: the GPU's probes read the store's own format).
RATES_VERSION = 3


@dataclass(frozen=True)
class ShareRates:
    """What the policy balances: bytes of keys and values read per second by the GPU kernel
    from host blocks in place (``pcie``: zero-copy), by the CPU share's threads while the copy
    engine runs (``cpu``: bytes as the store holds them, over rows of its ``kv_dtype``), by
    the GPU from its own memory (``device``), the seconds a shared
    step costs whatever its size (``handoff``), and bytes per second the copy engine stages
    host blocks into device memory (``copy``; 0: not measured). The GPU reads host blocks by
    the faster of ``copy`` and ``pcie``.
    """

    pcie: float
    cpu: float
    device: float
    handoff: float
    copy: float = 0.0

    def as_tuple(self) -> tuple[float, float, float, float, float]:
        """``(pcie, cpu, device, handoff, copy)``, as ``KVStore.share_rates`` takes them."""
        return (self.pcie, self.cpu, self.device, self.handoff, self.copy)

    @classmethod
    def from_dict(cls, d: Any) -> ShareRates:
        """From the file's entry; ``ValueError`` naming the field that is missing or bad."""
        if not isinstance(d, dict):
            raise ValueError(f"rates: expected an object, got {type(d).__name__}")
        values = {}
        for name in ("pcie", "cpu", "device", "handoff", "copy"):
            v = d.get(name, 0.0 if name == "copy" else None)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"rates: {name} must be a number >= 0, got {v!r}")
            values[name] = float(v)
        if values["pcie"] <= 0 or values["device"] <= 0:
            raise ValueError("rates: pcie and device must be positive")
        return cls(**values)


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int] | None = None, sysfs: str = "/sys/devices/system/cpu") -> int:
    """Physical cores among the CPUs this process may run on (``os.sched_getaffinity``): SMT
    siblings count once, by their (package, core) ids in sysfs; where sysfs does not say,
    every CPU counts."""
    cpus = _affinity() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topo = Path(sysfs) / f"cpu{cpu}" / "topology"
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            cores.add(("cpu", str(cpu)))
            continue
        cores.add((package, core))
    return max(len(cores), 1)


def share_threads(cores: int | None = None) -> int:
    """Threads for the CPU share: the physical cores less one, the thread that drives the GPU
    (Python queueing the model's kernels). torch's own CPU thread pool is idle while the model
    runs on the GPU, so its threads (``torch.get_num_threads()``, by default every physical
    core) are not subtracted."""
    cores = physical_cores() if cores is None else cores
    return max(cores - 1, 0)


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_key(
    gpu_name: str,
    *,
    dtype: str,
    head_dim: int,
    group: int,
    threads: int,
    cores: int,
    kv_dtype: str | None = "exact",
) -> str:
    """The rates file's key of one (machine, kernel shape, ``kv_dtype``): an exact store's
    key names no kv dtype (as before it was part of the key, so files written then still
    serve exact stores); another's ends with ``| kv_dtype int8``."""
    key = (
        f"{gpu_name} | {cpu_model()} | {cores} cores | {threads} threads | {dtype} | "
        f"head_dim {head_dim} | group {group}"
    )
    kv_dtype = check_kv_dtype(kv_dtype)
    return key if kv_dtype == "exact" else f"{key} | kv_dtype {kv_dtype}"


def rates_path() -> Path:
    """Where the rates are cached (see the module's docstring)."""
    env = os.environ.get(RATES_FILE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "headinfer" / "rates.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring the rates file %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def load_rates(key: str, path: Path | None = None) -> ShareRates | None:
    """The cached rates of ``key``, or ``None`` (no file, no entry, another version, or an
    entry that does not parse: logged, then measured again)."""
    path = rates_path() if path is None else path
    entry = _read(path).get(key)
    if not isinstance(entry, dict) or entry.get("version") != RATES_VERSION:
        return None
    try:
        return ShareRates.from_dict(entry)
    except ValueError as exc:
        logger.warning("ignoring the rates of %r in %s: %s", key, path, exc)
        return None


def save_rates(key: str, rates: ShareRates, path: Path | None = None) -> Path:
    """Writes ``rates`` under ``key`` (other entries kept), atomically; returns the path."""
    path = rates_path() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read(path)
    data[key] = {**asdict(rates), "version": RATES_VERSION, "measured": time.time()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".rates-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def measure_rates(
    device_index: int,
    *,
    dtype: str,
    head_dim: int,
    group: int,
    threads: int,
    kv_dtype: str | None = "exact",
) -> ShareRates:
    """Measures the rates (about a second): on GPU ``device_index``, the decode kernel over
    64 MiB of pinned memory and a few L2 caches' worth of device memory, and the copy engine
    over the same pinned memory; the CPU share's kernel on ``threads`` threads over 256 MiB of
    host keys and values held as a store of ``kv_dtype`` holds them (``"exact"`` or
    ``"int8"``: its rate is in those stored bytes) while the copy engine runs (as in a shared
    step; all transient: see ``src/attention/rates.rs``). The GPU's probes read the rows as
    that store holds them too, with its kernel: an int8 store's zero-copy reads are slower
    than exact's, and the reader (zero-copy or the copy engine) is chosen by these rates."""
    kv_dtype = check_kv_dtype(kv_dtype)
    start = time.perf_counter()
    pcie, device, copy = _core.measure_gpu_rates(
        device_index, dtype, head_dim, group, kv_dtype=store_kv_dtype(kv_dtype)
    )
    cpu, fixed = _core.measure_cpu_rate(
        dtype,
        head_dim,
        group,
        threads=threads,
        beside_copy=device_index,
        kv_dtype=store_kv_dtype(kv_dtype),
    )
    rates = ShareRates(pcie=pcie, cpu=cpu, device=device, handoff=fixed, copy=copy)
    logger.info(
        "decode rates measured in %.2f s: GPU over PCIe %.1f GB/s zero-copy, %.1f GB/s by the "
        "copy engine; CPU (%d threads, %s KV, beside the copy engine) %.1f GB/s; GPU resident "
        "%.0f GB/s; hand-off %.0f us",
        time.perf_counter() - start,
        pcie / 1e9,
        copy / 1e9,
        threads,
        kv_label(dtype, kv_dtype),
        cpu / 1e9,
        device / 1e9,
        fixed * 1e6,
    )
    return rates


def kv_label(dtype: str, kv_dtype: str | None) -> str:
    """How logs and reports name what a store of ``dtype`` holds as ``kv_dtype``:
    ``"int8"``, or ``"exact bfloat16"``."""
    kv_dtype = check_kv_dtype(kv_dtype)
    return f"exact {dtype}" if kv_dtype == "exact" else kv_dtype
