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

/// Whether the int8 decode runs through the CPU's tile unit (AMX, opt-in with
/// `HEADINFER_CPU_AMX=1`): `"on"`, `"off"` (not asked for, or not x86-64), or
/// `"unavailable: <reason>"`.
#[pyfunction]
pub fn cpu_amx() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        match simd::amx_status() {
            Ok(true) => "on".into(),
            Ok(false) => "off".into(),
            Err(e) => format!("unavailable: {e}"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "off".into()
    }
}
