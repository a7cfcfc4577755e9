"""``patch(model)`` / ``unpatch(model)``: plug headinfer into one model object.

Only the object changes, never its class: ``forward`` and ``generate`` become instance attributes
that wrap the previous ones (an accelerate hook's included), and the config's attention
implementation is set to ``"headinfer"``. ``unpatch`` puts each of them back as it was.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .attention import ATTN_IMPLEMENTATION, drop_sink_caches, register
from .cache import HeadInferCache, store_dtype
from .device import check_device
from .planner import release_torch_caps
from .prefill import CACHE_NAMES, cache_kwarg_name, forward_params, patched_forward
from .sizes import parse_bytes
from .spec import ModelSpec, model_spec

__all__ = ["PatchSettings", "is_patched", "patch", "unpatch"]

logger = logging.getLogger("headinfer")

M = TypeVar("M", bound=torch.nn.Module)

_STATE = "_headinfer"


@dataclass
class PatchSettings:
    """What ``patch()`` was given, and what it found out about the model."""

    spec: ModelSpec
    chunk_size: int
    block_size: int | None
    host_memory_limit: int | None
    gpu_budget: int | None
    cpu_heads: int | None
    progress: bool
    progress_delay: float
    #: The model forward's keyword for the cache: "cache" (>= 5.24) or "past_key_values".
    cache_name: str
    #: The forward's named parameters, in order, to turn positional arguments into keywords.
    forward_params: tuple[str, ...]
    takes_logits_to_keep: bool
    #: What patch() replaced, for unpatch(): instance attributes (or _MISSING) and the config's.
    saved: dict[str, Any] = field(default_factory=dict)


class _Wrapper:
    # A callable object rather than a closure, so that copy.deepcopy of a patched model gives a
    # copy whose wrappers call the copy (deepcopy rebinds the saved bound method), not the original.
    def __init__(self, model: torch.nn.Module, original: Any, settings: PatchSettings) -> None:
        self.model = model
        self.original = original
        self.settings = settings
        # Keeps name, docstring and signature: generate() inspects forward's for logits_to_keep.
        functools.update_wrapper(self, original)


class _Forward(_Wrapper):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return patched_forward(self.model, self.original, self.settings, args, kwargs)


class _Generate(_Wrapper):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _give_cache(self.model, self.settings, self.original, args, kwargs)
        return self.original(*args, **kwargs)


def _saved_attr(model: torch.nn.Module, name: str) -> tuple[bool, Any]:
    # (whether the instance had its own attribute, e.g. an accelerate hook's forward; its value)
    return (name in model.__dict__, model.__dict__.get(name))


def is_patched(model: torch.nn.Module) -> bool:
    """Whether ``patch`` was applied to this model object (and not undone)."""
    return _STATE in model.__dict__


def patch(
    model: M,
    chunk_size: int = 4096,
    block_size: int | None = None,
    *,
    gpu_budget: int | str | None = None,
    cpu_heads: int | None = None,
    host_memory_limit: int | None = None,
    progress: bool = True,
    progress_delay: float = 2.0,
) -> M:
    """Make ``model`` run its attention and KV cache through headinfer.

    ``model.generate()`` and ``model(...)`` then work as before, with exact results: the KV cache
    lives in a host-memory ``KVStore``, prompts longer than ``chunk_size`` are prefilled chunk by
    chunk, and no attention mask or weight matrix is ever built. Inputs are batch size 1:
    ``input_ids`` ``[1, L]`` (or ``inputs_embeds`` ``[1, L, hidden]``).

    Args:
        model: a Llama, Mistral, Qwen2 or Gemma-2 transformers model (e.g. ``*ForCausalLM``),
            float32, bfloat16 or float16, on the CPU or one CUDA device.
        chunk_size: longest prefill chunk, in tokens.
        block_size: tokens per store block (default: 256 on the CPU, 1 MiB of one head on
            the GPU).
        gpu_budget: on CUDA, bytes of GPU memory the process may use in all (an int or a size
            like ``"20GiB"``); KV blocks fill what weights and working set leave, the rest
            stays in pinned host memory. Default: the free memory less a margin.
        cpu_heads: on CUDA, for how many kv heads the CPU attends over host-resident KV during
            decode while the GPU reads the rest (default 0: off; experimental, see
            ``HeadInferCache``).
        host_memory_limit: bytes each cache may reserve (default: what the host has).
        progress: show a progress bar over prefill chunks when prefill takes a while
            (``progress_delay`` seconds) and the output is a terminal.

    Returns:
        The same model object. Patching again only updates these settings.

    Raises:
        UnsupportedModelError: ``model.config.model_type`` is not a supported family.
    """
    spec = model_spec(model.config)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
    if block_size is not None and block_size <= 0:
        raise ValueError(f"block_size: must be positive, got {block_size}")
    budget = None if gpu_budget is None else parse_bytes(gpu_budget)
    param = next(model.parameters(), None)
    if param is not None:
        check_device(param, "the model")
        store_dtype(param.dtype)

    settings = model.__dict__.get(_STATE)
    if settings is not None:
        settings.chunk_size = chunk_size
        settings.block_size = block_size
        settings.host_memory_limit = host_memory_limit
        settings.gpu_budget = budget
        settings.cpu_heads = cpu_heads
        settings.progress = progress
        settings.progress_delay = progress_delay
        return model

    register()
    params = forward_params(model)
    settings = PatchSettings(
        spec=spec,
        chunk_size=chunk_size,
        block_size=block_size,
        host_memory_limit=host_memory_limit,
        gpu_budget=budget,
        cpu_heads=cpu_heads,
        progress=progress,
        progress_delay=progress_delay,
        cache_name=cache_kwarg_name(model),
        forward_params=params,
        takes_logits_to_keep="logits_to_keep" in params,
    )
    saved = settings.saved
    saved["forward"] = _saved_attr(model, "forward")
    saved["generate"] = _saved_attr(model, "generate")
    saved["attn_implementation"] = model.config._attn_implementation

    forward = _Forward(model, model.forward, settings)
    generate = _Generate(model, model.generate, settings)
    model.forward = forward
    model.generate = generate
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    model.__dict__[_STATE] = settings
    logger.info(
        "headinfer: patched %s (%s), chunk_size=%d, block_size=%s",
        type(model).__name__,
        spec.family,
        chunk_size,
        block_size or "auto",
    )
    return model


def _give_cache(
    model: torch.nn.Module,
    settings: PatchSettings,
    original_generate: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    # generate() would make a DynamicCache; hand it a HeadInferCache instead, unless the caller
    # chose a cache (an object, or a cache_implementation) or no cache at all.
    if any(kwargs.get(name) is not None for name in CACHE_NAMES):
        return
    config = kwargs.get("generation_config")
    if config is None and len(args) > 1:
        bound = inspect.signature(original_generate).bind_partial(*args)
        config = bound.arguments.get("generation_config")
    if config is None:
        config = model.generation_config
    use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
    implementation = kwargs.get(
        "cache_implementation", getattr(config, "cache_implementation", None)
    )
    if use_cache is False or implementation is not None:
        return
    cache = HeadInferCache(model)
    # For the GPU memory plan: how long the cache will grow in this call.
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    cache.expected_new_tokens = int(new) if isinstance(new, int) else 0
    kwargs[settings.cache_name] = cache


def unpatch(model: M) -> M:
    """Undo ``patch``: restore ``forward``, ``generate`` and ``config._attn_implementation``.

    Returns the same model object; a model that is not patched is returned unchanged.
    """
    settings = model.__dict__.pop(_STATE, None)
    if settings is None:
        return model
    for name in ("forward", "generate"):
        had, previous = settings.saved[name]
        if had:
            model.__dict__[name] = previous
        else:
            model.__dict__.pop(name, None)
    model.config._attn_implementation = settings.saved["attn_implementation"]
    drop_sink_caches(model)
    release_torch_caps()
    logger.info("headinfer: unpatched %s", type(model).__name__)
    return model
