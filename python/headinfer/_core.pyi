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
returns, so another thread swapping it (``set_``) cannot free memory under the op; growing it
(``resize_`` past its storage's bytes) while it is passed is a data race in torch itself.

``stream`` arguments are raw CUDA stream handles (``torch.cuda.current_stream().cuda_stream``);
work on CUDA tensors is queued on that stream and the call returns without waiting. ``None``
means torch's current stream on the tensors' device (the legacy default stream if torch is not
imported). CUDA tensors must be on the store's device: another CUDA device raises
``ValueError`` naming the argument, a CPU tensor for a CUDA store (or the reverse) ``TypeError``.
"""

from collections.abc import Sequence
from typing import Any, final

__all__ = [
    "__version__",
    "HeadInferError",
    "OutOfHostMemoryError",
    "KVStore",
    "kv_row_bytes",
    "attention",
    "ModelShape",
    "Plan",
    "plan",
    "measure_cpu_rate",
    "measure_gpu_rates",
    "share_split",
    "_inject_failure",
    "cuda_status",
    "cpu_isa",
    "cpu_isa_failures",
    "pinned_bytes",
    "pinned_pool_bytes",
    "release_pinned_pool",
    "device_block_bytes",
]

__version__: str

class HeadInferError(Exception):
    """Base class of every error raised by headinfer."""

class OutOfHostMemoryError(HeadInferError, MemoryError):
    """A request needs more host memory than is available; nothing was allocated.

    ``needed`` and ``available`` are in bytes.
    """

    needed: int
    available: int

@final
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
        cpu_heads: with ``device``, for how many kv heads the CPU attends over their
            host-resident blocks during decode while the GPU reads the rest (0: never; at most
            ``min(num_kv_heads, 16)``). The store decides per layer and step (see
            ``cpu_split``).
        kv_dtype: how keys and values are held: ``None`` (or ``dtype``'s own name) exactly,
            as given (the default); ``"int8"``: 8-bit, opt-in and approximate (int8 with one
            bf16 scale per group of ``gcd(head_dim, 32)`` values of each token's key or value
            vector of each kv head, computed at append, dequantized on load by every reader,
            f32 accumulation); about half the bytes. ``read``/``gather`` return the
            dequantized values.
    """

    def __new__(
        cls,
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
        cpu_heads: int = 0,
        kv_dtype: str | None = None,
    ) -> KVStore: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def kv_dtype(self) -> str:
        """``"int8"``, or ``dtype``'s name where keys and values are held exactly."""
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
    @property
    def cpu_heads(self) -> int:
        """Kv heads whose host blocks the CPU may take in decode (0: see ``share_rates``);
        settable. An override: it wins over ``share_rates``."""
    @cpu_heads.setter
    def cpu_heads(self, heads: int) -> None: ...
    @property
    def cpu_share_min_tokens(self) -> int:
        """Fewest host tokens (of the longest share) for which a decode splits; settable."""
    @cpu_share_min_tokens.setter
    def cpu_share_min_tokens(self, tokens: int) -> None: ...
    @property
    def share_rates(self) -> tuple[float, float, float, float, float] | None:
        """Measured ``(pcie, cpu, device, handoff, copy)`` rates (bytes per second; seconds):
        with ``cpu_heads`` 0, each decode step's CPU share is balanced from them
        (``share_split``; a ``cpu`` of 0 shares nothing), and with ``host_reader`` ``"auto"``
        they choose how the GPU reads host blocks (the faster of ``copy`` and ``pcie``);
        ``None``: no rate-based share, the copy engine. Settable with 4 figures (``copy`` 0:
        not measured) or 5 (CUDA stores only; ``ValueError`` naming ``share_rates`` for a
        figure that is negative, not finite, or a GPU rate of 0)."""
    @share_rates.setter
    def share_rates(self, rates: Sequence[float] | None) -> None: ...
    @property
    def share_calibrate(self) -> bool:
        """Whether each layer's decode split is balanced by the rates that layer's own shared
        steps showed (``share_balance``: the CPU's bytes over its task's seconds, the GPU's host
        bytes over its own part's seconds), so that both sides finish together where the
        probes' rates are off; settable (default on; off: ``share_rates`` alone)."""
    @share_calibrate.setter
    def share_calibrate(self, on: bool) -> None: ...
    @property
    def share_steps(self) -> tuple[int, int]:
        """``(steps, waited)``: the layers' shared steps read, and how many of them the GPU
        waited for the CPU's rows in."""
    @property
    def share_balance(self) -> list[tuple[float, float]] | None:
        """Per layer, ``(cpu, gpu)``: the rates (bytes per second of keys and values) its next
        decode step's split balances by (``share_calibrate``); ``None`` without
        ``share_rates``."""
    @property
    def share_timeline(self) -> dict[str, float]:
        """Where the shared decode steps spent their time, summed since the first, in seconds:
        ``gpu_steps`` (layer steps read), ``gpu_own`` (the GPU's own part of each: its query
        copy, kernels and staged pieces), ``gpu_waited`` (then waiting for the CPU's rows),
        ``cpu_tasks``, ``cpu_busy`` (the tasks computing) and ``cpu_idle`` (the CPU between
        tasks, waiting for their queries; gaps over a second not counted)."""
    @property
    def share_cpu_measured(self) -> tuple[float, int] | None:
        """``(bytes per second, tasks)``: the rate of the CPU share's own tasks (keys and
        values read over the seconds they computed, the most recent weighing most) and how
        many ran; ``None`` before any."""
    @property
    def host_reader(self) -> str:
        """How the GPU reads host-resident blocks in decode: ``"auto"`` (the faster by
        ``share_rates``; the copy engine where none), ``"copy"`` (the copy engine stages them
        into device buffers while the kernel attends over the previous piece) or
        ``"zero-copy"`` (the kernel reads mapped pinned memory in place); settable."""
    @host_reader.setter
    def host_reader(self, reader: str) -> None: ...
    @property
    def host_reader_used(self) -> str:
        """What ``host_reader`` resolves to now: ``"copy"`` or ``"zero-copy"``."""
    @property
    def staging_bytes(self) -> int:
        """Device bytes of the copy engine's staging buffers (0 until first used)."""
    @property
    def staging_piece_bytes(self) -> int:
        """Bytes of each of the copy engine's staging buffers (0 on a CPU store); settable
        on a CUDA store (a multiple of 16 holding a key and a value row): smaller pieces cut
        blocks across pieces, larger ones take more device memory."""
    @staging_piece_bytes.setter
    def staging_piece_bytes(self, bytes: int) -> None: ...
    @property
    def staging_buffers(self) -> int:
        """Buffers of the copy engine's staging ring (0 on a CPU store); settable on a CUDA
        store (at least 2): more let the copy engine run further ahead of the kernels and take
        more device memory."""
    @staging_buffers.setter
    def staging_buffers(self, buffers: int) -> None: ...
    @property
    def share_threads(self) -> int:
        """Threads of the CPU share's own pool (0: rayon's global pool); settable."""
    @share_threads.setter
    def share_threads(self, threads: int) -> None: ...
    def cpu_split(self, layer: int) -> list[int] | None:
        """What the store would do for a decode of ``layer`` now: per kv head ``0..c``, the
        first position the CPU takes (the layer's length: none of that head); ``None``: the
        GPU alone (CPU stores: always ``None``)."""
    def finish_step(self) -> None:
        """Wait for this step's CPU share on the host and raise its first failure.

        Call it once per forward step, after the last layer: a failure of the CPU worker in
        any layer then raises in the step where it happened (the merged output of that step is
        wrong and must be discarded). CPU stores: no-op.
        """
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
        sinks: Any | None = None,
    ) -> None:
        """Attention of ``query`` over every key stored for ``layer``; writes ``out``.

        Query ``i`` sits at position ``seq_len(layer) - q_len + i`` (the chunk just appended):
        it sees keys ``j <= position``, and with ``window`` only ``position - j < window``.
        Scores are ``scale * q.k``, then ``softcap * tanh(score / softcap)`` when given.
        GQA: query head ``h`` reads kv head ``h // (num_q_heads // num_kv_heads)``.

        On a CUDA store with ``cpu_heads`` set, a decode (one contiguous query per head) may
        split: the CPU attends over the host blocks of kv heads ``0..cpu_heads`` while the GPU
        kernel reads the rest, and the GPU merges both into ``out``. The call returns at once;
        only the merge on ``stream`` waits for the CPU (no host function is involved).
        ``finish_step`` raises a failure of the CPU's part.

        Args:
            query: ``[num_q_heads, q_len, head_dim]``, the store's device and dtype.
            out: ``[num_q_heads, q_len, head_dim]``, like ``query``; overwritten.
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
            value_out: ``[num_heads, end - start, head_dim]``, CUDA, the store's dtype (its
                strides may differ from ``key_out``'s).
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
        from ``length`` on would need; the store is then unchanged. ``crop(0)`` always works.
        Within a step, see ``checkpoint``.
        """
    def clear(self) -> None:
        """Drop every token; reserved blocks are kept for reuse. Ends an open step (as
        ``commit``)."""
    def checkpoint(self) -> None:
        """Begin a step that ``rollback`` can undo exactly.

        Remembers every layer's length and retained start. Until ``commit`` or ``rollback``,
        the blocks a sliding window lets go of that hold positions from before the step are
        kept aside instead of being reused (still counted in ``bytes_reserved``; at most the
        blocks each layer held at the checkpoint). A step already open is committed first.
        Takes no memory and waits for nothing.

        Within a step, ``rebalance`` moves only the blocks the layers hold; a ``crop`` of the
        step's own tokens keeps the step open, a ``crop`` below a layer's checkpoint length (or
        one that empties a layer) ends it as ``commit`` would, and so does ``clear``.
        """
    def commit(self) -> None:
        """End the open step, keeping what it appended; the kept-aside blocks are released for
        reuse, as the window would have. No step open: does nothing. Waits for nothing."""
    def rollback(self) -> None:
        """End the open step, undoing it: every layer holds exactly the positions, blocks and
        retained start it held at ``checkpoint``, so reads and attention are as before the
        step. Blocks the step added stay reserved for reuse.

        Waits for work in flight on the device first (as ``crop``). Raises ``ValueError`` if
        no step is open (none was begun, or ``commit``, ``clear`` or a ``crop`` below its
        length ended it); if waiting fails (a CUDA error) it raises and changes nothing, and
        the step stays open.
        """
    @property
    def in_step(self) -> bool:
        """Whether a step is open (``checkpoint`` called, not yet committed or rolled back)."""
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

