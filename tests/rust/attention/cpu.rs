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
    sinks: bool,
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
    // Sink logits of the scores' size, so that they matter (gpt-oss's are learned, O(1)).
    let sinks: Option<Vec<f32>> = c.sinks.then(|| rng.vec(hq, 3.0));
    let sinks64: Option<Vec<f64>> = sinks
        .as_ref()
        .map(|s| s.iter().map(|&x| x as f64).collect());
    let sinks = sinks.as_deref();
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
        sinks64.as_deref(),
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
    let got = attend(qv, &dense, &params, sinks).unwrap();
    let err = rel_err(&got, &want);
    assert!(err < tol, "dense {}: err {err}", describe(c));

    // The same through the store, appended in two chunks across small blocks.
    let mut store = CpuStore::new(StoreConfig {
        num_layers: 1,
        num_kv_heads: c.hkv,
        head_dim: c.d,
        dtype: E::DTYPE,
        kv: crate::quant::KvFormat::Exact,
        block_size: 16,
        windows: vec![c.window],
        host_memory_limit: None,
    })
    .unwrap();
    append_in_two(&mut store, &k, &v, c.hkv, lk, c.d, c.past / 2);
    let got = attend(qv, &store.view::<E>(0).unwrap(), &params, sinks).unwrap();
    let err = rel_err(&got, &want);
    assert!(err < tol, "store {}: err {err}", describe(c));

    // An int8 store: the op over its blocks equals the reference over the dequantized keys
    // and values (read back from the store), up to summation order.
    let mut q8 = CpuStore::new(StoreConfig {
        kv: crate::quant::KvFormat::Int8,
        ..store.config().clone()
    })
    .unwrap();
    append_in_two(&mut q8, &k, &v, c.hkv, lk, c.d, c.past / 2);
    let start = q8.retained_start(0).unwrap();
    let (mut kd, mut vd) = (vec![0f64; c.hkv * lk * c.d], vec![0f64; c.hkv * lk * c.d]);
    q8.read::<E>(0, start, lk, |h, i, kr, vr| {
        let at = (h * lk + start + i) * c.d;
        for j in 0..c.d {
            kd[at + j] = kr[j] as f64;
            vd[at + j] = vr[j] as f64;
        }
    })
    .unwrap();
    let want8 = reference(
        &f64s(&q),
        &kd,
        &vd,
        [hq, c.lq, c.d],
        c.hkv,
        lk,
        scale as f64,
        c.softcap.map(|x| x as f64),
        c.window,
        sinks64.as_deref(),
    );
    let got = attend(qv, &q8.view::<E>(0).unwrap(), &params, sinks).unwrap();
    let err = rel_err(&got, &want8);
    assert!(err < tol, "int8 store {}: err {err}", describe(c));
    // And it is close to exact attention: keys and values within half a step of a group.
    let err = rel_err(&got, &want);
    assert!(err < 0.05, "int8 store vs exact {}: err {err}", describe(c));
}

/// Appends `k`, `v` (`[hkv, lk, d]`) to layer 0 of `store` in two chunks, split at `split`.
fn append_in_two<E: Element>(
    store: &mut CpuStore,
    k: &[E],
    v: &[E],
    hkv: usize,
    lk: usize,
    d: usize,
    split: usize,
) {
    for (a, b) in [(0, split), (split, lk)] {
        let take = |x: &[E]| -> Vec<E> {
            (0..hkv)
                .flat_map(|h| x[(h * lk + a) * d..(h * lk + b) * d].to_vec())
                .collect()
        };
        store
            .append(
                0,
                View3::contiguous(&take(k), [hkv, b - a, d]),
                View3::contiguous(&take(v), [hkv, b - a, d]),
            )
            .unwrap();
    }
}

