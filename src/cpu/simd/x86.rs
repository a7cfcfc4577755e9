//! The x86-64 SIMD sets as `Lanes`: AVX2 with FMA and F16C (`__m256`, 8 lanes) and AVX-512
//! F/BW/VL (`__m512`, 16 lanes). Everything else about the kernels is generic (`super`).
//!
//! Conversions on load: bf16 is the high half of an f32, so zero-extending each 16-bit
//! element to 32 bits (`cvtepu16_epi32`) and shifting it left by 16 gives the f32 exactly;
//! f16 goes through `cvtph_ps` (F16C, or AVX-512 F's 16-lane form), also exact.

use super::check::{self, Compare};
use super::{amx, q8, simd_kernels, Job, Kernels, Lanes, Tile};
use crate::quant::Q8Rows;
use crate::tensor::{DType, Element};
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// AVX2 + FMA + F16C.
pub(crate) struct Avx2;
/// AVX-512 F + BW + VL (and what they imply: AVX2, FMA, F16C).
pub(crate) struct Avx512;

simd_kernels!(Avx2, "avx2,fma,f16c");
simd_kernels!(
    Avx512,
    "avx512f,avx512bw,avx512vl,avx2,fma,f16c",
    // The int8 decode kernels: through the tile unit where it is on (`amx_active`).
    unsafe fn q8_scores(
        q: &[f32],
        rows: usize,
        k: &Q8Rows<'_>,
        n: usize,
        s: &mut [f32],
        sc: &mut Vec<f32>,
        ahead: &Q8Rows<'_>,
    ) {
        // SAFETY: AVX-512 F/BW/VL by this function's contract, AMX by `amx_active`.
        unsafe { q8_scores_on(amx_active(), q, rows, k, n, s, sc, ahead) }
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
        // SAFETY: as for the scores.
        unsafe { q8_pv_on(amx_active(), p, rows, v, n, o, sc, ahead) }
    }
);

/// `Kernels::q8_scores` with AVX-512: through the tile unit with `tiles` where it takes the
/// layout, else `q8`'s kernels where they take it, else the generic ones. The one place that
/// chooses, for both `Avx512` (`tiles`: `amx_active`) and `Avx512Amx` (always, so its
/// self-check never asks `amx_status` from inside itself).
///
/// # Safety
/// AVX-512 F/BW/VL on this CPU; with `tiles`, AMX and its permission (`amx::enable`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn q8_scores_on(
    tiles: bool,
    q: &[f32],
    rows: usize,
    k: &Q8Rows<'_>,
    n: usize,
    s: &mut [f32],
    sc: &mut Vec<f32>,
    ahead: &Q8Rows<'_>,
) {
    // SAFETY: by the contract; the kernels check the lengths.
    unsafe {
        if tiles && amx::fits(k.fmt) {
            amx::scores::<amx::Hw>(q, rows, k, n, s, sc, ahead)
        } else if q8::fits(k.fmt) {
            q8::scores(q, rows, k, n, s, sc, ahead)
        } else {
            Avx512::scores(q, rows, k, n, s)
        }
    }
}

/// `Kernels::q8_pv` with AVX-512, chosen as `q8_scores_on` chooses.
///
/// # Safety
/// As `q8_scores_on`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn q8_pv_on(
    tiles: bool,
    p: &[f32],
    rows: usize,
    v: &Q8Rows<'_>,
    n: usize,
    o: &mut [f32],
    sc: &mut Vec<f32>,
    ahead: &Q8Rows<'_>,
) {
    // SAFETY: by the contract; the kernels check the lengths.
    unsafe {
        if tiles && amx::fits(v.fmt) {
            amx::pv::<amx::Hw>(p, rows, v, n, o, sc, ahead)
        } else if q8::fits(v.fmt) {
            q8::pv(p, rows, v, n, o, sc, ahead)
        } else {
            Avx512::pv(p, rows, v, n, o)
        }
    }
}

/// Whether the int8 decode runs through the tile unit in this process (`amx`): asked for
/// (`HEADINFER_CPU_AMX=1`), the CPU and the kernel allowing it (`amx::enable`), and the tile
/// kernels agreeing with the f64 reference (`check::SELF_CHECK_AMX`); decided once.
/// `Ok(false)`: not asked for; `Err`: asked for but not running, and why.
pub(crate) fn amx_status() -> &'static Result<bool, String> {
    static STATUS: OnceLock<Result<bool, String>> = OnceLock::new();
    STATUS.get_or_init(|| {
        if std::env::var("HEADINFER_CPU_AMX").as_deref() != Ok("1") {
            return Ok(false);
        }
        amx::enable()?;
        // SAFETY: AVX-512 F/BW/VL and AMX with its permission (`enable`).
        unsafe { Avx512Amx::run(Compare(check::SELF_CHECK_AMX)) }
            .map(|()| true)
            .map_err(|e| format!("the tile kernels failed the self-check: {e}"))
    })
}

/// `amx_status` is `Ok(true)`.
pub(crate) fn amx_active() -> bool {
    matches!(amx_status(), Ok(true))
}

/// The AVX-512 kernels with the int8 decode through the tile unit (where it `fits`): what
/// `active` checks before the AVX-512 kernels route to it.
pub(crate) struct Avx512Amx;

impl Kernels for Avx512Amx {
    const FMA: bool = true;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn run<J: Job>(job: J) -> J::Output {
        // SAFETY: the caller vouches for the set.
        unsafe { job.run::<Self>() }
    }

    unsafe fn scores<T: Tile>(q: &[f32], rows: usize, k: &T, n: usize, s: &mut [f32]) {
        // SAFETY: the same set (the contract).
        unsafe { Avx512::scores(q, rows, k, n, s) }
    }

    unsafe fn pv<T: Tile>(p: &[f32], rows: usize, v: &T, n: usize, o: &mut [f32]) {
        // SAFETY: the same set (the contract).
        unsafe { Avx512::pv(p, rows, v, n, o) }
    }

    unsafe fn q8_scores(
        q: &[f32],
        rows: usize,
        k: &Q8Rows<'_>,
        n: usize,
        s: &mut [f32],
        sc: &mut Vec<f32>,
        ahead: &Q8Rows<'_>,
    ) {
        // SAFETY: AVX-512 by this function's contract, AMX by `amx_status`'s (its only
        // caller).
        unsafe { q8_scores_on(true, q, rows, k, n, s, sc, ahead) }
    }

    unsafe fn q8_pv(
        p: &[f32],
        rows: usize,
        v: &Q8Rows<'_>,
        n: usize,
        o: &mut [f32],
        sc: &mut Vec<f32>,
        ahead: &Q8Rows<'_>,
    ) {
        // SAFETY: as for the scores.
        unsafe { q8_pv_on(true, p, rows, v, n, o, sc, ahead) }
    }
}

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
