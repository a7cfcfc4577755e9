//! Where the bytes are: used and reserved, host and device; and the check that the host can
//! give what a request needs before anything is taken.

use super::pool::Placement;
use super::{Backend, KvStore};
use crate::cpu::memory;
use crate::error::{Error, Result};

impl<B: Backend> KvStore<B> {
    /// Errors unless `blocks` more host blocks fit both the store's limit and the host.
    pub(super) fn check_host_memory(&self, blocks: usize, what: &str) -> Result<()> {
        if blocks == 0 {
            return Ok(());
        }
        let needed = blocks.saturating_mul(2 * self.cfg.block_bytes());
        let os = || memory::available_bytes().unwrap_or(usize::MAX);
        let mut available = os();
        if needed > available {
            // Memory the process pooled counts too, once what these blocks cannot use is gone.
            let pooled = self.backend.reclaim_host(self.cfg.block_bytes());
            available = os().saturating_add(pooled);
        }
        if let Some(limit) = self.cfg.host_memory_limit {
            available = available.min(limit.saturating_sub(self.host_bytes_reserved()));
        }
        if needed > available {
            return Err(Error::OutOfHostMemory {
                what: what.to_string(),
                needed,
                available,
            });
        }
        Ok(())
    }

    /// Bytes of keys and values of the positions held (`start..len` of every layer).
    pub fn bytes_used(&self) -> usize {
        let per_token = 2 * self.cfg.num_kv_heads * self.cfg.row_bytes();
        self.layers
            .iter()
            .map(|l| (l.len - l.start) * per_token)
            .sum()
    }

    /// Bytes of memory held in blocks, in use or free for reuse, host and device.
    pub fn bytes_reserved(&self) -> usize {
        self.host_bytes_reserved() + self.device_bytes_reserved()
    }

    /// Bytes of device memory held in blocks.
    pub fn device_bytes_reserved(&self) -> usize {
        self.device.bytes_reserved()
    }

    /// Bytes of host memory held in blocks.
    pub fn host_bytes_reserved(&self) -> usize {
        self.host.bytes_reserved()
    }

    /// Bytes of keys and values held in device memory (positions in device blocks).
    pub fn device_bytes_used(&self) -> usize {
        let bs = self.cfg.block_size;
        let row = self.cfg.row_bytes() * 2;
        let mut total = 0;
        for l in &self.layers {
            for blocks in &l.heads {
                for (i, b) in blocks.iter().enumerate() {
                    if b.placement() == Placement::Device {
                        let a = l.start + i * bs;
                        total += (a + bs).min(l.len).saturating_sub(a) * row;
                    }
                }
            }
        }
        total
    }
}