fn describe(c: &Case) -> String {
    format!(
        "hkv={} g={} d={} lq={} past={} window={:?} softcap={:?} sinks={}",
        c.hkv, c.g, c.d, c.lq, c.past, c.window, c.softcap, c.sinks
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
            sinks: i % 2 == 1,
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
        sinks: false,
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
fn decode_on_many_threads_cuts_even_tasks_and_merges() {
    // Eight heads, fifteen threads (the H100 host's share): each head's keys are cut into many
    // tasks of about equal keys; one head's window makes its range shorter than the others'.
    for (threads, window) in [(15, None), (15, Some(2500)), (3, None)] {
        let c = Case {
            hkv: 8,
            g: 4,
            d: 64,
            lq: 1,
            past: 20000,
            window,
            softcap: None,
            sinks: false,
        };
        with_threads(threads, || run_case::<bf16>(&c, 11, 2e-5));
    }
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
    let e = attend(View3::contiguous(&q, [3, 2, 8]), &kv, &p, None)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("query: 3 query heads"), "{e}");
    let q = vec![0f32; 2 * 5 * 8];
    let e = attend(View3::contiguous(&q, [2, 5, 8]), &kv, &p, None)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("query: 5 queries but only 4 keys"), "{e}");
    let q = vec![0f32; 2 * 4];
    let e = attend(View3::contiguous(&q, [2, 1, 4]), &kv, &p, None)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("query: head_dim is 4"), "{e}");
    let q = vec![0f32; 2 * 8];
    let bad = Params {
        softcap: Some(-1.0),
        ..p
    };
    let e = attend(View3::contiguous(&q, [2, 1, 8]), &kv, &bad, None)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("softcap:"), "{e}");
    let e = attend(View3::contiguous(&q, [2, 1, 8]), &kv, &p, Some(&[0.0; 3]))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("sinks: expected one sink logit per query head (2)"),
        "{e}"
    );
    let e = DenseKv::new(
        View3::contiguous(&k, [2, 4, 8]),
        View3::contiguous(&q, [2, 1, 8]),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.starts_with("value: shape"), "{e}");
}

