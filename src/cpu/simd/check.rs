//! The kernels of one instruction set against the portable ones, on seeded problems: the
//! unit tests run many shapes, and `choice` a few (`SELF_CHECK`, well under a millisecond)
//! before it trusts a set that nothing in CI can run (AVX-512).
//!
//! Tolerance: all paths accumulate in f32 and differ only in summation order (8 or 16 lanes
//! of partial sums, fused multiply-adds), so a result may move by a few f32 roundings of the
//! sum of its terms' magnitudes: `TOL` of that sum bounds it with margin up to 256 terms,
//! while an indexing or conversion slip moves it by O(1). Padding that a kernel must not read
//! is NaN, and so are outputs it must not write.

use super::{Choice, Isa, Job, Kernels, Scalar, TK};
use crate::tensor::{Element, Rows};
use half::{bf16, f16};

/// Largest difference from the portable result, relative to the sum of the terms' magnitudes.
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

/// What the first use checks: head dims with tails of 8 and 16 lanes (13: 5 past 8; 72: 8
/// past 64) and one without (128), rows that use every register block (5 is 4 + 1), key
/// counts with a remainder for every block width, padded key rows.
pub(crate) const SELF_CHECK: Shapes<'static> = Shapes {
    dims: &[13, 72, 128],
    rows: &[1, 2, 3, 5],
    keys: &[5, 19],
    pads: &[3],
    seed: 0x5e1f,
};

/// `Job`: `K`'s kernels against the portable ones over the shapes, in f32, bf16 and f16.
/// `Err` describes the first disagreement.
pub(crate) struct Compare<'a>(pub Shapes<'a>);

impl Job for Compare<'_> {
    type Output = Result<(), String>;

    unsafe fn run<K: Kernels>(self) -> Result<(), String> {
        // SAFETY: the CPU supports K's set (this function's contract).
        unsafe {
            compare_dtype::<K, f32>(&self.0, self.0.seed)?;
            compare_dtype::<K, bf16>(&self.0, self.0.seed + 1)?;
            compare_dtype::<K, f16>(&self.0, self.0.seed + 2)
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
    let close = |g: f32, w: f32, mag: f32| (g - w).abs() <= TOL * mag + 1e-30;

    // Scores: keys past n stay untouched (NaN).
    let q: Vec<f32> = (0..rows * d).map(|_| 2.0 * x.next()).collect();
    let (mut want, mut got) = (vec![f32::NAN; rows * TK], vec![f32::NAN; rows * TK]);
    // SAFETY: the portable set runs everywhere, K's by the contract; lengths are checked by
    // the kernels.
    unsafe {
        Scalar::scores(&q, rows, &kv, n, &mut want);
        K::scores(&q, rows, &kv, n, &mut got);
    }
    for r in 0..rows {
        for j in 0..TK {
            let (g, w) = (got[r * TK + j], want[r * TK + j]);
            if j >= n {
                if !g.is_nan() {
                    return Err(format!("wrote score [{r}][{j}] past the keys"));
                }
                continue;
            }
            let mag: f32 = (0..d)
                .map(|i| (q[r * d + i] * kv.row(j)[i].to_f32()).abs())
                .sum();
            if !close(g, w, mag) {
                return Err(format!(
                    "score [{r}][{j}] is {g}, the portable kernel's {w}"
                ));
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
    let (mut want, mut got) = (o0.clone(), o0.clone());
    // SAFETY: as for the scores.
    unsafe {
        Scalar::pv(&p, rows, &kv, n, &mut want);
        K::pv(&p, rows, &kv, n, &mut got);
    }
    for r in 0..rows {
        for i in 0..d {
            let mag = o0[r * d + i].abs()
                + (0..n)
                    .map(|j| (p[r * TK + j] * kv.row(j)[i].to_f32()).abs())
                    .sum::<f32>();
            let (g, w) = (got[r * d + i], want[r * d + i]);
            if !close(g, w, mag) {
                return Err(format!(
                    "output [{r}][{i}] is {g}, the portable kernel's {w}"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "../../../tests/rust/cpu/simd/check.rs"]
mod tests;
