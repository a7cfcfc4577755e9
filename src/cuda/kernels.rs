//! The kernels of `kernels/attention.cu`: compiled by NVRTC once per (device, dtype,
//! head_dim, KV format), loaded once (a cudarc module), launched on the caller's stream through
//! cudarc's launch builder over a borrowed stream. Every launch site is the same three steps:
//! check the arguments, push them in the kernel's order, `launch`.
//!
//! The int8 format's kernels (`KvFormat::Int8`, `-DKV_INT8`) take and give the same T tensors
//! (queries, appended keys and values, outputs) and hold `src/quant.rs`'s rows in the blocks:
//! `append` quantizes, `gather` dequantizes, the attention kernels dequantize as they load.

use super::{driver_err, Gpu, Stream};
use crate::error::{Error, Result};
use crate::quant::{KvFormat, Q8};
use crate::tensor::{DType, DevTensor};
use crate::testing::{self, FailPoint};
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use cudarc::driver::{
    CudaContext, CudaFunction, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::sync::Arc;

const SOURCE: &str = include_str!("../../kernels/attention.cu");
/// Query rows per CTA of the attention kernels: `R` of `attend_partial_rR` / `attend_staged_rR`
/// (a GQA group of 4 or fewer rows takes the 4-row variant, so no lanes compute empty rows).
const ROWS_SMALL: usize = 4;
const ROWS: usize = 8;
/// Threads per CTA of the attention kernels (`32 * NWARPS`).
const ATTEND_THREADS: u32 = 128;
/// Bit 0 of a block's key address in the block table: the block is in host memory
/// (`HOST_BIT` in the source; block addresses are 16-byte aligned).
pub const HOST_BIT: u64 = 1;
/// Most units one `attend_staged` launch takes (`MAX_UNITS` in the source).
pub const MAX_UNITS: usize = 48;

/// `n` consecutive keys of kv head `head` from position `pos` on, staged in device memory with
/// rows contiguous at `k` and `v`; cut into `subs` CTAs of at most `Units::sub_len` keys that
/// write slots `slot..slot + subs`. Layout of `struct Unit` in the source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unit {
    pub k: u64,
    pub v: u64,
    pub pos: i64,
    pub n: i32,
    pub head: i32,
    pub slot: i32,
    pub subs: i32,
}

/// The units of one `attend_staged` launch, by value (layout of `struct Units`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Units {
    pub count: i32,
    pub sub_len: i32,
    pub u: [Unit; MAX_UNITS],
}

// SAFETY: plain `#[repr(C)]` data, laid out as `struct Units` in the source.
unsafe impl DeviceRepr for Units {}

/// The workspace of staged partials: `[rows, slots, head_dim]` f32 outputs and `[rows, slots,
/// 2]` f32 (max, sum), the maxima preset to -inf so slots no unit writes merge as nothing.
#[derive(Debug)]
pub struct StagedWs {
    ws: u64,
    o: u64,
    ml: u64,
    slots: usize,
}

/// Where a layer's keys and values are: a block table, or dense strided tensors.
/// Layout matches `struct KvSrc` in the source.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KvSrc {
    /// Device address of `[heads][max_blocks][2]` u64 block pointers, or 0 for dense.
    pub table: u64,
    pub max_blocks: i32,
    pub block_size: i32,
    /// Dense only: `[heads, len]` rows of keys and values, strides `s0`, `s1` in elements
    /// (int8 format: in bytes, a row being `KvFormat::row_bytes`).
    pub k: u64,
    pub v: u64,
    pub s0: i64,
    pub s1: i64,
}

// SAFETY: plain `#[repr(C)]` data, laid out as `struct KvSrc` in the source.
unsafe impl DeviceRepr for KvSrc {}

/// Kv heads `0..heads` whose keys from `from[h]` on are attended on the CPU (layout of
/// `struct CpuShare` in the source).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpuShare {
    pub heads: i32,
    pub pad: i32,
    pub from: [i64; MAX_CPU_HEADS],
}

