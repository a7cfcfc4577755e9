//! A CUDA store: its backend (the GPU, its kernels, the device copy of the table, the CPU share
//! hand-off) and its data paths: append, gather and rebalance, all queued on the caller's
//! stream.

use super::pool::{Block, BlockPool, DeviceAlloc, PinnedAlloc, Placement};
use super::residency::{self, Move};
use super::staging::{self, Piece, Span};
use super::table::{self, DeviceTable};
use super::view::{DeviceLayer, StagedSpan};
use super::{Backend, CudaConfig, CudaStore, KvStore, StoreConfig};
use crate::cuda::handoff::{Handoff, StepTimes};
use crate::cuda::kernels::{Unit, Units, MAX_UNITS};
use crate::cuda::ring::{Copy, Staged, StagingRing};
use crate::cuda::stream::{self, Event, Stream};
use crate::cuda::{Gpu, Kernels};
use crate::error::{Error, Result};
use crate::quant::KvFormat;
use crate::tensor::{DType, DevTensor};
use std::sync::Arc;

/// Buffers of the copy engine's staging ring, and bytes of each: pieces large enough that a
/// copy call's fixed cost (microseconds) is small beside the copy (32 MiB: about 0.6 ms at 55
/// GB/s), three so one fills while one is read and one waits. 32 MiB, not 16: with 16 the
/// copy engine sat idle at layer ends with the ring full, and 32 gave the GPU's side 45.2 ->
/// 48.8 GB/s in an int8 decode of 716,800 tokens (0.414 -> 0.393 s/token; exact 0.708 ->
/// 0.673; same process, H100 host, session 17). 128 MiB was slower (session 12).
pub const STAGING_BUFFERS: usize = 3;
pub const STAGING_PIECE_BYTES: usize = 32 << 20;

/// The GPU side of a CUDA store.
pub struct Cuda {
    gpu: Arc<Gpu>,
    kernels: Arc<Kernels>,
    table: DeviceTable,
    /// Bytes of device memory the blocks may fill, as set.
    budget: usize,
    max_len: usize,
    /// The CPU share's side stream, worker and buffers, made on first use.
    handoff: Option<Handoff>,
    /// The copy engine's staging buffers and stream, made on first use.
    ring: Option<StagingRing>,
    /// Bytes of each staging buffer.
    piece_bytes: usize,
    /// Staging buffers in the ring.
    buffers: usize,
    /// Per layer, what orders the copy engine's reads of its blocks after the writes.
    writes: Vec<Writes>,
}

/// The appends of one layer as the copy engine must see them. The copy engine reads on a
/// stream of its own, and a decode step copies blocks that earlier appends wrote before the
/// caller's stream reaches the step (to overlap the copies with earlier layers): those copies
/// wait for `prior`, recorded after every append but the latest; positions from `from` on
/// (the latest append's) count as written in the step (`fresh`: they wait for the step's
/// appends). Without it a copy could read a block whose append was still queued (seen on a
/// busy GPU: a decode right after one append of every position read stale rows).
struct Writes {
    /// Recorded after every append of the layer but the latest (never recorded: none).
    prior: Event,
    /// Recorded after the latest append.
    last: Event,
    /// The latest append's first position.
    from: usize,
}

// SAFETY: events are opaque driver tokens and the driver's calls on them are thread-safe;
// shared access only queues waits on them (recording takes `&mut self`).
unsafe impl Sync for Writes {}

/// What one decode step of a layer works with: the layer's view, and the mechanisms asked for
/// (made on first use).
pub struct DecodeParts<'a> {
    pub view: DeviceLayer<'a>,
    pub handoff: Option<&'a mut Handoff>,
    pub ring: Option<&'a mut StagingRing>,
    /// Host blocks holding positions from here on were written in this step (`host_spans`'s
    /// `fresh_from`): the latest append's, and at least the step's `q_len` last.
    pub fresh_from: usize,
    /// The writes of every earlier position, for the copy engine to wait on.
    pub prior_writes: &'a Event,
}

impl Backend for Cuda {
    const KIND: &'static str = "CUDA";

    fn place(&mut self, layer: usize, head: usize, abs: usize, block: &Block) {
        self.table.set(layer, head, abs, block);
    }

