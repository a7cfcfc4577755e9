//! The DLPack boundary: device, dtype, shape and strides are validated once, on entry, into
//! plain views that the rest of the core uses without further checks.

use crate::error::{Error, Result};
use dlpark::ffi::{DLDataTypeCode, DLDeviceType};
use dlpark::TensorRef;
use half::{bf16, f16};

/// Element types the store and the attention op accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The name torch uses (`torch.float32`, ...), without the prefix.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    /// Parses a dtype name as torch prints it, with or without `torch.`.
    pub fn parse(arg: &str, name: &str) -> Result<Self> {
        match name.trim_start_matches("torch.") {
            "float32" | "float" => Ok(DType::F32),
            "bfloat16" => Ok(DType::BF16),
            "float16" | "half" => Ok(DType::F16),
            other => Err(Error::type_(
                arg,
                format!("unsupported dtype {other:?}; expected float32, bfloat16 or float16"),
            )),
        }
    }
}

/// A scalar element of a KV tensor: converted to f32 for arithmetic, back for outputs.
pub trait Element: Copy + Send + Sync + Default + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // A shift, not half's generic path: this loop must vectorize.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// Where a tensor's memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// A device tensor `[d0, d1, head_dim]` as the GPU kernels take it: address and element
/// strides of the first two dims (the last is 1). Made by `Tensor3::cuda_view`.
#[derive(Clone, Copy, Debug)]
pub struct DevTensor {
    pub ptr: u64,
    pub s0: i64,
    pub s1: i64,
}

/// A validated 3-d tensor: `[d0, d1, d2]` with element strides, the last 1.
///
/// It borrows memory owned by the DLPack producer; the binding layer keeps the producer's
/// capsule alive for as long as a `Tensor3` built from it is used.
#[derive(Clone, Copy, Debug)]
pub struct Tensor3 {
    ptr: *mut u8,
    pub device: Device,
    pub dtype: DType,
    pub shape: [usize; 3],
    pub strides: [usize; 3],
}

// SAFETY: `Tensor3` is a pointer plus layout; the views it hands out carry the borrow rules,
// and writes go through `write_rows`, which callers run from one thread.
unsafe impl Send for Tensor3 {}
// SAFETY: as above; shared use only reads.
unsafe impl Sync for Tensor3 {}

impl Tensor3 {
    /// Validates `t` as a CPU or CUDA tensor of three dimensions, stride 1 on the last, no
    /// negative strides, and (when `writable`) no two elements at one address.
    pub fn from_dlpack(arg: &str, t: &TensorRef<'_>, writable: bool) -> Result<Self> {
        let dev = t.device();
        let device = match dev.device_type {
            DLDeviceType::CPU | DLDeviceType::CUDAHOST => Device::Cpu,
            DLDeviceType::CUDA => Device::Cuda(usize::try_from(dev.device_id).map_err(|_| {
                Error::type_(arg, format!("invalid CUDA device id {}", dev.device_id))
            })?),
            other => {
                return Err(Error::type_(
                    arg,
                    format!(
                        "tensor is on DLPack device type {}; expected a CPU or CUDA tensor",
                        other.0
                    ),
                ))
            }
        };
        let dt = t.dtype();
        let dtype = match (dt.code, dt.bits, dt.lanes) {
            (DLDataTypeCode::FLOAT, 32, 1) => DType::F32,
            (DLDataTypeCode::FLOAT, 16, 1) => DType::F16,
            (DLDataTypeCode::BFLOAT, 16, 1) => DType::BF16,
            (code, bits, lanes) => {
                return Err(Error::type_(
                    arg,
                    format!(
                        "unsupported dtype (DLPack code {}, {bits} bits, {lanes} lanes); \
                         expected float32, bfloat16 or float16",
                        code.0
                    ),
                ))
            }
        };
        let strides = t
            .strides_or_compact()
            .map_err(|e| Error::value(arg, format!("bad strides: {e}")))?;
        Self::new(
            arg,
            t.data_ptr() as *mut u8,
            t.byte_offset(),
            device,
            dtype,
            t.shape(),
            &strides,
            writable,
        )
    }

