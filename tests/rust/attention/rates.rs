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
        for format in [KvFormat::Exact, KvFormat::Int8] {
            let t = Instant::now();
            let r = measure_cpu::<bf16>(format, 128, 4, 8 << 20, 0.05, Some(&pool)).unwrap();
            assert!(t.elapsed().as_secs_f64() < 5.0, "{format:?}");
            assert!(
                r.bytes_per_s.is_finite() && r.bytes_per_s > 1e6,
                "{format:?} {r:?}"
            );
            assert!(
                r.fixed_s >= HANDOFF_LATENCY && r.fixed_s < 1.0,
                "{format:?} {r:?}"
            );
        }
    }
    let r = measure_cpu::<f32>(KvFormat::Exact, 64, 1, 1 << 20, 0.0, None).unwrap();
    assert!(r.bytes_per_s.is_finite() && r.bytes_per_s > 0.0, "{r:?}");
}

#[test]
fn the_int8_probe_runs_the_int8_path_of_every_shape() {
    // f32 and f16 inputs quantized alike; a head size whose groups are smaller than 32; a
    // group of 8 query heads, at which the kernel dequantizes whole tiles (prefill's path).
    for (head_dim, group) in [(128, 1), (80, 4), (64, 8)] {
        for r in [
            measure_cpu::<f32>(KvFormat::Int8, head_dim, group, 1 << 20, 0.0, None),
            measure_cpu::<half::f16>(KvFormat::Int8, head_dim, group, 1 << 20, 0.0, None),
        ] {
            let r = r.unwrap();
            assert!(r.bytes_per_s.is_finite() && r.bytes_per_s > 0.0, "{r:?}");
            assert!(
                r.fixed_s.is_finite() && r.fixed_s >= HANDOFF_LATENCY,
                "{r:?}"
            );
        }
    }
}

#[test]
fn the_int8_probe_holds_rows_of_the_store_format() {
    let fmt = Q8::new(128);
    let rows = quantized::<bf16>(fmt, 3 * PATTERN_ROWS + 5).unwrap();
    assert_eq!(rows.len(), (3 * PATTERN_ROWS + 5) * fmt.row_bytes());
    let all = Q8Rows {
        data: &rows,
        len: 3 * PATTERN_ROWS + 5,
        fmt,
    };
    // Every row dequantizes to finite values, not all zero, and the pattern repeats.
    let mut x = vec![0f32; 128];
    for i in 0..all.len {
        fmt.dequantize(all.row(i), &mut x);
        assert!(
            x.iter().all(|v| v.is_finite()) && x.iter().any(|&v| v != 0.0),
            "row {i}"
        );
    }
    assert_eq!(all.row(1), all.row(PATTERN_ROWS + 1));
    assert_ne!(all.row(1), all.row(2));
    // The source's segments are the int8 rows of their head.
    let kv = Q8Kv {
        k: &rows[..2 * 8 * fmt.row_bytes()],
        v: &rows[..2 * 8 * fmt.row_bytes()],
        heads: 2,
        len: 8,
        fmt,
    };
    let seg = KvSource::<bf16>::next_segment(&kv, 1, 3, 100).unwrap();
    assert_eq!((seg.pos, seg.len()), (3, 5));
    match seg.k {
        KvRows::Int8(r) => assert_eq!(r.row(0), all.row(8 + 3)),
        KvRows::Plain(_) => panic!("an int8 probe's rows are int8"),
    }
    assert!(KvSource::<bf16>::next_segment(&kv, 0, 8, 100).is_none());
}

#[test]
fn the_rate_counts_stored_bytes() {
    // 256 MiB of bf16 keys and values at head_dim 128: 512 bytes a token and head; of int8
    // rows, 2 x 136 (128 values, 4 bf16 scales): the int8 probe holds more tokens in the same
    // bytes, and its rate counts the bytes the int8 store holds, not bf16's.
    let mib = 1 << 20;
    assert_eq!(
        probe_size(KvFormat::Exact, 128, DType::BF16, 256 * mib),
        (65536, 256 * mib)
    );
    let (tokens, stored) = probe_size(KvFormat::Int8, 128, DType::BF16, 256 * mib);
    assert_eq!(tokens, 256 * mib / (PROBE_HEADS * 2 * 136));
    assert_eq!(stored, PROBE_HEADS * tokens * 2 * 136);
    assert!(256 * mib - stored < PROBE_HEADS * 2 * 136);
    // The format's rows, not the element's size: f32 and bf16 give the same int8 rows.
    assert_eq!(
        probe_size(KvFormat::Int8, 128, DType::F32, 256 * mib),
        (tokens, stored)
    );
    assert_eq!(
        probe_size(KvFormat::Int8, 64, DType::F16, 1),
        (1, PROBE_HEADS * 2 * 72)
    );
}

#[test]
fn the_cpu_probe_checks_its_arguments() {
    let e = measure_cpu::<f32>(KvFormat::Exact, 0, 1, 1 << 20, 0.0, None).unwrap_err();
    assert!(e.to_string().starts_with("head_dim: "), "{e}");
    assert!(measure_cpu::<f32>(KvFormat::Exact, 64, 0, 1 << 20, 0.0, None).is_err());
    assert!(measure_cpu::<f32>(KvFormat::Int8, 0, 1, 1 << 20, 0.0, None).is_err());
}

#[test]
fn the_probe_entry_takes_the_stores_kv_dtype() {
    let probe = |kv_dtype| measure_cpu_as(DType::BF16, kv_dtype, 64, 2, 1 << 20, 0.0, None, None);
    for kv_dtype in [None, Some("bfloat16"), Some("int8")] {
        let r = probe(kv_dtype).unwrap();
        assert!(
            r.bytes_per_s.is_finite() && r.bytes_per_s > 0.0,
            "{kv_dtype:?} {r:?}"
        );
    }
    for bad in ["int4", "float16", "INT8", ""] {
        let e = probe(Some(bad)).unwrap_err();
        assert!(matches!(e, Error::Value { .. }), "{e:?}");
        assert!(e.to_string().starts_with("kv_dtype: "), "{e}");
        assert!(e.to_string().contains("int8"), "{e}");
    }
    // A bad kv_dtype is refused before the copy engine is touched (no GPU needed to see it).
    let e = measure_cpu_as(DType::F32, Some("q4"), 64, 2, 1 << 20, 0.0, None, Some(0));
    assert!(e.unwrap_err().to_string().starts_with("kv_dtype: "));
}
