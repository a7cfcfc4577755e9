//! Unit tests of `src/attention/rates.rs`: the CPU probe (the GPU probe runs in tests/gpu).

use super::*;
use half::bf16;

#[test]
fn the_cpu_probe_measures_a_finite_rate_quickly() {
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let t = Instant::now();
        let r = measure_cpu::<bf16>(128, 4, 8 << 20, 0.05, Some(&pool)).unwrap();
        assert!(t.elapsed().as_secs_f64() < 5.0);
        assert!(r.bytes_per_s.is_finite() && r.bytes_per_s > 1e6, "{r:?}");
        assert!(r.fixed_s >= HANDOFF_LATENCY && r.fixed_s < 1.0, "{r:?}");
    }
    let r = measure_cpu::<f32>(64, 1, 1 << 20, 0.0, None).unwrap();
    assert!(r.bytes_per_s.is_finite() && r.bytes_per_s > 0.0, "{r:?}");
}

#[test]
fn the_cpu_probe_checks_its_arguments() {
    let e = measure_cpu::<f32>(0, 1, 1 << 20, 0.0, None).unwrap_err();
    assert!(e.to_string().starts_with("head_dim: "), "{e}");
    assert!(measure_cpu::<f32>(64, 0, 1 << 20, 0.0, None).is_err());
}
