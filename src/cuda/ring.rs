//! The copy engine's staging ring: a few device buffers of fixed size that host blocks are
//! copied into on a stream of the ring's own, while the caller's stream attends over the
//! buffer filled before (the paper's ping-pong, with events instead of host waits).
//!
//! Ordering, all by events, none on the host: a copy into buffer `b` waits for the kernels that
//! read `b` last (`consumed[b]`, recorded on the caller's stream after them); the caller's
//! stream waits for the copies (`ready[b]`) before its kernels read `b`; a piece holding keys
//! written in this step also waits for the step's appends (`appended`). A wait captures the
//! event's last record at the time it is queued, so re-recording an event later is safe.

use super::memory::DeviceBuf;
use super::stream::{self, Event, Stream};
use super::{driver_err, Gpu};
use crate::error::Result;
use cudarc::driver::result as cu;
use std::sync::Arc;

/// One copy of a piece: `bytes` from device-addressable `src` (a mapped pinned block) to byte
/// `offset` of the staging buffer.
#[derive(Clone, Copy, Debug)]
pub struct Copy {
    pub offset: usize,
    pub src: u64,
    pub bytes: usize,
}

/// A filled buffer, lent to the caller's stream until `release`.
#[derive(Clone, Copy, Debug)]
pub struct Staged {
    pub index: usize,
    /// Device address of the buffer.
    pub ptr: u64,
}

pub struct StagingRing {
    gpu: Arc<Gpu>,
    bufs: Vec<DeviceBuf>,
    piece_bytes: usize,
    copy: Stream,
    ready: Vec<Event>,
    consumed: Vec<Event>,
    appended: Event,
    next: usize,
}

// SAFETY: the handles are opaque driver tokens and the buffers plain device addresses; the
// store that owns the ring is used from one thread at a time (`&mut self`).
unsafe impl Send for StagingRing {}
// SAFETY: as above; shared access only reads sizes.
unsafe impl Sync for StagingRing {}

impl StagingRing {
    /// `buffers` device buffers of `piece_bytes` each on `gpu`, and a copy stream.
    pub fn new(gpu: &Arc<Gpu>, buffers: usize, piece_bytes: usize) -> Result<Self> {
        gpu.bind()?;
        let bufs = (0..buffers.max(2))
            .map(|_| DeviceBuf::new(gpu, piece_bytes))
            .collect::<Result<Vec<_>>>()?;
        let events = |n: usize| (0..n).map(|_| Event::new()).collect::<Result<Vec<_>>>();
        let ready = events(bufs.len())?;
        let consumed = events(bufs.len())?;
        let appended = Event::new()?;
        let raw = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| driver_err("creating the copy engine's stream", e))?;
        // Nothing has used a buffer yet: record every `consumed` once so the first waits pass.
        let ring = StagingRing {
            gpu: gpu.clone(),
            bufs,
            piece_bytes,
            copy: Stream(raw),
            ready,
            consumed,
            appended,
            next: 0,
        };
        for e in &ring.consumed {
            e.record(ring.copy)?;
        }
        Ok(ring)
    }

    /// Bytes of one buffer.
    pub fn piece_bytes(&self) -> usize {
        self.piece_bytes
    }

    /// Device bytes the ring holds.
    pub fn device_bytes(&self) -> usize {
        self.bufs.len() * self.piece_bytes
    }

    /// Orders every copy queued from now on after `writes` (the writes of the blocks they
    /// read that another stream queued earlier).
    pub fn copy_after(&self, writes: &Event) -> Result<()> {
        self.gpu.bind()?;
        writes.wait_on(self.copy)
    }

    /// Marks the end of the current step's appends of a layer on `stream`: pieces staged
    /// `fresh` from now on copy after it.
    pub fn mark_appended(&self, stream: Stream) -> Result<()> {
        self.appended.record(stream)
    }

    /// Copies one piece into the next buffer on the ring's stream and orders `stream` after the
    /// copies. `fresh`: wait for the last `mark_appended` first.
    ///
    /// # Safety
    /// Every `src` must be valid for its `bytes` until the copies have run, and every copy
    /// must lie within `piece_bytes`.
    pub unsafe fn stage(&mut self, stream: Stream, copies: &[Copy], fresh: bool) -> Result<Staged> {
        let b = self.next;
        self.gpu.bind()?;
        self.consumed[b].wait_on(self.copy)?;
        if fresh {
            self.appended.wait_on(self.copy)?;
        }
        let base = self.bufs[b].ptr();
        for c in copies {
            debug_assert!(c.offset + c.bytes <= self.piece_bytes);
            // SAFETY: the destination lies in buffer `b` (caller's bound), whose earlier readers
            // finished (the wait above); the caller vouches for the source.
            unsafe {
                stream::copy_async(
                    base + c.offset as u64,
                    c.src,
                    c.bytes,
                    self.copy,
                    "staging host KV blocks",
                )?
            };
        }
        self.ready[b].record(self.copy)?;
        self.ready[b].wait_on(stream)?;
        self.next = (b + 1) % self.bufs.len();
        Ok(Staged {
            index: b,
            ptr: base,
        })
    }

    /// Gives buffer `s` back once the kernels queued on `stream` so far have read it.
    pub fn release(&self, s: Staged, stream: Stream) -> Result<()> {
        self.consumed[s.index].record(stream)
    }
}

impl Drop for StagingRing {
    fn drop(&mut self) {
        // The buffers are freed after this (cuMemFree waits for their readers); the copies on
        // the ring's stream must be done before the stream goes.
        if self.gpu.bind().is_ok() {
            let _ = stream::synchronize(self.copy);
            // SAFETY: created in `new`, destroyed once, after its work finished.
            let _ = unsafe { cu::stream::destroy(self.copy.0) };
        }
    }
}
