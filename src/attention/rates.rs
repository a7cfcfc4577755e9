//! Measuring the rates the CPU share's policy balances (`policy::Rates`): short, bounded
//! probes, run once per machine (the Python side caches their results in a file).
//!
//! - The CPU: the share's own kernel (`cpu::attend_lse`) over keys and values in host memory
//!   larger than any last-level cache, on the share's thread pool, timed for a fraction of a
//!   second; and the same over one block per head, for the fixed cost of a step. The keys and
//!   values are held as the store holds them (`KvFormat`): as elements, or in the int8 rows
//!   of `quant` (whose kernel is compute-bound: it reads fewer stored bytes per second), and
//!   the rate is in stored bytes, the bytes the policy splits.
//! - The GPU: the decode kernel of the store's format (`KvFormat`: an int8 store's kernel
//!   reads its rows at a rate of its own, about 0.8 of exact's over PCIe, so the reader the
//!   rates choose must be timed on it) over keys and values in mapped pinned memory (read over
//!   PCIe, as host blocks are) and in device memory (as resident blocks are), and the copy
//!   engine moving the same pinned memory in 1 MiB copies (`COPY_CHUNK` says why), timed
//!   with CUDA events on a stream of its own.
//! - The CPU beside the copy engine (`with_copy_engine_busy`): both read host memory at once
//!   in a shared step, and on some hosts the CPU reads less while the copy engine runs. Its buffers are transient and small: 64 MiB of pinned memory and
//!   four times the GPU's L2 cache of device memory (at least 64 MiB, at most 256 MiB, so the
//!   reads reach HBM), both freed before it returns; the caller runs it before the store
//!   claims its device blocks, inside the planner's margin.

use super::args::{self, Params};
use super::cpu::{attend_lse, DenseKv};
use crate::cuda::kernels::KvSrc;
use crate::cuda::memory::{DeviceBuf, PinnedBuf};
use crate::cuda::{driver_err, gpu, Stream};
use crate::error::{Error, Result};
use crate::quant::{KvFormat, Q8Rows, Q8};
use crate::store::view::{KvRows, KvSource, Segment};
use crate::tensor::{DType, DevTensor, Element, View3};
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// Kv heads of the probes' keys and values (a Llama-3-8B layer's).
const PROBE_HEADS: usize = 8;
/// Seconds a shared step costs beyond the CPU's own work, measured on an H200 host: the
/// query's copy to the host, the worker's wake-up, the stream's wait on the published word.
pub const HANDOFF_LATENCY: f64 = 50e-6;
/// Pinned bytes the PCIe probe reads (both keys and values).
const HOST_PROBE_BYTES: usize = 64 << 20;
/// Device bytes the HBM probe reads: four L2 caches, within these bounds.
const DEVICE_PROBE_MIN: usize = 64 << 20;
const DEVICE_PROBE_MAX: usize = 256 << 20;

/// What the CPU probe measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuRate {
    /// Bytes of keys and values read per second (the median run).
    pub bytes_per_s: f64,
    /// Seconds of a step over one block per head (the share's fixed cost), plus
    /// `HANDOFF_LATENCY`.
    pub fixed_s: f64,
}

/// An empty vector with room for `n` elements; `OutOfHostMemory` where the allocation fails.
fn reserved<T>(n: usize) -> Result<Vec<T>> {
    let mut v: Vec<T> = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfHostMemory {
        what: "the CPU share's rate probe".into(),
        needed: n.saturating_mul(std::mem::size_of::<T>()),
        available: crate::cpu::memory::available_bytes().unwrap_or(0),
    })?;
    Ok(v)
}

/// A host vector of `n` elements of a small pattern (so no NaN or overflow), filled in
/// parallel; `OutOfHostMemory` where the allocation fails.
fn filled<E: Element>(n: usize) -> Result<Vec<E>> {
    let mut v = reserved::<E>(n)?;
    v.resize(n, E::default());
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, x) in chunk.iter_mut().enumerate() {
                *x = E::from_f32((((c + i) % 17) as f32 - 8.0) / 64.0);
            }
        });
    Ok(v)
}

