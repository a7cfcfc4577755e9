//! `KVStore`: the head-wise KV store as a Python class. See `_core.pyi`.

use super::attention::{check_out, finish_out};
use super::errors::IntoPyResult;
use super::tensor::TensorArg;
use crate::cpu::attention::{attend, Params};
use crate::store::{KvStore, StoreConfig};
use crate::tensor::DType;
use crate::with_element;
use pyo3::prelude::*;

#[pyclass(name = "KVStore", module = "headinfer._core")]
pub struct PyKvStore {
    inner: KvStore,
}

#[pymethods]
impl PyKvStore {
    #[new]
    #[pyo3(signature = (num_layers, num_kv_heads, head_dim, dtype, block_size=256, windows=None, host_memory_limit=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: &str,
        block_size: usize,
        windows: Option<Vec<Option<usize>>>,
        host_memory_limit: Option<usize>,
    ) -> PyResult<Self> {
        let cfg = StoreConfig {
            num_layers,
            num_kv_heads,
            head_dim,
            dtype: DType::parse("dtype", dtype).py_err(py)?,
            block_size,
            windows: windows.unwrap_or_else(|| vec![None; num_layers]),
            host_memory_limit,
        };
        Ok(PyKvStore {
            inner: KvStore::new(cfg).py_err(py)?,
        })
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.config().num_layers
    }
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.inner.config().num_kv_heads
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.config().head_dim
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.config().dtype.name()
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.inner.config().block_size
    }
    #[getter]
    fn windows(&self) -> Vec<Option<usize>> {
        self.inner.config().windows.clone()
    }

    fn seq_len(&self, py: Python<'_>, layer: usize) -> PyResult<usize> {
        self.inner.seq_len(layer).py_err(py)
    }

    fn retained_start(&self, py: Python<'_>, layer: usize) -> PyResult<usize> {
        self.inner.retained_start(layer).py_err(py)
    }

    fn append(
        &mut self,
        py: Python<'_>,
        layer: usize,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let k = TensorArg::import(key, "key", false)?;
        let v = TensorArg::import(value, "value", false)?;
        let dtype = self.inner.config().dtype;
        k.t.expect_dtype("key", dtype).py_err(py)?;
        v.t.expect_dtype("value", dtype).py_err(py)?;
        let (kt, vt) = (k.t, v.t);
        let store = &mut self.inner;
        py.detach(|| {
            with_element!(dtype, E => {
                // SAFETY: both capsules stay alive in this frame until the call returns.
                let (kv, vv) = unsafe { (kt.view::<E>(), vt.view::<E>()) };
                store.append(layer, kv, vv)
            })
        })
        .py_err(py)
    }

    fn read(
        &self,
        py: Python<'_>,
        layer: usize,
        start: usize,
        end: usize,
        key_out: &Bound<'_, PyAny>,
        value_out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let ko = TensorArg::import(key_out, "key_out", true)?;
        let vo = TensorArg::import(value_out, "value_out", true)?;
        let cfg = self.inner.config();
        let shape = [
            Some(cfg.num_kv_heads),
            Some(end.saturating_sub(start)),
            Some(cfg.head_dim),
        ];
        for (arg, t) in [("key_out", &ko.t), ("value_out", &vo.t)] {
            t.expect_shape(arg, "[num_kv_heads, end - start, head_dim]", shape)
                .py_err(py)?;
            t.expect_dtype(arg, cfg.dtype).py_err(py)?;
        }
        if ko.t.overlaps(&vo.t) {
            return Err(crate::Error::value(
                "value_out",
                "must not share memory with key_out",
            ))
            .py_err(py);
        }
        let (kt, vt) = (ko.t, vo.t);
        with_element!(cfg.dtype, E => {
            let d = cfg.head_dim;
            let (heads, n) = (cfg.num_kv_heads, end.saturating_sub(start));
            let mut kbuf = vec![E::default(); heads * n * d];
            let mut vbuf = vec![E::default(); heads * n * d];
            self.inner
                .read::<E>(layer, start, end, |h, i, k, v| {
                    kbuf[(h * n + i) * d..][..d].copy_from_slice(k);
                    vbuf[(h * n + i) * d..][..d].copy_from_slice(v);
                })
                .py_err(py)?;
            // SAFETY: both outputs were validated writable and disjoint, their capsules are
            // alive in this frame, and the GIL is held while they are written.
            unsafe {
                kt.write_same::<E>(|h, i, dst| dst.copy_from_slice(&kbuf[(h * n + i) * d..][..d]));
                vt.write_same::<E>(|h, i, dst| dst.copy_from_slice(&vbuf[(h * n + i) * d..][..d]));
            }
        });
        Ok(())
    }

    #[pyo3(signature = (layer, query, out, scale, softcap=None, window=None))]
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        py: Python<'_>,
        layer: usize,
        query: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        scale: f32,
        softcap: Option<f32>,
        window: Option<usize>,
    ) -> PyResult<()> {
        let q = TensorArg::import(query, "query", false)?;
        let o = TensorArg::import(out, "out", true)?;
        let dtype = self.inner.config().dtype;
        q.t.expect_dtype("query", dtype).py_err(py)?;
        check_out(py, &q.t, &[&q.t], &o.t)?;
        let params = Params {
            scale,
            softcap,
            window,
        };
        let qt = q.t;
        let store = &self.inner;
        let rows = py
            .detach(|| {
                with_element!(dtype, E => {
                    // SAFETY: the query's capsule stays alive in this frame until the call
                    // returns, and `out` does not overlap it.
                    let qv = unsafe { qt.view::<E>() };
                    attend(qv, &store.layer_kv::<E>(layer)?, &params)
                })
            })
            .py_err(py)?;
        finish_out(py, &q.t, &o, &rows)
    }

    fn crop(&mut self, py: Python<'_>, length: usize) -> PyResult<()> {
        self.inner.crop(length).py_err(py)
    }

    fn clear(&mut self) {
        self.inner.clear();
    }

    fn bytes_used(&self) -> usize {
        self.inner.bytes_used()
    }

    fn bytes_reserved(&self) -> usize {
        self.inner.bytes_reserved()
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "KVStore(num_layers={}, num_kv_heads={}, head_dim={}, dtype='{}', block_size={}, \
             tokens={}, bytes_used={}, bytes_reserved={})",
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            c.dtype.name(),
            c.block_size,
            self.inner.seq_len(0).unwrap_or(0),
            self.inner.bytes_used(),
            self.inner.bytes_reserved()
        )
    }
}
