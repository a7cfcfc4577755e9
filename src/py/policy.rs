//! `default_cpu_heads`: the CPU-share policy's estimate, for users choosing `cpu_heads`.

use crate::attention::policy::estimate_cpu_heads;
use pyo3::prelude::*;

/// Kv heads whose host blocks the CPU should take on this host, from the threads it has.
#[pyfunction]
pub fn default_cpu_heads(num_kv_heads: usize) -> usize {
    estimate_cpu_heads(num_kv_heads, rayon::current_num_threads())
}
