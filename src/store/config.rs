//! The shape and policy of a store.

use crate::error::{Error, Result};
use crate::tensor::DType;

/// The shape of a store and its host memory limit.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    /// Tokens per block.
    pub block_size: usize,
    /// Per layer: the sliding window in tokens, or `None` for full attention.
    pub windows: Vec<Option<usize>>,
    /// Bytes the store may reserve in all; `None`: whatever the host has available.
    pub host_memory_limit: Option<usize>,
}

/// Where a CUDA store keeps blocks: device memory up to a budget, the rest pinned on the host.
#[derive(Clone, Debug)]
pub struct CudaConfig {
    pub ordinal: usize,
    /// Bytes of device memory the store may fill with KV blocks.
    pub device_budget: usize,
    /// Longest sequence the store will hold (sizes the block table).
    pub max_len: usize,
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("num_layers", self.num_layers),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("block_size", self.block_size),
        ] {
            if v == 0 {
                return Err(Error::value(name, "must be at least 1"));
            }
        }
        let block = self
            .block_size
            .checked_mul(self.head_dim)
            .and_then(|n| n.checked_mul(2 * self.dtype.size()))
            .filter(|&b| b <= isize::MAX as usize);
        if block.is_none() {
            return Err(Error::value(
                "block_size",
                format!(
                    "{} tokens of head_dim {} make a block too large to allocate",
                    self.block_size, self.head_dim
                ),
            ));
        }
        if self.windows.len() != self.num_layers {
            return Err(Error::value(
                "windows",
                format!(
                    "has {} entries, expected one per layer ({})",
                    self.windows.len(),
                    self.num_layers
                ),
            ));
        }
        if let Some(i) = self.windows.iter().position(|w| *w == Some(0)) {
            return Err(Error::value(
                "windows",
                format!("layer {i}: a window must be at least 1 token"),
            ));
        }
        Ok(())
    }

    /// Bytes of one block of keys (or of values): `block_size * head_dim` elements.
    pub fn block_bytes(&self) -> usize {
        self.block_size * self.head_dim * self.dtype.size()
    }
}
