//! The crate's one error type. `py::errors` maps it to Python exceptions.

use std::fmt;

/// Every failure the core reports. Messages name the argument and what was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument has the right type but a bad value (shape, range, length).
    #[error("{arg}: {msg}")]
    Value { arg: String, msg: String },
    /// An argument has the wrong type (dtype, device, layout).
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
    /// The CUDA driver or NVRTC failed or is missing.
    #[error("CUDA: {0}")]
    Cuda(String),
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
}

/// Bytes shown in GiB, for messages people read.
struct Gib(usize);

impl fmt::Display for Gib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} GiB", self.0 as f64 / (1u64 << 30) as f64)
    }
}
