//! Unit tests of `src/cpu/simd/check.rs`: the self-check passes for every set this CPU has,
//! catches kernels broken the way SIMD code breaks (a dropped tail column, a dropped key),
//! and a set that fails it gives way to the next one down.

use super::*;
use crate::cpu::simd::{Scalar, Tile};

/// The portable kernels broken as SIMD code breaks: with `TAIL`, the scores miss the last
/// column's term (a dropped tail); else `p . V` misses the last key.
struct Broken<const TAIL: bool>;
type DroppedTail = Broken<true>;
type DroppedKey = Broken<false>;

impl<const TAIL: bool> Kernels for Broken<TAIL> {
    const FMA: bool = false;
    unsafe fn scores<T: Tile>(q: &[f32], rows: usize, k: &T, n: usize, s: &mut [f32]) {
        // SAFETY: portable code.
        unsafe { Scalar::scores(q, rows, k, n, s) };
        let d = k.width();
        for r in 0..rows {
            for j in 0..n {
                if TAIL {
                    s[r * TK + j] -= q[r * d + d - 1] * k.value(j, d - 1);
                }
            }
        }
    }
    unsafe fn pv<T: Tile>(p: &[f32], rows: usize, v: &T, n: usize, o: &mut [f32]) {
        let n = if TAIL { n } else { n.saturating_sub(1) };
        // SAFETY: portable code.
        unsafe { Scalar::pv(p, rows, v, n, o) }
    }
}

#[test]
fn every_set_of_this_cpu_passes_the_self_check() {
    for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
        let t = std::time::Instant::now();
        assert_eq!(isa.run(Compare(SELF_CHECK)), Ok(()), "{isa:?}");
        eprintln!("{isa:?}: self-check in {:?}", t.elapsed());
    }
}

#[test]
fn broken_kernels_fail_the_self_check() {
    // SAFETY: portable code.
    let tail = unsafe { Compare(SELF_CHECK).run::<DroppedTail>() }.unwrap_err();
    assert!(
        tail.starts_with("F32 d=13 rows=2 n=19 pad=3: score [0]["),
        "{tail}"
    );
    // SAFETY: portable code.
    let key = unsafe { Compare(SELF_CHECK).run::<DroppedKey>() }.unwrap_err();
    assert!(
        key.starts_with("F32 d=13 rows=2 n=19 pad=3: output [0]["),
        "{key}"
    );
}

#[test]
fn a_set_that_fails_gives_way_to_the_next_one_down() {
    let supported: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.supported()).collect();
    let widest = *supported.last().unwrap();
    // With every set checked for real, the widest is chosen (as `choice` does).
    let honest = choose(|isa| isa.run(Compare(SELF_CHECK)));
    assert_eq!(
        honest,
        Choice {
            isa: widest,
            failures: vec![]
        }
    );
    // The widest set's kernels broken: the next one down, with the reason kept. (On a CPU
    // with no SIMD set there is nothing to pass over.)
    let fallen = choose(|isa| {
        if isa == widest {
            // SAFETY: portable code.
            unsafe { Compare(SELF_CHECK).run::<DroppedKey>() }
        } else {
            isa.run(Compare(SELF_CHECK))
        }
    });
    if widest == Isa::Scalar {
        assert_eq!(fallen, honest);
        return;
    }
    assert_eq!(fallen.isa, supported[supported.len() - 2]);
    assert_eq!(fallen.failures.len(), 1);
    let want = format!("{}: F32 d=13 rows=2 n=19 pad=3: output [0][", widest.name());
    assert!(
        fallen.failures[0].starts_with(&want),
        "{:?}",
        fallen.failures
    );
    // Every SIMD set failing: the portable one, with each reason.
    let simd = supported.len() - 1;
    let none = choose(|_| Err("broken".into()));
    assert_eq!(none.isa, Isa::Scalar);
    assert_eq!(none.failures.len(), simd);
}
