//! Explicit SIMD for the CPU attention's hot loops: the scores `q . k` of a few query rows
//! against a tile of keys, and the accumulation `o += p . V`, with the keys and values
//! converted to f32 as they are loaded (bf16: a shift; f16: F16C's `cvtph2ps`).
//!
//! Three instruction sets, chosen once at run time (`Isa::best`): AVX-512 (F, BW, VL) where
//! the CPU has it, AVX2 with FMA and F16C otherwise, and portable code everywhere else (the
//! reference the others are tested against). Each is a `Kernels` implementation; the
//! attention kernel is compiled once per implementation inside a `#[target_feature]` wrapper,
//! so its remaining loops (the softmax over a tile) are vectorised for that set too.
//!
//! Every path accumulates in f32; they differ only in summation order. AVX-512's bf16 dot
//! product (`vdpbf16ps`) is not used: it would need the scaled queries and the probabilities
//! rounded to bf16, which changes the function.

use super::math::TK;
use crate::tensor::{Element, Rows};
use std::sync::OnceLock;

/// An instruction set of the CPU attention kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust (the compiler's auto-vectorisation for the build's baseline target).
    Scalar,
    /// AVX2, FMA and F16C intrinsics, 8 lanes.
    Avx2,
    /// AVX-512 F, BW and VL intrinsics, 16 lanes.
    Avx512,
}

impl Isa {
    /// Every instruction set, from the most portable to the widest.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU runs it (detected at run time; std caches the detection).
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.supported()
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest set this CPU supports, decided once per process.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .rev()
                .find(|i| i.supported())
                .unwrap_or(Isa::Scalar)
        })
    }
}

/// The hot loops of one instruction set.
///
/// Layouts (all row-major): `q` and `o` hold `rows` rows of `head_dim` f32 (`head_dim` is the
/// width of the key or value rows); `s` and `p` hold `rows` rows of `TK` f32.
pub(crate) trait Kernels {
    /// Whether the generic loops compiled with this set may fuse multiply-adds.
    const FMA: bool;

