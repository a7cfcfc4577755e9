"""The rates behind ``headinfer plan``'s time floors: the H200's, measured once (BENCHMARKS.md,
2026-11-26: causal SDPA 656.6 TFLOP/s, bf16 matmul 798.5 TFLOP/s, pinned host-to-device copies
55.5 GB/s, rounded down), or, for the rate at which decode reads the host KV, this machine's,
where ``headinfer check`` (or the runtime's CPU share) measured it and saved it to the rates
file (``share.rates_path()``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from .share import load_rates, machine_key, physical_cores, rates_path, share_threads
from .spec import model_spec

__all__ = ["H200_SOURCE", "Rates", "measured_rates", "plan_rates"]


#: Where the default rates come from.
H200_SOURCE = "H200 constants (BENCHMARKS.md); run `headinfer check` on a GPU host to measure it"


@dataclass(frozen=True)
class Rates:
    """Machine rates for the floors (defaults: an H200, as measured in BENCHMARKS.md), and
    where they come from (``source``, for the report)."""

    sdpa_tflops: float = 650.0
    matmul_tflops: float = 790.0
    h2d_gbs: float = 55.0
    source: str = H200_SOURCE


def measured_rates(
    *, dtype: str, head_dim: int, group: int, defaults: Rates | None = None
) -> Rates:
    """``defaults`` (H200 constants) with this machine's measured host-read rate for the decode
    floor, where ``headinfer check`` (or the runtime's CPU share) measured it: the faster of
    the decode kernel's read rate over pinned host memory (``ShareRates.pcie``) and the copy
    engine's (``ShareRates.copy``), as decode uses the faster, from the rates file entry
    of this GPU and host for this ``dtype``, ``head_dim`` and ``group``, else any entry of this
    GPU and host (the link's rate barely depends on the kernel's shape). ``defaults``
    unchanged where there is no GPU or no entry; ``source`` says which.
    """
    import torch

    defaults = defaults or Rates()
    if not torch.cuda.is_available():
        return defaults
    gpu = torch.cuda.get_device_name(torch.cuda.current_device())
    cores = physical_cores()
    key = machine_key(
        gpu, dtype=dtype, head_dim=head_dim, group=group, threads=share_threads(cores), cores=cores
    )
    path = rates_path()
    found = load_rates(key, path)
    if found is None:
        prefix = " | ".join(key.split(" | ")[:4]) + " | "  # GPU, CPU, cores, threads
        try:
            keys = sorted(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            keys = []
        for other in keys:
            if other.startswith(prefix):
                found = load_rates(other, path)
                if found is not None:
                    key = other
                    break
    if found is None:
        return defaults
    return replace(
        defaults,
        h2d_gbs=max(found.pcie, found.copy) / 1e9,
        source=f"this machine's decode read rate over host memory, measured ({path}: {key})",
    )


def plan_rates(
    config: Any,
    dtype: str,
    sdpa_tflops: float | None = None,
    matmul_tflops: float | None = None,
    h2d_gbs: float | None = None,
) -> Rates:
    """The rates ``headinfer plan`` and ``headinfer check`` use for ``config`` in ``dtype``:
    what is given, else this machine's measured host-read rate (``measured_rates``), else the
    H200 constants.

    Raises:
        UnsupportedModelError: a model headinfer cannot run.
    """
    rates = Rates()
    if sdpa_tflops is not None:
        rates = replace(rates, sdpa_tflops=sdpa_tflops)
    if matmul_tflops is not None:
        rates = replace(rates, matmul_tflops=matmul_tflops)
    if h2d_gbs is not None:
        return replace(rates, h2d_gbs=h2d_gbs, source="--h2d-gbs")
    spec = model_spec(config)
    return measured_rates(
        dtype=dtype,
        head_dim=spec.head_dim,
        group=spec.num_q_heads // spec.num_kv_heads,
        defaults=rates,
    )
