"""Type stub for the Rust extension module ``headinfer._core``.

Every tensor argument is anything that speaks DLPack (a ``torch.Tensor``). Tensors are
validated once, on entry: device, dtype, shape and strides; a wrong one raises ``ValueError``
or ``TypeError`` naming the argument. The last dimension (``head_dim``) must have stride 1;
other strides are free, so views such as ``x[0]`` or ``x.transpose(0, 1)`` need no copy.
CUDA tensors need rows that start on 16-byte boundaries (the kernels load 16 bytes at a time).
Outputs must be writable memory (a read-only array, memmap or DLPack export raises
``ValueError``) and share no memory with the inputs or each other. A tensor that requires grad
raises ``HeadInferError`` (the op is not differentiable: run under ``torch.no_grad()``); a lazily
negated view (``is_neg()``) raises ``TypeError``. Each tensor's storage is held until the call
returns, so another thread swapping it (``set_``) cannot free memory under the op.

``stream`` arguments are raw CUDA stream handles (``torch.cuda.current_stream().cuda_stream``);
work on CUDA tensors is queued on that stream and the call returns without waiting.
"""

from collections.abc import Sequence
from typing import Any

__version__: str

class HeadInferError(Exception):
    """Base class of every error raised by headinfer."""

class OutOfHostMemoryError(HeadInferError, MemoryError):
    """A request needs more host memory than is available; nothing was allocated.

    ``needed`` and ``available`` are in bytes.
    """

    needed: int
    available: int

