//! Handing part of a stream's work to a host thread and back, with no host function and no
//! driver call on the host thread.
//!
//! A CUDA host function runs on the driver's callback thread; one that blocks (waiting for a
//! worker that itself waits on GPU work) can stall every stream of the process, and did: the
//! first shared decode hung at 128K tokens. A worker that calls the driver at all (to wait for
//! an event, or to destroy one) can also block behind the calling thread: a launch that finds
//! the stream's queue full waits inside the driver until the GPU drains it, and the GPU waits
//! for the worker. So the driver is called from the calling thread only:
//!
//! 1. the caller's stream records an event; a side stream waits on it, copies the query to
//!    pinned host memory, then writes a sequence number into a pinned, device-mapped word
//!    (`ready`; a stream memory operation, fenced behind the copy);
//! 2. the worker thread (a plain host thread) polls `ready`, computes its rows into pinned
//!    buffers, and publishes the same number into a second mapped word (`done`);
//! 3. the caller's stream waits for `done` (`cuStreamWaitValue32`) and only then runs the
//!    merge, which reads the rows through their mapped addresses. Python keeps queueing later
//!    layers meanwhile.
//!
//! Every wait points backwards in submission order (a task needs only work queued before its
//! own wait), so no interleaving of the queues can deadlock. `done` is published on every path
//! (success, error, panic, a task dropped unrun) by a drop guard, so the stream can never wait
//! forever; the error itself is kept and raised by `finish` (the end of the step). Should the
//! GPU fail before it signals `ready`, the caller's `drain` sees the stream's error and tells
//! the worker to give up, so nothing polls forever.
//!
//! Where the device refuses stream memory operations, tasks run synchronously on the calling
//! thread instead (it waits for the query copy, computes, then queues the merge): slower, never
//! a hang, same results.

use super::memory::PinnedBuf;
use super::stream::{self, Event, Stream};
use super::{driver_err, Gpu};
use crate::error::{Error, Result};
use cudarc::driver::result as cu;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What a task computes; its error is raised at the end of the step.
pub type Task = Box<dyn FnOnce() -> Result<()> + Send>;

/// Writes `value` into a word the GPU waits on when dropped: whatever happened to the task.
pub struct Publish {
    word: *const AtomicU32,
    value: u32,
}

// SAFETY: the word is process memory (pinned, or a test's heap) that outlives every task; it
// is only written atomically.
unsafe impl Send for Publish {}

impl Publish {
    /// # Safety
    /// `word` must stay valid until this guard is dropped.
    pub unsafe fn new(word: *const AtomicU32, value: u32) -> Self {
        Publish { word, value }
    }
}

impl Drop for Publish {
    fn drop(&mut self) {
        // Release: the task's writes to its output buffers are visible before the word.
        // SAFETY: valid per `new`'s contract.
        unsafe { &*self.word }.store(self.value, Ordering::Release);
    }
}

#[derive(Default)]
struct Progress {
    submitted: u64,
    finished: u64,
    /// The first failure since the last `finish`.
    error: Option<Error>,
}

type Shared = Arc<(Mutex<Progress>, Condvar)>;

/// A task with its guard; its `Drop` does the bookkeeping, so a job dropped unrun (the worker
/// gone) still publishes and still counts as finished, with an error.
struct Job {
    task: Option<Task>,
    publish: Option<Publish>,
    progress: Shared,
}

impl Job {
    fn run(mut self) {
        if let Some(task) = self.task.take() {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task))
                .unwrap_or_else(|p| {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    Err(Error::Panic(msg))
                });
            if let Err(e) = result {
                self.fail(e);
            }
        }
    }

    fn fail(&self, e: Error) {
        let (lock, _) = &*self.progress;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        p.error.get_or_insert(Error::Worker(Box::new(e)));
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if self.task.take().is_some() {
            self.fail(Error::Panic(
                "the CPU share worker stopped before running a task".into(),
            ));
        }
        // Publish before counting the job finished: whoever waits for `finish` may free the
        // word next.
        drop(self.publish.take());
        let (lock, cv) = &*self.progress;
        lock.lock().unwrap_or_else(|e| e.into_inner()).finished += 1;
        cv.notify_all();
    }
}