def kv_row_bytes(head_dim: int, dtype: str, kv_dtype: str | None = None) -> int:
    """Bytes of one token's key (or value) row of one kv head as a store of ``dtype`` with
    ``kv_dtype`` holds it; a token of a layer takes two rows per kv head."""

def attention(
    query: Any,
    key: Any,
    value: Any,
    out: Any,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    stream: int | None = None,
    sinks: Any | None = None,
) -> None:
    """Attention over explicit key/value tensors (no store); writes ``out``.

    The same op as ``KVStore.attend``: query ``i`` sits at position ``kv_len - q_len + i``.

    Args:
        query: ``[num_q_heads, q_len, head_dim]``, CPU or CUDA, float32/bfloat16/float16.
        key: ``[num_kv_heads, kv_len, head_dim]``, same device and dtype as ``query``.
        value: ``[num_kv_heads, kv_len, head_dim]``, same device and dtype as ``query``
            (on CUDA, also the same strides as ``key``).
        out: ``[num_q_heads, q_len, head_dim]``, same device and dtype; overwritten.
        sinks: ``[num_q_heads]`` float32 on the query's device, or ``None``: per query head a
            learned logit that joins each softmax's denominator once (gpt-oss's sinks).
    """

@final
class ModelShape:
    """The shape of a model as far as memory goes: the planner's input.

    Args:
        num_layers, num_q_heads, num_kv_heads, head_dim, hidden_size, intermediate_size,
            vocab_size: from the model's config.
        elem_bytes: bytes per element of activations (and of the prefill's staged KV, which
            readers dequantize into the model's dtype).
        weight_bytes: bytes of the weights on the GPU.
        windows: per layer, the sliding window (``None``: full attention).
        kv_row_bytes: bytes the store holds per token per kv head for its keys (as many for
            its values): ``kv_row_bytes()``; default ``head_dim * elem_bytes`` (exact).
    """

    def __new__(
        cls,
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
        kv_row_bytes: int | None = None,
    ) -> ModelShape: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def weight_bytes(self) -> int: ...
    @property
    def kv_bytes_per_token_layer(self) -> int:
        """KV bytes of one token of one layer (keys and values of every kv head)."""

