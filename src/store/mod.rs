//! The head-wise KV store: per (layer, kv head), keys and values in fixed-size blocks, so what
//! is stored is never copied again as the sequence grows.
//!
//! - `config`: the store's shape; `pool`: block memory behind one pool type (heap, pinned,
//!   device allocators); `table`: which block holds which tokens; `residency`: the pure
//!   planner of block moves; `accounting`: bytes used and reserved, and the host memory check;
//!   `view`: read-only views of a layer, which `attention` reads; `placement`: where a
//!   layer's keys sit at one step (device or host tokens per head), what the share policy
//!   decides on; `cuda`: a CUDA store's data paths (append, gather, rebalance).
//!
//! One `KvStore<B>` holds the logic every store shares; its backend `B` (`Cpu` or `Cuda`) is
//! where they differ: the pools it was given, the device copy of the table, and how to wait
//! for in-flight readers before blocks are reused.
//!
//! Positions are absolute: layer `l` holds positions `start..len`, where `start` is a
//! multiple of the block size and only moves past 0 on sliding-window layers, which drop
//! whole blocks their window no longer reaches. Freed blocks go back to their pool, except
//! within a step (`checkpoint`), which keeps them until `commit` or puts them back on
//! `rollback`.

mod accounting;
mod checkpoint;
pub mod config;
mod cuda;
pub mod placement;
pub mod pool;
pub mod residency;
pub mod staging;
pub mod table;
pub mod view;

pub use config::{CudaConfig, StoreConfig};
pub use cuda::{
    piece_copies, stage_piece, Cuda, DecodeParts, STAGING_BUFFERS, STAGING_PIECE_BYTES,
};
pub use placement::{HeadPlacement, LayerPlacement};
pub use view::{DeviceLayer, HostLayer, KvRows, KvSource, Segment};

use crate::error::{Error, Result};
use crate::tensor::{Element, View3};
use pool::{Block, BlockPool, HeapAlloc, NoDevice, Placement};
use table::Layer;

/// What differs between a CPU and a CUDA store, beyond their pools.
pub trait Backend: Send + Sync + 'static {
    /// The tensors the store holds, for messages: "CPU" or "CUDA".
    const KIND: &'static str;
    /// Records that `block` now holds absolute block `abs` of (`layer`, `head`).
    fn place(&mut self, layer: usize, head: usize, abs: usize, block: &Block);
    /// Waits until nothing in flight (kernels, host tasks) reads any block, before blocks are
    /// freed or reused.
    fn quiesce(&self) -> Result<()>;
    /// Longest sequence the store can hold, if bounded.
    fn max_len(&self) -> Option<usize>;
    /// Host memory that blocks of `block_bytes` can take without new allocations, from
    /// memory the process holds for reuse, after letting go of what blocks of that size
    /// cannot use (called only where the host's free memory falls short).
    fn reclaim_host(&self, _block_bytes: usize) -> usize {
        0
    }
}

/// A CPU store's backend: nothing beyond its heap pool.
pub struct Cpu;

impl Backend for Cpu {
    const KIND: &'static str = "CPU";
    fn place(&mut self, _layer: usize, _head: usize, _abs: usize, _block: &Block) {}
    fn quiesce(&self) -> Result<()> {
        Ok(())
    }
    fn max_len(&self) -> Option<usize> {
        None
    }
}

/// The KV cache of one model.
pub struct KvStore<B: Backend> {
    cfg: StoreConfig,
    layers: Vec<Layer>,
    host: BlockPool,
    device: BlockPool,
    backend: B,
    /// The open step, if any: what `rollback` restores.
    step: Option<checkpoint::Checkpoint>,
}

/// A store of CPU tensors, in heap memory.
pub type CpuStore = KvStore<Cpu>;
/// A store of CUDA tensors: device memory up to a budget, pinned host memory beyond.
pub type CudaStore = KvStore<Cuda>;

