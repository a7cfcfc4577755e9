//! Exact attention of one layer's queries over its keys, on the CPU: the kernel over any
//! `KvSource` (a CPU store's layer, explicit tensors, or the host share of a CUDA store's
//! layer).
//!
//! Flash-attention's tiling with an online softmax: queries of one GQA group are processed
//! together as rows (so each K/V tile is converted once for all heads sharing it), keys in
//! tiles of `TK`, accumulation in f32. Work is split over (kv head, query tile) and, when
//! that leaves cores idle (decode), over key ranges whose partial results merge by
//! log-sum-exp. The caller releases the GIL around `attend`.
//!
//! The hot loops (scores, `p . V`) are `cpu::simd`'s, for the instruction set detected at run
//! time; each task's scratch is the worker thread's, and a decode's partial results the
//! calling thread's, reused from step to step: a decode step allocates only its result.

use super::args::{check_shapes, check_sinks, Params};
use crate::cpu::math::{exp_tile, softcap_tile, TK};
use crate::cpu::simd::{Isa, Job, Kernels};
use crate::error::{Error, Result};
use crate::store::view::{KvRows, KvSource, Segment};
use crate::tensor::{Element, Rows, View3};
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows (queries x heads of a GQA group) processed together in one task.
const ROWS_PER_TASK: usize = 48;
/// Shortest key range worth a task of its own when splitting along the sequence.
const MIN_KEYS_PER_SPLIT: usize = 512;
/// Tasks a thread gets in a call split along the sequence: enough that the last wave leaves
/// little idle, few enough that each task's start (cold rows, its partial results) stays small.
const TASKS_PER_THREAD: usize = 8;
/// Below this many rows a task reads K and V in place instead of converting tiles.
const DIRECT_BELOW_ROWS: usize = 8;

/// Keys and values given as tensors, each `[num_kv_heads, kv_len, head_dim]`.
pub struct DenseKv<'a, E> {
    k: View3<'a, E>,
    v: View3<'a, E>,
}

impl<'a, E: Element> DenseKv<'a, E> {
    pub fn new(k: View3<'a, E>, v: View3<'a, E>) -> Result<Self> {
        if v.shape != k.shape {
            return Err(Error::value(
                "value",
                format!("shape {:?} differs from key's {:?}", v.shape, k.shape),
            ));
        }
        Ok(DenseKv { k, v })
    }
}

impl<E: Element> KvSource<E> for DenseKv<'_, E> {
    fn num_kv_heads(&self) -> usize {
        self.k.shape[0]
    }
    fn head_dim(&self) -> usize {
        self.k.shape[2]
    }
    fn len(&self) -> usize {
        self.k.shape[1]
    }
    fn start(&self) -> usize {
        0
    }
    fn segments(&self, head: usize, a: usize, b: usize) -> Vec<Segment<'_, E>> {
        self.next_segment(head, a, b).into_iter().collect()
    }
    fn next_segment(&self, head: usize, a: usize, b: usize) -> Option<Segment<'_, E>> {
        let b = b.min(self.len());
        (a < b).then(|| Segment {
            pos: a,
            k: KvRows::Plain(self.k.rows(head).slice(a, b)),
            v: KvRows::Plain(self.v.rows(head).slice(a, b)),
        })
    }
}

/// Attention of `query` (`[num_q_heads, q_len, head_dim]`) over every key of `kv`.
///
/// Query `i` sits at position `kv.len() - q_len + i`. `sinks` (`[num_q_heads]`, gpt-oss's
/// learned sink logits) adds `exp(sinks[h])` to every softmax denominator of query head `h`
/// (a logit with no value). Returns the output as row-major `[num_q_heads, q_len, head_dim]`
/// f32.
pub fn attend<E: Element, S: KvSource<E>>(
    query: View3<'_, E>,
    kv: &S,
    params: &Params,
    sinks: Option<&[f32]>,
) -> Result<Vec<f32>> {
    check(query.shape[0], query.shape[1], query.shape[2], kv, params)?;
    check_sinks(sinks, query.shape[0])?;
    Ok(attend_lse(query, kv, params, sinks)?.0)
}

