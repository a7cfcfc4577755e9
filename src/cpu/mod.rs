//! The host side's plumbing and math: aligned block memory and what the host has left
//! (`memory`), vectorisable elementwise math for the attention kernel (`math`), and its
//! explicit SIMD hot loops, chosen at run time (`simd`).

pub mod math;
pub mod memory;
pub mod simd;
