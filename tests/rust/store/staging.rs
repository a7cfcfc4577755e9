//! Unit tests of `src/store/staging.rs`: the staging planner, pure.

use super::*;

fn span(head: usize, block: usize, pos: usize, n: usize, fresh: bool) -> Span {
    Span {
        head,
        block,
        row: 0,
        pos,
        n,
        fresh,
    }
}

/// Every key of every span is staged exactly once, at a distinct place, within its piece.
fn check_cover(spans: &[Span], p: &StagingPlan, row: usize, piece: usize, max_units: usize) {
    let mut seen: Vec<(usize, usize)> = Vec::new();
    for pc in &p.pieces {
        assert!(
            pc.bytes <= piece,
            "piece over its size: {} > {piece}",
            pc.bytes
        );
        assert!(!pc.units.is_empty() && pc.units.len() <= max_units);
        let mut end = 0;
        for u in &pc.units {
            assert_eq!(u.offset, end, "units packed in order, keys then values");
            end = u.offset + 2 * u.span.n * row;
            assert!(u.subs >= 1 && u.subs == u.span.n.div_ceil(p.sub_len));
            assert!(u.slot + u.subs <= p.slots);
            for i in 0..u.span.n {
                seen.push((u.span.head, u.span.pos + i));
            }
        }
        assert_eq!(end, pc.bytes);
        assert_eq!(pc.fresh, pc.units.iter().any(|u| u.span.fresh));
    }
    let mut want: Vec<(usize, usize)> = spans
        .iter()
        .flat_map(|s| (0..s.n).map(move |i| (s.head, s.pos + i)))
        .collect();
    seen.sort_unstable();
    want.sort_unstable();
    assert_eq!(seen, want, "every key staged once");
}

#[test]
fn empty_plan_has_no_pieces() {
    let p = plan(&[], 256, 1 << 20, 8, 64);
    assert!(p.pieces.is_empty());
    assert_eq!(p.slots, 0);
}

#[test]
fn whole_blocks_fill_pieces_in_order_fresh_last() {
    // 3 heads x 4 blocks of 64 rows; a piece holds 2 blocks (keys and values).
    let row = 32;
    let piece = 2 * 2 * 64 * row;
    let mut spans = Vec::new();
    for b in 0..4 {
        for h in 0..3 {
            spans.push(span(h, b, b * 64, 64, b == 3));
        }
    }
    let p = plan(&spans, row, piece, 48, 64);
    check_cover(&spans, &p, row, piece, 48);
    assert_eq!(p.pieces.len(), 6);
    // Fresh spans only in the last pieces, never before a clean one.
    let fresh: Vec<bool> = p.pieces.iter().map(|pc| pc.fresh).collect();
    let first_fresh = fresh.iter().position(|&f| f).unwrap();
    assert!(fresh[first_fresh..].iter().all(|&f| f));
    assert!(fresh[..first_fresh].iter().all(|&f| !f));
    // Each head's slots are dense: 4 units of one sub each.
    assert_eq!(p.slots, 4);
}

#[test]
fn a_span_longer_than_a_piece_is_cut_and_short_ones_are_not_split() {
    let row = 16;
    let piece = 2 * 100 * row; // 100 rows a piece
    let spans = [
        span(0, 0, 0, 250, false),
        span(1, 0, 0, 60, false),
        span(1, 1, 60, 60, false),
    ];
    let p = plan(&spans, row, piece, 48, 64);
    check_cover(&spans, &p, row, piece, 48);
    // 250 = 100 + 100 + 50; then 60 fits after the 50 but the next 60 does not and is not
    // split over two pieces.
    for pc in &p.pieces {
        for u in &pc.units {
            if u.span.head == 1 {
                assert_eq!(u.span.n, 60);
            }
        }
    }
}

#[test]
fn units_per_piece_are_bounded() {
    let row = 16;
    let spans: Vec<Span> = (0..100).map(|i| span(i % 2, i, i * 4, 4, false)).collect();
    let p = plan(&spans, row, 1 << 20, 7, 64);
    check_cover(&spans, &p, row, 1 << 20, 7);
    assert_eq!(p.pieces.len(), 100usize.div_ceil(7));
}

#[test]
fn long_heads_get_longer_ctas_not_more_slots() {
    let row = 16;
    // One head of 1M keys in blocks of 4096: at most ~64 slots means subs of 16K keys.
    let spans: Vec<Span> = (0..256)
        .map(|b| span(0, b, b * 4096, 4096, false))
        .collect();
    let p = plan(&spans, row, 64 << 20, 48, 64);
    check_cover(&spans, &p, row, 64 << 20, 48);
    assert!(p.sub_len >= (256 * 4096) / 64);
    assert!(
        p.slots <= 256,
        "one slot per unit at most here: {}",
        p.slots
    );
    // Short heads: subs of the minimum length.
    let short = [span(0, 0, 0, 3000, false)];
    let q = plan(&short, row, 64 << 20, 48, 64);
    assert_eq!(q.sub_len, MIN_SUB_LEN);
    assert_eq!(q.pieces[0].units[0].subs, 3000usize.div_ceil(MIN_SUB_LEN));
}

#[test]
fn random_spans_are_covered() {
    let mut rng = crate::test_common::Rng::new(7);
    for _ in 0..200 {
        let row = 16 * (1 + rng.below(4));
        let piece = 2 * row * (1 + rng.below(300));
        let max_units = 1 + rng.below(10);
        let n_spans = rng.below(30);
        let spans: Vec<Span> = (0..n_spans)
            .map(|i| {
                let n = rng.below(700);
                span(rng.below(4), i, i * 1000, n, rng.below(5) == 0)
            })
            .collect();
        let p = plan(&spans, row, piece, max_units, 1 + rng.below(100));
        check_cover(&spans, &p, row, piece, max_units);
    }
}
