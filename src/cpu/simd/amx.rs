//! Decode over int8 rows with AMX-BF16's tile unit (Sapphire Rapids and later): the same
//! `q8_scores` and `q8_pv` as `q8`, with the multiply-adds moved off the vector ports.
//!
//! Why: on the GPU hosts' 16 cores the AVX-512 kernels read int8 rows at 68-74 GB/s where the
//! memory gives about 120 (BENCHMARKS.md): they are bound by their instructions, about half
//! of which are the fused multiply-adds. `tdpbf16ps` does a tile's products in the tile unit,
//! beside the vector ports, which are left the conversions.
//!
//! Exactness, as the AVX-512 kernels: every product is exact and every sum is in f32.
//! - int8 values are exact in bf16 (`|x| <= 128`), converted through f32;
//! - an f32 query or weight `w` is split into three bf16, `hi + mid + lo == w` exactly (each
//!   takes the next 8 significant bits, by truncation); a query that is bf16 already (the
//!   model's) needs only `hi`;
//! - the tile unit accumulates bf16 products in f32 (denormals flushed: a change below 1e-38);
//! - a group's scale multiplies its partial score after the tile unit (`Σ_g s_g (q_g . x_g)`),
//!   and folds into the weights of `p . V` (`(p_j * s) * x`), as `q8` does.
//!
//! Layouts (one tile configuration for both, `CONFIG`; tiles in registers `tmm0..tmm7`):
//! - scores, per 16 keys and group `g` of 32 dims: `C[16 keys][4 rows] += K_bf16[16][32] .
//!   Q_g`, where `Q_g` holds pairs of dims per row (`tmm2`: row `k` = dims `2k, 2k + 1` of
//!   each query row);
//! - `p . V`, per 32 keys, group and 16 output columns: `O[4 rows][16] += W[4][32 keys] .
//!   V_pairs`, where row `k` of `V_pairs` holds keys `2k, 2k + 1` of each column.
//!
//! Taken only for groups of 32 values and head dims up to 128 (`fits`); the tile path is
//! opt-in (`HEADINFER_CPU_AMX=1`) until it is measured on a GPU host, and checked against
//! the reference before use (`x86::amx_status`).

use super::q8::fetch;
use super::{Tile, TK};
use crate::quant::{Q8Rows, Q8};
use std::arch::x86_64::*;

/// The tile operations the kernels use: the CPU's tile unit (`Hw`), or the same semantics in
/// software (the tests' emulation, for CPUs without AMX).
pub(crate) trait TileUnit {
    /// # Safety
    /// AMX-TILE on this CPU, and permission for its state (`enable`).
    unsafe fn config(cfg: &Config);
    /// # Safety
    /// As `config`, after it.
    unsafe fn zero<const T: u8>();
    /// Tile `T`'s rows from `p`, `stride` bytes apart.
    ///
    /// # Safety
    /// As `zero`; the rows (of the configured bytes) are readable.
    unsafe fn load<const T: u8>(p: *const u8, stride: usize);
    /// # Safety
    /// As `load`, writable.
    unsafe fn store<const T: u8>(p: *mut u8, stride: usize);
    /// `C += A . B` over bf16 pairs, in f32.
    ///
    /// # Safety
    /// As `zero`.
    unsafe fn dp<const C: u8, const A: u8, const B: u8>();
    /// Back to the initial state (so the kernel need not save the tiles at every switch).
    ///
    /// # Safety
    /// As `config`.
    unsafe fn release();
}

/// A tile configuration (palette 1): bytes per row and rows of each tile.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Config {
    pub palette: u8,
    pub start_row: u8,
    pub reserved: [u8; 14],
    pub colsb: [u16; 16],
    pub rows: [u8; 16],
}

