//! The attention parameters and their checks, in one place: what the model's arithmetic is
//! (`Params`), whether a call's shapes make sense (`check_shapes`), and the launch the GPU
//! kernels take (`launch`).

use crate::cuda::kernels::AttendLaunch;
use crate::error::{Error, Result};

/// The model's attention arithmetic.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Multiplies `q . k` (usually `head_dim ** -0.5`).
    pub scale: f32,
    /// Logit soft-capping: `cap * tanh(score / cap)` (Gemma-2).
    pub softcap: Option<f32>,
    /// Sliding window: query at position `p` sees keys `j` with `p - j < window`.
    pub window: Option<usize>,
}

/// Checks one attention call: `hq` query heads of `lq` queries over the keys `start..len`
/// of `hkv` kv heads. Shared by the CPU op and the GPU kernels.
pub fn check_shapes(
    hq: usize,
    lq: usize,
    hkv: usize,
    len: usize,
    start: usize,
    params: &Params,
) -> Result<()> {
    if hkv == 0 || !hq.is_multiple_of(hkv) {
        return Err(Error::value(
            "query",
            format!("{hq} query heads is not a multiple of the {hkv} kv heads"),
        ));
    }
    if lq > len {
        return Err(Error::value(
            "query",
            format!(
                "{lq} queries but only {len} keys: the queries' own keys must be appended first"
            ),
        ));
    }
    if !(params.scale.is_finite()) {
        return Err(Error::value(
            "scale",
            format!("must be finite, got {}", params.scale),
        ));
    }
    if let Some(c) = params.softcap {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::value(
                "softcap",
                format!("must be positive, got {c}"),
            ));
        }
    }
    if params.window == Some(0) {
        return Err(Error::value("window", "must be at least 1"));
    }
    let first_pos = len - lq;
    let need = params
        .window
        .map_or(0, |w| (first_pos + 1).saturating_sub(w));
    if start > need {
        return Err(Error::value(
            "window",
            format!(
                "the query at position {first_pos} needs keys from {need}, but positions below \
                 {start} were dropped (window {:?})",
                params.window
            ),
        ));
    }
    Ok(())
}

/// Checks the sink logits of a call against its `num_q_heads` query heads.
pub fn check_sinks(sinks: Option<&[f32]>, num_q_heads: usize) -> Result<()> {
    match sinks {
        Some(s) if s.len() != num_q_heads => Err(Error::value(
            "sinks",
            format!(
                "expected one sink logit per query head ({num_q_heads}), got {}",
                s.len()
            ),
        )),
        _ => Ok(()),
    }
}

/// Validates one GPU launch and works out the first key any query reads. `sinks` is the
/// device address of the learned sink logits (`[num_q_heads]` f32, gpt-oss), if any: one
/// extra logit per row that joins each softmax's denominator, folded in once, by the final
/// merge.
pub fn launch(
    num_q_heads: usize,
    q_len: usize,
    num_kv_heads: usize,
    len: usize,
    start: usize,
    params: &Params,
    sinks: Option<u64>,
) -> Result<AttendLaunch> {
    check_shapes(num_q_heads, q_len, num_kv_heads, len, start, params)?;
    let first = len - q_len;
    let lo = params
        .window
        .map_or(0, |w| (first + 1).saturating_sub(w))
        .max(start);
    Ok(AttendLaunch {
        q_len,
        seq_len: len,
        lo,
        group: num_q_heads / num_kv_heads,
        num_kv_heads,
        scale: params.scale,
        softcap: params.softcap,
        window: params.window,
        sinks: sinks.unwrap_or(0),
    })
}