/// A host thread that runs tasks in order (not a rayon task: a task blocks until its query
/// reaches the host, and a blocked rayon worker could hold up the parallel work it joins).
pub struct Worker {
    tasks: Option<Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    progress: Shared,
}

impl Worker {
    /// Starts the thread.
    pub fn start() -> Result<Self> {
        let (tx, rx) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("headinfer-cpu-share".into())
            .spawn(move || {
                for job in rx {
                    job.run();
                }
            })
            .map_err(|e| Error::Panic(format!("starting the CPU share worker: {e}")))?;
        Ok(Worker {
            tasks: Some(tx),
            thread: Some(thread),
            progress: Arc::default(),
        })
    }

    fn job(&self, task: Task, publish: Option<Publish>) -> Job {
        let (lock, _) = &*self.progress;
        lock.lock().unwrap_or_else(|e| e.into_inner()).submitted += 1;
        Job {
            task: Some(task),
            publish,
            progress: self.progress.clone(),
        }
    }

    /// Queues `task`; `publish` fires once it is done, failed or dropped.
    pub fn submit(&self, task: Task, publish: Publish) {
        let job = self.job(task, Some(publish));
        if let Err(unsent) = self.tasks.as_ref().expect("open until drop").send(job) {
            // The thread is gone: dropping the job records the error and publishes.
            drop(unsent.0);
        }
    }

    /// Runs `task` on the calling thread, with the same bookkeeping.
    pub fn run_here(&self, task: Task) {
        self.job(task, None).run();
    }

    /// Waits until every task submitted so far has finished (run, failed, or dropped).
    pub fn drain(&self) {
        self.drain_checking(|| {});
    }

