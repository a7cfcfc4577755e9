//! The head-wise KV store: per (layer, kv head), keys and values in fixed-size blocks of
//! host memory, so what is stored is never copied again as the sequence grows.
//!
//! Positions are absolute: layer `l` holds positions `start..len`, where `start` is a
//! multiple of the block size and only moves past 0 on sliding-window layers, which drop
//! whole blocks their window no longer reaches. Freed blocks go to a pool and are reused.

use crate::cpu::attention::{KvSource, Segment};
use crate::cuda::kernels::{AttnArgs, CpuShare, DevTensor, KvSrc, Pending, MAX_CPU_HEADS};
use crate::cuda::memory::{DeviceBuf, PinnedBuf};
use crate::cuda::{Gpu, Kernels, Stream};
use crate::error::{Error, Result};
use crate::host::{self, HostBuf};
use crate::tensor::{DType, Element, Rows, View3};
use std::collections::VecDeque;
use std::sync::Arc;

/// Where a GPU store keeps blocks: device memory up to a budget, the rest pinned on the host.
#[derive(Clone, Debug)]
pub struct CudaConfig {
    pub ordinal: usize,
    /// Bytes of device memory the store may fill with KV blocks.
    pub device_budget: usize,
    /// Longest sequence the store will hold (sizes the block table).
    pub max_len: usize,
}

/// The shape and policy of a store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    /// Tokens per block.
    pub block_size: usize,
    /// Per layer: the sliding window in tokens, or `None` for full attention.
    pub windows: Vec<Option<usize>>,
    /// Bytes the store may reserve in all; `None`: whatever the host has available.
    pub host_memory_limit: Option<usize>,
    /// `Some`: blocks for CUDA tensors (device memory, then pinned host memory).
    pub cuda: Option<CudaConfig>,
}

impl StoreConfig {
    /// Checks that the sizes are non-zero and that everything derived from them fits: a
    /// block's bytes (one allocation), a block for every (layer, kv head), the per-head
    /// bookkeeping (against the host's memory), and with CUDA the block table and the
    /// kernels' `int` arguments. Errors name the argument; nothing later can overflow.
    pub fn check_sizes(&self) -> Result<()> {
        for (name, v) in [
            ("num_layers", self.num_layers),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("block_size", self.block_size),
        ] {
            if v == 0 {
                return Err(Error::value(name, "must be at least 1"));
            }
        }
        let (layers, heads, bs) = (self.num_layers, self.num_kv_heads, self.block_size);
        // Keys and values of a block, both, as one `Layout` may hold.
        let pair = bs
            .checked_mul(self.head_dim)
            .and_then(|n| n.checked_mul(2 * self.dtype.size()))
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| {
                Error::value(
                    "block_size",
                    format!(
                        "{bs} tokens of head_dim {} make a block too large to allocate",
                        self.head_dim
                    ),
                )
            })?;
        let per_head = std::mem::size_of::<VecDeque<Block>>();
        let bookkeeping = layers
            .checked_mul(heads)
            .filter(|n| n.checked_mul(pair).is_some())
            .and_then(|n| n.checked_mul(per_head))
            .ok_or_else(|| {
                Error::value(
                    "num_kv_heads",
                    format!("{layers} layers x {heads} kv heads overflow the store's sizes"),
                )
            })?;
        let available = host::available_bytes().unwrap_or(usize::MAX);
        if bookkeeping > available {
            return Err(Error::OutOfHostMemory {
                what: format!("the block lists of {layers} layers x {heads} kv heads"),
                needed: bookkeeping,
                available,
            });
        }
        if let Some(c) = &self.cuda {
            let max_blocks = c.max_len.div_ceil(bs);
            if i32::try_from(bs).is_err() || i32::try_from(max_blocks).is_err() {
                return Err(Error::value(
                    "max_len",
                    format!(
                        "{} (blocks of {bs} tokens) exceeds the GPU kernels' limit of {} \
                         blocks of at most {} tokens",
                        c.max_len,
                        i32::MAX,
                        i32::MAX
                    ),
                ));
            }
            layers
                .checked_mul(heads)
                .and_then(|n| n.checked_mul(max_blocks))
                .and_then(|n| n.checked_mul(16))
                .filter(|&b| b <= isize::MAX as usize)
                .ok_or_else(|| {
                    Error::value(
                        "max_len",
                        format!(
                            "{}: the block table for {layers} layers x {heads} kv heads would \
                             be too large",
                            c.max_len
                        ),
                    )
                })?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        self.check_sizes()?;
        if self.windows.len() != self.num_layers {
            return Err(Error::value(
                "windows",
                format!(
                    "has {} entries, expected one per layer ({})",
                    self.windows.len(),
                    self.num_layers
                ),
            ));
        }
        if let Some(i) = self.windows.iter().position(|w| *w == Some(0)) {
            return Err(Error::value(
                "windows",
                format!("layer {i}: a window must be at least 1 token"),
            ));
        }
        Ok(())
    }

    /// Bytes of one block of keys (or of values): `block_size * head_dim` elements.
    pub fn block_bytes(&self) -> usize {
        self.block_size * self.head_dim * self.dtype.size()
    }
}

/// Memory of one block of keys or values.
enum Mem {
    Heap(HostBuf),
    Pinned(PinnedBuf),
    Device(DeviceBuf),
}

