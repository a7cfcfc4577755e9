//! `attention(query, key, value, out, ...)`: the op over explicit tensors (no store).

use super::errors::IntoPyResult;
use super::stream::{device_of, resolve};
use super::tensor::{Sinks, TensorArg};
use crate::attention::args::Params;
use crate::attention::cpu::{attend, DenseKv};
use crate::attention::cuda::{attend_dense, DenseDev};
use crate::error::Error;
use crate::tensor::{same_device, Device, Tensor3};
use crate::with_element;
use pyo3::prelude::*;

/// Validates `out` against `query` and writes the CPU op's result into it.
pub fn finish_out(py: Python<'_>, query: &Tensor3, out: &TensorArg, rows: &[f32]) -> PyResult<()> {
    let o = &out.t;
    o.expect_dtype("out", query.dtype).py_err(py)?;
    // SAFETY: `out` was validated writable, on the CPU and not overlapping `query`, and its
    // capsule and storage are held for this call, so its bytes stay allocated (short of
    // another thread growing it in place, a data race in torch: see `TensorArg`).
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
    same_device("out", out, query.device).py_err(py)?;
    if inputs.iter().any(|t| t.overlaps(out)) {
        return Err(Error::value("out", "must not share memory with the inputs")).py_err(py);
    }
    Ok(())
}

/// Attention over explicit key/value tensors; writes `out`. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (query, key, value, out, scale, softcap=None, window=None, stream=None, sinks=None))]
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
    sinks: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let s = resolve(py, stream, device_of(query))?;
    let q = TensorArg::import(query, "query", false, s)?;
    let k = TensorArg::import(key, "key", false, s)?;
    let v = TensorArg::import(value, "value", false, s)?;
    let o = TensorArg::import(out, "out", true, s)?;
    let sinks = Sinks::import(sinks, q.t.shape[0], q.t.device, s)?;
    for (arg, t) in [("key", &k.t), ("value", &v.t)] {
        t.expect_dtype(arg, q.t.dtype).py_err(py)?;
        same_device(arg, t, q.t.device).py_err(py)?;
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
        if kt.shape[2] != qt.shape[2] {
            return Err(Error::value(
                "key",
                format!("head_dim is {}, the query's {}", kt.shape[2], qt.shape[2]),
            ))
            .py_err(py);
        }
        let kv = DenseDev {
            k: kt.cuda_view("key").py_err(py)?,
            v: vt.cuda_view("value").py_err(py)?,
            num_kv_heads: kt.shape[0],
            kv_len: kt.shape[1],
        };
        let (qd, od) = (
            qt.cuda_view("query").py_err(py)?,
            o.t.cuda_view("out").py_err(py)?,
        );
        let sk = Sinks::device(&sinks);
        // SAFETY: all four tensors (and `sinks`) were validated as CUDA tensors of these shapes
        // on one device; their capsules live until the call returns and torch keeps the memory
        // until the stream has run the kernels (the caller holds the tensors).
        return unsafe { attend_dense(ordinal, qt.dtype, qd, qt.shape, &kv, &params, sk, od, s) }
            .py_err(py);
    }
    let rows = py
        .detach(|| {
            with_element!(qt.dtype, E => {
                // SAFETY: the three capsules stay alive in this frame until the call returns,
                // and nothing writes the inputs meanwhile (`out` does not overlap them).
                let (qv, kv, vv) = unsafe { (qt.view::<E>(), kt.view::<E>(), vt.view::<E>()) };
                attend(qv, &DenseKv::new(kv, vv)?, &params, Sinks::host(&sinks))
            })
        })
        .py_err(py)?;
    finish_out(py, &q.t, &o, &rows)
}
