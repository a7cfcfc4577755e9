//! `KVStore`: the head-wise KV store as a Python class. See `_core.pyi`.
//!
//! One class for both kinds of store: it holds a `CpuStore` or a `CudaStore` and the CPU-share
//! policy, checks each tensor argument against the store's device on entry, and calls the
//! core.

use super::attention::{check_out, finish_out};
use super::errors::IntoPyResult;
use super::stream::resolve;
use super::tensor::{stream_arg, Sinks, TensorArg};
use crate::attention::args::Params;
use crate::attention::cpu::attend;
use crate::attention::policy::{Rates, ReaderChoice, SharePolicy};
use crate::error::Error;
use crate::quant::KvFormat;
use crate::store::{CpuStore, CudaConfig, CudaStore, StoreConfig};
use crate::tensor::{DType, Device, Tensor3};
use crate::with_element;
use pyo3::prelude::*;

enum Inner {
    Cpu(Box<CpuStore>),
    Cuda(Box<CudaStore>),
}

/// Runs `$body` with `$s` bound to the store, whichever kind it is.
macro_rules! each {
    ($inner:expr, $s:ident => $body:expr) => {
        match $inner {
            Inner::Cpu($s) => $body,
            Inner::Cuda($s) => $body,
        }
    };
}

#[pyclass(name = "KVStore", module = "headinfer._core")]
pub struct PyKvStore {
    inner: Inner,
    policy: SharePolicy,
}

impl PyKvStore {
    fn config(&self) -> &StoreConfig {
        each!(&self.inner, s => s.config())
    }

    fn device(&self) -> Device {
        match &self.inner {
            Inner::Cpu(_) => Device::Cpu,
            Inner::Cuda(s) => Device::Cuda(s.ordinal()),
        }
    }

    /// The CUDA store, for setting the staging ring's `arg`: a CPU store stages nothing.
    fn staging_mut(&mut self, arg: &str) -> crate::Result<&mut CudaStore> {
        match &mut self.inner {
            Inner::Cuda(s) => Ok(s),
            Inner::Cpu(_) => Err(Error::value(
                arg,
                "a CPU store stages nothing; staging needs a device",
            )),
        }
    }

    /// Checks that `t` is on the store's device: a CPU/CUDA mismatch is a `TypeError`, another
    /// CUDA device a `ValueError`; both name the argument.
    fn check_device(&self, arg: &str, t: &Tensor3) -> crate::Result<()> {
        match (self.device(), t.device) {
            (Device::Cuda(want), Device::Cuda(got)) if want != got => Err(Error::value(
                arg,
                format!("is on cuda:{got}, but this store holds cuda:{want}"),
            )),
            (Device::Cuda(_), Device::Cpu) => Err(Error::type_(
                arg,
                "is a CPU tensor but this store holds CUDA tensors (it was created with a device)",
            )),
            (Device::Cpu, Device::Cuda(_)) => Err(Error::type_(
                arg,
                "is a CUDA tensor but this store holds CPU tensors (create it with a device)",
            )),
            _ => Ok(()),
        }
    }
}

/// A zeroed host buffer of `n` elements; `OutOfHostMemory` instead of an abort when the
/// allocation fails.
fn host_vec<E: crate::tensor::Element>(n: usize) -> crate::Result<Vec<E>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfHostMemory {
        what: "a buffer for reading the KV cache".into(),
        needed: n.saturating_mul(std::mem::size_of::<E>()),
        available: crate::cpu::memory::available_bytes().unwrap_or(0),
    })?;
    v.resize(n, E::default());
    Ok(v)
}

