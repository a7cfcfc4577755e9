//! `plan(...)`: the memory planner of `src/plan.rs`, for the runtime and `headinfer plan`.

use super::errors::IntoPyResult;
use crate::plan::{plan as make_plan, ModelShape, Request};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Splits a GPU budget for a model and context; returns a dict of byte counts. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (*, num_layers, num_q_heads, num_kv_heads, head_dim, hidden_size, intermediate_size, vocab_size, elem_bytes, weight_bytes, windows, context, chunk_size, gpu_budget, margin, staging_cap, prefill=true))]
#[allow(clippy::too_many_arguments)]
pub fn plan<'py>(
    py: Python<'py>,
    num_layers: usize,
    num_q_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    hidden_size: usize,
    intermediate_size: usize,
    vocab_size: usize,
    elem_bytes: usize,
    weight_bytes: usize,
    windows: Vec<Option<usize>>,
    context: usize,
    chunk_size: usize,
    gpu_budget: usize,
    margin: usize,
    staging_cap: usize,
    prefill: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let m = ModelShape {
        num_layers,
        num_q_heads,
        num_kv_heads,
        head_dim,
        hidden_size,
        intermediate_size,
        vocab_size,
        elem_bytes,
        weight_bytes,
        windows,
    };
    let r = Request {
        context,
        chunk_size,
        gpu_budget,
        margin,
        staging_cap,
        prefill,
    };
    let p = make_plan(&m, &r).py_err(py)?;
    let d = PyDict::new(py);
    d.set_item("weight_bytes", p.weight_bytes)?;
    d.set_item("activation_bytes", p.activation_bytes)?;
    d.set_item("heads_per_group", p.heads_per_group)?;
    d.set_item("staging_bytes", p.staging_bytes)?;
    d.set_item("kv_device_bytes", p.kv_device_bytes)?;
    d.set_item("kv_total_bytes", p.kv_total_bytes)?;
    d.set_item("kv_host_bytes", p.kv_host_bytes)?;
    d.set_item("margin_bytes", margin)?;
    d.set_item("fits_gpu", p.fits_gpu)?;
    Ok(d)
}