/// Distinct rows the int8 probe quantizes; its buffers repeat them (the kernel's time does not
/// depend on the values, and quantizing every row would cost more than the timing itself).
const PATTERN_ROWS: usize = 61;

/// `rows` rows of `fmt`'s int8 format, each a row of `E` quantized by `Q8::quantize` (the
/// store's own quantizer), copied in parallel; `OutOfHostMemory` where the allocation fails.
fn quantized<E: Element>(fmt: Q8, rows: usize) -> Result<Vec<u8>> {
    let (d, rb) = (fmt.head_dim, fmt.row_bytes());
    let mut pattern = vec![0u8; PATTERN_ROWS * rb];
    for (r, out) in pattern.chunks_exact_mut(rb).enumerate() {
        // Groups of different magnitudes, so their scales differ.
        let x: Vec<E> = (0..d)
            .map(|i| {
                let scale = (1 + (r + i / fmt.group) % 5) as f32 / 256.0;
                E::from_f32((((r + i) % 17) as f32 - 8.0) * scale)
            })
            .collect();
        fmt.quantize(&x, out);
    }
    let mut v = reserved::<u8>(rows.saturating_mul(rb))?;
    v.resize(rows * rb, 0);
    const CHUNK: usize = 1 << 10;
    v.par_chunks_mut(CHUNK * rb)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, row) in chunk.chunks_exact_mut(rb).enumerate() {
                let r = (c * CHUNK + i) % PATTERN_ROWS;
                row.copy_from_slice(&pattern[r * rb..(r + 1) * rb]);
            }
        });
    Ok(v)
}

/// The int8 probe's keys and values: `[heads, len]` rows each, head after head, as one
/// segment per head (as `DenseKv` gives the exact probe's).
struct Q8Kv<'a> {
    k: &'a [u8],
    v: &'a [u8],
    heads: usize,
    len: usize,
    fmt: Q8,
}

impl Q8Kv<'_> {
    /// Head `head`'s rows of `data`, positions `a..b`.
    fn rows<'s>(&self, data: &'s [u8], head: usize, a: usize, b: usize) -> Q8Rows<'s> {
        let rb = self.fmt.row_bytes();
        Q8Rows {
            data: &data[head * self.len * rb..(head + 1) * self.len * rb],
            len: self.len,
            fmt: self.fmt,
        }
        .slice(a, b)
    }
}

impl<E: Element> KvSource<E> for Q8Kv<'_> {
    fn num_kv_heads(&self) -> usize {
        self.heads
    }
    fn head_dim(&self) -> usize {
        self.fmt.head_dim
    }
    fn len(&self) -> usize {
        self.len
    }
    fn start(&self) -> usize {
        0
    }
    fn segments(&self, head: usize, a: usize, b: usize) -> Vec<Segment<'_, E>> {
        self.next_segment(head, a, b).into_iter().collect()
    }
    fn next_segment(&self, head: usize, a: usize, b: usize) -> Option<Segment<'_, E>> {
        let b = b.min(self.len);
        (a < b).then(|| Segment {
            pos: a,
            k: KvRows::Int8(self.rows(self.k, head, a, b)),
            v: KvRows::Int8(self.rows(self.v, head, a, b)),
        })
    }
}

/// The CPU probe's keys and values, `[PROBE_HEADS, tokens]` rows each, as a store holds them.
enum ProbeKv<E> {
    Exact {
        k: Vec<E>,
        v: Vec<E>,
        head_dim: usize,
    },
    Int8 {
        k: Vec<u8>,
        v: Vec<u8>,
        fmt: Q8,
    },
}

impl<E: Element> ProbeKv<E> {
    fn new(format: KvFormat, head_dim: usize, tokens: usize) -> Result<Self> {
        let rows = PROBE_HEADS * tokens;
        Ok(match format {
            KvFormat::Exact => ProbeKv::Exact {
                k: filled::<E>(rows * head_dim)?,
                v: filled::<E>(rows * head_dim)?,
                head_dim,
            },
            KvFormat::Int8 => {
                let fmt = Q8::new(head_dim);
                ProbeKv::Int8 {
                    k: quantized::<E>(fmt, rows)?,
                    v: quantized::<E>(fmt, rows)?,
                    fmt,
                }
            }
        })
    }

