"""A stand-in for ``share``'s ``_core`` on a host without a GPU (tests/test_share*.py): the GPU
probe's rates fixed, the real CPU probe run small and without the copy engine."""

from __future__ import annotations

from typing import Any

from headinfer import _core

#: What the stand-in's GPU probe returns: ``(pcie, device, copy)``.
GPU_RATES = (51e9, 2.5e12, 55e9)


class CoreStandIn:
    """Records what the probes were asked (``cpu_calls``, ``gpu_calls``), and runs the CPU's
    over 4 MiB."""

    def __init__(self) -> None:
        self.cpu_calls: list[dict[str, Any]] = []
        self.gpu_calls: list[dict[str, Any]] = []

    def measure_gpu_rates(
        self, device: int, dtype: str, head_dim: int, group: int, kv_dtype: str | None = None
    ) -> Any:
        self.gpu_calls.append({"dtype": dtype, "kv_dtype": kv_dtype})
        return GPU_RATES

    def measure_cpu_rate(self, dtype: str, head_dim: int, group: int, **kw: Any) -> Any:
        self.cpu_calls.append({"dtype": dtype, "head_dim": head_dim, "group": group, **kw})
        kw = {**kw, "beside_copy": None, "bytes": 4 << 20, "seconds": 0}
        return _core.measure_cpu_rate(dtype, head_dim, group, **kw)