impl Mem {
    fn host_slice<E: Element>(&self) -> Option<&[E]> {
        match self {
            Mem::Heap(b) => Some(b.as_slice::<E>()),
            Mem::Pinned(b) => {
                let n = b.len() / std::mem::size_of::<E>();
                // SAFETY: the pinned allocation is `len` bytes, page aligned, and holds plain
                // numbers; the store only hands out shared views while no kernel writes it
                // (CPU reads of a GPU store happen between calls, after the stream is idle).
                Some(unsafe { std::slice::from_raw_parts(b.host_ptr() as *const E, n) })
            }
            Mem::Device(_) => None,
        }
    }

    fn heap_mut<E: Element>(&mut self) -> &mut [E] {
        match self {
            Mem::Heap(b) => b.as_mut_slice::<E>(),
            _ => unreachable!("CPU appends go to CPU stores only"),
        }
    }

    /// The address kernels use: device memory, or pinned memory's mapped address.
    fn dev_ptr(&self) -> u64 {
        match self {
            Mem::Heap(_) => 0,
            Mem::Pinned(b) => b.dev_ptr(),
            Mem::Device(b) => b.ptr(),
        }
    }

    fn is_device(&self) -> bool {
        matches!(self, Mem::Device(_))
    }

    fn release(self) {
        if let Mem::Pinned(b) = self {
            b.give_back();
        }
    }
}

/// Keys and values of `block_size` tokens of one head: each `[block_size, head_dim]`.
struct Block {
    k: Mem,
    v: Mem,
}

impl Block {
    fn release(self) {
        self.k.release();
        self.v.release();
    }
}

/// The GPU side of a CUDA store.
struct CudaState {
    gpu: Arc<Gpu>,
    kernels: Arc<Kernels>,
    budget: usize,
    /// Blocks in device memory, in use or free.
    device_blocks: usize,
    max_blocks: usize,
    /// `[layers][heads][max_blocks][2]` block addresses, in mapped pinned memory: the CPU
    /// writes entries before launching the kernels that read them.
    table: PinnedBuf,
    free_device: Vec<Block>,
    /// The side stream, buffers and worker state of shared decodes, made on first use.
    share: Option<crate::cuda::share::ShareState>,
}

impl CudaState {
    fn table_entry(&mut self, heads: usize, layer: usize, head: usize, abs: usize) -> &mut [u64] {
        let i = ((layer * heads + head) * self.max_blocks + abs) * 2;
        let n = self.table.len() / 8;
        // SAFETY: the table is `n` u64 entries of pinned memory owned by this state;
        // `&mut self` makes the access exclusive on the CPU side.
        let all = unsafe { std::slice::from_raw_parts_mut(self.table.host_ptr() as *mut u64, n) };
        &mut all[i..i + 2]
    }

    fn layer_table(&self, heads: usize, layer: usize) -> u64 {
        self.table.dev_ptr() + (layer * heads * self.max_blocks * 2 * 8) as u64
    }

    /// The kernels' view of `layer`: its block table.
    fn layer_src(&self, heads: usize, layer: usize, block_size: usize) -> KvSrc {
        KvSrc {
            table: self.layer_table(heads, layer),
            max_blocks: self.max_blocks as i32,
            block_size: block_size as i32,
            k: 0,
            v: 0,
            s0: 0,
            s1: 0,
        }
    }
}

struct Layer {
    /// Tokens appended so far: the next position.
    len: usize,
    /// Position of row 0 of the first block of every head.
    start: usize,
    /// Per kv head, its blocks in position order.
    heads: Vec<VecDeque<Block>>,
}

impl Layer {
    fn blocks_per_head(&self) -> usize {
        self.heads.first().map_or(0, |h| h.len())
    }
}

/// The KV cache of one model in host memory.
pub struct KvStore {
    cfg: StoreConfig,
    layers: Vec<Layer>,
    /// Host blocks no layer uses, kept for reuse.
    free: Vec<Block>,
    /// Blocks allocated in all, in use or free.
    allocated: usize,
    cuda: Option<CudaState>,
}

