//! Decode with the CPU sharing the host-resident KV, to go below the PCIe-only floor.
//!
//! The GPU decode kernel reads pinned host blocks over PCIe (about 51 GB/s on the H200 host);
//! the host's cores can read the same memory at the same time (about 38 GB/s on 16 cores).
//! For kv heads `0..c` the CPU takes the keys from their first host block on, the GPU kernel
//! the rest, and the GPU merges the CPU's rows by their log-sum-exp. Nothing waits on the
//! calling thread: the query goes to the host on a side stream, a worker computes the CPU's
//! share, and a host function on the caller's stream holds back only the merge until the
//! worker is done, so Python keeps queueing the next layers meanwhile.

use super::memory::{DeviceBuf, PinnedBuf};
use super::{driver_err, Gpu, Stream};
use crate::cpu::attention::{attend_lse, KvSource, Params, Segment};
use crate::error::{Error, Result};
use crate::tensor::{Element, Rows, View3};
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use std::sync::{Arc, Condvar, Mutex};

/// Keys and values of some heads, by raw address into pinned blocks, from position `from[h]`
/// on: what the worker reads, without borrowing the store (blocks outlive the job because
/// every path that frees or rewrites them first waits for the stream, which waits for the job).
pub struct RawKv<E> {
    /// Per head: (position, key rows, value rows, rows) of each block run.
    pub heads: Vec<Vec<(usize, *const E, *const E, usize)>>,
    pub head_dim: usize,
    pub len: usize,
    pub from: Vec<usize>,
}

// SAFETY: the addresses point into pinned blocks that stay allocated and unwritten while the
// job runs (see above); the worker only reads them.
unsafe impl<E> Send for RawKv<E> {}
// SAFETY: as above.
unsafe impl<E> Sync for RawKv<E> {}

impl<E: Element> KvSource<E> for RawKv<E> {
    fn num_kv_heads(&self) -> usize {
        self.heads.len()
    }
    fn head_dim(&self) -> usize {
        self.head_dim
    }
    fn len(&self) -> usize {
        self.len
    }
    fn start(&self) -> usize {
        0
    }
    fn head_start(&self, head: usize) -> usize {
        self.from[head]
    }
    fn segments(&self, head: usize, a: usize, b: usize) -> Vec<Segment<'_, E>> {
        let d = self.head_dim;
        let mut out = Vec::new();
        for &(pos, k, v, n) in &self.heads[head] {
            let (lo, hi) = (a.max(pos), b.min(pos + n));
            if lo >= hi {
                continue;
            }
            let rows = |p: *const E| Rows {
                // SAFETY: `p` addresses `n` rows of `d` elements of a live pinned block.
                data: unsafe { std::slice::from_raw_parts(p.add((lo - pos) * d), (hi - lo) * d) },
                stride: d,
                len: hi - lo,
                width: d,
            };
            out.push(Segment {
                pos: lo,
                k: rows(k),
                v: rows(v),
            });
        }
        out
    }
}

/// Per layer: the host and device buffers of the CPU's rows.
pub struct ShareBufs {
    rows: usize,
    q_host: PinnedBuf,
    o_host: PinnedBuf,
    lse_host: PinnedBuf,
    o_dev: DeviceBuf,
    lse_dev: DeviceBuf,
}

type Task = Box<dyn FnOnce() + Send>;