// SAFETY: plain `#[repr(C)]` data, laid out as `struct CpuShare` in the source.
unsafe impl DeviceRepr for CpuShare {}

/// Most kv heads whose keys the CPU may share (`MAX_CPU_HEADS` in the source).
pub const MAX_CPU_HEADS: usize = 16;

impl CpuShare {
    pub const NONE: CpuShare = CpuShare {
        heads: 0,
        pad: 0,
        from: [0; MAX_CPU_HEADS],
    };
}

/// A launched `attend_partial` whose splits still need merging (`attend_merge`).
#[derive(Debug)]
pub struct Pending {
    ws: u64,
    o_part: u64,
    ml_part: u64,
    splits: usize,
    q_len: usize,
    total_rows: usize,
    sinks: u64,
}

impl Pending {
    /// Query rows in all (`num_q_heads * q_len`).
    pub fn rows(&self) -> usize {
        self.total_rows
    }
}

/// Rows computed elsewhere (the CPU) for the first `rows` query rows, merged by `attend_merge`:
/// normalised outputs `[rows, head_dim]` f32 at device address `o` and their log-sum-exp
/// `[rows]` f32 at `lse` (device memory or mapped pinned memory; read with volatile loads).
#[derive(Clone, Copy, Debug)]
pub struct Extra {
    pub o: u64,
    pub lse: u64,
    pub rows: usize,
}

/// One attention launch as the kernels take it (built and checked by `attention::args`).
#[derive(Clone, Copy, Debug)]
pub struct AttendLaunch {
    pub q_len: usize,
    pub seq_len: usize,
    /// First key position any query reads.
    pub lo: usize,
    pub group: usize,
    pub num_kv_heads: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
    /// Device address of `[num_q_heads]` f32 sink logits (gpt-oss), or 0: folded into each
    /// row once, by `merge_partials`.
    pub sinks: u64,
}

/// Largest `int` kernel argument, and the driver's grid limits (x; y and z).
const INT_MAX: usize = i32::MAX as usize;
const GRID_YZ_MAX: usize = 65535;

/// Checks a size a launch passes as `int` or as a grid dimension, so the `as` casts at the
/// launch sites below are lossless; `arg` names the argument it came from.
fn fits(arg: &str, what: &str, v: usize, max: usize) -> Result<()> {
    if v > max {
        return Err(Error::value(
            arg,
            format!("{what} is {v}, beyond the GPU kernels' limit of {max}"),
        ));
    }
    Ok(())
}