    /// `s[r][j] = q[r] . k.row(j)` for `r < rows`, `j < n`.
    ///
    /// # Safety
    /// The CPU supports this instruction set (`Isa::supported`). Lengths are checked here.
    unsafe fn scores<E: Element>(q: &[f32], rows: usize, k: &Rows<'_, E>, n: usize, s: &mut [f32]);

    /// `o[r] += sum_{j < n} p[r][j] * v.row(j)` for `r < rows`.
    ///
    /// # Safety
    /// As `scores`.
    unsafe fn pv<E: Element>(p: &[f32], rows: usize, v: &Rows<'_, E>, n: usize, o: &mut [f32]);
}

/// Panics unless `rows` rows of `a` (`a_width` each), `n` rows of `kv` and `rows` rows of
/// `b` (`b_width` each) are in bounds: what makes the raw-pointer loops below safe.
#[inline(always)]
fn check_lengths<E>(
    a: &[f32],
    a_width: usize,
    rows: usize,
    kv: &Rows<'_, E>,
    n: usize,
    b: &[f32],
    b_width: usize,
) {
    assert!(
        n <= TK && n <= kv.len,
        "{n} keys of a tile of {} rows",
        kv.len
    );
    assert!(kv.stride >= kv.width);
    assert!(n == 0 || (n - 1) * kv.stride + kv.width <= kv.data.len());
    assert!(a.len() >= rows * a_width && b.len() >= rows * b_width);
}

/// Portable code: eight independent accumulators so that the compiler vectorises it.
pub(crate) struct Scalar;

impl Kernels for Scalar {
    const FMA: bool = false;

    unsafe fn scores<E: Element>(q: &[f32], rows: usize, k: &Rows<'_, E>, n: usize, s: &mut [f32]) {
        let d = k.width;
        check_lengths(q, d, rows, k, n, s, TK);
        for r in 0..rows {
            let qr = &q[r * d..(r + 1) * d];
            for j in 0..n {
                s[r * TK + j] = dot(qr, k.row(j));
            }
        }
    }

    unsafe fn pv<E: Element>(p: &[f32], rows: usize, v: &Rows<'_, E>, n: usize, o: &mut [f32]) {
        let d = v.width;
        check_lengths(p, TK, rows, v, n, o, d);
        for r in 0..rows {
            let pr: &[f32; TK] = p[r * TK..(r + 1) * TK].try_into().expect("TK");
            let orow = &mut o[r * d..(r + 1) * d];
            let mut dc = 0;
            while dc + 64 <= d {
                pv_block::<E, 64>(orow, pr, n, v, dc);
                dc += 64;
            }
            while dc + 8 <= d {
                pv_block::<E, 8>(orow, pr, n, v, dc);
                dc += 8;
            }
            while dc < d {
                pv_block::<E, 1>(orow, pr, n, v, dc);
                dc += 1;
            }
        }
    }
}

/// `q . k` with eight independent accumulators (a plain sum would not vectorise).
#[inline(always)]
fn dot<E: Element>(q: &[f32], k: &[E]) -> f32 {
    let mut acc = [0f32; 8];
    let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l].to_f32();
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (a, b) in qr.iter().zip(kr) {
        s += *a * b.to_f32();
    }
    s
}

/// Columns `dc..dc + W` of one output row, held in registers over the keys.
#[inline(always)]
fn pv_block<E: Element, const W: usize>(
    orow: &mut [f32],
    p: &[f32; TK],
    n: usize,
    v: &Rows<'_, E>,
    dc: usize,
) {
    let mut acc: [f32; W] = orow[dc..dc + W].try_into().expect("W");
    for (j, &pj) in p.iter().enumerate().take(n) {
        let vr: &[E; W] = v.row(j)[dc..dc + W].try_into().expect("W");
        for w in 0..W {
            acc[w] += pj * vr[w].to_f32();
        }
    }
    orow[dc..dc + W].copy_from_slice(&acc);
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{check_lengths, Kernels, TK};
    use crate::tensor::{DType, Element, Rows};
    use std::arch::x86_64::*;

    /// AVX2 + FMA + F16C.
    pub(crate) struct Avx2;
    /// AVX-512 F + BW + VL (and what they imply: AVX2, FMA, F16C).
    pub(crate) struct Avx512;

    impl Kernels for Avx2 {
        const FMA: bool = true;

        unsafe fn scores<E: Element>(
            q: &[f32],
            rows: usize,
            k: &Rows<'_, E>,
            n: usize,
            s: &mut [f32],
        ) {
            let d = k.width;
            check_lengths(q, d, rows, k, n, s, TK);
            // SAFETY: the caller vouches for AVX2/FMA/F16C; lengths checked just above.
            unsafe {
                avx2::scores(
                    q.as_ptr(),
                    rows,
                    d,
                    k.data.as_ptr(),
                    k.stride,
                    n,
                    s.as_mut_ptr(),
                )
            }
        }

        unsafe fn pv<E: Element>(p: &[f32], rows: usize, v: &Rows<'_, E>, n: usize, o: &mut [f32]) {
            let d = v.width;
            check_lengths(p, TK, rows, v, n, o, d);
            // SAFETY: the caller vouches for AVX2/FMA/F16C; lengths checked just above.
            unsafe {
                avx2::pv(
                    p.as_ptr(),
                    rows,
                    v.data.as_ptr(),
                    v.stride,
                    n,
                    o.as_mut_ptr(),
                    d,
                )
            }
        }
    }

    impl Kernels for Avx512 {
        const FMA: bool = true;

        unsafe fn scores<E: Element>(
            q: &[f32],
            rows: usize,
            k: &Rows<'_, E>,
            n: usize,
            s: &mut [f32],
        ) {
            let d = k.width;
            check_lengths(q, d, rows, k, n, s, TK);
            // SAFETY: the caller vouches for AVX-512 F/BW/VL; lengths checked just above.
            unsafe {
                avx512::scores(
                    q.as_ptr(),
                    rows,
                    d,
                    k.data.as_ptr(),
                    k.stride,
                    n,
                    s.as_mut_ptr(),
                )
            }
        }

        unsafe fn pv<E: Element>(p: &[f32], rows: usize, v: &Rows<'_, E>, n: usize, o: &mut [f32]) {
            let d = v.width;
            check_lengths(p, TK, rows, v, n, o, d);
            // SAFETY: the caller vouches for AVX-512 F/BW/VL; lengths checked just above.
            unsafe {
                avx512::pv(
                    p.as_ptr(),
                    rows,
                    v.data.as_ptr(),
                    v.stride,
                    n,
                    o.as_mut_ptr(),
                    d,
                )
            }
        }
    }

    /// Lane `i` of the result: the sum of the lanes of `v[i]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum8(v: [__m256; 8]) -> __m256 {
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

    /// The scalar tail of a dot product: `acc + sum_{i in a..b} q[i] * k[i]`.
    ///
    /// # Safety
    /// `q` and `k` hold `b` elements.
    #[inline(always)]
    unsafe fn tail<E: Element>(q: *const f32, k: *const E, a: usize, b: usize, acc: f32) -> f32 {
        let mut x = acc;
        for i in a..b {
            // SAFETY: i < b, in bounds by the contract.
            x = unsafe { (*q.add(i)).mul_add((*k.add(i)).to_f32(), x) };
        }
        x
    }

    mod avx2 {
        use super::*;

        /// 8 elements at `p` as f32.
        ///
        /// # Safety
        /// `p` addresses 8 readable elements; AVX2/F16C present.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load<E: Element>(p: *const E) -> __m256 {
            // SAFETY: by the contract.
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

        /// See `Kernels::scores`; `k` rows `ks` elements apart.
        ///
        /// # Safety
        /// AVX2/FMA/F16C present; `q`: `rows * d`, `k`: `n` rows, `s`: `rows * TK` in bounds.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn scores<E: Element>(
            q: *const f32,
            rows: usize,
            d: usize,
            k: *const E,
            ks: usize,
            n: usize,
            s: *mut f32,
        ) {
            let mut r0 = 0;
            while r0 < rows {
                let rb = (rows - r0).min(4);
                // SAFETY: rows r0..r0 + rb are in bounds by the contract.
                unsafe {
                    let (q, s) = (q.add(r0 * d), s.add(r0 * TK));
                    // At most 8 accumulators: one horizontal sum for all of them.
                    match rb {
                        4 => keys::<E, 4, 2>(q, d, k, ks, n, s),
                        3 => keys::<E, 3, 2>(q, d, k, ks, n, s),
                        2 => keys::<E, 2, 4>(q, d, k, ks, n, s),
                        _ => keys::<E, 1, 8>(q, d, k, ks, n, s),
                    }
                }
                r0 += rb;
            }
        }

        /// `R` rows against every key, `J` keys at a time.
        ///
        /// # Safety
        /// As `scores`, for `R` rows.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn keys<E: Element, const R: usize, const J: usize>(
            q: *const f32,
            d: usize,
            k: *const E,
            ks: usize,
            n: usize,
            s: *mut f32,
        ) {
            let mut j = 0;
            // SAFETY: keys j..j + J (then j) are below n: in bounds by the contract.
            unsafe {
                while j + J <= n {
                    block::<E, R, J>(q, d, k.add(j * ks), ks, s.add(j));
                    j += J;
                }
                while j < n {
                    block::<E, R, 1>(q, d, k.add(j * ks), ks, s.add(j));
                    j += 1;
                }
            }
        }