    /// Seconds of one decode step of `query` over the first `n` positions of every head,
    /// through `attend_lse` (the entry the share's worker and a CPU store's reads take).
    fn time(&self, query: View3<'_, E>, params: &Params, n: usize) -> Result<f64> {
        let t = match self {
            ProbeKv::Exact { k, v, head_dim } => {
                let d = *head_dim;
                let kv = DenseKv::new(
                    View3::contiguous(&k[..PROBE_HEADS * n * d], [PROBE_HEADS, n, d]),
                    View3::contiguous(&v[..PROBE_HEADS * n * d], [PROBE_HEADS, n, d]),
                )?;
                let t = Instant::now();
                attend_lse(query, &kv, params, None)?;
                t
            }
            ProbeKv::Int8 { k, v, fmt } => {
                let rb = fmt.row_bytes();
                let kv = Q8Kv {
                    k: &k[..PROBE_HEADS * n * rb],
                    v: &v[..PROBE_HEADS * n * rb],
                    heads: PROBE_HEADS,
                    len: n,
                    fmt: *fmt,
                };
                let t = Instant::now();
                attend_lse(query, &kv, params, None)?;
                t
            }
        };
        Ok(t.elapsed().as_secs_f64())
    }
}

/// The CPU probe's tokens per head for about `bytes` of stored keys and values (at least
/// one), and the bytes they take as `format` stores them (`KvFormat::row_bytes` per row): what
/// its rate is counted in, the bytes the policy splits.
fn probe_size(format: KvFormat, head_dim: usize, dtype: DType, bytes: usize) -> (usize, usize) {
    // Stored bytes of one token's key and value rows of one head.
    let row = 2 * format.row_bytes(head_dim, dtype);
    let tokens = (bytes / (PROBE_HEADS * row)).max(1);
    (tokens, PROBE_HEADS * tokens * row)
}

/// Times decode attention of `group` query heads per kv head over `bytes` of keys and values
/// held as `format` says (`head_dim` wide, of `E`, or int8 rows quantized from `E`) on the
/// CPU, on `pool` (rayon's global pool where `None`), for about `seconds` (at least 3 runs
/// after a warm-up, at most 16). Bytes are the stored bytes (`KvFormat::row_bytes` per row).
pub fn measure_cpu<E: Element>(
    format: KvFormat,
    head_dim: usize,
    group: usize,
    bytes: usize,
    seconds: f64,
    pool: Option<&rayon::ThreadPool>,
) -> Result<CpuRate> {
    if head_dim == 0 || group == 0 {
        return Err(Error::value(
            "head_dim",
            "head_dim and group must be positive",
        ));
    }
    let (tokens, stored) = probe_size(format, head_dim, E::DTYPE, bytes);
    let run = || -> Result<CpuRate> {
        let kv = ProbeKv::<E>::new(format, head_dim, tokens)?;
        let q = filled::<E>(PROBE_HEADS * group * head_dim)?;
        let params = Params {
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: None,
            window: None,
        };
        let query = View3::contiguous(&q, [PROBE_HEADS * group, 1, head_dim]);
        let time = |n: usize| kv.time(query, &params, n);
        // The fixed cost: the same over one block's worth of keys per head.
        let small = tokens.min(256);
        time(tokens)?; // warm-up: page faults, the pool's threads
        let budget = Duration::from_secs_f64(seconds.max(0.0));
        let start = Instant::now();
        let mut runs = Vec::new();
        while runs.len() < 16 && (runs.len() < 3 || start.elapsed() < budget) {
            runs.push(time(tokens)?);
        }
        runs.sort_by(f64::total_cmp);
        let median = runs[runs.len() / 2];
        let mut fixed: Vec<f64> = (0..5).map(|_| time(small)).collect::<Result<_>>()?;
        fixed.sort_by(f64::total_cmp);
        Ok(CpuRate {
            bytes_per_s: stored as f64 / median,
            fixed_s: fixed[2] + HANDOFF_LATENCY,
        })
    };
    match pool {
        Some(p) => p.install(run),
        None => run(),
    }
}

