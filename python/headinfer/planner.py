"""The planner's front: the GPU budget split for a CUDA cache (weights, working set, staging, KV).

The arithmetic is Rust's (``src/plan.rs``, ``_core.plan``); this module gathers its inputs from
torch (what the weights hold, the free memory) and is the one caller both the runtime and
``headinfer plan`` go through, so they cannot disagree.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from . import _core
from .errors import OutOfDeviceMemoryError
from .kv_dtype import kv_row_bytes as row_bytes
from .share import (
    REPROBE_ENV,
    ShareRates,
    kv_label,
    load_rates,
    machine_key,
    measure_rates,
    physical_cores,
    rates_path,
    save_rates,
    share_threads,
)

__all__ = [
    "MIN_SHARE_CORES",
    "SharePlan",
    "ShareTrial",
    "plan_share",
    "DEFAULT_MARGIN",
    "DEFAULT_STAGING_CAP",
    "DIRECT_ROWS",
    "GpuPlan",
    "cap_torch",
    "fixed_device_bytes",
    "plan_figures",
    "plan_memory",
    "process_device_bytes",
    "release_torch_caps",
]

logger = logging.getLogger("headinfer")

#: Bytes kept free for what torch holds beyond the weights and one step's tensors: measured
#: about 1.1 GiB in steady decode of a Llama-3-8B shape on an H200 (cuBLAS workspaces,
#: allocator rounding), plus room for the CUDA context and cuDNN workspaces.
DEFAULT_MARGIN = 5 << 28  # 1.25 GiB
#: Largest staging buffer (keys and values of one head group of one layer).
DEFAULT_STAGING_CAP = 1 << 30
#: The CUDA context with torch, cuBLAS, cuDNN and our kernels loaded, measured on an H200
#: (about 1.3 GiB): what stands in for the measured figure where NVML cannot report it.
DEFAULT_CONTEXT_BYTES = 3 << 29  # 1.5 GiB
#: Room for kernels that load into the context after its size was measured.
LAZY_LOAD_RESERVE = 1 << 28  # 256 MiB
#: Queries x heads per kv head up to which decode reads the blocks directly.
DIRECT_ROWS = 8


@dataclass
class GpuPlan:
    """Where a CUDA cache puts its bytes, for one expected context length and phase."""

    context: int
    prefill: bool
    kv_device_bytes: int
    heads_per_group: int
    figures: dict[str, Any] = field(default_factory=dict)


def plan_figures(
    config: Any,
    spec: Any,
    *,
    elem_bytes: int,
    weight_bytes: int,
    context: int,
    chunk_size: int,
    gpu_budget: int,
    prefill: bool = True,
    margin: int = DEFAULT_MARGIN,
    staging_cap: int = DEFAULT_STAGING_CAP,
    kv_row_bytes: int | None = None,
) -> dict[str, Any]:
    """The Rust planner's split of ``gpu_budget`` bytes for ``context`` tokens; pure arithmetic.

    The one call into ``_core.plan`` that both the runtime (``plan_memory``) and
    ``headinfer plan`` (which knows only the config) make, so they cannot disagree.

    Args:
        config: the model's (text) config: ``hidden_size``, ``intermediate_size``,
            ``vocab_size``.
        spec: its ``ModelSpec`` (layers, heads, head size, windows).
        elem_bytes: bytes per element of activations (and of the prefill's staged KV, which
            readers dequantize into the model's dtype).
        weight_bytes: bytes of the weights on the GPU.
        kv_row_bytes: bytes the store holds per token per kv head for its keys (as many for
            its values): ``kv_dtype.kv_row_bytes``. Default: ``head_dim * elem_bytes`` (the
            exact format).

    Returns:
        ``_core.plan``'s figures (``Plan.to_dict()``), its KV bytes counted in
        ``kv_row_bytes`` rows.
    """
    if hasattr(config, "get_text_config"):  # a multimodal wrapper's figures are its text tower's
        config = config.get_text_config(decoder=True)
    hidden = _config_int(config, "hidden_size", spec.num_q_heads * spec.head_dim)
    shape = _core.ModelShape(
        num_layers=spec.num_layers,
        num_q_heads=spec.num_q_heads,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        hidden_size=hidden,
        # Tensor parallelism splits the feed-forward's columns too (one rank's share).
        intermediate_size=_config_int(config, "intermediate_size", 4 * hidden)
        // getattr(spec, "tp_size", 1),
        vocab_size=_config_int(config, "vocab_size", 0),
        elem_bytes=elem_bytes,
        weight_bytes=weight_bytes,
        windows=list(spec.windows),
        kv_row_bytes=kv_row_bytes,
    )
    figures = _core.plan(
        shape,
        context=max(context, 1),
        chunk_size=chunk_size,
        gpu_budget=gpu_budget,
        margin=margin,
        staging_cap=staging_cap,
        prefill=prefill,
    ).to_dict()
    return figures


def _config_int(config: Any, name: str, default: int) -> int:
    # Some configs hold per-layer values (a list, or transformers' per-layer attributes that
    # refuse a global read): the largest one bounds the working set.
    try:
        value = getattr(config, name, None)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError and the like
        value = None
        per_layer = getattr(config, "per_layer_config", None) or []
        values = [getattr(c, name, None) for c in per_layer]
        value = max((v for v in values if isinstance(v, int)), default=None)
    if isinstance(value, (list, tuple)):
        value = max(value, default=None)
    return int(value) if isinstance(value, int) and value > 0 else default


def process_device_bytes(device: torch.device) -> int | None:
    """This process's device memory on ``device`` as the driver counts it (NVML), or ``None``.

    ``None`` where NVML cannot say: no ``pynvml`` (the ``nvidia-ml-py`` package), no NVML
    library, or a container whose process ids NVML does not report.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        # NVML numbers GPUs by PCI order, CUDA by its own (and CUDA_VISIBLE_DEVICES).
        nvml_index = torch.cuda._get_nvml_device_index(index)
        handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        pid = os.getpid()
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory:
                return int(proc.usedGpuMemory)
    except Exception as exc:  # NVML missing or refusing: measured figures are optional
        logger.debug("NVML could not report this process's device memory: %s", exc)
    return None


def fixed_device_bytes(device: torch.device, held_by_store: int) -> tuple[int, str]:
    """Device bytes this process holds outside torch's allocator and the store's blocks.

    The CUDA context, the kernels loaded into it (cuBLAS, cuDNN, our NVRTC modules) and
    anything else the driver counts: measured as NVML's figure for this process less what torch
    reserved and the store holds. Returns ``(bytes, how)``; where NVML cannot say, the context
    size measured on an H200 (``DEFAULT_CONTEXT_BYTES``) stands in.
    """
    used = process_device_bytes(device)
    if used is None:
        return DEFAULT_CONTEXT_BYTES, "assumed (NVML cannot report this process)"
    fixed = used - torch.cuda.memory_reserved(device) - held_by_store
    # Kernels load lazily: the first decode step, or a prefill's first cuDNN call, still adds
    # some (about 20 MiB measured on an H200, after the figure above was read).
    return max(fixed, 0) + LAZY_LOAD_RESERVE, "measured by NVML, plus a reserve for lazy loading"


def plan_memory(
    config: Any,
    spec: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    context: int,
    chunk_size: int,
    gpu_budget: int | None,
    held_by_store: int = 0,
    prefill: bool = True,
    kv_dtype: str = "exact",
) -> GpuPlan:
    """Split the GPU budget for ``context`` tokens (the Rust planner in ``src/plan.rs``).

    The weights are what torch holds now. An explicit ``gpu_budget`` bounds the whole process:
    the CUDA context and loaded kernels (measured, see ``fixed_device_bytes``) come off it
    first, and the rest is split between torch (weights, working set, staging, margin) and the
    store's KV blocks. The default budget is everything this process could use (free memory
    plus what torch and the store already hold). A prefill needs room for a chunk's activations
    and the staging buffers; decode gives that room to the KV. The KV bytes are counted in
    ``kv_dtype`` (``"exact"`` or ``"int8"``).

    Raises:
        OutOfDeviceMemoryError: the budget cannot hold the weights, the working set of this
            phase, the staging buffers, the margin and the fixed part, even with every KV byte
            in host memory.
    """
    free, _total = torch.cuda.mem_get_info(device)
    held_by_torch = torch.cuda.memory_reserved(device)
    # What torch holds now: the weights and whatever the caller keeps alive.
    weights = torch.cuda.memory_allocated(device)
    if gpu_budget is not None:
        fixed, how = fixed_device_bytes(device, held_by_store)
        budget = gpu_budget - fixed
    else:
        # Free memory already excludes the context and everything else the driver holds.
        fixed, how = 0, "outside the default budget"
        budget = free + held_by_torch + held_by_store
    dtype_name = str(dtype).removeprefix("torch.")
    figures = plan_figures(
        config,
        spec,
        elem_bytes=torch.empty((), dtype=dtype).element_size(),
        weight_bytes=weights,
        context=context,
        chunk_size=chunk_size,
        gpu_budget=max(budget, 0),
        prefill=prefill,
        kv_row_bytes=row_bytes(spec.head_dim, dtype_name, kv_dtype),
    )
    figures["context_bytes"] = fixed
    need = weights + figures["activation_bytes"] + figures["staging_bytes"] + DEFAULT_MARGIN
    if budget < need:
        total = gpu_budget if gpu_budget is not None else budget
        phase = "prefill" if prefill else "decode"
        raise OutOfDeviceMemoryError(
            f"gpu_budget: {total / 2**30:.2f} GiB cannot hold this model's {phase}"
            f" even with every KV byte in host memory: weights {weights / 2**30:.2f} GiB + working "
            f"set {figures['activation_bytes'] / 2**30:.2f} GiB + staging "
            f"{figures['staging_bytes'] / 2**30:.2f} GiB + margin {DEFAULT_MARGIN / 2**30:.2f} GiB"
            f" + CUDA context and kernels {fixed / 2**30:.2f} GiB ({how}) = "
            f"{(need + fixed) / 2**30:.2f} GiB; raise gpu_budget or lower chunk_size",
            needed=need + fixed,
            available=total,
        )
    return GpuPlan(
        context=context,
        prefill=prefill,
        kv_device_bytes=figures["kv_device_bytes"],
        heads_per_group=figures["heads_per_group"],
        figures=figures,
    )


def cap_torch(device: torch.device, gpu_budget: int, plan: GpuPlan, held_by_store: int) -> int:
    """Bound torch's caching allocator by what the budget leaves it; returns that cap in bytes.

    torch may otherwise keep cached blocks past the plan (fragmentation, a larger workspace),
    and the process would go over ``gpu_budget`` without any allocation failing. With the cap,
    torch frees its cache and retries before it exceeds it, and raises its own out-of-memory
    error if the plan was wrong, instead of the card running out under another process.
    """
    _free, total = torch.cuda.mem_get_info(device)
    cap = gpu_budget - plan.figures["context_bytes"] - max(held_by_store, plan.kv_device_bytes)
    cap = max(cap, 0)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TORCH_FRACTION:
        get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        _TORCH_FRACTION[index] = get(index) if get is not None else 1.0
    torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0), index)
    logger.debug("torch's allocator capped at %.2f GiB on cuda:%d", cap / 2**30, index)
    return cap