    /// Validates the layout a producer described: three dimensions, sizes and strides
    /// non-negative, stride 1 on the last, every element address (`base + byte_offset +
    /// index * size`) representable without overflow, and (when `writable`) no two elements
    /// at one address. The memory itself is not touched.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        arg: &str,
        base: *mut u8,
        byte_offset: u64,
        device: Device,
        dtype: DType,
        shape: &[i64],
        strides: &[i64],
        writable: bool,
    ) -> Result<Self> {
        if shape.len() != 3 || strides.len() != 3 {
            return Err(Error::value(
                arg,
                format!(
                    "expected 3 dimensions, got {} (shape {shape:?})",
                    shape.len()
                ),
            ));
        }
        let mut s = [0usize; 3];
        let mut d = [0usize; 3];
        for i in 0..3 {
            d[i] = usize::try_from(shape[i])
                .map_err(|_| Error::value(arg, format!("negative size in shape {shape:?}")))?;
        }
        // A stride that is never stepped (a dimension of size 1, or any dimension of an empty
        // view) says nothing about the layout: numpy exports empty arrays with all strides 0,
        // and a view flipped over one element with a negative stride. Such a dimension gets
        // the stride a contiguous layout would give it (the kernels may assume rows at least
        // a row apart; 0 there made the CPU kernel assert).
        let empty = d.contains(&0);
        for i in 0..3 {
            if empty || d[i] == 1 {
                s[i] = d[i + 1..].iter().map(|&n| n.max(1)).product();
                continue;
            }
            s[i] = usize::try_from(strides[i]).map_err(|_| {
                Error::value(
                    arg,
                    format!(
                        "negative stride in strides {strides:?}; call .contiguous() first \
                         (flipped views are not supported)"
                    ),
                )
            })?;
        }
        if !empty && d[2] > 1 && s[2] != 1 {
            return Err(Error::value(
                arg,
                format!(
                    "the last dimension must have stride 1, got strides {strides:?}; \
                     call .contiguous() first"
                ),
            ));
        }
        s[2] = 1;
        let too_big = || {
            Error::value(
                arg,
                format!(
                    "shape {shape:?} with strides {strides:?} spans more memory than can be \
                     addressed"
                ),
            )
        };
        // Every count the core and the kernels derive from the layout (elements, the span,
        // its bytes, the end address) is checked here once, so later arithmetic cannot wrap.
        d.iter()
            .try_fold(1usize, |n, &x| n.checked_mul(x))
            .ok_or_else(too_big)?;
        let mut span = 1usize;
        if !d.contains(&0) {
            for i in 0..3 {
                span = (d[i] - 1)
                    .checked_mul(s[i])
                    .and_then(|x| x.checked_add(span))
                    .ok_or_else(too_big)?;
            }
        }
        let offset = usize::try_from(byte_offset).map_err(|_| too_big())?;
        let start = (base as usize).checked_add(offset).ok_or_else(too_big)?;
        span.checked_mul(dtype.size())
            .and_then(|bytes| bytes.checked_add(start))
            .filter(|&end| end <= isize::MAX as usize)
            .ok_or_else(too_big)?;
        let t3 = Tensor3 {
            // The producer's base plus its byte offset: inside its allocation per the DLPack
            // contract (no overflow: checked above); only dereferenced through the views.
            ptr: base.wrapping_add(offset),
            device,
            dtype,
            shape: d,
            strides: s,
        };
        if writable && !t3.is_non_overlapping() {
            return Err(Error::value(
                arg,
                format!("output strides {strides:?} make elements overlap"),
            ));
        }
        Ok(t3)
    }

    /// The bytes a read of the whole view can touch: its first address and length.
    pub fn byte_range(&self) -> (usize, usize) {
        (self.ptr as usize, self.span() * self.dtype.size())
    }

    /// Number of elements a read of the whole view can touch: the span from the first to
    /// the last element, inclusive.
    pub fn span(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        1 + (0..3)
            .map(|i| (self.shape[i] - 1) * self.strides[i])
            .sum::<usize>()
    }

    /// Whether every index maps to its own address (required of outputs).
    fn is_non_overlapping(&self) -> bool {
        if self.shape.contains(&0) {
            return true; // no elements, no two at one address
        }
        let mut dims: Vec<(usize, usize)> = (0..3)
            .filter(|&i| self.shape[i] > 1)
            .map(|i| (self.strides[i], self.shape[i]))
            .collect();
        dims.sort_unstable();
        let mut extent = 1;
        for (stride, size) in dims {
            if stride < extent {
                return false;
            }
            extent = stride * size;
        }
        true
    }

    /// Whether the byte ranges of `self` and `other` intersect.
    pub fn overlaps(&self, other: &Tensor3) -> bool {
        let (a0, a1) = (
            self.ptr as usize,
            self.ptr as usize + self.span() * self.dtype.size(),
        );
        let (b0, b1) = (
            other.ptr as usize,
            other.ptr as usize + other.span() * other.dtype.size(),
        );
        a0 < b1 && b0 < a1 && self.span() > 0 && other.span() > 0
    }

    /// Checks that the tensor is on `device`; `arg` names it in the error.
    pub fn expect_device(&self, arg: &str, device: Device) -> Result<()> {
        if self.device != device {
            return Err(Error::type_(
                arg,
                format!("is on {:?}, expected {:?}", self.device, device),
            ));
        }
        Ok(())
    }

    /// The device address and strides of a CUDA tensor, checked for the kernels' 16-byte
    /// loads: an aligned base and rows that start on 16-byte boundaries.
    pub fn cuda_view(&self, arg: &str) -> Result<DevTensor> {
        if !matches!(self.device, Device::Cuda(_)) {
            return Err(Error::type_(arg, "expected a CUDA tensor"));
        }
        let es = self.dtype.size();
        let aligned = (self.ptr as usize).is_multiple_of(16)
            && (0..2).all(|i| self.shape[i] <= 1 || (self.strides[i] * es).is_multiple_of(16))
            && (self.shape[2] * es).is_multiple_of(16);
        if !aligned {
            return Err(Error::value(
                arg,
                format!(
                    "rows must start on 16-byte boundaries for the GPU kernels (strides {:?}, \
                     head_dim {} of {}); call .contiguous() first",
                    self.strides,
                    self.shape[2],
                    self.dtype.name()
                ),
            ));
        }
        // The kernels count rows in `int` and step by `long long` strides.
        for i in 0..2 {
            if i32::try_from(self.shape[i]).is_err() || i64::try_from(self.strides[i]).is_err() {
                return Err(Error::value(
                    arg,
                    format!(
                        "shape {:?} (strides {:?}) exceeds the GPU kernels' limit of {} rows \
                         per dimension",
                        self.shape,
                        self.strides,
                        i32::MAX
                    ),
                ));
            }
        }
        Ok(DevTensor {
            ptr: self.ptr as u64,
            s0: self.strides[0] as i64,
            s1: self.strides[1] as i64,
        })
    }

    /// Checks that the tensor may be written: the producer did not mark it read-only
    /// (`read_only_flag`, DLPack's `READ_ONLY`), and on the CPU every page its elements
    /// touch is writable memory (a read-only `mmap`, as under `np.memmap(mode="r")` seen
    /// through `torch.from_numpy`, carries no flag; writing it would kill the process).
    /// The probe writes each probed byte's own value back, through the kernel, which
    /// reports a fault as an error instead of a signal.
    pub fn check_writable(&self, arg: &str, read_only_flag: bool) -> Result<()> {
        let read_only = || {
            Error::value(
                arg,
                "is read-only memory (a read-only numpy array or memmap, or a tensor made from \
                 an immutable buffer); pass a writable tensor, e.g. torch.empty_like(...)",
            )
        };
        if read_only_flag {
            return Err(read_only());
        }
        if self.device != Device::Cpu || self.span() == 0 {
            return Ok(());
        }
        match writable_pages(&self.probe_addresses()) {
            Some(false) => Err(read_only()),
            _ => Ok(()),
        }
    }

    /// One address of an element of the tensor in every page its elements touch.
    fn probe_addresses(&self) -> Vec<usize> {
        const PAGE: usize = 4096;
        let es = self.dtype.size();
        let row_bytes = self.shape[2] * es;
        let base = self.ptr as usize;
        let mut out: Vec<usize> = Vec::new();
        for i0 in 0..self.shape[0] {
            for i1 in 0..self.shape[1] {
                let a = base + (i0 * self.strides[0] + i1 * self.strides[1]) * es;
                let last = a + row_bytes - 1;
                // The row's first byte, then the first byte of every later page it reaches.
                let mut p = a;
                while p <= last {
                    if out.last().is_none_or(|&q| q / PAGE != p / PAGE) {
                        out.push(p);
                    }
                    p = (p / PAGE + 1) * PAGE;
                }
            }
        }
        out.sort_unstable_by_key(|&p| p / PAGE);
        out.dedup_by_key(|p| *p / PAGE);
        out
    }

    /// The address of element `[0, 0, 0]`.
    pub fn data_addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Checks the dtype; `arg` names the tensor in the error.
    pub fn expect_dtype(&self, arg: &str, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::type_(
                arg,
                format!("dtype is {}, expected {}", self.dtype.name(), dtype.name()),
            ));
        }
        Ok(())
    }

    /// Checks the shape; `None` entries match any size.
    pub fn expect_shape(&self, arg: &str, what: &str, shape: [Option<usize>; 3]) -> Result<()> {
        let ok = (0..3).all(|i| shape[i].is_none_or(|n| n == self.shape[i]));
        if !ok {
            let want: Vec<String> = shape
                .iter()
                .map(|d| d.map_or("*".to_string(), |n| n.to_string()))
                .collect();
            return Err(Error::value(
                arg,
                format!(
                    "expected shape {what} = [{}], got {:?}",
                    want.join(", "),
                    self.shape
                ),
            ));
        }
        Ok(())
    }

    /// A typed read-only view.
    ///
    /// # Safety
    /// The producer's memory must stay alive and unwritten by others while the view is used,
    /// and `E` must match `self.dtype` (checked).
    pub unsafe fn view<E: Element>(&self) -> View3<'_, E> {
        assert_eq!(E::DTYPE, self.dtype, "view dtype must match the tensor's");
        assert_eq!(self.device, Device::Cpu, "host views need a CPU tensor");
        let data = if self.span() == 0 {
            &[][..]
        } else {
            // SAFETY: the producer guarantees `span()` elements from `ptr` (shape and strides
            // came from it and were checked non-negative); the caller keeps it alive.
            unsafe { std::slice::from_raw_parts(self.ptr as *const E, self.span()) }
        };
        View3 {
            data,
            shape: self.shape,
            strides: self.strides,
        }
    }

    /// Writes `rows[(i0 * d1 + i1) * d2 ..][.. d2]` into element `[i0, i1, :]`, converting from
    /// f32; `rows` holds the whole tensor in row-major order.
    ///
    /// # Safety
    /// The producer's memory must be alive and not read or written by anyone else meanwhile;
    /// `self` was validated `writable`, so no two rows share an address.
    pub unsafe fn write_rows<E: Element>(&self, rows: &[f32]) {
        assert_eq!(E::DTYPE, self.dtype, "write dtype must match the tensor's");
        let [d0, d1, d2] = self.shape;
        assert_eq!(rows.len(), d0 * d1 * d2);
        for i0 in 0..d0 {
            for i1 in 0..d1 {
                let off = i0 * self.strides[0] + i1 * self.strides[1];
                // SAFETY: `off + d2 <= span()`, inside the producer's allocation; rows do not
                // overlap (checked on entry) and nobody else touches them during the call.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut((self.ptr as *mut E).add(off), d2) };
                let src = &rows[(i0 * d1 + i1) * d2..][..d2];
                for (o, &x) in dst.iter_mut().zip(src) {
                    *o = E::from_f32(x);
                }
            }
        }
    }

    /// Copies `src` (row-major `[d0, d1, d2]`, already in this dtype) into the tensor.
    ///
    /// # Safety
    /// As for `write_rows`.
    pub unsafe fn write_same<E: Element>(&self, mut row: impl FnMut(usize, usize, &mut [E])) {
        assert_eq!(E::DTYPE, self.dtype, "write dtype must match the tensor's");
        let [d0, d1, d2] = self.shape;
        for i0 in 0..d0 {
            for i1 in 0..d1 {
                let off = i0 * self.strides[0] + i1 * self.strides[1];
                // SAFETY: as in `write_rows`.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut((self.ptr as *mut E).add(off), d2) };
                row(i0, i1, dst);
            }
        }
    }
}

