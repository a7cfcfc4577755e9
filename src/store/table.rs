//! Which block holds which tokens: per (layer, kv head), blocks in position order; and, for a
//! CUDA store, the same table as block addresses in mapped pinned memory, where the kernels
//! read it.

use super::pool::{Block, Placement};
use crate::cuda::memory::PinnedBuf;
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use std::collections::VecDeque;

/// One layer's blocks. Positions are absolute: the layer holds `start..len`, where `start` is
/// a multiple of the block size and moves past 0 only on sliding-window layers.
pub struct Layer {
    /// Tokens appended so far: the next position.
    pub len: usize,
    /// Position of row 0 of the first block of every head.
    pub start: usize,
    /// Per kv head, its blocks in position order.
    pub heads: Vec<VecDeque<Block>>,
}

impl Layer {
    pub fn new(num_kv_heads: usize) -> Self {
        Layer {
            len: 0,
            start: 0,
            heads: (0..num_kv_heads).map(|_| VecDeque::new()).collect(),
        }
    }

    /// Blocks every head holds (the same for all heads).
    pub fn blocks_per_head(&self) -> usize {
        self.heads.first().map_or(0, |h| h.len())
    }

    /// Per head, per block, where it is: the residency planner's input.
    pub fn placements(&self) -> Vec<Vec<Placement>> {
        self.heads
            .iter()
            .map(|h| h.iter().map(Block::placement).collect())
            .collect()
    }
}

/// One block's share of a range of positions: `rows` positions from `pos`, which are rows
/// `off..off + rows` of a head's block `block` (its index in the head's blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub pos: usize,
    pub block: usize,
    pub off: usize,
    pub rows: usize,
}

/// Positions `a..b` of a layer whose blocks of `block_size` tokens start at position `start`
/// (`start <= a`), cut at the blocks' boundaries, in position order.
pub fn runs(start: usize, block_size: usize, a: usize, b: usize) -> impl Iterator<Item = Run> {
    debug_assert!(start <= a && block_size > 0);
    let mut pos = a;
    std::iter::from_fn(move || {
        if pos >= b {
            return None;
        }
        let rel = pos - start;
        let (block, off) = (rel / block_size, rel % block_size);
        let rows = (block_size - off).min(b - pos);
        let run = Run {
            pos,
            block,
            off,
            rows,
        };
        pos += rows;
        Some(run)
    })
}

/// `[layers][heads][max_blocks][2]` block addresses (keys, values) in mapped pinned memory,
/// indexed by absolute block number: the CPU writes an entry before queueing the kernels that
/// read it; an entry is only rewritten after every kernel that read the old one has finished.
pub struct DeviceTable {
    buf: PinnedBuf,
    heads: usize,
    pub max_blocks: usize,
}

impl DeviceTable {
    pub fn new(gpu: &Gpu, layers: usize, heads: usize, max_blocks: usize) -> Result<Self> {
        let bytes = layers
            .checked_mul(heads)
            .and_then(|n| n.checked_mul(max_blocks))
            .and_then(|n| n.checked_mul(16))
            .ok_or_else(|| Error::value("max_len", "the block table's size overflows"))?;
        let buf = PinnedBuf::take(gpu, bytes)?;
        // SAFETY: `bytes` of pinned memory owned here; zero means "no block".
        unsafe { std::ptr::write_bytes(buf.host_ptr(), 0, bytes) };
        Ok(DeviceTable {
            buf,
            heads,
            max_blocks,
        })
    }

    /// Points entry (`layer`, `head`, absolute block `abs`) at `block`.
    pub fn set(&mut self, layer: usize, head: usize, abs: usize, block: &Block) {
        let i = ((layer * self.heads + head) * self.max_blocks + abs) * 2;
        let n = self.buf.len() / 8;
        assert!(i + 2 <= n, "block table entry out of range");
        // SAFETY: the table is `n` u64 entries of pinned memory owned by this table; `&mut
        // self` makes the CPU side's access exclusive, and `i + 2 <= n` (checked).
        let all = unsafe { std::slice::from_raw_parts_mut(self.buf.host_ptr() as *mut u64, n) };
        // A host block's key address carries `HOST_BIT`, so a kernel can leave host blocks to
        // another reader (the copy engine, the CPU) without a second table.
        let host = match block.placement() {
            Placement::Host => crate::cuda::kernels::HOST_BIT,
            Placement::Device => 0,
        };
        all[i] = block.k.dev_ptr() | host;
        all[i + 1] = block.v.dev_ptr();
    }

    /// The device address of `layer`'s part of the table.
    pub fn layer_addr(&self, layer: usize) -> u64 {
        self.buf.dev_ptr() + (layer * self.heads * self.max_blocks * 2 * 8) as u64
    }
}

impl Drop for DeviceTable {
    fn drop(&mut self) {
        let buf = std::mem::replace(&mut self.buf, PinnedBuf::empty());
        buf.give_back();
    }
}
