//! Streams and events: the caller's stream handle, events that order one stream after
//! another, and the few stream operations the core queues itself (copies, a wait on a word of
//! host memory).

use super::driver_err;
use crate::error::Result;
use cudarc::driver::result as cu;
use cudarc::driver::sys;

/// A raw CUDA stream handle, as `torch.cuda.Stream.cuda_stream` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream(pub sys::CUstream);

// SAFETY: a stream handle is an opaque driver token, usable from any thread of the process.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

/// An event without timing, destroyed on drop (a pending wait on it stays valid: the driver
/// frees it once the wait is done).
pub struct Event(sys::CUevent);

// SAFETY: an event handle is an opaque driver token, usable from any thread of the process.
unsafe impl Send for Event {}

impl Event {
    /// A new event; the context must be bound.
    pub fn new() -> Result<Self> {
        cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(Event)
            .map_err(|e| driver_err("creating an event", e))
    }

    /// A new event that keeps time (`seconds_since`); the context must be bound.
    pub fn timed() -> Result<Self> {
        cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map(Event)
            .map_err(|e| driver_err("creating an event", e))
    }

    /// Seconds from `start`'s recorded point to this one's, both `timed` and recorded on one
    /// stream, once this one completed (`None`: not yet).
    pub fn seconds_since(&self, start: &Event) -> Result<Option<f64>> {
        // SAFETY: a live event.
        match unsafe { cu::event::query(self.0) } {
            Ok(()) => {}
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NOT_READY => return Ok(None),
            Err(e) => return Err(driver_err("querying an event", e)),
        }
        // SAFETY: live events of timing kind (the caller's bound), both completed.
        let ms = unsafe { cu::event::elapsed(start.0, self.0) }
            .map_err(|e| driver_err("timing events", e))?;
        Ok(Some(f64::from(ms) / 1e3))
    }

    /// Records the event at the current end of `stream`.
    pub fn record(&self, stream: Stream) -> Result<()> {
        // SAFETY: a live event and a stream handle of the bound context.
        unsafe { cu::event::record(self.0, stream.0) }
            .map_err(|e| driver_err("recording an event", e))
    }

    /// Makes `stream` wait for the work recorded by this event.
    pub fn wait_on(&self, stream: Stream) -> Result<()> {
        // SAFETY: a live event and a stream handle of the bound context.
        unsafe {
            cu::stream::wait_event(
                stream.0,
                self.0,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| driver_err("ordering streams", e))
    }

    /// Blocks the calling host thread until the recorded work is done. Only threads that no
    /// GPU work waits on may call this (the hand-off worker), never a driver callback.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live event.
        unsafe { cu::event::synchronize(self.0) }.map_err(|e| driver_err("waiting for an event", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { cu::event::destroy(self.0) };
    }
}

/// Orders `after` behind the work queued so far on `before` (nothing when they are one).
pub fn order(before: Stream, after: Stream) -> Result<()> {
    if before == after {
        return Ok(());
    }
    let ev = Event::new()?;
    ev.record(before)?;
    ev.wait_on(after)
}

/// Queues a copy of `bytes` between device-addressable memory (device memory, or mapped
/// pinned memory by its device address) on `stream`.
///
/// # Safety
/// Both ranges must be valid for `bytes` and stay alive until the stream has run the copy.
pub unsafe fn copy_async(
    dst: u64,
    src: u64,
    bytes: usize,
    stream: Stream,
    what: &str,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { sys::cuMemcpyAsync(dst, src, bytes, stream.0) }
        .result()
        .map_err(|e| driver_err(what, e))
}

/// Queues a copy of `bytes` from device memory to host memory on `stream`.
///
/// # Safety
/// As for `copy_async`; `dst` is a host pointer (pinned, for the copy to be asynchronous).
pub unsafe fn copy_to_host_async(
    dst: *mut u8,
    src: u64,
    bytes: usize,
    stream: Stream,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { sys::cuMemcpyDtoHAsync_v2(dst as *mut _, src, bytes, stream.0) }
        .result()
        .map_err(|e| driver_err("copying to the host", e))
}

/// Makes `stream` wait until the 32-bit word at device address `word` is at least `value`
/// (a stream memory operation: no host function, no host thread involved on the GPU side).
///
/// # Safety
/// `word` must be device memory or mapped pinned memory that outlives the wait, and something
/// must eventually write a value `>= value` there, or the stream waits forever.
pub unsafe fn wait_value_geq(stream: Stream, word: u64, value: u32) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe {
        sys::cuStreamWaitValue32_v2(
            stream.0,
            word,
            value,
            sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
        )
    }
    .result()
    .map_err(|e| driver_err("queueing a wait on the CPU share", e))
}

/// Queues a write of `value` into the 32-bit word at device address `word` on `stream`, after
/// the work queued before it (with a system-wide fence: what that work wrote, a copy to host
/// memory included, is visible before the word is).
///
/// # Safety
/// `word` must be device memory or mapped pinned memory that outlives the write.
pub unsafe fn write_value(stream: Stream, word: u64, value: u32) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe {
        sys::cuStreamWriteValue32_v2(
            stream.0,
            word,
            value,
            sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
        )
    }
    .result()
    .map_err(|e| driver_err("queueing the CPU share's query signal", e))
}

/// Blocks the calling thread until `stream` has run everything queued on it.
pub fn synchronize(stream: Stream) -> Result<()> {
    // SAFETY: a stream handle of the bound context.
    unsafe { sys::cuStreamSynchronize(stream.0) }
        .result()
        .map_err(|e| driver_err("waiting for a stream", e))
}

/// Whether `stream` has failed: `Err` with the driver's error once the context has one (a
/// fault is sticky), `Ok` while its work runs or is done. Never blocks.
pub fn check(stream: Stream) -> Result<()> {
    // SAFETY: a stream handle of the bound context; the query only reads its state.
    match unsafe { sys::cuStreamQuery(stream.0) } {
        sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_NOT_READY => Ok(()),
        e => Err(driver_err(
            "running the CPU share's stream",
            e.result().unwrap_err(),
        )),
    }
}
