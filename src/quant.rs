//! The 8-bit KV format (opt-in): what one token's key or value row of one kv head becomes.
//!
//! Symmetric int8 with one scale per group of `group = gcd(head_dim, 32)` values, computed at
//! append, so a group follows its own outliers with no calibration pass (llama.cpp's q8_0
//! does the same with groups of 32). A row is `row_bytes()` bytes:
//! `[head_dim]` int8 values, then `[groups]` bf16 scales (little-endian), then zeros up to a
//! multiple of 8 bytes (so the GPU's lanes load their values aligned).
//!
//! The scale is `amax / 127` rounded *up* to bf16, and the values are quantized with that
//! rounded scale: every value then lies within half a step (`scale / 2`) of its dequantized
//! value `q * scale`, and bf16 keeps f32's range (no overflow for f32 inputs). A group with a
//! NaN or an infinity gets a NaN scale, so it dequantizes to NaN, as exact attention would
//! propagate it. `kernels/attention.cu` implements the same arithmetic bit for bit.

use crate::error::{Error, Result};
use crate::tensor::{DType, Element};

/// How a store holds keys and values: as given (exact, the default), or in the int8 format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvFormat {
    #[default]
    Exact,
    Int8,
}

impl KvFormat {
    /// Bytes of one token's key (or value) row of one kv head of `head_dim` values of `dtype`.
    pub fn row_bytes(self, head_dim: usize, dtype: DType) -> usize {
        match self {
            KvFormat::Exact => head_dim * dtype.size(),
            KvFormat::Int8 => Q8::new(head_dim).row_bytes(),
        }
    }

    /// The format a user's `kv_dtype` (argument `arg`) names for a store of `dtype`: `None` or
    /// that dtype's name is exact, "int8" the 8-bit format.
    pub fn parse(arg: &str, kv_dtype: Option<&str>, dtype: DType) -> Result<Self> {
        match kv_dtype {
            None => Ok(KvFormat::Exact),
            Some("int8") => Ok(KvFormat::Int8),
            Some(name) if name == dtype.name() => Ok(KvFormat::Exact),
            Some(name) => Err(Error::value(
                arg,
                format!(
                    "{name:?} is not a KV format: use None (exact, the store's {}) or \"int8\"",
                    dtype.name()
                ),
            )),
        }
    }

    /// The name users pass (`kv_dtype`): "int8", or the store's dtype name for exact.
    pub fn name(self, dtype: DType) -> &'static str {
        match self {
            KvFormat::Exact => dtype.name(),
            KvFormat::Int8 => "int8",
        }
    }
}

/// Most values sharing one scale.
pub const MAX_GROUP: usize = 32;

/// The bf16 bits of a NaN scale.
const NAN_SCALE: u16 = 0x7fc0;

/// The int8 row layout for one head dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Q8 {
    pub head_dim: usize,
    /// Values per scale: `gcd(head_dim, MAX_GROUP)`.
    pub group: usize,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `amax / 127`, rounded up to bf16, as bf16 bits (`amax` finite and positive).
#[inline(always)]
fn scale_bits(amax: f32) -> u16 {
    let bits = (amax / 127.0).to_bits();
    // Rounding up (away from zero: the value is positive) keeps |x| / scale <= 127.
    let up = if bits & 0xffff != 0 {
        bits + 0x1_0000
    } else {
        bits
    };
    (up >> 16) as u16
}

#[inline(always)]
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

impl Q8 {
    /// The layout of rows of `head_dim` values (`head_dim >= 1`).
    pub fn new(head_dim: usize) -> Self {
        assert!(head_dim > 0, "head_dim must be at least 1");
        Q8 {
            head_dim,
            group: gcd(head_dim, MAX_GROUP),
        }
    }

    /// Scales per row.
    pub fn groups(&self) -> usize {
        self.head_dim / self.group
    }

