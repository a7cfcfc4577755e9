//! Unit tests of `src/store/cuda.rs` that need no GPU: the copies that stage a piece.

use super::*;
use crate::store::staging::PlannedUnit;
use crate::test_common::{copied as bytes, wanted};

const RB: usize = 8;

/// A span of rows `row..row + n` of a block whose keys sit at `k` in allocation `ka` and whose
/// values at `v` in allocation `va`.
fn span(
    block: usize,
    row: usize,
    n: usize,
    (k, ka): (u64, u64),
    (v, va): (u64, u64),
) -> StagedSpan {
    StagedSpan {
        span: Span {
            head: 0,
            block,
            row,
            pos: row,
            n,
            fresh: false,
        },
        k,
        v,
        k_alloc: ka,
        v_alloc: va,
    }
}

/// The spans as units of one piece, in the order given.
fn piece(spans: &[StagedSpan]) -> Piece {
    let mut offset = 0;
    let units = spans
        .iter()
        .map(|s| {
            let u = PlannedUnit {
                span: s.span,
                offset,
                slot: 0,
                subs: 1,
            };
            offset += 2 * s.span.n * RB;
            u
        })
        .collect();
    Piece {
        units,
        bytes: offset,
        fresh: false,
    }
}

/// `n` rows of keys then values, from `at` in allocation `alloc`.
fn block(at: u64, n: usize, alloc: u64) -> ((u64, u64), (u64, u64)) {
    ((at, alloc), (at + (n * RB) as u64, alloc))
}

/// The copies that stage `spans` as one piece: `n` of them, together writing every byte of
/// the piece from its source.
fn copies_of(spans: &[StagedSpan], n: usize) -> Vec<Copy> {
    let p = piece(spans);
    let c = piece_copies(&p, spans, RB);
    assert_eq!(c.len(), n);
    assert_eq!(bytes(&c), wanted(&p, spans, RB));
    c
}

#[test]
fn a_whole_block_whose_values_follow_its_keys_is_one_copy() {
    let (k, v) = block(0x1000, 4, 1);
    let spans = [span(0, 0, 4, k, v)];
    let c = copies_of(&spans, 1);
    assert_eq!((c[0].offset, c[0].src, c[0].bytes), (0, 0x1000, 8 * RB));
}

#[test]
fn blocks_one_after_another_in_one_allocation_are_one_copy() {
    let (k0, v0) = block(0x1000, 4, 1);
    let (k1, v1) = block(0x1000 + 8 * RB as u64, 4, 1);
    let (k2, v2) = block(0x1000 + 16 * RB as u64, 4, 1);
    let spans = [
        span(0, 0, 4, k0, v0),
        span(1, 0, 4, k1, v1),
        span(2, 0, 4, k2, v2),
    ];
    let c = copies_of(&spans, 1);
    assert_eq!(c[0].bytes, 24 * RB);
}

#[test]
fn copies_never_span_two_allocations_nor_skip_a_gap() {
    // Adjacent addresses, two allocations.
    let (k0, v0) = block(0x1000, 4, 1);
    let (k1, v1) = block(0x1000 + 8 * RB as u64, 4, 2);
    // Values in another allocation than their keys.
    let spans = [
        span(0, 0, 4, k0, v0),
        span(1, 0, 4, k1, v1),
        span(2, 0, 4, (0x4000, 3), (0x4000 + 4 * RB as u64, 4)),
        // The last 3 rows of a block: its keys do not reach its values.
        span(3, 1, 3, (0x6000, 5), (0x6000 + 4 * RB as u64, 5)),
        // Its first 3 rows.
        span(4, 0, 3, (0x7000, 6), (0x7000 + 4 * RB as u64, 6)),
    ];
    copies_of(&spans, 8);
}

#[test]
fn a_piece_of_mixed_units_writes_every_byte_from_its_source() {
    let spans = [
        span(0, 0, 5, (0x1000, 1), (0x1000 + 5 * RB as u64, 1)),
        span(1, 2, 3, (0x2000, 1), (0x2000 + 5 * RB as u64, 1)),
        span(2, 0, 2, (0x3000, 1), (0x3000 + 2 * RB as u64, 1)),
    ];
    copies_of(&spans, 4);
}