#[pymethods]
impl PyKvStore {
    #[new]
    #[pyo3(signature = (num_layers, num_kv_heads, head_dim, dtype, block_size=256, windows=None, host_memory_limit=None, device=None, device_budget=0, max_len=None, cpu_heads=0, kv_dtype=None))]
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
        cpu_heads: usize,
        kv_dtype: Option<&str>,
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
        let dtype = DType::parse("dtype", dtype).py_err(py)?;
        let mut cfg = StoreConfig {
            num_layers,
            num_kv_heads,
            head_dim,
            dtype,
            kv: KvFormat::parse("kv_dtype", kv_dtype, dtype).py_err(py)?,
            block_size,
            windows: Vec::new(),
            host_memory_limit,
        };
        // Sizes first: the default windows below are one entry per layer.
        cfg.check_sizes(cuda.as_ref()).py_err(py)?;
        cfg.windows = windows.unwrap_or_else(|| vec![None; num_layers]);
        SharePolicy::check(cpu_heads, num_kv_heads).py_err(py)?;
        let inner = match cuda {
            None => {
                if cpu_heads > 0 {
                    return Err(Error::value(
                        "cpu_heads",
                        "a CPU store attends on the CPU already; cpu_heads needs a device",
                    ))
                    .py_err(py);
                }
                Inner::Cpu(Box::new(CpuStore::new(cfg).py_err(py)?))
            }
            Some(cuda) => Inner::Cuda(Box::new(CudaStore::new(cfg, cuda).py_err(py)?)),
        };
        Ok(PyKvStore {
            inner,
            policy: SharePolicy {
                cpu_heads,
                ..SharePolicy::default()
            },
        })
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.config().num_layers
    }
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.config().num_kv_heads
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.config().head_dim
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.config().dtype.name()
    }
    /// "int8", or the dtype's name where keys and values are held exactly.
    #[getter]
    fn kv_dtype(&self) -> &'static str {
        let c = self.config();
        c.kv.name(c.dtype)
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.config().block_size
    }
    #[getter]
    fn windows(&self) -> Vec<Option<usize>> {
        self.config().windows.clone()
    }

    #[getter]
    fn cpu_heads(&self) -> usize {
        self.policy.cpu_heads
    }

    #[setter]
    fn set_cpu_heads(&mut self, py: Python<'_>, heads: usize) -> PyResult<()> {
        SharePolicy::check(heads, self.config().num_kv_heads).py_err(py)?;
        if heads > 0 && matches!(self.inner, Inner::Cpu(_)) {
            return Err(Error::value(
                "cpu_heads",
                "a CPU store attends on the CPU already; cpu_heads needs a device",
            ))
            .py_err(py);
        }
        self.policy.cpu_heads = heads;
        Ok(())
    }

    #[getter]
    fn cpu_share_min_tokens(&self) -> usize {
        self.policy.min_host_tokens
    }

    #[setter]
    fn set_cpu_share_min_tokens(&mut self, tokens: usize) {
        self.policy.min_host_tokens = tokens;
    }

    #[getter]
    fn share_rates(&self) -> Option<(f64, f64, f64, f64, f64)> {
        self.policy.rates.map(|r| r.to_tuple())
    }

    #[setter]
    fn set_share_rates(&mut self, py: Python<'_>, rates: Option<Vec<f64>>) -> PyResult<()> {
        let rates = match rates {
            Some(v) => Some(Rates::from_slice("share_rates", &v).py_err(py)?),
            None => None,
        };
        if rates.is_some() && matches!(self.inner, Inner::Cpu(_)) {
            return Err(Error::value(
                "share_rates",
                "a CPU store attends on the CPU already; a CPU share needs a device",
            ))
            .py_err(py);
        }
        self.policy.rates = rates;
        Ok(())
    }

    #[getter]
    fn share_calibrate(&self) -> bool {
        self.policy.calibrate
    }

    #[setter]
    fn set_share_calibrate(&mut self, on: bool) {
        self.policy.calibrate = on;
    }

    /// `(bytes per second, tasks)` of the CPU share's own tasks so far (`None` before any).
    #[getter]
    fn share_cpu_measured(&self) -> Option<(f64, usize)> {
        let m = &self.policy.meter;
        m.rate().map(|r| (r, m.tasks()))
    }

    /// Where the shared decode steps spent their time, summed since the first (seconds):
    /// `gpu_steps`, `gpu_own` (the GPU's own part of each layer's step), `gpu_waited` (then
    /// waiting for the CPU's rows), `cpu_tasks`, `cpu_busy` (the tasks computing), `cpu_idle`
    /// (the CPU between tasks, waiting for their queries).
    #[getter]
    fn share_timeline(&self) -> std::collections::HashMap<&'static str, f64> {
        let t = self.policy.meter.timeline();
        std::collections::HashMap::from([
            ("gpu_steps", t.gpu_steps as f64),
            ("gpu_own", t.gpu_own),
            ("gpu_waited", t.gpu_waited),
            ("cpu_tasks", t.cpu_tasks as f64),
            ("cpu_busy", t.cpu_busy),
            ("cpu_idle", t.cpu_idle),
        ])
    }

    /// `(steps, waited)`: the layers' shared steps read, and how many of them the GPU waited
    /// for the CPU's rows in.
    #[getter]
    fn share_steps(&self) -> (usize, usize) {
        self.policy.meter.steps()
    }

    /// Per layer, `(cpu, gpu)`: the rates (bytes per second) its next decode step's split
    /// balances by (`None`: no rates).
    #[getter]
    fn share_balance(&self) -> Option<Vec<(f64, f64)>> {
        let layers = each!(&self.inner, s => s.config().num_layers);
        (0..layers)
            .map(|l| self.policy.layer_rates(l).map(|r| (r.cpu, r.pcie)))
            .collect()
    }

    #[getter]
    fn host_reader(&self) -> &'static str {
        self.policy.reader.name()
    }

    #[setter]
    fn set_host_reader(&mut self, py: Python<'_>, reader: &str) -> PyResult<()> {
        self.policy.reader = ReaderChoice::parse(reader).py_err(py)?;
        Ok(())
    }

    /// What `host_reader` resolves to now: `"copy"` or `"zero-copy"`.
    #[getter]
    fn host_reader_used(&self) -> &'static str {
        ReaderChoice::Fixed(self.policy.host_reader()).name()
    }

    #[getter]
    fn staging_piece_bytes(&self) -> usize {
        match &self.inner {
            Inner::Cuda(s) => s.staging_piece_bytes(),
            Inner::Cpu(_) => 0,
        }
    }

    #[getter]
    fn staging_buffers(&self) -> usize {
        match &self.inner {
            Inner::Cuda(s) => s.staging_buffers(),
            Inner::Cpu(_) => 0,
        }
    }

    #[setter]
    fn set_staging_buffers(&mut self, py: Python<'_>, buffers: usize) -> PyResult<()> {
        let s = self.staging_mut("staging_buffers").py_err(py)?;
        s.set_staging_buffers(buffers).py_err(py)
    }

    #[setter]
    fn set_staging_piece_bytes(&mut self, py: Python<'_>, bytes: usize) -> PyResult<()> {
        let s = self.staging_mut("staging_piece_bytes").py_err(py)?;
        s.set_staging_piece_bytes(bytes).py_err(py)
    }

    #[getter]
    fn staging_bytes(&self) -> usize {
        match &self.inner {
            Inner::Cuda(s) => s.staging_bytes(),
            Inner::Cpu(_) => 0,
        }
    }

    #[getter]
    fn share_threads(&self) -> usize {
        self.policy
            .pool
            .as_ref()
            .map_or(0, |p| p.current_num_threads())
    }

    #[setter]
    fn set_share_threads(&mut self, py: Python<'_>, threads: usize) -> PyResult<()> {
        self.policy.set_threads(threads).py_err(py)
    }

    fn cpu_split(&self, py: Python<'_>, layer: usize) -> PyResult<Option<Vec<usize>>> {
        match &self.inner {
            Inner::Cpu(s) => s.seq_len(layer).map(|_| None).py_err(py),
            Inner::Cuda(s) => {
                let cfg = s.config();
                let token_bytes = 2 * cfg.row_bytes();
                let window = cfg.windows.get(layer).copied().flatten();
                let view = s.device_view(layer).py_err(py)?;
                Ok(self
                    .policy
                    .split(layer, 1, true, &view, window, token_bytes)
                    .map(|(s, _)| s.from))
            }
        }
    }

    fn seq_len(&self, py: Python<'_>, layer: usize) -> PyResult<usize> {
        each!(&self.inner, s => s.seq_len(layer)).py_err(py)
    }

    fn retained_start(&self, py: Python<'_>, layer: usize) -> PyResult<usize> {
        each!(&self.inner, s => s.retained_start(layer)).py_err(py)
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
        let s = resolve(py, stream, self.device())?;
        let k = TensorArg::import(key, "key", false, s)?;
        let v = TensorArg::import(value, "value", false, s)?;
        self.check_device("key", &k.t).py_err(py)?;
        self.check_device("value", &v.t).py_err(py)?;
        let dtype = self.config().dtype;
        k.t.expect_dtype("key", dtype).py_err(py)?;
        v.t.expect_dtype("value", dtype).py_err(py)?;
        match &mut self.inner {
            Inner::Cuda(store) => {
                let kd = k.t.cuda_view("key").py_err(py)?;
                let vd = v.t.cuda_view("value").py_err(py)?;
                // SAFETY: both are validated CUDA tensors of this device; the store checks
                // their shapes; the caller keeps them alive until the stream has run the copy
                // (transformers holds them).
                unsafe { store.append_cuda(layer, dtype, (kd, k.t.shape), (vd, v.t.shape), s) }
                    .py_err(py)
            }
            Inner::Cpu(store) => {
                let (kt, vt) = (k.t, v.t);
                py.detach(|| {
                    with_element!(dtype, E => {
                        // SAFETY: both capsules stay alive in this frame until the call returns.
                        let (kv, vv) = unsafe { (kt.view::<E>(), vt.view::<E>()) };
                        store.append(layer, kv, vv)
                    })
                })
                .py_err(py)
            }
        }
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
        let Inner::Cpu(store) = &self.inner else {
            return Err(Error::type_(
                "key_out",
                "read copies to CPU tensors from a CPU store; a CUDA store has gather",
            ))
            .py_err(py);
        };
        let cfg = store.config();
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
            return Err(Error::value(
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
            store
                .read::<E>(layer, start, end, |h, i, k, v| {
                    // Exact rows round-trip through f32 unchanged; int8 rows are dequantized.
                    for (buf, row) in [(&mut kbuf, k), (&mut vbuf, v)] {
                        for (y, &x) in buf[(h * n + i) * d..][..d].iter_mut().zip(row) {
                            *y = <E as crate::tensor::Element>::from_f32(x);
                        }
                    }
                })
                .py_err(py)?;
            // SAFETY: both outputs were validated writable and disjoint, and their capsules
            // and storages are held in this frame, so their bytes stay allocated (short of
            // another thread growing one in place, a data race in torch: see `TensorArg`).
            unsafe {
                kt.write_same::<E>(|h, i, dst| dst.copy_from_slice(&kbuf[(h * n + i) * d..][..d]));
                vt.write_same::<E>(|h, i, dst| dst.copy_from_slice(&vbuf[(h * n + i) * d..][..d]));
            }
        });
        Ok(())
    }

    #[pyo3(signature = (layer, query, out, scale, softcap=None, window=None, stream=None, sinks=None))]
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
        sinks: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let s = resolve(py, stream, self.device())?;
        let q = TensorArg::import(query, "query", false, s)?;
        let o = TensorArg::import(out, "out", true, s)?;
        self.check_device("query", &q.t).py_err(py)?;
        let sinks = Sinks::import(sinks, q.t.shape[0], q.t.device, s)?;
        let dtype = self.config().dtype;
        q.t.expect_dtype("query", dtype).py_err(py)?;
        check_out(py, &q.t, &[&q.t], &o.t)?;
        let params = Params {
            scale,
            softcap,
            window,
        };
        let policy = self.policy.clone();
        match &mut self.inner {
            Inner::Cuda(store) => {
                let head_dim = store.config().head_dim;
                if q.t.shape[2] != head_dim {
                    return Err(Error::value(
                        "query",
                        format!("head_dim is {}, the store holds {head_dim}", q.t.shape[2]),
                    ))
                    .py_err(py);
                }
                let (qd, od) = (
                    q.t.cuda_view("query").py_err(py)?,
                    o.t.cuda_view("out").py_err(py)?,
                );
                let contiguous = q.t.strides[0] == q.t.shape[1] * head_dim
                    && (q.t.shape[1] <= 1 || q.t.strides[1] == head_dim);
                // SAFETY: validated CUDA tensors of this device; the caller keeps them alive
                // until the stream has run the kernels.
                unsafe {
                    crate::attention::attend_cuda(
                        store,
                        &policy,
                        layer,
                        qd,
                        q.t.shape,
                        contiguous,
                        &params,
                        Sinks::device(&sinks),
                        od,
                        s,
                    )
                }
                .py_err(py)
            }
            Inner::Cpu(store) => {
                let qt = q.t;
                let store = &*store;
                let rows = py
                    .detach(|| {
                        with_element!(dtype, E => {
                            // SAFETY: the query's capsule stays alive in this frame until the
                            // call returns, and `out` does not overlap it.
                            let qv = unsafe { qt.view::<E>() };
                            attend(qv, &store.view::<E>(layer)?, &params, Sinks::host(&sinks))
                        })
                    })
                    .py_err(py)?;
                finish_out(py, &q.t, &o, &rows)
            }
        }
    }

    fn finish_step(&self, py: Python<'_>) -> PyResult<()> {
        match &self.inner {
            Inner::Cpu(_) => Ok(()),
            Inner::Cuda(store) => py.detach(|| store.finish_step()).py_err(py),
        }
    }

    #[pyo3(signature = (layer, head_start, num_heads, start, end, key_out, value_out, stream=None))]
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &mut self,
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
        let s = resolve(py, stream, self.device())?;
        let ko = TensorArg::import(key_out, "key_out", true, s)?;
        let vo = TensorArg::import(value_out, "value_out", true, s)?;
        self.check_device("key_out", &ko.t).py_err(py)?;
        self.check_device("value_out", &vo.t).py_err(py)?;
        let Inner::Cuda(store) = &mut self.inner else {
            return Err(Error::type_(
                "key_out",
                "gather copies on the GPU from a CUDA store; a CPU store has read",
            ))
            .py_err(py);
        };
        let c = store.config();
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
        let (kd, vd) = (
            ko.t.cuda_view("key_out").py_err(py)?,
            vo.t.cuda_view("value_out").py_err(py)?,
        );
        // SAFETY: validated CUDA tensors of this device and shape, each addressed with its own
        // strides; the caller keeps them alive until the stream has run the copy.
        unsafe { store.gather(layer, head_start, num_heads, start, end, kd, vd, s) }.py_err(py)
    }

    fn crop(&mut self, py: Python<'_>, length: usize) -> PyResult<()> {
        each!(&mut self.inner, s => py.detach(|| s.crop(length))).py_err(py)
    }

    fn clear(&mut self, py: Python<'_>) -> PyResult<()> {
        each!(&mut self.inner, s => py.detach(|| s.clear())).py_err(py)
    }

    fn checkpoint(&mut self) {
        each!(&mut self.inner, s => s.checkpoint())
    }

    fn commit(&mut self) {
        each!(&mut self.inner, s => s.commit())
    }

    fn rollback(&mut self, py: Python<'_>) -> PyResult<()> {
        each!(&mut self.inner, s => py.detach(|| s.rollback())).py_err(py)
    }

    #[getter]
    fn in_step(&self) -> bool {
        each!(&self.inner, s => s.in_step())
    }

    fn device_bytes_reserved(&self) -> usize {
        each!(&self.inner, s => s.device_bytes_reserved())
    }

    fn device_bytes_used(&self) -> usize {
        each!(&self.inner, s => s.device_bytes_used())
    }

    fn host_bytes_reserved(&self) -> usize {
        each!(&self.inner, s => s.host_bytes_reserved())
    }

    #[getter]
    fn device_budget(&self) -> usize {
        match &self.inner {
            Inner::Cpu(_) => 0,
            Inner::Cuda(s) => s.device_budget(),
        }
    }

    #[setter]
    fn set_device_budget(&mut self, py: Python<'_>, bytes: usize) -> PyResult<()> {
        match &mut self.inner {
            Inner::Cpu(_) => Err(Error::value(
                "device_budget",
                "this store holds CPU tensors",
            ))
            .py_err(py),
            Inner::Cuda(s) => {
                s.set_device_budget(bytes);
                Ok(())
            }
        }
    }

    #[pyo3(signature = (stream=None))]
    fn rebalance(&mut self, py: Python<'_>, stream: Option<usize>) -> PyResult<(usize, usize)> {
        let s = resolve(py, stream, self.device())?;
        match &mut self.inner {
            Inner::Cpu(_) => Ok((0, 0)),
            Inner::Cuda(store) => py.detach(|| store.rebalance(s)).py_err(py),
        }
    }

    #[getter]
    fn is_cuda(&self) -> bool {
        matches!(self.inner, Inner::Cuda(_))
    }

    fn bytes_used(&self) -> usize {
        each!(&self.inner, s => s.bytes_used())
    }

    fn bytes_reserved(&self) -> usize {
        each!(&self.inner, s => s.bytes_reserved())
    }

    fn __repr__(&self) -> String {
        let c = self.config();
        format!(
            "KVStore(num_layers={}, num_kv_heads={}, head_dim={}, dtype='{}', block_size={}, \
             tokens={}, bytes_used={}, bytes_reserved={})",
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            c.dtype.name(),
            c.block_size,
            self.seq_len_or_zero(),
            self.bytes_used(),
            self.bytes_reserved()
        )
    }
}

impl PyKvStore {
    fn seq_len_or_zero(&self) -> usize {
        each!(&self.inner, s => s.seq_len(0).unwrap_or(0))
    }
}

/// Bytes of one token's key (or value) row of one kv head, as a store of `dtype` with
/// `kv_dtype` holds it (what planners count: two rows per token, layer and kv head).
#[pyfunction]
#[pyo3(signature = (head_dim, dtype, kv_dtype=None))]
pub fn kv_row_bytes(
    py: Python<'_>,
    head_dim: usize,
    dtype: &str,
    kv_dtype: Option<&str>,
) -> PyResult<usize> {
    if head_dim == 0 {
        return Err(Error::value("head_dim", "must be at least 1")).py_err(py);
    }
    let dtype = DType::parse("dtype", dtype).py_err(py)?;
    let kv = KvFormat::parse("kv_dtype", kv_dtype, dtype).py_err(py)?;
    Ok(kv.row_bytes(head_dim, dtype))
}