/// PTX of `kernels/attention.cu` for `dtype`, `head_dim`, blocks of format `kv` and compute
/// capability `major.minor`. Needs NVRTC only (no GPU), so it is tested on machines without one.
pub fn compile_ptx(
    dtype: DType,
    head_dim: usize,
    kv: KvFormat,
    major: i32,
    minor: i32,
) -> Result<String> {
    let vec = 16 / dtype.size();
    if head_dim == 0 || !head_dim.is_multiple_of(vec) || head_dim > 1024 {
        return Err(Error::value(
            "head_dim",
            format!(
                "{head_dim} is not supported on the GPU: it must be a multiple of {vec} \
                 (16 bytes of {}) and at most 1024",
                dtype.name()
            ),
        ));
    }
    // NVRTC wants a `&'static str`; one per compute capability, leaked once per compile.
    let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
    let elem = match dtype {
        DType::F32 => "-DELEM_F32",
        DType::BF16 => "-DELEM_BF16",
        DType::F16 => "-DELEM_F16",
    };
    let mut options = vec![
        format!("-DHEAD_DIM={head_dim}"),
        elem.to_string(),
        "-std=c++17".into(),
    ];
    if kv == KvFormat::Int8 {
        // The kernel derives the row layout itself and checks it against src/quant.rs's
        // (static_assert), so the two cannot drift apart.
        let q8 = Q8::new(head_dim);
        options.push("-DKV_INT8".into());
        options.push(format!("-DQ8_GROUP={}", q8.group));
        options.push(format!("-DQ8_ROW_BYTES={}", q8.row_bytes()));
    }
    let opts = CompileOptions {
        arch: Some(arch),
        options,
        name: Some("attention.cu".into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(SOURCE, opts).map_err(|e| {
        Error::CudaUnavailable(format!(
            "NVRTC failed to compile kernels/attention.cu: {e:?}"
        ))
    })?;
    Ok(ptx.to_src())
}

/// The loaded kernels of one (device, dtype, head_dim, KV format).
pub struct Kernels {
    ctx: Arc<CudaContext>,
    /// `attend_partial_r4`, `attend_partial_r8`.
    attend_partial: [CudaFunction; 2],
    /// `attend_staged_r4`, `attend_staged_r8`.
    attend_staged: [CudaFunction; 2],
    merge_partials: CudaFunction,
    append_kv: CudaFunction,
    gather_kv: CudaFunction,
    /// `dequant_staged`: int8 modules only.
    dequant_staged: Option<CudaFunction>,
    pub head_dim: usize,
    pub dtype: DType,
    pub kv: KvFormat,
    sm_count: usize,
}

impl Kernels {
    /// Compiles and loads the kernels for `dtype`, `head_dim` and blocks of format `kv` on `gpu`.
    pub fn compile(gpu: &Gpu, dtype: DType, head_dim: usize, kv: KvFormat) -> Result<Self> {
        let (major, minor) = gpu.compute_capability;
        let ptx = compile_ptx(dtype, head_dim, kv, major, minor)?;
        let ctx = gpu.context().clone();
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| driver_err("loading the compiled kernels", e))?;
        let get = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| driver_err(&format!("finding kernel {name}"), e))
        };
        Ok(Kernels {
            attend_partial: [get("attend_partial_r4")?, get("attend_partial_r8")?],
            attend_staged: [get("attend_staged_r4")?, get("attend_staged_r8")?],
            merge_partials: get("merge_partials")?,
            append_kv: get("append_kv")?,
            gather_kv: get("gather_kv")?,
            dequant_staged: match kv {
                KvFormat::Int8 => Some(get("dequant_staged")?),
                KvFormat::Exact => None,
            },
            ctx,
            head_dim,
            dtype,
            kv,
            sm_count: gpu.sm_count,
        })
    }

    fn vec(&self) -> usize {
        16 / self.dtype.size()
    }

    /// Threads of `append_kv` per token and head: one per 16-byte vector (exact), one per
    /// group of values sharing a scale (int8).
    fn append_threads_per_row(&self) -> usize {
        match self.kv {
            KvFormat::Exact => self.head_dim / self.vec(),
            KvFormat::Int8 => Q8::new(self.head_dim).groups(),
        }
    }

    /// cudarc's view of the caller's stream, borrowed (never destroyed by us).
    fn borrow(&self, stream: Stream) -> Arc<cudarc::driver::CudaStream> {
        // SAFETY: `stream` is a live stream of this device's primary context (torch's current
        // stream, or one the caller created there); the wrapper only queues work on it and is
        // dropped before the call returns.
        unsafe { self.ctx.wrap_borrowed_stream(stream.0) }
    }

    /// The one launch path: the test-only failure point, then cudarc's launch.
    ///
    /// # Safety
    /// The pushed arguments must match the kernel's parameters one for one, and every address
    /// among them must be valid for the work the kernel does, until the stream has run it.
    unsafe fn launch(op: &str, mut args: LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
        if testing::hit(FailPoint::Launch) {
            return Err(Error::Injected("launch"));
        }
        // SAFETY: forwarded from the caller.
        unsafe { args.launch(cfg) }
            .map(|_| ())
            .map_err(|e| driver_err(&format!("launching {op}"), e))
    }

    /// Attention of `q` (`[num_q_heads, q_len, head_dim]`) over `src`, into `out` (same shape).
    ///
    /// # Safety
    /// Every address must be valid device (or mapped host) memory of the shapes described,
    /// alive until the stream reaches this work; the context must be bound.
    pub unsafe fn attend(
        &self,
        stream: Stream,
        q: DevTensor,
        src: KvSrc,
        a: &AttendLaunch,
        out: DevTensor,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe {
            let p = self.attend_partial(stream, q, src, a, &CpuShare::NONE, false)?;
            self.attend_merge(stream, p, None, None, out)
        }
    }

    /// Query rows per CTA for `rows` rows per kv head, and the variant's index.
    fn rows_per_cta(rows: usize) -> (usize, usize) {
        if rows <= ROWS_SMALL {
            (ROWS_SMALL, 0)
        } else {
            (ROWS, 1)
        }
    }

    /// The first half of `attend`: the split partial results, with the keys `share` leaves to
    /// the CPU skipped, and with `skip_host` the keys in host blocks too (`attend_staged` reads
    /// those). `attend_merge` finishes it (and frees its workspace).
    ///
    /// # Safety
    /// As for `attend`.
    pub unsafe fn attend_partial(
        &self,
        stream: Stream,
        q: DevTensor,
        src: KvSrc,
        a: &AttendLaunch,
        share: &CpuShare,
        skip_host: bool,
    ) -> Result<Pending> {
        let d = self.head_dim;
        let rows = a.group * a.q_len;
        let num_q_heads = a.group * a.num_kv_heads;
        let (per_cta, variant) = Self::rows_per_cta(rows);
        let row_groups = rows.div_ceil(per_cta);
        let keys = a.seq_len - a.lo;
        let base = a.num_kv_heads * row_groups;
        let splits = (4 * self.sm_count)
            .div_ceil(base)
            .min(keys.div_ceil(256))
            .clamp(1, 65535);
        let keys_per_split = keys.div_ceil(splits) as i64;
        let total_rows = num_q_heads * a.q_len;
        fits(
            "query",
            "query rows per kv head (group * q_len)",
            rows,
            INT_MAX,
        )?;
        fits("query", "query rows in all", total_rows, INT_MAX)?;
        fits("query", "row groups per kv head", row_groups, GRID_YZ_MAX)?;
        fits(
            "num_kv_heads",
            "the number of kv heads",
            a.num_kv_heads,
            GRID_YZ_MAX,
        )?;
        let o_bytes = total_rows * splits * d * 4;
        let ml_bytes = total_rows * splits * 2 * 4;
        // SAFETY: stream-ordered allocation on the caller's stream, freed by `attend_merge`.
        let ws = unsafe { cu::malloc_async(stream.0, o_bytes + ml_bytes) }
            .map_err(|e| driver_err("allocating attention workspace", e))?;
        let (o_part, ml_part) = (ws, ws + o_bytes as u64);
        let q_len = a.q_len as i32;
        let (seq_len, lo) = (a.seq_len as i64, a.lo as i64);
        let group = a.group as i32;
        let softcap = a.softcap.unwrap_or(0.0);
        let window = a.window.map_or(0, |w| w.min(i32::MAX as usize)) as i32;
        let skip = i32::from(skip_host);
        let s = self.borrow(stream);
        let mut b = s.launch_builder(&self.attend_partial[variant]);
        b.arg(&q.ptr).arg(&q.s0).arg(&q.s1).arg(&q_len);
        b.arg(&src).arg(&seq_len).arg(&lo).arg(&keys_per_split);
        b.arg(&group).arg(&a.scale).arg(&softcap).arg(&window);
        b.arg(share).arg(&skip).arg(&o_part).arg(&ml_part);
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, a.num_kv_heads as u32, row_groups as u32),
            block_dim: (ATTEND_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `attend_partial`'s parameters one for one; the caller
        // vouches for the addresses, the workspace was allocated above.
        if let Err(e) = unsafe { Self::launch("attend_partial", b, cfg) } {
            // SAFETY: allocated above on this stream, used by nothing.
            let _ = unsafe { cu::free_async(ws, stream.0) };
            return Err(e);
        }
        Ok(Pending {
            ws,
            o_part,
            ml_part,
            splits,
            q_len: a.q_len,
            total_rows,
            sinks: a.sinks,
        })
    }

    /// The workspace for `slots` staged partials of each of `rows` query rows (every slot's
    /// max preset to -inf), on `stream`; `attend_merge` frees it.
    ///
    /// # Safety
    /// The context must be bound; `stream` a live stream of it.
    pub unsafe fn staged_workspace(
        &self,
        stream: Stream,
        rows: usize,
        slots: usize,
    ) -> Result<StagedWs> {
        fits("query", "staged partials per row", slots, INT_MAX)?;
        let o_bytes = rows * slots * self.head_dim * 4;
        let ml_words = rows * slots * 2;
        // SAFETY: stream-ordered allocation on the caller's stream, freed by `attend_merge`.
        let ws = unsafe { cu::malloc_async(stream.0, o_bytes + ml_words * 4) }
            .map_err(|e| driver_err("allocating staged attention workspace", e))?;
        let ml = ws + o_bytes as u64;
        // -inf as f32 bits: a slot nobody writes merges as no keys.
        // SAFETY: `ml_words` words at `ml` lie in the allocation above.
        let set = unsafe { sys::cuMemsetD32Async(ml, 0xff80_0000, ml_words, stream.0) }.result();
        if let Err(e) = set {
            // SAFETY: allocated above on this stream, used by nothing.
            let _ = unsafe { cu::free_async(ws, stream.0) };
            return Err(driver_err("clearing staged attention workspace", e));
        }
        Ok(StagedWs {
            ws,
            o: ws,
            ml,
            slots,
        })
    }

    /// Partial attention of `q` over staged `units` (their keys in device memory), into the
    /// slots of `w`.
    ///
    /// # Safety
    /// As for `attend`; every unit's `k`, `v` hold its `n` rows until the stream has run this
    /// work, and its slots lie in `w`.
    pub unsafe fn attend_staged(
        &self,
        stream: Stream,
        q: DevTensor,
        a: &AttendLaunch,
        units: &Units,
        w: &StagedWs,
    ) -> Result<()> {
        let count = units.count.max(0) as usize;
        if count == 0 {
            return Ok(());
        }
        if count > MAX_UNITS {
            return Err(Error::value("units", "more than MAX_UNITS in one launch"));
        }
        let rows = a.group * a.q_len;
        let (per_cta, variant) = Self::rows_per_cta(rows);
        let row_groups = rows.div_ceil(per_cta);
        fits("query", "row groups per kv head", row_groups, GRID_YZ_MAX)?;
        let subs = units.u[..count]
            .iter()
            .map(|u| u.subs)
            .max()
            .unwrap_or(1)
            .max(1) as usize;
        fits("units", "pieces of one unit", subs, GRID_YZ_MAX)?;
        let q_len = a.q_len as i32;
        let seq_len = a.seq_len as i64;
        let group = a.group as i32;
        let softcap = a.softcap.unwrap_or(0.0);
        let window = a.window.map_or(0, |w| w.min(i32::MAX as usize)) as i32;
        let slots = w.slots as i32;
        let s = self.borrow(stream);
        let mut b = s.launch_builder(&self.attend_staged[variant]);
        b.arg(&q.ptr).arg(&q.s0).arg(&q.s1).arg(&q_len);
        b.arg(&seq_len)
            .arg(&group)
            .arg(&a.scale)
            .arg(&softcap)
            .arg(&window);
        b.arg(units).arg(&slots).arg(&w.o).arg(&w.ml);
        let cfg = LaunchConfig {
            grid_dim: (count as u32, row_groups as u32, subs as u32),
            block_dim: (ATTEND_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `attend_staged_rR`'s parameters one for one; the caller
        // vouches for the addresses.
        unsafe { Self::launch("attend_staged", b, cfg) }
    }

    /// Merges `p`'s splits, `staged`'s slots and, for its first rows, `extra` (the CPU's
    /// share) into `out`, and frees both workspaces whatever happens.
    ///
    /// # Safety
    /// As for `attend`; `p` came from `attend_partial` on this stream, `staged` from
    /// `staged_workspace` with `p`'s rows.
    pub unsafe fn attend_merge(
        &self,
        stream: Stream,
        p: Pending,
        extra: Option<Extra>,
        staged: Option<StagedWs>,
        out: DevTensor,
    ) -> Result<()> {
        let splits = p.splits as i32;
        let q_len = p.q_len as i32;
        let e = extra.unwrap_or(Extra {
            o: 0,
            lse: 0,
            rows: 0,
        });
        let erows = e.rows as i32;
        let (o2, ml2, slots2) = staged
            .as_ref()
            .map_or((0, 0, 0), |w| (w.o, w.ml, w.slots as i32));
        let s = self.borrow(stream);
        let mut b = s.launch_builder(&self.merge_partials);
        b.arg(&p.o_part).arg(&p.ml_part).arg(&splits);
        b.arg(&o2).arg(&ml2).arg(&slots2).arg(&q_len);
        b.arg(&out.ptr).arg(&out.s0).arg(&out.s1);
        b.arg(&e.o).arg(&e.lse).arg(&erows).arg(&p.sinks);
        let cfg = LaunchConfig {
            grid_dim: (p.total_rows as u32, 1, 1),
            block_dim: (self.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `merge_partials`'s parameters one for one.
        let launched = unsafe { Self::launch("merge_partials", b, cfg) };
        // SAFETY: allocated by `attend_partial` / `staged_workspace` on this stream; freed
        // after their users.
        let freed = unsafe { cu::free_async(p.ws, stream.0) };
        let freed2 = match staged {
            // SAFETY: as above.
            Some(w) => unsafe { cu::free_async(w.ws, stream.0) },
            None => Ok(()),
        };
        launched?;
        freed.map_err(|e| driver_err("freeing workspace", e))?;
        freed2.map_err(|e| driver_err("freeing workspace", e))
    }

    /// Writes `n` tokens of `k` and `v` (`[heads, n, head_dim]`, T) at positions `pos0..` of
    /// the layer whose block table is at `table` (int8: quantized into its rows).
    ///
    /// # Safety
    /// As for `attend`; every block the positions fall in must be in the table.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn append(
        &self,
        stream: Stream,
        k: DevTensor,
        v: DevTensor,
        heads: usize,
        n: usize,
        pos0: usize,
        table: u64,
        max_blocks: usize,
        block_size: usize,
    ) -> Result<()> {
        let total = heads * n * self.append_threads_per_row();
        if total == 0 {
            return Ok(());
        }
        fits("key", "kv heads", heads, INT_MAX)?;
        fits("key", "tokens in one append", n, INT_MAX)?;
        fits("key", "thread blocks", total.div_ceil(256), INT_MAX)?;
        fits("max_len", "blocks per head", max_blocks, INT_MAX)?;
        fits("block_size", "tokens per block", block_size, INT_MAX)?;
        let (h, nn) = (heads as i32, n as i32);
        let p0 = pos0 as i64;
        let (mb, bs) = (max_blocks as i32, block_size as i32);
        let s = self.borrow(stream);
        let mut b = s.launch_builder(&self.append_kv);
        b.arg(&k.ptr).arg(&k.s0).arg(&k.s1);
        b.arg(&v.ptr).arg(&v.s0).arg(&v.s1);
        b.arg(&h).arg(&nn).arg(&p0).arg(&table).arg(&mb).arg(&bs);
        // SAFETY: the arguments match `append_kv`'s parameters; the caller vouches for them.
        unsafe { Self::launch("append_kv", b, Self::flat(total)) }
    }

    /// Copies positions `a..a + n` of heads `h0..h0 + heads` into `ko` and `vo`
    /// (`[heads, n, head_dim]` T, each with its own strides); int8 rows are dequantized.
    ///
    /// # Safety
    /// As for `append`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather(
        &self,
        stream: Stream,
        table: u64,
        max_blocks: usize,
        block_size: usize,
        h0: usize,
        heads: usize,
        a: usize,
        n: usize,
        ko: DevTensor,
        vo: DevTensor,
    ) -> Result<()> {
        let total = heads * n * (self.head_dim / self.vec());
        if total == 0 {
            return Ok(());
        }
        fits(
            "head_start",
            "the last kv head",
            h0.saturating_add(heads),
            INT_MAX,
        )?;
        fits("end", "tokens in one gather", n, INT_MAX)?;
        fits("key_out", "thread blocks", total.div_ceil(256), INT_MAX)?;
        fits("max_len", "blocks per head", max_blocks, INT_MAX)?;
        fits("block_size", "tokens per block", block_size, INT_MAX)?;
        let (mb, bs) = (max_blocks as i32, block_size as i32);
        let (hh0, hh) = (h0 as i32, heads as i32);
        let aa = a as i64;
        let nn = n as i32;
        let s = self.borrow(stream);
        let mut b = s.launch_builder(&self.gather_kv);
        b.arg(&table)
            .arg(&mb)
            .arg(&bs)
            .arg(&hh0)
            .arg(&hh)
            .arg(&aa)
            .arg(&nn);
        b.arg(&ko.ptr).arg(&ko.s0).arg(&ko.s1);
        b.arg(&vo.ptr).arg(&vo.s0).arg(&vo.s1);
        // SAFETY: the arguments match `gather_kv`'s parameters; the caller vouches for them.
        unsafe { Self::launch("gather_kv", b, Self::flat(total)) }
    }

    /// Dequantizes staged int8 `units` (each `n` rows of head `head` from position `pos` on,
    /// in device memory at `k` and `v`) into rows `pos - a..` of `ko` and `vo`
    /// (`[heads, n, head_dim]` T, each with its own strides, as for `gather`). Int8 kernels
    /// only.
    ///
    /// # Safety
    /// As for `append`; every unit's `k`, `v` hold its `n` rows until the stream has run this
    /// work, and its rows lie in the outputs.
    pub unsafe fn dequant_staged(
        &self,
        stream: Stream,
        units: &Units,
        a: usize,
        ko: DevTensor,
        vo: DevTensor,
    ) -> Result<()> {
        let Some(f) = &self.dequant_staged else {
            return Err(Error::value(
                "kv_dtype",
                "staged rows are dequantized only by an int8 store's kernels",
            ));
        };
        let count = units.count.max(0) as usize;
        if count == 0 {
            return Ok(());
        }
        if count > MAX_UNITS {
            return Err(Error::value("units", "more than MAX_UNITS in one launch"));
        }
        let most = units.u[..count]
            .iter()
            .map(|u| u.n.max(0))
            .max()
            .unwrap_or(0) as usize;
        let ctas = (most * (self.head_dim / self.vec())).div_ceil(256);
        if ctas == 0 {
            return Ok(());
        }
        fits("units", "thread blocks per unit", ctas, GRID_YZ_MAX)?;
        let aa = a as i64;
        let s = self.borrow(stream);
        let mut b = s.launch_builder(f);
        b.arg(units).arg(&aa);
        b.arg(&ko.ptr).arg(&ko.s0).arg(&ko.s1);
        b.arg(&vo.ptr).arg(&vo.s0).arg(&vo.s1);
        let cfg = LaunchConfig {
            grid_dim: (count as u32, ctas as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `dequant_staged`'s parameters; the caller vouches for
        // the addresses.
        unsafe { Self::launch("dequant_staged", b, cfg) }
    }

    /// `total` threads, 256 a block.
    fn flat(total: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (total.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

#[cfg(test)]
#[path = "../../tests/rust/cuda/kernels.rs"]
mod tests;
