//! Helpers shared by the Rust unit tests: a seeded generator, a naive f64 attention, and the
//! bytes a piece's staging copies move.

/// xorshift64*: deterministic, dependency-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// Naive attention in f64: q `[hq, lq, d]`, k and v `[hkv, lk, d]`, all row-major.
/// Query i sits at position `lk - lq + i`. `sinks` (`[hq]`): gpt-oss's extra logit per head
/// in every softmax, with no value (as transformers' eager attention: concatenated to the
/// scores, softmaxed, dropped).
#[allow(clippy::too_many_arguments)]
pub fn reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    [hq, lq, d]: [usize; 3],
    hkv: usize,
    lk: usize,
    scale: f64,
    softcap: Option<f64>,
    window: Option<usize>,
    sinks: Option<&[f64]>,
) -> Vec<f64> {
    let g = hq / hkv;
    let mut out = vec![0f64; hq * lq * d];
    for h in 0..hq {
        let kh = h / g;
        for i in 0..lq {
            let pos = lk - lq + i;
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let qi = &q[(h * lq + i) * d..][..d];
            let scores: Vec<f64> = (lo..=pos)
                .map(|j| {
                    let kj = &k[(kh * lk + j) * d..][..d];
                    let s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale;
                    softcap.map_or(s, |c| c * (s / c).tanh())
                })
                .collect();
            let sink = sinks.map_or(f64::NEG_INFINITY, |s| s[h]);
            let m = scores.iter().cloned().fold(sink, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum::<f64>() + (sink - m).exp();
            let o = &mut out[(h * lq + i) * d..][..d];
            for (j, wj) in (lo..=pos).zip(&w) {
                let vj = &v[(kh * lk + j) * d..][..d];
                for (x, y) in o.iter_mut().zip(vj) {
                    *x += wj / z * y;
                }
            }
        }
    }
    out
}

/// Largest absolute difference over the largest absolute reference value.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |a, b| a.max(b.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |a, (g, w)| a.max((*g as f64 - w).abs()))
        / scale
}

/// Every byte `copies` write, with the source byte it comes from, sorted.
pub fn copied(copies: &[crate::cuda::ring::Copy]) -> Vec<(usize, u64)> {
    let mut m: Vec<(usize, u64)> = copies
        .iter()
        .flat_map(|c| (0..c.bytes).map(move |i| (c.offset + i, c.src + i as u64)))
        .collect();
    m.sort();
    m
}

/// The same for what `piece`'s units ask for (`rb` bytes a row): keys then values, row by row.
pub fn wanted(
    piece: &crate::store::staging::Piece,
    spans: &[crate::store::view::StagedSpan],
    rb: usize,
) -> Vec<(usize, u64)> {
    let mut m = Vec::new();
    for u in &piece.units {
        let s = &spans[u.span.block];
        let n = u.span.n * rb;
        for i in 0..n {
            m.push((u.offset + i, s.k + (u.span.row * rb + i) as u64));
            m.push((u.offset + n + i, s.v + (u.span.row * rb + i) as u64));
        }
    }
    m.sort();
    m
}