/// The tiles of both kernels: 0 keys (16 x 32 bf16), 1 scores (16 keys x 4 rows f32), 2 a
/// query group's pairs (16 x 4 pairs), 3 output (4 rows x 16 f32), 4 values' pairs (16 x 16
/// pairs), 5-7 the weights' three parts (4 rows x 32 bf16).
pub(crate) const CONFIG: Config = {
    let mut c = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    let shapes: [(u8, u16); 8] = [
        (16, 64),
        (16, 16),
        (16, 16),
        (4, 64),
        (16, 64),
        (4, 64),
        (4, 64),
        (4, 64),
    ];
    let mut t = 0;
    while t < 8 {
        c.rows[t] = shapes[t].0;
        c.colsb[t] = shapes[t].1;
        t += 1;
    }
    c
};

/// The CPU's tile unit.
pub(crate) struct Hw;

impl TileUnit for Hw {
    #[inline(always)]
    unsafe fn config(cfg: &Config) {
        // SAFETY: AMX-TILE and permission by the contract; `cfg` is 64 readable bytes.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) cfg as *const Config, options(nostack));
        }
    }
    #[inline(always)]
    unsafe fn zero<const T: u8>() {
        // SAFETY: by the contract (a configured tile).
        unsafe { std::arch::asm!("tilezero tmm{t}", t = const T, options(nostack, nomem)) }
    }
    #[inline(always)]
    unsafe fn load<const T: u8>(p: *const u8, stride: usize) {
        // SAFETY: the rows are readable (the contract).
        unsafe {
            std::arch::asm!("tileloadd tmm{t}, [{p} + {s} * 1]", t = const T, p = in(reg) p,
                s = in(reg) stride, options(nostack, readonly))
        }
    }
    #[inline(always)]
    unsafe fn store<const T: u8>(p: *mut u8, stride: usize) {
        // SAFETY: the rows are writable (the contract).
        unsafe {
            std::arch::asm!("tilestored [{p} + {s} * 1], tmm{t}", t = const T, p = in(reg) p,
                s = in(reg) stride, options(nostack))
        }
    }
    #[inline(always)]
    unsafe fn dp<const C: u8, const A: u8, const B: u8>() {
        // SAFETY: configured tiles (the contract).
        unsafe {
            std::arch::asm!("tdpbf16ps tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A,
                b = const B, options(nostack, nomem))
        }
    }
    #[inline(always)]
    unsafe fn release() {
        // SAFETY: AMX-TILE by the contract.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) }
    }
}

/// Whether these kernels take rows of this layout.
pub(crate) fn fits(fmt: Q8) -> bool {
    fmt.group == 32 && fmt.head_dim.is_multiple_of(32) && fmt.head_dim <= 128
}

/// Asks the kernel for the tile state (the process's permission to use the tile registers)
/// where the CPU has AMX-TILE, AMX-BF16 and AVX-512 F/BW/VL; `Err` says what is missing.
pub(crate) fn enable() -> Result<(), String> {
    if !supported() {
        return Err("AMX-BF16, AMX-TILE or AVX-512 missing".into());
    }
    // SAFETY: a plain system call with integer arguments.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if granted != 0 {
        let e = std::io::Error::last_os_error();
        // ENOSPC: a thread's alternate signal stack cannot hold the larger state (Python's
        // faulthandler, enabled before headinfer's import, makes one).
        let hint = if e.raw_os_error() == Some(libc::ENOSPC) {
            " (an alternate signal stack is too small for it: import headinfer before \
             enabling faulthandler)"
        } else {
            ""
        };
        return Err(format!("the kernel refused the tile state: {e}{hint}"));
    }
    Ok(())
}

const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
const XFEATURE_XTILEDATA: libc::c_long = 18;

/// AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22) beside AVX-512 F/BW/VL.
fn supported() -> bool {
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    edx & (1 << 24) != 0 && edx & (1 << 22) != 0 && super::Isa::Avx512.supported()
}

