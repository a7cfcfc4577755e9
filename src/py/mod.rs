//! The binding layer: `#[pyclass]`/`#[pyfunction]` wrappers over the core, one file per
//! exposed concept. Arguments are validated here, on entry; heavy work runs with the GIL
//! released.

mod attention;
mod cpu;
mod errors;
mod memory;
mod plan;
mod policy;
mod store;
mod stream;
mod tensor;
mod testing;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("HeadInferError", py.get_type::<errors::HeadInferError>())?;
    m.add("OutOfHostMemoryError", errors::out_of_host_memory_type(py)?)?;
    m.add_class::<store::PyKvStore>()?;
    m.add_function(wrap_pyfunction!(store::kv_row_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(attention::attention, m)?)?;
    m.add_class::<plan::PyModelShape>()?;
    m.add_class::<plan::PyPlan>()?;
    m.add_function(wrap_pyfunction!(plan::plan, m)?)?;
    m.add_function(wrap_pyfunction!(policy::measure_cpu_rate, m)?)?;
    m.add_function(wrap_pyfunction!(policy::measure_gpu_rates, m)?)?;
    m.add_function(wrap_pyfunction!(policy::share_split, m)?)?;
    m.add_function(wrap_pyfunction!(testing::_inject_failure, m)?)?;
    m.add_function(wrap_pyfunction!(memory::cuda_status, m)?)?;
    m.add_function(wrap_pyfunction!(cpu::cpu_isa, m)?)?;
    m.add_function(wrap_pyfunction!(cpu::cpu_isa_failures, m)?)?;
    m.add_function(wrap_pyfunction!(memory::pinned_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(memory::pinned_pool_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(memory::release_pinned_pool, m)?)?;
    m.add_function(wrap_pyfunction!(memory::device_block_bytes, m)?)?;
    Ok(())
}
