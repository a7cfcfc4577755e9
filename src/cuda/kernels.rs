//! The kernels of `kernels/attention.cu`: compiled by NVRTC once per (device, dtype,
//! head_dim), loaded once, launched on the caller's stream. Every launch site is the same
//! three steps: check the arguments, pack them, launch and check the launch.

use super::{driver_err, Gpu, Stream};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::ffi::{c_void, CString};

const SOURCE: &str = include_str!("../../kernels/attention.cu");
/// Query rows per CTA of `attend_partial` (`ROWS` in the source).
const ROWS: usize = 8;
/// Threads per CTA of `attend_partial` (`32 * NWARPS`).
const ATTEND_THREADS: u32 = 128;

/// Where a layer's keys and values are: a block table, or dense strided tensors.
/// Layout matches `struct KvSrc` in the source.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KvSrc {
    /// Device address of `[heads][max_blocks][2]` u64 block pointers, or 0 for dense.
    pub table: u64,
    pub max_blocks: i32,
    pub block_size: i32,
    /// Dense only: `[heads, len, head_dim]` keys and values, element strides `s0`, `s1`.
    pub k: u64,
    pub v: u64,
    pub s0: i64,
    pub s1: i64,
}

/// Kv heads `0..heads` whose keys from `from[h]` on are attended on the CPU (layout of
/// `struct CpuShare` in the source).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CpuShare {
    pub heads: i32,
    pub pad: i32,
    pub from: [i64; MAX_CPU_HEADS],
}

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
}

/// A device tensor `[d0, d1, head_dim]`: address and element strides of the first two dims.
#[derive(Clone, Copy, Debug)]
pub struct DevTensor {
    pub ptr: u64,
    pub s0: i64,
    pub s1: i64,
}