    /// As `drain`, calling `check` every few milliseconds while tasks are outstanding (the
    /// caller's chance to notice that what the tasks wait for will never come).
    pub fn drain_checking(&self, mut check: impl FnMut()) {
        let (lock, cv) = &*self.progress;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        while p.finished < p.submitted {
            let (guard, timeout) = cv
                .wait_timeout(p, CHECK_EVERY)
                .unwrap_or_else(|e| e.into_inner());
            p = guard;
            if timeout.timed_out() && p.finished < p.submitted {
                drop(p);
                check();
                p = lock.lock().unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// The first error of a task since the last call, without waiting.
    pub fn take_error(&self) -> Option<Error> {
        let (lock, _) = &*self.progress;
        lock.lock().unwrap_or_else(|e| e.into_inner()).error.take()
    }

    /// Waits for every task so far, then raises the first error among them.
    pub fn finish(&self) -> Result<()> {
        self.drain();
        self.take_error().map_or(Ok(()), Err)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the queue ends the thread once its tasks are done.
        self.tasks.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often a draining caller checks that the GPU has not failed under the worker.
const CHECK_EVERY: Duration = Duration::from_millis(20);

/// How the caller's stream waits for a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Mapped words both ways (`cuStreamWriteValue32`, `cuStreamWaitValue32`): the calling
    /// thread never waits and the worker never calls the driver.
    StreamWait,
    /// The device has no stream memory operations: the task runs on the calling thread.
    Synchronous,
}

/// Per layer: the pinned, mapped buffers of the CPU's rows.
pub struct Slot {
    pub rows: usize,
    pub q: PinnedBuf,
    pub o: PinnedBuf,
    pub lse: PinnedBuf,
}

/// Bytes between two layers' words: one cache line each.
const WORD_STRIDE: usize = 64;

/// A task handed to the worker whose rows a stream has yet to wait for (`wait_done`): the
/// mapped `done` word and the value it publishes (`None`: it ran on the calling thread).
#[must_use]
pub struct Done {
    word: Option<(u64, u32)>,
}

/// That a layer's query has reached the host, or will: what `stage_query` gives `submit_task`.
pub struct Ready {
    layer: usize,
    seq: u32,
    /// Only where the device has no stream memory operations (the caller waits on it).
    event: Option<Event>,
}

/// A mapped word the GPU writes, as the worker polls it.
struct ReadyWord {
    word: *const AtomicU32,
    seq: u32,
    abort: Arc<AtomicBool>,
}

// SAFETY: the word lies in pinned memory that outlives every task (`Handoff::drop` drains the
// worker before freeing it); it is only read atomically.
unsafe impl Send for ReadyWord {}

impl ReadyWord {
    /// Polls until the GPU has written `seq` (or more), spinning briefly, then yielding, then
    /// sleeping; gives up once the caller saw the GPU fail (`abort`).
    fn wait(&self) -> Result<()> {
        let mut polls = 0u32;
        loop {
            // Acquire: the query bytes, written before the word (fenced), are visible after.
            // SAFETY: valid per the `Send` note above.
            if unsafe { &*self.word }.load(Ordering::Acquire) >= self.seq {
                return Ok(());
            }
            if self.abort.load(Ordering::Relaxed) {
                return Err(Error::Panic(
                    "the GPU failed before the CPU share's query reached the host".into(),
                ));
            }
            polls = polls.saturating_add(1);
            if polls < 256 {
                std::hint::spin_loop();
            } else if polls < 1024 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

/// How a layer's shared step went on the GPU (`Handoff::step_times`), in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepTimes {
    /// From the step's start to the end of the GPU's own part (the CPU's query copy, the
    /// kernels, the staged pieces).
    pub own: f64,
    /// Then waiting for the CPU's rows.
    pub waited: f64,
}

/// A store's hand-off: side stream, worker, per-layer buffers and words.
pub struct Handoff {
    gpu: Arc<Gpu>,
    side: Stream,
    worker: Worker,
    mode: Mode,
    /// Per layer, at `WORD_STRIDE`: the GPU signals the query copied (`ready`), the worker
    /// its rows written (`done`).
    ready: PinnedBuf,
    done: PinnedBuf,
    /// Set by the calling thread when the GPU failed: a polling worker gives up.
    abort: Arc<AtomicBool>,
    seq: Vec<u32>,
    slots: Vec<Option<Slot>>,
    /// Per layer, how the last shared step ended (`mark_gpu_part`, `mark_rows_in`).
    timings: Vec<Option<Timing>>,
}

/// Three points of a layer's shared step on the caller's stream: its start, the GPU's own
/// part done, then the CPU's rows in (the stream's wait for them passed); `pending` until read.
struct Timing {
    start: Event,
    gpu_part: Event,
    rows_in: Event,
    pending: bool,
}

// SAFETY: the side stream is a driver handle usable from any thread; the rest is owned data.
unsafe impl Send for Handoff {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for Handoff {}

impl Handoff {
    pub fn new(gpu: &Arc<Gpu>, layers: usize) -> Result<Self> {
        gpu.bind()?;
        let side = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| driver_err("creating the CPU share stream", e))?;
        let side = Stream(side);
        let words = || -> Result<PinnedBuf> {
            let buf = PinnedBuf::take(gpu, layers.max(1) * WORD_STRIDE)?;
            // SAFETY: `buf` is owned here and nothing reads it yet.
            unsafe { std::ptr::write_bytes(buf.host_ptr(), 0, buf.len()) };
            Ok(buf)
        };
        let (ready, done) = (words()?, words()?);
        // Probe once: a wait that is already satisfied (the word is 0) and a write of the
        // value the word holds fail only where the device refuses stream memory operations.
        // SAFETY: the words are mapped pinned memory owned by this hand-off.
        let probe = unsafe {
            stream::wait_value_geq(side, done.dev_ptr(), 0)
                .and_then(|()| stream::write_value(side, ready.dev_ptr(), 0))
        };
        let mode = match probe.and_then(|()| stream::synchronize(side)) {
            Ok(()) => Mode::StreamWait,
            Err(_) => Mode::Synchronous,
        };
        Ok(Handoff {
            gpu: gpu.clone(),
            side,
            worker: Worker::start()?,
            mode,
            ready,
            done,
            abort: Arc::default(),
            seq: vec![0; layers],
            slots: (0..layers).map(|_| None).collect(),
            timings: (0..layers).map(|_| None).collect(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The buffers of `layer` for `rows` rows of `q_bytes` (query) and `head_dim` f32
    /// (output). Allocated on first use; a later call with other sizes (the CPU's heads
    /// changed) waits for the worker and the device, then allocates anew.
    pub fn slot(
        &mut self,
        layer: usize,
        rows: usize,
        q_bytes: usize,
        head_dim: usize,
    ) -> Result<&Slot> {
        let fits = |s: &Slot| s.rows == rows && s.q.len() == q_bytes;
        if self.slots[layer].as_ref().is_some_and(|s| !fits(s)) {
            // Another number of CPU rows (the CPU's heads changed): the old buffers go once no
            // task and no kernel can still use them (a host wait, on this change only).
            self.drain();
            self.gpu.synchronize()?;
            if let Some(old) = self.slots[layer].take() {
                old.q.give_back();
                old.o.give_back();
                old.lse.give_back();
            }
        }
        if self.slots[layer].is_none() {
            self.slots[layer] = Some(Slot {
                rows,
                q: PinnedBuf::take(&self.gpu, q_bytes)?,
                o: PinnedBuf::take(&self.gpu, rows * head_dim * 4)?,
                lse: PinnedBuf::take(&self.gpu, rows * 4)?,
            });
        }
        Ok(self.slots[layer].as_ref().expect("set above"))
    }

    /// Queues the copy of `bytes` of query rows at device address `query` into `layer`'s
    /// pinned buffer, ordered after the work queued so far on `stream`, and the signal that it
    /// is there.
    ///
    /// # Safety
    /// `query` must hold `bytes` readable bytes until the copy has run; the slot exists.
    pub unsafe fn stage_query(
        &mut self,
        layer: usize,
        query: u64,
        bytes: usize,
        stream: Stream,
    ) -> Result<Ready> {
        let slot = self.slots[layer].as_ref().expect("slot before stage");
        self.gpu.bind()?;
        stream::order(stream, self.side)?;
        // SAFETY: the pinned buffer holds `bytes` (checked by `slot`); the caller vouches for
        // the source.
        unsafe { stream::copy_to_host_async(slot.q.host_ptr(), query, bytes, self.side)? };
        let seq = self.seq[layer].wrapping_add(1).max(1);
        match self.mode {
            Mode::StreamWait => {
                let off = (layer * WORD_STRIDE) as u64;
                // SAFETY: the word is mapped pinned memory of this hand-off.
                unsafe { stream::write_value(self.side, self.ready.dev_ptr() + off, seq)? };
                Ok(Ready {
                    layer,
                    seq,
                    event: None,
                })
            }
            Mode::Synchronous => {
                let copied = Event::new()?;
                copied.record(self.side)?;
                Ok(Ready {
                    layer,
                    seq,
                    event: Some(copied),
                })
            }
        }
    }

    /// Hands `task` to the worker once the query of `ready` is on the host (it runs whatever
    /// follows); `wait_done` makes a stream wait for it, after whatever the caller queues
    /// between (the GPU's own part of the step).
    pub fn submit_task(&mut self, layer: usize, ready: Ready, task: Task) -> Result<Done> {
        if ready.layer != layer {
            return Err(Error::value(
                "layer",
                format!(
                    "the query was staged for layer {}, not {layer}",
                    ready.layer
                ),
            ));
        }
        let off = layer * WORD_STRIDE;
        match (self.mode, ready.event) {
            (Mode::Synchronous, Some(copied)) => {
                let task: Task = Box::new(move || {
                    copied.synchronize()?;
                    task()
                });
                self.worker.run_here(task);
                Ok(Done { word: None })
            }
            (Mode::StreamWait, None) => {
                self.seq[layer] = ready.seq;
                let polled = ReadyWord {
                    // SAFETY: the word lies in `self.ready`, which outlives the worker.
                    word: unsafe { self.ready.host_ptr().add(off) } as *const AtomicU32,
                    seq: ready.seq,
                    abort: self.abort.clone(),
                };
                let task: Task = Box::new(move || {
                    polled.wait()?;
                    task()
                });
                // SAFETY: the word lies in `self.done`, which outlives the worker (`drop`
                // drains it first).
                let word = unsafe { self.done.host_ptr().add(off) } as *const AtomicU32;
                // SAFETY: as above.
                self.worker
                    .submit(task, unsafe { Publish::new(word, ready.seq) });
                Ok(Done {
                    word: Some((self.done.dev_ptr() + off as u64, ready.seq)),
                })
            }
            _ => unreachable!("stage_query makes a Ready of the hand-off's mode"),
        }
    }

    /// Marks the start of `layer`'s shared step on `stream` (queued before the CPU's query
    /// copy and the GPU's own part). Only where the worker runs beside the GPU (`StreamWait`):
    /// in `Synchronous` mode the CPU's part runs before the GPU's is queued.
    pub fn mark_start(&mut self, layer: usize, stream: Stream) -> Result<()> {
        if self.mode != Mode::StreamWait || layer >= self.timings.len() {
            return Ok(());
        }
        if self.timings[layer].is_none() {
            self.gpu.bind()?;
            self.timings[layer] = Some(Timing {
                start: Event::timed()?,
                gpu_part: Event::timed()?,
                rows_in: Event::timed()?,
                pending: false,
            });
        }
        let t = self.timings[layer].as_mut().expect("made above");
        t.pending = false;
        t.start.record(stream)
    }

    /// Marks the end of the GPU's own part of `layer`'s shared step on `stream` (queued after
    /// that part, before `wait_done`), after `mark_start`.
    pub fn mark_gpu_part(&mut self, layer: usize, stream: Stream) -> Result<()> {
        match self.timings.get_mut(layer).and_then(Option::as_mut) {
            Some(t) => t.gpu_part.record(stream),
            None => Ok(()),
        }
    }

    /// Marks the CPU's rows of `layer` in on `stream` (queued after `wait_done`), after
    /// `mark_gpu_part`: `step_times` reads the three marks.
    pub fn mark_rows_in(&mut self, layer: usize, stream: Stream) -> Result<()> {
        match self.timings.get_mut(layer).and_then(Option::as_mut) {
            Some(t) => {
                t.rows_in.record(stream)?;
                t.pending = true;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// How `layer`'s last marked shared step ended, once the GPU passed it (once each): the
    /// seconds of the GPU's own part, and those the GPU, done with it, waited for the CPU's
    /// rows (about 0 where the GPU finished last). `None`: no step marked since the last
    /// read, or not run yet.
    pub fn step_times(&mut self, layer: usize) -> Result<Option<StepTimes>> {
        let Some(t) = self.timings.get_mut(layer).and_then(Option::as_mut) else {
            return Ok(None);
        };
        if !t.pending {
            return Ok(None);
        }
        let Some(waited) = t.rows_in.seconds_since(&t.gpu_part)? else {
            return Ok(None);
        };
        t.pending = false;
        let own = t.gpu_part.seconds_since(&t.start)?.unwrap_or(0.0);
        Ok(Some(StepTimes { own, waited }))
    }

    /// Makes `stream` wait until the task of `done` has published its rows.
    pub fn wait_done(&self, done: Done, stream: Stream) -> Result<()> {
        match done.word {
            // SAFETY: the word is mapped pinned memory of this hand-off, and the task queued by
            // `submit_task` publishes `seq` there on every path.
            Some((word, seq)) => unsafe { stream::wait_value_geq(stream, word, seq) },
            // Run on the calling thread: finished already.
            None => Ok(()),
        }
    }

    /// Waits for every task so far (not for the GPU); if the side stream fails meanwhile, the
    /// worker stops waiting for queries that will never arrive.
    pub fn drain(&self) {
        let (side, abort) = (self.side, &self.abort);
        self.worker.drain_checking(|| {
            if stream::check(side).is_err() {
                abort.store(true, Ordering::Relaxed);
            }
        });
    }

    /// Waits for every task so far and raises the first error among them.
    pub fn finish(&self) -> Result<()> {
        self.drain();
        self.worker.take_error().map_or(Ok(()), Err)
    }

    /// The error of an earlier task, if one failed (without waiting).
    pub fn take_error(&self) -> Option<Error> {
        self.worker.take_error()
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        // Every task publishes before it counts as finished, so after `drain` no stream can
        // still be waiting on a word that nobody will write.
        self.drain();
        let _ = self.gpu.synchronize();
        // SAFETY: created in `new`, destroyed once, after the device finished its work.
        let _ = unsafe { cu::stream::destroy(self.side.0) };
        for s in self.slots.drain(..).flatten() {
            s.q.give_back();
            s.o.give_back();
            s.lse.give_back();
        }
    }
}

#[cfg(test)]
#[path = "../../tests/rust/cuda/handoff.rs"]
mod tests;
