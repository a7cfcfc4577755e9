//! CUDA from Rust without build-time CUDA: the driver and NVRTC are loaded at run time
//! (cudarc, dynamic loading), the primary context is shared with PyTorch, and work is ordered
//! on the stream the caller passes (torch's current stream).
//!
//! Plumbing only: the context (`Gpu`), memory (`memory`), streams and events (`stream`), the
//! compiled kernels and their typed launches (`kernels`), and the hand-off of stream work to a
//! host thread with no host function (`handoff`). What to compute lives in `attention` and
//! `store`.

pub mod handoff;
pub mod kernels;
pub mod memory;
pub mod ring;
pub mod stream;

use crate::error::{Error, Result};
use crate::quant::KvFormat;
use crate::tensor::DType;
use cudarc::driver::result as cu;
use cudarc::driver::{sys, CudaContext, DriverError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub use kernels::Kernels;
pub use stream::Stream;

/// One GPU: its primary context and the kernels compiled for it.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    pub ordinal: usize,
    pub sm_count: usize,
    pub compute_capability: (i32, i32),
    /// Keyed by (dtype, head_dim, int8 format).
    kernels: Mutex<HashMap<(DType, usize, bool), Arc<Kernels>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu(cuda:{})", self.ordinal)
    }
}

/// A failed driver call as the crate's typed error (the driver's code is kept).
pub(crate) fn driver_err(what: &str, e: DriverError) -> Error {
    Error::cuda(what, e)
}

/// Whether the CUDA driver and NVRTC libraries can be loaded; `Err` says which is missing.
pub fn check_libraries() -> Result<()> {
    // SAFETY: only probes for the libraries; loads them if present.
    let driver = unsafe { sys::is_culib_present() };
    // SAFETY: as above.
    let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    match (driver, nvrtc) {
        (true, true) => Ok(()),
        (false, _) => Err(Error::CudaUnavailable(
            "the CUDA driver library (libcuda.so.1) could not be loaded: is an NVIDIA driver \
             installed and on the loader path?"
                .into(),
        )),
        (true, false) => Err(Error::CudaUnavailable(
            "NVRTC (libnvrtc.so) could not be loaded: install the CUDA runtime compiler, e.g. \
             `pip install nvidia-cuda-nvrtc`, or add its folder to LD_LIBRARY_PATH"
                .into(),
        )),
    }
}

static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();

/// The GPU `ordinal`, its primary context retained (the one PyTorch uses).
pub fn gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    let mut map = GPUS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(g) = map.get(&ordinal) {
        return Ok(g.clone());
    }
    check_libraries()?;
    let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("opening the CUDA device", e))?;
    let sm_count = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| driver_err("reading the SM count", e))? as usize;
    let compute_capability = ctx
        .compute_capability()
        .map_err(|e| driver_err("reading the compute capability", e))?;
    let g = Arc::new(Gpu {
        ctx,
        ordinal,
        sm_count,
        compute_capability,
        kernels: Mutex::new(HashMap::new()),
    });
    map.insert(ordinal, g.clone());
    Ok(g)
}

impl Gpu {
    /// Makes this GPU's primary context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("binding the CUDA context", e))
    }

    /// The context, for cudarc's typed APIs (modules, launch builder).
    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The kernels for `dtype`, `head_dim` and blocks of format `kv`, compiled by NVRTC on
    /// first use.
    pub fn kernels(&self, dtype: DType, head_dim: usize, kv: KvFormat) -> Result<Arc<Kernels>> {
        let key = (dtype, head_dim, kv == KvFormat::Int8);
        let mut map = self.kernels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = map.get(&key) {
            return Ok(k.clone());
        }
        self.bind()?;
        let k = Arc::new(Kernels::compile(self, dtype, head_dim, kv)?);
        map.insert(key, k.clone());
        Ok(k)
    }

    /// Waits for all work on the device (used only where memory the GPU may read is reused).
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        cu::ctx::synchronize().map_err(|e| driver_err("synchronizing the device", e))
    }
}
