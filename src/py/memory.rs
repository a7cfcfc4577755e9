//! Process-wide memory figures and the pinned pool, for users and tests.

use crate::cuda::memory;
use pyo3::prelude::*;

/// `None` when the CUDA driver and NVRTC load; else what is missing.
#[pyfunction]
pub fn cuda_status() -> Option<String> {
    crate::cuda::check_libraries().err().map(|e| e.to_string())
}

/// Bytes of pinned host memory headinfer holds: in caches and in the reuse pool.
#[pyfunction]
pub fn pinned_bytes() -> usize {
    memory::pinned_bytes()
}

/// Bytes of pinned host memory in the reuse pool.
#[pyfunction]
pub fn pinned_pool_bytes() -> usize {
    memory::pooled_bytes()
}

/// Unpins the reuse pool (like ``torch.cuda.empty_cache()`` for headinfer's host memory).
#[pyfunction]
pub fn release_pinned_pool() {
    memory::release_pinned_pool();
}

/// Bytes of device memory headinfer holds in KV blocks, over all caches.
#[pyfunction]
pub fn device_block_bytes() -> usize {
    memory::device_bytes()
}