/// Whether every byte at `addrs` can be written: `Some(false)` if one cannot, `None` where
/// the probe is unavailable (not Linux, or the system call is not permitted).
#[cfg(target_os = "linux")]
fn writable_pages(addrs: &[usize]) -> Option<bool> {
    // SAFETY: `getpid` has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut bytes = vec![0u8; addrs.len()];
    for (chunk, buf) in addrs.chunks(1024).zip(bytes.chunks_mut(1024)) {
        let local: Vec<libc::iovec> = buf
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b as *mut u8 as *mut libc::c_void,
                iov_len: 1,
            })
            .collect();
        let remote: Vec<libc::iovec> = chunk
            .iter()
            .map(|&a| libc::iovec {
                iov_base: a as *mut libc::c_void,
                iov_len: 1,
            })
            .collect();
        let n = chunk.len() as libc::c_ulong;
        // SAFETY: `process_vm_readv` (then `process_vm_writev`) on our own process copy between the
        // iovecs through the kernel, which checks every remote page's protection and returns
        // a short count (or EFAULT) instead of faulting. Local iovecs point into `buf`. The
        // write puts back the bytes just read, into elements of an output the caller is about
        // to overwrite, so no value anyone reads changes.
        let read = unsafe { libc::process_vm_readv(pid, local.as_ptr(), n, remote.as_ptr(), n, 0) };
        let done = if read == chunk.len() as isize {
            // SAFETY: as above.
            unsafe { libc::process_vm_writev(pid, local.as_ptr(), n, remote.as_ptr(), n, 0) }
        } else {
            read
        };
        if done < 0 {
            return match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EFAULT) => Some(false),
                // ENOSYS, EPERM (a seccomp filter): no probe here.
                _ => None,
            };
        }
        if done != chunk.len() as isize {
            // A short count: the kernel stopped at a page it cannot read or write.
            return Some(false);
        }
    }
    Some(true)
}

