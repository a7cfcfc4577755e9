//! Who attends where in a decode step of a CUDA store: the policy beside its mechanism
//! (`shared`).
//!
//! The GPU kernel reads host-resident blocks over PCIe; the host's cores can read the same
//! pinned memory at the same time. The policy picks, per layer and step, which keys the CPU
//! takes: today kv heads `0..cpu_heads` from their first host block on (0: never), once the
//! host part is long enough to repay the hand-off. Its output (`Split`) is per head a range,
//! so a later policy can choose heads and ranges from measured rates instead.

use crate::cuda::kernels::MAX_CPU_HEADS;
use crate::error::{Error, Result};
use crate::store::DeviceLayer;

/// Below this many host tokens in a head, the hand-off costs more than the CPU saves.
pub const MIN_HOST_TOKENS: usize = 8192;

/// Bytes per second one core of the CPU kernel reads from pinned memory while the GPU streams
/// the rest (38 GB/s on 16 threads of the H200 host), and what the GPU kernel reads over PCIe
/// (51 GB/s); see BENCHMARKS.md.
const CORE_GBS: f64 = 2.4;
const PCIE_GBS: f64 = 51.0;

/// The CPU's part of one decode step: for kv heads `0..from.len()`, the keys `from[h]..len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub from: Vec<usize>,
}

/// How a store splits decode attention between the CPU and the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharePolicy {
    /// Kv heads whose host blocks the CPU takes (0: the GPU reads everything).
    pub cpu_heads: usize,
    /// The least host tokens (of the longest share) that make a split worth it.
    pub min_host_tokens: usize,
}

impl Default for SharePolicy {
    fn default() -> Self {
        SharePolicy {
            cpu_heads: 0,
            min_host_tokens: MIN_HOST_TOKENS,
        }
    }
}

impl SharePolicy {
    /// Checks `cpu_heads` against a store of `num_kv_heads` heads.
    pub fn check(cpu_heads: usize, num_kv_heads: usize) -> Result<()> {
        let most = num_kv_heads.min(MAX_CPU_HEADS);
        if cpu_heads > most {
            return Err(Error::value(
                "cpu_heads",
                format!("must be between 0 and {most} (the store's kv heads, at most {MAX_CPU_HEADS}), got {cpu_heads}"),
            ));
        }
        Ok(())
    }

    /// The split of one attention call of `q_len` queries per head (`contiguous`: the query
    /// is `[num_q_heads, 1, head_dim]` with packed rows) over `layer`, or `None` for the GPU
    /// alone.
    pub fn split(&self, q_len: usize, contiguous: bool, layer: &DeviceLayer<'_>) -> Option<Split> {
        if self.cpu_heads == 0 || q_len != 1 || !contiguous {
            return None;
        }
        let heads = self.cpu_heads.min(layer.num_kv_heads()).min(MAX_CPU_HEADS);
        self.decide(layer.len(), &layer.host_tails(heads))
    }

    /// The decision itself, pure: `tails[h]` is where head `h`'s host blocks start (`len`:
    /// none; `None`: a device block after a host block, which the kernel cannot skip). Every
    /// head asked about must be splittable, some must have host tokens, and the longest share
    /// at least `min_host_tokens`.
    pub fn decide(&self, len: usize, tails: &[Option<usize>]) -> Option<Split> {
        if tails.is_empty() {
            return None;
        }
        let from: Vec<usize> = tails.iter().copied().collect::<Option<_>>()?;
        let first = *from.iter().min()?;
        if first >= len || len - first < self.min_host_tokens.max(1) {
            return None;
        }
        Some(Split { from })
    }
}

/// Kv heads whose host blocks the CPU should take on this host: its share of host plus PCIe
/// bandwidth, from `cores` threads (an estimate until the rates are measured per machine).
pub fn estimate_cpu_heads(num_kv_heads: usize, cores: usize) -> usize {
    let cpu = CORE_GBS * cores.max(1) as f64;
    let heads = (num_kv_heads as f64 * cpu / (cpu + PCIE_GBS)).round() as usize;
    heads.min(num_kv_heads).min(MAX_CPU_HEADS)
}

#[cfg(test)]
#[path = "../../tests/rust/attention/policy.rs"]
mod tests;
