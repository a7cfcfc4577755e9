//! Pinned host memory and device memory for KV blocks.
//!
//! Pinned memory is portable and mapped, never write-combined: the GPU reads it directly over
//! PCIe, and the CPU can still read it fast (for attention computed on the host later). Slabs
//! are huge pages registered with the driver (about 23 GB/s to pin); smaller allocations come
//! from `cuMemHostAlloc` (about 2 GB/s). Either way pinning costs time, so freed pinned buffers
//! go to a process-wide pool, by size, and are reused by later caches; `release_pinned_pool`
//! gives them back.
//!
//! KV blocks are carved from slabs (`PinnedBuf::take_block`): a million-token cache holds
//! over a million blocks, and one driver allocation each costs time and, for the GPU's
//! mapping of each, device memory the planner cannot see. A slab's memory is unpinned when
//! the last buffer carved from it is dropped.

use super::{driver_err, Gpu};
use crate::error::{Error, Result};
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use cudarc::driver::CudaContext;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Largest slab that blocks are carved from; the first slab of a size holds
/// `FIRST_SLAB_BLOCKS` blocks and each next one twice as many, up to this.
const MAX_SLAB_BYTES: usize = 64 << 20;
const FIRST_SLAB_BLOCKS: usize = 16;
/// Blocks in a slab start at multiples of this: every vector load of a row is aligned (16
/// bytes, the widest a kernel makes; rows themselves are multiples of 8), and a block's values
/// follow its keys with no gap (an int8 block of 7710 rows of 136 bytes is 1,048,560), so the
/// staging copies both at once (`store::cuda::piece_copies`).
const SLAB_ALIGN: usize = 16;

/// Pinned allocations of at least this many bytes (the slabs blocks are carved from) are huge
/// pages registered with the driver (`Register`); smaller ones come from `cuMemHostAlloc`,
/// where rounding up to a huge page would waste more than a slab's tail.
const REGISTER_MIN_BYTES: usize = 8 << 20;
/// The host's transparent huge page (x86-64).
const HUGE_PAGE: usize = 2 << 20;

/// How an allocation was pinned, which says how to unpin it.
enum Origin {
    /// `cuMemHostAlloc`.
    Alloc,
    /// An anonymous mapping of `bytes` (huge pages where the kernel gives them) registered
    /// with `cuMemHostRegister`; unregistered with `ctx` bound, then unmapped.
    Register { bytes: usize, ctx: Arc<CudaContext> },
}

/// One allocation of page-locked host memory, mapped into the GPU's address space; unpinned
/// when dropped (the last buffer in it gone).
struct Pinned {
    host: *mut u8,
    dev: u64,
    len: usize,
    origin: Origin,
}

// SAFETY: owned exclusively (shared only through `Arc` by the buffers carved from it, which
// touch disjoint ranges); the pointers are plain addresses.
unsafe impl Send for Pinned {}
// SAFETY: as above: no method mutates it.
unsafe impl Sync for Pinned {}

/// The error for `len` bytes that could not be pinned (`how`: the call that failed).
fn pin_failed(len: usize, how: String) -> Error {
    Error::OutOfHostMemory {
        what: format!("pinning {len} bytes of KV blocks ({how})"),
        needed: len,
        available: crate::cpu::memory::available_bytes().unwrap_or(0),
    }
}

/// `len` bytes of anonymous memory (rounded up to a huge page) starting on a huge-page
/// boundary, advised to transparent huge pages and faulted in (huge where the kernel gives
/// them; else small ones, the same memory). Returns the start and the bytes mapped; the
/// caller unmaps them.
fn map_huge(len: usize) -> Result<(*mut u8, usize)> {
    let bytes = len.max(1).next_multiple_of(HUGE_PAGE);
    // A huge page more than needed, so that the range kept can start on a huge-page boundary
    // (the kernel backs only aligned 2 MiB ranges with huge pages).
    let span = bytes + HUGE_PAGE;
    // SAFETY: a fresh anonymous private mapping, no file; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        return Err(pin_failed(len, format!("mmap: {e}")));
    }
    let start = (p as usize).next_multiple_of(HUGE_PAGE);
    let (head, tail) = (start - p as usize, p as usize + span - (start + bytes));
    // SAFETY: both ranges lie in the mapping just made, outside the part kept.
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((start + bytes) as *mut libc::c_void, tail);
        }
    }
    let host = start as *mut u8;
    // SAFETY: advice on the range kept, which this function owns.
    unsafe { libc::madvise(host as *mut _, bytes, libc::MADV_HUGEPAGE) };
    for off in (0..bytes).step_by(4096) {
        // SAFETY: within the range kept, mapped writable: faults the pages in before the
        // driver pins them.
        unsafe { host.add(off).write_volatile(0) };
    }
    Ok((host, bytes))
}