impl KvStore {
    /// An empty store; takes no memory until the first append.
    pub fn new(cfg: StoreConfig) -> Result<Self> {
        cfg.validate()?;
        let layers = (0..cfg.num_layers)
            .map(|_| Layer {
                len: 0,
                start: 0,
                heads: (0..cfg.num_kv_heads).map(|_| VecDeque::new()).collect(),
            })
            .collect();
        let cuda = match &cfg.cuda {
            None => None,
            Some(c) => {
                if c.max_len == 0 {
                    return Err(Error::value("max_len", "must be at least 1"));
                }
                let gpu = crate::cuda::gpu(c.ordinal)?;
                let kernels = gpu.kernels(cfg.dtype, cfg.head_dim)?;
                let max_blocks = c.max_len.div_ceil(cfg.block_size);
                let table_bytes = cfg.num_layers * cfg.num_kv_heads * max_blocks * 16;
                let table = PinnedBuf::take(&gpu, table_bytes)?;
                // SAFETY: `table_bytes` of pinned memory owned here; zero means "no block".
                unsafe { std::ptr::write_bytes(table.host_ptr(), 0, table_bytes) };
                Some(CudaState {
                    gpu,
                    kernels,
                    budget: c.device_budget,
                    device_blocks: 0,
                    max_blocks,
                    table,
                    free_device: Vec::new(),
                    share: None,
                })
            }
        };
        Ok(KvStore {
            cfg,
            layers,
            free: Vec::new(),
            allocated: 0,
            cuda,
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    fn layer(&self, layer: usize) -> Result<&Layer> {
        self.layers.get(layer).ok_or_else(|| {
            Error::value(
                "layer",
                format!("{layer} is out of range for {} layers", self.cfg.num_layers),
            )
        })
    }

    /// Tokens appended to `layer` so far.
    pub fn seq_len(&self, layer: usize) -> Result<usize> {
        Ok(self.layer(layer)?.len)
    }

    /// First position still held for `layer`.
    pub fn retained_start(&self, layer: usize) -> Result<usize> {
        Ok(self.layer(layer)?.start)
    }

    /// Where the first block of a window layer can start once position `pos` is queried:
    /// the earliest key that query needs is `pos + 1 - window`.
    fn window_start(&self, layer: usize, pos: usize) -> usize {
        let l = &self.layers[layer];
        match self.cfg.windows[layer] {
            Some(w) => {
                let need = (pos + 1).saturating_sub(w);
                let bs = self.cfg.block_size;
                (need / bs * bs).max(l.start)
            }
            None => l.start,
        }
    }

    /// Appends `key` and `value`, each `[num_kv_heads, chunk_len, head_dim]`, to `layer`.
    ///
    /// The host memory the chunk needs is checked before any is taken; on error the store is
    /// unchanged.
    pub fn append<E: Element>(
        &mut self,
        layer: usize,
        key: View3<'_, E>,
        value: View3<'_, E>,
    ) -> Result<()> {
        self.layer(layer)?;
        if E::DTYPE != self.cfg.dtype {
            return Err(Error::type_(
                "key",
                format!(
                    "dtype is {}, the store holds {}",
                    E::DTYPE.name(),
                    self.cfg.dtype.name()
                ),
            ));
        }
        let (h, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let chunk = key.shape[1];
        for (arg, t) in [("key", &key), ("value", &value)] {
            if t.shape != [h, chunk, d] {
                return Err(Error::value(
                    arg,
                    format!(
                        "expected shape [num_kv_heads, chunk_len, head_dim] = [{h}, {chunk}, {d}], got {:?}",
                        t.shape
                    ),
                ));
            }
        }
        if chunk == 0 {
            return Ok(());
        }
        if self.cuda.is_some() {
            return Err(Error::type_(
                "key",
                "is a CPU tensor but this store holds CUDA tensors (it was created with a device)",
            ));
        }
        let len = self.layers[layer].len;
        self.reserve(layer, chunk)?;
        let d = self.cfg.head_dim;
        let bs = self.cfg.block_size;
        let l = &mut self.layers[layer];
        for (hi, blocks) in l.heads.iter_mut().enumerate() {
            let (krows, vrows) = (key.rows(hi), value.rows(hi));
            for i in 0..chunk {
                let rel = len + i - l.start;
                let b = &mut blocks[rel / bs];
                let off = (rel % bs) * d;
                b.k.heap_mut::<E>()[off..off + d].copy_from_slice(krows.row(i));
                b.v.heap_mut::<E>()[off..off + d].copy_from_slice(vrows.row(i));
            }
        }
        l.len += chunk;
        Ok(())
    }

    /// Makes room for `chunk` more tokens of `layer`: lets go of the blocks its window no
    /// longer needs and places the new ones. Checks host memory first; on error nothing
    /// changed. The caller writes the tokens and advances `len`.
    fn reserve(&mut self, layer: usize, chunk: usize) -> Result<()> {
        let h = self.cfg.num_kv_heads;
        let bs = self.cfg.block_size;
        let (len, start, have) = {
            let l = &self.layers[layer];
            (l.len, l.start, l.blocks_per_head())
        };
        let new_start = self.window_start(layer, len);
        let dropped = ((new_start - start) / bs).min(have);
        let need = (len + chunk - new_start).div_ceil(bs);
        let grow = need - (have - dropped);
        if let Some(c) = &self.cuda {
            if len + chunk > c.max_blocks * bs {
                return Err(Error::value(
                    "key",
                    format!(
                        "{} tokens exceed the store's max_len of {}",
                        len + chunk,
                        c.max_blocks * bs
                    ),
                ));
            }
        }
        // New blocks come from: free device blocks, device budget room, free host blocks
        // (counting those the window drops now), then fresh host memory.
        let wanted = grow * h;
        let device_room = match &self.cuda {
            Some(c) => {
                let pair = 2 * self.cfg.block_bytes();
                c.free_device.len() + (c.budget / pair).saturating_sub(c.device_blocks)
            }
            None => 0,
        };
        let dropped_host = match &self.cuda {
            Some(_) => self.layers[layer]
                .heads
                .iter()
                .flat_map(|b| b.iter().take(dropped))
                .filter(|b| !b.k.is_device())
                .count(),
            None => dropped * h,
        };
        let host_wanted = wanted.saturating_sub(device_room);
        let fresh_host = host_wanted.saturating_sub(self.free.len() + dropped_host);
        self.check_host_memory(fresh_host, "appending to the KV cache")?;

        // Commit. Dropped blocks go back to their free lists first, so they are reused.
        let l = &mut self.layers[layer];
        for blocks in &mut l.heads {
            for _ in 0..dropped {
                let b = blocks.pop_front().expect("counted above");
                match (&mut self.cuda, b.k.is_device()) {
                    (Some(c), true) => c.free_device.push(b),
                    _ => self.free.push(b),
                }
            }
        }
        l.start += dropped * bs;
        let first_new = (l.start / bs) + have - dropped;
        for hi in 0..h {
            for gi in 0..grow {
                let b = self.take_block()?;
                if let Some(c) = &mut self.cuda {
                    let e = c.table_entry(h, layer, hi, first_new + gi);
                    e[0] = b.k.dev_ptr();
                    e[1] = b.v.dev_ptr();
                }
                self.layers[layer].heads[hi].push_back(b);
            }
        }
        Ok(())
    }

    /// One block for a new position: device memory while the budget lasts, else host.
    fn take_block(&mut self) -> Result<Block> {
        let n = self.cfg.block_bytes();
        if let Some(c) = &mut self.cuda {
            if let Some(b) = c.free_device.pop() {
                return Ok(b);
            }
            if (c.device_blocks + 1) * 2 * n <= c.budget {
                let b = Block {
                    k: Mem::Device(DeviceBuf::new(&c.gpu, n)?),
                    v: Mem::Device(DeviceBuf::new(&c.gpu, n)?),
                };
                c.device_blocks += 1;
                self.allocated += 1;
                return Ok(b);
            }
        }
        if let Some(b) = self.free.pop() {
            return Ok(b);
        }
        let b = match &self.cuda {
            Some(c) => Block {
                k: Mem::Pinned(PinnedBuf::take(&c.gpu, n)?),
                v: Mem::Pinned(PinnedBuf::take(&c.gpu, n)?),
            },
            None => Block {
                k: Mem::Heap(HostBuf::new(n)?),
                v: Mem::Heap(HostBuf::new(n)?),
            },
        };
        self.allocated += 1;
        Ok(b)
    }

    /// Errors unless `blocks` more blocks fit both the store's limit and the host.
    fn check_host_memory(&self, blocks: usize, what: &str) -> Result<()> {
        if blocks == 0 {
            return Ok(());
        }
        let needed = blocks * 2 * self.cfg.block_bytes();
        let mut available = host::available_bytes().unwrap_or(usize::MAX);
        if let Some(limit) = self.cfg.host_memory_limit {
            available = available.min(limit.saturating_sub(self.host_bytes_reserved()));
        }
        if needed > available {
            return Err(Error::OutOfHostMemory {
                what: what.to_string(),
                needed,
                available,
            });
        }
        Ok(())
    }

    /// Positions `a..b` of `layer` as `[num_kv_heads, b - a, head_dim]`, one call per row:
    /// `f(head, i, key_row, value_row)`.
    pub fn read<E: Element>(
        &self,
        layer: usize,
        a: usize,
        b: usize,
        mut f: impl FnMut(usize, usize, &[E], &[E]),
    ) -> Result<()> {
        let kv = self.layer_kv::<E>(layer)?;
        if a > b || b > kv.len() {
            return Err(Error::value(
                "end",
                format!(
                    "range {a}..{b} is outside the {} tokens of layer {layer}",
                    kv.len()
                ),
            ));
        }
        if a < kv.start() {
            return Err(Error::value(
                "start",
                format!(
                    "position {a} of layer {layer} was dropped by its sliding window (held from {})",
                    kv.start()
                ),
            ));
        }
        for h in 0..self.cfg.num_kv_heads {
            for seg in kv.segments(h, a, b) {
                for i in 0..seg.k.len {
                    f(h, seg.pos + i - a, seg.k.row(i), seg.v.row(i));
                }
            }
        }
        Ok(())
    }

    /// A read-only view of `layer` for the attention op.
    pub fn layer_kv<E: Element>(&self, layer: usize) -> Result<LayerKv<'_, E>> {
        let l = self.layer(layer)?;
        if self.cuda.is_some() {
            return Err(Error::type_(
                "query",
                "is a CPU tensor but this store holds CUDA tensors (it was created with a device)",
            ));
        }
        if E::DTYPE != self.cfg.dtype {
            return Err(Error::type_(
                "query",
                format!(
                    "dtype is {}, the store holds {}",
                    E::DTYPE.name(),
                    self.cfg.dtype.name()
                ),
            ));
        }
        Ok(LayerKv {
            layer: l,
            block_size: self.cfg.block_size,
            head_dim: self.cfg.head_dim,
            _e: std::marker::PhantomData,
        })
    }

    /// Drops every position `>= length` in every layer (a no-op where a layer is shorter).
    ///
    /// Fails, changing nothing, if a sliding-window layer already dropped tokens that
    /// queries from `length` on would need.
    pub fn crop(&mut self, length: usize) -> Result<()> {
        for (i, l) in self.layers.iter().enumerate() {
            if length >= l.len {
                continue;
            }
            let need = match self.cfg.windows[i] {
                Some(w) => (length + 1).saturating_sub(w),
                None => 0,
            };
            if l.start > need {
                return Err(Error::value(
                    "length",
                    format!(
                        "cannot crop to {length}: layer {i} (sliding window {}) already dropped \
                         positions below {}, and position {length} needs keys from {need}",
                        self.cfg.windows[i].unwrap_or(0),
                        l.start
                    ),
                ));
            }
        }
        if let Some(c) = &self.cuda {
            // Freed blocks get new table entries on reuse: no kernel may still read the old.
            c.gpu.synchronize()?;
        }
        let bs = self.cfg.block_size;
        for l in &mut self.layers {
            if length >= l.len {
                continue;
            }
            let keep = (length - l.start).div_ceil(bs);
            for blocks in &mut l.heads {
                while blocks.len() > keep {
                    let b = blocks.pop_back().expect("len > keep");
                    match (&mut self.cuda, b.k.is_device()) {
                        (Some(c), true) => c.free_device.push(b),
                        _ => self.free.push(b),
                    }
                }
            }
            l.len = length;
            if keep == 0 {
                l.start = 0;
            }
        }
        Ok(())
    }

    /// Drops every token; blocks stay reserved for reuse.
    pub fn clear(&mut self) -> Result<()> {
        if let Some(c) = &self.cuda {
            c.gpu.synchronize()?;
        }
        for l in &mut self.layers {
            for blocks in &mut l.heads {
                for b in blocks.drain(..) {
                    match (&mut self.cuda, b.k.is_device()) {
                        (Some(c), true) => c.free_device.push(b),
                        _ => self.free.push(b),
                    }
                }
            }
            l.len = 0;
            l.start = 0;
        }
        Ok(())
    }

    /// Bytes of keys and values of the positions held (`start..len` of every layer).
    pub fn bytes_used(&self) -> usize {
        let per_token = 2 * self.cfg.num_kv_heads * self.cfg.head_dim * self.cfg.dtype.size();
        self.layers
            .iter()
            .map(|l| (l.len - l.start) * per_token)
            .sum()
    }

    /// Bytes of memory held in blocks, in use or free for reuse, host and device.
    pub fn bytes_reserved(&self) -> usize {
        self.allocated * 2 * self.cfg.block_bytes()
    }

    /// Bytes of device memory held in blocks.
    pub fn device_bytes_reserved(&self) -> usize {
        self.cuda
            .as_ref()
            .map_or(0, |c| c.device_blocks * 2 * self.cfg.block_bytes())
    }

    /// Bytes of host memory held in blocks.
    pub fn host_bytes_reserved(&self) -> usize {
        self.bytes_reserved() - self.device_bytes_reserved()
    }

    /// Bytes of keys and values held in device memory (positions in device blocks).
    pub fn device_bytes_used(&self) -> usize {
        let bs = self.cfg.block_size;
        let row = self.cfg.head_dim * self.cfg.dtype.size() * 2;
        let mut total = 0;
        for l in &self.layers {
            for blocks in &l.heads {
                for (i, b) in blocks.iter().enumerate() {
                    if b.k.is_device() {
                        let a = l.start + i * bs;
                        total += (a + bs).min(l.len).saturating_sub(a) * row;
                    }
                }
            }
        }
        total
    }

    /// Changes how many bytes of device memory new blocks may fill. Blocks already on the
    /// device stay there; a smaller budget only sends later blocks to the host.
    pub fn set_device_budget(&mut self, bytes: usize) -> Result<()> {
        match &mut self.cuda {
            Some(c) => {
                c.budget = bytes;
                Ok(())
            }
            None => Err(Error::value(
                "device_budget",
                "this store holds CPU tensors",
            )),
        }
    }

    /// Moves blocks between device memory and pinned host memory until the device holds as
    /// many blocks as the budget allows: host blocks are promoted (earliest positions first,
    /// every layer alike) while there is room, device blocks demoted (latest first) while there
    /// is too little. The copies run on `stream`, which is synchronized once before the block
    /// table changes, so no kernel ever reads a block that is still being filled. Replaced
    /// host blocks stay reserved for reuse. Returns (promoted, demoted) block pairs.
    pub fn rebalance(&mut self, stream: Stream) -> Result<(usize, usize)> {
        let n = self.cfg.block_bytes();
        let (heads, bs) = (self.cfg.num_kv_heads, self.cfg.block_size);
        let Some(c) = self.cuda.as_mut() else {
            return Ok((0, 0));
        };
        let target = c.budget / (2 * n);
        // Unused device blocks beyond the budget go first: nothing reads them.
        while c.device_blocks > target {
            match c.free_device.pop() {
                Some(b) => {
                    drop(b);
                    c.device_blocks -= 1;
                    self.allocated -= 1;
                }
                None => break,
            }
        }
        // Free device blocks are reused first, then new ones fill the budget.
        let promote = target.saturating_sub(c.device_blocks) + c.free_device.len();
        let demote = c.device_blocks.saturating_sub(target);
        let mut moves: Vec<(usize, usize, usize)> = Vec::new(); // (layer, head, index)
        let longest = self
            .layers
            .iter()
            .map(|l| l.blocks_per_head())
            .max()
            .unwrap_or(0);
        if promote > 0 {
            'find: for i in 0..longest {
                for (li, l) in self.layers.iter().enumerate() {
                    for (hi, blocks) in l.heads.iter().enumerate() {
                        if blocks.get(i).is_some_and(|b| !b.k.is_device()) {
                            moves.push((li, hi, i));
                            if moves.len() == promote {
                                break 'find;
                            }
                        }
                    }
                }
            }
        } else if demote > 0 {
            'find: for i in (0..longest).rev() {
                for (li, l) in self.layers.iter().enumerate() {
                    for (hi, blocks) in l.heads.iter().enumerate() {
                        if blocks.get(i).is_some_and(|b| b.k.is_device()) {
                            moves.push((li, hi, i));
                            if moves.len() == demote {
                                break 'find;
                            }
                        }
                    }
                }
            }
            let fresh = moves.len().saturating_sub(self.free.len());
            self.check_host_memory(fresh, "moving KV blocks from the GPU to the host")?;
        }
        if moves.is_empty() {
            return Ok((0, 0));
        }
        let c = self.cuda.as_mut().expect("checked");
        c.gpu.bind()?;
        // Copy into new blocks; nothing anyone reads changes yet.
        let mut staged = Vec::with_capacity(moves.len());
        for &(li, hi, i) in &moves {
            let old = &self.layers[li].heads[hi][i];
            // (block, newly allocated): counters change only once every copy is queued.
            let (new, fresh) = if promote > 0 {
                match c.free_device.pop() {
                    Some(b) => (b, false),
                    None => (
                        Block {
                            k: Mem::Device(DeviceBuf::new(&c.gpu, n)?),
                            v: Mem::Device(DeviceBuf::new(&c.gpu, n)?),
                        },
                        true,
                    ),
                }
            } else if let Some(b) = self.free.pop() {
                (b, false)
            } else {
                (
                    Block {
                        k: Mem::Pinned(PinnedBuf::take(&c.gpu, n)?),
                        v: Mem::Pinned(PinnedBuf::take(&c.gpu, n)?),
                    },
                    true,
                )
            };
            for (dst, src) in [
                (new.k.dev_ptr(), old.k.dev_ptr()),
                (new.v.dev_ptr(), old.v.dev_ptr()),
            ] {
                // SAFETY: both blocks are `n` bytes of device-addressable memory owned by the
                // store; the copy is ordered on `stream` after every write to `old`.
                unsafe { cudarc::driver::sys::cuMemcpyAsync(dst, src, n, stream.0) }
                    .result()
                    .map_err(|e| crate::cuda::driver_err("moving a KV block", e))?;
            }
            staged.push((new, fresh));
        }
        // SAFETY: a valid stream handle from the caller.
        unsafe { cudarc::driver::result::stream::synchronize(stream.0) }
            .map_err(|e| crate::cuda::driver_err("waiting for block moves", e))?;
        for (&(li, hi, i), (new, fresh)) in moves.iter().zip(staged) {
            if fresh {
                self.allocated += 1;
                if promote > 0 {
                    c.device_blocks += 1;
                }
            }
            let abs = self.layers[li].start / bs + i;
            let e = c.table_entry(heads, li, hi, abs);
            e[0] = new.k.dev_ptr();
            e[1] = new.v.dev_ptr();
            let old = std::mem::replace(&mut self.layers[li].heads[hi][i], new);
            if promote > 0 {
                self.free.push(old);
            } else {
                c.device_blocks -= 1;
                self.allocated -= 1;
                drop(old);
            }
        }
        Ok(if promote > 0 {
            (moves.len(), 0)
        } else {
            (0, moves.len())
        })
    }

    /// Bytes of device memory new blocks may fill (0 for a CPU store).
    pub fn device_budget(&self) -> usize {
        self.cuda.as_ref().map_or(0, |c| c.budget)
    }

    /// Whether the store holds CUDA tensors.
    pub fn is_cuda(&self) -> bool {
        self.cuda.is_some()
    }

    fn cuda_state(&self, arg: &str) -> Result<&CudaState> {
        self.cuda.as_ref().ok_or_else(|| {
            Error::type_(
                arg,
                "is a CUDA tensor but this store holds CPU tensors (create it with a device)",
            )
        })
    }

    /// Appends `n` tokens from device tensors `key`, `value` (`[num_kv_heads, n, head_dim]`).
    ///
    /// # Safety
    /// The tensors must be valid device memory of that shape and strides, alive until
    /// `stream` reaches this work.
    pub unsafe fn append_cuda(
        &mut self,
        layer: usize,
        key: DevTensor,
        value: DevTensor,
        n: usize,
        stream: Stream,
    ) -> Result<()> {
        self.layer(layer)?;
        self.cuda_state("key")?;
        if n == 0 {
            return Ok(());
        }
        let len = self.layers[layer].len;
        self.reserve(layer, n)?;
        let h = self.cfg.num_kv_heads;
        let c = self.cuda.as_ref().expect("checked");
        c.gpu.bind()?;
        let table = c.layer_table(h, layer);
        // SAFETY: the caller vouches for the tensors; `reserve` put every block the
        // positions `len..len + n` fall in into the table.
        unsafe {
            c.kernels.append(
                stream,
                key,
                value,
                h,
                n,
                len,
                table,
                c.max_blocks,
                self.cfg.block_size,
            )?
        };
        self.layers[layer].len += n;
        Ok(())
    }

    /// Attention of device `query` (`[num_q_heads, q_len, head_dim]`) over `layer`, into
    /// `out` (same shape).
    ///
    /// # Safety
    /// As for `append_cuda`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attend_cuda(
        &self,
        layer: usize,
        query: DevTensor,
        num_q_heads: usize,
        q_len: usize,
        params: &crate::cpu::attention::Params,
        out: DevTensor,
        stream: Stream,
    ) -> Result<()> {
        let l = self.layer(layer)?;
        let c = self.cuda_state("query")?;
        let h = self.cfg.num_kv_heads;
        let args = attn_args(num_q_heads, q_len, h, l.len, l.start, params)?;
        if q_len == 0 {
            return Ok(());
        }
        c.gpu.bind()?;
        let src = c.layer_src(h, layer, self.cfg.block_size);
        // SAFETY: the caller vouches for `query` and `out`; the table covers `start..len`.
        unsafe { c.kernels.attend(stream, query, src, &args, out) }
    }

