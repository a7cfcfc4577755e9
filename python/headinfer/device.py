"""Which devices headinfer runs on, and the stream it orders its work on.

CPU and CUDA tensors run; CUDA needs the driver and NVRTC, loaded at run time (probed once).
Every CUDA call into the Rust core goes on torch's current stream of the tensor's device.
"""

from __future__ import annotations

import functools

import torch

from . import _core
from .errors import GpuNotSupportedError

__all__ = ["check_device", "cuda_missing", "current_stream", "resolve_device"]


@functools.cache
def cuda_missing() -> str | None:
    """Why the CUDA driver or NVRTC cannot be loaded (``None``: they can); probed once."""
    return _core.cuda_status()


# torch's raw current-stream getter skips Stream object creation: this runs for every layer of
# every decode step.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(t: torch.Tensor) -> int | None:
    """The handle of torch's current stream on ``t``'s device; ``None`` for a CPU tensor."""
    if not t.is_cuda:
        return None
    if _raw_stream is not None:
        return _raw_stream(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


def check_device(tensor: torch.Tensor, name: str) -> None:
    """CPU and CUDA tensors pass; ``GpuNotSupportedError`` when CUDA is there but the driver
    or NVRTC cannot be loaded; ``ValueError`` for any other device."""
    if tensor.device.type == "cuda":
        missing = cuda_missing()
        if missing is not None:
            raise GpuNotSupportedError(name, missing)
        return
    if tensor.device.type != "cpu":
        raise ValueError(f"{name}: headinfer runs on CPU or CUDA tensors, got {tensor.device}")


def resolve_device(name: str) -> str:
    """A device name as the command line takes it, checked against this machine.

    ``auto``: ``cuda`` where torch sees a GPU, else ``cpu``; ``cpu``; ``cuda`` or ``cuda:N``
    where torch sees that GPU.

    Raises:
        ValueError: a device headinfer does not run on (``mps``, ...), or a GPU this machine
            does not have; the message says what to pass instead.
    """
    text = name.strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"device: expected auto, cpu or cuda, got {name!r}") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise ValueError(
            f"device: headinfer runs on the CPU or a CUDA GPU, not {device.type!r}; "
            "use --device cpu (or auto)"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"device: {name!r} asked for, but torch sees no CUDA GPU on this machine "
            "(torch.cuda.is_available() is False); use --device cpu (or auto)"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"device: {name!r} asked for, but this machine has {count} CUDA GPU(s) "
            f"(cuda:0..cuda:{count - 1})"
        )
    return str(device)