    fn quiesce(&self) -> Result<()> {
        // Host tasks first (they may read pinned blocks), then the device (whose waits those
        // tasks release).
        if let Some(h) = &self.handoff {
            h.drain();
        }
        self.gpu.synchronize()
    }

    fn max_len(&self) -> Option<usize> {
        Some(self.max_len)
    }

    fn reclaim_host(&self, block_bytes: usize) -> usize {
        crate::cuda::memory::reclaim_pinned_for(block_bytes)
    }
}

impl Cuda {
    /// The copy engine's staging ring, made on first use.
    fn ring_mut(&mut self) -> Result<&mut StagingRing> {
        if self.ring.is_none() {
            self.ring = Some(StagingRing::new(&self.gpu, self.buffers, self.piece_bytes)?);
        }
        Ok(self.ring.as_mut().expect("made above"))
    }
}

/// Queues one planned piece on `ring`: each unit's key rows copied to its offset and its value
/// rows after them (`row_bytes` each, as stored), `stream` ordered after the copies; returns
/// the buffer (to `release` once read) and the units as the kernels take them, addressing it.
/// `spans` are the ones the plan was given, each unit's `span.block` its index there.
///
/// # Safety
/// The spans' blocks must stay allocated and unwritten (but for fresh ones, by appends queued
/// on `stream` before the ring's last `mark_appended`) until `stream` has run the copies.
pub unsafe fn stage_piece(
    ring: &mut StagingRing,
    stream: Stream,
    piece: &Piece,
    spans: &[StagedSpan],
    row_bytes: usize,
    sub_len: usize,
) -> Result<(Staged, Units)> {
    let copies = piece_copies(piece, spans, row_bytes);
    // SAFETY: the sources are the spans' blocks (the caller's bound); every copy lies within
    // the piece (the planner's).
    let staged = unsafe { ring.stage(stream, &copies, piece.fresh)? };
    let mut units = Units {
        count: piece.units.len() as i32,
        sub_len: sub_len.min(i32::MAX as usize) as i32,
        u: [Unit::default(); MAX_UNITS],
    };
    for (dst, u) in units.u.iter_mut().zip(&piece.units) {
        let k = staged.ptr + u.offset as u64;
        *dst = Unit {
            k,
            v: k + (u.span.n * row_bytes) as u64,
            pos: u.span.pos as i64,
            n: u.span.n as i32,
            head: u.span.head as i32,
            slot: u.slot as i32,
            subs: u.subs as i32,
        };
    }
    Ok((staged, units))
}

/// The copies that stage `piece`: each unit's key rows to its offset and its value rows after
/// them (`row_bytes` each, as stored), with every run of copies that continue each other in
/// source and destination, within one allocation, merged into one. A whole block's values
/// follow its keys in their slab, and blocks allocated one after another (a layer's heads at
/// one prefill chunk) lie one after another, so a piece whose units come in address order
/// (`attention::staged::plan`) is a few long copies: each copy costs the copy engine time of its
/// own (1 MiB copies ran at 48 GB/s where 2 MiB ran at 52 and 16 MiB at 55, on an H100).
/// `spans` are the ones the plan was given, each unit's `span.block` its index there.
pub fn piece_copies(piece: &Piece, spans: &[StagedSpan], row_bytes: usize) -> Vec<Copy> {
    // (copy, allocation of its source)
    let mut out: Vec<(Copy, u64)> = Vec::with_capacity(2 * piece.units.len());
    let mut push = |c: Copy, alloc: u64| match out.last_mut() {
        Some((r, a))
            if *a == alloc && r.src + r.bytes as u64 == c.src && r.offset + r.bytes == c.offset =>
        {
            r.bytes += c.bytes
        }
        _ => out.push((c, alloc)),
    };
    for u in &piece.units {
        let s = &spans[u.span.block];
        let bytes = u.span.n * row_bytes;
        let skip = (u.span.row * row_bytes) as u64;
        push(
            Copy {
                offset: u.offset,
                src: s.k + skip,
                bytes,
            },
            s.k_alloc,
        );
        push(
            Copy {
                offset: u.offset + bytes,
                src: s.v + skip,
                bytes,
            },
            s.v_alloc,
        );
    }
    out.into_iter().map(|(c, _)| c).collect()
}

