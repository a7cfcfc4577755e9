//! Decode over int8 rows (`Q8Rows`) with AVX-512 (`Kernels::q8_scores`, `Kernels::q8_pv`),
//! for groups of 16 or 32 values (head dims that are a multiple of 16). The generic kernels
//! (`super`) find each vector's scale by a division, a scalar load and a broadcast, and
//! reduce each score's lanes on its own; here the scales of a tile are converted once, each
//! vector takes its scale as a broadcast memory operand, and the scores' lanes are reduced
//! sixteen keys at a time (`sums16`).
//!
//! Scores: `x * s` per vector (exact in f32: `|x| <= 128` and `s` a bf16), then the rows'
//! fused multiply-adds, as the generic path. `p . V`: `p_j * (x * s)` per value is computed
//! as `(p_j * s) * x`, with the products `p_j * s` made once per tile, key and group
//! (`weights`), so that each vector of values is converted once and multiplied into every
//! row's accumulator by a broadcast weight: one rounding more per term (`p_j * s`), as a
//! reassociation gives, within the tolerance that summation order has.
//!
//! AVX-512 BF16's dot product (`vdpbf16ps`) would take the int8 values (exact in bf16) and
//! bf16 queries with exact products, but it is not used: measured on the development
//! machine's Xeon (Emerald Rapids, Sapphire Rapids' core), it runs one every two cycles with
//! a latency of seven (a 16-lane FMA: two a cycle), and the int8 bytes must first become
//! bf16 (table lookups by `vpermi2b`, also one every two cycles there): a key's scores for
//! four query rows took 23 ns with it, in L1, against 17 ns for the generic f32 path and
//! 15 ns for these kernels.

use super::{prefetch_bytes, Tile, TK};
use crate::quant::{Q8Rows, Q8};
use std::arch::x86_64::*;

/// Brings rows `j..j + m` of `ahead` (those of them it holds) into L1. Into L2 only, as
/// first written (a tile's keys and values, the next tile's and the scratch would not all fit
/// L1's 48 KiB), it was measured slower on an H100 host (16-core Xeon, model 207, 2026-12-07):
/// 15 threads over 1 GiB beside the copy engine 56.0 against 54.3 and 51.8 GB/s, one thread
/// over 256 MiB 6.8 against 4.5 and 5.7. No prefetch gave 39.0 and 4.2; into L2 two tiles
/// ahead, 54.4 and 4.2.
#[inline(always)]
fn fetch(ahead: &Q8Rows<'_>, j: usize, m: usize) {
    if j < ahead.len {
        let rb = ahead.fmt.row_bytes();
        prefetch_bytes(
            ahead.data.as_ptr().wrapping_add(j * rb),
            m.min(ahead.len - j) * rb,
        );
    }
}

/// Whether these kernels take rows of this layout: one scale per vector of 16 values.
pub(crate) fn fits(fmt: Q8) -> bool {
    fmt.group.is_multiple_of(16)
}

/// Groups per row, rounded up to a multiple of 4 (the scales are read 4 at a time).
fn padded_groups(fmt: Q8) -> usize {
    fmt.groups().next_multiple_of(4)
}

