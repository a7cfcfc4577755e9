//! The `stream` argument: a raw CUDA stream handle, or `None` for torch's current stream on the
//! tensors' device (the stream torch itself orders its work on), so that a call without a
//! stream is never unordered with torch's work. Without torch imported, `None` is the legacy
//! default stream, which synchronizes with every blocking stream.

use crate::cuda::Stream;
use crate::tensor::Device;
use pyo3::prelude::*;

/// The stream for work on `device`: `stream` as given, else torch's current stream there.
pub fn resolve(py: Python<'_>, stream: Option<usize>, device: Device) -> PyResult<Stream> {
    let raw = match (stream, device) {
        (Some(s), _) => s,
        (None, Device::Cpu) => 0,
        (None, Device::Cuda(ordinal)) => torch_current_stream(py, ordinal)?,
    };
    Ok(Stream(raw as cudarc::driver::sys::CUstream))
}

/// torch's current stream on `ordinal`, or 0 (the legacy default stream) without torch.
fn torch_current_stream(py: Python<'_>, ordinal: usize) -> PyResult<usize> {
    let modules = py.import("sys")?.getattr("modules")?;
    if !modules.contains("torch")? {
        return Ok(0);
    }
    let torch = py.import("torch")?;
    // The raw getter skips building a Stream object.
    if let Ok(raw) = torch.getattr("_C")?.getattr("_cuda_getCurrentRawStream") {
        return raw.call1((ordinal,))?.extract();
    }
    torch
        .getattr("cuda")?
        .getattr("current_stream")?
        .call1((ordinal,))?
        .getattr("cuda_stream")?
        .extract()
}

/// The device of a DLPack object, read before importing it (its stream depends on it);
/// `Device::Cpu` when it does not say (the import then reports what is wrong).
pub fn device_of(obj: &Bound<'_, PyAny>) -> Device {
    let Ok(dev) = obj.call_method0("__dlpack_device__") else {
        return Device::Cpu;
    };
    match dev.extract::<(i32, usize)>() {
        // kDLCUDA
        Ok((2, id)) => Device::Cuda(id),
        _ => Device::Cpu,
    }
}
