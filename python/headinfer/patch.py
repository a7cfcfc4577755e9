"""``patch(model)`` / ``unpatch(model)``: plug headinfer into one model object.

Only the object changes, never its class's code: ``forward`` and ``generate`` become instance
attributes that wrap the previous ones (an accelerate hook's included), and the config's attention
implementation is set to ``"headinfer"``. ``unpatch`` puts each of them back as it was.

``with headinfer.patch(model):`` also works, and restores the model on exit. Python looks
``__enter__`` up on the type, not the instance, so while patched the object's ``__class__`` is a
subclass of its own class that adds only ``__enter__`` and ``__exit__`` (same name, module and
methods; made once per class; the class itself is never modified); ``unpatch`` puts the
original class back. ``patch`` records what the model was before each call; ``__enter__`` takes
that record and ``__exit__`` restores it, so nested ``with`` blocks unwind one at a time.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from typing import Any, TypeVar, cast

import torch

from .attention import ATTN_IMPLEMENTATION, drop_sink_caches, register
from .cache import HeadInferCache, store_dtype
from .callsite import user_stacklevel
from .checks import (
    check_cpu_heads,
    check_optional_positive_int,
    check_positive_int,
    check_size,
)
from .device import check_device
from .distributed import check_gpu_budget
from .kv_dtype import check_kv_dtype
from .planner import release_torch_caps
from .prefill import CACHE_NAMES, cache_kwarg_name, forward_params, patched_forward
from .settings import PatchSettings
from .spec import runnable_spec

__all__ = ["PatchSettings", "is_patched", "patch", "unpatch"]

logger = logging.getLogger("headinfer")

M = TypeVar("M", bound=torch.nn.Module)

_STATE = "_headinfer"
#: The ``with`` bookkeeping (a ``_WithState``), kept apart from the settings so that it outlives
#: an ``unpatch`` inside the block.
_WITH = "_headinfer_with"
#: ``_WithState.pending`` when no ``patch`` call waits for its ``__enter__``.
_NOTHING = object()


class _Wrapper:
    # A callable object rather than a closure, so that copy.deepcopy of a patched model gives a
    # copy whose wrappers call the copy (deepcopy rebinds the saved bound method), not the original.
    def __init__(self, model: torch.nn.Module, original: Any, settings: PatchSettings) -> None:
        self.model = model
        self.original = original
        self.settings = settings
        # Keeps name, docstring and signature: generate() inspects forward's for logits_to_keep.
        functools.update_wrapper(cast(Any, self), original)  # subclasses are the callables


class _Forward(_Wrapper):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _rename_old_cache_kwarg(self.model, self.settings, kwargs, "forward")
        return patched_forward(self.model, self.original, self.settings, args, kwargs)


class _Generate(_Wrapper):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _rename_old_cache_kwarg(self.model, self.settings, kwargs, "generate")
        _give_cache(self.model, self.settings, self.original, args, kwargs)
        return self.original(*args, **kwargs)


def _rename_old_cache_kwarg(
    model: torch.nn.Module, settings: PatchSettings, kwargs: dict[str, Any], method: str
) -> None:
    # transformers >= 5.24 warns about `past_key_values` from a decorator whose stacklevel names
    # its caller: our wrapper. Rename it here and warn from the caller's line instead.
    if settings.cache_name != "cache" or "past_key_values" not in kwargs or "cache" in kwargs:
        return
    warnings.warn(
        f"`past_key_values` is deprecated for `{type(model).__name__}.{method}`: this "
        "transformers calls it `cache`. Use `cache` instead.",
        FutureWarning,
        stacklevel=user_stacklevel(),
    )
    kwargs["cache"] = kwargs.pop("past_key_values")


class _WithState:
    """What ``__exit__`` restores: a stack of snapshots (``None``: unpatched), one per block."""

    def __init__(self) -> None:
        self.pending: Any = _NOTHING
        self.stack: list[dict[str, Any] | None] = []


def _snapshot(model: torch.nn.Module) -> dict[str, Any] | None:
    # patch()'s arguments that reproduce the current settings; None when unpatched.
    settings = model.__dict__.get(_STATE)
    if settings is None:
        return None
    return {
        "chunk_size": settings.chunk_size,
        "block_size": settings.block_size,
        "gpu_budget": settings.gpu_budget,
        "cpu_heads": settings.cpu_heads,
        "kv_dtype": settings.kv_dtype,
        "host_memory_limit": settings.host_memory_limit,
        "progress": settings.progress,
        "progress_delay": settings.progress_delay,
    }


def _enter(self: Any) -> Any:
    state = self.__dict__.get(_WITH)
    if state is None or state.pending is _NOTHING:
        raise RuntimeError(
            "`with model:` on a patched model restores what a patch() call changed; write "
            "`with headinfer.patch(model, ...):`"
        )
    state.stack.append(state.pending)
    state.pending = _NOTHING
    return self


def _exit(self: Any, *exc_info: object) -> None:
    state = self.__dict__[_WITH]
    snapshot = state.stack.pop()
    if snapshot is None:
        unpatch(self)
    else:
        patch(self, **snapshot)
        state.pending = _NOTHING
    if not state.stack and not is_patched(self):
        self.__dict__.pop(_WITH, None)
    # Returns None: an exception inside the block propagates.


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(base: type) -> type:
    """``base`` plus ``__enter__``/``__exit__``: the class of a patched object (one per class)."""
    cls = _PATCHED_CLASSES.get(base)
    if cls is None:
        namespace = {
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            "__enter__": _enter,
            "__exit__": _exit,
            "_headinfer_base": base,
        }
        cls = type(base)(base.__name__, (base,), namespace)
        _PATCHED_CLASSES[base] = cls
    return cls


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
    gpu_budget: int | str | dict[Any, int | str] | None = None,
    cpu_heads: int | str | None = None,
    kv_dtype: str = "exact",
    host_memory_limit: int | str | None = None,
    progress: bool = True,
    progress_delay: float = 2.0,
) -> M:
    """Make ``model`` run its attention and KV cache through headinfer.

    ``model.generate()`` and ``model(...)`` then work as before, with exact results: the KV cache
    lives in a host-memory ``KVStore``, prompts longer than ``chunk_size`` are prefilled chunk by
    chunk, and no attention mask or weight matrix is ever built. Inputs are batch size 1:
    ``input_ids`` ``[1, L]`` (or ``inputs_embeds`` ``[1, L, hidden]``).

    Args:
        model: a transformers model of a family in ``headinfer.SUPPORTED_FAMILIES`` (e.g.
            ``*ForCausalLM``, or a multimodal wrapper around one, for text prompts),
            float32, bfloat16 or float16, on the CPU or CUDA: one device, layers over
            several (``device_map``: one store per GPU), or one rank of transformers' tensor
            parallelism (its cache holds that rank's kv heads).
        chunk_size: longest prefill chunk, in tokens.
        block_size: tokens per store block (default: 256 on the CPU, 1 MiB of one head on
            the GPU).
        gpu_budget: on CUDA, bytes of GPU memory the process may use in all (an int or a size
            like ``"20GiB"``; per GPU, or ``{device: bytes}`` for a model whose layers
            ``device_map`` spreads over GPUs); KV blocks fill what weights and working set
            leave, the rest stays in pinned host memory. Default: the free memory less a
            margin.
        cpu_heads: on CUDA, whether the CPU attends over part of the host-resident KV during
            decode while the GPU reads the rest. Default ``None``, the same as ``"auto"``: the
            planner decides from measured rates (on with 8 or more physical cores, each step
            split only where predicted faster, kept only where the first decode steps measure
            it faster); an int forces kv heads ``0..cpu_heads``; 0 turns it off (see
            ``HeadInferCache`` and its ``share_plan()``).
        kv_dtype: how the caches ``generate()`` makes hold keys and values: ``"exact"`` (the
            default) as the model computes them; ``"int8"`` (opt-in, lossy) 8-bit, with a
            bfloat16 scale per group of at most 32 values of each token's key or value
            vector: about half the bytes per token of bfloat16 (a quarter of float32), so
            about twice the context fits the same host memory (README's "8-bit KV cache":
            the measured loss).
        host_memory_limit: bytes each cache may reserve (an int or a size like ``"64GiB"``;
            default: what the host has).
        progress: show a progress bar over prefill chunks when prefill takes a while
            (``progress_delay`` seconds) and the output is a terminal.

    Returns:
        The same model object. Patching again only updates these settings. It is also a
        context manager: ``with headinfer.patch(model, ...):`` restores on exit what the
        model was before this call (unpatched, or patched with its earlier settings), also
        when the block raises.

    Raises:
        UnsupportedModelError: the model's attention is not one headinfer runs (the message
            says why) or its family is not among ``SUPPORTED_FAMILIES``.
        TypeError, ValueError: a setting of the wrong type or value (the message names it).
    """
    spec = runnable_spec(model)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    block_size = check_optional_positive_int(block_size, "block_size")
    budget = check_gpu_budget(gpu_budget)
    host_memory_limit = check_size(host_memory_limit, "host_memory_limit")
    cpu_heads = check_cpu_heads(cpu_heads, spec.num_kv_heads)
    kv_dtype = check_kv_dtype(kv_dtype)
    param = next(model.parameters(), None)
    if param is not None:
        check_device(param, "the model")
        store_dtype(param.dtype)

    before = _snapshot(model)
    settings = model.__dict__.get(_STATE)
    if settings is not None:
        model.__dict__.setdefault(_WITH, _WithState()).pending = before
        settings.chunk_size = chunk_size
        settings.block_size = block_size
        settings.host_memory_limit = host_memory_limit
        settings.gpu_budget = budget
        settings.cpu_heads = cpu_heads
        settings.kv_dtype = kv_dtype
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
        kv_dtype=kv_dtype,
        progress=progress,
        progress_delay=progress_delay,
        cache_name=cache_kwarg_name(model),
        forward_params=params,
        takes_logits_to_keep="logits_to_keep" in params,
    )
    saved = settings.saved
    saved["forward"] = _saved_attr(model, "forward")
    saved["generate"] = _saved_attr(model, "generate")
    config: Any = model.config
    saved["attn_implementation"] = config._attn_implementation

    model.forward = _Forward(model, model.forward, settings)
    # A base model (e.g. LlamaModel) has no generate(): only its forward is patched.
    if hasattr(model, "generate"):
        cast(Any, model).generate = _Generate(model, model.generate, settings)
    saved["class"] = type(model)
    config._attn_implementation = ATTN_IMPLEMENTATION
    model.__dict__[_STATE] = settings
    model.__class__ = _patched_class(type(model))
    model.__dict__.setdefault(_WITH, _WithState()).pending = before
    logger.info(
        "patched %s (%s), chunk_size=%d, block_size=%s, kv_dtype=%s",
        type(model).__name__,
        spec.family,
        chunk_size,
        block_size or "auto",
        kv_dtype,
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
    # (A cache that is not a HeadInferCache is warned about when it reaches forward, after the
    # checks that reject a static one.)
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
    state = model.__dict__.get(_WITH)
    if state is not None and not state.stack:
        del model.__dict__[_WITH]
    model.__class__ = settings.saved["class"]
    for name in ("forward", "generate"):
        had, previous = settings.saved[name]
        if had:
            model.__dict__[name] = previous
        else:
            model.__dict__.pop(name, None)
    cast(Any, model.config)._attn_implementation = settings.saved["attn_implementation"]
    drop_sink_caches(model)
    release_torch_caps()
    logger.info("unpatched %s", type(model).__name__)
    return model
