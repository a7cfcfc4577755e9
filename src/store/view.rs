//! Read-only views of one layer's blocks: what attention reads.
//!
//! `KvSource` is the CPU kernel's input (a store's layer, explicit tensors, or the host share
//! of a layer); `HostLayer` is a CPU store's layer; `DeviceLayer` is a CUDA store's layer as
//! the GPU kernels and the CPU share read it.

use super::placement::{HeadPlacement, LayerPlacement};
use super::pool::{Mem, Placement};
use super::residency;
use super::staging::Span;
use super::table::{runs, Layer};
use crate::cuda::kernels::KvSrc;
use crate::quant::{Q8Rows, Q8};
use crate::tensor::{Element, Rows};

/// Consecutive key (or value) rows of one head: as given, or in the int8 format.
#[derive(Clone, Copy)]
pub enum KvRows<'a, E> {
    /// `[n, head_dim]` elements.
    Plain(Rows<'a, E>),
    /// `[n, row_bytes]` bytes of the int8 format.
    Int8(Q8Rows<'a>),
}

impl<'a, E: Element> KvRows<'a, E> {
    /// Rows held.
    pub fn len(&self) -> usize {
        match self {
            KvRows::Plain(r) => r.len,
            KvRows::Int8(r) => r.len,
        }
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `a..b`.
    pub fn slice(&self, a: usize, b: usize) -> KvRows<'a, E> {
        match self {
            KvRows::Plain(r) => KvRows::Plain(r.slice(a, b)),
            KvRows::Int8(r) => KvRows::Int8(r.slice(a, b)),
        }
    }

    /// Row `i` as f32 into `out` (`[head_dim]`): converted, or dequantized.
    pub fn row_f32(&self, i: usize, out: &mut [f32]) {
        match self {
            KvRows::Plain(r) => {
                for (y, &x) in out.iter_mut().zip(r.row(i)) {
                    *y = x.to_f32();
                }
            }
            KvRows::Int8(r) => r.fmt.dequantize(r.row(i), out),
        }
    }

    /// `n` rows of `head_dim` from `p`, in `q8`'s format where given, else elements of `E`.
    ///
    /// # Safety
    /// `p` addresses `n` rows of that layout in memory that stays alive and unwritten for `'a`.
    pub unsafe fn from_raw(p: *const u8, n: usize, head_dim: usize, q8: Option<Q8>) -> Self {
        match q8 {
            // SAFETY: by the contract.
            Some(fmt) => KvRows::Int8(Q8Rows {
                data: unsafe { std::slice::from_raw_parts(p, n * fmt.row_bytes()) },
                len: n,
                fmt,
            }),
            // SAFETY: by the contract.
            None => KvRows::Plain(Rows {
                data: unsafe { std::slice::from_raw_parts(p as *const E, n * head_dim) },
                stride: head_dim,
                len: n,
                width: head_dim,
            }),
        }
    }
}

/// Consecutive keys and values of one head, from position `pos` on.
pub struct Segment<'a, E> {
    pub pos: usize,
    /// `[n, head_dim]`
    pub k: KvRows<'a, E>,
    /// `[n, head_dim]`
    pub v: KvRows<'a, E>,
}

impl<E: Element> Segment<'_, E> {
    /// Positions held: `pos..pos + len()`.
    pub fn len(&self) -> usize {
        self.k.len()
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.k.len() == 0
    }
}

/// Where the keys and values of one layer come from: the store, or explicit tensors.
pub trait KvSource<E: Element>: Sync {
    fn num_kv_heads(&self) -> usize;
    fn head_dim(&self) -> usize;
    /// One past the last position held.
    fn len(&self) -> usize;
    /// Whether no position was ever appended.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The first position held.
    fn start(&self) -> usize;
    /// The first position of `head` this source reads (a share of the keys may start later).
    fn head_start(&self, _head: usize) -> usize {
        self.start()
    }
    /// The keys and values of `head` at positions `a..b` (clamped to what is held).
    fn segments(&self, head: usize, a: usize, b: usize) -> Vec<Segment<'_, E>>;
    /// The first of `segments(head, a, b)`, if any (never an empty one): the attention
    /// kernel walks a range with it, so that a decode step allocates nothing. Sources
    /// override this default, which allocates.
    fn next_segment(&self, head: usize, a: usize, b: usize) -> Option<Segment<'_, E>> {
        self.segments(head, a, b)
            .into_iter()
            .find(|s| !s.is_empty())
    }
}

