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

/// Unpins the reuse pool (like ``torch.cuda.empty_cache()`` for headinfer's host memory);
/// with `keep`, all but its buffers for KV blocks of `keep` bytes (what a store does itself
/// when the host's free memory falls short). Returns the pooled bytes kept.
#[pyfunction]
#[pyo3(signature = (keep=0))]
pub fn release_pinned_pool(keep: usize) -> usize {
    if keep == 0 {
        memory::release_pinned_pool();
        0
    } else {
        memory::reclaim_pinned_for(keep)
    }
}

/// Bytes of device memory headinfer holds in KV blocks, over all caches.
#[pyfunction]
pub fn device_block_bytes() -> usize {
    memory::device_bytes()
}
