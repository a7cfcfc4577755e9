//! `attention(query, key, value, out, ...)`: the op over explicit tensors (no store).

use super::errors::IntoPyResult;
use super::tensor::TensorArg;
use crate::cpu::attention::{attend, DenseKv, Params};
use crate::error::Error;
use crate::tensor::Tensor3;
use crate::with_element;
use pyo3::prelude::*;

/// Validates `out` against `query` and writes the op's result into it.
pub fn finish_out(py: Python<'_>, query: &Tensor3, out: &TensorArg, rows: &[f32]) -> PyResult<()> {
    let o = &out.t;
    o.expect_dtype("out", query.dtype).py_err(py)?;
    // SAFETY: `out` was validated writable and not overlapping `query`, its capsule is alive
    // for this call, and the GIL is held, so no other Python code writes it meanwhile.
    with_element!(o.dtype, E => unsafe { o.write_rows::<E>(rows) });
    Ok(())
}

/// Checks `out` before any work: same shape as `query`, not overlapping any input.
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
    if inputs.iter().any(|t| t.overlaps(out)) {
        return Err(Error::value("out", "must not share memory with the inputs")).py_err(py);
    }
    Ok(())
}

/// Attention over explicit key/value tensors; writes `out`. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (query, key, value, out, scale, softcap=None, window=None))]
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
) -> PyResult<()> {
    let q = TensorArg::import(query, "query", false)?;
    let k = TensorArg::import(key, "key", false)?;
    let v = TensorArg::import(value, "value", false)?;
    let o = TensorArg::import(out, "out", true)?;
    k.t.expect_dtype("key", q.t.dtype).py_err(py)?;
    v.t.expect_dtype("value", q.t.dtype).py_err(py)?;
    check_out(py, &q.t, &[&q.t, &k.t, &v.t], &o.t)?;
    let params = Params {
        scale,
        softcap,
        window,
    };
    let (qt, kt, vt) = (q.t, k.t, v.t);
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
