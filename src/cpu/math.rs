//! Vectorisable elementwise math over fixed-size f32 tiles.
//!
//! `f32::exp` is a libm call per element, far too slow for attention on the CPU; these are
//! written as plain arithmetic on arrays so the compiler turns them into SIMD.

/// Width of a key tile: scores are computed and exponentiated this many at a time.
pub const TK: usize = 64;

/// `x.exp()` for every element, within 2 ulp for inputs above -87 (Cephes' expf).
/// Inputs below -87.3 return a value below 1e-38; callers zero masked entries themselves.
#[inline(always)]
pub fn exp_tile(x: &mut [f32; TK]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    for v in x.iter_mut() {
        let xv = v.clamp(-87.3, 88.7);
        let t = xv * LOG2E + MAGIC;
        let n = t - MAGIC;
        let ni = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
        let r = xv - n * C1 - n * C2;
        let mut y = 1.987_569_1e-4_f32;
        y = y * r + 1.398_2e-3;
        y = y * r + 8.333_452e-3;
        y = y * r + 4.166_579_6e-2;
        y = y * r + 1.666_666_5e-1;
        y = y * r + 0.5;
        y = y * r * r + r + 1.0;
        let scale = f32::from_bits(((ni + 127) as u32) << 23);
        *v = y * scale;
    }
}

/// `cap * tanh(x / cap)` for every element (Gemma-2's logit soft-capping).
#[inline(always)]
pub fn softcap_tile(x: &mut [f32; TK], cap: f32) {
    let mut e = [0f32; TK];
    for (e, &v) in e.iter_mut().zip(x.iter()) {
        // tanh(y) = 1 - 2 / (exp(2y) + 1); exact at both saturated ends.
        *e = 2.0 * v / cap;
    }
    exp_tile(&mut e);
    for (v, &e) in x.iter_mut().zip(e.iter()) {
        *v = cap * (1.0 - 2.0 / (e + 1.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        for k in 0..200 {
            let mut x = [0f32; TK];
            for (j, v) in x.iter_mut().enumerate() {
                *v = -87.0 + (k * TK + j) as f32 * (87.0 + 88.0) / (200.0 * TK as f32);
            }
            let want = x.map(|v| (v as f64).exp());
            exp_tile(&mut x);
            for j in 0..TK {
                worst = worst.max(((x[j] as f64 - want[j]) / want[j]).abs());
            }
        }
        assert!(worst < 3e-7, "relative error {worst}");
    }

    #[test]
    fn softcap_matches_tanh() {
        let mut x = [0f32; TK];
        for (j, v) in x.iter_mut().enumerate() {
            *v = (j as f32 - 32.0) * 3.7;
        }
        let want = x.map(|v| 50.0 * (v as f64 / 50.0).tanh());
        softcap_tile(&mut x, 50.0);
        for j in 0..TK {
            assert!(
                (x[j] as f64 - want[j]).abs() < 1e-5 * 50.0,
                "{j}: {} vs {}",
                x[j],
                want[j]
            );
        }
    }
}