/// The CPU probe as `_core.measure_cpu_rate` runs it: `measure_cpu` for keys and values of
/// `dtype` held as `kv_dtype` names them (`KvFormat::parse`: `None` or `dtype`'s own name
/// exact, `"int8"` the 8-bit rows; anything else an error naming `kv_dtype`, before any GPU
/// work), with GPU `beside_copy`'s copy engine busy meanwhile where given
/// (`with_copy_engine_busy`).
#[allow(clippy::too_many_arguments)]
pub fn measure_cpu_as(
    dtype: DType,
    kv_dtype: Option<&str>,
    head_dim: usize,
    group: usize,
    bytes: usize,
    seconds: f64,
    pool: Option<&rayon::ThreadPool>,
    beside_copy: Option<usize>,
) -> Result<CpuRate> {
    let format = KvFormat::parse("kv_dtype", kv_dtype, dtype)?;
    let measure = || {
        crate::with_element!(dtype, E => {
            measure_cpu::<E>(format, head_dim, group, bytes, seconds, pool)
        })
    };
    match beside_copy {
        Some(ordinal) => with_copy_engine_busy(ordinal, measure)?,
        None => measure(),
    }
}

/// A CUDA event with timing, destroyed on drop.
struct TimingEvent(sys::CUevent);

impl TimingEvent {
    fn new() -> Result<Self> {
        cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map(TimingEvent)
            .map_err(|e| driver_err("creating a timing event", e))
    }
}

impl Drop for TimingEvent {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once; the probe synchronized on it first.
        let _ = unsafe { cu::event::destroy(self.0) };
    }
}

/// A stream of the probe's own, destroyed on drop (after the work on it finished).
struct OwnStream(Stream);

impl Drop for OwnStream {
    fn drop(&mut self) {
        // SAFETY: created by the probe, destroyed once; the driver lets queued work finish.
        let _ = unsafe { cu::stream::destroy(self.0 .0) };
    }
}

/// What the GPU probe measured, in bytes of keys and values per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuRates {
    /// The decode kernel reading mapped pinned memory (over PCIe).
    pub pcie: f64,
    /// The decode kernel reading device memory.
    pub device: f64,
    /// The copy engine moving pinned memory to the device in block-sized copies (what the
    /// staged decode path does; its kernel runs beside the copies).
    pub copy: f64,
}

/// Bytes of one copy of the copy-engine probes. The staged path's copies are larger (merged
/// within a piece: 1-16 MiB), but in a decode, beside the CPU share, they moved 43-48 GB/s
/// (H100 host, 262,144 int8 tokens) where alone 16 MiB copies move 54-55; 1 MiB copies (about
/// 48 alone) stand nearer that. Measured in 16 MiB copies, the copy engine beat zero-copy
/// reads of exact rows (50.6 GB/s) in the probe, but not in the decodes (a GPU side of 47.7
/// GB/s by the copy engine, 50-51 zero-copy on hosts of the same kind).
const COPY_CHUNK: usize = 1 << 20;

/// Queues copies of `bytes` from `src` to `dst` on `s`, `COPY_CHUNK` at a time.
///
/// # Safety
/// Both ranges must be valid for `bytes` until the stream has run the copies.
unsafe fn copy_chunks(dst: u64, src: u64, bytes: usize, s: Stream) -> Result<()> {
    let mut off = 0;
    while off < bytes {
        let n = COPY_CHUNK.min(bytes - off);
        // SAFETY: forwarded from the caller; `off + n <= bytes`.
        unsafe {
            crate::cuda::stream::copy_async(
                dst + off as u64,
                src + off as u64,
                n,
                s,
                "the copy engine probe",
            )?
        };
        off += n;
    }
    Ok(())
}

