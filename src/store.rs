//! The head-wise KV store: per (layer, kv head), keys and values in fixed-size blocks of
//! host memory, so what is stored is never copied again as the sequence grows.
//!
//! Positions are absolute: layer `l` holds positions `start..len`, where `start` is a
//! multiple of the block size and only moves past 0 on sliding-window layers, which drop
//! whole blocks their window no longer reaches. Freed blocks go to a pool and are reused.

use crate::cpu::attention::{KvSource, Segment};
use crate::error::{Error, Result};
use crate::host::{self, HostBuf};
use crate::tensor::{DType, Element, Rows, View3};
use std::collections::VecDeque;

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
}

impl StoreConfig {
    fn validate(&self) -> Result<()> {
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

/// Keys and values of `block_size` tokens of one head: each `[block_size, head_dim]`.
struct Block {
    k: HostBuf,
    v: HostBuf,
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
    /// Blocks no layer uses, kept for reuse.
    free: Vec<Block>,
    /// Blocks allocated in all, in use or free.
    allocated: usize,
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
        Ok(KvStore {
            cfg,
            layers,
            free: Vec::new(),
            allocated: 0,
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

        // Plan: which blocks the window lets go, how many new ones the chunk needs.
        let bs = self.cfg.block_size;
        let (len, start, have) = {
            let l = &self.layers[layer];
            (l.len, l.start, l.blocks_per_head())
        };
        let new_start = self.window_start(layer, len);
        let dropped = ((new_start - start) / bs).min(have);
        let need = (len + chunk - new_start).div_ceil(bs);
        let grow = need - (have - dropped);
        let reusable = self.free.len() + dropped * h;
        let fresh = (grow * h).saturating_sub(reusable);
        self.check_host_memory(fresh, "appending to the KV cache")?;

        // Commit: nothing below can fail except allocation, which was checked above.
        let mut fresh_blocks = Vec::with_capacity(fresh);
        for _ in 0..fresh {
            fresh_blocks.push(self.alloc_block()?);
        }
        self.allocated += fresh;
        self.free.extend(fresh_blocks);
        let l = &mut self.layers[layer];
        for blocks in &mut l.heads {
            for _ in 0..dropped {
                self.free.push(blocks.pop_front().expect("counted above"));
            }
            for _ in 0..grow {
                blocks.push_back(self.free.pop().expect("reserved above"));
            }
        }
        l.start += dropped * bs;
        for (hi, blocks) in l.heads.iter_mut().enumerate() {
            let (krows, vrows) = (key.rows(hi), value.rows(hi));
            for i in 0..chunk {
                let rel = len + i - l.start;
                let b = &mut blocks[rel / bs];
                let off = (rel % bs) * d;
                b.k.as_mut_slice::<E>()[off..off + d].copy_from_slice(krows.row(i));
                b.v.as_mut_slice::<E>()[off..off + d].copy_from_slice(vrows.row(i));
            }
        }
        l.len += chunk;
        Ok(())
    }

    fn alloc_block(&self) -> Result<Block> {
        let n = self.cfg.block_bytes();
        Ok(Block {
            k: HostBuf::new(n)?,
            v: HostBuf::new(n)?,
        })
    }

    /// Errors unless `blocks` more blocks fit both the store's limit and the host.
    fn check_host_memory(&self, blocks: usize, what: &str) -> Result<()> {
        if blocks == 0 {
            return Ok(());
        }
        let needed = blocks * 2 * self.cfg.block_bytes();
        let mut available = host::available_bytes().unwrap_or(usize::MAX);
        if let Some(limit) = self.cfg.host_memory_limit {
            available = available.min(limit.saturating_sub(self.bytes_reserved()));
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
        let bs = self.cfg.block_size;
        for l in &mut self.layers {
            if length >= l.len {
                continue;
            }
            let keep = (length - l.start).div_ceil(bs);
            for blocks in &mut l.heads {
                while blocks.len() > keep {
                    self.free.push(blocks.pop_back().expect("len > keep"));
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
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            for blocks in &mut l.heads {
                self.free.extend(blocks.drain(..));
            }
            l.len = 0;
            l.start = 0;
        }
    }

    /// Bytes of keys and values of the positions held (`start..len` of every layer).
    pub fn bytes_used(&self) -> usize {
        let per_token = 2 * self.cfg.num_kv_heads * self.cfg.head_dim * self.cfg.dtype.size();
        self.layers
            .iter()
            .map(|l| (l.len - l.start) * per_token)
            .sum()
    }

    /// Bytes of host memory held in blocks, in use or free for reuse.
    pub fn bytes_reserved(&self) -> usize {
        self.allocated * 2 * self.cfg.block_bytes()
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
            let rows = |buf: &'a HostBuf| Rows {
                data: &buf.as_slice::<E>()[off * d..(off + n) * d],
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