/// Scratch of `len` bytes in `sc`, 64-byte aligned, as bytes.
fn scratch(sc: &mut Vec<f32>, len: usize) -> *mut u8 {
    let words = len.div_ceil(4) + 16;
    if sc.len() < words {
        sc.resize(words, 0.0);
    }
    let p = sc.as_mut_ptr() as *mut u8;
    p.wrapping_add(p.align_offset(64))
}

/// Odd words of two vectors of f32 (their high halves: bf16 where the low halves are 0).
///
/// # Safety
/// AVX-512 BW on this CPU.
#[inline(always)]
unsafe fn high_words(a: __m512i, b: __m512i) -> __m512i {
    const ODD: [u16; 32] = {
        let mut x = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            x[i] = (2 * i + 1) as u16;
            i += 1;
        }
        x
    };
    // SAFETY: register-only AVX-512 BW and a load of a 64-byte array.
    unsafe { _mm512_permutex2var_epi16(a, _mm512_loadu_si512(ODD.as_ptr() as *const _), b) }
}

/// `w` split into `[hi, mid, lo]`, each f32 with a zero low half (so bf16) and `hi + mid +
/// lo == w` exactly; non-finite lanes are all in `hi`.
///
/// # Safety
/// AVX-512 F on this CPU.
#[inline(always)]
unsafe fn split3(w: __m512) -> [__m512i; 3] {
    // SAFETY: register-only AVX-512 F.
    unsafe {
        let mask = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let hi = _mm512_and_si512(_mm512_castps_si512(w), mask);
        // Infinities and NaN: no remainder (inf - inf would be NaN).
        let abs = _mm512_and_si512(hi, _mm512_set1_epi32(0x7FFF_FFFF));
        let finite = _mm512_cmplt_epi32_mask(abs, _mm512_set1_epi32(0x7F80_0000));
        let r1 = _mm512_maskz_sub_ps(finite, w, _mm512_castsi512_ps(hi));
        let mid = _mm512_and_si512(_mm512_castps_si512(r1), mask);
        let lo = _mm512_castps_si512(_mm512_sub_ps(r1, _mm512_castsi512_ps(mid)));
        [hi, mid, lo]
    }
}

/// 32 int8 at `x` as 32 bf16 at `dst` (exact).
///
/// # Safety
/// AVX-512 F/BW; 32 readable bytes at `x`, 64 writable at `dst`.
#[inline(always)]
unsafe fn bf16_32(x: *const u8, dst: *mut u8) {
    // SAFETY: by the contract.
    unsafe {
        let f = |p: *const u8| {
            _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                p as *const __m128i,
            ))))
        };
        _mm512_storeu_si512(dst as *mut _, high_words(f(x), f(x.add(16))));
    }
}

/// Words `4j + g` (`j < 16`) of `stg` (16 keys' 8 bytes of scales) as the f32 scales of
/// group `g` of 16 keys, one per lane; with `quads`, lane `l` takes key `4 * quad + l / 4`.
///
/// # Safety
/// AVX-512 BW; `stg` holds 128 readable bytes.
#[inline(always)]
unsafe fn group_scales(stg: *const u8, idx: &[u16; 32]) -> __m512 {
    // SAFETY: by the contract.
    unsafe {
        let a = _mm512_loadu_si512(stg as *const _);
        let b = _mm512_loadu_si512(stg.add(64) as *const _);
        let i = _mm512_loadu_si512(idx.as_ptr() as *const _);
        _mm512_castsi512_ps(_mm512_maskz_permutex2var_epi16(0xAAAA_AAAA, a, i, b))
    }
}

/// Index vectors of `group_scales`: lane `l` (word `2l + 1`) takes key `key(l)`'s scale `g`.
const fn scale_idx(g: usize, quad: Option<usize>) -> [u16; 32] {
    let mut x = [0u16; 32];
    let mut l = 0;
    while l < 16 {
        let key = match quad {
            Some(q) => 4 * q + l / 4,
            None => l,
        };
        x[2 * l + 1] = (4 * key + g) as u16;
        l += 1;
    }
    x
}

