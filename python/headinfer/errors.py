"""The exceptions headinfer raises.

``HeadInferError`` and ``OutOfHostMemoryError`` are defined by the Rust core, so an error raised
deep inside the store and one raised by the Python shim are caught by the same ``except``.
Bad arguments raise plain ``ValueError``/``TypeError`` naming the argument.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._core import HeadInferError, OutOfHostMemoryError

__all__ = [
    "GpuNotSupportedError",
    "HeadInferError",
    "OutOfDeviceMemoryError",
    "OutOfHostMemoryError",
    "UnsupportedModelError",
]


class UnsupportedModelError(HeadInferError):
    """The model is not one of the families headinfer handles; nothing was changed."""

    def __init__(self, what: str, supported: Iterable[str]) -> None:
        families = ", ".join(supported)
        super().__init__(f"{what} is not supported by headinfer; supported families: {families}")


class GpuNotSupportedError(HeadInferError, NotImplementedError):
    """A CUDA tensor reached headinfer, but the CUDA driver or NVRTC cannot be loaded."""

    def __init__(self, what: str, missing: str) -> None:
        super().__init__(f"{what} is on a CUDA device, but headinfer cannot use it: {missing}")


class OutOfDeviceMemoryError(HeadInferError, MemoryError):
    """The GPU budget cannot hold what a step needs, even with every KV byte in host memory.

    Raised before the step runs (nothing was allocated); ``needed`` and ``available`` are in
    bytes.
    """

    def __init__(self, message: str, *, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available