def release_torch_caps() -> None:
    """Give torch's allocator back the limits it had before ``cap_torch`` (``unpatch`` does)."""
    while _TORCH_FRACTION:
        index, fraction = _TORCH_FRACTION.popitem()
        torch.cuda.set_per_process_memory_fraction(fraction, index)


#: Per device, torch's memory fraction before headinfer capped it.
_TORCH_FRACTION: dict[int, float] = {}


#: Fewer physical cores than this and the CPU share stays off by default: on a few cores the
#: host reads slower than PCIe, and the cores are busy driving the GPU (16 threads read
#: 100 GB/s on the H200 host, 4 only 45; FACTS.md).
MIN_SHARE_CORES = 8


@dataclass
class SharePlan:
    """Whether and how the CPU shares decode attention over host-resident KV, and why.

    ``mode``: ``"off"``; ``"heads"`` (the ``cpu_heads`` override: kv heads ``0..cpu_heads``
    from their first host block on); ``"rates"`` (each layer's step split by (head, block
    range) so that both sides finish together, from ``rates``, and only where that is
    predicted faster than the GPU alone).
    """

    mode: str
    reason: str
    cpu_heads: int = 0
    threads: int = 0
    cores: int = 0
    torch_threads: int = 0
    rates: ShareRates | None = None
    rates_source: str | None = None
    #: In "rates" mode: whether the first decode steps that split time the share against the
    #: GPU alone and keep the faster (``ShareTrial``).
    trial: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (rates in bytes per second and seconds)."""
        d = {k: v for k, v in self.__dict__.items() if k != "rates"}
        d["rates"] = None if self.rates is None else self.rates.__dict__.copy()
        return d


def plan_share(
    cpu_heads: int | str | None,
    *,
    device_index: int,
    gpu_name: str,
    dtype: str,
    head_dim: int,
    group: int,
    cores: int | None = None,
    reprobe: bool | None = None,
    path: Any = None,
    kv_dtype: str = "exact",
) -> SharePlan:
    """The CPU share's plan for a CUDA store (the planner owns the decision), with the rates
    that also choose how the GPU reads host blocks (the faster of the copy engine and
    zero-copy reads: ``KVStore.host_reader``).

    ``cpu_heads`` (checked by ``checks.check_cpu_heads``): ``None``, the default, is
    ``"auto"``: the share is on with measured rates where the host has at least
    ``MIN_SHARE_CORES`` physical cores, each layer's step split only where that is predicted
    faster (and the first decode steps' timings keep it only where it is: ``ShareTrial``); an
    int is an override (0: off). The rates come from the rates file (``share``), or are
    measured now (about a second) and saved there; ``reprobe`` (default: the
    ``HEADINFER_REPROBE`` variable) measures again. ``kv_dtype`` is the store's
    (``"exact"`` or ``"int8"``): the CPU's rate is its kernel's over that format, an entry of
    its own in the file. A probe that fails costs speed, never results: the share stays off
    and the GPU reads host blocks by the copy engine.
    """
    cores = physical_cores() if cores is None else cores
    threads = share_threads(cores)
    torch_threads = torch.get_num_threads()
    rates, source = _share_rates(
        device_index,
        gpu_name=gpu_name,
        dtype=dtype,
        head_dim=head_dim,
        group=group,
        threads=threads,
        cores=cores,
        reprobe=reprobe,
        path=path,
        kv_dtype=kv_dtype,
    )
    common: dict[str, Any] = {
        "cores": cores,
        "torch_threads": torch_threads,
        "rates": rates,
        "rates_source": source,
    }
    if cpu_heads == 0:
        return SharePlan("off", "cpu_heads=0 turns the CPU share off", **common)
    if isinstance(cpu_heads, int):
        return SharePlan(
            "heads",
            f"cpu_heads={cpu_heads}: the override",
            cpu_heads=cast(int, cpu_heads),  # neither None nor "auto": an int
            threads=max(threads, 1),
            **common,
        )
    if cores < MIN_SHARE_CORES:
        return SharePlan(
            "off",
            f"{cores} physical cores available; the CPU share needs at least "
            f"{MIN_SHARE_CORES} to be faster than the GPU alone",
            **common,
        )
    if rates is None:
        return SharePlan("off", f"no rates: {source}", **common)
    if rates.cpu <= 0:
        return SharePlan("off", "the CPU's measured rate is 0", **common)
    logger.info(
        "CPU share on %d threads, rates %s: GPU over PCIe %.1f GB/s zero-copy, %.1f GB/s copy "
        "engine; CPU %.1f GB/s (%s KV); resident %.0f GB/s; hand-off %.0f us",
        threads,
        source,
        rates.pcie / 1e9,
        rates.copy / 1e9,
        rates.cpu / 1e9,
        kv_label(dtype, kv_dtype),
        rates.device / 1e9,
        rates.handoff * 1e6,
    )
    return SharePlan(
        "rates",
        "measured rates: each layer's step is split where that is predicted faster",
        threads=threads,
        **common,
    )


def _share_rates(
    device_index: int,
    *,
    gpu_name: str,
    dtype: str,
    head_dim: int,
    group: int,
    threads: int,
    cores: int,
    reprobe: bool | None,
    path: Any,
    kv_dtype: str,
) -> tuple[ShareRates | None, str]:
    """This machine's rates for a store of ``kv_dtype`` from the rates file, else measured now
    and saved; ``(None, why)`` where measuring failed."""
    if reprobe is None:
        reprobe = os.environ.get(REPROBE_ENV, "") not in ("", "0")
    key = machine_key(
        gpu_name,
        dtype=dtype,
        head_dim=head_dim,
        group=group,
        threads=threads,
        cores=cores,
        kv_dtype=kv_dtype,
    )
    where = rates_path() if path is None else path
    rates = None if reprobe else load_rates(key, where)
    if rates is not None:
        return rates, f"cached in {where}"
    try:
        rates = measure_rates(
            device_index,
            dtype=dtype,
            head_dim=head_dim,
            group=group,
            threads=threads,
            kv_dtype=kv_dtype,
        )
    except Exception as exc:  # a probe that fails costs speed, never results
        logger.warning("measuring the decode rates failed (the CPU share stays off): %s", exc)
        return None, f"measuring the rates failed: {exc}"
    source = "measured now"
    try:
        source += f", saved to {save_rates(key, rates, where)}"
    except OSError as exc:
        logger.warning("could not save the decode rates to %s: %s", where, exc)
    return rates, source


class ShareTrial:
    """The first decode steps' check of the rate-based CPU share: steps alternate with the
    share on and off (after ``warmup`` steps), and once each mode has ``steps`` timings the
    faster by median is kept. The rates predict; this corrects a prediction that the host does
    not bear out, so the default is never slower than the GPU alone for long.

    A step's time is the period from its start to the next step's start (generate reads the
    logits in between, so the GPU's work is inside it). ``mode()`` says what the next step
    runs with; ``record`` takes the time of a step run with ``on``.
    """

    def __init__(self, steps: int = 3, warmup: int = 1) -> None:
        self.steps = steps
        self.warmup = warmup
        self.times: dict[bool, list[float]] = {True: [], False: []}
        self.seen = 0
        #: The decision (``None`` while the trial runs).
        self.decided: bool | None = None

    def mode(self) -> bool:
        """Whether the next decode step runs with the share."""
        if self.decided is not None:
            return self.decided
        # Warm-up steps with the share (its threads and buffers start), then alternate.
        return self.seen < self.warmup or (self.seen - self.warmup) % 2 == 0

    def record(self, on: bool, seconds: float) -> None:
        """The time of one decode step run with the share ``on``."""
        if self.decided is not None:
            return
        self.seen += 1
        if self.seen <= self.warmup:
            return
        self.times[on].append(seconds)
        if min(len(t) for t in self.times.values()) >= self.steps:
            with_share = sorted(self.times[True])[self.steps // 2]
            alone = sorted(self.times[False])[self.steps // 2]
            self.decided = with_share < alone
            logger.info(
                "CPU share trial: %.4f s/step with the share, %.4f without: share %s",
                with_share,
                alone,
                "kept" if self.decided else "off",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the timings so far and the decision."""
        return {
            "decided": self.decided,
            "with_share": list(self.times[True]),
            "alone": list(self.times[False]),
        }
