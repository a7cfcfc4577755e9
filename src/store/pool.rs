//! Block memory and the one block pool type: a free list and counters over an allocator.
//! The allocators (host heap, pinned host, device) are the only place the kinds of memory
//! differ; a CPU store's device pool has no allocator and no room.

use crate::cpu::memory::HostBuf;
use crate::cuda::memory::{DeviceBuf, PinnedBuf};
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::testing::{self, FailPoint};
use std::sync::Arc;

/// Memory of one block of keys or values.
pub enum Mem {
    Heap(HostBuf),
    Pinned(PinnedBuf),
    Device(DeviceBuf),
}

impl Mem {
    /// The host address, for memory the CPU can read (heap or pinned).
    pub fn host_ptr(&self) -> Option<*const u8> {
        match self {
            Mem::Heap(b) => Some(b.as_ptr()),
            Mem::Pinned(b) => Some(b.host_ptr()),
            Mem::Device(_) => None,
        }
    }

    /// The address kernels use: device memory, or pinned memory's mapped address (0 for heap
    /// memory, which no kernel reads).
    pub fn dev_ptr(&self) -> u64 {
        match self {
            Mem::Heap(_) => 0,
            Mem::Pinned(b) => b.dev_ptr(),
            Mem::Device(b) => b.ptr(),
        }
    }

    /// The allocation it lies in (`PinnedBuf::allocation`; heap and device buffers are
    /// allocations of their own): copies may merge only within one.
    pub fn allocation(&self) -> u64 {
        match self {
            Mem::Heap(b) => b.as_ptr() as u64,
            Mem::Pinned(b) => b.allocation(),
            Mem::Device(b) => b.ptr(),
        }
    }

    /// The heap buffer of a CPU store's block.
    pub fn heap(&self) -> Option<&HostBuf> {
        match self {
            Mem::Heap(b) => Some(b),
            _ => None,
        }
    }

    /// The heap buffer of a CPU store's block, to write.
    pub fn heap_mut(&mut self) -> Option<&mut HostBuf> {
        match self {
            Mem::Heap(b) => Some(b),
            _ => None,
        }
    }

    fn release(self) {
        match self {
            // Pinning costs about 2 GB/s: pinned buffers go to the process-wide pool.
            Mem::Pinned(b) => b.give_back(),
            other => drop(other),
        }
    }
}

/// Where a block's memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Host,
    Device,
}

/// Keys and values of `block_size` tokens of one head: each `[block_size, head_dim]`.
pub struct Block {
    pub k: Mem,
    pub v: Mem,
}

impl Block {
    pub fn placement(&self) -> Placement {
        match self.k {
            Mem::Device(_) => Placement::Device,
            _ => Placement::Host,
        }
    }

    fn release(self) {
        self.k.release();
        self.v.release();
    }
}

/// A kind of block memory.
pub trait Allocator: Send + Sync {
    fn placement(&self) -> Placement;
    /// `bytes` of fresh memory.
    fn alloc(&self, bytes: usize) -> Result<Mem>;
}

/// Aligned heap memory (CPU stores).
pub struct HeapAlloc;

impl Allocator for HeapAlloc {
    fn placement(&self) -> Placement {
        Placement::Host
    }
    fn alloc(&self, bytes: usize) -> Result<Mem> {
        HostBuf::new(bytes).map(Mem::Heap)
    }
}

/// Pinned, device-mapped host memory (CUDA stores' host blocks).
pub struct PinnedAlloc(pub Arc<Gpu>);

impl Allocator for PinnedAlloc {
    fn placement(&self) -> Placement {
        Placement::Host
    }
    fn alloc(&self, bytes: usize) -> Result<Mem> {
        PinnedBuf::take_block(&self.0, bytes).map(Mem::Pinned)
    }
}

/// Device memory (CUDA stores' resident blocks).
pub struct DeviceAlloc(pub Arc<Gpu>);

impl Allocator for DeviceAlloc {
    fn placement(&self) -> Placement {
        Placement::Device
    }
    fn alloc(&self, bytes: usize) -> Result<Mem> {
        DeviceBuf::new(&self.0, bytes).map(Mem::Device)
    }
}

/// No device (CPU stores): never asked, since its pool has no room.
pub struct NoDevice;

impl Allocator for NoDevice {
    fn placement(&self) -> Placement {
        Placement::Device
    }
    fn alloc(&self, _bytes: usize) -> Result<Mem> {
        Err(Error::value(
            "device_budget",
            "this store holds CPU tensors",
        ))
    }
}

/// Blocks of one placement: allocated up to a budget, reused through a free list.
pub struct BlockPool {
    alloc: Box<dyn Allocator>,
    /// Bytes of one block's keys (and of its values).
    block_bytes: usize,
    free: Vec<Block>,
    /// Blocks allocated, in use or free.
    allocated: usize,
    /// Most blocks it may allocate (`usize::MAX`: no budget).
    budget: usize,
}

impl BlockPool {
    pub fn new(alloc: Box<dyn Allocator>, block_bytes: usize, budget: usize) -> Self {
        BlockPool {
            alloc,
            block_bytes,
            free: Vec::new(),
            allocated: 0,
            budget,
        }
    }

    pub fn placement(&self) -> Placement {
        self.alloc.placement()
    }

    /// Blocks it can still hand out: free ones, and fresh ones within the budget.
    pub fn room(&self) -> usize {
        self.free.len() + self.budget.saturating_sub(self.allocated)
    }

    pub fn free_len(&self) -> usize {
        self.free.len()
    }

    pub fn allocated(&self) -> usize {
        self.allocated
    }

    /// Bytes held in blocks (keys and values), in use or free.
    pub fn bytes_reserved(&self) -> usize {
        self.allocated * 2 * self.block_bytes
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn set_budget(&mut self, blocks: usize) {
        self.budget = blocks;
    }

    /// A block: a free one, else a fresh one (the budget is the caller's to check: `room`).
    pub fn take(&mut self) -> Result<Block> {
        if let Some(b) = self.free.pop() {
            return Ok(b);
        }
        self.fresh().map(|(b, _)| b)
    }

    /// A freshly allocated block, counted at once; `Ok((block, true))`.
    fn fresh(&mut self) -> Result<(Block, bool)> {
        testing::check(FailPoint::Alloc)?;
        let n = self.block_bytes;
        let k = self.alloc.alloc(n)?;
        let v = self.alloc.alloc(n)?;
        self.allocated += 1;
        Ok((Block { k, v }, true))
    }

    /// A block for a move into this pool: free or fresh, and whether it is fresh (its count
    /// is already taken; `discard` it if the move is abandoned).
    pub fn take_for_move(&mut self) -> Result<(Block, bool)> {
        match self.free.pop() {
            Some(b) => Ok((b, false)),
            None => self.fresh(),
        }
    }

    /// Returns a block to the free list.
    pub fn give(&mut self, b: Block) {
        debug_assert_eq!(b.placement(), self.placement());
        self.free.push(b);
    }

    /// Frees a block for good.
    pub fn discard(&mut self, b: Block) {
        self.allocated -= 1;
        b.release();
    }

    /// Frees free blocks while more are allocated than the budget allows.
    pub fn trim_to_budget(&mut self) {
        while self.allocated > self.budget {
            match self.free.pop() {
                Some(b) => self.discard(b),
                None => break,
            }
        }
    }

    /// Releases every free block (the store is going away).
    pub fn release_free(&mut self) {
        while let Some(b) = self.free.pop() {
            self.discard(b);
        }
    }
}
