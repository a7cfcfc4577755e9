//! Unit tests of `src/cpu/simd/q8.rs`: the transposing sum exactly, and the kernels against
//! f64 sums over the dequantized rows, with the values that need care: -128 (which the
//! quantizer never writes), zero groups, NaN groups, extreme scales, masked keys (p = 0),
//! groups of 16 and 32, head dims with a tail of 16 columns. Skipped (with a note) on CPUs
//! without AVX-512.

use super::*;
use crate::cpu::simd::check::TOL;
use crate::test_common::Rng;
use half::bf16;

fn here() -> bool {
    let ok = crate::cpu::simd::Isa::Avx512.supported();
    if !ok {
        eprintln!("no AVX-512 here: skipped");
    }
    ok
}

/// `got` against the f64 `sum` of terms whose magnitudes add to `mag`: NaN where the sum is,
/// else within `TOL` of `mag` (`what` names the element).
fn near(got: f32, sum: f64, mag: f64, what: impl Fn() -> String) {
    if sum.is_nan() {
        assert!(got.is_nan(), "{}: {got}, not NaN", what());
    } else {
        let err = (got as f64 - sum).abs();
        assert!(
            err <= TOL as f64 * mag + 1e-30,
            "{}: {got} vs {sum}",
            what()
        );
    }
}

#[test]
fn sums16_puts_each_vectors_sum_in_its_lane() {
    if !here() {
        return;
    }
    let mut rng = Rng::new(3);
    let v: Vec<[f32; 16]> = (0..16)
        .map(|i| std::array::from_fn(|l| (i * 100 + l) as f32 + rng.uniform()))
        .collect();
    // SAFETY: AVX-512 F (checked above).
    let got = unsafe { sum_lanes(&v) };
    for i in 0..16 {
        let want: f64 = v[i].iter().map(|&x| x as f64).sum();
        assert!(
            (got[i] as f64 - want).abs() < 1e-6 * want,
            "lane {i}: {} vs {want}",
            got[i]
        );
    }
}

/// The lane sums of 16 vectors by `sums16`.
///
/// # Safety
/// AVX-512 F on this CPU.
#[target_feature(enable = "avx512f")]
unsafe fn sum_lanes(v: &[[f32; 16]]) -> [f32; 16] {
    let mut out = [0f32; 16];
    // SAFETY: AVX-512 F (the contract); 16 arrays of 16 f32.
    unsafe {
        let x: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(v[i].as_ptr()));
        _mm512_storeu_ps(out.as_mut_ptr(), sums16(&x));
    }
    out
}

/// Int8 rows of width `d` for tests: random bytes (all of -128..=127) with random bf16
/// scales of many magnitudes (up to `big`), and some groups with zero or NaN scales, or
/// all-zero values.
fn rows(rng: &mut Rng, d: usize, n: usize, big: f32) -> (Vec<u8>, Q8) {
    let fmt = Q8::new(d);
    let rb = fmt.row_bytes();
    let mut data = vec![0u8; n * rb];
    for j in 0..n {
        let row = &mut data[j * rb..(j + 1) * rb];
        for b in row[..d].iter_mut() {
            *b = rng.next_u64() as u8;
        }
        for g in 0..fmt.groups() {
            let scale = match rng.below(12) {
                0 => 0.0,
                1 => f32::NAN,
                2 => {
                    row[g * fmt.group..(g + 1) * fmt.group].fill(0);
                    1.0
                }
                3 => big,
                4 => 2e-30,
                _ => rng.uniform().abs() * 0.05 + 1e-3,
            };
            let bits = bf16::from_f32(scale).to_bits().to_le_bytes();
            row[d + 2 * g..d + 2 * g + 2].copy_from_slice(&bits);
        }
    }
    (data, fmt)
}

