//! Handing part of a stream's work to a host thread and back, with no host function.
//!
//! A CUDA host function runs on the driver's callback thread; one that blocks (waiting for a
//! worker that itself waits on GPU work) can stall every stream of the process, and did: the
//! first shared decode hung at 128K tokens. Here nothing on the driver's side ever blocks:
//!
//! 1. the caller's stream records an event; a side stream waits on it and copies the query to
//!    pinned host memory, then records `copied`;
//! 2. the worker thread (a plain host thread) waits on `copied`, computes its rows into pinned
//!    buffers, and publishes a sequence number into a pinned, device-mapped word;
//! 3. the caller's stream waits for that word (`cuStreamWaitValue32`, a stream memory
//!    operation) and only then runs the merge, which reads the rows through their mapped
//!    addresses. Python keeps queueing later layers meanwhile.
//!
//! Every wait points backwards in submission order (a task needs only work queued before its
//! own wait), so no interleaving of the queues can deadlock. The word is published on every
//! path (success, error, panic, a task dropped unrun) by a drop guard, so the stream can never
//! wait forever; the error itself is kept and raised by `finish` (the end of the step).
//!
//! Where the device refuses stream memory operations, tasks run synchronously on the calling
//! thread instead (it waits for the query copy, computes, then queues the merge): slower, never
//! a hang, same results.

use super::memory::PinnedBuf;
use super::stream::{self, Event, Stream};
use super::{driver_err, Gpu};
use crate::error::{Error, Result};
use cudarc::driver::result as cu;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};

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
    /// Starts the thread; `init` runs on it first (binding the CUDA context).
    pub fn start(init: impl FnOnce() + Send + 'static) -> Result<Self> {
        let (tx, rx) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("headinfer-cpu-share".into())
            .spawn(move || {
                init();
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
        let (lock, cv) = &*self.progress;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        while p.finished < p.submitted {
            p = cv.wait(p).unwrap_or_else(|e| e.into_inner());
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

/// How the caller's stream waits for a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `cuStreamWaitValue32` on a mapped word: the calling thread never waits.
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

/// A store's hand-off: side stream, worker, per-layer buffers and words.
pub struct Handoff {
    gpu: Arc<Gpu>,
    side: Stream,
    worker: Worker,
    mode: Mode,
    words: PinnedBuf,
    seq: Vec<u32>,
    slots: Vec<Option<Slot>>,
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
        let words = PinnedBuf::take(gpu, layers.max(1) * WORD_STRIDE)?;
        // SAFETY: `words` is owned here and nothing reads it yet.
        unsafe { std::ptr::write_bytes(words.host_ptr(), 0, words.len()) };
        // Probe once: a wait that is already satisfied (the word is 0) fails only where the
        // device refuses stream memory operations.
        // SAFETY: the word is mapped pinned memory owned by this hand-off.
        let mode = match unsafe { stream::wait_value_geq(side, words.dev_ptr(), 0) } {
            Ok(()) => Mode::StreamWait,
            Err(_) => Mode::Synchronous,
        };
        let worker_gpu = gpu.clone();
        let worker = Worker::start(move || {
            // The tasks wait on events: the primary context must be current here.
            let _ = worker_gpu.bind();
        })?;
        Ok(Handoff {
            gpu: gpu.clone(),
            side,
            worker,
            mode,
            words,
            seq: vec![0; layers],
            slots: (0..layers).map(|_| None).collect(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The buffers of `layer` for `rows` rows of `q_bytes` (query) and `head_dim` f32
    /// (output). Allocated on first use; a later call with other sizes is refused, since the
    /// buffers may still be in flight.
    pub fn slot(
        &mut self,
        layer: usize,
        rows: usize,
        q_bytes: usize,
        head_dim: usize,
    ) -> Result<&Slot> {
        if let Some(s) = &self.slots[layer] {
            if s.rows != rows || s.q.len() != q_bytes {
                return Err(Error::value(
                    "query",
                    format!(
                        "a shared decode of layer {layer} had {} CPU rows, now {rows}: the \
                         number of query heads must stay the same for a store",
                        s.rows
                    ),
                ));
            }
        } else {
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
    /// pinned buffer, ordered after the work queued so far on `stream`. Returns the event
    /// that marks the copy done.
    ///
    /// # Safety
    /// `query` must hold `bytes` readable bytes until the copy has run; the slot exists.
    pub unsafe fn stage_query(
        &self,
        layer: usize,
        query: u64,
        bytes: usize,
        stream: Stream,
    ) -> Result<Event> {
        let slot = self.slots[layer].as_ref().expect("slot before stage");
        self.gpu.bind()?;
        stream::order(stream, self.side)?;
        // SAFETY: the pinned buffer holds `bytes` (checked by `slot`); the caller vouches for
        // the source.
        unsafe { stream::copy_to_host_async(slot.q.host_ptr(), query, bytes, self.side)? };
        let copied = Event::new()?;
        copied.record(self.side)?;
        Ok(copied)
    }

    /// Hands `task` to the worker once `copied` is done, and makes `stream` wait for it.
    /// The task runs whatever this returns; on `Err` the stream does not wait for it.
    pub fn submit(
        &mut self,
        layer: usize,
        copied: Event,
        task: Task,
        stream: Stream,
    ) -> Result<()> {
        let task: Task = Box::new(move || {
            copied.synchronize()?;
            drop(copied);
            task()
        });
        match self.mode {
            Mode::Synchronous => {
                self.worker.run_here(task);
                Ok(())
            }
            Mode::StreamWait => {
                let seq = self.seq[layer].wrapping_add(1).max(1);
                self.seq[layer] = seq;
                let off = layer * WORD_STRIDE;
                // SAFETY: the word lies in `self.words`, which outlives the worker (`drop`
                // drains it first).
                let word = unsafe { self.words.host_ptr().add(off) } as *const AtomicU32;
                // SAFETY: as above.
                self.worker.submit(task, unsafe { Publish::new(word, seq) });
                // SAFETY: the word is mapped pinned memory of this hand-off, and the task just
                // queued publishes `seq` there on every path.
                unsafe { stream::wait_value_geq(stream, self.words.dev_ptr() + off as u64, seq) }
            }
        }
    }

    /// Waits for every task so far (not for the GPU).
    pub fn drain(&self) {
        self.worker.drain();
    }

    /// Waits for every task so far and raises the first error among them.
    pub fn finish(&self) -> Result<()> {
        self.worker.finish()
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
        self.worker.drain();
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