/// A store's side stream, buffers, worker thread, and the error of a failed task (raised on the
/// next call).
///
/// The worker is a thread of its own, not a rayon task: a task blocks until its query reaches
/// the host, and a blocked rayon worker can hold up the parallel work of an earlier task it was
/// helping with (rayon steals while joining), which waits on it in turn. One thread takes the
/// tasks in order; the attention inside each still runs on rayon's pool.
pub struct ShareState {
    side: sys::CUstream,
    bufs: Vec<Option<ShareBufs>>,
    error: Arc<Mutex<Option<String>>>,
    tasks: Option<std::sync::mpsc::Sender<Task>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

// SAFETY: the side stream is a driver handle usable from any thread.
unsafe impl Send for ShareState {}
// SAFETY: as above.
unsafe impl Sync for ShareState {}

impl Drop for ShareState {
    fn drop(&mut self) {
        // Closing the queue ends the worker once its tasks are done (the store synchronized
        // the device first, so there are none left).
        self.tasks.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        // SAFETY: created in `new`, destroyed once; the store synchronized the device first.
        let _ = unsafe { cu::stream::destroy(self.side) };
    }
}

struct Job {
    done: Mutex<bool>,
    cv: Condvar,
}

unsafe extern "C" fn wait_job(arg: *mut std::ffi::c_void) {
    // SAFETY: `arg` is the `Arc<Job>` leaked by `run` for this call; reclaimed exactly once.
    let job = unsafe { Arc::from_raw(arg as *const Job) };
    // Never panic here (this runs on the driver's thread): a poisoned lock still holds the flag.
    let mut done = job.done.lock().unwrap_or_else(|e| e.into_inner());
    while !*done {
        done = job.cv.wait(done).unwrap_or_else(|e| e.into_inner());
    }
}

/// Addresses the worker writes or reads, moved into it.
struct Ptrs {
    q: usize,
    o: usize,
    lse: usize,
    copied: usize,
}

impl ShareState {
    pub fn new(gpu: &Arc<Gpu>, layers: usize) -> Result<Self> {
        gpu.bind()?;
        let side = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| driver_err("creating the share stream", e))?;
        let (tx, rx) = std::sync::mpsc::channel::<Task>();
        let worker_gpu = gpu.clone();
        let worker = std::thread::Builder::new()
            .name("headinfer-cpu-share".into())
            .spawn(move || {
                // The tasks wait on events: the primary context must be current here.
                let _ = worker_gpu.bind();
                for task in rx {
                    task();
                }
            })
            .map_err(|e| Error::Cuda(format!("starting the CPU share worker: {e}")))?;
        Ok(ShareState {
            side,
            bufs: (0..layers).map(|_| None).collect(),
            error: Arc::new(Mutex::new(None)),
            tasks: Some(tx),
            worker: Some(worker),
        })
    }

    /// Raises the error of an earlier worker, if one failed.
    pub fn check(&self) -> Result<()> {
        match self.error.lock().expect("error lock").take() {
            Some(e) => Err(Error::Cuda(format!(
                "the CPU share of an earlier decode failed: {e}"
            ))),
            None => Ok(()),
        }
    }

