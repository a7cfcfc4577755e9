//! Host memory: aligned buffers for KV blocks of CPU stores, and how much memory the host has
//! left.
//!
//! CUDA stores use pinned memory instead (`cuda::memory`); both sit behind the store's one
//! block pool (`store::pool`).

use crate::error::{Error, Result};
use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every block: a cache line, and enough for any vector load.
const ALIGN: usize = 64;

/// An owned, aligned, zero-initialised host buffer of `len` bytes.
pub struct HostBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `HostBuf` owns its allocation exclusively, like a `Box<[u8]>`.
unsafe impl Send for HostBuf {}
// SAFETY: shared access only reads through `&self`.
unsafe impl Sync for HostBuf {}

impl HostBuf {
    /// Allocates `len` zeroed bytes; `OutOfHostMemory` if the allocator refuses.
    pub fn new(len: usize) -> Result<Self> {
        assert!(len > 0, "HostBuf needs a non-zero length");
        let layout = Layout::from_size_align(len, ALIGN).expect("block layout");
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| Error::OutOfHostMemory {
            what: "a KV block".into(),
            needed: len,
            available: available_bytes().unwrap_or(0),
        })?;
        Ok(HostBuf { ptr, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Always false: buffers are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The buffer as elements of `T` (a plain-old-data KV element type).
    pub fn as_slice<T: crate::tensor::Element>(&self) -> &[T] {
        debug_assert_eq!(self.len % std::mem::size_of::<T>(), 0);
        // SAFETY: the allocation is `len` initialised bytes, aligned to 64 (>= align of T),
        // and every bit pattern is a valid f32/bf16/f16.
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr() as *const T,
                self.len / std::mem::size_of::<T>(),
            )
        }
    }

    /// The buffer's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the allocation is `len` initialised bytes, owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer's bytes, to write.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_bytes`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer as mutable elements of `T`.
    pub fn as_mut_slice<T: crate::tensor::Element>(&mut self) -> &mut [T] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ptr.as_ptr() as *mut T,
                self.len / std::mem::size_of::<T>(),
            )
        }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, ALIGN).expect("block layout");
        // SAFETY: allocated in `new` with this very layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// Bytes the host can still give without swapping (`MemAvailable`), if the OS says.
pub fn available_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_available(&text)
}

fn parse_meminfo_available(text: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(parse_meminfo_available(text), Some(1024 * 1000));
        assert_eq!(parse_meminfo_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn buffers_are_zeroed_and_aligned() {
        let b = HostBuf::new(256).unwrap();
        assert_eq!(b.as_slice::<f32>().len(), 64);
        assert!(b.as_slice::<f32>().iter().all(|&x| x == 0.0));
        assert_eq!(b.as_slice::<f32>().as_ptr() as usize % ALIGN, 0);
    }
}
