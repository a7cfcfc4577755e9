//! The x86-64 SIMD sets as `Lanes`: AVX2 with FMA and F16C (`__m256`, 8 lanes) and AVX-512
//! F/BW/VL (`__m512`, 16 lanes). Everything else about the kernels is generic (`super`).
//!
//! Conversions on load: bf16 is the high half of an f32, so zero-extending each 16-bit
//! element to 32 bits (`cvtepu16_epi32`) and shifting it left by 16 gives the f32 exactly;
//! f16 goes through `cvtph_ps` (F16C, or AVX-512 F's 16-lane form), also exact.

use super::{q8, simd_kernels, Lanes};
use crate::quant::Q8Rows;
use crate::tensor::{DType, Element};
use std::arch::x86_64::*;

/// AVX2 + FMA + F16C.
pub(crate) struct Avx2;
/// AVX-512 F + BW + VL (and what they imply: AVX2, FMA, F16C).
pub(crate) struct Avx512;

simd_kernels!(Avx2, "avx2,fma,f16c");
simd_kernels!(
    Avx512,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    // The int8 decode kernels of `q8`, for the layouts they take; the generic ones otherwise.
    unsafe fn q8_scores(
        q: &[f32],
        rows: usize,
        k: &Q8Rows<'_>,
        n: usize,
        s: &mut [f32],
        sc: &mut Vec<f32>,
        ahead: &Q8Rows<'_>,
    ) {
        if q8::fits(k.fmt) {
            // SAFETY: AVX-512 F/BW/VL by this function's contract; `scores` checks the
            // lengths.
            unsafe { q8::scores(q, rows, k, n, s, sc, ahead) }
        } else {
            // SAFETY: by the contract.
            unsafe { Self::scores(q, rows, k, n, s) }
        }
    },
    unsafe fn q8_pv(
        p: &[f32],
        rows: usize,
        v: &Q8Rows<'_>,
        n: usize,
        o: &mut [f32],
        sc: &mut Vec<f32>,
        ahead: &Q8Rows<'_>,
    ) {
        if q8::fits(v.fmt) {
            // SAFETY: AVX-512 F/BW/VL by this function's contract; `pv` checks the lengths.
            unsafe { q8::pv(p, rows, v, n, o, sc, ahead) }
        } else {
            // SAFETY: by the contract.
            unsafe { Self::pv(p, rows, v, n, o) }
        }
    }
);

/// Lane `i` of the result: the sum of the lanes of `v[i]`.
///
/// # Safety
/// As `Lanes` (AVX).
#[inline(always)]
unsafe fn hsum8(v: &[__m256; 8]) -> __m256 {
    // SAFETY: register-only AVX, present by the contract.
    unsafe {
        let t0 = _mm256_hadd_ps(v[0], v[1]);
        let t1 = _mm256_hadd_ps(v[2], v[3]);
        let t2 = _mm256_hadd_ps(v[4], v[5]);
        let t3 = _mm256_hadd_ps(v[6], v[7]);
        // Low halves: v0..v3's (then v4..v7's) sums of lanes 0..4; high halves: of 4..8.
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }
}

impl Lanes for Avx2 {
    type V = __m256;
    const N: usize = 8;
    const WIDE: bool = false;

    #[inline(always)]
    unsafe fn zero() -> __m256 {
        // SAFETY: AVX, present by the contract.
        unsafe { _mm256_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> __m256 {
        // SAFETY: AVX, present by the contract.
        unsafe { _mm256_set1_ps(x) }
    }

    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: FMA, present by the contract.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }

    #[inline(always)]
    unsafe fn load<E: Element>(p: *const E) -> __m256 {
        // SAFETY: `p` addresses 8 elements (32 or 16 bytes, unaligned loads); AVX2 and F16C
        // present; by the contract.
        unsafe {
            match E::DTYPE {
                DType::F32 => _mm256_loadu_ps(p as *const f32),
                DType::BF16 => {
                    let h = _mm_loadu_si128(p as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                }
                DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            }
        }
    }

    /// Through a zeroed buffer: AVX2 has no masked 16-bit loads, and this runs only for the
    /// last `head_dim % 8` columns.
    #[inline(always)]
    unsafe fn load_part<E: Element>(p: *const E, n: usize) -> __m256 {
        debug_assert!(n < 8);
        let mut buf = [E::from_f32(0.0); 8];
        // SAFETY: `p` addresses n < 8 elements (the contract); the buffer holds 8.
        unsafe {
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n.min(8));
            Self::load(buf.as_ptr())
        }
    }

    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX, present by the contract.
        unsafe { _mm256_mul_ps(a, b) }
    }