/// Runs `f` on the calling thread while another thread keeps GPU `ordinal`'s copy engine busy
/// moving pinned memory to the device (64 MiB at a time, until `f` returns): the CPU's read
/// rate beside the copy engine, as a shared decode step has it.
pub fn with_copy_engine_busy<R>(ordinal: usize, f: impl FnOnce() -> R) -> Result<R> {
    let g = gpu(ordinal)?;
    g.bind()?;
    let host = PinnedBuf::take(&g, HOST_PROBE_BYTES)?;
    // SAFETY: the buffer is owned here and nothing reads it yet.
    unsafe { std::ptr::write_bytes(host.host_ptr(), 0, host.len()) };
    let dev = DeviceBuf::new(&g, HOST_PROBE_BYTES)?;
    let raw = cu::stream::create(cu::stream::StreamKind::NonBlocking)
        .map_err(|e| driver_err("creating the probe's stream", e))?;
    let stream = OwnStream(Stream(raw));
    let s = stream.0;
    let (src, dst) = (host.dev_ptr(), dev.ptr());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (out, busy) = std::thread::scope(|scope| {
        let busy = scope.spawn(|| -> Result<usize> {
            g.bind()?;
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: both buffers outlive the scope, which ends after this thread.
                unsafe { copy_chunks(dst, src, HOST_PROBE_BYTES, s)? };
                crate::cuda::stream::synchronize(s)?;
                rounds += 1;
            }
            Ok(rounds)
        });
        let out = f();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (out, busy.join())
    });
    drop(host); // freed, not pooled: a probe's buffer is no KV block
    match busy {
        Ok(Ok(_)) => Ok(out),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Panic(
            "the copy engine probe's thread panicked".into(),
        )),
    }
}

