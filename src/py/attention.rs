//! `attention(query, key, value, out, ...)`: the op over explicit tensors (no store).

use super::errors::IntoPyResult;
use super::tensor::{stream_arg, TensorArg};
use crate::cpu::attention::{attend, DenseKv, Params};
use crate::cuda::kernels::KvSrc;
use crate::error::Error;
use crate::store::attn_args;
use crate::tensor::{Device, Tensor3};
use crate::with_element;
use pyo3::prelude::*;

/// Validates `out` against `query` and writes the CPU op's result into it.
pub fn finish_out(py: Python<'_>, query: &Tensor3, out: &TensorArg, rows: &[f32]) -> PyResult<()> {
    let o = &out.t;
    o.expect_dtype("out", query.dtype).py_err(py)?;
    // SAFETY: `out` was validated writable, on the CPU and not overlapping `query`, its
    // capsule is alive for this call, and the GIL is held, so no Python code writes it.
    with_element!(o.dtype, E => unsafe { o.write_rows::<E>(rows) });
    Ok(())
}

/// Checks `out` before any work: same shape, dtype and device as `query`, not overlapping
/// any input.
pub fn check_out(
    py: Python<'_>,
    query: &Tensor3,
    inputs: &[&Tensor3],
    out: &Tensor3,
) -> PyResult<()> {
    let [h, l, d] = query.shape;
    out.expect_shape(
        "out",
        "[num_q_heads, q_len, head_dim]",
        [Some(h), Some(l), Some(d)],
    )
    .py_err(py)?;
    out.expect_dtype("out", query.dtype).py_err(py)?;
    out.expect_device("out", query.device).py_err(py)?;
    if inputs.iter().any(|t| t.overlaps(out)) {
        return Err(Error::value("out", "must not share memory with the inputs")).py_err(py);
    }
    Ok(())
}

/// Attention over explicit key/value tensors; writes `out`. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (query, key, value, out, scale, softcap=None, window=None, stream=None))]
#[allow(clippy::too_many_arguments)]
pub fn attention(
    py: Python<'_>,
    query: &Bound<'_, PyAny>,
    key: &Bound<'_, PyAny>,
    value: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    stream: Option<usize>,
) -> PyResult<()> {
    let s = stream_arg(stream);
    let q = TensorArg::import(query, "query", false, s)?;
    let k = TensorArg::import(key, "key", false, s)?;
    let v = TensorArg::import(value, "value", false, s)?;
    let o = TensorArg::import(out, "out", true, s)?;
    for (arg, t) in [("key", &k.t), ("value", &v.t)] {
        t.expect_dtype(arg, q.t.dtype).py_err(py)?;
        t.expect_device(arg, q.t.device).py_err(py)?;
    }
    check_out(py, &q.t, &[&q.t, &k.t, &v.t], &o.t)?;
    let params = Params {
        scale,
        softcap,
        window,
    };
    let (qt, kt, vt) = (q.t, k.t, v.t);
    if let Device::Cuda(ordinal) = qt.device {
        if kt.shape != vt.shape {
            return Err(Error::value(
                "value",
                format!("shape {:?} differs from key's {:?}", vt.shape, kt.shape),
            ))
            .py_err(py);
        }
        let (kd, vd) = (
            kt.cuda_view("key").py_err(py)?,
            vt.cuda_view("value").py_err(py)?,
        );
        if kd.s0 != vd.s0 || kd.s1 != vd.s1 || kt.shape[2] != qt.shape[2] {
            return Err(Error::value(
                "value",
                "must have key's strides, and key the query's head_dim",
            ))
            .py_err(py);
        }
        let args = attn_args(
            qt.shape[0],
            qt.shape[1],
            kt.shape[0],
            kt.shape[1],
            0,
            &params,
        )
        .py_err(py)?;
        let (qd, od) = (
            qt.cuda_view("query").py_err(py)?,
            o.t.cuda_view("out").py_err(py)?,
        );
        let gpu = crate::cuda::gpu(ordinal).py_err(py)?;
        let kernels = gpu.kernels(qt.dtype, qt.shape[2]).py_err(py)?;
        let src = KvSrc {
            table: 0,
            max_blocks: 0,
            block_size: 0,
            k: kd.ptr,
            v: vd.ptr,
            s0: kd.s0,
            s1: kd.s1,
        };
        gpu.bind().py_err(py)?;
        if qt.shape[1] == 0 {
            return Ok(());
        }
        // SAFETY: all four tensors were validated as CUDA tensors of these shapes; their
        // capsules live until the call returns and torch keeps the memory until the stream
        // has run the kernels (the caller holds the tensors).
        return unsafe { kernels.attend(s, qd, src, &args, od) }.py_err(py);
    }
    let rows = py
        .detach(|| {
            with_element!(qt.dtype, E => {
                // SAFETY: the three capsules stay alive in this frame until the call returns,
                // and nothing writes the inputs meanwhile (`out` does not overlap them).
                let (qv, kv, vv) = unsafe { (qt.view::<E>(), kt.view::<E>(), vt.view::<E>()) };
                attend(qv, &DenseKv::new(kv, vv)?, &params)
            })
        })
        .py_err(py)?;
    finish_out(py, &q.t, &o, &rows)
}