/// A CPU store's layer (every block in heap memory).
pub struct HostLayer<'a, E> {
    pub(super) layer: &'a Layer,
    pub(super) block_size: usize,
    pub(super) head_dim: usize,
    /// The int8 layout, for an int8 store.
    pub(super) q8: Option<Q8>,
    pub(super) _e: std::marker::PhantomData<E>,
}

impl<'a, E: Element> KvSource<E> for HostLayer<'a, E> {
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
        let mut out = Vec::new();
        let mut pos = a;
        while let Some(seg) = self.next_segment(head, pos, b) {
            pos = seg.pos + seg.len();
            out.push(seg);
        }
        out
    }
    fn next_segment(&self, head: usize, a: usize, b: usize) -> Option<Segment<'_, E>> {
        let layer: &'a Layer = self.layer;
        let (bs, d) = (self.block_size, self.head_dim);
        let pos = a.max(layer.start);
        let run = runs(layer.start, bs, pos, b.min(layer.len)).next()?;
        let (off, n) = (run.off, run.rows);
        let blk = &layer.heads[head][run.block];
        let q8 = self.q8;
        let rows = |m: &'a Mem| {
            let buf = m.heap().expect("a CPU store's blocks are heap memory");
            match q8 {
                Some(fmt) => {
                    let rb = fmt.row_bytes();
                    KvRows::Int8(Q8Rows {
                        data: &buf.as_bytes()[off * rb..(off + n) * rb],
                        len: n,
                        fmt,
                    })
                }
                None => KvRows::Plain(Rows {
                    data: &buf.as_slice::<E>()[off * d..(off + n) * d],
                    stride: d,
                    len: n,
                    width: d,
                }),
            }
        };
        Some(Segment {
            pos,
            k: rows(&blk.k),
            v: rows(&blk.v),
        })
    }
}

/// A host block's keys to stage (`span`), and the block's key and value rows' device addresses
/// (mapped pinned memory; the span's rows start `span.row` rows in).
#[derive(Clone, Copy, Debug)]
pub struct StagedSpan {
    pub span: Span,
    pub k: u64,
    pub v: u64,
    /// The allocations the key and the value rows lie in (`Mem::allocation`): the staging
    /// copies merge where rows are adjacent within one.
    pub k_alloc: u64,
    pub v_alloc: u64,
}

/// A run of consecutive positions of one head in one pinned block: (first position, key rows,
/// value rows, rows).
pub type HostRun = (usize, *const u8, *const u8, usize);

/// A CUDA store's layer: its block table for the kernels, and its host blocks for the CPU.
pub struct DeviceLayer<'a> {
    pub(super) layer: &'a Layer,
    pub(super) table: u64,
    pub(super) max_blocks: usize,
    pub(super) block_size: usize,
}

impl<'a> DeviceLayer<'a> {
    pub fn len(&self) -> usize {
        self.layer.len
    }

    pub fn is_empty(&self) -> bool {
        self.layer.len == 0
    }

    pub fn start(&self) -> usize {
        self.layer.start
    }

    pub fn num_kv_heads(&self) -> usize {
        self.layer.heads.len()
    }

    /// The kernels' view: the layer's block table.
    pub fn src(&self) -> KvSrc {
        KvSrc {
            table: self.table,
            max_blocks: self.max_blocks as i32,
            block_size: self.block_size as i32,
            k: 0,
            v: 0,
            s0: 0,
            s1: 0,
        }
    }

