//! Unit tests of `src/attention/staged.rs` that need no GPU: the plan's order and the copies
//! it leads to.

use super::*;
use crate::store::piece_copies;
use crate::store::staging::Span;
use crate::test_common::{copied, wanted};

const RB: usize = 8;
const BS: usize = 4;

/// Block `b` of head `h`, its keys at `k` and values right after them, in allocation `alloc`.
fn block(h: usize, b: usize, k: u64, alloc: u64) -> StagedSpan {
    StagedSpan {
        span: Span {
            head: h,
            block: b,
            row: 0,
            pos: b * BS,
            n: BS,
            fresh: false,
        },
        k,
        v: k + (BS * RB) as u64,
        k_alloc: alloc,
        v_alloc: alloc,
    }
}

#[test]
fn units_go_in_address_order_and_a_layers_blocks_of_one_chunk_are_one_copy() {
    // Two heads, two blocks each, allocated chunk by chunk: (h0 b0, h1 b0) then (h0 b1, h1 b1)
    // one after another in one slab. The view lists them head by head.
    let pair = (2 * BS * RB) as u64;
    let spans = [
        block(0, 0, 0x1000, 9),
        block(0, 1, 0x1000 + 2 * pair, 9),
        block(1, 0, 0x1000 + pair, 9),
        block(1, 1, 0x1000 + 3 * pair, 9),
    ];
    let p = plan(&spans, RB, 1 << 20);
    assert_eq!(p.pieces.len(), 1);
    let addrs: Vec<u64> = p.pieces[0]
        .units
        .iter()
        .map(|u| spans[u.span.block].k)
        .collect();
    assert!(addrs.windows(2).all(|w| w[0] < w[1]), "{addrs:x?}");
    let c = piece_copies(&p.pieces[0], &spans, RB);
    assert_eq!(c.len(), 1);
    assert_eq!(copied(&c), wanted(&p.pieces[0], &spans, RB));
    // Each head's partial slots: one per block, whatever the order.
    let mut slots: Vec<(usize, usize)> = p.pieces[0]
        .units
        .iter()
        .map(|u| (u.span.head, u.slot))
        .collect();
    slots.sort();
    assert_eq!(slots, vec![(0, 0), (0, 1), (1, 0), (1, 1)]);
}

#[test]
fn fresh_blocks_still_come_last() {
    let pair = (2 * BS * RB) as u64;
    let mut fresh = block(0, 0, 0x1000, 9);
    fresh.span.fresh = true;
    let spans = [fresh, block(1, 0, 0x1000 + pair, 9)];
    let p = plan(&spans, RB, 1 << 20);
    let order: Vec<bool> = p.pieces[0].units.iter().map(|u| u.span.fresh).collect();
    assert_eq!(order, vec![false, true]);
}
