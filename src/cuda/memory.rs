//! Pinned host memory and device memory for KV blocks.
//!
//! Pinned memory is allocated portable and mapped, without the write-combined flag: the GPU
//! reads it directly over PCIe, and the CPU can still read it fast (for attention computed on
//! the host later). Pinning costs about 2 GB/s, so freed pinned buffers go to a process-wide
//! pool, by size, and are reused by later caches; `release_pinned_pool` gives them back.

use super::{driver_err, Gpu};
use crate::error::{Error, Result};
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Page-locked host memory, mapped into the GPU's address space.
pub struct PinnedBuf {
    host: *mut u8,
    dev: u64,
    len: usize,
}

// SAFETY: owned exclusively, like a `Box<[u8]>`; the pointers are plain addresses.
unsafe impl Send for PinnedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for PinnedBuf {}

static PINNED_BYTES: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Mutex<HashMap<usize, Vec<PinnedBuf>>>> = OnceLock::new();

fn pool() -> &'static Mutex<HashMap<usize, Vec<PinnedBuf>>> {
    POOL.get_or_init(|| Mutex::new(HashMap::new()))
}

impl PinnedBuf {
    /// `len` bytes, from the pool if it has a buffer of that size, else freshly pinned.
    pub fn take(gpu: &Gpu, len: usize) -> Result<Self> {
        if let Some(b) = pool()
            .lock()
            .expect("pool")
            .get_mut(&len)
            .and_then(|v| v.pop())
        {
            return Ok(b);
        }
        gpu.bind()?;
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: a plain allocation call; the result is checked.
        let host = unsafe { cu::malloc_host(len, flags) }.map_err(|e| Error::OutOfHostMemory {
            what: format!("pinning a {len}-byte KV block ({e:?})"),
            needed: len,
            available: crate::cpu::memory::available_bytes().unwrap_or(0),
        })? as *mut u8;
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: `host` was just allocated with DEVICEMAP, so it has a device address.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host as *mut _, 0) }.result();
        if let Err(e) = r {
            // SAFETY: allocated above by `malloc_host`, freed once.
            let _ = unsafe { cu::free_host(host as *mut _) };
            return Err(driver_err("mapping pinned memory", e));
        }
        PINNED_BYTES.fetch_add(len, Ordering::Relaxed);
        Ok(PinnedBuf { host, dev, len })
    }

    /// No memory (what an owner leaves behind after giving its buffer back).
    pub fn empty() -> Self {
        PinnedBuf {
            host: std::ptr::null_mut(),
            dev: 0,
            len: 0,
        }
    }

    /// Returns the buffer to the pool for reuse.
    pub fn give_back(self) {
        if self.len == 0 {
            return;
        }
        pool()
            .lock()
            .expect("pool")
            .entry(self.len)
            .or_default()
            .push(self);
    }

    pub fn dev_ptr(&self) -> u64 {
        self.dev
    }

    pub fn host_ptr(&self) -> *mut u8 {
        self.host
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        if self.host.is_null() {
            return;
        }
        // SAFETY: allocated by `malloc_host` in `take`, freed once; nothing else owns it.
        let _ = unsafe { cu::free_host(self.host as *mut _) };
        PINNED_BYTES.fetch_sub(self.len, Ordering::Relaxed);
    }
}

/// Bytes of pinned memory allocated by headinfer: in caches and in the pool.
pub fn pinned_bytes() -> usize {
    PINNED_BYTES.load(Ordering::Relaxed)
}

/// Bytes of pinned memory held in the pool, free for reuse.
pub fn pooled_bytes() -> usize {
    pool()
        .lock()
        .expect("pool")
        .iter()
        .map(|(len, v)| len * v.len())
        .sum()
}

/// Unpins every pooled buffer.
pub fn release_pinned_pool() {
    let drained: Vec<Vec<PinnedBuf>> = pool()
        .lock()
        .expect("pool")
        .drain()
        .map(|(_, v)| v)
        .collect();
    drop(drained);
}

/// Device memory from `cuMemAlloc`.
pub struct DeviceBuf {
    gpu: Arc<Gpu>,
    ptr: u64,
    len: usize,
}

static DEVICE_BYTES: AtomicUsize = AtomicUsize::new(0);

impl DeviceBuf {
    pub fn new(gpu: &Arc<Gpu>, len: usize) -> Result<Self> {
        gpu.bind()?;
        // SAFETY: a plain allocation call; the result is checked.
        let ptr = unsafe { cu::malloc_sync(len) }
            .map_err(|e| driver_err("allocating device memory", e))?;
        DEVICE_BYTES.fetch_add(len, Ordering::Relaxed);
        Ok(DeviceBuf {
            gpu: gpu.clone(),
            ptr,
            len,
        })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: allocated by `malloc_sync` in `new`, freed once. cuMemFree waits for
            // work that may still read it.
            let _ = unsafe { cu::free_sync(self.ptr) };
        }
        DEVICE_BYTES.fetch_sub(self.len, Ordering::Relaxed);
    }
}

/// Bytes of device memory headinfer holds in KV blocks.
pub fn device_bytes() -> usize {
    DEVICE_BYTES.load(Ordering::Relaxed)
}