#[test]
fn scores_match_the_dequantized_sums() {
    if !here() {
        return;
    }
    let mut rng = Rng::new(11);
    for d in [16, 48, 64, 80, 112, 128, 192, 256] {
        for rows_n in [1, 2, 3, 4, 5, 7] {
            for n in [1, 15, 16, 17, 40, TK] {
                let (data, fmt) = rows(&mut rng, d, n, 3e30);
                assert!(fits(fmt));
                let kv = Q8Rows {
                    data: &data,
                    len: n,
                    fmt,
                };
                // Scaled queries, some zero.
                let q: Vec<f32> = (0..rows_n * d)
                    .map(|i| {
                        if i % 29 == 0 {
                            0.0
                        } else {
                            rng.uniform() * 0.3
                        }
                    })
                    .collect();
                let mut s = vec![f32::NAN; rows_n * TK];
                let mut sc = Vec::new();
                // SAFETY: AVX-512 (checked above); lengths are checked.
                unsafe { scores(&q, rows_n, &kv, n, &mut s, &mut sc, &kv) };
                let mut deq = vec![0f32; d];
                for j in 0..TK {
                    if j < n {
                        fmt.dequantize(kv.row(j), &mut deq);
                    }
                    for r in 0..rows_n {
                        let got = s[r * TK + j];
                        if j >= n {
                            assert!(got.is_nan(), "wrote past the keys");
                            continue;
                        }
                        let (mut sum, mut mag) = (0f64, 0f64);
                        for i in 0..d {
                            let t = q[r * d + i] as f64 * deq[i] as f64;
                            sum += t;
                            mag += t.abs();
                        }
                        near(got, sum, mag, || {
                            format!("d={d} rows={rows_n} n={n} [{r}][{j}]")
                        });
                    }
                }
            }
        }
    }
}

#[test]
fn pv_matches_the_dequantized_sums() {
    if !here() {
        return;
    }
    let mut rng = Rng::new(13);
    for d in [16, 48, 64, 80, 112, 128, 192, 256] {
        for rows_n in [1, 2, 3, 4, 5, 7] {
            for n in [1, 15, 16, 17, TK] {
                let (data, fmt) = rows(&mut rng, d, n, 3e30);
                assert!(fits(fmt));
                let kv = Q8Rows {
                    data: &data,
                    len: n,
                    fmt,
                };
                // Probabilities past n are NaN: reading one would show. Some are 0 (a masked
                // key), which a NaN group still turns to NaN, as the dequantized sum does.
                let mut p = vec![f32::NAN; rows_n * TK];
                for r in 0..rows_n {
                    for j in 0..n {
                        p[r * TK + j] = if rng.below(5) == 0 {
                            0.0
                        } else {
                            rng.uniform().abs()
                        };
                    }
                }
                let o0: Vec<f32> = (0..rows_n * d).map(|_| rng.uniform()).collect();
                let mut o = o0.clone();
                let mut w = Vec::new();
                // SAFETY: AVX-512 (checked above); lengths are checked.
                unsafe { pv(&p, rows_n, &kv, n, &mut o, &mut w, &kv) };
                let deq: Vec<Vec<f32>> = (0..n)
                    .map(|j| {
                        let mut x = vec![0f32; d];
                        fmt.dequantize(kv.row(j), &mut x);
                        x
                    })
                    .collect();
                for r in 0..rows_n {
                    for i in 0..d {
                        let got = o[r * d + i];
                        let (mut sum, mut mag) = (o0[r * d + i] as f64, o0[r * d + i].abs() as f64);
                        for (j, x) in deq.iter().enumerate() {
                            let t = p[r * TK + j] as f64 * x[i] as f64;
                            sum += t;
                            mag += t.abs();
                        }
                        near(got, sum, mag, || {
                            format!("d={d} rows={rows_n} n={n} [{r}][{i}]")
                        });
                    }
                }
            }
        }
    }
}

#[test]
fn the_layouts_the_kernels_take() {
    for d in [16, 48, 64, 80, 96, 112, 128, 192, 256, 512] {
        assert!(fits(Q8::new(d)), "{d}");
    }
    for d in [1, 8, 24, 72, 100] {
        assert!(!fits(Q8::new(d)), "{d}");
    }
}
