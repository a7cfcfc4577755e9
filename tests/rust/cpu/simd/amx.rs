//! Unit tests of `src/cpu/simd/amx.rs`: the tile kernels, through a software tile unit with
//! the hardware's semantics (`Emu`: bf16 pairs, products added one at a time in f32), against
//! f64 sums over the dequantized rows; the same through the CPU's unit where it has AMX and
//! `HEADINFER_CPU_AMX=1` (`amx_status`). Skipped (with a note) without AVX-512.

use super::*;
use crate::cpu::simd::check::TOL;
use crate::quant::Q8;
use crate::test_common::Rng;
use std::cell::RefCell;

/// Tiles in memory: 8 registers of 16 rows of 64 bytes, and the configuration.
struct EmuState {
    t: [[[u8; 64]; 16]; 8],
    cfg: Config,
}

thread_local! {
    static EMU: RefCell<EmuState> = const {
        RefCell::new(EmuState { t: [[[0; 64]; 16]; 8], cfg: CONFIG })
    };
}

/// The tile operations in software.
struct Emu;

fn bf(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// An f32 as the tile unit reads inputs and writes results: denormals are zero.
fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

impl TileUnit for Emu {
    unsafe fn config(cfg: &Config) {
        EMU.with(|e| e.borrow_mut().cfg = *cfg);
    }
    unsafe fn zero<const T: u8>() {
        EMU.with(|e| e.borrow_mut().t[T as usize] = [[0; 64]; 16]);
    }
    unsafe fn load<const T: u8>(p: *const u8, stride: usize) {
        EMU.with(|e| {
            let mut e = e.borrow_mut();
            let (rows, colsb) = (e.cfg.rows[T as usize], e.cfg.colsb[T as usize] as usize);
            for m in 0..rows as usize {
                // SAFETY: the caller vouches for the rows (`TileUnit::load`).
                let src = unsafe { std::slice::from_raw_parts(p.add(m * stride), colsb) };
                e.t[T as usize][m][..colsb].copy_from_slice(src);
            }
        });
    }
    unsafe fn store<const T: u8>(p: *mut u8, stride: usize) {
        EMU.with(|e| {
            let e = e.borrow();
            let (rows, colsb) = (e.cfg.rows[T as usize], e.cfg.colsb[T as usize] as usize);
            for m in 0..rows as usize {
                // SAFETY: the caller vouches for the rows (`TileUnit::store`).
                let dst = unsafe { std::slice::from_raw_parts_mut(p.add(m * stride), colsb) };
                dst.copy_from_slice(&e.t[T as usize][m][..colsb]);
            }
        });
    }
    unsafe fn dp<const C: u8, const A: u8, const B: u8>() {
        EMU.with(|e| {
            let mut e = e.borrow_mut();
            let (c, a, b) = (C as usize, A as usize, B as usize);
            let m_rows = e.cfg.rows[c] as usize;
            let n_cols = e.cfg.colsb[c] as usize / 4;
            let k_pairs = e.cfg.colsb[a] as usize / 4;
            assert_eq!(e.cfg.rows[b] as usize, k_pairs, "B's rows are A's pairs");
            assert_eq!(e.cfg.colsb[b], e.cfg.colsb[c], "B's and C's widths");
            assert_eq!(e.cfg.rows[a], e.cfg.rows[c], "A's and C's rows");
            let word = |t: usize, m: usize, i: usize, e: &EmuState| {
                u16::from_le_bytes([e.t[t][m][2 * i], e.t[t][m][2 * i + 1]])
            };
            for m in 0..m_rows {
                for n in 0..n_cols {
                    let mut acc =
                        f32::from_le_bytes(e.t[c][m][4 * n..4 * n + 4].try_into().unwrap());
                    for k in 0..k_pairs {
                        for i in 0..2 {
                            let x = ftz(bf(word(a, m, 2 * k + i, &e)));
                            let y = ftz(bf(word(b, k, 2 * n + i, &e)));
                            acc = ftz(acc + x * y);
                        }
                    }
                    e.t[c][m][4 * n..4 * n + 4].copy_from_slice(&acc.to_le_bytes());
                }
            }
        });
    }
    unsafe fn release() {}
}

fn here() -> bool {
    let ok = crate::cpu::simd::Isa::Avx512.supported();
    if !ok {
        eprintln!("no AVX-512 here: skipped");
    }
    ok
}

/// `n` quantized rows of `d` values (seeded), some with extremes: a zero group, a group of
/// one outlier, tiny and huge values; with their dequantized values in f64.
fn rows(d: usize, n: usize, rng: &mut Rng) -> (Vec<u8>, Vec<f64>, Q8) {
    let fmt = Q8::new(d);
    let rb = fmt.row_bytes();
    let (mut data, mut deq) = (vec![0u8; n * rb], vec![0f64; n * d]);
    let mut row = vec![0f32; d];
    let mut back = vec![0f32; d];
    for j in 0..n {
        for (i, v) in row.iter_mut().enumerate() {
            *v = match j % 7 {
                1 if i < 32 => 0.0,
                2 => {
                    if i == 5 {
                        300.0
                    } else {
                        0.01 * rng.uniform()
                    }
                }
                3 => 1e-30 * rng.uniform(),
                4 => 1e30 * rng.uniform(),
                _ => 4.0 * rng.uniform() - 2.0,
            };
        }
        fmt.quantize(&row, &mut data[j * rb..(j + 1) * rb]);
        fmt.dequantize(&data[j * rb..(j + 1) * rb], &mut back);
        for (y, &x) in deq[j * d..(j + 1) * d].iter_mut().zip(&back) {
            *y = x as f64;
        }
    }
    (data, deq, fmt)
}

/// `got` within `TOL` of the magnitudes `mag` around `want`.
fn near(got: f32, want: f64, mag: f64, what: &str) {
    let err = (got as f64 - want).abs();
    assert!(
        err <= TOL as f64 * mag + 1e-30,
        "{what}: {got} vs {want} (magnitude {mag})"
    );
}

/// The kernels through `U` over every shape: head dims 32, 64, 96, 128; 1 to 9 rows; keys
/// short of a block of 16, of 32, and a whole tile; queries in bf16 (one part) and f32
/// (three); `s` and `o` rows `TK` and `d` apart, with NaN where nothing may be written.
fn check_unit<U: TileUnit>(seed: u64) {
    let mut rng = Rng::new(seed);
    for d in [32, 64, 96, 128] {
        for rows_n in [1, 3, 4, 5, 9] {
            for n in [1, 15, 17, 33, TK] {
                for bf16_query in [true, false] {
                    let (data, kf, fmt) = rows(d, n, &mut rng);
                    let kv = Q8Rows {
                        data: &data,
                        len: n,
                        fmt,
                    };
                    let q: Vec<f32> = (0..rows_n * d)
                        .map(|_| {
                            let x = 2.0 * rng.uniform() - 1.0;
                            if bf16_query {
                                half::bf16::from_f32(x).to_f32()
                            } else {
                                x
                            }
                        })
                        .collect();
                    let mut s = vec![f32::NAN; rows_n * TK];
                    let mut sc = Vec::new();
                    // SAFETY: AVX-512 (checked by the callers); `U` emulated or checked.
                    unsafe { scores::<U>(&q, rows_n, &kv, n, &mut s, &mut sc, &kv) };
                    for r in 0..rows_n {
                        for j in 0..n {
                            let (mut want, mut mag) = (0f64, 0f64);
                            for i in 0..d {
                                let t = q[r * d + i] as f64 * kf[j * d + i];
                                want += t;
                                mag += t.abs();
                            }
                            let what = format!("scores d={d} rows={rows_n} n={n} r={r} j={j}");
                            near(s[r * TK + j], want, mag, &what);
                        }
                        assert!(s[r * TK + n..(r + 1) * TK].iter().all(|x| x.is_nan()));
                    }
                    // p . V: probabilities in [0, 1), some exactly 0 (masked keys).
                    let p: Vec<f32> = (0..rows_n * TK)
                        .map(|i| if i % 5 == 0 { 0.0 } else { rng.uniform() })
                        .collect();
                    let o0: Vec<f32> = (0..rows_n * d).map(|_| rng.uniform()).collect();
                    let mut o = o0.clone();
                    // SAFETY: as above.
                    unsafe { pv::<U>(&p, rows_n, &kv, n, &mut o, &mut sc, &kv) };
                    for r in 0..rows_n {
                        for c in 0..d {
                            let (mut want, mut mag) =
                                (o0[r * d + c] as f64, o0[r * d + c].abs() as f64);
                            for j in 0..n {
                                let t = p[r * TK + j] as f64 * kf[j * d + c];
                                want += t;
                                mag += t.abs();
                            }
                            let what = format!("pv d={d} rows={rows_n} n={n} r={r} c={c}");
                            near(o[r * d + c], want, mag, &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn the_tile_kernels_match_the_reference_through_the_emulated_unit() {
    if !here() {
        return;
    }
    check_unit::<Emu>(0xa3c5);
}

#[test]
fn the_tile_kernels_match_the_reference_through_the_cpus_unit() {
    if !here() || !matches!(crate::cpu::simd::amx_status(), Ok(true)) {
        let why = crate::cpu::simd::amx_status();
        eprintln!("the tile path is off here ({why:?}): skipped");
        return;
    }
    check_unit::<Hw>(0x5ca3);
}

#[test]
fn a_query_split_into_three_bf16_parts_is_exact() {
    if !here() {
        return;
    }
    let mut rng = Rng::new(9);
    let mut vals: Vec<f32> = (0..64).map(|_| (rng.uniform() - 0.5) * 1e3).collect();
    vals[0] = f32::INFINITY;
    vals[1] = f32::NEG_INFINITY;
    vals[2] = -0.0;
    vals[3] = f32::MIN_POSITIVE;
    for chunk in vals.chunks(16) {
        // SAFETY: AVX-512 F (checked above).
        let parts = unsafe { split_lanes(chunk) };
        for (l, &w) in chunk.iter().enumerate() {
            let [hi, mid, lo] = parts[l];
            for x in [hi, mid, lo] {
                assert_eq!(x.to_bits() & 0xFFFF, 0, "{x} is not a bf16");
            }
            if w.is_finite() {
                assert_eq!(hi + mid + lo, w, "{w}");
            } else {
                assert_eq!((hi, mid, lo), (w, 0.0, 0.0));
            }
        }
    }
}

/// `split3` of 16 values, per lane.
#[target_feature(enable = "avx512f")]
unsafe fn split_lanes(v: &[f32]) -> [[f32; 3]; 16] {
    // SAFETY: 16 readable f32.
    let parts = unsafe { split3(_mm512_loadu_ps(v.as_ptr())) };
    let mut out = [[0f32; 3]; 16];
    for (p, x) in parts.iter().enumerate() {
        let mut lanes = [0f32; 16];
        // SAFETY: 16 writable f32.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), _mm512_castsi512_ps(*x)) };
        for l in 0..16 {
            out[l][p] = lanes[l];
        }
    }
    out
}

#[test]
fn the_tile_path_is_off_unless_asked_for() {
    if std::env::var("HEADINFER_CPU_AMX").as_deref() != Ok("1") {
        assert_eq!(crate::cpu::simd::amx_status(), &Ok(false));
    }
}
