//! The shape and policy of a store.

use super::pool::Block;
use crate::cpu::memory;
use crate::error::{Error, Result};
use crate::quant::{KvFormat, Q8};
use crate::tensor::DType;
use std::collections::VecDeque;

/// The shape of a store and its host memory limit.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    /// How keys and values are held: as given (exact) or in the 8-bit format.
    pub kv: KvFormat,
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
    /// Checks that the sizes are non-zero and that everything derived from them fits: a
    /// block's bytes (one allocation), a block for every (layer, kv head), the per-head
    /// bookkeeping (against the host's memory), and with `cuda` the block table and the
    /// kernels' `int` arguments. Errors name the argument; nothing later can overflow.
    pub fn check_sizes(&self, cuda: Option<&CudaConfig>) -> Result<()> {
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
        let (layers, heads, bs) = (self.num_layers, self.num_kv_heads, self.block_size);
        // Keys and values of a block, both, as one `Layout` may hold.
        // A row's bytes, bounded without overflow (int8: values, scales, padding).
        let row = match self.kv {
            KvFormat::Exact => self.head_dim.checked_mul(self.dtype.size()),
            KvFormat::Int8 => self.head_dim.checked_mul(3).and_then(|n| n.checked_add(8)),
        };
        let pair = row
            .and_then(|r| r.checked_mul(bs))
            .and_then(|n| n.checked_mul(2))
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| {
                Error::value(
                    "block_size",
                    format!(
                        "{bs} tokens of head_dim {} make a block too large to allocate",
                        self.head_dim
                    ),
                )
            })?;
        let per_head = std::mem::size_of::<VecDeque<Block>>();
        let bookkeeping = layers
            .checked_mul(heads)
            .filter(|n| n.checked_mul(pair).is_some())
            .and_then(|n| n.checked_mul(per_head))
            .ok_or_else(|| {
                Error::value(
                    "num_kv_heads",
                    format!("{layers} layers x {heads} kv heads overflow the store's sizes"),
                )
            })?;
        let available = memory::available_bytes().unwrap_or(usize::MAX);
        if bookkeeping > available {
            return Err(Error::OutOfHostMemory {
                what: format!("the block lists of {layers} layers x {heads} kv heads"),
                needed: bookkeeping,
                available,
            });
        }
        if let Some(c) = cuda {
            if c.max_len == 0 {
                return Err(Error::value("max_len", "must be at least 1"));
            }
            let max_blocks = c.max_len.div_ceil(bs);
            if i32::try_from(bs).is_err() || i32::try_from(max_blocks).is_err() {
                return Err(Error::value(
                    "max_len",
                    format!(
                        "{} (blocks of {bs} tokens) exceeds the GPU kernels' limit of {} \
                         blocks of at most {} tokens",
                        c.max_len,
                        i32::MAX,
                        i32::MAX
                    ),
                ));
            }
            layers
                .checked_mul(heads)
                .and_then(|n| n.checked_mul(max_blocks))
                .and_then(|n| n.checked_mul(16))
                .filter(|&b| b <= isize::MAX as usize)
                .ok_or_else(|| {
                    Error::value(
                        "max_len",
                        format!(
                            "{}: the block table for {layers} layers x {heads} kv heads would \
                             be too large",
                            c.max_len
                        ),
                    )
                })?;
        }
        Ok(())
    }

    /// `check_sizes`, then the windows: one per layer, none of zero tokens.
    pub(super) fn validate(&self, cuda: Option<&CudaConfig>) -> Result<()> {
        self.check_sizes(cuda)?;
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

    /// Bytes of one token's key (or value) row of one kv head.
    pub fn row_bytes(&self) -> usize {
        self.kv.row_bytes(self.head_dim, self.dtype)
    }

    /// Bytes of one block of keys (or of values): `block_size` rows.
    pub fn block_bytes(&self) -> usize {
        self.block_size * self.row_bytes()
    }

    /// The int8 layout, for an int8 store.
    pub fn q8(&self) -> Option<Q8> {
        (self.kv == KvFormat::Int8).then(|| Q8::new(self.head_dim))
    }
}
