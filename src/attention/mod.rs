//! Attention over a layer's blocks, read through the store's views: `args` (the parameters,
//! one place), `cpu` (the CPU kernel), `cuda` (the GPU kernels over a store or dense tensors),
//! `shared` (the CPU and the GPU on one decode step, merged by log-sum-exp) and `policy` (who
//! attends where). `attend_cuda` is the one entry of a CUDA store's attention: it asks the
//! policy and runs the mechanism.

pub mod args;
pub mod cpu;
pub mod cuda;
pub mod policy;
pub mod rates;
pub mod shared;

use crate::cuda::Stream;
use crate::error::Result;
use crate::store::CudaStore;
use crate::tensor::DevTensor;
use args::Params;
use policy::SharePolicy;

/// Attention of device `query` (`[num_q_heads, q_len, head_dim]`; `contiguous` when its rows
/// are packed) over every key of `layer`, into `out`; `policy` decides whether the CPU takes a
/// share of the host-resident keys. `sinks`: the device address of `[num_q_heads]` f32 learned
/// sink logits (gpt-oss), folded into each row's softmax once, by the final merge.
///
/// # Safety
/// `query` and `out` must be valid device tensors of those shapes, and `sinks` of its, alive
/// until `stream` has run this work.
#[allow(clippy::too_many_arguments)]
pub unsafe fn attend_cuda(
    store: &mut CudaStore,
    policy: &SharePolicy,
    layer: usize,
    query: DevTensor,
    q_shape: [usize; 3],
    contiguous: bool,
    params: &Params,
    sinks: Option<u64>,
    out: DevTensor,
    stream: Stream,
) -> Result<()> {
    // A failure of an earlier step's CPU share that nobody collected raises here.
    if let Some(e) = store.take_share_error() {
        return Err(e);
    }
    let [hq, lq, _] = q_shape;
    let cfg = store.config();
    let token_bytes = 2 * cfg.head_dim * cfg.dtype.size();
    let view = store.device_view(layer)?;
    let split = policy.split(lq, contiguous, &view, params.window, token_bytes);
    let pool = policy.pool.clone();
    match split {
        Some(s) => crate::with_element!(store.config().dtype, E => {
            // SAFETY: forwarded from the caller.
            unsafe {
                shared::attend::<E>(
                    store, layer, query, hq, params, sinks, &s.from, pool, out, stream,
                )
            }
        }),
        // SAFETY: forwarded from the caller.
        None => unsafe { cuda::attend(store, layer, query, hq, lq, params, sinks, out, stream) },
    }
}