/// The model's attention arithmetic for one launch.
#[derive(Clone, Copy, Debug)]
pub struct AttnArgs {
    pub q_len: usize,
    pub seq_len: usize,
    /// First key position any query reads.
    pub lo: usize,
    pub group: usize,
    pub num_kv_heads: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
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

/// PTX of `kernels/attention.cu` for `dtype`, `head_dim` and compute capability
/// `major.minor`. Needs NVRTC only (no GPU), so it is tested on machines without one.
pub fn compile_ptx(dtype: DType, head_dim: usize, major: i32, minor: i32) -> Result<String> {
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
    let opts = CompileOptions {
        arch: Some(arch),
        options: vec![
            format!("-DHEAD_DIM={head_dim}"),
            elem.to_string(),
            "-std=c++17".into(),
        ],
        name: Some("attention.cu".into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(SOURCE, opts).map_err(|e| {
        Error::Cuda(format!(
            "NVRTC failed to compile kernels/attention.cu: {e:?}"
        ))
    })?;
    Ok(ptx.to_src())
}

pub struct Kernels {
    module: sys::CUmodule,
    attend_partial: sys::CUfunction,
    merge_partials: sys::CUfunction,
    append_kv: sys::CUfunction,
    gather_kv: sys::CUfunction,
    pub head_dim: usize,
    pub dtype: DType,
    sm_count: usize,
}

// SAFETY: module and function handles are process-wide driver tokens, valid on any thread
// with the context bound (every launch binds it).
unsafe impl Send for Kernels {}
// SAFETY: as above; launching does not mutate the handles.
unsafe impl Sync for Kernels {}

impl Drop for Kernels {
    fn drop(&mut self) {
        // SAFETY: loaded in `compile`, unloaded once.
        let _ = unsafe { cu::module::unload(self.module) };
    }
}

impl Kernels {
    /// Compiles and loads the kernels for `dtype` and `head_dim` on `gpu`.
    pub fn compile(gpu: &Gpu, dtype: DType, head_dim: usize) -> Result<Self> {
        let (major, minor) = gpu.compute_capability;
        let ptx = compile_ptx(dtype, head_dim, major, minor)?;
        let image = CString::new(ptx).expect("PTX has no NUL");
        gpu.bind()?;
        // SAFETY: `image` is a NUL-terminated PTX module produced just above.
        let module = unsafe { cu::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(|e| driver_err("loading the compiled kernels", e))?;
        let get = |name: &str| -> Result<sys::CUfunction> {
            // SAFETY: `module` was loaded above and is not unloaded while `Kernels` lives.
            unsafe { cu::module::get_function(module, CString::new(name).expect("name")) }
                .map_err(|e| driver_err(&format!("finding kernel {name}"), e))
        };
        Ok(Kernels {
            attend_partial: get("attend_partial")?,
            merge_partials: get("merge_partials")?,
            append_kv: get("append_kv")?,
            gather_kv: get("gather_kv")?,
            module,
            head_dim,
            dtype,
            sm_count: gpu.sm_count,
        })
    }

    fn vec(&self) -> usize {
        16 / self.dtype.size()
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
        a: &AttnArgs,
        out: DevTensor,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe {
            let p = self.attend_partial(stream, q, src, a, &CpuShare::NONE)?;
            self.attend_merge(stream, p, None, out)
        }
    }

    /// The first half of `attend`: the split partial results, with the keys `share` leaves to
    /// the CPU skipped. `attend_merge` finishes it (and frees its workspace).
    ///
    /// # Safety
    /// As for `attend`.
    pub unsafe fn attend_partial(
        &self,
        stream: Stream,
        q: DevTensor,
        src: KvSrc,
        a: &AttnArgs,
        share: &CpuShare,
    ) -> Result<Pending> {
        let d = self.head_dim;
        let rows = a.group * a.q_len;
        let num_q_heads = a.group * a.num_kv_heads;
        let row_groups = rows.div_ceil(ROWS);
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

        let (mut qp, mut qs0, mut qs1) = (q.ptr, q.s0, q.s1);
        let mut q_len = a.q_len as i32;
        let mut src_v = src;
        let (mut seq_len, mut lo) = (a.seq_len as i64, a.lo as i64);
        let mut kps = keys_per_split;
        let mut group = a.group as i32;
        let mut scale = a.scale;
        let mut softcap = a.softcap.unwrap_or(0.0);
        let mut window = a.window.map_or(0, |w| w.min(i32::MAX as usize)) as i32;
        let mut share_v = *share;
        let (mut op, mut mp) = (o_part, ml_part);
        let mut params: [*mut c_void; 15] = [
            &mut qp as *mut _ as *mut c_void,
            &mut qs0 as *mut _ as *mut c_void,
            &mut qs1 as *mut _ as *mut c_void,
            &mut q_len as *mut _ as *mut c_void,
            &mut src_v as *mut _ as *mut c_void,
            &mut seq_len as *mut _ as *mut c_void,
            &mut lo as *mut _ as *mut c_void,
            &mut kps as *mut _ as *mut c_void,
            &mut group as *mut _ as *mut c_void,
            &mut scale as *mut _ as *mut c_void,
            &mut softcap as *mut _ as *mut c_void,
            &mut window as *mut _ as *mut c_void,
            &mut share_v as *mut _ as *mut c_void,
            &mut op as *mut _ as *mut c_void,
            &mut mp as *mut _ as *mut c_void,
        ];
        let grid = (splits as u32, a.num_kv_heads as u32, row_groups as u32);
        // SAFETY: the parameters match `attend_partial`'s signature one for one; the caller
        // vouches for the addresses.
        let launched = unsafe {
            cu::launch_kernel(
                self.attend_partial,
                grid,
                (ATTEND_THREADS, 1, 1),
                0,
                stream.0,
                &mut params,
            )
        };
        if let Err(e) = launched {
            // SAFETY: allocated above on this stream, used by nothing.
            let _ = unsafe { cu::free_async(ws, stream.0) };
            return Err(driver_err("launching attend_partial", e));
        }
        Ok(Pending {
            ws,
            o_part,
            ml_part,
            splits,
            q_len: a.q_len,
            total_rows,
        })
    }

    /// Merges `p`'s splits (and, for its first `rows` rows, the CPU's share: normalised
    /// `[rows, head_dim]` f32 outputs at `o` and their log-sum-exp at `lse`) into `out`.
    ///
    /// # Safety
    /// As for `attend`; `p` came from `attend_partial` on this stream.
    pub unsafe fn attend_merge(
        &self,
        stream: Stream,
        p: Pending,
        extra: Option<(u64, u64, usize)>,
        out: DevTensor,
    ) -> Result<()> {
        let (mut op, mut mp) = (p.o_part, p.ml_part);
        let mut splits_i = p.splits as i32;
        let mut q_len = p.q_len as i32;
        let (mut outp, mut os0, mut os1) = (out.ptr, out.s0, out.s1);
        let (mut eo, mut el, erows) = extra.unwrap_or((0, 0, 0));
        let mut erows = erows as i32;
        let mut params: [*mut c_void; 10] = [
            &mut op as *mut _ as *mut c_void,
            &mut mp as *mut _ as *mut c_void,
            &mut splits_i as *mut _ as *mut c_void,
            &mut q_len as *mut _ as *mut c_void,
            &mut outp as *mut _ as *mut c_void,
            &mut os0 as *mut _ as *mut c_void,
            &mut os1 as *mut _ as *mut c_void,
            &mut eo as *mut _ as *mut c_void,
            &mut el as *mut _ as *mut c_void,
            &mut erows as *mut _ as *mut c_void,
        ];
        // SAFETY: the parameters match `merge_partials`'s signature one for one.
        let launched = unsafe {
            cu::launch_kernel(
                self.merge_partials,
                (p.total_rows as u32, 1, 1),
                (self.head_dim as u32, 1, 1),
                0,
                stream.0,
                &mut params,
            )
        };
        // SAFETY: allocated by `attend_partial` on this stream; freed after its users.
        let freed = unsafe { cu::free_async(p.ws, stream.0) };
        launched.map_err(|e| driver_err("launching merge_partials", e))?;
        freed.map_err(|e| driver_err("freeing workspace", e))
    }

    /// Writes `n` tokens of `k` and `v` (`[heads, n, head_dim]`) at positions `pos0..` of the
    /// layer whose block table is at `table`.
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
        let total = heads * n * (self.head_dim / self.vec());
        if total == 0 {
            return Ok(());
        }
        fits("key", "kv heads", heads, INT_MAX)?;
        fits("key", "tokens in one append", n, INT_MAX)?;
        fits("key", "thread blocks", total.div_ceil(256), INT_MAX)?;
        fits("max_len", "blocks per head", max_blocks, INT_MAX)?;
        fits("block_size", "tokens per block", block_size, INT_MAX)?;
        let (mut kp, mut ks0, mut ks1) = (k.ptr, k.s0, k.s1);
        let (mut vp, mut vs0, mut vs1) = (v.ptr, v.s0, v.s1);
        let (mut h, mut nn) = (heads as i32, n as i32);
        let mut p0 = pos0 as i64;
        let mut t = table;
        let (mut mb, mut bs) = (max_blocks as i32, block_size as i32);
        let mut params: [*mut c_void; 12] = [
            &mut kp as *mut _ as *mut c_void,
            &mut ks0 as *mut _ as *mut c_void,
            &mut ks1 as *mut _ as *mut c_void,
            &mut vp as *mut _ as *mut c_void,
            &mut vs0 as *mut _ as *mut c_void,
            &mut vs1 as *mut _ as *mut c_void,
            &mut h as *mut _ as *mut c_void,
            &mut nn as *mut _ as *mut c_void,
            &mut p0 as *mut _ as *mut c_void,
            &mut t as *mut _ as *mut c_void,
            &mut mb as *mut _ as *mut c_void,
            &mut bs as *mut _ as *mut c_void,
        ];
        let grid = (total.div_ceil(256) as u32, 1, 1);
        // SAFETY: the parameters match `append_kv`'s signature; the caller vouches for them.
        unsafe { cu::launch_kernel(self.append_kv, grid, (256, 1, 1), 0, stream.0, &mut params) }
            .map_err(|e| driver_err("launching append_kv", e))
    }

    /// Copies positions `a..a + n` of heads `h0..h0 + heads` into `ko` and `vo`
    /// (`[heads, n, head_dim]`).
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
        if ko.s0 != vo.s0 || ko.s1 != vo.s1 {
            return Err(Error::value(
                "value_out",
                "must have the same strides as key_out",
            ));
        }
        let total = heads * n * (self.head_dim / self.vec());
        if total == 0 {
            return Ok(());
        }
        fits("head_start", "the last kv head", h0 + heads, INT_MAX)?;
        fits("end", "tokens in one gather", n, INT_MAX)?;
        fits("key_out", "thread blocks", total.div_ceil(256), INT_MAX)?;
        fits("max_len", "blocks per head", max_blocks, INT_MAX)?;
        fits("block_size", "tokens per block", block_size, INT_MAX)?;
        let mut t = table;
        let (mut mb, mut bs) = (max_blocks as i32, block_size as i32);
        let (mut hh0, mut hh) = (h0 as i32, heads as i32);
        let mut aa = a as i64;
        let mut nn = n as i32;
        let (mut kp, mut vp) = (ko.ptr, vo.ptr);
        let (mut s0, mut s1) = (ko.s0, ko.s1);
        let mut params: [*mut c_void; 11] = [
            &mut t as *mut _ as *mut c_void,
            &mut mb as *mut _ as *mut c_void,
            &mut bs as *mut _ as *mut c_void,
            &mut hh0 as *mut _ as *mut c_void,
            &mut hh as *mut _ as *mut c_void,
            &mut aa as *mut _ as *mut c_void,
            &mut nn as *mut _ as *mut c_void,
            &mut kp as *mut _ as *mut c_void,
            &mut vp as *mut _ as *mut c_void,
            &mut s0 as *mut _ as *mut c_void,
            &mut s1 as *mut _ as *mut c_void,
        ];
        let grid = (total.div_ceil(256) as u32, 1, 1);
        // SAFETY: the parameters match `gather_kv`'s signature; the caller vouches for them.
        unsafe { cu::launch_kernel(self.gather_kv, grid, (256, 1, 1), 0, stream.0, &mut params) }
            .map_err(|e| driver_err("launching gather_kv", e))
    }
}

#[cfg(test)]
#[path = "../../tests/rust/cuda/kernels.rs"]
mod tests;