#[cfg(not(target_os = "linux"))]
fn writable_pages(_addrs: &[usize]) -> Option<bool> {
    None
}

/// A typed, strided, read-only `[d0, d1, d2]` view with stride 1 on the last dimension.
#[derive(Clone, Copy, Debug)]
pub struct View3<'a, E> {
    pub data: &'a [E],
    pub shape: [usize; 3],
    pub strides: [usize; 3],
}

impl<'a, E: Element> View3<'a, E> {
    /// A view over a row-major slice.
    pub fn contiguous(data: &'a [E], shape: [usize; 3]) -> Self {
        assert_eq!(data.len(), shape.iter().product::<usize>());
        View3 {
            data,
            shape,
            strides: [shape[1] * shape[2], shape[2], 1],
        }
    }

    /// Row `[i0, i1, :]`.
    #[inline]
    pub fn row(&self, i0: usize, i1: usize) -> &'a [E] {
        &self.data[i0 * self.strides[0] + i1 * self.strides[1]..][..self.shape[2]]
    }

    /// The 2-d slice `[i0, :, :]` as rows.
    pub fn rows(&self, i0: usize) -> Rows<'a, E> {
        let start = i0 * self.strides[0];
        let len = self.shape[1];
        let end = if len == 0 {
            start
        } else {
            start + (len - 1) * self.strides[1] + self.shape[2]
        };
        Rows {
            data: &self.data[start..end],
            stride: self.strides[1],
            len,
            width: self.shape[2],
        }
    }
}

