//! Unit tests of `src/attention/cpu.rs`: the op against a naive f64 reference.

use super::*;
use crate::attention::args::Params;
use crate::store::{CpuStore, StoreConfig};
use crate::test_common::{reference, rel_err, Rng};
use half::{bf16, f16};

struct Case {
    hkv: usize,
    g: usize,
    d: usize,
    lq: usize,
    past: usize,
    window: Option<usize>,
    softcap: Option<f32>,
}

fn run_case<E: Element>(c: &Case, seed: u64, tol: f64) {
    let mut rng = Rng::new(seed);
    let (hq, lk) = (c.hkv * c.g, c.past + c.lq);
    let round = |x: Vec<f32>| -> Vec<E> { x.into_iter().map(E::from_f32).collect() };
    let q = round(rng.vec(hq * c.lq * c.d, 2.0));
    let k = round(rng.vec(c.hkv * lk * c.d, 2.0));
    let v = round(rng.vec(c.hkv * lk * c.d, 1.0));
    let f64s = |x: &[E]| -> Vec<f64> { x.iter().map(|y| y.to_f32() as f64).collect() };
    let scale = 1.0 / (c.d as f32).sqrt();
    let want = reference(
        &f64s(&q),
        &f64s(&k),
        &f64s(&v),
        [hq, c.lq, c.d],
        c.hkv,
        lk,
        scale as f64,
        c.softcap.map(|x| x as f64),
        c.window,
    );
    let params = Params {
        scale,
        softcap: c.softcap,
        window: c.window,
    };
    let qv = View3::contiguous(&q, [hq, c.lq, c.d]);
    let dense = DenseKv::new(
        View3::contiguous(&k, [c.hkv, lk, c.d]),
        View3::contiguous(&v, [c.hkv, lk, c.d]),
    )
    .unwrap();
    let got = attend(qv, &dense, &params).unwrap();
    let err = rel_err(&got, &want);
    assert!(err < tol, "dense {}: err {err}", describe(c));

    // The same through the store, appended in two chunks across small blocks.
    let mut store = CpuStore::new(StoreConfig {
        num_layers: 1,
        num_kv_heads: c.hkv,
        head_dim: c.d,
        dtype: E::DTYPE,
        block_size: 16,
        windows: vec![c.window],
        host_memory_limit: None,
    })
    .unwrap();
    let split = c.past / 2;
    for (a, b) in [(0, split), (split, lk)] {
        let take = |x: &[E]| -> Vec<E> {
            (0..c.hkv)
                .flat_map(|h| x[(h * lk + a) * c.d..(h * lk + b) * c.d].to_vec())
                .collect()
        };
        store
            .append(
                0,
                View3::contiguous(&take(&k), [c.hkv, b - a, c.d]),
                View3::contiguous(&take(&v), [c.hkv, b - a, c.d]),
            )
            .unwrap();
    }
    let got = attend(qv, &store.view::<E>(0).unwrap(), &params).unwrap();
    let err = rel_err(&got, &want);
    assert!(err < tol, "store {}: err {err}", describe(c));
}

fn describe(c: &Case) -> String {
    format!(
        "hkv={} g={} d={} lq={} past={} window={:?} softcap={:?}",
        c.hkv, c.g, c.d, c.lq, c.past, c.window, c.softcap
    )
}

fn cases() -> Vec<Case> {
    let mut rng = Rng::new(7);
    let mut out = Vec::new();
    for i in 0..40 {
        out.push(Case {
            hkv: 1 + rng.below(3),
            g: [1, 2, 3, 4][rng.below(4)],
            d: [8, 16, 64, 80, 128, 100][rng.below(6)],
            lq: [1, 1, 3, 17, 70][rng.below(5)],
            past: [0, 1, 37, 64, 300][rng.below(5)],
            window: [None, None, Some(1), Some(9), Some(65), Some(1000)][rng.below(6)],
            softcap: if i % 3 == 0 { Some(20.0) } else { None },
        });
    }
    out
}

#[test]
fn f32_matches_reference() {
    for (i, c) in cases().iter().enumerate() {
        run_case::<f32>(c, i as u64, 2e-5);
    }
}

#[test]
fn bf16_and_f16_accumulate_in_f32() {
    // Inputs are rounded to 16 bits before the reference sees them, so only the f32
    // accumulation differs: the error stays at f32 level.
    for (i, c) in cases().iter().enumerate().take(20) {
        run_case::<bf16>(c, 100 + i as u64, 2e-5);
        run_case::<f16>(c, 200 + i as u64, 2e-5);
    }
}

#[test]
fn decode_over_long_context_splits_and_merges() {
    // One query over many keys: the op splits the keys and merges by log-sum-exp.
    let c = Case {
        hkv: 1,
        g: 4,
        d: 64,
        lq: 1,
        past: 5000,
        window: None,
        softcap: None,
    };
    run_case::<f32>(&c, 5, 2e-5);
    let c = Case {
        window: Some(3000),
        softcap: Some(30.0),
        ..c
    };
    run_case::<bf16>(&c, 6, 2e-5);
}

#[test]
fn errors_name_the_argument() {
    let q = vec![0f32; 3 * 2 * 8];
    let k = vec![0f32; 2 * 4 * 8];
    let kv = DenseKv::new(
        View3::contiguous(&k, [2, 4, 8]),
        View3::contiguous(&k, [2, 4, 8]),
    )
    .unwrap();
    let p = Params {
        scale: 1.0,
        softcap: None,
        window: None,
    };
    let e = attend(View3::contiguous(&q, [3, 2, 8]), &kv, &p)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("query: 3 query heads"), "{e}");
    let q = vec![0f32; 2 * 5 * 8];
    let e = attend(View3::contiguous(&q, [2, 5, 8]), &kv, &p)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("query: 5 queries but only 4 keys"), "{e}");
    let q = vec![0f32; 2 * 4];
    let e = attend(View3::contiguous(&q, [2, 1, 4]), &kv, &p)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("query: head_dim is 4"), "{e}");
    let q = vec![0f32; 2 * 8];
    let bad = Params {
        softcap: Some(-1.0),
        ..p
    };
    let e = attend(View3::contiguous(&q, [2, 1, 8]), &kv, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("softcap:"), "{e}");
    let e = DenseKv::new(
        View3::contiguous(&k, [2, 4, 8]),
        View3::contiguous(&q, [2, 1, 8]),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.starts_with("value: shape"), "{e}");
}
