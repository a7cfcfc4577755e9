//! Tensor arguments from Python: imported through DLPack and validated once.

use super::errors::IntoPyResult;
use crate::tensor::Tensor3;
use dlpark::python::consumer::{from_dlpack, ImportedDlpack};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

/// A validated 3-d tensor argument and the DLPack capsule that keeps its memory alive.
pub struct TensorArg {
    pub t: Tensor3,
    _owner: ImportedDlpack,
}

impl TensorArg {
    /// Imports `obj` (anything with `__dlpack__`) as the argument named `arg`.
    pub fn import(obj: &Bound<'_, PyAny>, arg: &str, writable: bool) -> PyResult<Self> {
        let py = obj.py();
        let owner = from_dlpack(obj.as_borrowed(), None, None).map_err(|e| {
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
        Ok(TensorArg { t, _owner: owner })
    }
}
