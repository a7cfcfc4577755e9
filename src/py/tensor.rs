//! Tensor arguments from Python: imported through DLPack and validated once.

use super::errors::HeadInferError;
use super::errors::IntoPyResult;
use crate::cuda::Stream;
use crate::error::Error;
use crate::tensor::{Device, Tensor3};
use cudarc::driver::{result as cu, sys};
use dlpark::ffi::{DLDataTypeCode, DLDevice, DLDeviceType};
use dlpark::python::consumer::stream::{self as dlstream, DlpackStream, StreamArg};
use dlpark::python::consumer::{from_dlpack, ImportedDlpack};
use dlpark::DlpackFlags;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;

/// A validated 3-d tensor argument, the DLPack capsule it came from and, for a torch tensor,
/// its storage: held until the call returns, so that another thread's `set_` (or anything
/// else that swaps the tensor's storage) while the GIL is released cannot free the memory
/// under the op. (torch's DLPack export references the tensor, not its storage.)
///
/// What holding the storage cannot cover: a `resize_` that grows the tensor past its
/// storage's bytes reallocates that same storage's memory in place and frees the old bytes,
/// in torch, without the GIL (so holding the GIL while writing `out` does not exclude it
/// either). Like any two threads writing one tensor, that is a data race in torch itself;
/// a `resize_` within the storage's bytes only changes the shape and is safe.
pub struct TensorArg {
    pub t: Tensor3,
    _owner: ImportedDlpack,
    _storage: Option<Py<PyAny>>,
}

/// The consumer stream we hand to `__dlpack__`: CUDA tensors are then ordered on it (torch
/// adds nothing when it is already torch's current stream); CPU tensors take none.
struct ConsumerStream(Stream);

// SAFETY: `wait_for_producer` returns true only once the consumer stream is ordered after
// the producer's work (same stream, or an event recorded there and waited on here).
unsafe impl DlpackStream for ConsumerStream {
    fn as_python_arg(&self, _py: Python<'_>, device: DLDevice) -> PyResult<StreamArg> {
        Ok(if device.device_type == DLDeviceType::CUDA {
            dlstream::cuda(self.0 .0 as *mut std::ffi::c_void)
        } else {
            dlstream::none()
        })
    }

