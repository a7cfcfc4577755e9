//! Decode with the CPU sharing the host-resident KV, to go below the PCIe-only floor: the
//! CPU's part of the mechanism (`policy` decides when, `decode` puts the parts together).
//!
//! For kv heads `0..c` the CPU takes the keys `from[h]..len` (a suffix of each head's host
//! blocks, cut at a block boundary; `len` for a head it does not take), the GPU kernel the
//! rest, and the GPU merges the CPU's rows by their log-sum-exp. The query reaches the host
//! and the rows come back through `cuda::handoff`: no host function, and nothing waits on the
//! calling thread; only the merge on the stream waits for the worker.

use super::args::Params;
use super::cpu::attend_lse_into;
use super::policy::SharePolicy;
use crate::cuda::handoff::{Done, Handoff};
use crate::cuda::kernels::{CpuShare, Extra};
use crate::cuda::Stream;
use crate::error::{Error, Result};
use crate::quant::Q8;
use crate::store::view::{HostRun, KvRows, KvSource, Segment};
use crate::store::{DeviceLayer, StoreConfig};
use crate::tensor::{DevTensor, Element, View3};
use crate::testing::{self, FailPoint};
use std::time::Instant;

/// Keys and values of some heads, by raw address into pinned blocks, from position `from[h]`
/// on: what the worker reads, without borrowing the store (blocks outlive the task because
/// every path that frees or rewrites them first drains the worker, and the GPU writes into a
/// reused block only behind the wait that the task releases).
pub struct RawKv<E> {
    /// Per head, its runs in position order.
    pub heads: Vec<Vec<HostRun>>,
    pub head_dim: usize,
    /// The int8 layout of the rows, for an int8 store.
    pub q8: Option<Q8>,
    pub len: usize,
    pub from: Vec<usize>,
    _e: std::marker::PhantomData<E>,
}

// SAFETY: the addresses point into pinned blocks that stay allocated and unwritten while the
// task runs (see above); the worker only reads them.
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
        let mut out = Vec::new();
        let mut pos = a;
        while let Some(seg) = self.next_segment(head, pos, b) {
            pos = seg.pos + seg.len();
            out.push(seg);
        }
        out
    }
    fn next_segment(&self, head: usize, a: usize, b: usize) -> Option<Segment<'_, E>> {
        let runs = &self.heads[head];
        // Runs are in position order: the first that ends after `a`.
        let i = runs.partition_point(|&(pos, _, _, n)| pos + n <= a);
        let &(pos, k, v, n) = runs.get(i)?;
        let (lo, hi) = (a.max(pos), b.min(pos + n));
        if lo >= hi {
            return None;
        }
        let rb = match self.q8 {
            Some(fmt) => fmt.row_bytes(),
            None => self.head_dim * std::mem::size_of::<E>(),
        };
        // SAFETY: `p` addresses `n` rows of `rb` bytes of a live pinned block (see above), of
        // which rows `lo - pos..hi - pos` are taken.
        let rows = |p: *const u8| unsafe {
            KvRows::from_raw(p.add((lo - pos) * rb), hi - lo, self.head_dim, self.q8)
        };
        Some(Segment {
            pos: lo,
            k: rows(k),
            v: rows(v),
        })
    }
}

/// Addresses the worker reads or writes, moved into it.
pub struct Ptrs {
    q: usize,
    o: usize,
    lse: usize,
}

/// The CPU's part of one decode step, handed to the worker: it attends over `from[h]..len` of
/// kv heads `0..from.len()` once the query reached the host; the GPU merges its rows (`Extra`)
/// after the stream waits for `done`.
pub struct CpuPart {
    pub share: CpuShare,
    pub extra: Extra,
    pub done: Done,
}

