//! The int8 row format against a float64 reference.

use super::*;
use crate::test_common::Rng;
use half::{bf16, f16};

/// Quantizes `x` as `E`, dequantizes, and checks every value against the f64 reference of
/// the same arithmetic: within half a step of its group's scale, the scale at most one bf16
/// ulp above `amax / 127`.
fn round_trip<E: Element>(fmt: Q8, x: &[f32]) {
    let xe: Vec<E> = x.iter().map(|&v| E::from_f32(v)).collect();
    let mut row = vec![0xAAu8; fmt.row_bytes()];
    fmt.quantize(&xe, &mut row);
    let mut back = vec![0f32; fmt.head_dim];
    fmt.dequantize(&row, &mut back);
    for (gi, (xs, ys)) in xe.chunks(fmt.group).zip(back.chunks(fmt.group)).enumerate() {
        let amax = xs
            .iter()
            .map(|v| (v.to_f32() as f64).abs())
            .fold(0f64, f64::max);
        let s = fmt.scale(&row, gi) as f64;
        if amax == 0.0 {
            assert_eq!(s, 0.0);
            assert!(ys.iter().all(|&y| y == 0.0));
            continue;
        }
        assert!(s >= amax / 127.0 * (1.0 - 1e-7), "scale {s} below amax/127");
        assert!(
            s <= amax / 127.0 * (1.0 + 2f64.powi(-7)),
            "scale {s} too far above"
        );
        for (&v, &y) in xs.iter().zip(ys) {
            let err = (v.to_f32() as f64 - y as f64).abs();
            assert!(
                err <= s / 2.0 * (1.0 + 1e-6),
                "{} -> {y}: error {err} > {}",
                v.to_f32(),
                s / 2.0
            );
        }
    }
    // The padding is zero, whatever the buffer held.
    let used = fmt.head_dim + 2 * fmt.groups();
    assert!(row[used..].iter().all(|&b| b == 0));
}

#[test]
fn layout_of_common_head_dims() {
    for (d, group, bytes) in [
        (128, 32, 136),
        (64, 32, 72),
        (256, 32, 272),
        (80, 16, 96),
        (96, 32, 104),
        (8, 8, 16),
        (3, 1, 16),
    ] {
        let q = Q8::new(d);
        assert_eq!((q.group, q.row_bytes()), (group, bytes), "head_dim {d}");
        assert!(q.group <= MAX_GROUP && d % q.group == 0);
        assert_eq!(q.row_bytes() % 8, 0);
    }
}

#[test]
fn round_trip_within_half_a_step_for_every_dtype() {
    let mut rng = Rng::new(7);
    for d in [128, 64, 80, 3, 8] {
        let fmt = Q8::new(d);
        for scale in [1.0, 1e-3, 300.0, 1e-30] {
            let x = rng.vec(d, scale);
            round_trip::<f32>(fmt, &x);
            round_trip::<bf16>(fmt, &x);
            if scale < 6e4 {
                round_trip::<f16>(fmt, &x);
            }
        }
    }
}

#[test]
fn zero_vectors_and_zero_groups() {
    let fmt = Q8::new(128);
    round_trip::<f32>(fmt, &[0.0; 128]);
    let mut x = vec![0.0; 128];
    x[40] = -2.5; // one group with a value, three without
    round_trip::<bf16>(fmt, &x);
    let mut row = vec![0u8; fmt.row_bytes()];
    fmt.quantize(&x, &mut row);
    // The scale was rounded up to bf16 (at most 2^-7 above amax / 127): -126 or -127.
    assert!((row[40] as i8) <= -126);
}

#[test]
fn an_outlier_costs_only_its_group() {
    let mut rng = Rng::new(3);
    let fmt = Q8::new(128);
    let mut x = rng.vec(128, 0.01);
    x[5] = 1000.0;
    let mut row = vec![0u8; fmt.row_bytes()];
    fmt.quantize(&x, &mut row);
    let mut back = vec![0f32; 128];
    fmt.dequantize(&row, &mut back);
    // Groups 1..4 keep their own small scales: error well under 1% of their values' range.
    for i in 32..128 {
        assert!((x[i] - back[i]).abs() <= 0.01 / 127.0, "value {i}");
    }
    round_trip::<f32>(fmt, &x);
}

#[test]
fn extremes_of_f32_keep_their_range() {
    let fmt = Q8::new(32);
    let mut x = vec![1.0f32; 32];
    x[0] = f32::MAX;
    x[1] = -3e38;
    round_trip::<f32>(fmt, &x);
    let tiny: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 1e-40).collect();
    let mut row = vec![0u8; fmt.row_bytes()];
    fmt.quantize(&tiny, &mut row);
    let mut back = vec![0f32; 32];
    fmt.dequantize(&row, &mut back);
    for (a, b) in tiny.iter().zip(&back) {
        assert!((a - b).abs() <= 1e-40, "{a} -> {b}");
    }
}

#[test]
fn non_finite_values_poison_their_group_only() {
    let fmt = Q8::new(64);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![0.5f32; 64];
        x[3] = bad;
        let mut row = vec![0u8; fmt.row_bytes()];
        fmt.quantize(&x, &mut row);
        let mut back = vec![0f32; 64];
        fmt.dequantize(&row, &mut back);
        assert!(back[..32].iter().all(|y| y.is_nan()), "{bad}");
        assert!(
            back[32..].iter().all(|&y| (y - 0.5).abs() <= 0.5 / 254.0),
            "{bad}"
        );
    }
}

#[test]
fn rows_slice_and_dequantize_in_order() {
    let mut rng = Rng::new(11);
    let fmt = Q8::new(64);
    let rb = fmt.row_bytes();
    let x = rng.vec(5 * 64, 2.0);
    let mut data = vec![0u8; 5 * rb];
    for i in 0..5 {
        fmt.quantize(&x[i * 64..(i + 1) * 64], &mut data[i * rb..(i + 1) * rb]);
    }
    let rows = Q8Rows {
        data: &data,
        len: 5,
        fmt,
    };
    let part = rows.slice(2, 4);
    let mut out = vec![0f32; 2 * 64];
    part.dequantize(2, &mut out);
    let mut want = vec![0f32; 64];
    fmt.dequantize(rows.row(3), &mut want);
    assert_eq!(&out[64..], &want[..]);
}