/// As `attend`, without the argument checks (the caller made them), also returning each row's
/// log-sum-exp (`[num_q_heads, q_len]`, the sink included), so that partial results over
/// disjoint key sets merge exactly. A row that sees no key of `kv` gets zeros and a log-sum-exp
/// of minus infinity (of its sink, with `sinks`). The sink enters once per row, in the final
/// merge of the row's key ranges: a caller merging partial results of its own passes `None`
/// and folds the sink in once itself.
pub fn attend_lse<E: Element, S: KvSource<E>>(
    query: View3<'_, E>,
    kv: &S,
    params: &Params,
    sinks: Option<&[f32]>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    attend_lse_on(Isa::best(), query, kv, params, sinks)
}

/// As `attend_lse`, into the caller's `out` (`[num_q_heads, q_len, head_dim]`) and `lse`
/// (`[num_q_heads, q_len]`): with buffers kept from step to step, a decode step allocates
/// nothing at all.
pub fn attend_lse_into<E: Element, S: KvSource<E>>(
    query: View3<'_, E>,
    kv: &S,
    params: &Params,
    sinks: Option<&[f32]>,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let [hq, lq, d] = query.shape;
    if out.len() != hq * lq * d {
        return Err(Error::value(
            "out",
            format!("holds {} values, the output has {}", out.len(), hq * lq * d),
        ));
    }
    if lse.len() != hq * lq {
        return Err(Error::value(
            "lse",
            format!("holds {} values, one per row is {}", lse.len(), hq * lq),
        ));
    }
    run(Isa::best(), query, kv, params, sinks, out, lse);
    Ok(())
}

/// `attend_lse` on the instruction set `isa` instead of the best one detected, with
/// `attend`'s checks, so tests and benchmarks compare the sets; an error naming `isa` if this
/// CPU lacks it.
pub fn attend_lse_on<E: Element, S: KvSource<E>>(
    isa: Isa,
    query: View3<'_, E>,
    kv: &S,
    params: &Params,
    sinks: Option<&[f32]>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    check(query.shape[0], query.shape[1], query.shape[2], kv, params)?;
    check_sinks(sinks, query.shape[0])?;
    if !isa.supported() {
        return Err(Error::value(
            "isa",
            format!("this CPU does not support {}", isa.name()),
        ));
    }
    let [hq, lq, d] = query.shape;
    let mut out = vec![0f32; hq * lq * d];
    let mut lse = vec![f32::NEG_INFINITY; hq * lq];
    run(isa, query, kv, params, sinks, &mut out, &mut lse);
    Ok((out, lse))
}

fn check<E: Element, S: KvSource<E>>(
    hq: usize,
    lq: usize,
    d: usize,
    kv: &S,
    params: &Params,
) -> Result<()> {
    if d != kv.head_dim() {
        return Err(Error::value(
            "query",
            format!("head_dim is {d}, the keys have {}", kv.head_dim()),
        ));
    }
    check_shapes(hq, lq, kv.num_kv_heads(), kv.len(), kv.start(), params)
}

struct TaskSpec {
    kvh: usize,
    q0: usize,
    q1: usize,
    /// Key positions `a..b`.
    a: usize,
    b: usize,
}