/// `len` bytes of huge pages (`map_huge`) pinned by the driver, portable and mapped. Pinning
/// huge pages is faster than `cuMemHostAlloc`'s: 32 GiB took 1.4 s this way and 15.6 s that
/// way on an H100 host (`benchmarks/probe_footprint.py`). Returns the start and the bytes.
fn register_huge(len: usize) -> Result<(*mut u8, usize)> {
    let (host, bytes) = map_huge(len)?;
    let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
    // SAFETY: the range is mapped and owned here; the result is checked.
    let r = unsafe { sys::cuMemHostRegister_v2(host as *mut _, bytes, flags) }.result();
    if let Err(e) = r {
        // SAFETY: the range `map_huge` made, unmapped once (not registered).
        unsafe { libc::munmap(host as *mut _, bytes) };
        return Err(pin_failed(len, format!("cuMemHostRegister: {e:?}")));
    }
    Ok((host, bytes))
}

impl Pinned {
    fn new(gpu: &Gpu, len: usize) -> Result<Self> {
        gpu.bind()?;
        let (host, origin) = if len >= REGISTER_MIN_BYTES {
            let (host, bytes) = register_huge(len)?;
            let ctx = gpu.context().clone();
            (host, Origin::Register { bytes, ctx })
        } else {
            let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
            // SAFETY: a plain allocation call; the result is checked.
            let host = unsafe { cu::malloc_host(len, flags) }
                .map_err(|e| pin_failed(len, format!("{e:?}")))?;
            (host as *mut u8, Origin::Alloc)
        };
        // From here on, dropping `pinned` unpins it (a device address of 0 is never read).
        let mut pinned = Pinned {
            host,
            dev: 0,
            len,
            origin,
        };
        PINNED_BYTES.fetch_add(pinned.bytes(), Ordering::Relaxed);
        // SAFETY: `host` was pinned with DEVICEMAP, so it has a device address.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut pinned.dev, host as *mut _, 0) };
        r.result()
            .map_err(|e| driver_err("mapping pinned memory", e))?;
        Ok(pinned)
    }

    /// Host bytes it pins.
    fn bytes(&self) -> usize {
        match &self.origin {
            Origin::Alloc => self.len,
            Origin::Register { bytes, .. } => *bytes,
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        match &self.origin {
            Origin::Alloc => {
                // SAFETY: allocated by `malloc_host` in `new`, freed once: every buffer carved
                // from it held an `Arc` to it, and the last one is gone.
                let _ = unsafe { cu::free_host(self.host as *mut _) };
            }
            Origin::Register { bytes, ctx } => {
                // Unregistering needs a context on this thread (a drop may run on any); the
                // thread's own context, if any, is put back after.
                let mut before: sys::CUcontext = std::ptr::null_mut();
                // SAFETY: writes the calling thread's current context (or null) to `before`.
                let _ = unsafe { sys::cuCtxGetCurrent(&mut before) };
                let _ = ctx.bind_to_thread();
                // SAFETY: registered in `new`, unregistered and unmapped once, as above;
                // `before` was this thread's context (or null: none).
                unsafe {
                    let _ = sys::cuMemHostUnregister(self.host as *mut _);
                    libc::munmap(self.host as *mut _, *bytes);
                    let _ = sys::cuCtxSetCurrent(before);
                }
            }
        }
        PINNED_BYTES.fetch_sub(self.bytes(), Ordering::Relaxed);
    }
}

/// Page-locked host memory, mapped into the GPU's address space: a whole allocation, or a
/// block carved from a slab.
pub struct PinnedBuf {
    host: *mut u8,
    dev: u64,
    len: usize,
    /// Bytes of its allocation it occupies: `len`, rounded up to `SLAB_ALIGN` in a slab.
    span: usize,
    /// The allocation it lies in (`None` for `empty`).
    _mem: Option<Arc<Pinned>>,
}

// SAFETY: owns its range exclusively, like a `Box<[u8]>`; the pointers are plain addresses.
unsafe impl Send for PinnedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for PinnedBuf {}

static PINNED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The slab blocks of one size are being carved from, and where the next one starts.
struct Carver {
    slab: Arc<Pinned>,
    next: usize,
}

impl Carver {
    /// Bytes of the slab not carved yet (pinned, free for the next blocks).
    fn left(&self) -> usize {
        self.slab.len - self.next
    }
}

#[derive(Default)]
struct Pool {
    /// Buffers given back, by length.
    free: HashMap<usize, Vec<PinnedBuf>>,
    /// Per block length, the slab being carved.
    carvers: HashMap<usize, Carver>,
}

static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.get_or_init(|| Mutex::new(Pool::default()))
        .lock()
        .expect("pool")
}

impl PinnedBuf {
    /// `len` bytes, from the pool if it has a buffer of that size, else freshly pinned in an
    /// allocation of its own.
    pub fn take(gpu: &Gpu, len: usize) -> Result<Self> {
        if let Some(b) = pool().free.get_mut(&len).and_then(|v| v.pop()) {
            return Ok(b);
        }
        let mem = Arc::new(Pinned::new(gpu, len)?);
        Ok(PinnedBuf {
            host: mem.host,
            dev: mem.dev,
            len,
            span: len,
            _mem: Some(mem),
        })
    }