    /// Queues the CPU's share of one layer's decode and the copy of its rows to the GPU.
    /// Returns the device addresses of those rows: (output `[rows, head_dim]` f32, lse `[rows]`).
    ///
    /// # Safety
    /// `query` must be a contiguous device tensor whose first `rows` rows are the CPU heads'
    /// queries, alive until `stream` reaches this work; `kv` must address live pinned blocks.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run<E: Element>(
        &mut self,
        gpu: &Arc<Gpu>,
        layer: usize,
        query: u64,
        rows: usize,
        kv: RawKv<E>,
        params: Params,
        stream: Stream,
    ) -> Result<(u64, u64)> {
        let dtype = E::DTYPE;
        let head_dim = kv.head_dim;
        let need = rows;
        let fits = self.bufs[layer].as_ref().is_some_and(|b| b.rows >= need);
        if !fits {
            self.bufs[layer] = Some(ShareBufs {
                rows: need,
                q_host: PinnedBuf::take(gpu, need * head_dim * dtype.size())?,
                o_host: PinnedBuf::take(gpu, need * head_dim * 4)?,
                lse_host: PinnedBuf::take(gpu, need * 4)?,
                o_dev: DeviceBuf::new(gpu, need * head_dim * 4)?,
                lse_dev: DeviceBuf::new(gpu, need * 4)?,
            });
        }
        let b = self.bufs[layer].as_ref().expect("allocated above");
        let err = |e| driver_err("queueing the CPU share", e);
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let ready = cu::event::create(flags).map_err(err)?;
        let copied = cu::event::create(flags).map_err(err)?;
        // SAFETY: valid streams and events of this context; the copy reads `rows` query rows
        // (contiguous, per the caller) into a pinned buffer of that size.
        unsafe {
            cu::event::record(ready, stream.0).map_err(err)?;
            cu::stream::wait_event(
                self.side,
                ready,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(err)?;
            sys::cuMemcpyDtoHAsync_v2(
                b.q_host.host_ptr() as *mut _,
                query,
                rows * head_dim * dtype.size(),
                self.side,
            )
            .result()
            .map_err(err)?;
            cu::event::record(copied, self.side).map_err(err)?;
            cu::event::destroy(ready).map_err(err)?;
        }
        let job = Arc::new(Job {
            done: Mutex::new(false),
            cv: Condvar::new(),
        });
        let ptrs = Ptrs {
            q: b.q_host.host_ptr() as usize,
            o: b.o_host.host_ptr() as usize,
            lse: b.lse_host.host_ptr() as usize,
            copied: copied as usize,
        };
        let (worker_job, error) = (job.clone(), self.error.clone());
        let task: Task = Box::new(move || {
            // A panic must still release the stream, or it would wait forever.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                compute::<E>(&ptrs, rows, head_dim, &kv, &params)
            }))
            .unwrap_or_else(|_| Err(Error::Cuda("the CPU share worker panicked".into())));
            if let Err(e) = result {
                // SAFETY: `rows` f32 of the pinned lse buffer; -inf makes the merge skip them.
                let lse = unsafe { std::slice::from_raw_parts_mut(ptrs.lse as *mut f32, rows) };
                lse.fill(f32::NEG_INFINITY);
                *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
            *worker_job.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
            worker_job.cv.notify_all();
        });
        if let Err(std::sync::mpsc::SendError(task)) = self.tasks.as_ref().expect("open").send(task)
        {
            // The worker is gone: run the task here rather than leave the stream waiting.
            task();
        }
        // SAFETY: `wait_job` reclaims the leaked Arc once; the copies move `rows` rows from
        // pinned buffers the worker has finished with (the host function ran first) into
        // device buffers of that size, all ordered on `stream`.
        unsafe {
            cu::stream::launch_host_function(stream.0, wait_job, Arc::into_raw(job) as *mut _)
                .map_err(err)?;
            sys::cuMemcpyHtoDAsync_v2(
                b.o_dev.ptr(),
                b.o_host.host_ptr() as *const _,
                rows * head_dim * 4,
                stream.0,
            )
            .result()
            .map_err(err)?;
            sys::cuMemcpyHtoDAsync_v2(
                b.lse_dev.ptr(),
                b.lse_host.host_ptr() as *const _,
                rows * 4,
                stream.0,
            )
            .result()
            .map_err(err)?;
        }
        Ok((b.o_dev.ptr(), b.lse_dev.ptr()))
    }
}

/// The worker: waits for the query to reach the host, attends, writes the rows.
fn compute<E: Element>(
    p: &Ptrs,
    rows: usize,
    head_dim: usize,
    kv: &RawKv<E>,
    params: &Params,
) -> Result<()> {
    let copied = p.copied as sys::CUevent;
    // SAFETY: `copied` was recorded on the side stream after the query copy; destroyed once.
    unsafe {
        cu::event::synchronize(copied).map_err(|e| driver_err("waiting for the query", e))?;
        let _ = cu::event::destroy(copied);
    }
    // Decode: one query per row, at the last position.
    let q_len = 1;
    // SAFETY: the pinned query buffer holds `rows` rows, copied in full (event above).
    let q = unsafe { std::slice::from_raw_parts(p.q as *const E, rows * head_dim) };
    let (out, lse) = attend_lse(View3::contiguous(q, [rows, q_len, head_dim]), kv, params)?;
    // SAFETY: the pinned output buffers hold `rows` rows and `rows` values; nothing else
    // touches them until the host function releases the stream.
    unsafe {
        std::slice::from_raw_parts_mut(p.o as *mut f32, rows * head_dim).copy_from_slice(&out);
        std::slice::from_raw_parts_mut(p.lse as *mut f32, rows).copy_from_slice(&lse);
    }
    Ok(())
}
