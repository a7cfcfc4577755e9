//! `_inject_failure`: the TEST-ONLY failure hook of `crate::testing`, for tests that prove a
//! failure raises in its step and leaves the cache usable. Never called by the library.

use super::errors::IntoPyResult;
use crate::testing::{self, FailPoint};
use pyo3::prelude::*;

/// Arms `point` to fail once after `after` more passes; `None` disarms every point.
#[pyfunction]
#[pyo3(signature = (point, after=0))]
pub fn _inject_failure(py: Python<'_>, point: Option<&str>, after: usize) -> PyResult<()> {
    match point {
        None => testing::disarm_all(),
        Some(name) => testing::arm(FailPoint::parse("point", name).py_err(py)?, after),
    }
    Ok(())
}