impl CudaStore {
    /// An empty CUDA store on device `cuda.ordinal`; takes no block memory until the first
    /// append (the block table is pinned at once).
    pub fn new(cfg: StoreConfig, cuda: CudaConfig) -> Result<Self> {
        cfg.validate(Some(&cuda))?;
        let gpu = crate::cuda::gpu(cuda.ordinal)?;
        let kernels = gpu.kernels(cfg.dtype, cfg.head_dim, cfg.kv)?;
        let max_blocks = cuda.max_len.div_ceil(cfg.block_size);
        let table = DeviceTable::new(&gpu, cfg.num_layers, cfg.num_kv_heads, max_blocks)?;
        gpu.bind()?;
        let writes = (0..cfg.num_layers)
            .map(|_| {
                Ok(Writes {
                    prior: Event::new()?,
                    last: Event::new()?,
                    from: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let n = cfg.block_bytes();
        let host = BlockPool::new(Box::new(PinnedAlloc(gpu.clone())), n, usize::MAX);
        let device = BlockPool::new(
            Box::new(DeviceAlloc(gpu.clone())),
            n,
            cuda.device_budget / (2 * n),
        );
        let backend = Cuda {
            gpu,
            kernels,
            table,
            budget: cuda.device_budget,
            max_len: max_blocks * cfg.block_size,
            handoff: None,
            ring: None,
            piece_bytes: STAGING_PIECE_BYTES,
            buffers: STAGING_BUFFERS,
            writes,
        };
        KvStore::assemble(cfg, host, device, backend)
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.backend.gpu.ordinal
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.backend.gpu
    }

    pub fn kernels(&self) -> &Arc<Kernels> {
        &self.backend.kernels
    }

    /// Checks that a tensor argument lives on this store's device.
    pub fn expect_ordinal(&self, arg: &str, ordinal: usize) -> Result<()> {
        if ordinal != self.ordinal() {
            return Err(Error::value(
                arg,
                format!(
                    "is on cuda:{ordinal}, but this store holds cuda:{}",
                    self.ordinal()
                ),
            ));
        }
        Ok(())
    }

    /// A read-only view of `layer` for the GPU kernels and the CPU share.
    pub fn device_view(&self, layer: usize) -> Result<DeviceLayer<'_>> {
        let l = self.layer(layer)?;
        Ok(DeviceLayer {
            layer: l,
            table: self.backend.table.layer_addr(layer),
            max_blocks: self.backend.table.max_blocks,
            block_size: self.cfg.block_size,
        })
    }

    /// The view of `layer` with the CPU share's hand-off (`handoff`) and the copy engine's
    /// staging ring (`ring`), each made on first use.
    pub fn decode_parts(
        &mut self,
        layer: usize,
        q_len: usize,
        handoff: bool,
        ring: bool,
    ) -> Result<DecodeParts<'_>> {
        self.layer(layer)?;
        if handoff && self.backend.handoff.is_none() {
            self.backend.handoff = Some(Handoff::new(&self.backend.gpu, self.cfg.num_layers)?);
        }
        if ring {
            self.backend.ring_mut()?;
        }
        let c = &mut self.backend;
        let view = DeviceLayer {
            layer: &self.layers[layer],
            table: c.table.layer_addr(layer),
            max_blocks: c.table.max_blocks,
            block_size: self.cfg.block_size,
        };
        let w = &c.writes[layer];
        Ok(DecodeParts {
            fresh_from: w.from.min(view.len().saturating_sub(q_len)),
            view,
            handoff: if handoff { c.handoff.as_mut() } else { None },
            ring: if ring { c.ring.as_mut() } else { None },
            prior_writes: &w.prior,
        })
    }

    /// How `layer`'s last shared decode step ended, once the GPU passed it (`None`: not yet,
    /// or read already): the seconds of the GPU's own part, and those it then waited for the
    /// CPU's rows (`Handoff::step_times`).
    pub fn share_step_times(&mut self, layer: usize) -> Result<Option<StepTimes>> {
        match self.backend.handoff.as_mut() {
            Some(h) => h.step_times(layer),
            None => Ok(None),
        }
    }

    /// Device bytes of the copy engine's staging ring (0 until first used).
    pub fn staging_bytes(&self) -> usize {
        self.backend
            .ring
            .as_ref()
            .map_or(0, StagingRing::device_bytes)
    }

    /// Bytes of each of the copy engine's staging buffers.
    pub fn staging_piece_bytes(&self) -> usize {
        self.backend.piece_bytes
    }

    /// Sets the bytes of each staging buffer (a multiple of 16 holding at least one key and
    /// one value row, as stored: int8 rows are smaller); a ring already made is freed once the
    /// device is done with it, and made again at the next use. Smaller pieces cut blocks
    /// across pieces (tests); larger ones take more device memory.
    pub fn set_staging_piece_bytes(&mut self, bytes: usize) -> Result<()> {
        let row = self.cfg.row_bytes();
        if bytes < 2 * row || !bytes.is_multiple_of(16) {
            return Err(Error::value(
                "staging_piece_bytes",
                format!(
                    "must be a multiple of 16 holding a key and a value row ({} bytes), got \
                     {bytes}",
                    2 * row
                ),
            ));
        }
        self.drop_ring()?;
        self.backend.piece_bytes = bytes;
        Ok(())
    }

    /// Buffers of the copy engine's staging ring.
    pub fn staging_buffers(&self) -> usize {
        self.backend.buffers
    }

    /// Sets how many staging buffers the ring holds (at least 2: one filled while one is
    /// read); a ring already made is freed once the device is done with it, and made again at
    /// the next use. More buffers let the copy engine run further ahead of the kernels (across
    /// a layer's end) and take more device memory.
    pub fn set_staging_buffers(&mut self, buffers: usize) -> Result<()> {
        if buffers < 2 {
            return Err(Error::value(
                "staging_buffers",
                format!("must be at least 2, got {buffers}"),
            ));
        }
        self.drop_ring()?;
        self.backend.buffers = buffers;
        Ok(())
    }

    /// Frees the staging ring (if made) once the device is done with it.
    fn drop_ring(&mut self) -> Result<()> {
        if self.backend.ring.is_some() {
            self.backend.quiesce()?;
            self.backend.ring = None;
        }
        Ok(())
    }

    /// Waits for this step's host tasks (the CPU share) and raises the first failure among
    /// them, so a failed step raises in that step.
    pub fn finish_step(&self) -> Result<()> {
        match &self.backend.handoff {
            Some(h) => h.finish(),
            None => Ok(()),
        }
    }

    /// The error of an earlier host task, if one failed (without waiting).
    pub fn take_share_error(&self) -> Option<Error> {
        self.backend.handoff.as_ref().and_then(Handoff::take_error)
    }

    /// Appends `n` tokens from device tensors `key`, `value` (`[num_kv_heads, n, head_dim]`,
    /// the store's dtype; an int8 store quantizes them as it writes).
    ///
    /// # Safety
    /// The tensors must be valid device memory of that shape and strides, alive until
    /// `stream` reaches this work.
    pub unsafe fn append_cuda(
        &mut self,
        layer: usize,
        dtype: DType,
        key: (DevTensor, [usize; 3]),
        value: (DevTensor, [usize; 3]),
        stream: Stream,
    ) -> Result<()> {
        let n = self.check_chunk(layer, dtype, key.1, value.1)?;
        if n == 0 {
            return Ok(());
        }
        let len = self.layers[layer].len;
        self.reserve(layer, n)?;
        let h = self.cfg.num_kv_heads;
        let c = &self.backend;
        c.gpu.bind()?;
        // SAFETY: the caller vouches for the tensors; `reserve` put every block the
        // positions `len..len + n` fall in into the table.
        unsafe {
            c.kernels.append(
                stream,
                key.0,
                value.0,
                h,
                n,
                len,
                c.table.layer_addr(layer),
                c.table.max_blocks,
                self.cfg.block_size,
            )?
        };
        self.layers[layer].len += n;
        // The latest append's event becomes the prior writes' (a wait captures the record
        // current when it is queued, so the swap leaves queued waits as they were).
        let w = &mut self.backend.writes[layer];
        std::mem::swap(&mut w.prior, &mut w.last);
        w.from = len;
        w.last.record(stream)
    }

    /// Copies positions `a..b` of kv heads `h0..h0 + heads` of `layer` into device tensors
    /// `key_out`, `value_out` (`[heads, b - a, head_dim]` of the store's dtype, each with its
    /// own strides); an int8 store's rows come out dequantized. The copy engine moves the
    /// stored bytes (int8: through the staging ring, then a kernel dequantizes them in device
    /// memory), so a prefill's gather needs no SMs to read host memory and overlaps the
    /// attention kernels queued on other streams.
    ///
    /// # Safety
    /// As for `append_cuda`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather(
        &mut self,
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
        let h = self.cfg.num_kv_heads;
        if h0.checked_add(heads).is_none_or(|e| e > h) {
            return Err(Error::value(
                "num_heads",
                format!("kv heads {h0}..{h0}+{heads} are out of range for {h}"),
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
        let c = &self.backend;
        c.gpu.bind()?;
        let d = self.cfg.head_dim;
        let es = self.cfg.dtype.size();
        let exact = self.cfg.kv == KvFormat::Exact;
        if exact && key_out.s1 == d as i64 && value_out.s1 == d as i64 {
            // Rows contiguous in each output: one copy-engine transfer per block run, so the
            // copy needs no SMs and overlaps the attention kernels of a previous unit. Each
            // output is addressed with its own strides. (Int8 rows are not the outputs'
            // bytes: the kernel dequantizes them.)
            let bs = self.cfg.block_size;
            let row = d * es;
            for hi in 0..heads {
                let blocks = &l.heads[h0 + hi];
                for r in table::runs(l.start, bs, a, b) {
                    let blk = &blocks[r.block];
                    for (src, dst) in [(blk.k.dev_ptr(), key_out), (blk.v.dev_ptr(), value_out)] {
                        let dst_off = (hi as u64 * dst.s0 as u64
                            + (r.pos - a) as u64 * dst.s1 as u64)
                            * es as u64;
                        // SAFETY: source rows `off..off + rows` lie in the block; the destination
                        // rows lie in the caller's validated output; both are device-addressable
                        // (device memory or mapped pinned memory) and the copy is stream-ordered.
                        unsafe {
                            stream::copy_async(
                                dst.ptr + dst_off,
                                src + (r.off * row) as u64,
                                r.rows * row,
                                stream,
                                "copying KV blocks",
                            )?
                        };
                    }
                }
            }
            return Ok(());
        }
        if exact {
            // SAFETY: the caller vouches for the outputs; the table covers `start..len`.
            return unsafe {
                c.kernels.gather(
                    stream,
                    c.table.layer_addr(layer),
                    c.table.max_blocks,
                    self.cfg.block_size,
                    h0,
                    heads,
                    a,
                    b - a,
                    key_out,
                    value_out,
                )
            };
        }
        // Int8: every block run of the range a span, staged piece by piece.
        let rb = self.cfg.row_bytes();
        let bs = self.cfg.block_size;
        let mut spans = Vec::new();
        for hi in 0..heads {
            let blocks = &l.heads[h0 + hi];
            for r in table::runs(l.start, bs, a, b) {
                let blk = &blocks[r.block];
                let span = Span {
                    head: hi,
                    block: spans.len(),
                    row: r.off,
                    pos: r.pos,
                    n: r.rows,
                    // Every copy waits for the appends queued on `stream` so far.
                    fresh: true,
                };
                spans.push(StagedSpan {
                    span,
                    k: blk.k.dev_ptr(),
                    v: blk.v.dev_ptr(),
                    k_alloc: blk.k.allocation(),
                    v_alloc: blk.v.allocation(),
                });
            }
        }
        if spans.is_empty() {
            return Ok(());
        }
        let kernels = c.kernels.clone();
        let ring = self.backend.ring_mut()?;
        let flat: Vec<Span> = spans.iter().map(|s| s.span).collect();
        let plan = staging::plan(&flat, rb, ring.piece_bytes(), MAX_UNITS, 1);
        ring.mark_appended(stream)?;
        for piece in &plan.pieces {
            // SAFETY: the spans are this layer's blocks, which stay allocated until the
            // device is quiesced (crop, clear and rebalance do that before freeing or moving);
            // the appends that wrote them are ordered before the copies (`mark_appended`).
            let (staged, units) =
                unsafe { stage_piece(ring, stream, piece, &spans, rb, plan.sub_len)? };
            // SAFETY: the units address the staged buffer, which stays the stream's until the
            // release below; their rows `pos - a..` lie in the caller's validated outputs.
            let run = unsafe { kernels.dequant_staged(stream, &units, a, key_out, value_out) };
            ring.release(staged, stream)?;
            run?;
        }
        Ok(())
    }

    /// Bytes of device memory new blocks may fill.
    pub fn device_budget(&self) -> usize {
        self.backend.budget
    }

    /// Changes how many bytes of device memory new blocks may fill. Blocks already on the
    /// device stay there; a smaller budget only sends later blocks to the host.
    pub fn set_device_budget(&mut self, bytes: usize) {
        self.backend.budget = bytes;
        self.device.set_budget(bytes / (2 * self.cfg.block_bytes()));
    }

    /// Moves blocks between device memory and pinned host memory until the device holds as
    /// many blocks as the budget allows (the moves: `residency::plan_moves`). The copies run on
    /// `stream`, which is synchronized once before the block table changes, so no kernel ever
    /// reads a block that is still being filled. Replaced host blocks stay reserved for reuse.
    /// Returns (promoted, demoted) block pairs.
    pub fn rebalance(&mut self, stream: Stream) -> Result<(usize, usize)> {
        let n = self.cfg.block_bytes();
        let bs = self.cfg.block_size;
        // Unused device blocks beyond the budget go first: nothing reads them.
        self.device.trim_to_budget();
        let in_use = self.device.allocated() - self.device.free_len();
        let placement: Vec<_> = self.layers.iter().map(|l| l.placements()).collect();
        let moves = residency::plan_moves(&placement, in_use, self.device.budget());
        if moves.is_empty() {
            return Ok((0, 0));
        }
        let to = moves[0].to;
        if to == Placement::Host {
            let fresh = moves.len().saturating_sub(self.host.free_len());
            self.check_host_memory(fresh, "moving KV blocks from the GPU to the host")?;
        }
        self.backend.gpu.bind()?;
        // Copy into new blocks; nothing anyone reads changes yet.
        let mut staged: Vec<Block> = Vec::with_capacity(moves.len());
        let copied = (|| -> Result<()> {
            for &Move {
                layer, head, index, ..
            } in &moves
            {
                let (new, _) = self.pool(to).take_for_move()?;
                let old = &self.layers[layer].heads[head][index];
                let pairs = [
                    (new.k.dev_ptr(), old.k.dev_ptr()),
                    (new.v.dev_ptr(), old.v.dev_ptr()),
                ];
                staged.push(new);
                for (dst, src) in pairs {
                    // SAFETY: both blocks are `n` bytes of device-addressable memory owned by
                    // the store; the copy is ordered on `stream` after every write to `old`.
                    unsafe { stream::copy_async(dst, src, n, stream, "moving a KV block")? };
                }
            }
            // SAFETY: a valid stream handle from the caller.
            unsafe { cudarc::driver::result::stream::synchronize(stream.0) }
                .map_err(|e| crate::cuda::driver_err("waiting for block moves", e))
        })();
        if let Err(e) = copied {
            // Nothing was switched: the staged blocks go back to their pool (synchronize
            // first, copies into them may be in flight).
            let _ = self.backend.gpu.synchronize();
            for b in staged {
                self.pool(to).give(b);
            }
            return Err(e);
        }
        for (m, new) in moves.iter().zip(staged) {
            let abs = self.layers[m.layer].start / bs + m.index;
            self.backend.place(m.layer, m.head, abs, &new);
            let old = std::mem::replace(&mut self.layers[m.layer].heads[m.head][m.index], new);
            match to {
                // The replaced host block stays reserved for reuse.
                Placement::Device => self.host.give(old),
                // The replaced device block is freed: the budget shrank.
                Placement::Host => self.device.discard(old),
            }
        }
        Ok(if to == Placement::Device {
            (moves.len(), 0)
        } else {
            (0, moves.len())
        })
    }
}

#[cfg(test)]
#[path = "../../tests/rust/store/cuda.rs"]
mod tests;