/// One call's tasks and their partial results (per task, `rows` slots of: the unnormalised
/// output `[rows, head_dim]`, the running max and the running sum), kept by the calling thread.
#[derive(Default)]
struct CallScratch {
    tasks: Vec<TaskSpec>,
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl CallScratch {
    fn bytes(&self) -> usize {
        (self.o.capacity() + self.m.capacity() + self.l.capacity()) * 4
            + self.tasks.capacity() * std::mem::size_of::<TaskSpec>()
    }
}

/// One task's working memory, kept by the worker thread.
#[derive(Default)]
struct TaskScratch {
    /// The task's query rows, scaled, as f32: `[rows, head_dim]`.
    qf: Vec<f32>,
    /// Per row, the key positions it sees.
    bounds: Vec<(usize, usize)>,
    /// Per row, a tile's scores, then probabilities: `[rows, TK]`.
    s: Vec<f32>,
    /// Many rows: a key tile as f32, transposed (`[head_dim, TK]`) ...
    kt: Vec<f32>,
    /// ... and a value tile as f32 (`[TK, head_dim]`).
    vf: Vec<f32>,
    /// Int8 rows: a key tile and a value tile dequantized (`[TK, head_dim]` each).
    kq: Vec<f32>,
    vq: Vec<f32>,
    /// Int8 decode: the kernels' scratch.
    q8: Vec<f32>,
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// A calling thread keeps its partial results' buffers up to this size between calls (a
/// decode's are far smaller); a larger call (a long CPU prefill) frees them when it ends.
const KEEP_CALL_BYTES: usize = 16 << 20;

thread_local! {
    static CALL: RefCell<CallScratch> = RefCell::new(CallScratch::default());
    static TASK: RefCell<TaskScratch> = RefCell::new(TaskScratch::default());
}

/// `attend_lse`'s work into `out` and `lse` (of the right lengths), on a supported `isa`.
fn run<E: Element, S: KvSource<E>>(
    isa: Isa,
    query: View3<'_, E>,
    kv: &S,
    params: &Params,
    sinks: Option<&[f32]>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let mut go = |c: &mut CallScratch| run_with(c, isa, query, kv, params, sinks, out, lse);
    CALL.with(|cell| match cell.try_borrow_mut() {
        Ok(mut c) => {
            go(&mut c);
            if c.bytes() > KEEP_CALL_BYTES {
                *c = CallScratch::default();
            }
        }
        // This thread is inside a call already (a rayon worker that took another call's work
        // while it waits): this call gets buffers of its own.
        Err(_) => go(&mut CallScratch::default()),
    })
}

#[allow(clippy::too_many_arguments)]
fn run_with<E: Element, S: KvSource<E>>(
    c: &mut CallScratch,
    isa: Isa,
    query: View3<'_, E>,
    kv: &S,
    params: &Params,
    sinks: Option<&[f32]>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    out.fill(0.0);
    lse.fill(f32::NEG_INFINITY);
    let [hq, lq, d] = query.shape;
    let hkv = kv.num_kv_heads();
    if out.is_empty() {
        return;
    }
    let g = hq / hkv;
    let tq = (ROWS_PER_TASK / g).clamp(1, lq);
    let ntiles = lq.div_ceil(tq);
    let first_pos = kv.len() - lq;
    let threads = rayon::current_num_threads();

    // Tasks: (kv head, query tile, key range), the key ranges of one tile adjacent.
    let CallScratch { tasks, o, m, l } = c;
    tasks.clear();
    let range = |kvh: usize, t: usize| {
        let (q0, q1) = (t * tq, ((t + 1) * tq).min(lq));
        let lo = params
            .window
            .map_or(0, |w| (first_pos + q0 + 1).saturating_sub(w))
            .max(kv.head_start(kvh));
        (q0, q1, lo, (first_pos + q1).max(lo))
    };
    let base = hkv * ntiles;
    // Fewer (head, tile) pairs than twice the threads (a decode): the key ranges are cut into
    // about `TASKS_PER_THREAD` tasks a thread, of about equal keys, so that the threads finish
    // together (two or three tasks a thread left one wave of a third of them idle: 32 tasks
    // on 15 threads take three waves where 2.1 would do).
    let per_task = if base >= 2 * threads {
        usize::MAX
    } else {
        let keys: usize = (0..hkv)
            .flat_map(|h| (0..ntiles).map(move |t| (h, t)))
            .map(|(h, t)| {
                let (_, _, lo, hi) = range(h, t);
                hi - lo
            })
            .sum();
        (keys / (threads * TASKS_PER_THREAD)).max(MIN_KEYS_PER_SPLIT)
    };
    for kvh in 0..hkv {
        for t in 0..ntiles {
            let (q0, q1, lo, hi) = range(kvh, t);
            let splits = (hi - lo).div_ceil(per_task).max(1);
            let step = (hi - lo).div_ceil(splits).div_ceil(TK) * TK;
            let mut a = lo;
            loop {
                let b = (a + step).min(hi);
                tasks.push(TaskSpec { kvh, q0, q1, a, b });
                a = b;
                if a >= hi {
                    break;
                }
            }
        }
    }

    // Every task has `slots` rows of partial results; the last query tile may use fewer.
    let slots = tq * g;
    let n = tasks.len();
    grow(o, n * slots * d);
    grow(m, n * slots);
    grow(l, n * slots);
    let (o, m, l) = (
        &mut o[..n * slots * d],
        &mut m[..n * slots],
        &mut l[..n * slots],
    );
    tasks
        .par_iter()
        .zip(o.par_chunks_mut(slots * d))
        .zip(m.par_chunks_mut(slots))
        .zip(l.par_chunks_mut(slots))
        .for_each(|(((t, o), m), l)| {
            let task = Task {
                q: &query,
                kv,
                params,
                g,
                first_pos,
                t,
            };
            run_task(isa, task, Part { o, m, l })
        });

    // Merge the key ranges of each (kv head, query tile) and normalise.
    let mut i = 0;
    while i < n {
        let (kvh, q0, q1) = (tasks[i].kvh, tasks[i].q0, tasks[i].q1);
        let mut j = i + 1;
        while j < n && tasks[j].kvh == kvh && tasks[j].q0 == q0 {
            j += 1;
        }
        let rows = (q1 - q0) * g;
        for r in 0..rows {
            let (qi, gh) = (q0 + r / g, r % g);
            // The sink: one more logit of this row, with no value (once, here).
            let sink = sinks.map_or(f32::NEG_INFINITY, |s| s[kvh * g + gh]);
            let mx = (i..j).map(|p| m[p * slots + r]).fold(sink, f32::max);
            let dst = &mut out[((kvh * g + gh) * lq + qi) * d..][..d];
            let mut sum = if sink == f32::NEG_INFINITY {
                0f32
            } else {
                (sink - mx).exp()
            };
            for p in i..j {
                let pm = m[p * slots + r];
                if pm == f32::NEG_INFINITY {
                    continue;
                }
                let w = (pm - mx).exp();
                sum += l[p * slots + r] * w;
                let src = &o[(p * slots + r) * d..][..d];
                for (o, &x) in dst.iter_mut().zip(src) {
                    *o += x * w;
                }
            }
            // sum == 0 only where a share of the keys holds none this row sees (and no sink).
            if sum > 0.0 {
                let inv = 1.0 / sum;
                dst.iter_mut().for_each(|o| *o *= inv);
                lse[(kvh * g + gh) * lq + qi] = mx + sum.ln();
            }
        }
        i = j;
    }
}

/// A task's partial results: `o` `[rows, head_dim]`, `m` and `l` `[rows]` (at least).
struct Part<'a> {
    o: &'a mut [f32],
    m: &'a mut [f32],
    l: &'a mut [f32],
}

/// Runs one task on `isa` with this worker's scratch.
fn run_task<E: Element, S: KvSource<E>>(isa: Isa, task: Task<'_, '_, E, S>, part: Part<'_>) {
    TASK.with(|cell| {
        let (mut fresh, mut held);
        // A worker inside a task already (rayon work-stealing while it waits) gets its own.
        let sc = match cell.try_borrow_mut() {
            Ok(b) => {
                held = b;
                &mut *held
            }
            Err(_) => {
                fresh = TaskScratch::default();
                &mut fresh
            }
        };
        // Compiled for `isa` as a whole (`Isa::run` checks that the CPU has it).
        isa.run(TaskJob { task, part, sc })
    })
}

/// What a task reads: the queries, the keys and values, and where its rows sit.
struct Task<'a, 'q, E, S> {
    q: &'a View3<'q, E>,
    kv: &'a S,
    params: &'a Params,
    g: usize,
    first_pos: usize,
    t: &'a TaskSpec,
}

/// `task_impl` as a `Job`, so that it is compiled for the instruction set it runs on.
struct TaskJob<'a, 'q, 'p, E, S> {
    task: Task<'a, 'q, E, S>,
    part: Part<'p>,
    sc: &'a mut TaskScratch,
}

