//! headinfer: exact long-context inference with a head-wise KV cache in host memory.
//!
//! The core (everything outside `py`) has no PyO3 in it; `py` is the thin binding layer that
//! builds the Python module `headinfer._core`. Modules depend downwards only: `error`,
//! `tensor` <- `quant` (the 8-bit KV format) <- `cpu`, `cuda` <- `store` <- `attention` <- `py`; `plan` stands alone.
//! `docs/architecture.md` describes the layout.

pub mod attention;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod plan;
pub mod quant;
pub mod store;
pub mod tensor;
pub mod testing;

mod py;

#[cfg(test)]
#[path = "../tests/rust/common.rs"]
mod test_common;

pub use error::{Error, Result};