/// Times the decode kernel (`dtype`, `head_dim`, `group` query heads per kv head, over rows
/// held as `format`) on GPU `ordinal` over host (mapped pinned) and device memory, and the copy
/// engine; see the module's note on its buffers. Rates are in bytes as `format` holds them.
/// Blocks the calling thread until its own stream is done (a few milliseconds).
pub fn measure_gpu(
    ordinal: usize,
    dtype: DType,
    head_dim: usize,
    group: usize,
    format: KvFormat,
) -> Result<GpuRates> {
    if group == 0 {
        return Err(Error::value("group", "must be positive"));
    }
    let g = gpu(ordinal)?;
    g.bind()?;
    let kernels = g.kernels(dtype, head_dim, format)?;
    let l2 = g
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .map_err(|e| driver_err("reading the L2 cache size", e))? as usize;
    let device_bytes = (4 * l2).clamp(DEVICE_PROBE_MIN, DEVICE_PROBE_MAX);
    let raw = cu::stream::create(cu::stream::StreamKind::NonBlocking)
        .map_err(|e| driver_err("creating the probe's stream", e))?;
    let stream = OwnStream(Stream(raw));
    let s = stream.0;
    let es = dtype.size();
    let hq = PROBE_HEADS * group;
    let q = DeviceBuf::new(&g, hq * head_dim * es)?;
    let out = DeviceBuf::new(&g, hq * head_dim * es)?;
    // SAFETY: both buffers were just allocated with these sizes; zeros are valid elements.
    unsafe {
        cu::memset_d8_async(q.ptr(), 0, q.len(), s.0).map_err(|e| driver_err("memset", e))?;
    }
    let params = Params {
        scale: 1.0 / (head_dim as f32).sqrt(),
        softcap: None,
        window: None,
    };
    // Bytes of a stored row, and of the unit the dense strides count in (an element; a byte
    // of an int8 row). Zeros are valid rows of either format (an int8 row's scales are 0).
    let row = format.row_bytes(head_dim, dtype);
    let unit = match format {
        KvFormat::Exact => es,
        KvFormat::Int8 => 1,
    };
    // Times `reps` launches over keys at `k` and values at `v`, `tokens` rows per head.
    let time = |k: u64, v: u64, tokens: usize, reps: usize| -> Result<f64> {
        let launch = args::launch(hq, 1, PROBE_HEADS, tokens, 0, &params, None)?;
        let src = KvSrc {
            table: 0,
            max_blocks: 0,
            block_size: 0,
            k,
            v,
            s0: (tokens * row / unit) as i64,
            s1: (row / unit) as i64,
        };
        let qt = DevTensor {
            ptr: q.ptr(),
            s0: head_dim as i64,
            s1: head_dim as i64,
        };
        let ot = DevTensor {
            ptr: out.ptr(),
            s0: head_dim as i64,
            s1: head_dim as i64,
        };
        let (a, b) = (TimingEvent::new()?, TimingEvent::new()?);
        // SAFETY: every address is a live buffer of the probe with the shapes described
        // (`[heads, tokens, head_dim]` keys and values, `[hq, 1, head_dim]` query and out);
        // the stream is synchronized below, before any of them is freed.
        unsafe {
            kernels.attend(s, qt, src, &launch, ot)?; // warm-up
            cu::event::record(a.0, s.0).map_err(|e| driver_err("recording an event", e))?;
            for _ in 0..reps {
                kernels.attend(s, qt, src, &launch, ot)?;
            }
            cu::event::record(b.0, s.0).map_err(|e| driver_err("recording an event", e))?;
            cu::event::synchronize(b.0).map_err(|e| driver_err("waiting for the probe", e))?;
            let ms = cu::event::elapsed(a.0, b.0).map_err(|e| driver_err("timing", e))?;
            Ok(f64::from(ms) / 1e3 / reps as f64)
        }
    };
    let host = PinnedBuf::take(&g, HOST_PROBE_BYTES)?;
    // SAFETY: the buffer is owned here and nothing reads it yet.
    unsafe { std::ptr::write_bytes(host.host_ptr(), 0, host.len()) };
    let half = HOST_PROBE_BYTES / 2;
    let tokens = half / (PROBE_HEADS * row);
    let t_host = time(host.dev_ptr(), host.dev_ptr() + half as u64, tokens, 3);
    // The copy engine over the same bytes, in block-sized copies (warm-up, then 3 timed).
    let t_copy = DeviceBuf::new(&g, HOST_PROBE_BYTES).and_then(|dst| {
        let (a, b) = (TimingEvent::new()?, TimingEvent::new()?);
        // SAFETY: both buffers hold HOST_PROBE_BYTES and outlive the synchronize below.
        unsafe {
            copy_chunks(dst.ptr(), host.dev_ptr(), HOST_PROBE_BYTES, s)?;
            cu::event::record(a.0, s.0).map_err(|e| driver_err("recording an event", e))?;
            for _ in 0..3 {
                copy_chunks(dst.ptr(), host.dev_ptr(), HOST_PROBE_BYTES, s)?;
            }
            cu::event::record(b.0, s.0).map_err(|e| driver_err("recording an event", e))?;
            cu::event::synchronize(b.0).map_err(|e| driver_err("waiting for the probe", e))?;
            let ms = cu::event::elapsed(a.0, b.0).map_err(|e| driver_err("timing", e))?;
            Ok(f64::from(ms) / 1e3 / 3.0)
        }
    });
    // Whatever happened, nothing of the probe may still run when its buffers are freed.
    // SAFETY: the probe's own stream.
    let synced = unsafe { cu::stream::synchronize(s.0) };
    drop(host); // freed, not pooled: a probe's buffer is no KV block
    let t_host = t_host?;
    let t_copy = t_copy?;
    synced.map_err(|e| driver_err("waiting for the probe", e))?;
    let dev = DeviceBuf::new(&g, device_bytes)?;
    // SAFETY: the buffer was just allocated with this size; zeros are valid elements.
    unsafe {
        cu::memset_d8_async(dev.ptr(), 0, dev.len(), s.0).map_err(|e| driver_err("memset", e))?;
    }
    let dhalf = device_bytes / 2;
    let dtokens = dhalf / (PROBE_HEADS * row);
    let t_dev = time(dev.ptr(), dev.ptr() + dhalf as u64, dtokens, 20);
    // SAFETY: the probe's own stream.
    let synced = unsafe { cu::stream::synchronize(s.0) };
    let t_dev = t_dev?;
    synced.map_err(|e| driver_err("waiting for the probe", e))?;
    let read = |tokens: usize| (2 * PROBE_HEADS * tokens * row) as f64;
    Ok(GpuRates {
        pcie: read(tokens) / t_host,
        device: read(dtokens) / t_dev,
        copy: HOST_PROBE_BYTES as f64 / t_copy,
    })
}

#[cfg(test)]
#[path = "../../tests/rust/attention/rates.rs"]
mod tests;
