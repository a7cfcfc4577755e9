//! The crate's one error type. `py::errors` maps it to Python exceptions.

use std::fmt;

/// Every failure the core reports. Messages name the argument and what was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument has the right type but a bad value (shape, range, length, device ordinal).
    #[error("{arg}: {msg}")]
    Value { arg: String, msg: String },
    /// An argument has the wrong type (dtype, device kind, layout).
    #[error("{arg}: {msg}")]
    Type { arg: String, msg: String },
    /// A request needs more host memory than is available; nothing was allocated.
    #[error(
        "out of host memory: {what} needs {needed} bytes ({}) but {available} bytes ({}) are available",
        Gib(*needed),
        Gib(*available)
    )]
    OutOfHostMemory {
        what: String,
        needed: usize,
        available: usize,
    },
    /// A CUDA driver call failed: what we were doing, and the driver's own code and name.
    #[error("CUDA: {op} failed: {name} (CUresult {code})")]
    Cuda { op: String, code: u32, name: String },
    /// The CUDA driver or NVRTC is missing, or NVRTC refused our kernels.
    #[error("CUDA: {0}")]
    CudaUnavailable(String),
    /// The host worker of a shared decode failed (its own error, or a panic).
    #[error("the CPU share of a decode step failed: {0}")]
    Worker(Box<Error>),
    /// A panic caught before it could cross into Python.
    #[error("internal error: {0}")]
    Panic(String),
    /// A failure injected by a test (see `crate::testing`); never raised otherwise.
    #[error("injected failure at {0} (test-only hook)")]
    Injected(&'static str),
}

/// Shorthand used throughout the core.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A bad value for the argument `arg`.
    pub fn value(arg: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Value {
            arg: arg.into(),
            msg: msg.into(),
        }
    }

    /// A bad type (dtype, device, layout) for the argument `arg`.
    pub fn type_(arg: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Type {
            arg: arg.into(),
            msg: msg.into(),
        }
    }

    /// A failed driver call, keeping the driver's code.
    pub fn cuda(op: impl Into<String>, e: cudarc::driver::DriverError) -> Self {
        Error::Cuda {
            op: op.into(),
            code: e.0 as u32,
            name: format!("{:?}", e.0),
        }
    }
}

/// Bytes shown in GiB, for messages people read.
struct Gib(usize);

impl fmt::Display for Gib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} GiB", self.0 as f64 / (1u64 << 30) as f64)
    }
}
