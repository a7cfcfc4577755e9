//! Explicit SIMD for the CPU attention's hot loops: the scores `q . k` of a few query rows
//! against a tile of keys, and the accumulation `o += p . V`, with the keys and values
//! converted to f32 as they are loaded (bf16: a shift; f16: F16C's `cvtph2ps`).
//!
//! Three instruction sets, chosen once at run time (`Isa::best`): AVX-512 (F, BW, VL) where
//! the CPU has it, AVX2 with FMA and F16C otherwise, and portable code everywhere else (the
//! path the others are compared with in the attention tests). Each is a `Kernels`
//! implementation. The SIMD
//! kernels are written once, generic over `Lanes` (a vector of f32 lanes and the few
//! operations they use; `x86` implements it for `__m256` and `__m512`), `#[inline(always)]`,
//! and compiled per set inside that set's `#[target_feature]` entry points (`simd_kernels!`).
//! Work compiled for a set as a whole (the attention task, so that its remaining loops, the
//! softmax over a tile, are vectorised for that set too) goes through `Isa::run` with a `Job`.
//!
//! Nothing in CI can run AVX-512, so the set picked checks itself once, on first use, against
//! what the portable code computes (`check`, an f64 reference of the same sums, within the
//! unit tests' tolerance): one that disagrees gives way to the next one down, and the reason
//! is kept (`choice`, `_core.cpu_isa_failures()`).
//!
//! Int8 rows (`Q8Rows`, the 8-bit KV format) go through the same kernels: each vector of
//! values is sign-extended, converted and multiplied by its group's scale as it loads. A
//! decode over them has kernels of its own (`Kernels::q8_scores`, `Kernels::q8_pv`), which
//! AVX-512 implements in `q8` (the scales of a tile converted once, the scores reduced
//! sixteen at a time) and the other sets by the generic ones.
//!
//! Every path accumulates in f32; they differ only in summation order (and `q8`'s `p . V`
//! in where a scale's product is rounded). AVX-512's bf16 dot product (`vdpbf16ps`) is not
//! used: for the probabilities it would need them rounded to bf16, which changes the
//! function; for the scores over int8 keys it would be exact, but it is slower (see `q8`).

use super::math::TK;
use crate::quant::Q8Rows;
use crate::tensor::{Element, Rows};
use std::sync::OnceLock;

pub(crate) mod check;
#[cfg(target_arch = "x86_64")]
pub(crate) mod q8;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

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

    /// The widest set this CPU supports whose kernels pass the self-check, decided once per
    /// process (`choice`).
    pub fn best() -> Isa {
        choice().isa
    }

    /// Runs `job` with this set's kernels, compiled for this set (`Kernels::run`).
    ///
    /// # Panics
    /// If this CPU lacks the set.
    pub(crate) fn run<J: Job>(self, job: J) -> J::Output {
        // Checked here (a cached flag test) so that the unsafe calls below rest on this
        // function alone.
        assert!(self.supported(), "{} is not supported", self.name());
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU supports AVX-512 F/BW/VL, AVX2, FMA and F16C (asserted above).
            Isa::Avx512 => unsafe { Avx512::run(job) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU supports AVX2, FMA and F16C (asserted above).
            Isa::Avx2 => unsafe { Avx2::run(job) },
            // SAFETY: the portable set runs everywhere.
            _ => unsafe { Scalar::run(job) },
        }
    }
}

/// What `Isa::best` decided, once per process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The set the CPU attention runs.
    pub isa: Isa,
    /// Per wider set this CPU supports but whose self-check failed: `"<name>: <reason>"`.
    pub failures: Vec<String>,
}

/// The set chosen for this process and the wider ones passed over: the widest supported set
/// whose kernels agree with the reference on a few small problems (`check::SELF_CHECK`).
pub fn choice() -> &'static Choice {
    static CHOICE: OnceLock<Choice> = OnceLock::new();
    CHOICE.get_or_init(|| check::choose(|isa| isa.run(check::Compare(check::SELF_CHECK))))
}

/// Work compiled for one instruction set as a whole: `Isa::run` calls `run::<K>` inside
/// `K`'s `#[target_feature]` entry point, so an `#[inline(always)]` `run` (and everything it
/// inlines) is compiled for that set.
pub(crate) trait Job {
    type Output;
    /// # Safety
    /// The CPU supports `K`'s instruction set (`Isa::run` checks it).
    unsafe fn run<K: Kernels>(self) -> Self::Output;
}