/// Runs `f` with `n` rayon threads, so that a decode splits its keys into several ranges
/// whatever the machine (the op splits to keep every thread busy).
fn with_threads<T: Send>(n: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn sinks_enter_once_per_row_across_key_splits() {
    // Decode over 6000 keys with 8 threads: each row's keys split into about 10 ranges that
    // merge by log-sum-exp. A sink folded into every range would count ~10 times; the
    // reference counts it once. GQA, with window and soft-capping combined.
    for (seed, c) in [
        Case {
            hkv: 2,
            g: 4,
            d: 64,
            lq: 1,
            past: 6000,
            window: None,
            softcap: None,
            sinks: true,
        },
        Case {
            hkv: 2,
            g: 3,
            d: 80,
            lq: 1,
            past: 6000,
            window: Some(4500),
            softcap: Some(30.0),
            sinks: true,
        },
        Case {
            hkv: 1,
            g: 2,
            d: 64,
            lq: 5,
            past: 3000,
            window: Some(2000),
            softcap: Some(20.0),
            sinks: true,
        },
    ]
    .into_iter()
    .enumerate()
    {
        with_threads(8, || {
            run_case::<f32>(&c, 50 + seed as u64, 2e-5);
            run_case::<bf16>(&c, 60 + seed as u64, 2e-5);
        });
    }
}

#[test]
fn a_sink_is_one_more_logit_folded_into_the_final_merge() {
    // The merge rule the GPU's merge and the prefill path use: with `lse` the log-sum-exp of
    // the keys alone, out_sink = out * sigmoid(lse - sink) and lse_sink = logaddexp(lse, sink).
    let mut rng = Rng::new(11);
    let (hkv, g, d, lk) = (2, 4, 32, 3000);
    let hq = hkv * g;
    let q = rng.vec(hq * d, 2.0);
    let k = rng.vec(hkv * lk * d, 2.0);
    let v = rng.vec(hkv * lk * d, 1.0);
    // Some sinks far above and far below the scores: the fold must stay finite.
    let mut sinks = rng.vec(hq, 3.0);
    sinks[0] = 80.0;
    sinks[1] = -80.0;
    let kv = DenseKv::new(
        View3::contiguous(&k, [hkv, lk, d]),
        View3::contiguous(&v, [hkv, lk, d]),
    )
    .unwrap();
    let p = Params {
        scale: 1.0 / (d as f32).sqrt(),
        softcap: None,
        window: None,
    };
    let qv = View3::contiguous(&q, [hq, 1, d]);
    let (plain, lse) = with_threads(8, || attend_lse(qv, &kv, &p, None).unwrap());
    let (with, lse_s) = with_threads(8, || attend_lse(qv, &kv, &p, Some(&sinks)).unwrap());
    for h in 0..hq {
        let (l, s) = (lse[h] as f64, sinks[h] as f64);
        let m = l.max(s);
        let want_lse = m + ((l - m).exp() + (s - m).exp()).ln();
        assert!(
            (lse_s[h] as f64 - want_lse).abs() < 1e-5 * want_lse.abs().max(1.0),
            "head {h}: lse {} want {want_lse}",
            lse_s[h]
        );
        let w = 1.0 / (1.0 + (s - l).exp());
        for i in 0..d {
            let want = plain[h * d + i] as f64 * w;
            let got = with[h * d + i] as f64;
            assert!(
                (got - want).abs() < 2e-6,
                "head {h} [{i}]: {got} want {want}"
            );
        }
    }
    // A sink far above every score takes the whole softmax: the output vanishes.
    assert!(with[..d].iter().all(|x| x.abs() < 1e-20));
    // One far below changes nothing.
    assert_eq!(&with[d..2 * d], &plain[d..2 * d]);
}

/// Every SIMD path this CPU runs against the portable path, on the same inputs, through a
/// dense source and through the store's blocks. Both accumulate in f32 and differ only in
/// summation order (lanes of partial sums, fused multiply-adds, the key splits are the same),
/// so outputs agree to 1e-5 of the largest output and the log-sum-exps to 1e-5 of their size;
/// each also stays within 2e-5 of the f64 reference (as `run_case` checks).
fn compare_paths<E: Element>(c: &Case, seed: u64) {
    use crate::cpu::simd::Isa;
    let mut rng = Rng::new(seed);
    let (hq, lk) = (c.hkv * c.g, c.past + c.lq);
    let round = |x: Vec<f32>| -> Vec<E> { x.into_iter().map(E::from_f32).collect() };
    let q = round(rng.vec(hq * c.lq * c.d, 2.0));
    let k = round(rng.vec(c.hkv * lk * c.d, 2.0));
    let v = round(rng.vec(c.hkv * lk * c.d, 1.0));
    let sinks: Option<Vec<f32>> = c.sinks.then(|| rng.vec(hq, 3.0));
    let sinks = sinks.as_deref();
    let params = Params {
        scale: 1.0 / (c.d as f32).sqrt(),
        softcap: c.softcap,
        window: c.window,
    };
    let qv = View3::contiguous(&q, [hq, c.lq, c.d]);
    let dense = DenseKv::new(
        View3::contiguous(&k, [c.hkv, lk, c.d]),
        View3::contiguous(&v, [c.hkv, lk, c.d]),
    )
    .unwrap();
    let mut store = CpuStore::new(StoreConfig {
        num_layers: 1,
        num_kv_heads: c.hkv,
        head_dim: c.d,
        dtype: E::DTYPE,
        kv: crate::quant::KvFormat::Exact,
        block_size: 48,
        windows: vec![c.window],
        host_memory_limit: None,
    })
    .unwrap();
    store
        .append(
            0,
            View3::contiguous(&k, [c.hkv, lk, c.d]),
            View3::contiguous(&v, [c.hkv, lk, c.d]),
        )
        .unwrap();
    let layer = store.view::<E>(0).unwrap();
    let (want, want_lse) = attend_lse_on(Isa::Scalar, qv, &dense, &params, sinks).unwrap();
    let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
    for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
        for (src, (got, lse)) in [
            (
                "dense",
                attend_lse_on(isa, qv, &dense, &params, sinks).unwrap(),
            ),
            (
                "store",
                attend_lse_on(isa, qv, &layer, &params, sinks).unwrap(),
            ),
        ] {
            let what = format!("{isa:?} {src} {:?} {}", E::DTYPE, describe(c));
            let err = rel_err(&got, &want64);
            assert!(err < 1e-5, "{what}: err {err}");
            for (a, b) in lse.iter().zip(&want_lse) {
                assert!(
                    a == b || (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{what}: lse {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn simd_paths_match_the_scalar_path() {
    // Head dims of the families and odd ones (tails of 8 and 16 lanes), GQA groups that
    // leave row blocks of 1 to 3 (and 8 rows: the converted-tile path), key counts off the
    // tile size, windows, soft-capping, sinks; decode and short prefill.
    let mut rng = Rng::new(17);
    let mut cases = Vec::new();
    for (i, d) in [64, 128, 80, 96, 72, 100, 8].into_iter().enumerate() {
        for g in [1, 2, 3, 4, 5, 7, 8] {
            cases.push(Case {
                hkv: 1 + rng.below(2),
                g,
                d,
                lq: [1, 1, 1, 3, 17][rng.below(5)],
                past: [37, 1000, 1337, 2100][rng.below(4)],
                window: [None, None, Some(1), Some(100), Some(700)][rng.below(5)],
                softcap: ((i + g) % 3 == 0).then_some(30.0),
                sinks: (i + g) % 2 == 1,
            });
        }
    }
    with_threads(3, || {
        for (i, c) in cases.iter().enumerate() {
            compare_paths::<f32>(c, 300 + i as u64);
            compare_paths::<bf16>(c, 400 + i as u64);
            compare_paths::<f16>(c, 500 + i as u64);
        }
    });
}

#[test]
fn every_path_matches_the_reference() {
    // The instruction set chosen at run time is what `attend` uses; this checks the others
    // against the f64 reference too, on a decode that splits its keys.
    use crate::cpu::simd::Isa;
    let (hkv, g, d, lk) = (2, 4, 128, 3001);
    let hq = hkv * g;
    let mut rng = Rng::new(23);
    let round = |x: Vec<f32>| -> Vec<bf16> { x.into_iter().map(bf16::from_f32).collect() };
    let (q, k, v) = (
        round(rng.vec(hq * d, 2.0)),
        round(rng.vec(hkv * lk * d, 2.0)),
        round(rng.vec(hkv * lk * d, 1.0)),
    );
    let f64s = |x: &[bf16]| -> Vec<f64> { x.iter().map(|y| y.to_f32() as f64).collect() };
    let scale = 1.0 / (d as f32).sqrt();
    let want = reference(
        &f64s(&q),
        &f64s(&k),
        &f64s(&v),
        [hq, 1, d],
        hkv,
        lk,
        scale as f64,
        None,
        None,
        None,
    );
    let kv = DenseKv::new(
        View3::contiguous(&k, [hkv, lk, d]),
        View3::contiguous(&v, [hkv, lk, d]),
    )
    .unwrap();
    let p = Params {
        scale,
        softcap: None,
        window: None,
    };
    let qv = View3::contiguous(&q, [hq, 1, d]);
    for isa in Isa::ALL {
        let got = with_threads(4, || attend_lse_on(isa, qv, &kv, &p, None));
        if !isa.supported() {
            let e = got.unwrap_err().to_string();
            assert!(e.starts_with("isa: this CPU does not support"), "{e}");
            continue;
        }
        let err = rel_err(&got.unwrap().0, &want);
        assert!(err < 2e-5, "{isa:?}: err {err}");
    }
}

#[test]
fn into_buffers_matches_and_reused_scratch_leaves_no_trace() {
    // Calls of different shapes on the same threads reuse their scratch; each result must be
    // what a fresh call gives, bit for bit, and the `_into` form the same as the allocating.
    let mut rng = Rng::new(29);
    let mk = |rng: &mut Rng, hkv: usize, g: usize, lq: usize, lk: usize, d: usize| {
        (
            rng.vec(hkv * g * lq * d, 2.0),
            rng.vec(hkv * lk * d, 2.0),
            rng.vec(hkv * lk * d, 1.0),
        )
    };
    let shapes = [
        (2, 4, 1, 2000, 128),
        (1, 8, 40, 300, 64),
        (3, 2, 1, 777, 80),
    ];
    let data: Vec<_> = shapes
        .iter()
        .map(|&(hkv, g, lq, lk, d)| mk(&mut rng, hkv, g, lq, lk, d))
        .collect();
    let p = Params {
        scale: 0.1,
        softcap: Some(25.0),
        window: Some(500),
    };
    let call = |i: usize| {
        let (hkv, g, lq, lk, d) = shapes[i];
        let (q, k, v) = &data[i];
        let kv = DenseKv::new(
            View3::contiguous(k, [hkv, lk, d]),
            View3::contiguous(v, [hkv, lk, d]),
        )
        .unwrap();
        let qv = View3::contiguous(q, [hkv * g, lq, d]);
        let (o, l) = attend_lse(qv, &kv, &p, None).unwrap();
        let (mut o2, mut l2) = (vec![7f32; o.len()], vec![7f32; l.len()]);
        attend_lse_into(qv, &kv, &p, None, &mut o2, &mut l2).unwrap();
        assert_eq!((&o, &l), (&o2, &l2));
        let e = attend_lse_into(qv, &kv, &p, None, &mut o2[1..], &mut l2)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("out: holds"), "{e}");
        let e = attend_lse_into(qv, &kv, &p, None, &mut o2, &mut l2[1..])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("lse: holds"), "{e}");
        (o, l)
    };
    with_threads(2, || {
        let first: Vec<_> = (0..shapes.len()).map(call).collect();
        for i in [2, 0, 1, 0, 2, 1] {
            assert!(call(i) == first[i], "call {i} differs after other calls");
        }
    });
}

/// An int8 decode (few query rows: the kernels that read int8 rows in place) on every
/// instruction set this CPU runs, against the f64 reference over the dequantized cache, for
/// head dims each kernel takes (groups of 32 and 16, which AVX-512's `q8` kernels take, and
/// groups of 8 or fewer, which it leaves to the generic ones) and GQA groups that leave row
/// blocks of 1 to 3. The cache holds the values that need care: groups with a NaN or an
/// infinity (a NaN scale: the rows that see them must come out NaN where the reference
/// does, and only there), all-zero groups (a zero scale), and rows of large and of very
/// small magnitudes.
#[test]
fn int8_decode_on_every_set_matches_the_dequantized_reference() {
    use crate::cpu::simd::Isa;
    let mut rng = Rng::new(41);
    for d in [16, 48, 64, 80, 96, 128, 192, 256, 8, 72, 100] {
        for g in [1, 2, 3, 4, 5, 7] {
            let (hkv, lk) = (2, 150 + rng.below(200));
            let lq = if g < 4 { 2 } else { 1 };
            let hq = hkv * g;
            let q: Vec<bf16> = rng
                .vec(hq * lq * d, 2.0)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let mut k = rng.vec(hkv * lk * d, 2.0);
            let mut v = rng.vec(hkv * lk * d, 1.0);
            // Larger rows, not much larger: a peaked softmax or a few large outputs would
            // hide an error in the other keys.
            for (x, big) in [(&mut k, 3.0), (&mut v, 4.0)] {
                for row in x.chunks_exact_mut(d) {
                    match rng.below(20) {
                        0 => row.iter_mut().take(d.min(32)).for_each(|y| *y = 0.0),
                        1 => row.iter_mut().for_each(|y| *y *= big),
                        2 => row.iter_mut().for_each(|y| *y *= 1e-30),
                        _ => {}
                    }
                }
            }
            // A NaN and an infinity in head 0 only: in a value row (its group's columns of
            // head 0's outputs become NaN) and, for odd g, in a key row (all of them do).
            v[7 * d + d / 2] = f32::NAN;
            v[9 * d] = f32::INFINITY;
            if g % 2 == 1 {
                k[5 * d + 1] = f32::NAN;
            }
            let k: Vec<bf16> = k.into_iter().map(bf16::from_f32).collect();
            let v: Vec<bf16> = v.into_iter().map(bf16::from_f32).collect();
            let mut store = CpuStore::new(StoreConfig {
                num_layers: 1,
                num_kv_heads: hkv,
                head_dim: d,
                dtype: bf16::DTYPE,
                kv: crate::quant::KvFormat::Int8,
                block_size: 48,
                windows: vec![None],
                host_memory_limit: None,
            })
            .unwrap();
            append_in_two(&mut store, &k, &v, hkv, lk, d, lk / 3);
            let (mut kd, mut vd) = (vec![0f64; hkv * lk * d], vec![0f64; hkv * lk * d]);
            store
                .read::<bf16>(0, 0, lk, |h, i, kr, vr| {
                    let at = (h * lk + i) * d;
                    for j in 0..d {
                        kd[at + j] = kr[j] as f64;
                        vd[at + j] = vr[j] as f64;
                    }
                })
                .unwrap();
            let scale = 1.0 / (d as f32).sqrt();
            let q64: Vec<f64> = q.iter().map(|x| x.to_f32() as f64).collect();
            let want = reference(
                &q64,
                &kd,
                &vd,
                [hq, lq, d],
                hkv,
                lk,
                scale as f64,
                None,
                None,
                None,
            );
            let params = Params {
                scale,
                softcap: None,
                window: None,
            };
            let qv = View3::contiguous(&q, [hq, lq, d]);
            let layer = store.view::<bf16>(0).unwrap();
            let top = want
                .iter()
                .filter(|x| !x.is_nan())
                .fold(0f64, |a, b| a.max(b.abs()));
            for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let (got, _) =
                    with_threads(2, || attend_lse_on(isa, qv, &layer, &params, None)).unwrap();
                for (i, (&x, &w)) in got.iter().zip(&want).enumerate() {
                    let what = format!("{isa:?} d={d} g={g} lk={lk} output {i}");
                    assert_eq!(x.is_nan(), w.is_nan(), "{what}: {x} vs {w}");
                    if !w.is_nan() {
                        assert!((x as f64 - w).abs() <= 2e-5 * top, "{what}: {x} vs {w}");
                    }
                }
            }
        }
    }
}
