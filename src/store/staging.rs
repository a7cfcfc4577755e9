//! The staging planner: which host-resident keys of a layer the copy engine moves into which
//! piece of device staging, in what order, and where each piece's partial results go. Pure
//! arithmetic, no memory touched; unit-tested without a GPU. The copies and kernels that carry
//! a plan out are `attention::staged`.
//!
//! A piece is one staging buffer's worth: units of consecutive keys of one head (a host block's
//! rows, or part of them), keys then values, each unit's rows contiguous. Units whose block this
//! step wrote (`fresh`) come last, so every piece before them can be copied without waiting for
//! the step's appends (while the GPU still works on earlier layers).

/// Consecutive keys of one kv head inside one host block: positions `pos..pos + n`, which are
/// rows `row..row + n` of block `block` (the caller's index into its own block list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub head: usize,
    pub block: usize,
    pub row: usize,
    pub pos: usize,
    pub n: usize,
    /// The block was written in this step (wait for the appends before copying it).
    pub fresh: bool,
}

/// One unit of a piece: `span`'s rows, whose keys sit at byte `offset` of the piece and whose
/// values follow them at `offset + span.n * row_bytes`; its attention is cut into `subs` parts
/// of at most `StagingPlan::sub_len` keys, writing partial slots `slot..slot + subs` of its head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedUnit {
    pub span: Span,
    pub offset: usize,
    pub slot: usize,
    pub subs: usize,
}

/// One staging buffer's worth of units.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Piece {
    pub units: Vec<PlannedUnit>,
    /// Bytes of the buffer used (keys and values of every unit).
    pub bytes: usize,
    /// Some unit's block was written in this step.
    pub fresh: bool,
}

/// What the copy engine does for one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagingPlan {
    pub pieces: Vec<Piece>,
    /// Partial slots per query row: the most any head uses.
    pub slots: usize,
    /// Most keys one CTA of a unit attends over.
    pub sub_len: usize,
}

/// The fewest keys one CTA of a staged unit attends over: fewer cost more in launch and merge
/// than they save.
pub const MIN_SUB_LEN: usize = 512;

/// Plans the staging of `spans` (any order; `row_bytes` bytes per key row, keys and values
/// alike) into pieces of at most `piece_bytes` and `max_units` units, with at most about
/// `max_slots` partial slots per head (longer heads get longer CTAs instead). A span larger than
/// a piece is cut. `piece_bytes` must hold at least one key row and its value row.
pub fn plan(
    spans: &[Span],
    row_bytes: usize,
    piece_bytes: usize,
    max_units: usize,
    max_slots: usize,
) -> StagingPlan {
    assert!(row_bytes > 0 && piece_bytes >= 2 * row_bytes && max_units > 0);
    let heads = spans.iter().map(|s| s.head + 1).max().unwrap_or(0);
    let mut per_head = vec![0usize; heads];
    for s in spans {
        per_head[s.head] += s.n;
    }
    let longest = per_head.iter().copied().max().unwrap_or(0);
    let sub_len = MIN_SUB_LEN.max(longest.div_ceil(max_slots.max(1)));
    // Clean spans first, fresh ones last; otherwise the order given.
    let mut order: Vec<&Span> = spans.iter().filter(|s| s.n > 0).collect();
    order.sort_by_key(|s| s.fresh);
    let max_rows = piece_bytes / (2 * row_bytes);
    let mut slot = vec![0usize; heads];
    let mut pieces: Vec<Piece> = Vec::new();
    let mut cur = Piece::default();
    for s in order {
        let mut done = 0;
        while done < s.n {
            let room = (piece_bytes - cur.bytes) / (2 * row_bytes);
            let left = s.n - done;
            // A full piece goes; so does one a span would be cut across when it fits a fresh
            // piece whole.
            let full = room == 0 || cur.units.len() == max_units;
            let cuts = left > room && left <= max_rows && !cur.units.is_empty();
            if full || cuts {
                pieces.push(std::mem::take(&mut cur));
                continue;
            }
            let n = left.min(room);
            let span = Span {
                row: s.row + done,
                pos: s.pos + done,
                n,
                ..*s
            };
            let subs = n.div_ceil(sub_len);
            cur.units.push(PlannedUnit {
                span,
                offset: cur.bytes,
                slot: slot[s.head],
                subs,
            });
            slot[s.head] += subs;
            cur.bytes += 2 * n * row_bytes;
            cur.fresh |= s.fresh;
            done += n;
        }
    }
    if !cur.units.is_empty() {
        pieces.push(cur);
    }
    StagingPlan {
        pieces,
        slots: slot.into_iter().max().unwrap_or(0),
        sub_len,
    }
}

#[cfg(test)]
#[path = "../../tests/rust/store/staging.rs"]
mod tests;