/// The hot loops of one instruction set.
///
/// Layouts (all row-major): `q` and `o` hold `rows` rows of `head_dim` f32 (`head_dim` is the
/// width of the key or value rows); `s` and `p` hold `rows` rows of `TK` f32.
pub(crate) trait Kernels: Sized {
    /// Whether the generic loops compiled with this set may fuse multiply-adds.
    const FMA: bool;

    /// `job.run::<Self>()`, compiled for this set (a SIMD set overrides this default with
    /// its `#[target_feature]` entry point, `simd_kernels!`).
    ///
    /// # Safety
    /// The CPU supports this instruction set (`Isa::supported`).
    unsafe fn run<J: Job>(job: J) -> J::Output {
        // SAFETY: by the contract.
        unsafe { job.run::<Self>() }
    }

    /// `s[r][j] = q[r] . k.row(j)` for `r < rows`, `j < n`.
    ///
    /// # Safety
    /// The CPU supports this instruction set (`Isa::supported`). Lengths are checked here.
    unsafe fn scores<T: Tile>(q: &[f32], rows: usize, k: &T, n: usize, s: &mut [f32]);

    /// `o[r] += sum_{j < n} p[r][j] * v.row(j)` for `r < rows`.
    ///
    /// # Safety
    /// As `scores`.
    unsafe fn pv<T: Tile>(p: &[f32], rows: usize, v: &T, n: usize, o: &mut [f32]);

    /// `scores` over int8 rows, for few query rows (a decode), with `sc` as scratch.
    /// `ahead`: the rows to bring into cache meanwhile (the next tile's, which may lie in
    /// another block); the generic kernels bring in those that follow `k` in memory.
    ///
    /// # Safety
    /// As `scores`.
    unsafe fn q8_scores(
        q: &[f32],
        rows: usize,
        k: &Q8Rows<'_>,
        n: usize,
        s: &mut [f32],
        sc: &mut Vec<f32>,
        ahead: &Q8Rows<'_>,
    ) {
        let _ = (sc, ahead);
        // SAFETY: by the contract.
        unsafe { Self::scores(q, rows, k, n, s) }
    }

    /// `pv` over int8 rows, for few query rows (a decode), with `sc` as scratch and `ahead`
    /// as for `q8_scores`.
    ///
    /// # Safety
    /// As `scores`.
    unsafe fn q8_pv(
        p: &[f32],
        rows: usize,
        v: &Q8Rows<'_>,
        n: usize,
        o: &mut [f32],
        sc: &mut Vec<f32>,
        ahead: &Q8Rows<'_>,
    ) {
        let _ = (sc, ahead);
        // SAFETY: by the contract.
        unsafe { Self::pv(p, rows, v, n, o) }
    }
}

/// Key or value rows as the kernels read them: `Rows` of an element type (converted to f32
/// as they load) or int8 rows (`Q8Rows`, dequantized as they load: each value times its
/// group's scale, one multiply per vector).
pub(crate) trait Tile: Sync {
    /// Values per row.
    fn width(&self) -> usize;
    /// Panics unless rows `0..n` are in bounds: what makes the raw loads below safe.
    fn check(&self, n: usize);
    /// Row `j`, columns `i..i + w` (`w <= L::N`; `i` a multiple of `L::N`), as f32 lanes;
    /// the lanes past `w` are zero.
    ///
    /// # Safety
    /// As `Lanes`; row `j` was checked (`check`) and the columns are below `width`.
    unsafe fn load<L: Lanes>(&self, j: usize, i: usize, w: usize) -> L::V;
    /// Asks the CPU to bring rows `j..j + m` into cache ahead of use. They may lie past the
    /// tile: a prefetch is a hint that reads nothing and cannot fault, and the address is
    /// formed with wrapping arithmetic, never dereferenced.
    fn prefetch(&self, j: usize, m: usize);
    /// Row `j`'s value `i` as f32 (tests).
    #[cfg(test)]
    fn value(&self, j: usize, i: usize) -> f32;
    /// `Kernels::scores`, portable.
    fn scalar_scores(&self, q: &[f32], rows: usize, n: usize, s: &mut [f32]);
    /// `Kernels::pv`, portable.
    fn scalar_pv(&self, p: &[f32], rows: usize, n: usize, o: &mut [f32]);
}