/// Lane `l` of the result: the sum of the lanes of `v[l]` (a transposing reduction: 15
/// merges of two vectors, each a blend, a permute and an add).
///
/// # Safety
/// AVX-512 F on this CPU.
#[inline(always)]
pub(crate) unsafe fn sums16(v: &[__m512; 16]) -> __m512 {
    // Per level, `a` and `b` merge into lanes that each hold one vector's partial sums:
    // the blend keeps half of each, the permute brings the other halves to them.
    const fn idx(level: usize) -> [u32; 16] {
        let mut x = [0u32; 16];
        let mut l = 0;
        while l < 16 {
            x[l] = match level {
                // Chunks [a1, b0, a3, b2] (4 lanes each).
                2 => [4, 16, 12, 24][l / 4] + (l % 4) as u32,
                // Per chunk c: [a 4c+2, a 4c+3, b 4c, b 4c+1].
                3 => [2, 3, 16, 17][l % 4] + (l / 4 * 4) as u32,
                // Per chunk c: [a 4c+1, b 4c, a 4c+3, b 4c+2].
                _ => [1, 16, 3, 18][l % 4] + (l / 4 * 4) as u32,
            };
            l += 1;
        }
        x
    }
    const I2: [u32; 16] = idx(2);
    const I3: [u32; 16] = idx(3);
    const I4: [u32; 16] = idx(4);
    // SAFETY: register-only AVX-512 F (and loads of 16-lane arrays), by the contract.
    unsafe {
        let ld = |i: &[u32; 16]| _mm512_loadu_si512(i.as_ptr() as *const _);
        let (i2, i3, i4) = (ld(&I2), ld(&I3), ld(&I4));
        // Lanes 0..8: v[i]'s halves added; 8..16: v[i + 8]'s.
        let t: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[i], v[i + 8]);
            _mm512_add_ps(
                _mm512_mask_blend_ps(0xFF00, a, b),
                _mm512_shuffle_f32x4::<0x4E>(a, b),
            )
        });
        // Chunk c (4 lanes): the vector of key i + 4c.
        let u: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (t[i], t[i + 4]);
            _mm512_add_ps(
                _mm512_mask_blend_ps(0xF0F0, a, b),
                _mm512_permutex2var_ps(a, i2, b),
            )
        });
        // Chunk c: lanes 0, 1 key i + 4c; lanes 2, 3 key i + 2 + 4c.
        let w: [__m512; 2] = std::array::from_fn(|i| {
            let (a, b) = (u[i], u[i + 2]);
            _mm512_add_ps(
                _mm512_mask_blend_ps(0xCCCC, a, b),
                _mm512_permutex2var_ps(a, i3, b),
            )
        });
        _mm512_add_ps(
            _mm512_mask_blend_ps(0xAAAA, w[0], w[1]),
            _mm512_permutex2var_ps(w[0], i4, w[1]),
        )
    }
}

/// Groups `4c..4c + 4` of row `row`'s scales (bf16, at `row + head_dim + 8c`) as 4 f32.
///
/// # Safety
/// AVX-512 F/VL on this CPU; the row holds those 8 bytes (its padding covers a last 4 that
/// has fewer groups: the extra lanes are not scales).
#[inline(always)]
unsafe fn scales4(at: *const u8) -> __m128i {
    // SAFETY: 8 bytes at `at` (the contract).
    unsafe { _mm_slli_epi32::<16>(_mm_cvtepu16_epi32(_mm_loadl_epi64(at as *const __m128i))) }
}

/// `s[r][j] = q[r] . k.row(j)` for `r < rows`, `j < n` (`Kernels::scores`) over int8 keys
/// (dequantized: `x * s`), with `sc` as scratch, bringing the rows of `ahead` into cache as
/// it goes (`Kernels::q8_scores`). Keys past `n` are not written.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL (`Isa::Avx512`). Lengths are checked here.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn scores(
    q: &[f32],
    rows: usize,
    k: &Q8Rows<'_>,
    n: usize,
    s: &mut [f32],
    sc: &mut Vec<f32>,
    ahead: &Q8Rows<'_>,
) {
    let fmt = k.fmt;
    let d = fmt.head_dim;
    assert!(fits(fmt), "groups of {}", fmt.group);
    k.check(n);
    assert!(q.len() >= rows * d && s.len() >= rows.saturating_sub(1) * TK + n);
    // The tile's scales as f32: [key][padded group].
    let gp = padded_groups(fmt);
    if sc.len() < TK * gp {
        sc.resize(TK * gp, 0.0);
    }
    let (base, rb) = (k.data.as_ptr(), fmt.row_bytes());
    for j in 0..n {
        for c in 0..gp / 4 {
            // SAFETY: row j (j < n, checked) holds 8 bytes at d + 8c (`scales4`); sc holds
            // TK * gp f32.
            unsafe {
                let v = scales4(base.add(j * rb + d + 8 * c));
                _mm_storeu_si128(sc.as_mut_ptr().add(j * gp + 4 * c) as *mut __m128i, v);
            }
        }
    }
    let (q, s, sc) = (q.as_ptr(), s.as_mut_ptr(), sc.as_ptr());
    for r0 in (0..rows).step_by(4) {
        // SAFETY: rows r0..r0 + 4 (or fewer) of q and s, the n keys and their scales are in
        // bounds (checked above); AVX-512 F/BW/VL by the contract.
        unsafe {
            let (q, s) = (q.add(r0 * d), s.add(r0 * TK));
            macro_rules! go {
                ($r:literal) => {
                    if fmt.group == 16 {
                        score_rows::<$r, 16>(q, k, n, sc, s, ahead)
                    } else {
                        score_rows::<$r, 32>(q, k, n, sc, s, ahead)
                    }
                };
            }
            match rows - r0 {
                1 => go!(1),
                2 => go!(2),
                3 => go!(3),
                _ => go!(4),
            }
        }
    }
}

