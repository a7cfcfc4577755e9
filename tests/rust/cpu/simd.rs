//! Unit tests of `src/cpu/simd.rs`: every kernel this CPU runs, and the generic SIMD kernels
//! at 4, 8 and 16 lanes, against the f64 reference of `check` (whose tolerance is explained
//! there), and the choice of the set.

use super::check::{Compare, Shapes};
use super::*;

#[test]
fn every_kernel_of_this_cpu_matches_the_reference() {
    let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.supported()).collect();
    eprintln!("sets on this CPU: {isas:?}");
    for isa in isas {
        let shapes = Shapes {
            dims: &[1, 3, 8, 15, 16, 24, 64, 72, 80, 96, 100, 128, 136, 256],
            rows: &[1, 2, 3, 4, 5, 6, 7, 8, 9],
            keys: &[1, 2, 7, 8, 9, 63, TK],
            pads: &[0, 5],
            seed: 1,
        };
        if let Err(e) = isa.run(Compare(shapes)) {
            panic!("{isa:?}: {e}");
        }
    }
}

#[test]
fn the_widest_supported_set_that_checks_out_is_chosen() {
    let best = Isa::best();
    assert!(best.supported());
    assert!(choice().failures.is_empty(), "{:?}", choice().failures);
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

/// `K::scores` with 4 keys of a tile holding 3.
struct PastTheTile;

impl Job for PastTheTile {
    type Output = ();
    unsafe fn run<K: Kernels>(self) {
        let data = vec![0f32; 3 * 8];
        let kv = Rows {
            data: &data,
            stride: 8,
            len: 3,
            width: 8,
        };
        let mut s = vec![0f32; TK];
        // SAFETY: the CPU supports K's set (this function's contract).
        unsafe { K::scores(&[0f32; 8], 1, &kv, 4, &mut s) };
    }
}

#[test]
#[should_panic(expected = "4 keys of a tile")]
fn a_tile_past_its_bounds_is_refused() {
    // Three rows given, four asked for: the checked entry panics instead of reading past.
    Isa::best().run(PastTheTile);
}

/// `K::scores` and `K::pv` over key rows `stride` apart (closer than their width, or 0: a row
/// repeated), against the same rows laid out one after another.
struct CloseRows {
    stride: usize,
}

impl Job for CloseRows {
    type Output = ();
    unsafe fn run<K: Kernels>(self) {
        let (d, n, rows) = (24, 9, 3);
        let data: Vec<f32> = (0..(n - 1) * self.stride + d)
            .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
            .collect();
        let close = Rows {
            data: &data,
            stride: self.stride,
            len: n,
            width: d,
        };
        let spread: Vec<f32> = (0..n).flat_map(|j| close.row(j).to_vec()).collect();
        let apart = Rows {
            data: &spread,
            stride: d,
            len: n,
            width: d,
        };
        let q: Vec<f32> = (0..rows * d).map(|i| (i % 5) as f32 - 2.0).collect();
        let p: Vec<f32> = (0..rows * TK).map(|i| (i % 3) as f32 / 3.0).collect();
        let (mut s1, mut s2) = (vec![0f32; rows * TK], vec![0f32; rows * TK]);
        let (mut o1, mut o2) = (vec![0f32; rows * d], vec![0f32; rows * d]);
        // SAFETY: the CPU supports K's set (this function's contract).
        unsafe {
            K::scores(&q, rows, &close, n, &mut s1);
            K::scores(&q, rows, &apart, n, &mut s2);
            K::pv(&p, rows, &close, n, &mut o1);
            K::pv(&p, rows, &apart, n, &mut o2);
        }
        assert_eq!(s1, s2, "scores, rows {} apart", self.stride);
        assert_eq!(o1, o2, "pv, rows {} apart", self.stride);
    }
}

#[test]
fn rows_closer_than_their_width_are_read_as_laid_out() {
    // Found by the boundary's thread test: a key or value view whose rows overlap (row stride
    // below head_dim) or repeat (stride 0, `expand` over the sequence) is a legal input, and
    // the entry check asserted rows at least a row apart: a panic across the boundary.
    for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
        for stride in [0, 1, 8, 23] {
            isa.run(CloseRows { stride });
        }
    }
    // SAFETY: portable code.
    unsafe { CloseRows { stride: 5 }.run::<Emu<16, true>>() };
}