impl<E: Element> Tile for Rows<'_, E> {
    #[inline(always)]
    fn width(&self) -> usize {
        self.width
    }

    #[inline(always)]
    fn check(&self, n: usize) {
        assert!(
            n <= TK && n <= self.len,
            "{n} keys of a tile of {} rows",
            self.len
        );
        // Rows may be closer than their width (see `check_lengths`): only the end is bounded.
        assert!(n == 0 || (n - 1) * self.stride + self.width <= self.data.len());
    }

    #[inline(always)]
    unsafe fn load<L: Lanes>(&self, j: usize, i: usize, w: usize) -> L::V {
        // SAFETY: by the contract, row j's columns i..i + w are in bounds.
        unsafe { load_w::<L, E>(self.data.as_ptr().add(j * self.stride + i), w) }
    }

    #[inline(always)]
    fn prefetch(&self, j: usize, m: usize) {
        let p = self.data.as_ptr().wrapping_add(j * self.stride) as *const u8;
        debug_assert!(m > 0);
        let len = (m - 1) * self.stride + self.width;
        prefetch_bytes(p, len * std::mem::size_of::<E>());
    }

    #[cfg(test)]
    fn value(&self, j: usize, i: usize) -> f32 {
        self.row(j)[i].to_f32()
    }

    fn scalar_scores(&self, q: &[f32], rows: usize, n: usize, s: &mut [f32]) {
        scalar_scores(q, rows, self, n, s)
    }

    fn scalar_pv(&self, p: &[f32], rows: usize, n: usize, o: &mut [f32]) {
        scalar_pv(p, rows, self, n, o)
    }
}

impl Tile for Q8Rows<'_> {
    #[inline(always)]
    fn width(&self) -> usize {
        self.fmt.head_dim
    }

    #[inline(always)]
    fn check(&self, n: usize) {
        assert!(
            n <= TK && n <= self.len,
            "{n} keys of a tile of {} rows",
            self.len
        );
        assert!(self.data.len() >= n * self.fmt.row_bytes());
    }

    #[inline(always)]
    unsafe fn load<L: Lanes>(&self, j: usize, i: usize, w: usize) -> L::V {
        let fmt = self.fmt;
        // SAFETY: by the contract, row j is in bounds; its values i..i + w and the scales of
        // their groups lie within its `row_bytes`.
        unsafe {
            let row = self.data.as_ptr().add(j * fmt.row_bytes());
            let scale = |c: usize| {
                let at = row.add(fmt.head_dim + 2 * (c / fmt.group)) as *const u16;
                f32::from_bits((at.read_unaligned() as u32) << 16)
            };
            let s = if fmt.group.is_multiple_of(L::N) || w <= fmt.group - i % fmt.group {
                // The lanes share one group (the common case: groups of 32 or 16).
                L::splat(scale(i))
            } else {
                let mut f = [0f32; 16];
                for (c, x) in f.iter_mut().enumerate().take(w) {
                    *x = scale(i + c);
                }
                load_w::<L, f32>(f.as_ptr(), L::N)
            };
            L::mul(L::load_i8(row.add(i) as *const i8, w), s)
        }
    }

    #[inline(always)]
    fn prefetch(&self, j: usize, m: usize) {
        let rb = self.fmt.row_bytes();
        prefetch_bytes(self.data.as_ptr().wrapping_add(j * rb), m * rb);
    }

    #[cfg(test)]
    fn value(&self, j: usize, i: usize) -> f32 {
        let row = self.row(j);
        (row[i] as i8) as f32 * self.fmt.scale(row, i / self.fmt.group)
    }

    fn scalar_scores(&self, q: &[f32], rows: usize, n: usize, s: &mut [f32]) {
        let (d, g) = (self.fmt.head_dim, self.fmt.group);
        self.check(n);
        assert!(q.len() >= rows * d && s.len() >= rows.saturating_sub(1) * TK + n);
        for j in 0..n {
            let row = self.row(j);
            for r in 0..rows {
                let qr = &q[r * d..(r + 1) * d];
                let mut acc = 0f32;
                for (gi, (qs, ks)) in qr.chunks_exact(g).zip(row[..d].chunks_exact(g)).enumerate() {
                    let dot: f32 = qs.iter().zip(ks).map(|(a, &b)| a * (b as i8) as f32).sum();
                    acc += dot * self.fmt.scale(row, gi);
                }
                s[r * TK + j] = acc;
            }
        }
    }

    fn scalar_pv(&self, p: &[f32], rows: usize, n: usize, o: &mut [f32]) {
        let (d, g) = (self.fmt.head_dim, self.fmt.group);
        self.check(n);
        assert!(p.len() >= rows.saturating_sub(1) * TK + n && o.len() >= rows * d);
        for j in 0..n {
            let row = self.row(j);
            for r in 0..rows {
                let pj = p[r * TK + j];
                let orow = &mut o[r * d..(r + 1) * d];
                for (gi, (os, vs)) in orow
                    .chunks_exact_mut(g)
                    .zip(row[..d].chunks_exact(g))
                    .enumerate()
                {
                    let c = pj * self.fmt.scale(row, gi);
                    for (y, &x) in os.iter_mut().zip(vs) {
                        *y += c * (x as i8) as f32;
                    }
                }
            }
        }
    }
}