class KVStore:
    """Head-wise KV cache store in host memory.

    One store holds every layer of one model: per (layer, kv head), keys and values in
    fixed-size blocks of ``block_size`` tokens, so stored tokens are never copied again as the
    sequence grows. Layers with a sliding window keep only the tokens their window still needs.

    Args:
        num_layers: number of decoder layers.
        num_kv_heads: key/value heads per layer.
        head_dim: size of one head.
        dtype: element type: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        block_size: tokens per block.
        windows: per layer, the sliding window in tokens (``None``: full attention).
            Length ``num_layers``; omitted: every layer full.
        host_memory_limit: bytes of host memory this store may reserve (``None``: what the
            host reports as available). Exceeding it raises ``OutOfHostMemoryError``.
        device: CUDA device ordinal: the store then holds CUDA tensors, in device memory up to
            ``device_budget`` bytes and in pinned host memory (read by the GPU over PCIe)
            beyond. ``None``: CPU tensors in host memory.
        device_budget: bytes of device memory the blocks may fill (with ``device``).
        max_len: longest sequence the store will hold (required with ``device``).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: str,
        block_size: int = 256,
        windows: Sequence[int | None] | None = None,
        host_memory_limit: int | None = None,
        device: int | None = None,
        device_budget: int = 0,
        max_len: int | None = None,
    ) -> None: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def block_size(self) -> int: ...
    @property
    def windows(self) -> list[int | None]: ...
    @property
    def is_cuda(self) -> bool:
        """Whether the store holds CUDA tensors."""
    @property
    def device_budget(self) -> int:
        """Bytes of device memory new blocks may fill; settable (blocks already placed stay)."""
    @device_budget.setter
    def device_budget(self, bytes: int) -> None: ...
    def seq_len(self, layer: int) -> int:
        """Tokens appended to ``layer`` so far (positions ``0..seq_len``), windowed-out ones too."""
    def retained_start(self, layer: int) -> int:
        """First position still held for ``layer`` (0 unless a sliding window dropped blocks)."""
    def append(self, layer: int, key: Any, value: Any, stream: int | None = None) -> None:
        """Append one chunk of keys and values to ``layer``.

        Args:
            key: ``[num_kv_heads, chunk_len, head_dim]``, the store's device and dtype.
            value: ``[num_kv_heads, chunk_len, head_dim]``, the store's device and dtype.

        Checks the host memory the chunk needs before taking any; on error the store is
        unchanged.
        """
    def read(self, layer: int, start: int, end: int, key_out: Any, value_out: Any) -> None:
        """Copy positions ``start..end`` of ``layer`` into ``key_out`` and ``value_out``.

        Args:
            key_out: ``[num_kv_heads, end - start, head_dim]``, CPU, the store's dtype.
            value_out: ``[num_kv_heads, end - start, head_dim]``, CPU, the store's dtype.
        """
    def attend(
        self,
        layer: int,
        query: Any,
        out: Any,
        scale: float,
        softcap: float | None = None,
        window: int | None = None,
        stream: int | None = None,
        host_share: Sequence[int] | None = None,
    ) -> None:
        """Attention of ``query`` over every key stored for ``layer``; writes ``out``.

        With ``host_share`` (CUDA, one query per head, ``query`` contiguous), the CPU takes kv
        heads ``0..len(host_share)`` from ``host_share[h]`` on (their host blocks): a worker
        attends over them while the GPU kernel reads the rest, and the GPU merges both into
        ``out``. The call returns at once; only the merge on ``stream`` waits for the worker.

        Query ``i`` sits at position ``seq_len(layer) - q_len + i`` (the chunk just appended):
        it sees keys ``j <= position``, and with ``window`` only ``position - j < window``.
        Scores are ``scale * q.k``, then ``softcap * tanh(score / softcap)`` when given.
        GQA: query head ``h`` reads kv head ``h // (num_q_heads // num_kv_heads)``.

        Args:
            query: ``[num_q_heads, q_len, head_dim]``, the store's device and dtype.
            out: ``[num_q_heads, q_len, head_dim]``, like ``query``; overwritten.
        """
    def host_share(self, layer: int, num_heads: int) -> list[int] | None:
        """Per kv head ``0..num_heads`` of ``layer``, the first position of its host blocks.

        ``None`` unless every such head keeps its device blocks before its host blocks and
        some head has host blocks (CPU stores: always ``None``).
        """
    def gather(
        self,
        layer: int,
        head_start: int,
        num_heads: int,
        start: int,
        end: int,
        key_out: Any,
        value_out: Any,
        stream: int | None = None,
    ) -> None:
        """Copy positions ``start..end`` of kv heads ``head_start..head_start + num_heads``.

        CUDA stores only (the copy runs on the GPU, from device or pinned blocks).

        Args:
            key_out: ``[num_heads, end - start, head_dim]``, CUDA, the store's dtype.
            value_out: ``[num_heads, end - start, head_dim]``, CUDA, same strides as ``key_out``.
        """
    def rebalance(self, stream: int | None = None) -> tuple[int, int]:
        """Move blocks between device and pinned host memory to match ``device_budget``.

        Host blocks are promoted (earliest positions first) while the budget has room; device
        blocks demoted (latest first) while it has too little. The copies run on ``stream``,
        which is synchronized once before the block table changes. CPU stores: ``(0, 0)``.
        Returns ``(promoted, demoted)`` block pairs.
        """
    def crop(self, length: int) -> None:
        """Drop every position ``>= length`` in every layer.

        Raises ``ValueError`` if a sliding-window layer already dropped tokens that positions
        from ``length`` on would need; the store is then unchanged.
        """
    def clear(self) -> None:
        """Drop every token; reserved blocks are kept for reuse."""
    def bytes_used(self) -> int:
        """Bytes of keys and values held (retained tokens only)."""
    def bytes_reserved(self) -> int:
        """Bytes the store holds in blocks, host and device, used or free for reuse."""
    def host_bytes_reserved(self) -> int:
        """Bytes of host memory the store holds in blocks."""
    def device_bytes_reserved(self) -> int:
        """Bytes of device memory the store holds in blocks."""
    def device_bytes_used(self) -> int:
        """Bytes of keys and values held in device memory."""

def attention(
    query: Any,
    key: Any,
    value: Any,
    out: Any,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    stream: int | None = None,
) -> None:
    """Attention over explicit key/value tensors (no store); writes ``out``.

    The same op as ``KVStore.attend``: query ``i`` sits at position ``kv_len - q_len + i``.

    Args:
        query: ``[num_q_heads, q_len, head_dim]``, CPU or CUDA, float32/bfloat16/float16.
        key: ``[num_kv_heads, kv_len, head_dim]``, same device and dtype as ``query``.
        value: ``[num_kv_heads, kv_len, head_dim]``, same device and dtype as ``query``
            (on CUDA, also the same strides as ``key``).
        out: ``[num_q_heads, q_len, head_dim]``, same device and dtype; overwritten.
    """

def plan(
    *,
    num_layers: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    hidden_size: int,
    intermediate_size: int,
    vocab_size: int,
    elem_bytes: int,
    weight_bytes: int,
    windows: Sequence[int | None],
    context: int,
    chunk_size: int,
    gpu_budget: int,
    margin: int,
    staging_cap: int,
    prefill: bool = True,
) -> dict[str, Any]:
    """Split a GPU budget: weights, one chunk's activations, prefill staging (double buffered
    head groups of at most ``staging_cap`` bytes), a margin, and resident KV; the rest of the
    KV on the host. Returns byte counts: ``weight_bytes``, ``activation_bytes``,
    ``heads_per_group``, ``staging_bytes``, ``kv_device_bytes``, ``kv_total_bytes``,
    ``kv_host_bytes``, ``margin_bytes``, and ``fits_gpu``. ``prefill=False`` plans decode:
    one token's working set and no staging, the rest to the KV."""

def cuda_status() -> str | None:
    """``None`` when the CUDA driver and NVRTC load; else what is missing."""

def pinned_bytes() -> int:
    """Bytes of pinned host memory headinfer holds: in caches and in the reuse pool."""

def pinned_pool_bytes() -> int:
    """Bytes of pinned host memory in the reuse pool."""

def release_pinned_pool() -> None:
    """Unpin the reuse pool (like ``torch.cuda.empty_cache()`` for headinfer's host memory)."""

def device_block_bytes() -> int:
    """Bytes of device memory headinfer holds in KV blocks, over all caches."""