/// Queues the CPU's part of a decode step of `layer` (`view`, through `handoff`): the query's
/// copy to the host, ordered after the work queued so far on `stream` (so call it before
/// queueing the GPU's own part, which then runs beside the CPU), and the worker's task, on the
/// threads of `pool` (rayon's global pool where `None`). The stream does not wait for the rows
/// yet: `Handoff::wait_done` before the merge.
///
/// # Safety
/// `query` (`[num_q_heads, 1, head_dim]`, contiguous) must be a valid device tensor alive
/// until `stream` has run the copy.
#[allow(clippy::too_many_arguments)]
pub unsafe fn queue_cpu<E: Element>(
    view: &DeviceLayer<'_>,
    handoff: &mut Handoff,
    layer: usize,
    cfg: &StoreConfig,
    query: DevTensor,
    group: usize,
    params: &Params,
    from: &[usize],
    policy: &SharePolicy,
    stream: Stream,
) -> Result<CpuPart> {
    let (h, d) = (cfg.num_kv_heads, cfg.head_dim);
    if E::DTYPE != cfg.dtype {
        return Err(Error::type_("query", "dtype differs from the store's"));
    }
    if query.s0 != d as i64 {
        return Err(Error::value(
            "query",
            "a shared decode takes one contiguous query per head ([num_q_heads, 1, head_dim])",
        ));
    }
    if from.is_empty() || from.len() > h.min(crate::cuda::kernels::MAX_CPU_HEADS) {
        return Err(Error::value("cpu_heads", "has more entries than kv heads"));
    }
    // The worker's view: each CPU head's host blocks from `from[h]` on.
    let mut heads = Vec::with_capacity(from.len());
    for (hi, &f) in from.iter().enumerate() {
        let runs = view.host_runs(hi, f).ok_or_else(|| {
            Error::value(
                "cpu_heads",
                format!("kv head {hi} of layer {layer} has a device block after position {f}"),
            )
        })?;
        heads.push(runs);
    }
    let len = view.len();
    let kv = RawKv::<E> {
        heads,
        head_dim: d,
        q8: cfg.q8(),
        len,
        from: from.iter().map(|&f| f.min(len)).collect(),
        _e: std::marker::PhantomData,
    };
    let mut share = CpuShare::NONE;
    share.heads = from.len() as i32;
    for (s, &f) in share.from.iter_mut().zip(from) {
        *s = f as i64;
    }
    let rows = group * from.len();
    let q_bytes = rows * d * cfg.dtype.size();
    let slot = handoff.slot(layer, rows, q_bytes, d)?;
    let ptrs = Ptrs {
        q: slot.q.host_ptr() as usize,
        o: slot.o.host_ptr() as usize,
        lse: slot.lse.host_ptr() as usize,
    };
    let extra = Extra {
        o: slot.o.dev_ptr(),
        lse: slot.lse.dev_ptr(),
        rows,
    };
    let params = *params;
    // Bytes the task reads: each head's visible keys from `from[h]` on, keys and values.
    let lo = params.window.map_or(0, |w| len.saturating_sub(w));
    let tokens: usize = kv.from.iter().map(|&f| len - f.max(lo).min(len)).sum();
    let bytes = (tokens * 2 * cfg.row_bytes()) as f64;
    let (pool, meter) = (policy.pool.clone(), policy.meter.clone());
    // SAFETY: the query rows of the CPU heads come first and are contiguous (checked), `q_bytes`
    // of them; the caller vouches for the tensor.
    let copied = unsafe { handoff.stage_query(layer, query.ptr, q_bytes, stream)? };
    let task = Box::new(move || {
        let t = Instant::now();
        let r = match &pool {
            Some(p) => p.install(|| compute::<E>(&ptrs, rows, d, &kv, &params)),
            None => compute::<E>(&ptrs, rows, d, &kv, &params),
        };
        if r.is_ok() {
            meter.record(layer, bytes, t, Instant::now());
        }
        r
    });
    let done = handoff.submit_task(layer, copied, task)?;
    Ok(CpuPart { share, extra, done })
}

/// The worker's part, once the query is on the host: attend, write the rows.
fn compute<E: Element>(
    p: &Ptrs,
    rows: usize,
    head_dim: usize,
    kv: &RawKv<E>,
    params: &Params,
) -> Result<()> {
    testing::check(FailPoint::CpuShare)?;
    if testing::hit(FailPoint::CpuSharePanic) {
        panic!("injected panic in the CPU share worker (test-only hook)");
    }
    // SAFETY: the pinned query buffer holds `rows` rows, copied in full (the task waited).
    let q = unsafe { std::slice::from_raw_parts(p.q as *const E, rows * head_dim) };
    // Decode: one query per row, at the last position.
    // No sinks here: the GPU's merge folds them in, once per row.
    // Straight into the pinned buffers: nothing is allocated per step.
    // SAFETY: the pinned output buffers hold `rows` rows and `rows` values; the GPU reads
    // them only after this task publishes, and the next task of this layer starts only after
    // the GPU has passed this step's merge (its query copy is ordered after it).
    let (out, lse) = unsafe {
        (
            std::slice::from_raw_parts_mut(p.o as *mut f32, rows * head_dim),
            std::slice::from_raw_parts_mut(p.lse as *mut f32, rows),
        )
    };
    attend_lse_into(
        View3::contiguous(q, [rows, 1, head_dim]),
        kv,
        params,
        None,
        out,
        lse,
    )
}
