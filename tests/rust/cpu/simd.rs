//! Unit tests of `src/cpu/simd.rs`: every SIMD kernel this CPU runs against the portable one.
//!
//! Tolerance: all paths accumulate in f32 and differ only in summation order (8 or 16 lanes
//! of partial sums, fused multiply-adds), so a result may move by a few f32 roundings of the
//! sum of its terms' magnitudes: 1e-5 of that sum bounds it with margin up to 256 terms, while
//! an indexing or conversion slip moves it by O(1). Padding that a kernel must not read is NaN.

use super::*;
use crate::test_common::Rng;
use half::{bf16, f16};

/// The SIMD sets this CPU runs (the portable one is the reference).
fn simd_isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|i| *i != Isa::Scalar && i.supported())
        .collect()
}

#[allow(unreachable_patterns)]
fn scores_on<E: Element>(
    isa: Isa,
    q: &[f32],
    rows: usize,
    k: &Rows<'_, E>,
    n: usize,
    s: &mut [f32],
) {
    assert!(isa.supported());
    // SAFETY: the CPU supports `isa` (asserted above); lengths are checked by the kernels.
    unsafe {
        match isa {
            Isa::Scalar => Scalar::scores(q, rows, k, n, s),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Avx2::scores(q, rows, k, n, s),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Avx512::scores(q, rows, k, n, s),
            _ => unreachable!("{isa:?} is not built for this target"),
        }
    }
}

#[allow(unreachable_patterns)]
fn pv_on<E: Element>(isa: Isa, p: &[f32], rows: usize, v: &Rows<'_, E>, n: usize, o: &mut [f32]) {
    assert!(isa.supported());
    // SAFETY: the CPU supports `isa` (asserted above); lengths are checked by the kernels.
    unsafe {
        match isa {
            Isa::Scalar => Scalar::pv(p, rows, v, n, o),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Avx2::pv(p, rows, v, n, o),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Avx512::pv(p, rows, v, n, o),
            _ => unreachable!("{isa:?} is not built for this target"),
        }
    }
}

/// `n` rows of `d` random elements, `stride` apart, NaN between them.
fn rows_of<E: Element>(rng: &mut Rng, n: usize, d: usize, stride: usize) -> Vec<E> {
    let len = if n == 0 { 0 } else { (n - 1) * stride + d };
    (0..len)
        .map(|i| {
            let x = rng.uniform() * 2.0;
            E::from_f32(if i % stride < d { x } else { f32::NAN })
        })
        .collect()
}

fn compare<E: Element>(isa: Isa, d: usize, rows: usize, n: usize, pad: usize, rng: &mut Rng) {
    let stride = d + pad;
    let data = rows_of::<E>(rng, n, d, stride);
    let kv = Rows {
        data: &data,
        stride,
        len: n,
        width: d,
    };
    let what = format!("{isa:?} {:?} d={d} rows={rows} n={n} pad={pad}", E::DTYPE);

    // Scores: keys past n stay untouched (NaN).
    let q = rng.vec(rows * d, 2.0);
    let (mut want, mut got) = (vec![f32::NAN; rows * TK], vec![f32::NAN; rows * TK]);
    scores_on(Isa::Scalar, &q, rows, &kv, n, &mut want);
    scores_on(isa, &q, rows, &kv, n, &mut got);
    for r in 0..rows {
        for j in 0..TK {
            let (g, w) = (got[r * TK + j], want[r * TK + j]);
            if j >= n {
                assert!(g.is_nan(), "{what}: wrote key {j} of row {r}");
                continue;
            }
            let mag: f32 = (0..d)
                .map(|i| (q[r * d + i] * kv.row(j)[i].to_f32()).abs())
                .sum();
            assert!(
                (g - w).abs() <= 1e-5 * mag + 1e-30,
                "{what}: score [{r}][{j}] {g} vs {w}"
            );
        }
    }

    // p . V: probabilities past n are NaN, so reading them would show.
    let mut p = vec![f32::NAN; rows * TK];
    for r in 0..rows {
        for j in 0..n {
            p[r * TK + j] = (rng.uniform() + 1.0) / 2.0;
        }
    }
    let o0 = rng.vec(rows * d, 1.0);
    let (mut want, mut got) = (o0.clone(), o0.clone());
    pv_on(Isa::Scalar, &p, rows, &kv, n, &mut want);
    pv_on(isa, &p, rows, &kv, n, &mut got);
    for r in 0..rows {
        for i in 0..d {
            let mag = o0[r * d + i].abs()
                + (0..n)
                    .map(|j| (p[r * TK + j] * kv.row(j)[i].to_f32()).abs())
                    .sum::<f32>();
            let (g, w) = (got[r * d + i], want[r * d + i]);
            assert!(
                (g - w).abs() <= 1e-5 * mag + 1e-30,
                "{what}: output [{r}][{i}] {g} vs {w}"
            );
        }
    }
}

fn compare_all<E: Element>(isa: Isa, seed: u64) {
    let mut rng = Rng::new(seed);
    for d in [1, 3, 8, 15, 16, 24, 64, 72, 80, 96, 100, 128, 136, 256] {
        for rows in 1..=9 {
            for n in [1, 2, 7, 8, 9, 63, TK] {
                for pad in [0, 5] {
                    compare::<E>(isa, d, rows, n, pad, &mut rng);
                }
            }
        }
    }
}

#[test]
fn simd_kernels_match_the_portable_ones() {
    let isas = simd_isas();
    eprintln!("SIMD sets on this CPU: {isas:?}");
    for isa in isas {
        compare_all::<f32>(isa, 1);
        compare_all::<bf16>(isa, 2);
        compare_all::<f16>(isa, 3);
    }
}

#[test]
fn the_widest_supported_set_is_chosen() {
    let best = Isa::best();
    assert!(best.supported());
    let at = Isa::ALL.iter().position(|i| *i == best).unwrap();
    assert!(
        Isa::ALL[at + 1..].iter().all(|i| !i.supported()),
        "{best:?}"
    );
    assert_eq!(Isa::best(), best, "decided once");
    assert!(Isa::Scalar.supported());
    #[cfg(not(target_arch = "x86_64"))]
    assert_eq!(best, Isa::Scalar);
}

#[test]
#[should_panic(expected = "4 keys of a tile")]
fn a_tile_past_its_bounds_is_refused() {
    // Three rows given, four asked for: the checked entry panics instead of reading past.
    let data = vec![0f32; 3 * 8];
    let kv = Rows {
        data: &data,
        stride: 8,
        len: 3,
        width: 8,
    };
    let mut s = vec![0f32; TK];
    scores_on(Isa::best(), &[0f32; 8], 1, &kv, 4, &mut s);
}