    /// Per kv head `0..heads` of `layer`, the first position of its host blocks, for a decode
    /// that reads those blocks on the CPU while the GPU reads the rest. `None` unless every
    /// such head keeps its device blocks before its host blocks (the order growth and
    /// `rebalance` keep) and some head has host blocks at all.
    pub fn host_share(&self, layer: usize, heads: usize) -> Result<Option<Vec<usize>>> {
        let l = self.layer(layer)?;
        if heads > self.cfg.num_kv_heads || heads > MAX_CPU_HEADS {
            return Err(Error::value(
                "num_heads",
                format!(
                    "{heads} exceeds the {} kv heads (or the {MAX_CPU_HEADS} a share may hold)",
                    self.cfg.num_kv_heads
                ),
            ));
        }
        if self.cuda.is_none() {
            return Ok(None);
        }
        let bs = self.cfg.block_size;
        let mut from = Vec::with_capacity(heads);
        for blocks in l.heads.iter().take(heads) {
            let first = blocks
                .iter()
                .position(|b| !b.k.is_device())
                .unwrap_or(blocks.len());
            if blocks.iter().skip(first).any(|b| b.k.is_device()) {
                return Ok(None);
            }
            from.push((l.start + first * bs).min(l.len));
        }
        Ok(from.iter().any(|&f| f < l.len).then_some(from))
    }

