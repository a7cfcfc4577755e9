//! Unit tests of `src/store/cuda.rs` that need no GPU: the copies that stage a piece.

use super::*;
use crate::store::staging::PlannedUnit;

const RB: usize = 8;

/// A span of rows `row..row + n` of a block of `rows` rows whose keys sit at `k`; its values at
/// `k + rows * RB` (right after the keys) or elsewhere, `joined` as `follows` would say.
fn span(block: usize, row: usize, n: usize, k: u64, v: u64, joined: bool) -> StagedSpan {
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
        joined,
    }
}

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

/// Every byte a piece's copies write, with the source byte it comes from.
fn bytes(copies: &[Copy]) -> Vec<(usize, u64)> {
    let mut m: Vec<(usize, u64)> = copies
        .iter()
        .flat_map(|c| (0..c.bytes).map(move |i| (c.offset + i, c.src + i as u64)))
        .collect();
    m.sort();
    m
}

/// What the piece's units ask for: keys then values, row by row.
fn wanted(p: &Piece, spans: &[StagedSpan]) -> Vec<(usize, u64)> {
    let mut m = Vec::new();
    for u in &p.units {
        let s = &spans[u.span.block];
        let n = u.span.n * RB;
        for i in 0..n {
            m.push((u.offset + i, s.k + (u.span.row * RB + i) as u64));
            m.push((u.offset + n + i, s.v + (u.span.row * RB + i) as u64));
        }
    }
    m.sort();
    m
}

#[test]
fn a_whole_block_whose_values_follow_its_keys_is_one_copy() {
    let spans = [span(0, 0, 4, 0x1000, 0x1000 + 4 * RB as u64, true)];
    let p = piece(&spans);
    let c = piece_copies(&p, &spans, RB);
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].offset, c[0].src, c[0].bytes), (0, 0x1000, 8 * RB));
    assert_eq!(bytes(&c), wanted(&p, &spans));
}

#[test]
fn parts_of_blocks_and_blocks_in_two_allocations_are_two_copies_each() {
    let spans = [
        // The block's last 3 of 4 rows (its keys' rows do not reach its values).
        span(0, 1, 3, 0x1000, 0x1000 + 4 * RB as u64, true),
        // Its first 3 rows.
        span(1, 0, 3, 0x2000, 0x2000 + 4 * RB as u64, true),
        // Adjacent addresses, but two allocations (`follows` said no).
        span(2, 0, 4, 0x3000, 0x3000 + 4 * RB as u64, false),
        // One allocation, values elsewhere.
        span(3, 0, 4, 0x4000, 0x9000, true),
    ];
    let p = piece(&spans);
    let c = piece_copies(&p, &spans, RB);
    assert_eq!(c.len(), 8);
    assert_eq!(bytes(&c), wanted(&p, &spans));
}

#[test]
fn a_piece_of_mixed_units_writes_every_byte_from_its_source() {
    let spans = [
        span(0, 0, 5, 0x1000, 0x1000 + 5 * RB as u64, true),
        span(1, 2, 3, 0x2000, 0x2000 + 5 * RB as u64, true),
        span(2, 0, 2, 0x3000, 0x3000 + 2 * RB as u64, true),
    ];
    let p = piece(&spans);
    let c = piece_copies(&p, &spans, RB);
    assert_eq!(c.len(), 4);
    assert_eq!(bytes(&c), wanted(&p, &spans));
}
