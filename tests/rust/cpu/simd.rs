//! Unit tests of `src/cpu/simd.rs`: every SIMD kernel this CPU runs against the portable one
//! (through `check`, whose tolerance is explained there), and the choice of the set.

use super::check::{Compare, Shapes};
use super::*;

/// The SIMD sets this CPU runs (the portable one is the reference).
fn simd_isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|i| *i != Isa::Scalar && i.supported())
        .collect()
}

#[test]
fn simd_kernels_match_the_portable_ones() {
    let isas = simd_isas();
    eprintln!("SIMD sets on this CPU: {isas:?}");
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
