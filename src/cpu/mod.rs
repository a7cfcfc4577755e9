//! Attention on the CPU: the reference for every other path, and the path of CPU-only users.

pub mod attention;
mod math;
