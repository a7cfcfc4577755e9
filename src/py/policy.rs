//! The CPU share's policy for Python: the rate probes (`measure_cpu_rate`,
//! `measure_gpu_rates`) and the balance itself (`share_split`), so the planner can show
//! what it would choose and why.

use super::errors::IntoPyResult;
use crate::attention::policy::{balance, Rates, SharePolicy};
use crate::attention::rates::{measure_cpu_as, measure_gpu};
use crate::cuda::kernels::MAX_CPU_HEADS;
use crate::error::Error;
use crate::quant::KvFormat;
use crate::store::{HeadPlacement, LayerPlacement};
use crate::tensor::DType;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// `(bytes_per_s, fixed_s)` of the CPU share's kernel on `threads` threads over keys and values
/// held as `kv_dtype` says, with the copy engine of GPU `beside_copy` busy meanwhile where
/// given. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (dtype, head_dim, group, threads=0, bytes=268435456, seconds=0.25, beside_copy=None, kv_dtype=None))]
#[allow(clippy::too_many_arguments)]
pub fn measure_cpu_rate(
    py: Python<'_>,
    dtype: &str,
    head_dim: usize,
    group: usize,
    threads: usize,
    bytes: usize,
    seconds: f64,
    beside_copy: Option<usize>,
    kv_dtype: Option<&str>,
) -> PyResult<(f64, f64)> {
    let dtype = DType::parse("dtype", dtype).py_err(py)?;
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(Error::value(
            "seconds",
            format!("must be >= 0, got {seconds}"),
        ))
        .py_err(py);
    }
    let mut policy = SharePolicy::default();
    policy.set_threads(threads).py_err(py)?;
    let pool = policy.pool.as_deref();
    py.detach(|| {
        measure_cpu_as(
            dtype,
            kv_dtype,
            head_dim,
            group,
            bytes,
            seconds,
            pool,
            beside_copy,
        )
    })
    .map(|r| (r.bytes_per_s, r.fixed_s))
    .py_err(py)
}

/// `(pcie, device, copy)` bytes per second of the decode kernel over host and device memory
/// and of the copy engine, on GPU `device`, rows held as `kv_dtype` says. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (device, dtype, head_dim, group, kv_dtype=None))]
pub fn measure_gpu_rates(
    py: Python<'_>,
    device: usize,
    dtype: &str,
    head_dim: usize,
    group: usize,
    kv_dtype: Option<&str>,
) -> PyResult<(f64, f64, f64)> {
    let dtype = DType::parse("dtype", dtype).py_err(py)?;
    let format = KvFormat::parse("kv_dtype", kv_dtype, dtype).py_err(py)?;
    py.detach(|| measure_gpu(device, dtype, head_dim, group, format))
        .map(|r| (r.pcie, r.device, r.copy))
        .py_err(py)
}

/// The balanced split of one layer, or `None` where splitting does not pay. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (rates, *, len, block_size, token_bytes, heads, start=0, lo=None, max_heads=16))]
#[allow(clippy::too_many_arguments)]
pub fn share_split<'py>(
    py: Python<'py>,
    rates: Vec<f64>,
    len: usize,
    block_size: usize,
    token_bytes: usize,
    heads: Vec<(usize, usize, Option<usize>)>,
    start: usize,
    lo: Option<usize>,
    max_heads: usize,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    let rates = Rates::from_slice("rates", &rates).py_err(py)?;
    if block_size == 0 {
        return Err(Error::value("block_size", "must be positive")).py_err(py);
    }
    let layer = LayerPlacement {
        len,
        start,
        lo: lo.unwrap_or(start),
        block_size,
        token_bytes,
        heads: heads
            .into_iter()
            .map(|(device_tokens, host_tokens, tail)| HeadPlacement {
                device_tokens,
                host_tokens,
                tail,
            })
            .collect(),
    };
    let Some(e) = balance(&rates, &layer, max_heads.min(MAX_CPU_HEADS)) else {
        return Ok(None);
    };
    let d = PyDict::new(py);
    d.set_item("from", e.split.from)?;
    d.set_item("cpu_bytes", e.cpu_bytes)?;
    d.set_item("gpu_seconds", e.gpu_seconds)?;
    d.set_item("cpu_seconds", e.cpu_seconds)?;
    d.set_item("alone_seconds", e.alone_seconds)?;
    Ok(Some(d))
}