/// `scores` for `R` rows, groups of `G` values.
///
/// # Safety
/// As `scores`, for `R` rows of `q` and `s`, with the tile's scales in `sc`.
#[inline(always)]
unsafe fn score_rows<const R: usize, const G: usize>(
    q: *const f32,
    k: &Q8Rows<'_>,
    n: usize,
    sc: *const f32,
    s: *mut f32,
    ahead: &Q8Rows<'_>,
) {
    // SAFETY: keys j..j + 4 (or fewer: below n) by the contract; s[r * TK + j0..j1] for
    // r < R, j1 <= n.
    unsafe {
        // 16 keys' vectors of lane sums, per row, then reduced together (`sums16`).
        let mut part = [[_mm512_setzero_ps(); 16]; R];
        for j in (0..n).step_by(4) {
            // Four keys at a time (fewer at the end): independent sums, and each load of a
            // query vector serves four.
            match n - j {
                1 => score_keys::<R, G, 1>(q, k, j, sc, &mut part, ahead),
                2 => score_keys::<R, G, 2>(q, k, j, sc, &mut part, ahead),
                3 => score_keys::<R, G, 3>(q, k, j, sc, &mut part, ahead),
                _ => score_keys::<R, G, 4>(q, k, j, sc, &mut part, ahead),
            }
            // A block of 16 keys complete (or the last, partial one): its scores.
            let j1 = (j + 4).min(n);
            if j1 % 16 == 0 || j1 == n {
                let j0 = j / 16 * 16;
                let m = j1 - j0;
                for (r, p) in part.iter_mut().enumerate() {
                    p[m..].fill(_mm512_setzero_ps());
                    let v = sums16(p);
                    _mm512_mask_storeu_ps(s.add(r * TK + j0), ((1u32 << m) - 1) as u16, v);
                }
            }
        }
    }
}

/// The lane sums of `R` rows' scores against keys `j..j + J` into `part[r][(j + jj) % 16]`.
///
/// # Safety
/// As `score_rows`, for keys `j..j + J`.
#[inline(always)]
unsafe fn score_keys<const R: usize, const G: usize, const J: usize>(
    q: *const f32,
    k: &Q8Rows<'_>,
    j: usize,
    sc: *const f32,
    part: &mut [[__m512; 16]; R],
    ahead: &Q8Rows<'_>,
) {
    let (d, rb, gp) = (k.fmt.head_dim, k.fmt.row_bytes(), padded_groups(k.fmt));
    // SAFETY: by the contract.
    unsafe {
        fetch(ahead, j, J);
        let row = k.data.as_ptr().add(j * rb);
        let sj = sc.add(j * gp);
        let mut acc = [[_mm512_setzero_ps(); J]; R];
        for i in (0..d).step_by(16) {
            let x: [__m512; J] = std::array::from_fn(|jj| {
                let b = _mm_loadu_si128(row.add(jj * rb + i) as *const __m128i);
                let s = _mm512_set1_ps(*sj.add(jj * gp + i / G));
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), s)
            });
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = _mm512_loadu_ps(q.add(r * d + i));
                for jj in 0..J {
                    a[jj] = _mm512_fmadd_ps(qv, x[jj], a[jj]);
                }
            }
        }
        for (p, a) in part.iter_mut().zip(&acc) {
            for (jj, &v) in a.iter().enumerate() {
                p[(j + jj) % 16] = v;
            }
        }
    }
}

/// `o[r] += sum_{j < n} p[r][j] * v.row(j)` for `r < rows` (`Kernels::pv`) over int8
/// values (dequantized: `x * s`), with `sc` as scratch, bringing the rows of `ahead` into
/// cache as it goes (`Kernels::q8_pv`).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL (`Isa::Avx512`). Lengths are checked here.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn pv(
    p: &[f32],
    rows: usize,
    v: &Q8Rows<'_>,
    n: usize,
    o: &mut [f32],
    sc: &mut Vec<f32>,
    ahead: &Q8Rows<'_>,
) {
    let fmt = v.fmt;
    let d = fmt.head_dim;
    assert!(fits(fmt), "groups of {}", fmt.group);
    v.check(n);
    assert!(p.len() >= rows.saturating_sub(1) * TK + n && o.len() >= rows * d);
    // sc: the block's probabilities by key ([TK][4]), then its weights ([TK][gp][4]).
    let gp = padded_groups(fmt);
    if sc.len() < TK * 4 * (1 + gp) {
        sc.resize(TK * 4 * (1 + gp), 0.0);
    }
    let (pt, w) = sc.split_at_mut(TK * 4);
    for r0 in (0..rows).step_by(4) {
        let rr = (rows - r0).min(4);
        // SAFETY: p's rows r0..r0 + rr hold n f32 each, pt n * 4 and w n * gp * 4 (TK >= n);
        // the rows of v as in `scores`; o's rows r0..r0 + rr (checked above); AVX-512 F by
        // the contract.
        unsafe {
            transpose(p.as_ptr().add(r0 * TK), rr, n, pt);
            weights(pt, v, n, w);
            let (w, o) = (w.as_ptr(), o.as_mut_ptr().add(r0 * d));
            macro_rules! go {
                ($r:literal) => {
                    if fmt.group == 16 {
                        pv_rows::<$r, 16>(w, v, n, o, ahead)
                    } else {
                        pv_rows::<$r, 32>(w, v, n, o, ahead)
                    }
                };
            }
            match rr {
                1 => go!(1),
                2 => go!(2),
                3 => go!(3),
                _ => go!(4),
            }
        }
    }
}