/// How many rows ahead the kernels prefetch: one tile, the next tile of the same segment
/// (contiguous in the store) while this one computes; past a segment's end it is wasted, not
/// wrong. Without it one core waits on memory (the hardware prefetchers alone keep too few
/// misses in flight). Measured (one thread, 32,768 tokens x 8 kv heads, decode): bf16 21.5 ->
/// 16.3 ms, int8 16.0 -> 13.5 ms.
const AHEAD: usize = TK;

/// Prefetches (into L1) the cache lines of `len` bytes at `p`, any address.
#[inline(always)]
fn prefetch_bytes(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // From the line holding the first byte, so the last line is not missed.
        let skew = p as usize % 64;
        let (p, len) = (p.wrapping_sub(skew), len + skew);
        let mut o = 0;
        while o < len {
            // SAFETY: a prefetch never faults and reads nothing architecturally; SSE is
            // x86-64's baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8) };
            o += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Panics unless `rows` rows of `a` (`a_width` each), `n` rows of `kv` and `rows` rows of
/// `b` (`b_width` each) are in bounds: what makes the raw-pointer loops below safe. The rows
/// of `kv` may be closer than their width, even 0 apart: an input view may repeat a row
/// (`expand` over the sequence) or overlap the next (`as_strided`), and the kernels only read
/// them.
#[inline(always)]
fn check_lengths<T: Tile>(
    a: &[f32],
    a_width: usize,
    rows: usize,
    kv: &T,
    n: usize,
    b: &[f32],
    b_width: usize,
) {
    kv.check(n);
    assert!(a.len() >= rows * a_width && b.len() >= rows * b_width);
}

/// Portable code: eight independent accumulators so that the compiler vectorises it.
pub(crate) struct Scalar;

impl Kernels for Scalar {
    const FMA: bool = false;

    unsafe fn scores<T: Tile>(q: &[f32], rows: usize, k: &T, n: usize, s: &mut [f32]) {
        k.scalar_scores(q, rows, n, s)
    }

    unsafe fn pv<T: Tile>(p: &[f32], rows: usize, v: &T, n: usize, o: &mut [f32]) {
        v.scalar_pv(p, rows, n, o)
    }
}

/// `Kernels::scores`, portable.
fn scalar_scores<E: Element>(q: &[f32], rows: usize, k: &Rows<'_, E>, n: usize, s: &mut [f32]) {
    let d = k.width;
    check_lengths(q, d, rows, k, n, s, TK);
    for r in 0..rows {
        let qr = &q[r * d..(r + 1) * d];
        for j in 0..n {
            s[r * TK + j] = dot(qr, k.row(j));
        }
    }
}

/// `Kernels::pv`, portable.
fn scalar_pv<E: Element>(p: &[f32], rows: usize, v: &Rows<'_, E>, n: usize, o: &mut [f32]) {
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

/// A vector of `N` f32 lanes of one SIMD instruction set, and the operations the kernels
/// below need.
///
/// # Safety
/// Every method's caller runs on a CPU with the set, inside a function compiled for it (the
/// methods are `#[inline(always)]`, so their intrinsics compile into that function: the
/// set's `Kernels` entry points). A pointer addresses every element the method names; the
/// lanes a partial access leaves out are neither read nor written.
pub(crate) trait Lanes {
    /// The vector.
    type V: Copy;
    /// Its f32 lanes (at most 16).
    const N: usize;
    /// Whether the set has 32 vector registers (else 16): wider register blocks fit.
    const WIDE: bool;

    /// All lanes zero.
    unsafe fn zero() -> Self::V;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// `a * b + c`, fused, per lane.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// The `N` elements at `p`, as f32.
    unsafe fn load<E: Element>(p: *const E) -> Self::V;
    /// The `n < N` elements at `p`, as f32, in the first `n` lanes; the others zero.
    unsafe fn load_part<E: Element>(p: *const E, n: usize) -> Self::V;
    /// `a * b`, per lane.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// The `w <= N` int8 values at `p`, as f32, in the first `w` lanes; the others zero.
    unsafe fn load_i8(p: *const i8, w: usize) -> Self::V;
    /// Writes the `N` lanes to `p`.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Writes the first `n < N` lanes to `p`.
    unsafe fn store_part(p: *mut f32, n: usize, v: Self::V);
    /// `out[i]` = the sum of the lanes of `v[i]`, for `v.len() == out.len() <= 16`.
    unsafe fn sums(v: &[Self::V], out: &mut [f32]);
}

/// `Kernels` for a `Lanes` set `$isa`: entry points compiled for `$features` (which must
/// include everything `$isa`'s intrinsics need) around the generic bodies below, and the
/// `Kernels` methods given after them (kernels of the set's own).
macro_rules! simd_kernels {
    ($isa:ty, $features:literal $(, $extra:item)*) => {
        impl $crate::cpu::simd::Kernels for $isa {
            const FMA: bool = true;
            $($extra)*

            #[target_feature(enable = $features)]
            unsafe fn run<J: $crate::cpu::simd::Job>(job: J) -> J::Output {
                // SAFETY: the caller vouches for the set.
                unsafe { job.run::<Self>() }
            }

            $crate::cpu::simd::simd_kernels!(@entry $features, scores, false);
            $crate::cpu::simd::simd_kernels!(@entry $features, pv, true);
        }
    };
    // `Kernels::scores` (`a`: `q`, `b`: `s`) or `Kernels::pv` (`a`: `p`, `b`: `o`).
    (@entry $features:literal, $name:ident, $pv:literal) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<T: $crate::cpu::simd::Tile>(
            a: &[f32],
            rows: usize,
            kv: &T,
            n: usize,
            b: &mut [f32],
        ) {
            // SAFETY: compiled for the set, which the caller vouches for; the body checks the
            // lengths.
            unsafe { $crate::cpu::simd::lanes_kernel::<Self, T, $pv>(a, rows, kv, n, b) }
        }
    };
}
pub(crate) use simd_kernels;

/// `$f::<G.., R, J>(args)` for a block of `$rb` (1 to 4) query rows, with `J` (keys, or
/// vectors of output columns, per row) such that the `R * J` accumulators, `J` loaded
/// vectors and a query or broadcast fit the register file: 16 vectors, or 32 with `$wide`.
macro_rules! by_rows {
    ($wide:expr, $rb:expr, $f:ident::<$($g:tt),*>($($a:expr),* $(,)?)) => {
        match ($rb, $wide) {
            (4, false) => $f::<$($g,)* 4, 2>($($a),*),
            (4, true) => $f::<$($g,)* 4, 4>($($a),*),
            (3, false) => $f::<$($g,)* 3, 2>($($a),*),
            (3, true) => $f::<$($g,)* 3, 4>($($a),*),
            (2, false) => $f::<$($g,)* 2, 4>($($a),*),
            (2, true) => $f::<$($g,)* 2, 8>($($a),*),
            _ => $f::<$($g,)* 1, 8>($($a),*),
        }
    };
}

/// `w` elements at `p` (all `N`, or the first `w < N`), as f32.
///
/// # Safety
/// As `Lanes::load` and `Lanes::load_part`.
#[inline(always)]
unsafe fn load_w<L: Lanes, E: Element>(p: *const E, w: usize) -> L::V {
    // SAFETY: by the contract.
    unsafe {
        if w == L::N {
            L::load(p)
        } else {
            L::load_part(p, w)
        }
    }
}

/// Writes the first `w` lanes (all `N`, or fewer) of `v` to `p`.
///
/// # Safety
/// As `Lanes::store` and `Lanes::store_part`.
#[inline(always)]
unsafe fn store_w<L: Lanes>(p: *mut f32, w: usize, v: L::V) {
    // SAFETY: by the contract.
    unsafe {
        if w == L::N {
            L::store(p, v)
        } else {
            L::store_part(p, w, v)
        }
    }
}

/// `Kernels::scores` (`PV` false: `a` is `q`, `b` is `s`) or `Kernels::pv` (`PV` true: `a`
/// is `p`, `b` is `o`) for a `Lanes` set, rows in blocks of up to 4.
///
/// # Safety
/// As `Lanes` (compiled into the set's entry point, on a CPU with the set). Lengths are
/// checked here.
#[inline(always)]
pub(crate) unsafe fn lanes_kernel<L: Lanes, T: Tile, const PV: bool>(
    a: &[f32],
    rows: usize,
    kv: &T,
    n: usize,
    b: &mut [f32],
) {
    let d = kv.width();
    let (aw, bw) = if PV { (TK, d) } else { (d, TK) };
    check_lengths(a, aw, rows, kv, n, b, bw);
    let (a, b) = (a.as_ptr(), b.as_mut_ptr());
    for r0 in (0..rows).step_by(4) {
        let rb = (rows - r0).min(4);
        // SAFETY: rows r0..r0 + rb of a and b and the n rows of kv are in bounds (checked
        // above); the set is the CPU's by the contract.
        unsafe {
            let (a, b) = (a.add(r0 * aw), b.add(r0 * bw));
            by_rows!(L::WIDE, rb, row_block::<L, T, PV>(a, d, kv, n, b))
        }
    }
}

/// `keys` or `cols` for `R` rows.
///
/// # Safety
/// As `lanes_kernel`, for `R` rows.
#[inline(always)]
unsafe fn row_block<L: Lanes, T: Tile, const PV: bool, const R: usize, const J: usize>(
    a: *const f32,
    d: usize,
    kv: &T,
    n: usize,
    b: *mut f32,
) {
    // SAFETY: by the contract.
    unsafe {
        if PV {
            cols::<L, T, R, J>(a, kv, n, b, d)
        } else {
            keys::<L, T, R, J>(a, d, kv, n, b)
        }
    }
}

/// `R` rows of `q` (`d` apart) against keys `0..n`, `J` keys at a time.
///
/// # Safety
/// As `lanes_kernel` (scores), for `R` rows.
#[inline(always)]
unsafe fn keys<L: Lanes, T: Tile, const R: usize, const J: usize>(
    q: *const f32,
    d: usize,
    k: &T,
    n: usize,
    s: *mut f32,
) {
    let mut j = 0;
    // SAFETY: keys j..j + J (then j) are below n: in bounds by the contract.
    unsafe {
        while j + J <= n {
            k.prefetch(j + AHEAD, J);
            block::<L, T, R, J>(q, d, k, j, s.add(j));
            j += J;
        }
        while j < n {
            block::<L, T, R, 1>(q, d, k, j, s.add(j));
            j += 1;
        }
    }
}

/// Scores of `R` rows against keys `j0..j0 + J`: `s[r * TK + jj]`. The last `d % N` columns
/// are one partial step.
///
/// # Safety
/// As `lanes_kernel` (scores), for `R` rows and those `J` keys.
#[inline(always)]
unsafe fn block<L: Lanes, T: Tile, const R: usize, const J: usize>(
    q: *const f32,
    d: usize,
    k: &T,
    j0: usize,
    s: *mut f32,
) {
    const { assert!(R * J <= 16) };
    // SAFETY: the set is the CPU's; steps read columns i..i + N <= d, the last one i..d only,
    // of the R rows and J keys; s[r * TK + jj] is in bounds by the contract.
    unsafe {
        let mut acc = [[L::zero(); J]; R];
        let mut i = 0;
        while i + L::N <= d {
            dot_step::<L, T, R, J>(&mut acc, q, d, k, j0, i, L::N);
            i += L::N;
        }
        if i < d {
            dot_step::<L, T, R, J>(&mut acc, q, d, k, j0, i, d - i);
        }
        let mut all = [L::zero(); 16];
        for (r, a) in acc.iter().enumerate() {
            all[r * J..(r + 1) * J].copy_from_slice(a);
        }
        let mut sums = [0f32; 16];
        L::sums(&all[..R * J], &mut sums[..R * J]);
        for r in 0..R {
            for jj in 0..J {
                *s.add(r * TK + jj) = sums[r * J + jj];
            }
        }
    }
}

/// `acc[r][jj] += q[r][i..i + w] * k[j0 + jj][i..i + w]` lane by lane (`w <= N`; lanes past
/// `w` add zero).
///
/// # Safety
/// As `block`, for columns `i..i + w`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_step<L: Lanes, T: Tile, const R: usize, const J: usize>(
    acc: &mut [[L::V; J]; R],
    q: *const f32,
    d: usize,
    k: &T,
    j0: usize,
    i: usize,
    w: usize,
) {
    // SAFETY: columns i..i + w of the R rows and J keys, by the contract.
    unsafe {
        let mut kv = [L::zero(); J];
        for (jj, x) in kv.iter_mut().enumerate() {
            *x = k.load::<L>(j0 + jj, i, w);
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let qv = load_w::<L, f32>(q.add(r * d + i), w);
            for jj in 0..J {
                a[jj] = L::fmadd(qv, kv[jj], a[jj]);
            }
        }
    }
}

/// `R` output rows (`d` apart), `B` vectors of columns at a time, then one, then the rest.
///
/// # Safety
/// As `lanes_kernel` (`p . V`), for `R` rows.
#[inline(always)]
unsafe fn cols<L: Lanes, T: Tile, const R: usize, const B: usize>(
    p: *const f32,
    v: &T,
    n: usize,
    o: *mut f32,
    d: usize,
) {
    let mut i = 0;
    // SAFETY: columns i..i + N * B (then i..i + N, then i..d) are below d.
    unsafe {
        while i + L::N * B <= d {
            cblock::<L, T, R, B>(p, v, i, n, o.add(i), d, L::N);
            i += L::N * B;
        }
        while i + L::N <= d {
            cblock::<L, T, R, 1>(p, v, i, n, o.add(i), d, L::N);
            i += L::N;
        }
        if i < d {
            cblock::<L, T, R, 1>(p, v, i, n, o.add(i), d, d - i);
        }
    }
}

/// Columns `i0..i0 + N * B` of `R` output rows (`o` points at column `i0`), in registers
/// over the `n` keys; with `w < N` (only with `B == 1`), columns `i0..i0 + w`.
///
/// # Safety
/// As `lanes_kernel` (`p . V`), for `R` rows and the columns named.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn cblock<L: Lanes, T: Tile, const R: usize, const B: usize>(
    p: *const f32,
    v: &T,
    i0: usize,
    n: usize,
    o: *mut f32,
    d: usize,
    w: usize,
) {
    debug_assert!(w == L::N || B == 1);
    // SAFETY: the set is the CPU's; every access is within the R rows' named columns or the
    // n keys' probabilities, by the contract.
    unsafe {
        let mut acc = [[L::zero(); B]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            for (b, x) in a.iter_mut().enumerate() {
                *x = load_w::<L, f32>(o.add(r * d + b * L::N), w);
            }
        }
        for j in 0..n {
            // Once per row: on the first pass over its columns.
            if i0 == 0 {
                v.prefetch(j + AHEAD, 1);
            }
            let mut vv = [L::zero(); B];
            for (b, x) in vv.iter_mut().enumerate() {
                *x = v.load::<L>(j, i0 + b * L::N, w);
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let pr = L::splat(*p.add(r * TK + j));
                for b in 0..B {
                    a[b] = L::fmadd(pr, vv[b], a[b]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (b, x) in a.iter().enumerate() {
                store_w::<L>(o.add(r * d + b * L::N), w, *x);
            }
        }
    }
}

#[cfg(test)]
#[path = "../../tests/rust/cpu/simd.rs"]
mod tests;