impl CpuStore {
    /// An empty CPU store; takes no memory until the first append.
    pub fn new(cfg: StoreConfig) -> Result<Self> {
        cfg.validate(None)?;
        let n = cfg.block_bytes();
        KvStore::assemble(
            cfg,
            BlockPool::new(Box::new(HeapAlloc), n, usize::MAX),
            BlockPool::new(Box::new(NoDevice), n, 0),
            Cpu,
        )
    }
}

impl<B: Backend> KvStore<B> {
    fn assemble(cfg: StoreConfig, host: BlockPool, device: BlockPool, backend: B) -> Result<Self> {
        let layers = (0..cfg.num_layers)
            .map(|_| Layer::new(cfg.num_kv_heads))
            .collect();
        Ok(KvStore {
            cfg,
            layers,
            host,
            device,
            backend,
            step: None,
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

    /// Checks an appended chunk: dtype and shape `[num_kv_heads, chunk, head_dim]`.
    fn check_chunk(
        &self,
        layer: usize,
        dtype: crate::tensor::DType,
        key: [usize; 3],
        value: [usize; 3],
    ) -> Result<usize> {
        self.layer(layer)?;
        if dtype != self.cfg.dtype {
            return Err(Error::type_(
                "key",
                format!(
                    "dtype is {}, the store holds {}",
                    dtype.name(),
                    self.cfg.dtype.name()
                ),
            ));
        }
        let (h, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let chunk = key[1];
        for (arg, shape) in [("key", key), ("value", value)] {
            if shape != [h, chunk, d] {
                return Err(Error::value(
                    arg,
                    format!(
                        "expected shape [num_kv_heads, chunk_len, head_dim] = [{h}, {chunk}, {d}], got {shape:?}",
                    ),
                ));
            }
        }
        Ok(chunk)
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

    fn pool(&mut self, p: Placement) -> &mut BlockPool {
        match p {
            Placement::Host => &mut self.host,
            Placement::Device => &mut self.device,
        }
    }

    /// Makes room for `chunk` more tokens of `layer`: lets go of the blocks its window no
    /// longer needs and places the new ones (device while its pool has room, then host).
    /// Checks host memory first; on error the layer holds the same tokens as before. The
    /// caller writes the tokens and advances `len`.
    fn reserve(&mut self, layer: usize, chunk: usize) -> Result<()> {
        let h = self.cfg.num_kv_heads;
        let bs = self.cfg.block_size;
        let (len, start, have) = {
            let l = &self.layers[layer];
            (l.len, l.start, l.blocks_per_head())
        };
        let end = len
            .checked_add(chunk)
            .ok_or_else(|| Error::value("key", "the sequence length overflows"))?;
        if let Some(max) = self.backend.max_len() {
            if end > max {
                return Err(Error::value(
                    "key",
                    format!("{end} tokens exceed the store's max_len of {max}"),
                ));
            }
        }
        let new_start = self.window_start(layer, len);
        let dropped = ((new_start - start) / bs).min(have);
        // Within a step, the dropped blocks that hold positions from before it are kept aside
        // for a rollback (the first `kept`; they are not reused).
        let kept = self.step.as_ref().map_or(0, |s| {
            s.len(layer)
                .div_ceil(bs)
                .saturating_sub(start / bs)
                .min(dropped)
        });
        let need = (end - new_start).div_ceil(bs);
        let grow = need - (have - dropped);
        let (_, host_wanted) = residency::place_new(grow * h, self.device.room());
        let dropped_host = self.layers[layer]
            .heads
            .iter()
            .flat_map(|b| b.iter().take(dropped).skip(kept))
            .filter(|b| b.placement() == Placement::Host)
            .count();
        let fresh_host = host_wanted.saturating_sub(self.host.free_len() + dropped_host);
        self.check_host_memory(fresh_host, "appending to the KV cache")?;

        // Blocks the window no longer needs go back to their pools first, so they are reused.
        // Dropping them is right whatever follows: no later query reaches them.
        for hi in 0..h {
            for i in 0..dropped {
                let b = self.layers[layer].heads[hi]
                    .pop_front()
                    .expect("counted above");
                match &mut self.step {
                    Some(step) if i < kept => step.keep(layer, hi, b),
                    _ => self.pool(b.placement()).give(b),
                }
            }
        }
        self.layers[layer].start += dropped * bs;
        // Take every new block before placing any, so a failure leaves the heads alike.
        let mut new = Vec::with_capacity(grow * h);
        for _ in 0..grow * h {
            let taken = if self.device.room() > 0 {
                self.device.take()
            } else {
                self.host.take()
            };
            match taken {
                Ok(b) => new.push(b),
                Err(e) => {
                    for b in new {
                        self.pool(b.placement()).give(b);
                    }
                    return Err(e);
                }
            }
        }
        let first_new = self.layers[layer].start / bs + have - dropped;
        let mut new = new.into_iter();
        for hi in 0..h {
            for gi in 0..grow {
                let b = new.next().expect("taken above");
                self.backend.place(layer, hi, first_new + gi, &b);
                self.layers[layer].heads[hi].push_back(b);
            }
        }
        Ok(())
    }

    /// Drops every position `>= length` in every layer (a no-op where a layer is shorter).
    ///
    /// Fails, changing nothing, if a sliding-window layer already dropped tokens that
    /// queries from `length` on would need (`crop(0)` always works: nothing is needed).
    ///
    /// Within a step (`checkpoint`), a crop that cuts a layer below its length at the
    /// checkpoint, or empties a layer that held tokens then, ends the step as `commit` would
    /// (a later `rollback` raises); a crop of what the step appended keeps it open.
    pub fn crop(&mut self, length: usize) -> Result<()> {
        for (i, l) in self.layers.iter().enumerate() {
            if length >= l.len {
                continue;
            }
            let need = match self.cfg.windows[i] {
                Some(w) => (length + 1).saturating_sub(w),
                None => 0,
            };
            if l.start > need && length > 0 {
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
        // Freed blocks get new table entries on reuse: no reader may still use the old.
        self.backend.quiesce()?;
        let bs = self.cfg.block_size;
        // Blocks the layer keeps; 0 also when `length` is below a window's retained start.
        let keep = |l: &Layer| length.saturating_sub(l.start).div_ceil(bs);
        let ends_step = self.step.as_ref().is_some_and(|step| {
            self.layers.iter().enumerate().any(|(li, l)| {
                length < l.len && (length < step.len(li) || (keep(l) == 0 && step.len(li) > 0))
            })
        });
        if ends_step {
            self.commit();
        }
        for li in 0..self.layers.len() {
            let l = &mut self.layers[li];
            if length >= l.len {
                continue;
            }
            let keep = keep(l);
            let mut freed = Vec::new();
            for blocks in &mut l.heads {
                while blocks.len() > keep {
                    freed.push(blocks.pop_back().expect("len > keep"));
                }
            }
            l.len = length;
            if keep == 0 {
                // Nothing below `length` is held: the retained positions start there. (It
                // was 0, which claimed positions `0..length` with no blocks behind them: a
                // window of 1 cropped to its retained start, then read or appended to,
                // indexed past the layer's blocks.)
                l.start = length;
            }
            for b in freed {
                self.pool(b.placement()).give(b);
            }
        }
        Ok(())
    }

    /// Drops every token; blocks stay reserved for reuse. Ends an open step as `commit` would.
    pub fn clear(&mut self) -> Result<()> {
        self.backend.quiesce()?;
        self.commit();
        for li in 0..self.layers.len() {
            let l = &mut self.layers[li];
            let freed: Vec<Block> = l.heads.iter_mut().flat_map(|b| b.drain(..)).collect();
            l.len = 0;
            l.start = 0;
            for b in freed {
                self.pool(b.placement()).give(b);
            }
        }
        Ok(())
    }
}

impl CpuStore {
    /// Appends `key` and `value`, each `[num_kv_heads, chunk_len, head_dim]`, to `layer`.
    ///
    /// The host memory the chunk needs is checked before any is taken; on error the store
    /// holds the same tokens as before.
    pub fn append<E: Element>(
        &mut self,
        layer: usize,
        key: View3<'_, E>,
        value: View3<'_, E>,
    ) -> Result<()> {
        let chunk = self.check_chunk(layer, E::DTYPE, key.shape, value.shape)?;
        if chunk == 0 {
            return Ok(());
        }
        let len = self.layers[layer].len;
        self.reserve(layer, chunk)?;
        let d = self.cfg.head_dim;
        let bs = self.cfg.block_size;
        let q8 = self.cfg.q8();
        let l = &mut self.layers[layer];
        for (hi, blocks) in l.heads.iter_mut().enumerate() {
            let (krows, vrows) = (key.rows(hi), value.rows(hi));
            for i in 0..chunk {
                let rel = len + i - l.start;
                let b = &mut blocks[rel / bs];
                let row = rel % bs;
                for (m, src) in [(&mut b.k, krows.row(i)), (&mut b.v, vrows.row(i))] {
                    let buf = m.heap_mut().expect("a CPU store's blocks are heap memory");
                    match q8 {
                        Some(fmt) => {
                            let rb = fmt.row_bytes();
                            fmt.quantize(src, &mut buf.as_bytes_mut()[row * rb..(row + 1) * rb]);
                        }
                        None => {
                            buf.as_mut_slice::<E>()[row * d..(row + 1) * d].copy_from_slice(src)
                        }
                    }
                }
            }
        }
        l.len += chunk;
        Ok(())
    }

    /// Positions `a..b` of `layer` as `[num_kv_heads, b - a, head_dim]`, one call per row:
    /// `f(head, i, key_row, value_row)`, in f32 (an int8 store's rows dequantized).
    pub fn read<E: Element>(
        &self,
        layer: usize,
        a: usize,
        b: usize,
        mut f: impl FnMut(usize, usize, &[f32], &[f32]),
    ) -> Result<()> {
        let kv = self.view::<E>(layer)?;
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
        let d = self.cfg.head_dim;
        let (mut kr, mut vr) = (vec![0f32; d], vec![0f32; d]);
        for h in 0..self.cfg.num_kv_heads {
            for seg in kv.segments(h, a, b) {
                for i in 0..seg.len() {
                    seg.k.row_f32(i, &mut kr);
                    seg.v.row_f32(i, &mut vr);
                    f(h, seg.pos + i - a, &kr, &vr);
                }
            }
        }
        Ok(())
    }

    /// A read-only view of `layer` for the attention op.
    pub fn view<E: Element>(&self, layer: usize) -> Result<HostLayer<'_, E>> {
        let l = self.layer(layer)?;
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
        Ok(HostLayer {
            layer: l,
            block_size: self.cfg.block_size,
            head_dim: self.cfg.head_dim,
            q8: self.cfg.q8(),
            _e: std::marker::PhantomData,
        })
    }
}

impl<B: Backend> Drop for KvStore<B> {
    fn drop(&mut self) {
        // Kernels and host tasks in flight may still read blocks: let them finish before
        // anything goes back to a pool.
        let _ = self.backend.quiesce();
        self.commit();
        for li in 0..self.layers.len() {
            let blocks: Vec<Block> = self.layers[li]
                .heads
                .iter_mut()
                .flat_map(|b| b.drain(..))
                .collect();
            for b in blocks {
                self.pool(b.placement()).give(b);
            }
        }
        self.host.release_free();
        self.device.release_free();
    }
}

#[cfg(test)]
#[path = "../../tests/rust/store/mod.rs"]
mod tests;