const SCALE_KEYS: [[u16; 32]; 4] = [
    scale_idx(0, None),
    scale_idx(1, None),
    scale_idx(2, None),
    scale_idx(3, None),
];
const SCALE_QUADS: [[[u16; 32]; 4]; 4] = {
    let mut x = [[[0u16; 32]; 4]; 4];
    let mut q = 0;
    while q < 4 {
        let mut g = 0;
        while g < 4 {
            x[q][g] = scale_idx(g, Some(q));
            g += 1;
        }
        q += 1;
    }
    x
};

/// Row `j`'s 8 bytes of scales (`Q8`: bf16 at `head_dim`, padded to 8) into `stg[j]`, zeros
/// for `j` in `n..m`.
///
/// # Safety
/// `rows` holds `n` rows; `stg` `m * 8` writable bytes.
#[inline(always)]
unsafe fn stage_scales(rows: &Q8Rows<'_>, n: usize, m: usize, stg: *mut u8) {
    let (d, rb) = (rows.fmt.head_dim, rows.fmt.row_bytes());
    // SAFETY: by the contract.
    unsafe {
        for j in 0..m {
            let v = if j < n {
                (rows.data.as_ptr().add(j * rb + d) as *const u64).read_unaligned()
            } else {
                0
            };
            (stg.add(8 * j) as *mut u64).write_unaligned(v);
        }
    }
}

/// `s[r][j] = q[r] . k.row(j)` for `r < rows`, `j < n` (`Kernels::q8_scores`) through the
/// tile unit `U`, with `sc` as scratch. Keys past `n` are not written.
///
/// # Safety
/// AVX-512 F/BW/VL on this CPU, and what `U`'s operations need (`TileUnit`). Lengths are
/// checked here.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn scores<U: TileUnit>(
    q: &[f32],
    rows: usize,
    k: &Q8Rows<'_>,
    n: usize,
    s: &mut [f32],
    sc: &mut Vec<f32>,
    ahead: &Q8Rows<'_>,
) {
    let fmt = k.fmt;
    let (d, rb) = (fmt.head_dim, fmt.row_bytes());
    assert!(fits(fmt) && n <= TK, "groups of {}, {n} keys", fmt.group);
    k.check(n);
    assert!(q.len() >= rows * d && s.len() >= rows.saturating_sub(1) * TK + n);
    let groups = d / 32;
    let n16 = n.next_multiple_of(16);
    // Scratch: the keys as bf16 ([TK][d]), their scales ([TK][8 bytes]), a block's scores
    // per group ([4][16 keys][4 rows]), the query's pairs per part and group ([3][4][16][4]).
    let (kb_len, stg_len, c_len) = (TK * d * 2, TK * 8, 4 * 64 * 4);
    let base = scratch(sc, kb_len + stg_len + c_len + 3 * 4 * 256);
    let (kb, stg) = (base, base.wrapping_add(kb_len));
    let cb = stg.wrapping_add(stg_len);
    let qb = cb.wrapping_add(c_len);
    // SAFETY: the scratch holds the sizes above; key rows below n are in bounds (checked);
    // q's and s's rows as checked above; the tile operations by the contract.
    unsafe {
        for j in 0..n16 {
            for c in 0..groups {
                let dst = kb.add(j * d * 2 + 64 * c);
                if j < n {
                    bf16_32(k.data.as_ptr().add(j * rb + 32 * c), dst);
                } else {
                    _mm512_storeu_si512(dst as *mut _, _mm512_setzero_si512());
                }
            }
        }
        stage_scales(k, n, n16, stg);
        U::config(&CONFIG);
        for r0 in (0..rows).step_by(4) {
            let rr = (rows - r0).min(4);
            let parts = query_pairs(q.as_ptr().add(r0 * d), rr, d, qb);
            for j0 in (0..n16).step_by(16) {
                if r0 == 0 {
                    fetch(ahead, j0, 16);
                }
                for g in 0..groups {
                    U::zero::<1>();
                    U::load::<0>(kb.add(j0 * d * 2 + 64 * g), d * 2);
                    for p in 0..parts {
                        U::load::<2>(qb.add((p * 4 + g) * 256), 16);
                        U::dp::<1, 0, 2>();
                    }
                    U::store::<1>(cb.add(g * 256), 16);
                }
                // Per quad of keys (4 keys x 4 rows a vector): the groups' partial scores
                // times their scales.
                let sq: [__m512; 4] = std::array::from_fn(|quad| {
                    let mut acc = _mm512_setzero_ps();
                    for (g, idx) in SCALE_QUADS[quad].iter().enumerate().take(groups) {
                        let c = _mm512_loadu_ps((cb.add(g * 256) as *const f32).add(16 * quad));
                        let sv = group_scales(stg.add(8 * j0), idx);
                        acc = _mm512_fmadd_ps(c, sv, acc);
                    }
                    acc
                });
                let m = ((1u32 << (n - j0).min(16)) - 1) as u16;
                for (r, idx) in ROW_OF_QUADS.iter().enumerate().take(rr) {
                    let i = _mm512_loadu_si512(idx.as_ptr() as *const _);
                    let a = _mm512_permutex2var_ps(sq[0], i, sq[1]);
                    let b = _mm512_permutex2var_ps(sq[2], i, sq[3]);
                    let v = _mm512_shuffle_f32x4::<0x44>(a, b);
                    _mm512_mask_storeu_ps(s.as_mut_ptr().add((r0 + r) * TK + j0), m, v);
                }
            }
        }
        U::release();
    }
}

