//! `plan(model, ...)`: the memory planner of `src/plan.rs`, for the runtime and
//! `headinfer plan`; `ModelShape` in, a typed `Plan` out.

use super::errors::IntoPyResult;
use crate::plan::{plan as make_plan, ModelShape, Plan, Request};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The shape of a model as far as memory goes. See `_core.pyi`.
#[pyclass(name = "ModelShape", module = "headinfer._core", frozen)]
pub struct PyModelShape {
    inner: ModelShape,
}

#[pymethods]
impl PyModelShape {
    #[new]
    #[pyo3(signature = (*, num_layers, num_q_heads, num_kv_heads, head_dim, hidden_size, intermediate_size, vocab_size, elem_bytes, weight_bytes, windows, kv_row_bytes=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
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
        kv_row_bytes: Option<usize>,
    ) -> Self {
        PyModelShape {
            inner: ModelShape {
                kv_row_bytes: kv_row_bytes.unwrap_or(head_dim * elem_bytes),
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
            },
        }
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers
    }
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes
    }
    #[getter]
    fn kv_bytes_per_token_layer(&self) -> usize {
        self.inner.kv_bytes_per_token_layer()
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

/// Where every byte of the GPU budget goes. See `_core.pyi`.
#[pyclass(name = "Plan", module = "headinfer._core", frozen, get_all)]
pub struct PyPlan {
    weight_bytes: usize,
    activation_bytes: usize,
    heads_per_group: usize,
    staging_bytes: usize,
    kv_device_bytes: usize,
    kv_total_bytes: usize,
    kv_host_bytes: usize,
    margin_bytes: usize,
    fits_gpu: bool,
}

impl From<Plan> for PyPlan {
    fn from(p: Plan) -> Self {
        PyPlan {
            weight_bytes: p.weight_bytes,
            activation_bytes: p.activation_bytes,
            heads_per_group: p.heads_per_group,
            staging_bytes: p.staging_bytes,
            kv_device_bytes: p.kv_device_bytes,
            kv_total_bytes: p.kv_total_bytes,
            kv_host_bytes: p.kv_host_bytes,
            margin_bytes: p.margin_bytes,
            fits_gpu: p.fits_gpu,
        }
    }
}

#[pymethods]
impl PyPlan {
    /// The figures as a dict (for JSON).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("weight_bytes", self.weight_bytes)?;
        d.set_item("activation_bytes", self.activation_bytes)?;
        d.set_item("heads_per_group", self.heads_per_group)?;
        d.set_item("staging_bytes", self.staging_bytes)?;
        d.set_item("kv_device_bytes", self.kv_device_bytes)?;
        d.set_item("kv_total_bytes", self.kv_total_bytes)?;
        d.set_item("kv_host_bytes", self.kv_host_bytes)?;
        d.set_item("margin_bytes", self.margin_bytes)?;
        d.set_item("fits_gpu", self.fits_gpu)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "Plan(weight_bytes={}, activation_bytes={}, heads_per_group={}, staging_bytes={}, \
             kv_device_bytes={}, kv_total_bytes={}, kv_host_bytes={}, margin_bytes={}, \
             fits_gpu={})",
            self.weight_bytes,
            self.activation_bytes,
            self.heads_per_group,
            self.staging_bytes,
            self.kv_device_bytes,
            self.kv_total_bytes,
            self.kv_host_bytes,
            self.margin_bytes,
            if self.fits_gpu { "True" } else { "False" }
        )
    }
}

/// Splits a GPU budget for `model` and a context. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (model, *, context, chunk_size, gpu_budget, margin, staging_cap, prefill=true))]
#[allow(clippy::too_many_arguments)]
pub fn plan(
    py: Python<'_>,
    model: &PyModelShape,
    context: usize,
    chunk_size: usize,
    gpu_budget: usize,
    margin: usize,
    staging_cap: usize,
    prefill: bool,
) -> PyResult<PyPlan> {
    let r = Request {
        context,
        chunk_size,
        gpu_budget,
        margin,
        staging_cap,
        prefill,
        ring_bytes: crate::store::STAGING_BUFFERS * crate::store::STAGING_PIECE_BYTES,
    };
    make_plan(&model.inner, &r).map(PyPlan::from).py_err(py)
}
