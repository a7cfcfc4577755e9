//! The core's `Error` as Python exceptions.

use crate::error::Error;
use pyo3::exceptions::{PyException, PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

pyo3::create_exception!(
    headinfer,
    HeadInferError,
    PyException,
    "Base class of every error raised by headinfer."
);

static OUT_OF_HOST_MEMORY: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `OutOfHostMemoryError(HeadInferError, MemoryError)`: built with `type()`, since
/// `create_exception!` takes one base and users should be able to catch either.
pub fn out_of_host_memory_type(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    OUT_OF_HOST_MEMORY
        .get_or_try_init(py, || {
            let bases = PyTuple::new(
                py,
                [
                    py.get_type::<HeadInferError>(),
                    py.get_type::<PyMemoryError>(),
                ],
            )?;
            let ns = PyDict::new(py);
            ns.set_item("__module__", "headinfer")?;
            ns.set_item(
                "__doc__",
                "A request needs more host memory than is available; nothing was allocated.\n\n\
                 ``needed`` and ``available`` are in bytes.",
            )?;
            let t = py
                .get_type::<PyType>()
                .call1(("OutOfHostMemoryError", bases, ns))?;
            Ok::<_, PyErr>(t.cast_into::<PyType>()?.unbind())
        })
        .map(|t| t.bind(py))
}

/// Converts a core error into the matching Python exception.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Value { .. } => PyValueError::new_err(msg),
        Error::Type { .. } => PyTypeError::new_err(msg),
        Error::Cuda { .. }
        | Error::CudaUnavailable(_)
        | Error::Worker(_)
        | Error::Panic(_)
        | Error::Injected(_) => HeadInferError::new_err(msg),
        Error::OutOfHostMemory {
            needed, available, ..
        } => {
            let build = || -> PyResult<PyErr> {
                let inst = out_of_host_memory_type(py)?.call1((msg.clone(),))?;
                inst.setattr("needed", needed)?;
                inst.setattr("available", available)?;
                Ok(PyErr::from_value(inst))
            };
            build().unwrap_or_else(|err| err)
        }
    }
}

/// `Result` of the core into `PyResult`.
pub trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for crate::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