/// `pt[j][r] = p[r * TK + j]` for `j < n`, `r < 4` (0 for the rows past `rows`): the
/// probabilities of each key together.
///
/// # Safety
/// AVX-512 F on this CPU; `p`'s rows `r < rows` (`TK` apart) hold `n` f32; `pt` holds
/// `n.next_multiple_of(16) * 4`.
#[inline(always)]
unsafe fn transpose(p: *const f32, rows: usize, n: usize, pt: &mut [f32]) {
    // Keys 0..8 (then 8..16) of rows a and b interleaved; then keys 4m..4m + 4 of the
    // interleaved pairs (rows 0, 1 and 2, 3) interleaved by pairs.
    const fn idx(level: usize, half: usize) -> [u32; 16] {
        let mut x = [0u32; 16];
        let mut l = 0;
        while l < 16 {
            x[l] = if level == 1 {
                (8 * half + l / 2 + 16 * (l % 2)) as u32
            } else {
                // Lane l: key 4 * half + l / 4 of row l % 4: pair (key) from a (rows 0, 1)
                // or b (rows 2, 3).
                let key = 4 * half + l / 4;
                let (src, r) = (l % 4 / 2, l % 2);
                (16 * src + 2 * (key % 8) + r) as u32
            };
            l += 1;
        }
        x
    }
    const L1: [[u32; 16]; 2] = [idx(1, 0), idx(1, 1)];
    const L2: [[u32; 16]; 4] = [idx(2, 0), idx(2, 1), idx(2, 2), idx(2, 3)];
    // SAFETY: by the contract: masked loads read rows r < rows, keys below n only; the
    // stores write pt[j * 4..] for j below n rounded up to 16.
    unsafe {
        let ld = |i: &[u32; 16]| _mm512_loadu_si512(i.as_ptr() as *const _);
        for j0 in (0..n).step_by(16) {
            let m = ((1u32 << (n - j0).min(16)) - 1) as u16;
            let row = |r: usize| {
                if r < rows {
                    _mm512_maskz_loadu_ps(m, p.add(r * TK + j0))
                } else {
                    _mm512_setzero_ps()
                }
            };
            let (p0, p1, p2, p3) = (row(0), row(1), row(2), row(3));
            for h in 0..2 {
                let a = _mm512_permutex2var_ps(p0, ld(&L1[h]), p1);
                let b = _mm512_permutex2var_ps(p2, ld(&L1[h]), p3);
                for q in 0..2 {
                    let v = _mm512_permutex2var_ps(a, ld(&L2[2 * h + q]), b);
                    _mm512_storeu_ps(pt.as_mut_ptr().add((j0 + 8 * h + 4 * q) * 4), v);
                }
            }
        }
    }
}

