//! Attention on the GPU: the decode/prefill kernel over a CUDA store's layer (its block
//! table), or over explicit dense tensors.

use super::args::{self, Params};
use crate::cuda::kernels::{AttendLaunch, KvSrc};
use crate::cuda::Stream;
use crate::error::{Error, Result};
use crate::quant::KvFormat;
use crate::store::{CudaStore, DeviceLayer};
use crate::tensor::{DType, DevTensor};

/// Attention of device `query` (`[num_q_heads, q_len, head_dim]`) over every key of `layer`,
/// into `out` (same shape); `sinks` is the device address of `[num_q_heads]` f32 sink logits.
///
/// # Safety
/// `query` and `out` must be valid device tensors of those shapes, and `sinks` of its, alive
/// until `stream` has run this work.
#[allow(clippy::too_many_arguments)]
pub unsafe fn attend(
    store: &CudaStore,
    layer: usize,
    query: DevTensor,
    num_q_heads: usize,
    q_len: usize,
    params: &Params,
    sinks: Option<u64>,
    out: DevTensor,
    stream: Stream,
) -> Result<()> {
    let view = store.device_view(layer)?;
    let launch = layer_launch(&view, num_q_heads, q_len, params, sinks)?;
    if q_len == 0 {
        return Ok(());
    }
    store.gpu().bind()?;
    // SAFETY: the caller vouches for `query` and `out`; the table covers `start..len`.
    unsafe {
        store
            .kernels()
            .attend(stream, query, view.src(), &launch, out)
    }
}

/// The checked launch of `num_q_heads` heads of `q_len` queries over the layer `view`.
pub fn layer_launch(
    view: &DeviceLayer<'_>,
    num_q_heads: usize,
    q_len: usize,
    params: &Params,
    sinks: Option<u64>,
) -> Result<AttendLaunch> {
    args::launch(
        num_q_heads,
        q_len,
        view.num_kv_heads(),
        view.len(),
        view.start(),
        params,
        sinks,
    )
}

/// Dense keys and values on the GPU: `[num_kv_heads, kv_len, head_dim]` each, with the same
/// strides.
pub struct DenseDev {
    pub k: DevTensor,
    pub v: DevTensor,
    pub num_kv_heads: usize,
    pub kv_len: usize,
}

/// Attention of `query` (`[num_q_heads, q_len, head_dim]`) over dense `kv`, into `out`, on
/// device `ordinal`; `sinks` is the device address of `[num_q_heads]` f32 sink logits.
///
/// # Safety
/// Every tensor must be valid device memory of the shapes described, alive until `stream` has
/// run this work.
#[allow(clippy::too_many_arguments)]
pub unsafe fn attend_dense(
    ordinal: usize,
    dtype: DType,
    query: DevTensor,
    q_shape: [usize; 3],
    kv: &DenseDev,
    params: &Params,
    sinks: Option<u64>,
    out: DevTensor,
    stream: Stream,
) -> Result<()> {
    if kv.k.s0 != kv.v.s0 || kv.k.s1 != kv.v.s1 {
        return Err(Error::value("value", "must have key's strides"));
    }
    let [hq, lq, d] = q_shape;
    let launch = args::launch(hq, lq, kv.num_kv_heads, kv.kv_len, 0, params, sinks)?;
    let gpu = crate::cuda::gpu(ordinal)?;
    // Dense keys and values are the caller's tensors, never int8 blocks.
    let kernels = gpu.kernels(dtype, d, KvFormat::Exact)?;
    let src = KvSrc {
        table: 0,
        max_blocks: 0,
        block_size: 0,
        k: kv.k.ptr,
        v: kv.v.ptr,
        s0: kv.k.s0,
        s1: kv.k.s1,
    };
    gpu.bind()?;
    if lq == 0 {
        return Ok(());
    }
    // SAFETY: forwarded from the caller.
    unsafe { kernels.attend(stream, query, src, &launch, out) }
}