@final
class Plan:
    """Where every byte of a GPU budget goes (all figures in bytes but ``heads_per_group``)."""

    @property
    def weight_bytes(self) -> int: ...
    @property
    def activation_bytes(self) -> int:
        """One chunk's activations (the working set), estimated."""
    @property
    def heads_per_group(self) -> int:
        """KV heads gathered together for prefill attention."""
    @property
    def staging_bytes(self) -> int:
        """The two prefill staging buffers (double buffering) at full context."""
    @property
    def kv_device_bytes(self) -> int:
        """KV blocks kept on the GPU."""
    @property
    def kv_total_bytes(self) -> int:
        """KV of the whole context."""
    @property
    def kv_host_bytes(self) -> int:
        """KV in pinned host memory."""
    @property
    def margin_bytes(self) -> int:
        """Kept free for the CUDA context, library workspaces and fragmentation."""
    @property
    def fits_gpu(self) -> bool:
        """Whether weights, working set, staging and margin fit the budget at all."""
    def to_dict(self) -> dict[str, Any]:
        """The figures above as a dict, keyed by their names (for JSON)."""

def plan(
    model: ModelShape,
    *,
    context: int,
    chunk_size: int,
    gpu_budget: int,
    margin: int,
    staging_cap: int,
    prefill: bool = True,
) -> Plan:
    """Split a GPU budget: weights, one chunk's activations, prefill staging (double buffered
    head groups of at most ``staging_cap`` bytes), a margin, and resident KV; the rest of the
    KV on the host. ``prefill=False`` plans decode: one token's working set and no staging, the
    rest to the KV. Errors name the argument that cannot work."""