    /// The allocation it lies in, as the allocation's mapped address: equal for two buffers
    /// carved from one slab, different for any two live allocations. One copy may read
    /// adjacent buffers of one allocation, never a range across two (however adjacent their
    /// addresses).
    pub fn allocation(&self) -> u64 {
        self._mem.as_ref().map_or(self.dev, |m| m.dev)
    }

    /// `len` bytes for a KV block: from the pool if it has a buffer of that size, else carved
    /// from a slab (a new slab, twice the last one's size up to `MAX_SLAB_BYTES`, when the
    /// current one is used up).
    pub fn take_block(gpu: &Gpu, len: usize) -> Result<Self> {
        let stride = len.next_multiple_of(SLAB_ALIGN);
        let mut pool = pool();
        if let Some(b) = pool.free.get_mut(&len).and_then(|v| v.pop()) {
            return Ok(b);
        }
        let room = pool.carvers.get(&len).is_some_and(|c| c.left() >= stride);
        if !room {
            let last = pool.carvers.get(&len).map_or(0, |c| c.slab.len);
            let want = (2 * last).max(FIRST_SLAB_BLOCKS * stride);
            let bytes = (want.min(MAX_SLAB_BYTES) / stride).max(1) * stride;
            // Where a whole slab cannot be pinned, one block may still be.
            let slab = match Pinned::new(gpu, bytes) {
                Ok(s) => s,
                Err(_) if bytes > stride => Pinned::new(gpu, stride)?,
                Err(e) => return Err(e),
            };
            pool.carvers.insert(
                len,
                Carver {
                    slab: Arc::new(slab),
                    next: 0,
                },
            );
        }
        let c = pool.carvers.get_mut(&len).expect("carver made above");
        let off = c.next;
        c.next += stride;
        Ok(PinnedBuf {
            // SAFETY: `off + len <= slab.len`: the carver had `stride >= len` bytes left.
            host: unsafe { c.slab.host.add(off) },
            dev: c.slab.dev + off as u64,
            len,
            span: stride,
            _mem: Some(c.slab.clone()),
        })
    }

    /// No memory (what an owner leaves behind after giving its buffer back).
    pub fn empty() -> Self {
        PinnedBuf {
            host: std::ptr::null_mut(),
            dev: 0,
            len: 0,
            span: 0,
            _mem: None,
        }
    }

    /// Returns the buffer to the pool for reuse.
    pub fn give_back(self) {
        if self.len == 0 {
            return;
        }
        pool().free.entry(self.len).or_default().push(self);
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

/// Bytes of pinned memory allocated by headinfer: in caches and in the pool.
pub fn pinned_bytes() -> usize {
    PINNED_BYTES.load(Ordering::Relaxed)
}

/// Bytes of pinned memory held in the pool, free for reuse: buffers given back (with their
/// alignment padding), and the slabs' bytes not carved yet.
pub fn pooled_bytes() -> usize {
    let pool = pool();
    let given: usize = pool.free.values().flatten().map(|b| b.span).sum();
    given + pool.carvers.values().map(Carver::left).sum::<usize>()
}

/// Makes room for KV blocks of `len` bytes in the pool: drops its buffers and slabs of every
/// other size (no block of `len` can use them; each allocation is unpinned once no cache holds
/// a buffer in it) and returns the bytes it holds for `len` (buffers given back and the slab's
/// rest). Without this, a cache of one KV format dropped and one of another made next (exact,
/// then int8: 1 MiB blocks, then 1,048,560 B) found the host's memory short by everything the
/// first had pinned, which the pool kept for blocks of its size.
pub fn reclaim_pinned_for(len: usize) -> usize {
    let stride = len.next_multiple_of(SLAB_ALIGN);
    let dropped = {
        let mut pool = pool();
        let free: Vec<_> = pool.free.extract_if(|&l, _| l != len).collect();
        let carvers: Vec<_> = pool.carvers.extract_if(|&l, _| l != len).collect();
        (free, carvers)
    };
    // Unpinned outside the lock (cuMemFreeHost takes a while for large slabs).
    drop(dropped);
    let pool = pool();
    let given = pool.free.get(&len).map_or(0, |v| v.len() * len);
    let rest = pool
        .carvers
        .get(&len)
        .map_or(0, |c| c.left() / stride * len);
    given + rest
}

/// Drops every pooled buffer and the slabs being carved: each allocation is unpinned once no
/// cache holds a buffer in it.
pub fn release_pinned_pool() {
    let drained = std::mem::take(&mut *pool());
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

#[cfg(test)]
#[path = "../../tests/rust/cuda/memory.rs"]
mod tests;