    /// Decode attention with the CPU sharing the host KV: kv heads `0..from.len()` leave their
    /// keys from `from[h]` on (their host blocks, per `host_share`) to a worker on the host,
    /// the GPU kernel reads the rest, and the GPU merges both into `out`. Returns at once.
    /// One query per head (`q_len == 1`); `query` `[num_q_heads, 1, head_dim]` contiguous.
    ///
    /// # Safety
    /// As for `append_cuda`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn attend_cuda_shared<E: Element>(
        &mut self,
        layer: usize,
        query: DevTensor,
        num_q_heads: usize,
        q_len: usize,
        params: &crate::cpu::attention::Params,
        from: &[usize],
        out: DevTensor,
        stream: Stream,
    ) -> Result<()> {
        let (h, d, bs) = (
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            self.cfg.block_size,
        );
        if E::DTYPE != self.cfg.dtype {
            return Err(Error::type_("query", "dtype differs from the store's"));
        }
        if q_len != 1 || query.s0 != d as i64 {
            return Err(Error::value(
                "query",
                "a shared decode takes one contiguous query per head ([num_q_heads, 1, head_dim])",
            ));
        }
        let l = self.layer(layer)?;
        // The worker's view: each CPU head's host blocks from `from[h]` on.
        let mut heads = Vec::with_capacity(from.len());
        for (hi, &f) in from.iter().enumerate() {
            let mut runs = Vec::new();
            if f < l.len {
                if f < l.start || !(f - l.start).is_multiple_of(bs) {
                    return Err(Error::value(
                        "host_share",
                        format!("kv head {hi}: {f} is not a block start"),
                    ));
                }
                for (bi, b) in l.heads[hi].iter().enumerate().skip((f - l.start) / bs) {
                    let pos = l.start + bi * bs;
                    let (Mem::Pinned(k), Mem::Pinned(v)) = (&b.k, &b.v) else {
                        return Err(Error::value(
                            "host_share",
                            format!("kv head {hi} has a device block at {pos}, after {f}"),
                        ));
                    };
                    let n = bs.min(l.len - pos);
                    runs.push((pos, k.host_ptr() as *const E, v.host_ptr() as *const E, n));
                }
            }
            heads.push(runs);
        }
        let raw = crate::cuda::share::RawKv {
            heads,
            head_dim: d,
            len: l.len,
            from: from.iter().map(|&f| f.min(l.len)).collect(),
        };
        let rows = num_q_heads / h * from.len();
        // SAFETY: forwarded from the caller.
        let pending = unsafe {
            self.attend_cuda_partial(layer, query, num_q_heads, q_len, params, from, stream)?
        };
        let layers = self.cfg.num_layers;
        let c = self.cuda.as_mut().expect("checked by attend_cuda_partial");
        if c.share.is_none() {
            c.share = Some(crate::cuda::share::ShareState::new(&c.gpu, layers)?);
        }
        let share = c.share.as_mut().expect("set above");
        let queued = share.check().and_then(|()| {
            // SAFETY: the query rows of the CPU heads come first and are contiguous (checked);
            // `raw` addresses pinned blocks of this store, which nothing frees or rewrites
            // before the stream has passed the worker's host function.
            unsafe { share.run::<E>(&c.gpu, layer, query.ptr, rows, raw, *params, stream) }
        });
        let extra = match queued {
            Ok((o, lse)) => Some((o, lse, rows)),
            Err(e) => {
                // SAFETY: finishing the launched half frees its workspace; then report.
                unsafe { c.kernels.attend_merge(stream, pending, None, out)? };
                return Err(e);
            }
        };
        // SAFETY: forwarded; the extra rows live in the share state's buffers.
        unsafe { c.kernels.attend_merge(stream, pending, extra, out) }
    }

    /// The GPU's part of a shared decode: as `attend_cuda`, skipping the keys of kv heads
    /// `0..from.len()` from `from[h]` on; `Kernels::attend_merge` finishes it.
    ///
    /// # Safety
    /// As for `append_cuda`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn attend_cuda_partial(
        &self,
        layer: usize,
        query: DevTensor,
        num_q_heads: usize,
        q_len: usize,
        params: &crate::cpu::attention::Params,
        from: &[usize],
        stream: Stream,
    ) -> Result<Pending> {
        let l = self.layer(layer)?;
        let c = self.cuda_state("query")?;
        let h = self.cfg.num_kv_heads;
        let args = attn_args(num_q_heads, q_len, h, l.len, l.start, params)?;
        if from.len() > MAX_CPU_HEADS || from.len() > h {
            return Err(Error::value("host_share", "has more entries than kv heads"));
        }
        let mut share = CpuShare::NONE;
        share.heads = from.len() as i32;
        for (s, &f) in share.from.iter_mut().zip(from) {
            *s = f as i64;
        }
        c.gpu.bind()?;
        let src = c.layer_src(h, layer, self.cfg.block_size);
        // SAFETY: the caller vouches for `query`; the table covers `start..len`.
        unsafe { c.kernels.attend_partial(stream, query, src, &args, &share) }
    }

    /// Copies positions `a..b` of kv heads `h0..h0 + heads` of `layer` into device tensors
    /// `key_out`, `value_out` (`[heads, b - a, head_dim]`, rows contiguous).
    ///
    /// # Safety
    /// As for `append_cuda`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_cuda(
        &self,
        layer: usize,
        h0: usize,
        heads: usize,
        a: usize,
        b: usize,
        key_out: DevTensor,
        value_out: DevTensor,
        stream: Stream,
    ) -> Result<()> {
        let l = self.layer(layer)?;
        let c = self.cuda_state("key_out")?;
        let h = self.cfg.num_kv_heads;
        if h0 + heads > h {
            return Err(Error::value(
                "heads",
                format!("kv heads {h0}..{} are out of range for {h}", h0 + heads),
            ));
        }
        if a > b || b > l.len || a < l.start {
            return Err(Error::value(
                "end",
                format!(
                    "range {a}..{b} is outside the positions {}..{} held for layer {layer}",
                    l.start, l.len
                ),
            ));
        }
        c.gpu.bind()?;
        let d = self.cfg.head_dim;
        if key_out.s1 == d as i64 && value_out.s1 == d as i64 {
            // Rows contiguous in the output: one copy-engine transfer per block run, so the
            // copy needs no SMs and overlaps the attention kernels of a previous unit.
            let bs = self.cfg.block_size;
            let row = d * self.cfg.dtype.size();
            for hi in 0..heads {
                let blocks = &l.heads[h0 + hi];
                let mut pos = a;
                while pos < b {
                    let rel = pos - l.start;
                    let (bi, off) = (rel / bs, rel % bs);
                    let n = (bs - off).min(b - pos);
                    let blk = &blocks[bi];
                    let dst_off = (hi as i64 * key_out.s0 + (pos - a) as i64 * key_out.s1) as u64
                        * self.cfg.dtype.size() as u64;
                    for (src, dst) in [
                        (blk.k.dev_ptr(), key_out.ptr),
                        (blk.v.dev_ptr(), value_out.ptr),
                    ] {
                        // SAFETY: source rows `off..off + n` lie in the block; the destination
                        // rows lie in the caller's validated output; both are device-addressable
                        // (device memory or mapped pinned memory) and the copy is stream-ordered.
                        unsafe {
                            cudarc::driver::sys::cuMemcpyAsync(
                                dst + dst_off,
                                src + (off * row) as u64,
                                n * row,
                                stream.0,
                            )
                        }
                        .result()
                        .map_err(|e| crate::cuda::driver_err("copying KV blocks", e))?;
                    }
                    pos += n;
                }
            }
            return Ok(());
        }
        // SAFETY: the caller vouches for the outputs; the table covers `start..len`.
        unsafe {
            c.kernels.gather(
                stream,
                c.layer_table(h, layer),
                c.max_blocks,
                self.cfg.block_size,
                h0,
                heads,
                a,
                b - a,
                key_out,
                value_out,
            )
        }
    }
}