    /// Per kv head `0..heads`, the first position of its host blocks where it keeps its
    /// device blocks before them (see `residency::host_tail`).
    pub fn host_tails(&self, heads: usize) -> Vec<Option<usize>> {
        residency::host_tail(
            &self.layer.placements(),
            heads,
            self.layer.start,
            self.layer.len,
            self.block_size,
        )
    }

    /// Per kv head, its visible tokens (from `lo` on) in device and in host blocks, and where
    /// its host blocks start (see `host_tails`): what `policy::balance` decides on.
    pub fn placement(&self, lo: usize, token_bytes: usize) -> LayerPlacement {
        let l = self.layer;
        let bs = self.block_size;
        let tails = self.host_tails(l.heads.len());
        let heads = l
            .placements()
            .iter()
            .zip(tails)
            .map(|(blocks, tail)| {
                let (mut device_tokens, mut host_tokens) = (0, 0);
                for (bi, p) in blocks.iter().enumerate() {
                    let a = (l.start + bi * bs).max(lo);
                    let b = (l.start + (bi + 1) * bs).min(l.len);
                    let n = b.saturating_sub(a);
                    match p {
                        Placement::Host => host_tokens += n,
                        _ => device_tokens += n,
                    }
                }
                HeadPlacement {
                    device_tokens,
                    host_tokens,
                    tail,
                }
            })
            .collect();
        LayerPlacement {
            len: l.len,
            start: l.start,
            lo: lo.max(l.start),
            block_size: bs,
            token_bytes,
            heads,
        }
    }

    /// Whether any block of the layer is in host memory.
    pub fn has_host_blocks(&self) -> bool {
        self.layer
            .heads
            .iter()
            .any(|h| h.iter().any(|b| b.placement() == Placement::Host))
    }

    /// The host blocks' keys of every head in `lo..until[h]` (`len` for heads past `until`),
    /// as staging spans with their blocks' key and value addresses (mapped pinned memory);
    /// a block holding positions from `fresh_from` on is `fresh` (written in this step).
    pub fn host_spans(&self, lo: usize, until: &[usize], fresh_from: usize) -> Vec<StagedSpan> {
        let l = self.layer;
        let bs = self.block_size;
        let mut out = Vec::new();
        for (h, blocks) in l.heads.iter().enumerate() {
            let end = until.get(h).copied().unwrap_or(l.len).min(l.len);
            for (bi, b) in blocks.iter().enumerate() {
                let a = l.start + bi * bs;
                if a >= end {
                    break;
                }
                let (from, to) = (a.max(lo), (a + bs).min(end));
                if from >= to || b.placement() != Placement::Host {
                    continue;
                }
                out.push(StagedSpan {
                    span: Span {
                        head: h,
                        block: bi,
                        row: from - a,
                        pos: from,
                        n: to - from,
                        fresh: a + bs > fresh_from,
                    },
                    k: b.k.dev_ptr(),
                    v: b.v.dev_ptr(),
                    k_alloc: b.k.allocation(),
                    v_alloc: b.v.allocation(),
                });
            }
        }
        out
    }

    /// The host runs of `head` from position `from` (a block start) on; `None` if a block
    /// there is in device memory.
    pub fn host_runs(&self, head: usize, from: usize) -> Option<Vec<HostRun>> {
        let l = self.layer;
        let bs = self.block_size;
        if from >= l.len {
            return Some(Vec::new());
        }
        if from < l.start || !(from - l.start).is_multiple_of(bs) {
            return None;
        }
        let mut runs = Vec::new();
        for (bi, b) in l.heads[head].iter().enumerate().skip((from - l.start) / bs) {
            let pos = l.start + bi * bs;
            if pos >= l.len {
                break;
            }
            if b.placement() != Placement::Host {
                return None;
            }
            let (k, v) = (b.k.host_ptr()?, b.v.host_ptr()?);
            runs.push((pos, k, v, bs.min(l.len - pos)));
        }
        Some(runs)
    }
}