def measure_cpu_rate(
    dtype: str,
    head_dim: int,
    group: int,
    threads: int = 0,
    bytes: int = 268435456,
    seconds: float = 0.25,
    beside_copy: int | None = None,
    kv_dtype: str | None = None,
) -> tuple[float, float]:
    """Time the CPU share's kernel: decode attention of ``group`` query heads per kv head over
    ``bytes`` of keys and values (8 kv heads of ``head_dim``, ``dtype``) in host memory, held
    as ``kv_dtype`` says (as ``KVStore``'s: ``None`` or ``dtype``'s own name exactly,
    ``"int8"`` in the 8-bit rows, quantized by the store's quantizer; anything else is a
    ``ValueError`` naming ``kv_dtype``), on a pool of ``threads`` threads (0: rayon's global
    pool), for about ``seconds`` (3 to 16 runs); with ``beside_copy`` (a GPU index), while that
    GPU's copy engine moves pinned memory to it (as in a shared decode step). Returns
    ``(bytes_per_s, fixed_s)``: the median run's rate in bytes as the store holds them
    (``kv_row_bytes`` per row: the bytes the share's policy splits), and the seconds of a step
    over one block per head plus the hand-off's latency (the share's fixed cost)."""

def measure_gpu_rates(
    device: int, dtype: str, head_dim: int, group: int, kv_dtype: str | None = None
) -> tuple[float, float, float]:
    """Time the decode kernel on GPU ``device`` over 64 MiB of mapped pinned memory and four
    L2 caches' worth (64-256 MiB) of device memory, and the copy engine moving the pinned
    memory to the device in 1 MiB copies; the keys and values are held as a store of
    ``kv_dtype`` holds them (``None`` or ``dtype``: exact; ``"int8"``: its rows, read by its
    kernel); the buffers are allocated for the probe and freed before it returns. Returns
    ``(pcie, device, copy)`` in bytes read per second, in the bytes as held."""

def share_split(
    rates: Sequence[float],
    *,
    len: int,
    block_size: int,
    token_bytes: int,
    heads: Sequence[tuple[int, int, int | None]],
    start: int = 0,
    lo: int | None = None,
    max_heads: int = 16,
) -> dict[str, Any] | None:
    """The split a store with ``share_rates`` = ``rates`` (4 or 5 figures) makes of one
    layer's decode step, with the GPU reading host blocks at ``rates[0]``:
    ``heads`` is per kv head ``(device_tokens, host_tokens, tail)`` (visible tokens; where its
    host blocks start, or ``None`` when a device block follows a host one). Returns ``None``
    where splitting does not pay, else ``{"from": [...], "cpu_bytes", "gpu_seconds",
    "cpu_seconds", "alone_seconds"}``: per kv head ``0..min(heads, max_heads)`` the first key
    the CPU takes (a block start; ``len``: none), and the times expected."""

def _inject_failure(point: str | None, after: int = 0) -> None:
    """TEST-ONLY: make the pass through ``point`` after ``after`` more passes fail once.

    Points: ``"cpu_share"`` (the CPU share worker returns an error), ``"cpu_share_panic"``
    (it panics), ``"launch"`` (a kernel launch fails), ``"alloc"`` (a fresh KV block cannot be
    allocated). ``None`` disarms every point. Failures raise ``HeadInferError``.
    """

def cuda_status() -> str | None:
    """``None`` when the CUDA driver and NVRTC load; else what is missing."""

def cpu_isa() -> str:
    """The instruction set of the CPU attention in this process: ``"avx512"``, ``"avx2"`` or
    ``"scalar"``. Chosen once, on first use: the widest this CPU has whose kernels agree with
    an f64 reference on a few small problems (a set that disagrees gives way to the next one
    down, with the same results)."""

def cpu_isa_failures() -> list[str]:
    """Per wider set this CPU has whose kernels failed that self-check, ``"<name>: <reason>"``
    (empty when none did)."""

def pinned_bytes() -> int:
    """Bytes of pinned host memory headinfer holds: in caches and in the reuse pool."""

def pinned_pool_bytes() -> int:
    """Bytes of pinned host memory in the reuse pool."""

def release_pinned_pool(keep: int = 0) -> int:
    """Unpin the reuse pool (like ``torch.cuda.empty_cache()`` for headinfer's host memory);
    with ``keep``, all but its buffers for KV blocks of ``keep`` bytes (a store does this itself
    when the host's free memory falls short of its next blocks: a cache of another KV format
    dropped before leaves its blocks here). Returns the pooled bytes kept."""

def device_block_bytes() -> int:
    """Bytes of device memory headinfer holds in KV blocks, over all caches."""
