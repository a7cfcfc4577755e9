"""headinfer: exact long-context inference for Hugging Face transformers.

The KV cache lives in host memory, in a Rust store split by (layer, kv head); ``patch(model)``
plugs it into a model of any family in ``SUPPORTED_FAMILIES``, with chunked prefill::

    import headinfer
    headinfer.patch(model)
    out = model.generate(**inputs, max_new_tokens=256)

``with headinfer.patch(model):`` restores the model on exit; ``pipeline("headinfer-qa", ...)``
(registered on import) answers many questions about one long context from a single prefill.
"""

from __future__ import annotations

import logging

from ._core import __version__
from .cache import HeadInferCache
from .errors import (
    GpuNotSupportedError,
    HeadInferError,
    OutOfDeviceMemoryError,
    OutOfHostMemoryError,
    UnsupportedModelError,
)
from .patch import is_patched, patch, unpatch
from .pipelines import HeadInferQAPipeline
from .spec import SUPPORTED_FAMILIES

__all__ = [
    "SUPPORTED_FAMILIES",
    "GpuNotSupportedError",
    "HeadInferCache",
    "HeadInferError",
    "OutOfDeviceMemoryError",
    "HeadInferQAPipeline",
    "OutOfHostMemoryError",
    "UnsupportedModelError",
    "__version__",
    "is_patched",
    "patch",
    "unpatch",
]

# A library logs, the application decides where it goes.
logging.getLogger("headinfer").addHandler(logging.NullHandler())
