//! The copy engine as a decode reader: a layer's host blocks copied into the staging ring's
//! device buffers piece by piece (`store::staging` plans the pieces), each piece attended over
//! by `attend_staged` while the next one copies; the partials merged with the rest of the step
//! by log-sum-exp. Few large copies on a stream of their own: where zero-copy kernel reads of
//! host memory are slow (0.63 of the copy engine on some hosts), this moves host KV at the
//! copy engine's rate.

use crate::cuda::kernels::{AttendLaunch, Kernels, StagedWs, MAX_UNITS};
use crate::cuda::ring::StagingRing;
use crate::cuda::stream::Event;
use crate::cuda::Stream;
use crate::error::Result;
use crate::store::stage_piece;
use crate::store::staging::{self, StagingPlan};
use crate::store::view::StagedSpan;
use crate::tensor::DevTensor;

/// Partial slots per query row that the plan aims at (longer heads get longer CTAs).
pub const MAX_SLOTS: usize = 128;

/// The plan for `spans` (bytes per key row `row_bytes`, as stored: `StoreConfig::row_bytes`,
/// so an int8 store's pieces carry its 8-bit rows) in pieces of `piece_bytes`. The units go in
/// the order of their key rows' addresses: blocks allocated one after another (a layer's heads
/// at one prefill chunk) then sit one after another in a piece as in host memory, and their
/// copies merge (`store::cuda::piece_copies`).
pub fn plan(spans: &[StagedSpan], row_bytes: usize, piece_bytes: usize) -> StagingPlan {
    // Each span's `block` becomes its index in `spans`, so units find their addresses at once.
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| spans[i].k);
    let s: Vec<_> = order
        .into_iter()
        .map(|i| staging::Span {
            block: i,
            ..spans[i].span
        })
        .collect();
    staging::plan(&s, row_bytes, piece_bytes, MAX_UNITS, MAX_SLOTS)
}

/// Queues `plan` on `stream`: each piece's copies on the ring's stream (after `prior_writes`,
/// the writes of every block not fresh, and fresh pieces after the step's appends), then its
/// attention into `ws` (allocated for the plan's slots). `spans` are the ones `plan` was given
/// (its units name them by index).
///
/// # Safety
/// `query` must be a valid device tensor of the launch's shape alive until `stream` has run
/// this work; the spans' blocks must stay allocated and unwritten (but for fresh ones, by the
/// step's appends already queued on `stream`) until then.
#[allow(clippy::too_many_arguments)]
pub unsafe fn run(
    kernels: &Kernels,
    ring: &mut StagingRing,
    spans: &[StagedSpan],
    plan: &StagingPlan,
    row_bytes: usize,
    query: DevTensor,
    launch: &AttendLaunch,
    ws: &StagedWs,
    prior_writes: &Event,
    stream: Stream,
) -> Result<()> {
    ring.copy_after(prior_writes)?;
    if plan.pieces.iter().any(|p| p.fresh) {
        ring.mark_appended(stream)?;
    }
    for piece in &plan.pieces {
        // SAFETY: the spans' blocks stay allocated and unwritten until the stream ran this
        // work (the caller's bound); fresh pieces wait for the appends (`mark_appended`).
        let (staged, units) =
            unsafe { stage_piece(ring, stream, piece, spans, row_bytes, plan.sub_len)? };
        // SAFETY: the units address the staged buffer, which stays the caller stream's until
        // the release below; the caller vouches for the query; `ws` holds the plan's slots.
        unsafe { kernels.attend_staged(stream, query, launch, &units, ws)? };
        ring.release(staged, stream)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "../../tests/rust/attention/staged.rs"]
mod tests;
