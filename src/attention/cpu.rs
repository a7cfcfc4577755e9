//! Exact attention of one layer's queries over its keys, on the CPU: the kernel over any
//! `KvSource` (a CPU store's layer, explicit tensors, or the host share of a CUDA store's
//! layer).
//!
//! Flash-attention's tiling with an online softmax: queries of one GQA group are processed
//! together as rows (so each K/V tile is converted once for all heads sharing it), keys in
//! tiles of `TK`, accumulation in f32. Work is split over (kv head, query tile) and, when
//! that leaves cores idle (decode), over key ranges whose partial results merge by
//! log-sum-exp. The caller releases the GIL around `attend`.

use super::args::{check_shapes, check_sinks, Params};
use crate::cpu::math::{exp_tile, softcap_tile, TK};
use crate::error::{Error, Result};
use crate::store::view::{KvSource, Segment};
use crate::tensor::{Element, View3};
use rayon::prelude::*;

/// Rows (queries x heads of a GQA group) processed together in one task.
const ROWS_PER_TASK: usize = 48;
/// Shortest key range worth a task of its own when splitting along the sequence.
const MIN_KEYS_PER_SPLIT: usize = 512;
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
        let b = b.min(self.len());
        if a >= b {
            return Vec::new();
        }
        vec![Segment {
            pos: a,
            k: self.k.rows(head).slice(a, b),
            v: self.v.rows(head).slice(a, b),
        }]
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
    let [hq, lq, d] = query.shape;
    let hkv = kv.num_kv_heads();
    let out_len = hq * lq * d;
    if out_len == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let g = hq / hkv;
    let tq = (ROWS_PER_TASK / g).clamp(1, lq);
    let ntiles = lq.div_ceil(tq);
    let first_pos = kv.len() - lq;
    let threads = rayon::current_num_threads();

    // Tasks: (kv head, query tile, key range), the key ranges of one tile adjacent.
    let mut tasks = Vec::new();
    for kvh in 0..hkv {
        for t in 0..ntiles {
            let (q0, q1) = (t * tq, ((t + 1) * tq).min(lq));
            let lo = params
                .window
                .map_or(0, |w| (first_pos + q0 + 1).saturating_sub(w))
                .max(kv.head_start(kvh));
            let hi = (first_pos + q1).max(lo);
            let base = hkv * ntiles;
            let splits = if base >= 2 * threads {
                1
            } else {
                (2 * threads)
                    .div_ceil(base)
                    .min((hi - lo).div_ceil(MIN_KEYS_PER_SPLIT))
                    .max(1)
            };
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

    let partials: Vec<Partial> = tasks
        .par_iter()
        .map(|t| run_task(&query, kv, params, g, first_pos, t))
        .collect();

    // Merge the key ranges of each (kv head, query tile) and normalise.
    let mut out = vec![0f32; out_len];
    let mut lse = vec![f32::NEG_INFINITY; hq * lq];
    let mut i = 0;
    while i < tasks.len() {
        let (kvh, q0, q1) = (tasks[i].kvh, tasks[i].q0, tasks[i].q1);
        let mut j = i + 1;
        while j < tasks.len() && tasks[j].kvh == kvh && tasks[j].q0 == q0 {
            j += 1;
        }
        let rows = (q1 - q0) * g;
        for r in 0..rows {
            let (qi, gh) = (q0 + r / g, r % g);
            // The sink: one more logit of this row, with no value (once, here).
            let sink = sinks.map_or(f32::NEG_INFINITY, |s| s[kvh * g + gh]);
            let m = partials[i..j].iter().map(|p| p.m[r]).fold(sink, f32::max);
            let dst = &mut out[((kvh * g + gh) * lq + qi) * d..][..d];
            let mut l = if sink == f32::NEG_INFINITY {
                0f32
            } else {
                (sink - m).exp()
            };
            for p in &partials[i..j] {
                if p.m[r] == f32::NEG_INFINITY {
                    continue;
                }
                let w = (p.m[r] - m).exp();
                l += p.l[r] * w;
                for (o, &x) in dst.iter_mut().zip(&p.o[r * d..(r + 1) * d]) {
                    *o += x * w;
                }
            }
            // l == 0 only where a share of the keys holds none this row sees (and no sink).
            if l > 0.0 {
                let inv = 1.0 / l;
                dst.iter_mut().for_each(|o| *o *= inv);
                lse[(kvh * g + gh) * lq + qi] = m + l.ln();
            }
        }
        i = j;
    }
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

/// Rows' unnormalised output `[rows, head_dim]`, running max and running sum.
struct Partial {
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

fn run_task<E: Element, S: KvSource<E>>(
    q: &View3<'_, E>,
    kv: &S,
    params: &Params,
    g: usize,
    first_pos: usize,
    t: &TaskSpec,
) -> Partial {
    let segs = kv.segments(t.kvh, t.a, t.b);
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { task_avx2(q, &segs, params, g, first_pos, t) };
        }
    }
    task_impl::<E, false>(q, &segs, params, g, first_pos, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2<E: Element>(
    q: &View3<'_, E>,
    segs: &[Segment<'_, E>],
    params: &Params,
    g: usize,
    first_pos: usize,
    t: &TaskSpec,
) -> Partial {
    task_impl::<E, true>(q, segs, params, g, first_pos, t)
}

#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn task_impl<E: Element, const FMA: bool>(
    q: &View3<'_, E>,
    segs: &[Segment<'_, E>],
    params: &Params,
    g: usize,
    first_pos: usize,
    t: &TaskSpec,
) -> Partial {
    let d = q.shape[2];
    let rows = (t.q1 - t.q0) * g;
    // Row r is query q0 + r / g of q head kvh * g + r % g.
    let mut qf = vec![0f32; rows * d];
    for r in 0..rows {
        let src = q.row(t.kvh * g + r % g, t.q0 + r / g);
        for (x, &y) in qf[r * d..(r + 1) * d].iter_mut().zip(src) {
            *x = y.to_f32() * params.scale;
        }
    }
    let bounds: Vec<(usize, usize)> = (0..rows)
        .map(|r| {
            let pos = first_pos + t.q0 + r / g;
            let lo = params.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            (lo, pos + 1)
        })
        .collect();
    let mut o = vec![0f32; rows * d];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    // Few rows (decode): read K and V where they lie. Many rows (prefill): convert each
    // tile once, K transposed, so every row's scores are contiguous FMAs.
    let direct = rows < DIRECT_BELOW_ROWS;
    let (mut kt, mut vf) = if direct {
        (Vec::new(), Vec::new())
    } else {
        (vec![0f32; d * TK], vec![0f32; TK * d])
    };

    for seg in segs {
        let mut off = 0;
        while off < seg.k.len {
            let n = TK.min(seg.k.len - off);
            let c0 = seg.pos + off;
            if !direct {
                for j in 0..n {
                    for (dd, &x) in seg.k.row(off + j).iter().enumerate() {
                        kt[dd * TK + j] = x.to_f32();
                    }
                    for (y, &x) in vf[j * d..(j + 1) * d].iter_mut().zip(seg.v.row(off + j)) {
                        *y = x.to_f32();
                    }
                }
            }
            for (r, &(lo, hi)) in bounds.iter().enumerate() {
                if c0 >= hi || c0 + n <= lo {
                    continue;
                }
                let full = n == TK && c0 >= lo && c0 + n <= hi;
                let mut s = [0f32; TK];
                let qrow = &qf[r * d..(r + 1) * d];
                if direct {
                    for (j, x) in s.iter_mut().enumerate().take(n) {
                        *x = dot::<E, FMA>(qrow, seg.k.row(off + j));
                    }
                } else {
                    for (dd, &qd) in qrow.iter().enumerate() {
                        let ktr: &[f32; TK] = kt[dd * TK..(dd + 1) * TK].try_into().expect("TK");
                        for j in 0..TK {
                            s[j] = fmadd::<FMA>(qd, ktr[j], s[j]);
                        }
                    }
                }
                if let Some(cap) = params.softcap {
                    softcap_tile(&mut s, cap);
                }
                let visible = |j: usize| j < n && c0 + j >= lo && c0 + j < hi;
                if !full {
                    for (j, x) in s.iter_mut().enumerate() {
                        if !visible(j) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                let mut m8 = [f32::NEG_INFINITY; 8];
                for (j, &x) in s.iter().enumerate() {
                    m8[j % 8] = m8[j % 8].max(x);
                }
                let m_new = m8.iter().fold(m[r], |a, &b| a.max(b));
                let alpha = if m[r] == f32::NEG_INFINITY {
                    0.0
                } else {
                    (m[r] - m_new).exp()
                };
                for x in s.iter_mut() {
                    *x -= m_new;
                }
                exp_tile(&mut s);
                if !full {
                    for (j, x) in s.iter_mut().enumerate() {
                        if !visible(j) {
                            *x = 0.0;
                        }
                    }
                }
                let mut sum8 = [0f32; 8];
                for (j, &x) in s.iter().enumerate() {
                    sum8[j % 8] += x;
                }
                l[r] = l[r] * alpha + sum8.iter().sum::<f32>();
                m[r] = m_new;
                let orow = &mut o[r * d..(r + 1) * d];
                if alpha != 1.0 {
                    orow.iter_mut().for_each(|x| *x *= alpha);
                }
                if direct {
                    pv_accumulate::<E, FMA>(orow, &s, n, |j| seg.v.row(off + j));
                } else {
                    pv_accumulate::<f32, FMA>(orow, &s, n, |j| &vf[j * d..(j + 1) * d]);
                }
            }
            off += n;
        }
    }
    Partial { o, m, l }
}

/// `q . k` with eight independent accumulators (a plain sum would not vectorise).
#[inline(always)]
fn dot<E: Element, const FMA: bool>(q: &[f32], k: &[E]) -> f32 {
    let mut acc = [0f32; 8];
    let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for l in 0..8 {
            acc[l] = fmadd::<FMA>(a[l], b[l].to_f32(), acc[l]);
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (a, b) in qr.iter().zip(kr) {
        s = fmadd::<FMA>(*a, b.to_f32(), s);
    }
    s
}

/// `orow += sum_j p[j] * v(j)` over the first `n` keys, with the output held in registers a
/// block of `W` at a time so the FMA chains stay independent.
#[inline(always)]
fn pv_accumulate<'v, T: Element, const FMA: bool>(
    orow: &mut [f32],
    p: &[f32; TK],
    n: usize,
    v: impl Fn(usize) -> &'v [T],
) {
    let d = orow.len();
    let mut dc = 0;
    while dc + 64 <= d {
        pv_block::<T, FMA, 64>(orow, p, n, &v, dc);
        dc += 64;
    }
    while dc + 8 <= d {
        pv_block::<T, FMA, 8>(orow, p, n, &v, dc);
        dc += 8;
    }
    while dc < d {
        pv_block::<T, FMA, 1>(orow, p, n, &v, dc);
        dc += 1;
    }
}

#[inline(always)]
fn pv_block<'v, T: Element, const FMA: bool, const W: usize>(
    orow: &mut [f32],
    p: &[f32; TK],
    n: usize,
    v: &impl Fn(usize) -> &'v [T],
    dc: usize,
) {
    let mut acc: [f32; W] = orow[dc..dc + W].try_into().expect("W");
    for (j, &pj) in p.iter().enumerate().take(n) {
        let vr: &[T; W] = v(j)[dc..dc + W].try_into().expect("W");
        for w in 0..W {
            acc[w] = fmadd::<FMA>(pj, vr[w].to_f32(), acc[w]);
        }
    }
    orow[dc..dc + W].copy_from_slice(&acc);
}

#[cfg(test)]
#[path = "../../tests/rust/attention/cpu.rs"]
mod tests;