/// Lanes `0..8` of `permutex2var(a, ROW_OF_QUADS[r], b)`: row `r` of keys `0..8` from two
/// vectors of 4 keys x 4 rows.
const ROW_OF_QUADS: [[u32; 16]; 4] = {
    let mut x = [[0u32; 16]; 4];
    let mut r = 0;
    while r < 4 {
        let mut l = 0;
        while l < 8 {
            x[r][l] = (16 * (l / 4) + 4 * (l % 4) + r) as u32;
            l += 1;
        }
        r += 1;
    }
    x
};

/// Rows `0..rr` of the query (`d` f32 each, at `q`) as tile-unit pairs at `qb`: part `p`,
/// group `g` at `(p * 4 + g) * 256` bytes, row `k` (16 bytes) = dims `32g + 2k, + 1` of each
/// of 4 rows (0 past `rr`). Returns the parts needed: 1 where every value is a bf16.
///
/// # Safety
/// AVX-512 F/BW; `q` holds `rr * d` readable f32; `qb` 3 KiB writable.
#[inline(always)]
unsafe fn query_pairs(q: *const f32, rr: usize, d: usize, qb: *mut u8) -> usize {
    // Row r's 16 pairs (dwords) of a group into lanes (k, r) of four vectors: first rows
    // (0, 1) and (2, 3) interleaved, then keys in fours.
    const fn idx(level: usize, i: usize) -> [u32; 16] {
        let mut x = [0u32; 16];
        let mut l = 0;
        while l < 16 {
            x[l] = if level == 1 {
                // Half i: pairs 8i..8i + 8 of the two rows, alternating.
                (16 * (l % 2) + 8 * i + l / 2) as u32
            } else {
                // Vector i: pairs 4i + l / 4 (of the half holding them), row l % 4.
                let kk = 4 * (i % 2) + l / 4;
                let r = l % 4;
                (16 * (r / 2) + 2 * kk + r % 2) as u32
            };
            l += 1;
        }
        x
    }
    const L1: [[u32; 16]; 2] = [idx(1, 0), idx(1, 1)];
    const L2: [[u32; 16]; 4] = [idx(2, 0), idx(2, 1), idx(2, 2), idx(2, 3)];
    // SAFETY: by the contract.
    unsafe {
        let ld = |i: &[u32; 16]| _mm512_loadu_si512(i.as_ptr() as *const _);
        let mut rest = _mm512_setzero_si512();
        let mut packed = [[[_mm512_setzero_si512(); 4]; 4]; 3]; // [part][group][row]
        for r in 0..rr {
            for g in 0..d / 32 {
                let a = _mm512_loadu_ps(q.add(r * d + 32 * g));
                let b = _mm512_loadu_ps(q.add(r * d + 32 * g + 16));
                let (sa, sb) = (split3(a), split3(b));
                rest = _mm512_or_si512(rest, _mm512_or_si512(sa[1], sb[1]));
                rest = _mm512_or_si512(rest, _mm512_or_si512(sa[2], sb[2]));
                for (part, (x, y)) in packed.iter_mut().zip(sa.iter().zip(&sb)) {
                    part[g][r] = high_words(*x, *y);
                }
            }
        }
        // -0.0 remainders count as none.
        let rest = _mm512_and_si512(rest, _mm512_set1_epi32(0x7FFF_FFFF));
        let parts = if _mm512_test_epi32_mask(rest, rest) == 0 {
            1
        } else {
            3
        };
        for (p, part) in packed.iter().enumerate().take(parts) {
            for (g, rows) in part.iter().enumerate().take(d / 32) {
                for h in 0..2 {
                    let a = _mm512_permutex2var_epi32(rows[0], ld(&L1[h]), rows[1]);
                    let b = _mm512_permutex2var_epi32(rows[2], ld(&L1[h]), rows[3]);
                    for v in 0..2 {
                        let x = _mm512_permutex2var_epi32(a, ld(&L2[2 * h + v]), b);
                        _mm512_storeu_si512(
                            qb.add((p * 4 + g) * 256 + (2 * h + v) * 64) as *mut _,
                            x,
                        );
                    }
                }
            }
        }
        parts
    }
}