/// Validates one attention launch and works out the first key any query reads.
pub fn attn_args(
    num_q_heads: usize,
    q_len: usize,
    num_kv_heads: usize,
    len: usize,
    start: usize,
    params: &crate::cpu::attention::Params,
) -> Result<AttnArgs> {
    crate::cpu::attention::check_shapes(num_q_heads, q_len, num_kv_heads, len, start, params)?;
    let first = len - q_len;
    let lo = params
        .window
        .map_or(0, |w| (first + 1).saturating_sub(w))
        .max(start);
    Ok(AttnArgs {
        q_len,
        seq_len: len,
        lo,
        group: num_q_heads / num_kv_heads,
        num_kv_heads,
        scale: params.scale,
        softcap: params.softcap,
        window: params.window,
    })
}

impl Drop for KvStore {
    fn drop(&mut self) {
        if let Some(c) = &self.cuda {
            // Kernels in flight may still read blocks and the table: let them finish before
            // anything goes back to the pool.
            let _ = c.gpu.synchronize();
        }
        for l in &mut self.layers {
            for blocks in &mut l.heads {
                blocks.drain(..).for_each(Block::release);
            }
        }
        self.free.drain(..).for_each(Block::release);
        if let Some(c) = self.cuda.take() {
            c.free_device.into_iter().for_each(Block::release);
            c.table.give_back();
        }
    }
}

