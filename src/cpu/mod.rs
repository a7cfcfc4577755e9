//! The host side's plumbing and math: aligned block memory and what the host has left
//! (`memory`), and vectorisable elementwise math for the attention kernel (`math`).

pub mod math;
pub mod memory;