/// `o[r] += sum_{j < n} p[r][j] * v.row(j)` for `r < rows` (`Kernels::q8_pv`) through the
/// tile unit `U`, with `sc` as scratch.
///
/// # Safety
/// As `scores`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn pv<U: TileUnit>(
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
    assert!(fits(fmt) && n <= TK, "groups of {}, {n} keys", fmt.group);
    v.check(n);
    assert!(p.len() >= rows.saturating_sub(1) * TK + n && o.len() >= rows * d);
    let groups = d / 32;
    let n32 = n.next_multiple_of(32);
    // Scratch: scales ([TK][8 bytes]), the weights' parts per 32 keys and group
    // ([2][4][3][4 rows][32 bf16]), the tiles of value pairs per 32 keys, group and 16
    // columns ([2][4][2][1 KiB]: converted once, whatever the rows), 4 output rows.
    let (stg_len, w_len, b_len) = (TK * 8, 2 * 4 * 3 * 256, 2 * 4 * 2 * 1024);
    let base = scratch(sc, stg_len + w_len + b_len + 4 * d * 4);
    let stg = base;
    let wb = stg.wrapping_add(stg_len);
    let vb = wb.wrapping_add(w_len);
    let ob = vb.wrapping_add(b_len) as *mut f32;
    // SAFETY: the scratch holds the sizes above; value rows below n are in bounds (checked);
    // p's and o's rows as checked above; the tile operations by the contract.
    unsafe {
        stage_scales(v, n, n32, stg);
        let per = TK.div_ceil(groups);
        for g in 0..groups {
            // The next tile's rows, spread over the groups.
            fetch(ahead, g * per, per);
            for h in 0..n32 / 32 {
                for b in 0..2 {
                    let at = vb.add(((h * 4 + g) * 2 + b) * 1024);
                    value_pairs(v, n, 32 * h, 32 * g + 16 * b, at);
                }
            }
        }
        U::config(&CONFIG);
        for r0 in (0..rows).step_by(4) {
            let rr = (rows - r0).min(4);
            for h in 0..n32 / 32 {
                let j0 = 32 * h;
                let mask = |j: usize| ((1u64 << n.saturating_sub(j).min(16)) - 1) as u16;
                let (m0, m1) = (mask(j0), mask(j0 + 16));
                for (g, idx) in SCALE_KEYS.iter().enumerate().take(groups) {
                    let s0 = group_scales(stg.add(8 * j0), idx);
                    let s1 = group_scales(stg.add(8 * (j0 + 16)), idx);
                    for r in 0..4 {
                        let (w0, w1) = if r < rr {
                            let pr = p.as_ptr().add((r0 + r) * TK + j0);
                            (
                                _mm512_mul_ps(_mm512_maskz_loadu_ps(m0, pr), s0),
                                _mm512_mul_ps(_mm512_maskz_loadu_ps(m1, pr.add(16)), s1),
                            )
                        } else {
                            (_mm512_setzero_ps(), _mm512_setzero_ps())
                        };
                        let (a, b) = (split3(w0), split3(w1));
                        for part in 0..3 {
                            let at = wb.add(((h * 4 + g) * 3 + part) * 256 + 64 * r);
                            _mm512_storeu_si512(at as *mut _, high_words(a[part], b[part]));
                        }
                    }
                }
            }
            // The output rows: in place where there are 4, else through the scratch.
            let (out, stride) = if rr == 4 {
                (o.as_mut_ptr().add(r0 * d), d)
            } else {
                for r in 0..4 {
                    for c in 0..d {
                        *ob.add(r * d + c) = if r < rr { o[(r0 + r) * d + c] } else { 0.0 };
                    }
                }
                (ob, d)
            };
            for g in 0..groups {
                for b in 0..2 {
                    let col = 32 * g + 16 * b;
                    U::load::<3>(out.add(col) as *const u8, stride * 4);
                    for h in 0..n32 / 32 {
                        U::load::<4>(vb.add(((h * 4 + g) * 2 + b) * 1024), 64);
                        let at = wb.add((h * 4 + g) * 3 * 256);
                        U::load::<5>(at, 64);
                        U::load::<6>(at.add(256), 64);
                        U::load::<7>(at.add(512), 64);
                        U::dp::<3, 5, 4>();
                        U::dp::<3, 6, 4>();
                        U::dp::<3, 7, 4>();
                    }
                    U::store::<3>(out.add(col) as *mut u8, stride * 4);
                }
            }
            if rr < 4 {
                for r in 0..rr {
                    for c in 0..d {
                        o[(r0 + r) * d + c] = *ob.add(r * d + c);
                    }
                }
            }
        }
        U::release();
    }
}