    // Lets dlpark take the C exchange path (no Python `__dlpack__` call, which costs tens of
    // microseconds per tensor on every decode step).
    unsafe fn wait_for_producer(
        &self,
        device: DLDevice,
        producer: *mut std::ffi::c_void,
    ) -> PyResult<bool> {
        if device.device_type != DLDeviceType::CUDA {
            return Ok(true);
        }
        let consumer = self.0 .0;
        if producer as sys::CUstream == consumer {
            return Ok(true);
        }
        let order = || -> crate::Result<()> {
            let gpu = crate::cuda::gpu(device.device_id as usize)?;
            gpu.bind()?;
            let err = |e| crate::cuda::driver_err("ordering streams", e);
            let ev = cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(err)?;
            // SAFETY: `ev` was just created; both streams are live handles of this context
            // (the producer's from torch, ours from the caller). Destroying an event with a
            // pending wait is allowed: the driver frees it once the wait is done.
            unsafe {
                cu::event::record(ev, producer as sys::CUstream).map_err(err)?;
                cu::stream::wait_event(
                    consumer,
                    ev,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(err)?;
                cu::event::destroy(ev).map_err(err)?;
            }
            Ok(())
        };
        order().map_err(|e| super::errors::HeadInferError::new_err(e.to_string()))?;
        Ok(true)
    }
}

impl TensorArg {
    /// Imports `obj` (anything with `__dlpack__`) as the argument named `arg`; CUDA tensors
    /// are ordered on `stream`.
    pub fn import(
        obj: &Bound<'_, PyAny>,
        arg: &str,
        writable: bool,
        stream: Stream,
    ) -> PyResult<Self> {
        let py = obj.py();
        torch_checks(obj, arg)?;
        let consumer = ConsumerStream(stream);
        let owner = from_dlpack(obj.as_borrowed(), Some(&consumer), None).map_err(|e| {
            PyTypeError::new_err(format!(
                "{arg}: expected a tensor that supports DLPack (a torch.Tensor), got {} ({e})",
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        let view = owner
            .validate()
            .map_err(|e| PyTypeError::new_err(format!("{arg}: invalid DLPack tensor: {e}")))?;
        let t = Tensor3::from_dlpack(arg, &view, writable).py_err(py)?;
        if writable {
            t.check_writable(arg, owner.flags().contains(DlpackFlags::READ_ONLY))
                .py_err(py)?;
        }
        // Taken after the export, and checked to own the bytes the export points at: another
        // thread's `set_` between the two would otherwise leave us holding a storage that is
        // not the one the op reads.
        let storage = held_storage(obj, arg, t.byte_range())?;
        Ok(TensorArg {
            t,
            _owner: owner,
            _storage: storage,
        })
    }
}

/// The storage of torch tensor `obj`, to hold for the call, once it is known to own the
/// `(address, length)` bytes the op will touch; `None` for objects that are not torch tensors.
fn held_storage(
    obj: &Bound<'_, PyAny>,
    arg: &str,
    (start, len): (usize, usize),
) -> PyResult<Option<Py<PyAny>>> {
    let py = obj.py();
    let Ok(storage) = obj.call_method0(intern!(py, "untyped_storage")) else {
        return Ok(None);
    };
    let base: usize = storage.call_method0(intern!(py, "data_ptr"))?.extract()?;
    let nbytes: usize = storage.call_method0(intern!(py, "nbytes"))?.extract()?;
    let inside = len == 0
        || (start >= base
            && start
                .checked_add(len)
                .is_some_and(|end| end <= base + nbytes));
    if !inside {
        return Err(PyValueError::new_err(format!(
            "{arg}: the tensor's storage changed while it was being passed (another thread \
             called set_ or resize_ on it); pass a tensor no other thread modifies"
        )));
    }
    Ok(Some(storage.unbind()))
}

/// What torch's own `Tensor.__dlpack__` refuses, and the C exchange path (which dlpark takes,
/// bypassing `__dlpack__`) does not check: a tensor that requires grad (the op is not
/// differentiable: its gradient would silently be missing) and a lazily negated view (its
/// negation would be dropped).
fn torch_checks(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<()> {
    let py = obj.py();
    let Ok(requires_grad) = obj.getattr(intern!(py, "requires_grad")) else {
        return Ok(());
    };
    if requires_grad.is_truthy()? {
        return Err(HeadInferError::new_err(format!(
            "{arg}: the tensor requires grad, but headinfer's attention is not differentiable \
             (training is not supported): run the model under torch.no_grad() or \
             torch.inference_mode(), or pass {arg}.detach()"
        )));
    }
    if let Ok(is_neg) = obj.call_method0(intern!(py, "is_neg")) {
        if is_neg.is_truthy()? {
            return Err(PyTypeError::new_err(format!(
                "{arg}: the tensor is a lazily negated view (is_neg() is True); call \
                 .resolve_neg() first"
            )));
        }
    }
    Ok(())
}

/// The validated `sinks` argument (gpt-oss's learned per-head sink logits): `[num_q_heads]`
/// float32, contiguous, on the query's device. Host values are copied (a few floats); device
/// ones are passed by address, kept alive by the caller like every other CUDA argument.
pub enum Sinks {
    Host(Vec<f32>),
    Device(u64),
}

impl Sinks {
    /// Imports the optional `sinks` argument of a call whose query has `num_q_heads` heads and
    /// lies on `device`; CUDA tensors are ordered on `stream`.
    pub fn import(
        obj: Option<&Bound<'_, PyAny>>,
        num_q_heads: usize,
        device: Device,
        stream: Stream,
    ) -> PyResult<Option<Self>> {
        let Some(obj) = obj.filter(|o| !o.is_none()) else {
            return Ok(None);
        };
        let py = obj.py();
        let consumer = ConsumerStream(stream);
        let owner = from_dlpack(obj.as_borrowed(), Some(&consumer), None).map_err(|e| {
            PyTypeError::new_err(format!(
                "sinks: expected a float32 tensor that supports DLPack (a torch.Tensor), got \
                 {} ({e})",
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        let t = owner
            .validate()
            .map_err(|e| PyTypeError::new_err(format!("sinks: invalid DLPack tensor: {e}")))?;
        let dev = t.device();
        let got = match dev.device_type {
            DLDeviceType::CPU | DLDeviceType::CUDAHOST => Device::Cpu,
            DLDeviceType::CUDA => Device::Cuda(dev.device_id as usize),
            other => {
                return Err(Error::type_(
                    "sinks",
                    format!(
                        "tensor is on DLPack device type {}; expected {device:?}",
                        other.0
                    ),
                ))
                .py_err(py)
            }
        };
        crate::tensor::same_device_as("sinks", got, device).py_err(py)?;
        let dt = t.dtype();
        if (dt.code, dt.bits, dt.lanes) != (DLDataTypeCode::FLOAT, 32, 1) {
            return Err(Error::type_(
                "sinks",
                format!(
                    "must be float32 (DLPack code {}, {} bits, {} lanes given); convert with \
                     .float()",
                    dt.code.0, dt.bits, dt.lanes
                ),
            ))
            .py_err(py);
        }
        let shape = t.shape();
        if shape != [num_q_heads as i64] {
            return Err(Error::value(
                "sinks",
                format!("expected shape [num_q_heads] = [{num_q_heads}], got {shape:?}"),
            ))
            .py_err(py);
        }
        let strides = t
            .strides_or_compact()
            .map_err(|e| Error::value("sinks", format!("bad strides: {e}")))
            .py_err(py)?;
        if num_q_heads > 1 && strides[0] != 1 {
            return Err(Error::value(
                "sinks",
                format!(
                    "must be contiguous, got stride {}; call .contiguous()",
                    strides[0]
                ),
            ))
            .py_err(py);
        }
        // The producer's base plus its byte offset stays inside its allocation (DLPack).
        let addr = t.data_ptr() as usize + t.byte_offset() as usize;
        if !addr.is_multiple_of(4) {
            return Err(Error::value("sinks", "is not 4-byte aligned")).py_err(py);
        }
        Ok(Some(match got {
            Device::Cpu => {
                let vals = if num_q_heads == 0 {
                    Vec::new()
                } else {
                    // SAFETY: a CPU float32 tensor of `num_q_heads` contiguous, aligned
                    // elements at `addr` (checked above), alive while `owner` is, which
                    // outlives this copy.
                    unsafe { std::slice::from_raw_parts(addr as *const f32, num_q_heads) }.to_vec()
                };
                Sinks::Host(vals)
            }
            Device::Cuda(_) => Sinks::Device(addr as u64),
        }))
    }

    /// The host values, for the CPU op (`None` for device sinks).
    pub fn host(sinks: &Option<Sinks>) -> Option<&[f32]> {
        match sinks {
            Some(Sinks::Host(v)) => Some(v),
            _ => None,
        }
    }

    /// The device address, for the GPU kernels (`None` for host sinks).
    pub fn device(sinks: &Option<Sinks>) -> Option<u64> {
        match sinks {
            Some(Sinks::Device(a)) => Some(*a),
            _ => None,
        }
    }
}

/// The stream argument of a call: torch's `cuda_stream` handle, or the default stream.
pub fn stream_arg(stream: Option<usize>) -> Stream {
    Stream(stream.unwrap_or(0) as cudarc::driver::sys::CUstream)
}