/// `w[j][g][r] = pt[j][r] * scale[j][g]` for the `n` rows of `v`, `g` below the padded
/// group count (the lanes past the row's groups are not weights), `r < 4`.
///
/// # Safety
/// AVX-512 F/VL on this CPU; `pt` holds `n * 4` f32, `w` `n * padded_groups * 4`; `v`
/// holds `n` rows.
#[inline(always)]
unsafe fn weights(pt: &[f32], v: &Q8Rows<'_>, n: usize, w: &mut [f32]) {
    let (d, rb, gp) = (v.fmt.head_dim, v.fmt.row_bytes(), padded_groups(v.fmt));
    // Word 2l + 1 (the high half of f32 lane l) takes scale l / 4 of the 4 loaded; the
    // even words are zeroed by the mask.
    const IDX: [u16; 32] = {
        let mut x = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            x[i] = (i / 8) as u16;
            i += 1;
        }
        x
    };
    // SAFETY: by the contract: row j's scales at j * rb + d + 8c (8 bytes, `scales4`), pt's
    // 4 f32 at j * 4, w's 16 f32 at (j * gp + 4c) * 4.
    unsafe {
        let idx = _mm512_loadu_si512(IDX.as_ptr() as *const _);
        for j in 0..n {
            let pj = _mm512_broadcast_f32x4(_mm_loadu_ps(pt.as_ptr().add(j * 4)));
            for c in 0..gp / 4 {
                let at = v.data.as_ptr().add(j * rb + d + 8 * c);
                let s8 = _mm512_castsi128_si512(_mm_loadl_epi64(at as *const __m128i));
                let s = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAA_AAAA, idx, s8));
                _mm512_storeu_ps(
                    w.as_mut_ptr().add((j * gp + 4 * c) * 4),
                    _mm512_mul_ps(s, pj),
                );
            }
        }
    }
}

/// `pv` for `R` rows, groups of `G` values: columns in blocks of 64, then 16.
///
/// # Safety
/// As `pv`, for `R` rows of `o`, with the block's weights in `w`.
#[inline(always)]
unsafe fn pv_rows<const R: usize, const G: usize>(
    w: *const f32,
    v: &Q8Rows<'_>,
    n: usize,
    o: *mut f32,
    ahead: &Q8Rows<'_>,
) {
    let d = v.fmt.head_dim;
    let mut c = 0;
    // SAFETY: columns c..c + 64 (then c..c + 16) are below d (a multiple of 16).
    unsafe {
        while c + 64 <= d {
            pv_block::<R, G, 4>(w, v, n, o, c, ahead);
            c += 64;
        }
        while c < d {
            pv_block::<R, G, 1>(w, v, n, o, c, ahead);
            c += 16;
        }
    }
}

/// Columns `c0..c0 + 16 * B` of `R` output rows, in registers over the `n` keys.
///
/// # Safety
/// As `pv_rows`, for those columns.
#[inline(always)]
unsafe fn pv_block<const R: usize, const G: usize, const B: usize>(
    w: *const f32,
    v: &Q8Rows<'_>,
    n: usize,
    o: *mut f32,
    c0: usize,
    ahead: &Q8Rows<'_>,
) {
    let (d, rb, gp) = (v.fmt.head_dim, v.fmt.row_bytes(), padded_groups(v.fmt));
    // SAFETY: o's rows r < R at r * d, columns c0..c0 + 16B <= d; key j's weights at
    // w[(j * gp + g) * 4 + r] (g the group of a column, below gp); row j's values at
    // j * rb + c0..; AVX-512 F by the contract.
    unsafe {
        let mut acc: [[__m512; B]; R] = std::array::from_fn(|r| {
            std::array::from_fn(|b| _mm512_loadu_ps(o.add(r * d + c0 + 16 * b)))
        });
        // The weights of the block's first group; the others follow at fixed offsets.
        let w = w.add(c0 / G * 4);
        // Each row of `ahead` once, spread over the passes over the columns: the blocks
        // that start a pass of 64 columns take every `passes`-th row (the blocks of a last,
        // narrower pass, the rest of them), the other blocks none. Issued in one pass, the
        // prefetches came in a burst that filled the line fill buffers and waited.
        let passes = d.div_ceil(64);
        let mut fetch_at = if c0.is_multiple_of(64) {
            c0 / 64
        } else {
            usize::MAX
        };
        for j in 0..n {
            if j == fetch_at {
                fetch(ahead, j, 1);
                fetch_at += passes;
            }
            let row = v.data.as_ptr().add(j * rb + c0);
            let x: [__m512; B] = std::array::from_fn(|b| {
                let i8s = _mm_loadu_si128(row.add(16 * b) as *const __m128i);
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(i8s))
            });
            let wj = w.add(j * gp * 4);
            for (r, a) in acc.iter_mut().enumerate() {
                for b in 0..B {
                    let wt = _mm512_set1_ps(*wj.add(16 * b / G * 4 + r));
                    a[b] = _mm512_fmadd_ps(wt, x[b], a[b]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (b, x) in a.iter().enumerate() {
                _mm512_storeu_ps(o.add(r * d + c0 + 16 * b), *x);
            }
        }
    }
}

#[cfg(test)]
#[path = "../../../tests/rust/cpu/simd/q8.rs"]
mod tests;