    /// Bytes of one row: the values, the scales, padding to a multiple of 8.
    pub fn row_bytes(&self) -> usize {
        (self.head_dim + 2 * self.groups()).div_ceil(8) * 8
    }

    /// Quantizes `x` (`[head_dim]`) into `out` (`[row_bytes]`).
    #[inline(always)]
    pub fn quantize<E: Element>(&self, x: &[E], out: &mut [u8]) {
        let (d, g) = (self.head_dim, self.group);
        assert!(x.len() == d && out.len() == self.row_bytes());
        let (vals, rest) = out.split_at_mut(d);
        let (scales, pad) = rest.split_at_mut(2 * self.groups());
        pad.fill(0);
        for (gi, (xs, qs)) in x.chunks_exact(g).zip(vals.chunks_exact_mut(g)).enumerate() {
            let mut amax = 0f32;
            let mut finite = true;
            for &v in xs {
                let f = v.to_f32();
                finite &= f.is_finite();
                amax = amax.max(f.abs());
            }
            let bits = if !finite {
                NAN_SCALE
            } else if amax == 0.0 {
                0
            } else {
                scale_bits(amax)
            };
            scales[2 * gi..2 * gi + 2].copy_from_slice(&bits.to_le_bytes());
            let s = bf16_to_f32(bits);
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = if bits == 0 || bits == NAN_SCALE {
                    0
                } else {
                    // `round_ties_even`: rint, as the GPU's `__float2int_rn`.
                    (v.to_f32() / s).round_ties_even().clamp(-127.0, 127.0) as i8 as u8
                };
            }
        }
    }

    /// The scale of group `gi` of `row`.
    #[inline(always)]
    pub fn scale(&self, row: &[u8], gi: usize) -> f32 {
        let at = self.head_dim + 2 * gi;
        bf16_to_f32(u16::from_le_bytes([row[at], row[at + 1]]))
    }

    /// Dequantizes `row` (`[row_bytes]`) into `out` (`[head_dim]`): `q * scale`.
    #[inline(always)]
    pub fn dequantize(&self, row: &[u8], out: &mut [f32]) {
        let (d, g) = (self.head_dim, self.group);
        assert!(row.len() >= self.row_bytes() && out.len() == d);
        for (gi, (qs, o)) in row[..d]
            .chunks_exact(g)
            .zip(out.chunks_exact_mut(g))
            .enumerate()
        {
            let s = self.scale(row, gi);
            for (y, &q) in o.iter_mut().zip(qs) {
                *y = (q as i8) as f32 * s;
            }
        }
    }
}

/// `len` rows of the int8 format, `row_bytes` apart: keys or values of consecutive positions.
#[derive(Clone, Copy)]
pub struct Q8Rows<'a> {
    pub data: &'a [u8],
    pub len: usize,
    pub fmt: Q8,
}

impl<'a> Q8Rows<'a> {
    /// Row `i`'s bytes.
    #[inline(always)]
    pub fn row(&self, i: usize) -> &'a [u8] {
        let rb = self.fmt.row_bytes();
        &self.data[i * rb..(i + 1) * rb]
    }

    /// Rows `a..b`.
    pub fn slice(&self, a: usize, b: usize) -> Q8Rows<'a> {
        debug_assert!(a <= b && b <= self.len);
        let rb = self.fmt.row_bytes();
        Q8Rows {
            data: &self.data[a * rb..b * rb],
            len: b - a,
            fmt: self.fmt,
        }
    }

    /// Rows `0..n` dequantized into `out` (`[n, head_dim]` f32).
    #[inline(always)]
    pub fn dequantize(&self, n: usize, out: &mut [f32]) {
        let d = self.fmt.head_dim;
        for (i, o) in out[..n * d].chunks_exact_mut(d).enumerate() {
            self.fmt.dequantize(self.row(i), o);
        }
    }
}

#[cfg(test)]
#[path = "../tests/rust/quant.rs"]
mod tests;