    /// Sign-extended to 32 bits, then converted (exact: |q| <= 127).
    #[inline(always)]
    unsafe fn load_i8(p: *const i8, w: usize) -> __m256 {
        // SAFETY: `p` addresses w bytes (the contract): 8 in one 64-bit load, fewer through
        // a zeroed buffer; AVX2 present.
        unsafe {
            let b = if w == 8 {
                _mm_loadl_epi64(p as *const __m128i)
            } else {
                let mut buf = [0i8; 16];
                std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), w.min(8));
                _mm_loadu_si128(buf.as_ptr() as *const __m128i)
            };
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))
        }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: `p` addresses 8 f32; AVX present; by the contract.
        unsafe { _mm256_storeu_ps(p, v) }
    }

    #[inline(always)]
    unsafe fn store_part(p: *mut f32, n: usize, v: __m256) {
        debug_assert!(n < 8);
        let mut buf = [0f32; 8];
        // SAFETY: the buffer holds 8 f32; `p` addresses n < 8 (the contract).
        unsafe {
            _mm256_storeu_ps(buf.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), p, n.min(8));
        }
    }

    #[inline(always)]
    unsafe fn sums(v: &[__m256], out: &mut [f32]) {
        debug_assert!(v.len() == out.len() && v.len() <= 16);
        // SAFETY: AVX present by the contract; `t` holds 8 f32.
        unsafe {
            for (vc, oc) in v.chunks(8).zip(out.chunks_mut(8)) {
                let mut a = [_mm256_setzero_ps(); 8];
                a[..vc.len()].copy_from_slice(vc);
                let mut t = [0f32; 8];
                _mm256_storeu_ps(t.as_mut_ptr(), hsum8(&a));
                oc.copy_from_slice(&t[..oc.len()]);
            }
        }
    }
}

/// The lanes `0..n` (`n <= 16`) as a mask.
#[inline(always)]
fn first(n: usize) -> __mmask16 {
    debug_assert!(n <= 16);
    ((1u32 << n.min(16)) - 1) as __mmask16
}

impl Lanes for Avx512 {
    type V = __m512;
    const N: usize = 16;
    const WIDE: bool = true;

    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: AVX-512 F, present by the contract.
        unsafe { _mm512_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        // SAFETY: AVX-512 F, present by the contract.
        unsafe { _mm512_set1_ps(x) }
    }

    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: AVX-512 F, present by the contract.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }

    #[inline(always)]
    unsafe fn load<E: Element>(p: *const E) -> __m512 {
        // SAFETY: `p` addresses 16 elements (64 or 32 bytes, unaligned loads); AVX-512 F
        // present; by the contract.
        unsafe {
            match E::DTYPE {
                DType::F32 => _mm512_loadu_ps(p as *const f32),
                DType::BF16 => {
                    let h = _mm256_loadu_si256(p as *const __m256i);
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
                DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            }
        }
    }

    /// Masked loads: the lanes past `n` are zeroed and not read (no fault past the row).
    #[inline(always)]
    unsafe fn load_part<E: Element>(p: *const E, n: usize) -> __m512 {
        let m = first(n);
        // SAFETY: `p` addresses the n elements of the mask's lanes (the contract); the others
        // are not accessed. AVX-512 F (f32), BW + VL (16-bit zero-masked loads of 256 bits).
        unsafe {
            match E::DTYPE {
                DType::F32 => _mm512_maskz_loadu_ps(m, p as *const f32),
                DType::BF16 => {
                    let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
                DType::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16)),
            }
        }
    }

    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512 F, present by the contract.
        unsafe { _mm512_mul_ps(a, b) }
    }

    /// Sign-extended to 32 bits, then converted (exact: |q| <= 127); a masked load for
    /// `w < 16` (no fault past the row).
    #[inline(always)]
    unsafe fn load_i8(p: *const i8, w: usize) -> __m512 {
        // SAFETY: `p` addresses w bytes (the contract); the mask's lanes only. AVX-512 F, and
        // BW + VL for the masked byte load.
        unsafe {
            let b = if w == 16 {
                _mm_loadu_si128(p as *const __m128i)
            } else {
                _mm_maskz_loadu_epi8(first(w), p)
            };
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))
        }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: `p` addresses 16 f32; AVX-512 F present; by the contract.
        unsafe { _mm512_storeu_ps(p, v) }
    }

    /// A masked store: only the lanes `0..n` are written.
    #[inline(always)]
    unsafe fn store_part(p: *mut f32, n: usize, v: __m512) {
        // SAFETY: `p` addresses the n f32 of the mask's lanes (the contract); AVX-512 F.
        unsafe { _mm512_mask_storeu_ps(p, first(n), v) }
    }

    /// Each vector folded to 8 lanes (its two halves added), then AVX2's sums of 8 at once:
    /// fewer shuffles than a `_mm512_reduce_add_ps` per vector.
    #[inline(always)]
    unsafe fn sums(v: &[__m512], out: &mut [f32]) {
        debug_assert!(v.len() == out.len() && v.len() <= 16);
        // SAFETY: AVX-512 F and AVX present by the contract.
        unsafe {
            let mut h = [_mm256_setzero_ps(); 16];
            for (x, &z) in h.iter_mut().zip(v) {
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(z)));
                *x = _mm256_add_ps(_mm512_castps512_ps256(z), hi);
            }
            Avx2::sums(&h[..v.len()], out)
        }
    }
}