/// A tile of value pairs at `dst` (16 rows of 64 bytes): row `k` holds, for columns
/// `col..col + 16`, keys `j0 + 2k` and `j0 + 2k + 1` as bf16 (zeros for keys from `n`).
///
/// # Safety
/// AVX-512 F/BW; `v` holds `n` rows; 1 KiB writable at `dst`.
#[inline(always)]
unsafe fn value_pairs(v: &Q8Rows<'_>, n: usize, j0: usize, col: usize, dst: *mut u8) {
    let rb = v.fmt.row_bytes();
    // SAFETY: by the contract: rows below n only.
    unsafe {
        let row = |j: usize| {
            if j < n {
                _mm_loadu_si128(v.data.as_ptr().add(j * rb + col) as *const __m128i)
            } else {
                _mm_setzero_si128()
            }
        };
        let f = |x: __m128i| _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x)));
        for k in 0..16 {
            let (a, b) = (row(j0 + 2 * k), row(j0 + 2 * k + 1));
            let lo = f(_mm_unpacklo_epi8(a, b));
            let hi = f(_mm_unpackhi_epi8(a, b));
            _mm512_storeu_si512(dst.add(64 * k) as *mut _, high_words(lo, hi));
        }
    }
}

#[cfg(test)]
#[path = "../../../tests/rust/cpu/simd/amx.rs"]
mod tests;
