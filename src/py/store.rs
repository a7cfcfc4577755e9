//! `KVStore`: the head-wise KV store as a Python class. See `_core.pyi`.

use super::attention::{check_out, finish_out};
use super::errors::IntoPyResult;
use super::tensor::{stream_arg, TensorArg};
use crate::cpu::attention::{attend, Params};
use crate::error::Error;
use crate::store::{CudaConfig, KvStore, StoreConfig};
use crate::tensor::{DType, Device};
use crate::with_element;
use pyo3::prelude::*;

#[pyclass(name = "KVStore", module = "headinfer._core")]
pub struct PyKvStore {
    inner: KvStore,
}

impl PyKvStore {
    /// Checks that a tensor is on the store's device: the CPU, or its CUDA device.
    fn expect_store_device(&self, arg: &str, device: Device) -> crate::Result<()> {
        let want = match &self.inner.config().cuda {
            Some(c) => Device::Cuda(c.ordinal),
            None => Device::Cpu,
        };
        // A CPU tensor for a CUDA store (and the reverse) keeps the store's own message.
        if matches!((device, want), (Device::Cuda(a), Device::Cuda(b)) if a != b) {
            return Err(Error::type_(
                arg,
                format!("is on {device:?}, but the store holds {want:?} tensors"),
            ));
        }
        Ok(())
    }
}

/// A zeroed host buffer of `n` elements; `OutOfHostMemory` instead of an abort when the
/// allocation fails.
fn host_vec<E: crate::tensor::Element>(n: usize) -> crate::Result<Vec<E>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfHostMemory {
        what: "a buffer for reading the KV cache".into(),
        needed: n.saturating_mul(std::mem::size_of::<E>()),
        available: crate::host::available_bytes().unwrap_or(0),
    })?;
    v.resize(n, E::default());
    Ok(v)
}

