//! Attention over a layer's blocks, read through the store's views: `args` (the parameters,
//! one place), `cpu` (the CPU kernel), `cuda` (the GPU kernels over a store or dense tensors),
//! `staged` (the copy engine staging host blocks for the GPU), `shared` (the CPU's part of a
//! decode step) and `policy` (who attends where, and how the GPU reads host blocks).
//! `attend_cuda` is the one entry of a CUDA store's attention: it asks the policy and runs the
//! mechanisms, merged once by log-sum-exp.

pub mod args;
pub mod cpu;
pub mod cuda;
pub mod policy;
pub mod rates;
pub mod shared;
pub mod staged;

use crate::cuda::kernels::CpuShare;
use crate::cuda::Stream;
use crate::error::Result;
use crate::store::CudaStore;
use crate::tensor::DevTensor;
use args::Params;
use policy::{HostReader, SharePolicy};

/// Attention of device `query` (`[num_q_heads, q_len, head_dim]`; `contiguous` when its rows
/// are packed) over every key of `layer`, into `out`; `policy` decides how the GPU reads the
/// host-resident keys (zero-copy, or staged by the copy engine) and whether the CPU takes a
/// share of them. `sinks`: the device address of `[num_q_heads]` f32 learned sink logits
/// (gpt-oss), folded into each row's softmax once, by the final merge.
///
/// The parts of one call, in the order queued: the CPU's query copy and task (its share), the
/// kernel over device blocks (and host ones, zero-copy), the staged pieces, the stream's wait
/// for the CPU's rows, one merge of everything by log-sum-exp.
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
    let cfg = store.config().clone();
    let row_bytes = cfg.row_bytes();
    // How this layer's last shared step went: the meter's timeline and the layer's rates.
    if let Some(t) = store.share_step_times(layer)? {
        policy.meter.gpu_step(layer, t.own, t.waited);
    }
    let (split, staged) = {
        let view = store.device_view(layer)?;
        let split = policy
            .split(layer, lq, contiguous, &view, params.window, 2 * row_bytes)
            .map(|(split, estimate)| {
                // The meter rates the GPU's side by this part once the step is timed.
                if let Some(e) = estimate {
                    policy
                        .meter
                        .planned(layer, e.gpu_host_bytes, e.device_seconds);
                }
                split
            });
        let staged = policy.host_reader() == HostReader::CopyEngine && view.has_host_blocks();
        (split, staged)
    };
    if split.is_none() && !staged {
        // SAFETY: forwarded from the caller.
        return unsafe { cuda::attend(store, layer, query, hq, lq, params, sinks, out, stream) };
    }
    let kernels = store.kernels().clone();
    store.gpu().bind()?;
    let parts = store.decode_parts(layer, lq, split.is_some(), staged)?;
    let (fresh_from, prior_writes) = (parts.fresh_from, parts.prior_writes);
    let view = parts.view;
    let mut handoff = parts.handoff;
    let launch = cuda::layer_launch(&view, hq, lq, params, sinks)?;
    if lq == 0 {
        return Ok(());
    }
    // The CPU's part first: its query copy follows the query at once, and the CPU attends while
    // the GPU works through what is queued below.
    let cpu = match (&split, handoff.as_deref_mut()) {
        (Some(s), Some(h)) => Some(crate::with_element!(cfg.dtype, E => {
            h.mark_start(layer, stream)?;
            // SAFETY: forwarded from the caller (the policy splits contiguous decode queries).
            unsafe {
                shared::queue_cpu::<E>(
                    &view, h, layer, &cfg, query, launch.group, params, &s.from, policy,
                    stream,
                )
            }
        })?),
        _ => None,
    };
    let share = cpu.as_ref().map_or(CpuShare::NONE, |c| c.share);
    // SAFETY: forwarded from the caller; the table covers `start..len`.
    let pending =
        unsafe { kernels.attend_partial(stream, query, view.src(), &launch, &share, staged) };
    let pending = match pending {
        Ok(p) => p,
        Err(e) => {
            // The task runs and publishes anyway; nothing will wait for it.
            let _ = cpu;
            return Err(e);
        }
    };
    let mut result = Ok(());
    let mut ws = None;
    if let Some(ring) = parts.ring {
        let until = split.as_ref().map_or(&[][..], |s| &s.from[..]);
        let spans = view.host_spans(launch.lo, until, fresh_from);
        if !spans.is_empty() {
            let plan = staged::plan(&spans, row_bytes, ring.piece_bytes());
            // SAFETY: the context is bound; the caller's stream.
            match unsafe { kernels.staged_workspace(stream, pending.rows(), plan.slots) } {
                Ok(w) => {
                    // SAFETY: forwarded from the caller; the spans' blocks stay the store's
                    // until its next step (which drains this one before freeing any).
                    result = unsafe {
                        staged::run(
                            &kernels,
                            ring,
                            &spans,
                            &plan,
                            row_bytes,
                            query,
                            &launch,
                            &w,
                            prior_writes,
                            stream,
                        )
                    };
                    ws = Some(w);
                }
                Err(e) => result = Err(e),
            }
        }
    }
    let extra = match (cpu, handoff) {
        (Some(c), Some(h)) => {
            // Timed on both sides of the wait: whether the GPU waited for the CPU's rows.
            let waited = h
                .mark_gpu_part(layer, stream)
                .and_then(|()| h.wait_done(c.done, stream))
                .and_then(|()| h.mark_rows_in(layer, stream));
            match waited {
                Ok(()) => Some(c.extra),
                Err(e) => {
                    result = result.and(Err(e));
                    None
                }
            }
        }
        _ => None,
    };
    // SAFETY: forwarded from the caller; the workspaces came from this call on this stream.
    let merged = unsafe { kernels.attend_merge(stream, pending, extra, ws, out) };
    result.and(merged)
}
