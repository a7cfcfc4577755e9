//! The kernels of one instruction set against what the portable ones compute, on seeded
//! problems: the unit tests run many shapes, and `choice` a few (`SELF_CHECK`) before it
//! trusts a set that nothing in CI can run (AVX-512).
//!
//! The reference is the same sums in f64, over the same inputs (keys and values converted
//! from their dtype exactly), so it checks every set, the portable one included, without
//! trusting any of them. Tolerance: every path accumulates in f32, in 8 or 16 lanes of partial
//! sums with fused multiply-adds or not, so a result may move by a few dozen f32 roundings of
//! the sum of its terms' magnitudes at the most (256 terms in 8 lanes: 32 in a row, then the
//! lanes' sum); `TOL` of that sum bounds it with margin, while an indexing or conversion slip
//! moves it by O(1). Padding that a kernel must not read is NaN, and so are outputs it must
//! not write.

use super::{Choice, Isa, Job, Kernels, TK};
use crate::quant::{Q8Rows, Q8};
use crate::tensor::{Element, Rows};
use half::{bf16, f16};

/// Largest difference from the reference, relative to the sum of the terms' magnitudes.
pub(crate) const TOL: f32 = 1e-5;

/// The problems of a comparison: every combination of a head dim, a number of query rows, a
/// number of keys (at most `TK`) and a padding between key rows, for each dtype.
pub(crate) struct Shapes<'a> {
    pub dims: &'a [usize],
    pub rows: &'a [usize],
    pub keys: &'a [usize],
    pub pads: &'a [usize],
    pub seed: u64,
}

/// What the first use checks (about a millisecond): head dims with tails of 8 and 16 lanes
/// (13: 5 past 8, none full at 16; 72: 8 past 64) and one without (128), rows that use every
/// register block (2, 3, and 5 = 4 + 1), 19 keys (a remainder for blocks of 2, 4 and 8),
/// padded key rows.
pub(crate) const SELF_CHECK: Shapes<'static> = Shapes {
    dims: &[13, 72, 128],
    rows: &[2, 3, 5],
    keys: &[19],
    pads: &[3],
    seed: 0x5e1f,
};

/// `Job`: `K`'s kernels against the f64 reference over the shapes, in f32, bf16 and f16,
/// and over int8 rows (the reference sums their dequantized values; the generic kernels
/// and the int8 decode ones, `Kernels::q8_scores` and `q8_pv`).
/// `Err` describes the first disagreement.
pub(crate) struct Compare<'a>(pub Shapes<'a>);

impl Job for Compare<'_> {
    type Output = Result<(), String>;

    unsafe fn run<K: Kernels>(self) -> Result<(), String> {
        // SAFETY: the CPU supports K's set (this function's contract).
        unsafe {
            compare_dtype::<K, f32>(&self.0, self.0.seed)?;
            compare_dtype::<K, bf16>(&self.0, self.0.seed + 1)?;
            compare_dtype::<K, f16>(&self.0, self.0.seed + 2)?;
            compare_int8::<K>(&self.0, self.0.seed + 3)
        }
    }
}

/// The widest set this CPU supports that passes `check` (the portable one needs none), and
/// why each wider supported set was passed over.
pub(crate) fn choose(check: impl Fn(Isa) -> Result<(), String>) -> Choice {
    let mut failures = Vec::new();
    for isa in Isa::ALL.into_iter().rev().filter(|i| i.supported()) {
        if isa == Isa::Scalar {
            break;
        }
        match check(isa) {
            Ok(()) => return Choice { isa, failures },
            Err(e) => failures.push(format!("{}: {e}", isa.name())),
        }
    }
    Choice {
        isa: Isa::Scalar,
        failures,
    }
}

/// Seeded values uniform in [-1, 1) (splitmix64).
struct Values(u64);