/// Portable `Lanes` of `N` lanes (`[f32; N]`, fused multiply-adds): the generic kernels'
/// blocking, tails and masks at the widths of AVX2 (8) and AVX-512 (16, wide blocks) on any
/// CPU, so that the 16-lane logic is tested where AVX-512 cannot run.
struct Emu<const N: usize, const WIDE: bool>;

impl<const N: usize, const WIDE: bool> Lanes for Emu<N, WIDE> {
    type V = [f32; N];
    const N: usize = N;
    const WIDE: bool = WIDE;
    unsafe fn zero() -> [f32; N] {
        [0.0; N]
    }
    unsafe fn splat(x: f32) -> [f32; N] {
        [x; N]
    }
    unsafe fn fmadd(a: [f32; N], b: [f32; N], c: [f32; N]) -> [f32; N] {
        std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
    }
    unsafe fn load<E: Element>(p: *const E) -> [f32; N] {
        // SAFETY: `p` addresses N elements (the contract).
        std::array::from_fn(|i| unsafe { *p.add(i) }.to_f32())
    }
    unsafe fn load_part<E: Element>(p: *const E, n: usize) -> [f32; N] {
        assert!(n < N);
        // SAFETY: `p` addresses n elements (the contract); no other is read.
        std::array::from_fn(|i| {
            if i < n {
                unsafe { *p.add(i) }.to_f32()
            } else {
                0.0
            }
        })
    }
    unsafe fn mul(a: [f32; N], b: [f32; N]) -> [f32; N] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    unsafe fn load_i8(p: *const i8, w: usize) -> [f32; N] {
        assert!(w <= N);
        // SAFETY: `p` addresses w bytes (the contract); no other is read.
        std::array::from_fn(|i| {
            if i < w {
                (unsafe { *p.add(i) }) as f32
            } else {
                0.0
            }
        })
    }
    unsafe fn store(p: *mut f32, v: [f32; N]) {
        // SAFETY: `p` addresses N f32 (the contract).
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), p, N) }
    }
    unsafe fn store_part(p: *mut f32, n: usize, v: [f32; N]) {
        assert!(n < N);
        // SAFETY: `p` addresses n f32 (the contract).
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), p, n) }
    }
    unsafe fn sums(v: &[[f32; N]], out: &mut [f32]) {
        assert!(v.len() == out.len() && v.len() <= 16);
        for (o, x) in out.iter_mut().zip(v) {
            *o = x.iter().sum();
        }
    }
}

impl<const N: usize, const WIDE: bool> Kernels for Emu<N, WIDE> {
    const FMA: bool = true;
    unsafe fn scores<T: Tile>(q: &[f32], rows: usize, k: &T, n: usize, s: &mut [f32]) {
        // SAFETY: portable code; the body checks the lengths.
        unsafe { lanes_kernel::<Self, T, false>(q, rows, k, n, s) }
    }
    unsafe fn pv<T: Tile>(p: &[f32], rows: usize, v: &T, n: usize, o: &mut [f32]) {
        // SAFETY: as `scores`.
        unsafe { lanes_kernel::<Self, T, true>(p, rows, v, n, o) }
    }
}

#[test]
fn the_generic_kernels_match_the_reference_at_4_8_and_16_lanes() {
    let shapes = || Shapes {
        dims: &[
            1, 3, 8, 15, 16, 17, 24, 40, 64, 72, 80, 96, 100, 128, 136, 256,
        ],
        rows: &[1, 2, 3, 4, 5, 7, 8, 9],
        keys: &[1, 2, 7, 8, 9, 63, TK],
        pads: &[0, 5],
        seed: 7,
    };
    // SAFETY: portable code.
    unsafe {
        assert_eq!(Compare(shapes()).run::<Emu<8, false>>(), Ok(()));
        assert_eq!(Compare(shapes()).run::<Emu<16, true>>(), Ok(()));
        assert_eq!(Compare(shapes()).run::<Emu<4, false>>(), Ok(()));
    }
}