/// One layer of the store, as the attention op reads it.
pub struct LayerKv<'a, E> {
    layer: &'a Layer,
    block_size: usize,
    head_dim: usize,
    _e: std::marker::PhantomData<E>,
}

impl<'a, E: Element> KvSource<E> for LayerKv<'a, E> {
    fn num_kv_heads(&self) -> usize {
        self.layer.heads.len()
    }
    fn head_dim(&self) -> usize {
        self.head_dim
    }
    fn len(&self) -> usize {
        self.layer.len
    }
    fn start(&self) -> usize {
        self.layer.start
    }
    fn segments(&self, head: usize, a: usize, b: usize) -> Vec<Segment<'_, E>> {
        let layer: &'a Layer = self.layer;
        let (bs, d) = (self.block_size, self.head_dim);
        let a = a.max(self.layer.start);
        let b = b.min(self.layer.len);
        let mut out = Vec::new();
        let mut pos = a;
        while pos < b {
            let rel = pos - self.layer.start;
            let (bi, off) = (rel / bs, rel % bs);
            let n = (bs - off).min(b - pos);
            let blk = &layer.heads[head][bi];
            let rows = |buf: &'a Mem| Rows {
                data: &buf.host_slice::<E>().expect("host block")[off * d..(off + n) * d],
                stride: d,
                len: n,
                width: d,
            };
            out.push(Segment {
                pos,
                k: rows(&blk.k),
                v: rows(&blk.v),
            });
            pos += n;
        }
        out
    }
}

#[cfg(test)]
#[path = "../tests/rust/store.rs"]
mod tests;