impl Values {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// # Safety
/// The CPU supports `K`'s set.
unsafe fn compare_dtype<K: Kernels, E: Element>(
    shapes: &Shapes<'_>,
    seed: u64,
) -> Result<(), String> {
    let mut x = Values(seed);
    for &d in shapes.dims {
        for &rows in shapes.rows {
            for &n in shapes.keys {
                for &pad in shapes.pads {
                    // SAFETY: by the contract.
                    unsafe { compare::<K, E>(d, rows, n, pad, &mut x) }.map_err(|e| {
                        format!("{:?} d={d} rows={rows} n={n} pad={pad}: {e}", E::DTYPE)
                    })?;
                }
            }
        }
    }
    Ok(())
}

/// # Safety
/// The CPU supports `K`'s set.
unsafe fn compare_int8<K: Kernels>(shapes: &Shapes<'_>, seed: u64) -> Result<(), String> {
    let mut x = Values(seed);
    for &d in shapes.dims {
        for &rows in shapes.rows {
            for &n in shapes.keys {
                // SAFETY: by the contract.
                unsafe { compare_q8::<K>(d, rows, n, &mut x) }
                    .map_err(|e| format!("int8 d={d} rows={rows} n={n}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// One problem over `n` int8 rows of width `d`: the generic kernels, then the int8 decode
/// ones.
///
/// # Safety
/// The CPU supports `K`'s set.
unsafe fn compare_q8<K: Kernels>(
    d: usize,
    rows: usize,
    n: usize,
    x: &mut Values,
) -> Result<(), String> {
    let fmt = Q8::new(d);
    let rb = fmt.row_bytes();
    let mut data = vec![0u8; n * rb];
    let mut kf = vec![0f64; n * d];
    let (mut row, mut deq) = (vec![0f32; d], vec![0f32; d]);
    for j in 0..n {
        row.iter_mut().for_each(|v| *v = 2.0 * x.next());
        fmt.quantize(&row, &mut data[j * rb..(j + 1) * rb]);
        fmt.dequantize(&data[j * rb..(j + 1) * rb], &mut deq);
        for (y, &v) in kf[j * d..(j + 1) * d].iter_mut().zip(&deq) {
            *y = v as f64;
        }
    }
    let kv = Q8Rows {
        data: &data,
        len: n,
        fmt,
    };
    let at = |j: usize, i: usize| kf[j * d + i];
    let mut scores = |q: &[f32], s: &mut [f32]| {
        // SAFETY: the CPU supports K's set (the contract); the kernel checks the lengths.
        unsafe { K::scores(q, rows, &kv, n, s) };
        Ok(())
    };
    let mut pv = |p: &[f32], o: &mut [f32]| {
        // SAFETY: as for the scores.
        unsafe { K::pv(p, rows, &kv, n, o) };
        Ok(())
    };
    check_tile(&at, d, rows, n, x, &mut scores, &mut pv)?;
    let mut sc = Vec::new();
    let mut q8_scores = |q: &[f32], s: &mut [f32]| {
        // SAFETY: as for the scores.
        unsafe { K::q8_scores(q, rows, &kv, n, s, &mut sc, &kv) };
        Ok(())
    };
    let mut sc = Vec::new();
    let mut q8_pv = |p: &[f32], o: &mut [f32]| {
        // SAFETY: as for the scores.
        unsafe { K::q8_pv(p, rows, &kv, n, o, &mut sc, &kv) };
        Ok(())
    };
    check_tile(&at, d, rows, n, x, &mut q8_scores, &mut q8_pv)
}

/// One problem: scores and `p . V` of `rows` rows over `n` keys of width `d`, `d + pad` apart.
///
/// # Safety
/// The CPU supports `K`'s set.
unsafe fn compare<K: Kernels, E: Element>(
    d: usize,
    rows: usize,
    n: usize,
    pad: usize,
    x: &mut Values,
) -> Result<(), String> {
    let stride = d + pad;
    let len = if n == 0 { 0 } else { (n - 1) * stride + d };
    let data: Vec<E> = (0..len)
        .map(|i| {
            E::from_f32(if i % stride < d {
                2.0 * x.next()
            } else {
                f32::NAN
            })
        })
        .collect();
    let kv = Rows {
        data: &data,
        stride,
        len: n,
        width: d,
    };
    // Element (j, i) as f64, converted once: the reference sums in f64.
    let kf: Vec<f64> = data.iter().map(|e| e.to_f32() as f64).collect();
    let mut scores = |q: &[f32], s: &mut [f32]| {
        // SAFETY: the CPU supports K's set (the contract); the kernel checks the lengths.
        unsafe { K::scores(q, rows, &kv, n, s) };
        Ok(())
    };
    let mut pv = |p: &[f32], o: &mut [f32]| {
        // SAFETY: as for the scores.
        unsafe { K::pv(p, rows, &kv, n, o) };
        Ok(())
    };
    check_tile(
        &|j, i| kf[j * stride + i],
        d,
        rows,
        n,
        x,
        &mut scores,
        &mut pv,
    )
}

/// What `check_tile` runs: a kernel on `(q, s)` or `(p, o)`.
type Kernel<'a> = dyn FnMut(&[f32], &mut [f32]) -> Result<(), String> + 'a;

/// `scores` (`Kernels::scores`' `q` and `s`) and `pv` (`Kernels::pv`'s `p` and `o`) over
/// `n` rows of width `d` whose value (j, i) is `at(j, i)`, for `rows` query rows, against
/// the f64 sums.
fn check_tile(
    at: &dyn Fn(usize, usize) -> f64,
    d: usize,
    rows: usize,
    n: usize,
    x: &mut Values,
    scores: &mut Kernel<'_>,
    pv: &mut Kernel<'_>,
) -> Result<(), String> {
    // `terms` (j or i) -> (term, ...): the exact sum and the sum of magnitudes, then whether
    // `got` lies within `TOL` of that magnitude.
    let close = |got: f32, start: f64, terms: &mut dyn Iterator<Item = f64>| {
        let (mut sum, mut mag) = (start, start.abs());
        for t in terms {
            sum += t;
            mag += t.abs();
        }
        ((got as f64 - sum).abs() <= TOL as f64 * mag + 1e-30, sum)
    };

    // Scores: keys past n stay untouched (NaN).
    let q: Vec<f32> = (0..rows * d).map(|_| 2.0 * x.next()).collect();
    let mut got = vec![f32::NAN; rows * TK];
    scores(&q, &mut got)?;
    for r in 0..rows {
        for j in 0..TK {
            let g = got[r * TK + j];
            if j >= n {
                if !g.is_nan() {
                    return Err(format!("wrote score [{r}][{j}] past the keys"));
                }
                continue;
            }
            let mut terms = (0..d).map(|i| q[r * d + i] as f64 * at(j, i));
            if let (false, want) = close(g, 0.0, &mut terms) {
                return Err(format!("score [{r}][{j}] is {g}, not {want}"));
            }
        }
    }

    // p . V: probabilities past n are NaN, so reading them would show.
    let mut p = vec![f32::NAN; rows * TK];
    for r in 0..rows {
        for j in 0..n {
            p[r * TK + j] = (x.next() + 1.0) / 2.0;
        }
    }
    let o0: Vec<f32> = (0..rows * d).map(|_| x.next()).collect();
    let mut got = o0.clone();
    pv(&p, &mut got)?;
    for r in 0..rows {
        for i in 0..d {
            let g = got[r * d + i];
            let mut terms = (0..n).map(|j| p[r * TK + j] as f64 * at(j, i));
            if let (false, want) = close(g, o0[r * d + i] as f64, &mut terms) {
                return Err(format!("output [{r}][{i}] is {g}, not {want}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "../../../tests/rust/cpu/simd/check.rs"]
mod tests;
