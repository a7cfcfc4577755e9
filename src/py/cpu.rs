//! The CPU attention's instruction set, as chosen for this process (`crate::cpu::simd`).

use crate::cpu::simd;
use pyo3::prelude::*;

/// The set the CPU attention runs: `"avx512"`, `"avx2"` or `"scalar"`.
#[pyfunction]
pub fn cpu_isa() -> &'static str {
    simd::choice().isa.name()
}

/// Per wider set this CPU has but whose kernels failed the self-check: `"<name>: <reason>"`.
#[pyfunction]
pub fn cpu_isa_failures() -> Vec<String> {
    simd::choice().failures.clone()
}