#[pymethods]
impl PyKvStore {
    #[new]
    #[pyo3(signature = (num_layers, num_kv_heads, head_dim, dtype, block_size=256, windows=None, host_memory_limit=None, device=None, device_budget=0, max_len=None))]
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
        device: Option<usize>,
        device_budget: usize,
        max_len: Option<usize>,
    ) -> PyResult<Self> {
        let cuda = match device {
            None => None,
            Some(ordinal) => Some(CudaConfig {
                ordinal,
                device_budget,
                max_len: max_len
                    .ok_or_else(|| Error::value("max_len", "is required with a device"))
                    .py_err(py)?,
            }),
        };
        let mut cfg = StoreConfig {
            num_layers,
            num_kv_heads,
            head_dim,
            dtype: DType::parse("dtype", dtype).py_err(py)?,
            block_size,
            windows: Vec::new(),
            host_memory_limit,
            cuda,
        };
        // Sizes first: the default windows below are one entry per layer.
        cfg.check_sizes().py_err(py)?;
        cfg.windows = windows.unwrap_or_else(|| vec![None; num_layers]);
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

    #[pyo3(signature = (layer, key, value, stream=None))]
    fn append(
        &mut self,
        py: Python<'_>,
        layer: usize,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        stream: Option<usize>,
    ) -> PyResult<()> {
        let s = stream_arg(stream);
        let k = TensorArg::import(key, "key", false, s)?;
        let v = TensorArg::import(value, "value", false, s)?;
        let dtype = self.inner.config().dtype;
        k.t.expect_dtype("key", dtype).py_err(py)?;
        v.t.expect_dtype("value", dtype).py_err(py)?;
        v.t.expect_device("value", k.t.device).py_err(py)?;
        self.expect_store_device("key", k.t.device).py_err(py)?;
        if let Device::Cuda(_) = k.t.device {
            let c = self.inner.config();
            let shape = [Some(c.num_kv_heads), Some(k.t.shape[1]), Some(c.head_dim)];
            let what = "[num_kv_heads, chunk_len, head_dim]";
            k.t.expect_shape("key", what, shape).py_err(py)?;
            v.t.expect_shape("value", what, shape).py_err(py)?;
            let (kd, vd) = (
                k.t.cuda_view("key").py_err(py)?,
                v.t.cuda_view("value").py_err(py)?,
            );
            let n = k.t.shape[1];
            // SAFETY: both are validated CUDA tensors of the store's shape; the caller keeps
            // them alive until the stream has run the copy (transformers holds them).
            return unsafe { self.inner.append_cuda(layer, kd, vd, n, s) }.py_err(py);
        }
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
        let s = stream_arg(None);
        let ko = TensorArg::import(key_out, "key_out", true, s)?;
        let vo = TensorArg::import(value_out, "value_out", true, s)?;
        ko.t.expect_device("key_out", Device::Cpu).py_err(py)?;
        vo.t.expect_device("value_out", Device::Cpu).py_err(py)?;
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
            // Sized like the validated outputs, so no overflow; the allocation may still fail.
            let mut kbuf = host_vec::<E>(heads * n * d).py_err(py)?;
            let mut vbuf = host_vec::<E>(heads * n * d).py_err(py)?;
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

    #[pyo3(signature = (layer, query, out, scale, softcap=None, window=None, stream=None, host_share=None))]
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &mut self,
        py: Python<'_>,
        layer: usize,
        query: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        scale: f32,
        softcap: Option<f32>,
        window: Option<usize>,
        stream: Option<usize>,
        host_share: Option<Vec<usize>>,
    ) -> PyResult<()> {
        let s = stream_arg(stream);
        let q = TensorArg::import(query, "query", false, s)?;
        let o = TensorArg::import(out, "out", true, s)?;
        let dtype = self.inner.config().dtype;
        q.t.expect_dtype("query", dtype).py_err(py)?;
        self.expect_store_device("query", q.t.device).py_err(py)?;
        check_out(py, &q.t, &[&q.t], &o.t)?;
        let params = Params {
            scale,
            softcap,
            window,
        };
        if let Device::Cuda(_) = q.t.device {
            let c = self.inner.config();
            if q.t.shape[2] != c.head_dim {
                return Err(Error::value(
                    "query",
                    format!(
                        "head_dim is {}, the store holds {}",
                        q.t.shape[2], c.head_dim
                    ),
                ))
                .py_err(py);
            }
            let (qd, od) = (
                q.t.cuda_view("query").py_err(py)?,
                o.t.cuda_view("out").py_err(py)?,
            );
            let [hq, lq, _] = q.t.shape;
            if let Some(from) = host_share {
                let len = self.inner.seq_len(layer).py_err(py)?;
                if let Some(&f) = from.iter().find(|&&f| f > len) {
                    return Err(Error::value(
                        "host_share",
                        format!("position {f} is beyond the {len} tokens of layer {layer}"),
                    ))
                    .py_err(py);
                }
                let store = &mut self.inner;
                // SAFETY: validated CUDA tensors; the caller keeps them alive until the stream
                // has run the kernels.
                return with_element!(dtype, E => unsafe {
                    store.attend_cuda_shared::<E>(layer, qd, hq, lq, &params, &from, od, s)
                })
                .py_err(py);
            }
            // SAFETY: validated CUDA tensors; the caller keeps them alive until the stream has
            // run the kernels.
            return unsafe { self.inner.attend_cuda(layer, qd, hq, lq, &params, od, s) }.py_err(py);
        }
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

    fn host_share(
        &self,
        py: Python<'_>,
        layer: usize,
        num_heads: usize,
    ) -> PyResult<Option<Vec<usize>>> {
        self.inner.host_share(layer, num_heads).py_err(py)
    }

    #[pyo3(signature = (layer, head_start, num_heads, start, end, key_out, value_out, stream=None))]
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &self,
        py: Python<'_>,
        layer: usize,
        head_start: usize,
        num_heads: usize,
        start: usize,
        end: usize,
        key_out: &Bound<'_, PyAny>,
        value_out: &Bound<'_, PyAny>,
        stream: Option<usize>,
    ) -> PyResult<()> {
        let s = stream_arg(stream);
        let ko = TensorArg::import(key_out, "key_out", true, s)?;
        let vo = TensorArg::import(value_out, "value_out", true, s)?;
        let c = self.inner.config();
        if head_start
            .checked_add(num_heads)
            .is_none_or(|e| e > c.num_kv_heads)
        {
            return Err(Error::value(
                "num_heads",
                format!(
                    "kv heads from {head_start}, {num_heads} of them, are out of range for {}",
                    c.num_kv_heads
                ),
            ))
            .py_err(py);
        }
        let shape = [
            Some(num_heads),
            Some(end.saturating_sub(start)),
            Some(c.head_dim),
        ];
        for (arg, t) in [("key_out", &ko.t), ("value_out", &vo.t)] {
            t.expect_shape(arg, "[num_heads, end - start, head_dim]", shape)
                .py_err(py)?;
            t.expect_dtype(arg, c.dtype).py_err(py)?;
        }
        if ko.t.overlaps(&vo.t) {
            return Err(Error::value(
                "value_out",
                "must not share memory with key_out",
            ))
            .py_err(py);
        }
        self.expect_store_device("key_out", ko.t.device)
            .py_err(py)?;
        vo.t.expect_device("value_out", ko.t.device).py_err(py)?;
        let (kd, vd) = (
            ko.t.cuda_view("key_out").py_err(py)?,
            vo.t.cuda_view("value_out").py_err(py)?,
        );
        // Every copy path addresses both outputs with one set of strides.
        if (kd.s0, kd.s1) != (vd.s0, vd.s1) && num_heads > 0 && end > start {
            return Err(Error::value(
                "value_out",
                format!(
                    "must have key_out's strides {:?}, got {:?}",
                    ko.t.strides, vo.t.strides
                ),
            ))
            .py_err(py);
        }
        // SAFETY: validated CUDA tensors of the right shape; the caller keeps them alive until
        // the stream has run the copy.
        unsafe {
            self.inner
                .gather_cuda(layer, head_start, num_heads, start, end, kd, vd, s)
        }
        .py_err(py)
    }

    fn crop(&mut self, py: Python<'_>, length: usize) -> PyResult<()> {
        self.inner.crop(length).py_err(py)
    }

    fn clear(&mut self, py: Python<'_>) -> PyResult<()> {
        self.inner.clear().py_err(py)
    }

    fn device_bytes_reserved(&self) -> usize {
        self.inner.device_bytes_reserved()
    }

    fn device_bytes_used(&self) -> usize {
        self.inner.device_bytes_used()
    }

    fn host_bytes_reserved(&self) -> usize {
        self.inner.host_bytes_reserved()
    }

    #[getter]
    fn device_budget(&self) -> usize {
        self.inner.device_budget()
    }

    #[setter]
    fn set_device_budget(&mut self, py: Python<'_>, bytes: usize) -> PyResult<()> {
        self.inner.set_device_budget(bytes).py_err(py)
    }

    #[pyo3(signature = (stream=None))]
    fn rebalance(&mut self, py: Python<'_>, stream: Option<usize>) -> PyResult<(usize, usize)> {
        self.inner.rebalance(stream_arg(stream)).py_err(py)
    }

    #[getter]
    fn is_cuda(&self) -> bool {
        self.inner.is_cuda()
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