/// `len` rows of `width` elements, `stride` elements apart.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a, E> {
    pub data: &'a [E],
    pub stride: usize,
    pub len: usize,
    pub width: usize,
}

impl<'a, E> Rows<'a, E> {
    /// Row `i`.
    #[inline(always)]
    pub fn row(&self, i: usize) -> &'a [E] {
        &self.data[i * self.stride..][..self.width]
    }

    /// Rows `a..b`.
    pub fn slice(&self, a: usize, b: usize) -> Rows<'a, E> {
        debug_assert!(a <= b && b <= self.len);
        if a == b {
            return Rows {
                data: &self.data[..0],
                stride: self.stride,
                len: 0,
                width: self.width,
            };
        }
        Rows {
            data: &self.data[a * self.stride..(b - 1) * self.stride + self.width],
            stride: self.stride,
            len: b - a,
            width: self.width,
        }
    }
}

/// Runs `$body` with `$E` bound to the element type of `$dtype`.
#[macro_export]
macro_rules! with_element {
    ($dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            $crate::tensor::DType::F32 => {
                type $E = f32;
                $body
            }
            $crate::tensor::DType::BF16 => {
                type $E = half::bf16;
                $body
            }
            $crate::tensor::DType::F16 => {
                type $E = half::f16;
                $body
            }
        }
    };
}

/// Checks that `t` is on `device`: another kind of device is a `TypeError`, another CUDA
/// device a `ValueError`; both name the argument.
pub fn same_device(arg: &str, t: &Tensor3, device: Device) -> Result<()> {
    match (t.device, device) {
        (Device::Cuda(got), Device::Cuda(want)) if got != want => Err(Error::value(
            arg,
            format!("is on cuda:{got}, the query on cuda:{want}"),
        )),
        _ => t.expect_device(arg, device),
    }
}

/// `same_device` for an argument that is not a `Tensor3` (the 1-d `sinks`).
pub fn same_device_as(arg: &str, got: Device, want: Device) -> Result<()> {
    match (got, want) {
        (Device::Cuda(g), Device::Cuda(w)) if g != w => Err(Error::value(
            arg,
            format!("is on cuda:{g}, the query on cuda:{w}"),
        )),
        _ if got != want => Err(Error::type_(
            arg,
            format!("is on {got:?}, expected {want:?} (the query's device)"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[path = "../tests/rust/tensor.rs"]
mod tests;
