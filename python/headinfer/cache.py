"""``HeadInferCache``: a transformers ``Cache`` whose keys and values live in the Rust ``KVStore``.

transformers drives a cache layer by layer (``update(k, v, layer_idx)`` before each attention), so
the cache holds one ``HeadInferLayer`` per decoder layer; all of them delegate to one shared store,
which owns the memory. When the patched forward drives the cache, ``update`` only appends and the
registered attention function runs attention inside the store (nothing is read back). Used any
other way (an unpatched model, ``model.model(...)`` called directly), ``update`` returns the keys
and values the layer's mask expects, read from the store, so any attention implementation stays
exact.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from . import _core
from .checks import check_cpu_heads, check_optional_positive_int, check_size
from .device import check_device, current_stream
from .distributed import (
    budget_for,
    check_gpu_budget,
    group_layers,
    layer_devices,
    local_world_size,
    rank_threads,
)
from .errors import HeadInferError
from .host_memory import check_host_memory, mem_available, pair_bytes
from .kv_dtype import check_kv_dtype, kv_row_bytes, store_kv_dtype
from .planner import (
    DIRECT_ROWS,
    GpuPlan,
    SharePlan,
    ShareTrial,
    cap_torch,
    plan_memory,
    plan_share,
)
from .prefill_attention import PrefillState, prefill_attention
from .share import physical_cores
from .spec import ModelSpec, attention_modules, model_spec

__all__ = ["DeviceStore", "HeadInferCache", "HeadInferLayer", "store_dtype"]

logger = logging.getLogger("headinfer")

# Guards the check-and-take of a cache's owning thread (see HeadInferCache.bound).
_OWNER_LOCK = threading.Lock()

_STORE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

DEFAULT_BLOCK_SIZE = 256
#: Tokens of growth after which the CPU share's trial looks again whether a step would split.
SPLIT_RECHECK = 256
#: Set to "copy" or "zero-copy": how the GPU reads host blocks in decode, whatever the rates
#: say (default "auto": the faster measured; for benchmarks and diagnosis).
HOST_READER_ENV = "HEADINFER_HOST_READER"
#: Most bytes per block (of keys, or of values) on the GPU path, as stored: large enough that
#: every copy and every kernel read of a block is a long run (1 MiB: 4096 tokens of a 128-dim
#: bf16 head, 7710 of its int8 rows). At most 1 MiB, as close as a row allows: the driver packs
#: device allocations into 2 MiB pages, so a block of 0.53 MiB (4096 int8 rows) took 0.67 MiB
#: of device memory (three a page), and the process went over its gpu_budget (NVML, H100).
GPU_BLOCK_BYTES = 1 << 20
#: Shortest sequence a CUDA store is sized for (more when max_position_embeddings says so).
DEFAULT_MAX_LEN = 1 << 20


def store_dtype(dtype: torch.dtype) -> str:
    """The store's name for a torch dtype; ``TypeError`` for one it does not hold."""
    try:
        return _STORE_DTYPES[dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in _STORE_DTYPES)
        raise TypeError(f"dtype: headinfer stores {supported}, got {dtype}") from None