        /// Scores of `R` rows against `J` keys: `s[r * TK + jj]`.
        ///
        /// # Safety
        /// As `scores`, for `R` rows and `J` keys.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn block<E: Element, const R: usize, const J: usize>(
            q: *const f32,
            d: usize,
            k: *const E,
            ks: usize,
            s: *mut f32,
        ) {
            const { assert!(R * J <= 8) };
            let d8 = d / 8 * 8;
            let mut acc = [[_mm256_setzero_ps(); J]; R];
            let mut i = 0;
            // SAFETY: i + 8 <= d: every load is within a row of q or k.
            unsafe {
                while i < d8 {
                    let mut kv = [_mm256_setzero_ps(); J];
                    for (jj, x) in kv.iter_mut().enumerate() {
                        *x = load(k.add(jj * ks + i));
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let qv = _mm256_loadu_ps(q.add(r * d + i));
                        for jj in 0..J {
                            a[jj] = _mm256_fmadd_ps(qv, kv[jj], a[jj]);
                        }
                    }
                    i += 8;
                }
            }
            let mut all = [_mm256_setzero_ps(); 8];
            for r in 0..R {
                all[r * J..(r + 1) * J].copy_from_slice(&acc[r]);
            }
            let mut sums = [0f32; 8];
            // SAFETY: `sums` holds 8 f32.
            unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), hsum8(all)) };
            for r in 0..R {
                for jj in 0..J {
                    // SAFETY: the tail d8..d lies within the rows; s[r * TK + jj] in bounds.
                    unsafe {
                        let x = tail(q.add(r * d), k.add(jj * ks), d8, d, sums[r * J + jj]);
                        *s.add(r * TK + jj) = x;
                    }
                }
            }
        }

        /// See `Kernels::pv`; `v` rows `vs` elements apart, `o` rows `d` apart.
        ///
        /// # Safety
        /// AVX2/FMA/F16C present; `p`: `rows * TK`, `v`: `n` rows, `o`: `rows * d` in bounds.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn pv<E: Element>(
            p: *const f32,
            rows: usize,
            v: *const E,
            vs: usize,
            n: usize,
            o: *mut f32,
            d: usize,
        ) {
            let mut r0 = 0;
            while r0 < rows {
                let rb = (rows - r0).min(4);
                // SAFETY: rows r0..r0 + rb are in bounds by the contract.
                unsafe {
                    let (p, o) = (p.add(r0 * TK), o.add(r0 * d));
                    // R * B accumulators + B values + a broadcast within 16 registers.
                    match rb {
                        4 => cols::<E, 4, 2>(p, v, vs, n, o, d),
                        3 => cols::<E, 3, 2>(p, v, vs, n, o, d),
                        2 => cols::<E, 2, 4>(p, v, vs, n, o, d),
                        _ => cols::<E, 1, 8>(p, v, vs, n, o, d),
                    }
                }
                r0 += rb;
            }
        }

        /// # Safety
        /// As `pv`, for `R` rows.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn cols<E: Element, const R: usize, const B: usize>(
            p: *const f32,
            v: *const E,
            vs: usize,
            n: usize,
            o: *mut f32,
            d: usize,
        ) {
            let mut i = 0;
            // SAFETY: columns i..i + 8 * B (then i..i + 8) are below d.
            unsafe {
                while i + 8 * B <= d {
                    cblock::<E, R, B>(p, v.add(i), vs, n, o.add(i), d);
                    i += 8 * B;
                }
                while i + 8 <= d {
                    cblock::<E, R, 1>(p, v.add(i), vs, n, o.add(i), d);
                    i += 8;
                }
            }
            for r in 0..R {
                for c in i..d {
                    // SAFETY: c < d and j < n: within the rows.
                    unsafe {
                        let mut x = *o.add(r * d + c);
                        for j in 0..n {
                            x = (*p.add(r * TK + j)).mul_add((*v.add(j * vs + c)).to_f32(), x);
                        }
                        *o.add(r * d + c) = x;
                    }
                }
            }
        }

        /// Columns `0..8 * B` of `R` output rows, in registers over the `n` keys.
        ///
        /// # Safety
        /// As `pv`, for `R` rows and `8 * B` columns.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn cblock<E: Element, const R: usize, const B: usize>(
            p: *const f32,
            v: *const E,
            vs: usize,
            n: usize,
            o: *mut f32,
            d: usize,
        ) {
            // SAFETY: every access is within the R rows' first 8 * B columns or the n keys.
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); B]; R];
                for (r, a) in acc.iter_mut().enumerate() {
                    for (b, x) in a.iter_mut().enumerate() {
                        *x = _mm256_loadu_ps(o.add(r * d + 8 * b));
                    }
                }
                for j in 0..n {
                    let mut vv = [_mm256_setzero_ps(); B];
                    for (b, x) in vv.iter_mut().enumerate() {
                        *x = load(v.add(j * vs + 8 * b));
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let pr = _mm256_set1_ps(*p.add(r * TK + j));
                        for b in 0..B {
                            a[b] = _mm256_fmadd_ps(pr, vv[b], a[b]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    for (b, x) in a.iter().enumerate() {
                        _mm256_storeu_ps(o.add(r * d + 8 * b), *x);
                    }
                }
            }
        }
    }

    mod avx512 {
        use super::*;

        /// 16 elements at `p` as f32.
        ///
        /// # Safety
        /// `p` addresses 16 readable elements; AVX-512 F/BW/VL present.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn load<E: Element>(p: *const E) -> __m512 {
            // SAFETY: by the contract.
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

        /// The lanes of `m` of the 16 elements at `p` as f32, zeros elsewhere.
        ///
        /// # Safety
        /// `p` addresses readable elements in every lane of `m` (masked lanes are not read).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn load_mask<E: Element>(p: *const E, m: __mmask16) -> __m512 {
            // SAFETY: by the contract; masked-off lanes do not fault.
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

        /// The sum of the two 8-lane halves of `z`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        fn fold(z: __m512) -> __m256 {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(z)));
            _mm256_add_ps(_mm512_castps512_ps256(z), hi)
        }

        /// See `Kernels::scores`; `k` rows `ks` elements apart.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL present; `q`: `rows * d`, `k`: `n` rows, `s`: `rows * TK` in
        /// bounds.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        pub(super) unsafe fn scores<E: Element>(
            q: *const f32,
            rows: usize,
            d: usize,
            k: *const E,
            ks: usize,
            n: usize,
            s: *mut f32,
        ) {
            let mut r0 = 0;
            while r0 < rows {
                let rb = (rows - r0).min(4);
                // SAFETY: rows r0..r0 + rb are in bounds by the contract.
                unsafe {
                    let (q, s) = (q.add(r0 * d), s.add(r0 * TK));
                    // At most 16 accumulators + J keys + a query within 32 registers.
                    match rb {
                        4 => keys::<E, 4, 4>(q, d, k, ks, n, s),
                        3 => keys::<E, 3, 4>(q, d, k, ks, n, s),
                        2 => keys::<E, 2, 8>(q, d, k, ks, n, s),
                        _ => keys::<E, 1, 8>(q, d, k, ks, n, s),
                    }
                }
                r0 += rb;
            }
        }

        /// # Safety
        /// As `scores`, for `R` rows.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn keys<E: Element, const R: usize, const J: usize>(
            q: *const f32,
            d: usize,
            k: *const E,
            ks: usize,
            n: usize,
            s: *mut f32,
        ) {
            let mut j = 0;
            // SAFETY: keys j..j + J (then j) are below n: in bounds by the contract.
            unsafe {
                while j + J <= n {
                    block::<E, R, J>(q, d, k.add(j * ks), ks, s.add(j));
                    j += J;
                }
                while j < n {
                    block::<E, R, 1>(q, d, k.add(j * ks), ks, s.add(j));
                    j += 1;
                }
            }
        }

        /// Scores of `R` rows against `J` keys: `s[r * TK + jj]`. The tail of `d` past a
        /// multiple of 16 is one masked step.
        ///
        /// # Safety
        /// As `scores`, for `R` rows and `J` keys.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn block<E: Element, const R: usize, const J: usize>(
            q: *const f32,
            d: usize,
            k: *const E,
            ks: usize,
            s: *mut f32,
        ) {
            const { assert!(R * J <= 16) };
            let d16 = d / 16 * 16;
            let mut acc = [[_mm512_setzero_ps(); J]; R];
            let mut i = 0;
            // SAFETY: full steps read i..i + 16 <= d; the masked step reads lanes < d - d16.
            unsafe {
                while i < d16 {
                    let mut kv = [_mm512_setzero_ps(); J];
                    for (jj, x) in kv.iter_mut().enumerate() {
                        *x = load(k.add(jj * ks + i));
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let qv = _mm512_loadu_ps(q.add(r * d + i));
                        for jj in 0..J {
                            a[jj] = _mm512_fmadd_ps(qv, kv[jj], a[jj]);
                        }
                    }
                    i += 16;
                }
                if d16 < d {
                    let m: __mmask16 = (1u16 << (d - d16)) - 1;
                    let mut kv = [_mm512_setzero_ps(); J];
                    for (jj, x) in kv.iter_mut().enumerate() {
                        *x = load_mask(k.add(jj * ks + d16), m);
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let qv = _mm512_maskz_loadu_ps(m, q.add(r * d + d16));
                        for jj in 0..J {
                            a[jj] = _mm512_fmadd_ps(qv, kv[jj], a[jj]);
                        }
                    }
                }
            }
            let mut all = [_mm256_setzero_ps(); 16];
            for r in 0..R {
                for jj in 0..J {
                    all[r * J + jj] = fold(acc[r][jj]);
                }
            }
            let mut sums = [0f32; 16];
            let lo: [__m256; 8] = all[..8].try_into().expect("8");
            let hi: [__m256; 8] = all[8..].try_into().expect("8");
            // SAFETY: `sums` holds 16 f32.
            unsafe {
                _mm256_storeu_ps(sums.as_mut_ptr(), hsum8(lo));
                if R * J > 8 {
                    _mm256_storeu_ps(sums.as_mut_ptr().add(8), hsum8(hi));
                }
            }
            for r in 0..R {
                for jj in 0..J {
                    // SAFETY: s[r * TK + jj] is in bounds by the contract.
                    unsafe { *s.add(r * TK + jj) = sums[r * J + jj] };
                }
            }
        }

        /// See `Kernels::pv`; `v` rows `vs` elements apart, `o` rows `d` apart.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL present; `p`: `rows * TK`, `v`: `n` rows, `o`: `rows * d` in
        /// bounds.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        pub(super) unsafe fn pv<E: Element>(
            p: *const f32,
            rows: usize,
            v: *const E,
            vs: usize,
            n: usize,
            o: *mut f32,
            d: usize,
        ) {
            let mut r0 = 0;
            while r0 < rows {
                let rb = (rows - r0).min(4);
                // SAFETY: rows r0..r0 + rb are in bounds by the contract.
                unsafe {
                    let (p, o) = (p.add(r0 * TK), o.add(r0 * d));
                    match rb {
                        4 => cols::<E, 4, 4>(p, v, vs, n, o, d),
                        3 => cols::<E, 3, 4>(p, v, vs, n, o, d),
                        2 => cols::<E, 2, 8>(p, v, vs, n, o, d),
                        _ => cols::<E, 1, 8>(p, v, vs, n, o, d),
                    }
                }
                r0 += rb;
            }
        }

        /// # Safety
        /// As `pv`, for `R` rows.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn cols<E: Element, const R: usize, const B: usize>(
            p: *const f32,
            v: *const E,
            vs: usize,
            n: usize,
            o: *mut f32,
            d: usize,
        ) {
            let mut i = 0;
            // SAFETY: columns i..i + 16 * B (then 16, then the masked rest) are below d.
            unsafe {
                while i + 16 * B <= d {
                    cblock::<E, R, B>(p, v.add(i), vs, n, o.add(i), d, !0);
                    i += 16 * B;
                }
                while i + 16 <= d {
                    cblock::<E, R, 1>(p, v.add(i), vs, n, o.add(i), d, !0);
                    i += 16;
                }
                if i < d {
                    let m: __mmask16 = (1u16 << (d - i)) - 1;
                    cblock::<E, R, 1>(p, v.add(i), vs, n, o.add(i), d, m);
                }
            }
        }

        /// Columns `0..16 * B` of `R` output rows, in registers over the `n` keys; with
        /// `B == 1`, only the lanes of `m` (all of them: `!0`).
        ///
        /// # Safety
        /// As `pv`, for `R` rows and the columns named.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn cblock<E: Element, const R: usize, const B: usize>(
            p: *const f32,
            v: *const E,
            vs: usize,
            n: usize,
            o: *mut f32,
            d: usize,
            m: __mmask16,
        ) {
            let full = m == !0;
            debug_assert!(full || B == 1);
            // SAFETY: every access is within the R rows' named columns or the n keys; a
            // partial block reads and writes only the lanes of `m`.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); B]; R];
                for (r, a) in acc.iter_mut().enumerate() {
                    for (b, x) in a.iter_mut().enumerate() {
                        *x = _mm512_maskz_loadu_ps(m, o.add(r * d + 16 * b));
                    }
                }
                for j in 0..n {
                    let mut vv = [_mm512_setzero_ps(); B];
                    for (b, x) in vv.iter_mut().enumerate() {
                        let at = v.add(j * vs + 16 * b);
                        *x = if full { load(at) } else { load_mask(at, m) };
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let pr = _mm512_set1_ps(*p.add(r * TK + j));
                        for b in 0..B {
                            a[b] = _mm512_fmadd_ps(pr, vv[b], a[b]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    for (b, x) in a.iter().enumerate() {
                        _mm512_mask_storeu_ps(o.add(r * d + 16 * b), m, *x);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "../../tests/rust/cpu/simd.rs"]
mod tests;