impl<E: Element, S: KvSource<E>> Job for TaskJob<'_, '_, '_, E, S> {
    type Output = ();

    #[inline(always)]
    unsafe fn run<K: Kernels>(self) {
        // SAFETY: the CPU supports K's set (this function's contract).
        unsafe { task_impl::<E, S, K>(&self.task, self.part, self.sc) }
    }
}

/// `a * b + c`, fused where `fma` (a constant of the instruction set) says so.
#[inline(always)]
fn fmadd(fma: bool, a: f32, b: f32, c: f32) -> f32 {
    if fma {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// One task: rows `(q1 - q0) * g` over keys `a..b` of kv head `kvh`, into `part`.
///
/// # Safety
/// `K`'s instruction set is the CPU's (its caller, a `Job`, runs inside `K::run`, compiled
/// for it).
#[inline(always)]
unsafe fn task_impl<E: Element, S: KvSource<E>, K: Kernels>(
    task: &Task<'_, '_, E, S>,
    part: Part<'_>,
    sc: &mut TaskScratch,
) {
    let Task {
        q,
        kv,
        params,
        g,
        first_pos,
        t,
    } = *task;
    let d = q.shape[2];
    let rows = (t.q1 - t.q0) * g;
    // Few rows (decode): read K and V where they lie. Many rows (prefill): convert each
    // tile once, K transposed, so every row's scores are contiguous FMAs.
    let direct = rows < DIRECT_BELOW_ROWS;
    grow(&mut sc.qf, rows * d);
    grow(&mut sc.bounds, rows);
    grow(&mut sc.s, rows * TK);
    if !direct {
        grow(&mut sc.kt, d * TK);
        grow(&mut sc.vf, TK * d);
    }
    grow(&mut sc.kq, TK * d);
    grow(&mut sc.vq, TK * d);
    let qf = &mut sc.qf[..rows * d];
    let bounds = &mut sc.bounds[..rows];
    let s = &mut sc.s[..rows * TK];
    let (kt, vf) = (&mut sc.kt, &mut sc.vf);
    let (kq, vq) = (&mut sc.kq, &mut sc.vq);
    let q8 = &mut sc.q8;
    // Row r is query q0 + r / g of q head kvh * g + r % g.
    for r in 0..rows {
        let src = q.row(t.kvh * g + r % g, t.q0 + r / g);
        for (x, &y) in qf[r * d..(r + 1) * d].iter_mut().zip(src) {
            *x = y.to_f32() * params.scale;
        }
        let pos = first_pos + t.q0 + r / g;
        let lo = params.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        bounds[r] = (lo, pos + 1);
    }
    let (o, m, l) = (
        &mut part.o[..rows * d],
        &mut part.m[..rows],
        &mut part.l[..rows],
    );
    o.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);

    // The online softmax of rows `r0..r1` over a tile's scores (`n` keys from `c0`).
    macro_rules! softmax {
        ($n:expr, $c0:expr, $r0:expr, $r1:expr) => {{
            let (n, c0) = ($n, $c0);
            for r in $r0..$r1 {
                let (lo, hi) = bounds[r];
                let sr: &mut [f32; TK] = (&mut s[r * TK..(r + 1) * TK]).try_into().expect("TK");
                softmax_tile(
                    sr,
                    n,
                    c0,
                    lo,
                    hi,
                    params.softcap,
                    &mut m[r],
                    &mut l[r],
                    &mut o[r * d..(r + 1) * d],
                );
            }
        }};
    }

    // One tile: keys `kr`, values `vr` (`Rows` of any element type), `n` keys from `c0`,
    // seen by rows `r0..r1`. A macro, not a function: it is instantiated for the store's
    // element type and for f32 (int8 tiles, dequantized first), inside this ISA-compiled body.
    macro_rules! tile {
        ($kr:expr, $vr:expr, $n:expr, $c0:expr, $r0:expr, $r1:expr) => {{
            let (kr, vr, n, c0, r0, r1) = ($kr, $vr, $n, $c0, $r0, $r1);
            if direct {
                // SAFETY: K's instruction set is the CPU's (this function's contract).
                unsafe { K::scores(&qf[r0 * d..r1 * d], r1 - r0, kr, n, &mut s[r0 * TK..]) };
            } else {
                for j in 0..n {
                    for (dd, &x) in kr.row(j).iter().enumerate() {
                        kt[dd * TK + j] = x.to_f32();
                    }
                    for (y, &x) in vf[j * d..(j + 1) * d].iter_mut().zip(vr.row(j)) {
                        *y = x.to_f32();
                    }
                }
                for r in r0..r1 {
                    let sr: &mut [f32; TK] = (&mut s[r * TK..(r + 1) * TK]).try_into().expect("TK");
                    *sr = [0f32; TK];
                    for (dd, &qd) in qf[r * d..(r + 1) * d].iter().enumerate() {
                        let ktr: &[f32; TK] = kt[dd * TK..(dd + 1) * TK].try_into().expect("TK");
                        for j in 0..TK {
                            sr[j] = fmadd(K::FMA, qd, ktr[j], sr[j]);
                        }
                    }
                }
            }
            softmax!(n, c0, r0, r1);
            // SAFETY: K's instruction set is the CPU's (this function's contract).
            unsafe {
                if direct {
                    K::pv(&s[r0 * TK..], r1 - r0, vr, n, &mut o[r0 * d..r1 * d]);
                } else {
                    let vt = Rows {
                        data: &vf[..n * d],
                        stride: d,
                        len: n,
                        width: d,
                    };
                    K::pv(&s[r0 * TK..], r1 - r0, &vt, n, &mut o[r0 * d..r1 * d]);
                }
            }
        }};
    }

    let mut next = kv.next_segment(t.kvh, t.a, t.b);
    while let Some(seg) = next.take() {
        if seg.is_empty() {
            break;
        }
        // The segment after this one, known now: its first rows are the ones to bring into
        // cache during this one's last tile (int8 decode).
        next = kv.next_segment(t.kvh, seg.pos + seg.len(), t.b);
        let mut off = 0;
        while off < seg.len() {
            let n = TK.min(seg.len() - off);
            let c0 = seg.pos + off;
            let sees = |&(lo, hi): &(usize, usize)| c0 < hi && c0 + n > lo;
            // The rows that see a key of this tile: one run, as both bounds grow with r.
            let Some(r0) = bounds.iter().position(sees) else {
                off += n;
                continue;
            };
            let r1 = r0 + bounds[r0..].iter().take_while(|b| sees(b)).count();
            match (seg.k.slice(off, off + n), seg.v.slice(off, off + n)) {
                (KvRows::Plain(kr), KvRows::Plain(vr)) => tile!(&kr, &vr, n, c0, r0, r1),
                (KvRows::Int8(kr), KvRows::Int8(vr)) if direct => {
                    // Few rows (decode): the int8 decode kernels, which read the rows in
                    // place and bring the next tile's in meanwhile: the rest of this
                    // segment, else the start of the next (another block, elsewhere).
                    let end = off + n;
                    let (ka, va) = match &next {
                        _ if end < seg.len() => {
                            let b = (end + TK).min(seg.len());
                            (seg.k.slice(end, b), seg.v.slice(end, b))
                        }
                        Some(nx) => (
                            nx.k.slice(0, TK.min(nx.len())),
                            nx.v.slice(0, TK.min(nx.len())),
                        ),
                        None => (seg.k.slice(end, end), seg.v.slice(end, end)),
                    };
                    let (KvRows::Int8(ka), KvRows::Int8(va)) = (ka, va) else {
                        unreachable!("a layer's segments share one format")
                    };
                    let (qr, sr) = (&qf[r0 * d..r1 * d], &mut s[r0 * TK..]);
                    // SAFETY: K's instruction set is the CPU's (this function's contract).
                    unsafe { K::q8_scores(qr, r1 - r0, &kr, n, sr, q8, &ka) };
                    softmax!(n, c0, r0, r1);
                    let (sr, or) = (&s[r0 * TK..], &mut o[r0 * d..r1 * d]);
                    // SAFETY: as above.
                    unsafe { K::q8_pv(sr, r1 - r0, &vr, n, or, q8, &va) };
                }
                (KvRows::Int8(kr), KvRows::Int8(vr)) => {
                    // Many rows (prefill): dequantized once per tile into f32 (in L1), then
                    // the f32 path, which transposes the keys.
                    kr.dequantize(n, &mut kq[..n * d]);
                    vr.dequantize(n, &mut vq[..n * d]);
                    tile!(&f32_rows(kq, n, d), &f32_rows(vq, n, d), n, c0, r0, r1)
                }
                _ => unreachable!("a segment's keys and values share one format"),
            }
            off += n;
        }
    }
}

/// `n` rows of `d` f32 at the start of `data`.
#[inline(always)]
fn f32_rows(data: &[f32], n: usize, d: usize) -> Rows<'_, f32> {
    Rows {
        data: &data[..n * d],
        stride: d,
        len: n,
        width: d,
    }
}

