//! TEST-ONLY failure points: makes the next (or the n-th next) pass through a named point fail,
//! so tests can prove that a failure inside a step raises in that step and leaves the cache
//! usable. Nothing is armed unless a test arms it (`_core._inject_failure`); an unarmed point
//! costs one relaxed atomic load. It sits at the bottom of the crate (it depends on `error`
//! alone), so the low-level code that has points (`cuda`, `store`) can reach it.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicI64, Ordering};

/// Where a failure can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPoint {
    /// The host worker of a shared decode returns an error.
    CpuShare,
    /// The host worker of a shared decode panics.
    CpuSharePanic,
    /// A kernel launch fails as the driver would report it.
    Launch,
    /// A fresh KV block allocation (host or device) fails.
    Alloc,
}

const POINTS: [(FailPoint, &str); 4] = [
    (FailPoint::CpuShare, "cpu_share"),
    (FailPoint::CpuSharePanic, "cpu_share_panic"),
    (FailPoint::Launch, "launch"),
    (FailPoint::Alloc, "alloc"),
];

/// Per point: passes left before the failure (-1: disarmed).
static ARMED: [AtomicI64; 4] = [
    AtomicI64::new(-1),
    AtomicI64::new(-1),
    AtomicI64::new(-1),
    AtomicI64::new(-1),
];

impl FailPoint {
    fn index(self) -> usize {
        POINTS.iter().position(|(p, _)| *p == self).expect("listed")
    }

    /// The name tests use.
    pub fn name(self) -> &'static str {
        POINTS[self.index()].1
    }

    /// Parses a point's name; `ValueError` naming `arg` for an unknown one.
    pub fn parse(arg: &str, name: &str) -> Result<Self> {
        POINTS
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(p, _)| *p)
            .ok_or_else(|| {
                let known: Vec<&str> = POINTS.iter().map(|(_, n)| *n).collect();
                Error::value(
                    arg,
                    format!("unknown failure point {name:?}; one of {known:?}"),
                )
            })
    }
}

/// Arms `point` to fail once, after `after` more passes succeed.
pub fn arm(point: FailPoint, after: usize) {
    ARMED[point.index()].store(after.min(i64::MAX as usize) as i64, Ordering::SeqCst);
}

/// Disarms every point.
pub fn disarm_all() {
    for a in &ARMED {
        a.store(-1, Ordering::SeqCst);
    }
}

/// Whether a pass through `point` must fail now (then the point disarms itself).
pub fn hit(point: FailPoint) -> bool {
    #[cfg(test)]
    if local::hit(point) {
        return true;
    }
    let a = &ARMED[point.index()];
    if a.load(Ordering::Relaxed) < 0 {
        return false;
    }
    // Count down; the pass that takes it from 0 to -1 fails.
    a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
        (n >= 0).then(|| n - 1)
    })
    .is_ok_and(|prev| prev == 0)
}

/// `Err(Injected)` when `point` is armed and due.
pub fn check(point: FailPoint) -> Result<()> {
    if hit(point) {
        return Err(Error::Injected(point.name()));
    }
    Ok(())
}

/// Points armed for the calling thread only, so Rust unit tests (which run in parallel
/// threads) cannot trip each other.
#[cfg(test)]
pub mod local {
    use super::FailPoint;
    use std::cell::Cell;

    thread_local! {
        static ARMED: Cell<[i64; 4]> = const { Cell::new([-1; 4]) };
    }

    /// Arms `point` on this thread, as `super::arm` does process-wide.
    pub fn arm(point: FailPoint, after: usize) {
        ARMED.with(|a| {
            let mut v = a.get();
            v[point.index()] = after as i64;
            a.set(v);
        });
    }

    pub(super) fn hit(point: FailPoint) -> bool {
        ARMED.with(|a| {
            let mut v = a.get();
            let n = &mut v[point.index()];
            if *n < 0 {
                return false;
            }
            *n -= 1;
            a.set(v);
            v[point.index()] == -1
        })
    }
}

/// Serializes the Rust unit tests that arm points process-wide.
#[cfg(test)]
pub static TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_fails_once_after_its_countdown() {
        let _guard = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let p = FailPoint::CpuSharePanic;
        assert!(!hit(p));
        arm(p, 2);
        assert!(!hit(p));
        assert!(!hit(p));
        assert!(hit(p));
        assert!(!hit(p), "fails once, then disarms");
        arm(p, 0);
        disarm_all();
        assert!(!hit(p));
        assert_eq!(
            FailPoint::parse("point", "alloc").unwrap(),
            FailPoint::Alloc
        );
        let e = FailPoint::parse("point", "nope").unwrap_err().to_string();
        assert!(e.starts_with("point: unknown failure point"), "{e}");
    }
}