@dataclass(eq=False)
class DeviceStore:
    """The store of the layers that run on one device, and what the cache plans for it.

    A model on one device has one; a model whose layers ``device_map`` spreads over several
    GPUs has one per GPU, each planned against that GPU's budget and streaming over its link.
    """

    device: torch.device
    #: The model's layer indices this store holds, ascending; its own are ``0..len(layers)``.
    layers: list[int]
    store: _core.KVStore
    #: The CUDA prefill's staging state on this device (``None`` on the CPU).
    prefill: PrefillState | None = None
    #: The last memory plan of this device (CUDA only).
    plan: GpuPlan | None = None

    def spec(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` restricted to this store's layers (what its planner sees)."""
        return replace(
            spec,
            num_layers=len(self.layers),
            windows=tuple(spec.windows[i] for i in self.layers),
        )


class HeadInferLayer(CacheLayerMixin):
    """One decoder layer's view of the shared store (``layer_idx`` in it).

    It holds no tensors itself (``keys``/``values`` stay ``None``); every call goes to the store.
    It refers to its cache weakly: the cache holds its layers, and a cycle between them would
    keep the store's blocks (GiBs of pinned memory on the GPU path) alive until the cyclic
    garbage collector runs, where a deleted ``DynamicCache`` frees its tensors at once.
    """

    is_compileable = False

    def __init__(self, cache: HeadInferCache, layer_idx: int, window: int | None) -> None:
        super().__init__()
        self._cache_ref = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.sliding_window = window
        self.is_sliding = window is not None
        # A windowed layer drops tokens, so crop() cannot always roll it back.
        self.is_croppable = window is None

    def __repr__(self) -> str:
        return f"HeadInferLayer(layer_idx={self.layer_idx}, window={self.sliding_window})"

    @property
    def _cache(self) -> HeadInferCache:
        cache = self._cache_ref()
        if cache is None:
            raise HeadInferError(
                f"layer {self.layer_idx}: its HeadInferCache was deleted (a layer does not keep "
                "the cache alive; keep a reference to the cache)"
            )
        return cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Create the stores on first use (on the devices of the model's layers, or else on
        that of ``key_states``), with the cache's ``dtype`` (when it was given) or else that of
        ``key_states``."""
        cache = self._cache
        cache._ensure_store(key_states.dtype, key_states.device)
        part, _ = cache._locate(self.layer_idx)
        self.device = part.device
        self.dtype = _DTYPES_BY_NAME[part.store.dtype]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one chunk and return the keys/values attention over this layer sees.

        Args:
            key_states: ``[1, num_kv_heads, chunk_len, head_dim]``.
            value_states: ``[1, num_kv_heads, chunk_len, head_dim]``.

        Returns:
            When the patched forward drives the cache: ``key_states, value_states`` unchanged
            (the headinfer attention reads the store itself). Otherwise the layer's visible keys
            and values, ``[1, num_kv_heads, kv_length, head_dim]`` each, as ``get_mask_sizes``
            announced them.
        """
        check_device(key_states, "key_states")
        if key_states.dim() != 4 or key_states.shape[0] != 1:
            raise ValueError(
                f"key_states: headinfer holds batch size 1, got shape {tuple(key_states.shape)}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        part, layer = self._cache._locate(self.layer_idx)
        if key_states.device != part.device:
            raise HeadInferError(
                f"layer {self.layer_idx}: keys on {key_states.device}, but the cache holds this "
                f"layer's KV on {part.device} (where its attention module's weights are)"
            )
        store = part.store
        seen = store.seq_len(layer)
        kv_offset = self._kv_offset(seen)
        stream = current_stream(key_states)
        store.append(layer, key_states[0], value_states[0], stream=stream)
        if self._cache._bound:
            self._cache._pending[self.layer_idx] = key_states.shape[2]
            return key_states, value_states
        end = store.seq_len(layer)
        if kv_offset < store.retained_start(layer):
            raise HeadInferError(
                f"layer {self.layer_idx}: the store dropped positions from {kv_offset} on, "
                "which this step still needs"
            )
        shape = (1, store.num_kv_heads, end - kv_offset, store.head_dim)
        keys = key_states.new_empty(shape)
        values = value_states.new_empty(shape)
        if store.is_cuda:
            heads = store.num_kv_heads
            store.gather(layer, 0, heads, kv_offset, end, keys[0], values[0], stream)
        else:
            store.read(layer, kv_offset, end, keys[0], values[0])
        return keys, values

    def _kv_offset(self, seen: int) -> int:
        # The first position a query at `seen` can see; as transformers' sliding layers do it.
        if self.sliding_window is None:
            return 0
        return max(seen - self.sliding_window + 1, 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the keys a chunk of ``query_length`` queries will see."""
        seen = self.get_seq_length()
        kv_offset = self._kv_offset(seen)
        return seen + query_length - kv_offset, kv_offset

    def get_seq_length(self) -> int:
        """Tokens appended to this layer so far (windowed-out ones included)."""
        cache = self._cache_ref()
        return 0 if cache is None else cache.get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        """``-1`` (no bound) or, for a sliding layer, its window, as transformers does."""
        return -1 if self.sliding_window is None else self.sliding_window

    def get_max_cache_shape(self) -> int:
        """transformers 5.17's name for ``get_max_length``."""
        return self.get_max_length()

    def offload(self) -> None:
        """No-op: the store already lives in host memory."""

    def prefetch(self) -> None:
        """No-op: the store already lives in host memory."""

    def reset(self) -> None:
        """Drop every token of the whole cache (the store is shared by all layers)."""
        self._cache.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search needs batch > 1, which headinfer does not hold yet."""
        raise ValueError("headinfer holds batch size 1: beam search is not supported yet")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Only ``repeats == 1`` is possible at batch size 1."""
        if repeats != 1:
            raise ValueError(f"repeats: headinfer holds batch size 1, got {repeats}")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Selecting among batch rows is meaningless at batch size 1."""
        if indices.numel() != 1:
            raise ValueError("indices: headinfer holds batch size 1")


class HeadInferCache(Cache):
    """A transformers ``Cache`` backed by headinfer's Rust ``KVStore`` (batch size 1).

    A patched model's ``generate()`` makes one by itself; pass one explicitly (``cache=`` on
    transformers >= 5.24, ``past_key_values=`` before) to keep it across calls, e.g. prefill a
    document once and ``crop()`` back to it after each answer.

    Args:
        model_or_config: the model (its dtype and, if patched, its ``block_size`` and
            ``host_memory_limit`` become the defaults) or its config (the dtype is then
            ``dtype``, or else that of the first keys stored).
        block_size: tokens per store block (default: the model's ``patch`` setting, else 256
            on the CPU and 1 MiB worth of one head on the GPU).
        host_memory_limit: bytes the store may reserve, an int or a size like ``"64GiB"``
            (default: what the host has available; under tensor parallelism, this rank's share
            of it: the host's available memory when the cache is made, divided by the ranks
            on this host).
        dtype: element type of the stored keys/values (float32, bfloat16 or float16). The
            store holds exactly this type: keys and values of another dtype are refused with a
            ``TypeError`` (never cast, which would change the results).
        gpu_budget: on CUDA, bytes of GPU memory this process may use in all (weights,
            working set and resident KV); an int or a size like ``"20GiB"``, for each GPU the
            model's layers run on, or a dict ``{device: bytes}`` (device ``0``, ``"cuda:0"``,
            ...) per GPU. Default: all the free memory less a margin. KV blocks fill what is
            left on the GPU; the rest sit in pinned host memory and are read over PCIe.
        cpu_heads: on CUDA, whether the CPU attends over part of the host-resident KV during
            decode while the GPU reads the rest (merged exactly, by log-sum-exp). Default
            ``None``: what ``patch()`` was given, else ``"auto"``: the planner decides from
            measured rates (once per machine, cached; ``planner.plan_share``): on where the
            host has at least 8 physical cores, and then each layer's step is split by (head,
            block range) so that both sides finish together, only where that is predicted
            faster; the first decode steps that split run with the share on and off in turn,
            and the faster is kept (``planner.ShareTrial``). An int overrides: the CPU takes
            kv heads ``0..cpu_heads`` from their first host block on; 0 turns the share off.
            ``share_plan()`` says what was chosen and why. Under tensor parallelism, or with
            layers over several GPUs, each store's share gets its part of the physical cores.
        croppable: keep every token on sliding-window layers too (by default they drop what
            their window no longer reaches), so that ``crop()`` can always go back: prefix
            reuse on models with sliding windows (Mistral, Qwen2, Gemma-2). Those layers then
            hold the whole context, as full-attention layers do; attention still sees only
            the window.
        kv_dtype: how the store holds keys and values: ``"exact"`` as the model computes
            them, or ``"int8"`` (opt-in, lossy: 8-bit with a bfloat16 scale per group of at
            most 32 values of each token's key or value vector, dequantized on load, float32
            accumulation; about half the bytes of bfloat16). Default ``None``: what
            ``patch()`` was given, else ``"exact"``.

    Several GPUs: a model whose layers ``device_map`` puts on several devices gets one store
    per device (``stores``), each holding the KV of that device's layers, planned and streamed
    there. Under tensor parallelism each rank's cache holds only its own kv heads
    (``spec.num_kv_heads`` is this rank's share); see README's "Several GPUs".

    Raises:
        UnsupportedModelError: the model is not of a supported family (``SUPPORTED_FAMILIES``).
        TypeError, ValueError: an argument of the wrong type or value (the message names it).
    """

    def __init__(
        self,
        model_or_config: torch.nn.Module | PretrainedConfig,
        *,
        block_size: int | None = None,
        host_memory_limit: int | str | None = None,
        dtype: torch.dtype | None = None,
        gpu_budget: int | str | dict[Any, int | str] | None = None,
        cpu_heads: int | str | None = None,
        croppable: bool = False,
        kv_dtype: str | None = None,
    ) -> None:
        device = None
        devices = None
        self.chunk_size = 4096
        if dtype is not None:
            store_dtype(dtype)  # TypeError for a dtype the store does not hold
        if isinstance(model_or_config, PretrainedConfig):
            config = model_or_config
        else:
            config = cast(PretrainedConfig, model_or_config.config)
            settings = getattr(model_or_config, "_headinfer", None)
            if settings is not None:
                block_size = settings.block_size if block_size is None else block_size
                if host_memory_limit is None:
                    host_memory_limit = settings.host_memory_limit
                if gpu_budget is None:
                    gpu_budget = settings.gpu_budget
                if cpu_heads is None:
                    cpu_heads = settings.cpu_heads
                if kv_dtype is None:
                    kv_dtype = settings.kv_dtype
                self.chunk_size = settings.chunk_size
            if dtype is None:
                dtype = getattr(model_or_config, "dtype", None)
            device = getattr(model_or_config, "device", None)
            devices = layer_devices(attention_modules(model_or_config))
        self.config = config
        self.spec = model_spec(model_or_config)
        self._block_size = check_optional_positive_int(block_size, "block_size")
        self.host_memory_limit = check_size(host_memory_limit, "host_memory_limit")
        self.gpu_budget = check_gpu_budget(gpu_budget)
        #: ``cpu_heads`` as checked (``None`` or ``"auto"``: the planner decides
        #: from measured rates; an int: the override), see ``share_plan``.
        self.cpu_heads = check_cpu_heads(cpu_heads, self.spec.num_kv_heads)
        #: ``"exact"`` or ``"int8"``: how the store holds keys and values.
        self.kv_dtype = check_kv_dtype(kv_dtype)
        #: The CPU share's plan, made with the first CUDA store (``None`` until then).
        self._share: SharePlan | None = None
        #: The first decode steps' check of a rate-based share (``None``: no such share).
        self._trial: ShareTrial | None = None
        # The step being timed for the trial: its start, whether the share was on, and
        # whether it was a decode step that counts (one token, and the share would split).
        self._step_start: float | None = None
        self._step_on = True
        self._step_counts = False
        self._splits_seen = False
        self._no_split_at: int | None = None
        #: The thread driving the cache from a plan to the end of a forward (``_owned``).
        self._owner: int | None = None
        #: The device each layer runs on (``None``: a config was given; the first keys' device).
        self.layer_devices = devices
        # The host memory the stores may take together: the user's limit, or under tensor
        # parallelism this rank's share of the host (the ranks' caches grow at once).
        self._host_limit = self.host_memory_limit
        if self.spec.tp_size > 1:
            self._share_host()
        #: The store's element type when given (else the first keys' dtype).
        self._dtype = dtype
        #: Longest sequence the store holds (CUDA stores size their block table for it).
        self.max_len = max(self.spec.max_positions or 0, DEFAULT_MAX_LEN)
        # The largest context the up-front host memory check has passed.
        self._host_checked = 0
        self.croppable = bool(croppable)
        #: New tokens a generate() call will add (set by the patched generate), for planning.
        self.expected_new_tokens = 0
        # The longest context a forward so far announced (prompt + generate()'s new tokens).
        self._horizon = 0
        # The (context, prefill) the device stores were last planned for.
        self._planned: tuple[int, bool] | None = None
        self._parts: list[DeviceStore] = []
        # Per model layer, its device store and its index there.
        self._where: list[tuple[DeviceStore, int]] = []
        # How many patched forwards are driving this cache right now (see `bound`).
        self._bound = 0
        # Per layer, tokens appended by `update` that the headinfer attention has not consumed.
        self._pending: dict[int, int] = {}
        # transformers' Cache types its layers as its own mixins; ours implement the same calls.
        layers: list[Any] = [HeadInferLayer(self, i, w) for i, w in enumerate(self.spec.windows)]
        super().__init__(layers=layers)
        if dtype is not None and device is not None:
            self._ensure_store(dtype, torch.device(device))

    @property
    def block_size(self) -> int:
        """Tokens per store block."""
        if self._block_size is not None:
            return self._block_size
        if self._parts:
            return self._parts[0].store.block_size
        return DEFAULT_BLOCK_SIZE

    def _share_host(self) -> None:
        ranks = local_world_size()
        if ranks > 1 and self._host_limit is None:
            available = mem_available()
            if available is not None:
                self._host_limit = available // ranks
                logger.info(
                    "tensor parallelism: this rank's caches may take %.2f GiB of host memory "
                    "(1/%d of the available %.2f GiB; host_memory_limit sets it)",
                    self._host_limit / 2**30,
                    ranks,
                    available / 2**30,
                )
        # The Rust pool sizes itself when first used: give this rank its share of the cores.
        if ranks > 1 and "RAYON_NUM_THREADS" not in os.environ:
            os.environ["RAYON_NUM_THREADS"] = str(rank_threads())
            logger.info("tensor parallelism: %s CPU threads per rank", rank_threads())

    @property
    def stores(self) -> list[DeviceStore]:
        """One ``DeviceStore`` per device the model's layers run on (empty before the first
        update, when no dtype was known up front)."""
        return list(self._parts)

    def _locate(self, layer_idx: int) -> tuple[DeviceStore, int]:
        """The device store of a model layer and the layer's index in it."""
        if not self._where:
            raise HeadInferError("the cache has no store yet: it is created by the first update")
        return self._where[layer_idx]

    def _ensure_store(self, dtype: torch.dtype, device: torch.device) -> _core.KVStore:
        """Create the device stores on first use: one per device of ``layer_devices`` (when
        the model was given), else one on ``device`` for every layer. Returns the store on
        ``device`` (the first one if none is there)."""
        # `dtype` is what the caller has at hand (the keys', the model's); the cache's own wins.
        if self._dtype is not None:
            dtype = self._dtype
        if not self._parts:
            self._make_stores(dtype, device)
        return next((p.store for p in self._parts if p.device == device), self._parts[0].store)

    def _make_stores(self, dtype: torch.dtype, device: torch.device) -> None:
        devices = self.layer_devices or [device] * self.spec.num_layers
        groups = group_layers(devices)
        limits = self._host_limits([layers for _, layers in groups])
        # The CPU share of each CUDA store gets its part of this process's cores (and a rank
        # of tensor parallelism, its part of the host's).
        gpus = sum(1 for d, _ in groups if d.type == "cuda")
        cores = max(physical_cores() // (local_world_size() * max(gpus, 1)), 1)
        parts = [
            self._make_store(dtype, d, layers, limit, cores)
            for (d, layers), limit in zip(groups, limits)
        ]
        self._parts = parts
        self._where = [(p, 0) for p in parts for _ in p.layers]
        for part in parts:
            for local, layer in enumerate(part.layers):
                self._where[layer] = (part, local)
        if len(parts) > 1:
            logger.info(
                "layers over %d devices: %s",
                len(parts),
                ", ".join(f"{p.device}: {len(p.layers)}" for p in parts),
            )

    def _host_limits(self, groups: list[list[int]]) -> list[int | None]:
        # Split the cache's host limit between the device stores by the tokens their layers
        # hold at max_len (a window layer keeps its window only); the check before a forward
        # (`_check_room`) counts them together.
        limit = self._host_limit
        if limit is None or len(groups) == 1:
            return [limit] * len(groups)
        windows = self.spec.windows
        weight = [sum(min(windows[i] or self.max_len, self.max_len) for i in g) for g in groups]
        return [limit * w // sum(weight) for w in weight]

    def _make_store(
        self,
        dtype: torch.dtype,
        device: torch.device,
        layers: list[int],
        limit: int | None,
        cores: int,
    ) -> DeviceStore:
        spec = self.spec
        windows = [spec.windows[i] for i in layers]
        cuda: dict[str, Any] = {}
        prefill = None
        block_size = self._block_size
        if device.type == "cuda":
            check_device(torch.empty(0, device=device), "the cache's device")
            if block_size is None:
                row = kv_row_bytes(spec.head_dim, store_dtype(dtype), self.kv_dtype)
                block_size = max(DEFAULT_BLOCK_SIZE, GPU_BLOCK_BYTES // row)
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda = {
                "device": index,
                "device_budget": 0,
                # Past max_position_embeddings too, as transformers runs RoPE models there.
                "max_len": self.max_len,
                "cpu_heads": self.cpu_heads if isinstance(self.cpu_heads, int) else 0,
            }
            device = torch.device("cuda", index)
            prefill = PrefillState(device)
            share = self._plan_share(index, dtype, cores)
            if self._share is None:
                self._share = share
        store = _core.KVStore(
            len(layers),
            spec.num_kv_heads,
            spec.head_dim,
            store_dtype(dtype),
            block_size=block_size or DEFAULT_BLOCK_SIZE,
            # croppable: window layers keep every token, so crop() can always go back.
            windows=[None] * len(layers) if self.croppable else windows,
            host_memory_limit=limit,
            kv_dtype=store_kv_dtype(self.kv_dtype),
            **cuda,
        )
        logger.debug(
            "KVStore on %s: layers %s x %d kv heads x %d, %s (kv_dtype %s), blocks of %d, "
            "windows %s",
            device,
            layers,
            spec.num_kv_heads,
            spec.head_dim,
            dtype,
            self.kv_dtype,
            store.block_size,
            windows,
        )
        if device.type == "cuda":
            store.share_threads = share.threads
            # The rates choose how the GPU reads host blocks whatever the share does; the CPU
            # balances its part only in "rates" mode (a CPU rate of 0 splits nothing).
            if share.rates is not None:
                store.share_rates = self._rates_tuple(share, share.mode == "rates")
            store.host_reader = os.environ.get(HOST_READER_ENV, "auto")
            if share.mode == "rates" and share.trial and self._trial is None:
                self._trial = ShareTrial()
        return DeviceStore(device, layers, store, prefill)

    def _plan_share(self, index: int, dtype: torch.dtype, cores: int) -> SharePlan:
        """The CPU share's plan for a store of ``dtype`` on GPU ``index`` with ``cores``
        physical cores (``planner.plan_share``), from this machine's rates for the store's
        shape and ``kv_dtype`` (an int8 store's CPU rate is its int8 kernel's)."""
        spec = self.spec
        return plan_share(
            self.cpu_heads,
            device_index=index,
            gpu_name=torch.cuda.get_device_name(index),
            dtype=store_dtype(dtype),
            head_dim=spec.head_dim,
            group=spec.num_q_heads // spec.num_kv_heads,
            cores=cores,
            kv_dtype=self.kv_dtype,
        )

    @staticmethod
    def _rates_tuple(share: SharePlan, on: bool) -> tuple[float, ...]:
        assert share.rates is not None
        rates = share.rates.as_tuple()
        return rates if on else (rates[0], 0.0, *rates[2:])

    def share_plan(self) -> dict[str, Any]:
        """What the CPU share does on this cache, and why (JSON-ready).

        ``mode`` (``"off"``, ``"heads"``: the ``cpu_heads`` override, ``"rates"``: balanced
        from measured rates), ``reason``, ``threads`` (the share's own thread pool),
        ``cores``, ``torch_threads``, ``rates`` (bytes per second: ``pcie``, ``cpu``,
        ``device``, ``copy``; ``handoff`` in seconds) and where they came from; ``trial``: the
        first decode steps' timings with the share on and off, and the decision (``null``
        without a rate-based share); with CUDA stores, ``host_reader`` (per store: ``"copy"``
        or ``"zero-copy"``, how the GPU reads host blocks), ``split``: per layer, the first
        key the CPU would take in each kv head now (``null``: the GPU alone), and per store
        ``balance`` (per layer, the CPU's and the GPU's rates its split balances by now:
        ``KVStore.share_balance``), ``steps`` (``[steps, waited]``: the layers' shared steps
        read and those the GPU waited for the CPU in), ``cpu_measured`` (``[bytes per
        second, tasks]`` of the share's own tasks, ``null`` before any) and ``timeline``
        (where the shared steps spent their time: ``KVStore.share_timeline``).
        """
        if self._share is None:
            plan = SharePlan(
                "off",
                "a CPU cache attends on the CPU already"
                if self._parts
                else "decided when the store is created on a CUDA device",
            )
        else:
            plan = self._share
        d = plan.to_dict()
        d["trial"] = None if self._trial is None else self._trial.to_dict()
        if any(p.store.is_cuda for p in self._parts):
            d["host_reader"] = [
                part.store.host_reader_used for part in self._parts if part.store.is_cuda
            ]
            d["split"] = [
                part.store.cpu_split(local) if part.store.is_cuda else None
                for part, local in self._where
            ]
            cuda = [part.store for part in self._parts if part.store.is_cuda]
            d["balance"] = [store.share_balance for store in cuda]
            d["cpu_measured"] = [store.share_cpu_measured for store in cuda]
            d["steps"] = [store.share_steps for store in cuda]
            d["timeline"] = [store.share_timeline for store in cuda]
        return d

    @property
    def store(self) -> _core.KVStore:
        """The Rust store of a cache on one device; created by the first ``update`` when no
        dtype was known up front. A cache over several devices has one each: ``stores``."""
        if not self._parts:
            raise HeadInferError("the cache has no store yet: it is created by the first update")
        if len(self._parts) > 1:
            devices = ", ".join(str(p.device) for p in self._parts)
            raise HeadInferError(f"the cache has one store per device ({devices}): use stores")
        return self._parts[0].store

    @property
    def has_store(self) -> bool:
        """Whether the stores exist (the first ``update`` creates them when no dtype was
        known up front)."""
        return bool(self._parts)

    @contextmanager
    def bound(self) -> Iterator[None]:
        """Mark the cache as driven by a patched forward for the duration of the block.

        While bound, ``update`` appends without reading back, and the headinfer attention must
        consume every appended chunk; the check at exit catches a model whose attention did not
        go through headinfer (which would otherwise see only the new chunk).

        If the block raises (``OutOfHostMemoryError`` in some layer, an error in the model, a
        ``KeyboardInterrupt``), the tokens it appended are dropped so that the cache is as it
        was before the block and stays usable, and the original exception propagates
        unchanged. The rollback is exact for sliding-window layers too: the store keeps the
        blocks a window lets go of until the block ends (``KVStore.checkpoint``). Where the
        rollback still cannot be exact (it fails itself, e.g. a CUDA error), a warning is
        logged and a note on the exception says what is left.

        A cache serves one thread at a time: a forward on another thread while one is running
        raises ``HeadInferError`` at once and leaves the cache to the thread that holds it
        (give each thread its own cache to run them together).
        """
        with self._claimed(), self._step():
            yield

    @contextmanager
    def _claimed(self) -> Iterator[None]:
        """Holds the cache for this thread (nested forwards on it: held already)."""
        me = threading.get_ident()
        with _OWNER_LOCK:
            owner = self.__dict__.get("_owner")
            if owner is not None and owner != me:
                raise HeadInferError(
                    "this HeadInferCache is in use by another thread (a forward or generate() "
                    "is running on it); a cache serves one thread at a time: give each thread "
                    "its own cache"
                )
            self._owner = me
        try:
            yield
        finally:
            if owner is None:
                self._owner = None

    @contextmanager
    def _step(self) -> Iterator[None]:
        """``bound``'s work, on the thread that holds the cache."""
        outermost = self._bound == 0
        start = self.get_seq_length() if outermost else 0
        if outermost:
            self._time_step()
        checkpoint = outermost and self._checkpoint()
        self._bound += 1
        try:
            yield
        except BaseException as exc:
            self._bound -= 1
            if outermost:
                self._step_start = None
                self._pending.clear()
                self._roll_back(start, checkpoint, exc)
            raise
        self._bound -= 1
        if not outermost:
            return
        if self._parts:
            # A failure inside the step (the CPU share of any layer) raises in this step; the
            # cache then continues from the last complete token.
            try:
                for part in self._parts:
                    part.store.finish_step()
            except BaseException as exc:
                self._pending.clear()
                self._roll_back(start, checkpoint, exc)
                raise
        if self._pending:
            layers = sorted(self._pending)
            self._pending.clear()
            error = HeadInferError(
                f"layers {layers} appended to the cache but their attention did not run through "
                "headinfer (is the model patched, and does it pass **kwargs to attention?)"
            )
            self._roll_back(start, checkpoint, error)
            raise error
        if checkpoint:
            for part in self._parts:
                part.store.commit()
        self._step_counts = self._step_counts and self.get_seq_length() - start == 1

    def _time_step(self) -> None:
        """For the CPU share's trial: times the step before (from its start to now) and sets
        whether the share runs in this one."""
        trial = self._trial
        if trial is None:
            return
        if trial.decided is not None:
            self._set_share(trial.decided)
            return
        if self._step_counts:
            # The step before ran on the GPU; wait for it (during the trial only), so a caller
            # that queues steps without reading their tokens is timed by its GPU work too.
            for part in self._parts:
                if part.store.is_cuda:
                    torch.cuda.synchronize(part.device)
        now = time.perf_counter()
        if self._step_start is not None and self._step_counts:
            trial.record(self._step_on, now - self._step_start)
        if trial.decided is not None:
            self._set_share(trial.decided)
            return
        # Only steps where the share would split tell the two apart (judged with its rates).
        # Once one does, the longer contexts after it do too; until then, look again only
        # every SPLIT_RECHECK tokens (a check asks every layer).
        self._set_share(True)
        if not self._splits_seen:
            n = self.get_seq_length()
            if self._no_split_at is None or n - self._no_split_at >= SPLIT_RECHECK:
                self._splits_seen = self._share_splits()
                self._no_split_at = n
        self._step_counts = self._splits_seen
        self._set_share(trial.mode() if self._step_counts else True)
        self._step_start = now

    def _set_share(self, on: bool) -> None:
        if on == self._step_on or self._share is None or self._share.rates is None:
            return
        for part in self._parts:
            if part.store.is_cuda:
                part.store.share_rates = self._rates_tuple(self._share, on)
        self._step_on = on

    def _share_splits(self) -> bool:
        """Whether a decode step now would give the CPU a share in some layer."""
        return any(
            part.store.is_cuda and part.store.cpu_split(local) is not None
            for part, local in self._where
        )

    def _checkpoint(self) -> bool:
        # The store's checkpoint keeps the blocks a window lets go of until commit(), so that
        # rollback() restores the state exactly. Before the store exists (the first forward
        # creates it), _roll_back crops to 0, which is always exact.
        if not self._parts:
            return False
        for part in self._parts:
            part.store.checkpoint()
        return True

    def _roll_back(self, length: int, checkpoint: bool, exc: BaseException) -> None:
        """Back to ``length`` tokens after ``exc``; never raises, never replaces ``exc``."""
        if not self._parts:
            return
        for part in self._parts:
            if part.prefill is not None:
                part.prefill.clear()  # staged copies of positions that may now hold other tokens
        stores = [part.store for part in self._parts]
        try:
            if checkpoint:
                for store in stores:
                    store.rollback()
                return
            held = [s.seq_len(i) for s in stores for i in range(s.num_layers)]
            if max(held) <= length:
                return
            # The exact state first; then the longest one every layer holds (the chunks that
            # ran through every layer), which a window may still allow; else nothing.
            reasons = []
            for target in dict.fromkeys((length, min(held))):
                try:
                    _crop_all(stores, target)
                except ValueError as crop_exc:
                    reasons.append(str(crop_exc))
                    continue
                if target == length:
                    return
                left = f"holds the first {target} tokens"
                break
            else:
                for store in stores:
                    store.clear()
                left = "was emptied"
            why = "; ".join(reasons)
        except Exception as rollback_exc:  # e.g. a CUDA error while synchronizing
            left, why = "may be inconsistent: reset() it", repr(rollback_exc)
        message = (
            f"headinfer: after {type(exc).__name__}, the cache could not be rolled back to "
            f"its {length} tokens and {left} ({why})"
        )
        logger.warning(message)
        add_note = getattr(exc, "add_note", None)  # Python >= 3.11
        if add_note is not None:
            add_note(message)

    def prepare(self, context: int, new_tokens: int) -> None:
        """Check and plan memory before a forward of ``new_tokens`` reaching ``context``.

        Called by the patched forward before the model runs. The whole request (the prompt
        and the tokens ``generate()`` will add) must fit host memory, else
        ``OutOfHostMemoryError`` with the figures before any chunk is computed; on CUDA, also
        the store's ``max_len``. On CUDA it then replans when the context grows past the last
        plan or the phase changes: a prefill keeps room for a chunk's activations and staging,
        decode gives that room to the KV, and blocks move between GPU and host to match (once
        per phase change: a few copies and one stream synchronization).
        """
        if not self._parts:
            return
        # generate()'s new tokens count from its prompt on; each decode step is one of them.
        end = context + (self.expected_new_tokens if new_tokens > 1 else 0)
        cuda = [part for part in self._parts if part.store.is_cuda]
        if not cuda:
            self._check_room(end)
            return
        if end > self.max_len:
            raise ValueError(
                f"input_ids: {end} tokens (with the new ones generate() adds) exceed the "
                f"cache's max_len of {self.max_len}"
            )
        # Plan once for the whole generate() call: its decode steps stay within the horizon
        # set by its prompt's forward, and do not replan (or rebalance) step by step.
        self._horizon = max(self._horizon, end)
        context = max(context, self._horizon)
        prefill = new_tokens * self.spec.num_q_heads // self.spec.num_kv_heads > DIRECT_ROWS
        planned = self._planned
        if planned is not None and context <= planned[0] and prefill == planned[1]:
            self._check_room(end)
            return
        if planned is not None and prefill == planned[1]:
            # Growing past the plan a step at a time (a hand-written decode loop): plan ahead.
            context += max(1024, context // 16)
        if not prefill:
            # The prefill's activations and staging sit in torch's cache as reserved memory;
            # hand them back so the blocks promoted below really fit the budget.
            torch.cuda.empty_cache()
        # Every device's plan first, then the host check with all of them, then the moves: a
        # request that does not fit changes nothing.
        plans = [self._plan_device(part, context, prefill) for part in cuda]
        self._check_room(end, {id(part): plan for part, plan in zip(cuda, plans)})
        self._planned = (context, prefill)
        for part, plan in zip(cuda, plans):
            self._apply_plan(part, plan)

    def _plan_device(self, part: DeviceStore, context: int, prefill: bool) -> GpuPlan:
        return plan_memory(
            self.config,
            part.spec(self.spec),
            device=part.device,
            dtype=_DTYPES_BY_NAME[part.store.dtype],
            context=context,
            chunk_size=self.chunk_size,
            gpu_budget=budget_for(self.gpu_budget, part.device),
            held_by_store=part.store.device_bytes_reserved(),
            prefill=prefill,
            kv_dtype=self.kv_dtype,
        )

    def _apply_plan(self, part: DeviceStore, plan: GpuPlan) -> None:
        store, device = part.store, part.device
        part.plan = plan
        store.device_budget = plan.kv_device_bytes
        budget = budget_for(self.gpu_budget, device)
        if budget is not None:
            # torch's share of the budget; freeing its cache first keeps the process under the
            # budget while blocks are promoted.
            cap = cap_torch(device, budget, plan, store.device_bytes_reserved())
            if torch.cuda.memory_reserved(device) > cap:
                torch.cuda.empty_cache()
        moved = store.rebalance(torch.cuda.current_stream(device).cuda_stream)
        if budget is not None:
            # Demoted (and trimmed) blocks were freed: torch's share grows back to what the
            # plan gives it (the cap above still counted them, and a prefill after decode
            # would run out under it).
            cap_torch(device, budget, plan, store.device_bytes_reserved())
        logger.info(
            "%s: %s of %d tokens planned: %.2f of %.2f GiB of KV on the GPU, head groups "
            "of %d; blocks promoted/demoted: %s",
            device,
            "prefill" if plan.prefill else "decode",
            plan.context,
            plan.kv_device_bytes / 2**30,
            plan.figures["kv_total_bytes"] / 2**30,
            plan.heads_per_group,
            moved,
        )

    @property
    def _plan(self) -> GpuPlan | None:
        # The plan of a cache on one GPU (the first device's, on several).
        return next((p.plan for p in self._parts if p.plan is not None), None)

    def _check_room(self, context: int, plans: dict[int, GpuPlan] | None = None) -> None:
        # Once per new high-water mark: decode steps inside a checked generate() skip it.
        if context <= self._host_checked:
            return
        parts = []
        for part in self._parts:
            plan = (plans or {}).get(id(part), part.plan)
            device_bytes = 0 if plan is None else plan.kv_device_bytes
            parts.append((part.store, device_bytes // pair_bytes(part.store)))
        check_host_memory(parts, context, self._host_limit)
        self._host_checked = context

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        out: torch.Tensor,
        scale: float,
        softcap: float | None,
        window: int | None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        """Attention of the chunk just appended to ``layer_idx`` over all its stored keys.

        Args:
            query: ``[1, num_q_heads, q_len, head_dim]``.
            key, value: ``[1, num_kv_heads, q_len, head_dim]``, the chunk just appended.
            out: ``[1, q_len, num_q_heads, head_dim]``, written.
            sinks: ``[num_q_heads]`` float32 on the query's device (gpt-oss), or ``None``.
        """
        part, layer = self._locate(layer_idx)
        store = part.store
        # The spec's window, not the store's: a croppable cache keeps every token of a window
        # layer and the op applies the window.
        held = self.spec.windows[layer_idx]
        if window != held:
            # The spec's window is what the model's own mask applies (eager attention); an
            # attention that passes another one would make headinfer differ from it.
            raise HeadInferError(
                f"layer {layer_idx}: the model's attention passes sliding_window={window} but "
                f"its config gives this layer {held} (config and model disagree)"
            )
        self._pending.pop(layer_idx, None)
        q_len = query.shape[2]
        group = query.shape[1] // store.num_kv_heads
        q = query[0] if query[0].stride(-1) == 1 else query[0].contiguous()
        if not store.is_cuda or q_len * group <= DIRECT_ROWS:
            out_view = out[0].transpose(0, 1)
            # One call per layer: the store decides whether the CPU takes a share (cpu_heads).
            store.attend(layer, q, out_view, scale, softcap, window, current_stream(query), sinks)
            return
        assert part.prefill is not None
        plan = part.plan
        heads = plan.heads_per_group if plan is not None else store.num_kv_heads
        prefill_attention(
            store,
            part.prefill,
            heads,
            layer,
            query,
            key,
            value,
            out,
            scale,
            softcap,
            window,
            sinks,
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached so far (positions ``0..n``), windowed-out ones included."""
        if not self._where or layer_idx >= self.spec.num_layers:
            return 0
        part, layer = self._where[layer_idx]
        return part.store.seq_len(layer)

    def crop(self, max_length: int) -> None:
        """Drop cached tokens, e.g. back to a reused prefix.

        Args:
            max_length: ``n > 0``: keep the first ``n`` tokens; ``n < 0``: drop the last ``-n``
                (transformers' convention); ``0``: nothing (as in transformers; use ``reset()``
                to empty the cache).

        Raises:
            ValueError: a sliding-window layer already dropped tokens that the kept positions
                would need; the cache is then unchanged.
        """
        if not self._parts or max_length == 0:
            return
        with self._claimed():  # not while another thread's forward runs on the cache
            length = self.get_seq_length()
            target = max_length if max_length > 0 else max(length + max_length, 0)
            if target < length:
                _crop_all([part.store for part in self._parts], target)
                self._horizon = 0

    def reset(self) -> None:
        """Drop every token; the store keeps its blocks for reuse."""
        with self._claimed():  # not while another thread's forward runs on the cache
            self._pending.clear()
            self._horizon = 0
            for part in self._parts:
                if part.prefill is not None:
                    part.prefill.clear()
                part.store.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search needs batch > 1, which headinfer does not hold yet."""
        raise ValueError("headinfer holds batch size 1: beam search is not supported yet")

    def bytes_used(self) -> int:
        """Bytes of keys and values held (host and device)."""
        return sum(part.store.bytes_used() for part in self._parts)

    def bytes_reserved(self) -> int:
        """Bytes the store holds in blocks (host and device), used or kept for reuse."""
        return sum(part.store.bytes_reserved() for part in self._parts)

    def memory(self) -> dict[str, int]:
        """Where the KV bytes sit: ``host_reserved``, ``device_reserved``, ``device_used``,
        ``used`` (all bytes, summed over the devices; ``memory_by_device`` splits them)."""
        total = {"used": 0, "host_reserved": 0, "device_reserved": 0, "device_used": 0}
        for figures in self.memory_by_device().values():
            for key, value in figures.items():
                total[key] += value
        return total

    def memory_by_device(self) -> dict[str, dict[str, int]]:
        """``memory()`` of each device's store, keyed by device name (``"cuda:1"``)."""
        return {
            str(part.device): {
                "used": part.store.bytes_used(),
                "host_reserved": part.store.host_bytes_reserved(),
                "device_reserved": part.store.device_bytes_reserved(),
                "device_used": part.store.device_bytes_used(),
            }
            for part in self._parts
        }

    @property
    def windows(self) -> Sequence[int | None]:
        """Per layer, the sliding window the store keeps (``None``: every token)."""
        return self.spec.windows

    def __repr__(self) -> str:
        return (
            f"HeadInferCache({self.spec.family}, layers={self.spec.num_layers}, "
            f"seq_len={self.get_seq_length()}, bytes_used={self.bytes_used()}"
            + (")" if self.kv_dtype == "exact" else f", kv_dtype={self.kv_dtype})")
        )


def _crop_all(stores: Sequence[_core.KVStore], length: int) -> None:
    """``crop(length)`` on every store, or on none: a store that would refuse (a window
    already dropped what ``length`` needs) raises its ``ValueError`` before any is cropped."""
    for store in stores:
        for layer, window in enumerate(store.windows):
            if window is None or length == 0 or store.seq_len(layer) <= length:
                continue
            if store.retained_start(layer) > max(length + 1 - window, 0):
                store.crop(length)  # raises the store's own message; changes nothing
    for store in stores:
        store.crop(length)


_DTYPES_BY_NAME = {name: dtype for dtype, name in _STORE_DTYPES.items()}