/// `x`'s values combined by `f` (a maximum or a sum, `init` its identity): in 16 lanes of
/// partial results, chunk by chunk, then the lanes by halves, so that it vectorises and its
/// dependency chains are short. (Indexed by `j % 8`, the lanes were kept in memory: a
/// scalar load and store per key; folded one by one, a chain of 8 steps per tile and row.)
#[inline(always)]
fn fold_tile(x: &[f32; TK], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    for c in x.chunks_exact(16) {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] = f(acc[i], acc[i + w]);
        }
    }
    acc[0]
}

/// One row's online-softmax step over a tile of scores `s` (keys `c0..c0 + n`, of which
/// it sees `lo..hi`): turns `s` into the tile's probabilities against the new running max
/// `m`, updates the running sum `l` and rescales the output row `o` to the new max.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn softmax_tile(
    s: &mut [f32; TK],
    n: usize,
    c0: usize,
    lo: usize,
    hi: usize,
    softcap: Option<f32>,
    m: &mut f32,
    l: &mut f32,
    o: &mut [f32],
) {
    let full = n == TK && c0 >= lo && c0 + n <= hi;
    if let Some(cap) = softcap {
        softcap_tile(s, cap);
    }
    let visible = |j: usize| j < n && c0 + j >= lo && c0 + j < hi;
    if !full {
        for (j, x) in s.iter_mut().enumerate() {
            if !visible(j) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    // The largest score, NaN ignored (as `f32::max`, written as a comparison so that it
    // vectorises: a NaN compares false).
    let m_new = fold_tile(s, f32::NEG_INFINITY, |a, b| if b > a { b } else { a }).max(*m);
    // An unchanged max (most tiles, once the first has set it) rescales by exp(0) = 1
    // exactly: no libm call. (Infinite maxima give NaN here, and exp keeps it.)
    let dm = *m - m_new;
    let alpha = if *m == f32::NEG_INFINITY {
        0.0
    } else if dm == 0.0 {
        1.0
    } else {
        dm.exp()
    };
    for x in s.iter_mut() {
        *x -= m_new;
    }
    exp_tile(s);
    if !full {
        for (j, x) in s.iter_mut().enumerate() {
            if !visible(j) {
                *x = 0.0;
            }
        }
    }
    *l = *l * alpha + fold_tile(s, 0.0, |a, b| a + b);
    *m = m_new;
    if alpha != 1.0 {
        o.iter_mut().for_each(|x| *x *= alpha);
    }
}

#[cfg(test)]
#[path = "../../tests/rust/attention/cpu.rs"]
mod tests;
