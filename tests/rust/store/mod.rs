//! Unit tests of `src/store/mod.rs`: blocks, windows, crop, accounting, memory checks.

use super::*;
use crate::tensor::DType;
use crate::test_common::Rng;

fn cfg(block_size: usize, windows: Vec<Option<usize>>) -> StoreConfig {
    StoreConfig {
        num_layers: windows.len(),
        num_kv_heads: 2,
        head_dim: 4,
        dtype: DType::F32,
        kv: crate::quant::KvFormat::Exact,
        block_size,
        windows,
        host_memory_limit: None,
    }
}

/// Appends `n` tokens whose values encode (head, position, k/v) so reads are checkable.
fn append_positions(s: &mut CpuStore, layer: usize, from: usize, n: usize) -> Result<()> {
    let (h, d) = (2, 4);
    let mut k = vec![0f32; h * n * d];
    let mut v = vec![0f32; h * n * d];
    for hi in 0..h {
        for i in 0..n {
            for j in 0..d {
                k[(hi * n + i) * d + j] = (hi * 100_000 + (from + i) * 10 + j) as f32;
                v[(hi * n + i) * d + j] = -((hi * 100_000 + (from + i) * 10 + j) as f32);
            }
        }
    }
    s.append(
        layer,
        View3::contiguous(&k, [h, n, d]),
        View3::contiguous(&v, [h, n, d]),
    )
}

fn check_positions(s: &CpuStore, layer: usize, a: usize, b: usize) {
    let mut seen = 0;
    s.read::<f32>(layer, a, b, |h, i, k, v| {
        for j in 0..4 {
            let want = (h * 100_000 + (a + i) * 10 + j) as f32;
            assert_eq!(k[j], want, "key head {h} pos {}", a + i);
            assert_eq!(v[j], -want, "value head {h} pos {}", a + i);
        }
        seen += 1;
    })
    .unwrap();
    assert_eq!(seen, 2 * (b - a));
}

#[test]
fn append_and_read_across_blocks() {
    let mut s = CpuStore::new(cfg(5, vec![None, None])).unwrap();
    let mut rng = Rng::new(1);
    let mut len = 0;
    for _ in 0..20 {
        let n = 1 + rng.below(12);
        append_positions(&mut s, 1, len, n).unwrap();
        len += n;
        check_positions(&s, 1, 0, len);
        check_positions(&s, 1, len / 3, len);
    }
    assert_eq!(s.seq_len(1).unwrap(), len);
    assert_eq!(s.seq_len(0).unwrap(), 0);
    assert_eq!(s.bytes_used(), len * 2 * 2 * 4 * 4);
    assert_eq!(s.bytes_reserved(), len.div_ceil(5) * 2 * 2 * 5 * 4 * 4);
}

#[test]
fn crop_then_append_reuses_blocks() {
    let mut s = CpuStore::new(cfg(4, vec![None])).unwrap();
    append_positions(&mut s, 0, 0, 30).unwrap();
    let reserved = s.bytes_reserved();
    s.crop(9).unwrap();
    assert_eq!(s.seq_len(0).unwrap(), 9);
    check_positions(&s, 0, 0, 9);
    assert_eq!(s.bytes_reserved(), reserved, "cropped blocks stay reserved");
    append_positions(&mut s, 0, 9, 21).unwrap();
    check_positions(&s, 0, 0, 30);
    assert_eq!(s.bytes_reserved(), reserved, "reused, not reallocated");
    s.crop(100).unwrap();
    assert_eq!(s.seq_len(0).unwrap(), 30);
    s.clear().unwrap();
    assert_eq!(s.seq_len(0).unwrap(), 0);
    assert_eq!(s.bytes_used(), 0);
    append_positions(&mut s, 0, 0, 3).unwrap();
    check_positions(&s, 0, 0, 3);
}

#[test]
fn window_drops_whole_blocks_it_no_longer_needs() {
    let mut s = CpuStore::new(cfg(4, vec![Some(6), None])).unwrap();
    for p in 0..40 {
        append_positions(&mut s, 0, p, 1).unwrap();
        let start = s.retained_start(0).unwrap();
        // The query at p needs keys from p + 1 - 6; nothing it needs is gone.
        assert!(start <= (p + 1).saturating_sub(6), "p={p} start={start}");
        assert!(start.is_multiple_of(4));
        check_positions(&s, 0, start, p + 1);
    }
    // At most window + one block (+ the new token) is held.
    assert!(s.seq_len(0).unwrap() - s.retained_start(0).unwrap() <= 6 + 4);
    assert!(s.read::<f32>(0, 0, 5, |_, _, _, _| {}).is_err());
}

#[test]
fn crop_refuses_what_a_window_dropped_and_changes_nothing() {
    let mut s = CpuStore::new(cfg(4, vec![Some(6), None])).unwrap();
    append_positions(&mut s, 0, 0, 20).unwrap();
    append_positions(&mut s, 1, 0, 20).unwrap();
    append_positions(&mut s, 0, 20, 20).unwrap();
    append_positions(&mut s, 1, 20, 20).unwrap();
    let start = s.retained_start(0).unwrap();
    assert!(start > 0);
    let err = s.crop(5).unwrap_err().to_string();
    assert!(err.starts_with("length:"), "{err}");
    assert_eq!(s.seq_len(1).unwrap(), 40, "no layer was cropped");
    // Cropping to a length whose window is still held works.
    s.crop(start + 6).unwrap();
    assert_eq!(s.seq_len(0).unwrap(), start + 6);
    check_positions(&s, 0, start, start + 6);
}

#[test]
fn crop_to_zero_works_after_a_window_dropped_blocks() {
    // Nothing before position 0 is needed: crop(0) is a clear, whatever the windows dropped.
    let mut s = CpuStore::new(cfg(4, vec![Some(6), None])).unwrap();
    for l in 0..2 {
        append_positions(&mut s, l, 0, 20).unwrap();
        append_positions(&mut s, l, 20, 3).unwrap();
    }
    assert!(s.retained_start(0).unwrap() > 0);
    let reserved = s.bytes_reserved();
    s.crop(0).unwrap();
    for l in 0..2 {
        assert_eq!(s.seq_len(l).unwrap(), 0);
        assert_eq!(s.retained_start(l).unwrap(), 0);
        append_positions(&mut s, l, 0, 13).unwrap();
    }
    check_positions(&s, 0, s.retained_start(0).unwrap(), 13);
    check_positions(&s, 1, 0, 13);
    assert_eq!(s.bytes_reserved(), reserved, "the blocks are reused");
}

#[test]
fn crop_to_the_retained_start_keeps_the_start() {
    // Found by the store's state machine (tests/test_properties_store.py): a window layer
    // cropped to exactly its retained start keeps no block, and its start was reset to 0,
    // claiming positions 0..length with no blocks behind them: the next append or read
    // indexed past the layer's blocks (a panic, "Out of bounds access").
    for (window, bs) in [(1, 1), (1, 4), (1, 3)] {
        let mut s = CpuStore::new(cfg(bs, vec![Some(window), None])).unwrap();
        append_positions(&mut s, 0, 0, 13).unwrap();
        append_positions(&mut s, 0, 13, 6).unwrap();
        let start = s.retained_start(0).unwrap();
        assert!(start > 0, "window {window}, block {bs}");
        s.crop(start).unwrap();
        assert_eq!(s.seq_len(0).unwrap(), start);
        assert_eq!(
            s.retained_start(0).unwrap(),
            start,
            "nothing below it is held"
        );
        assert!(s.read::<f32>(0, 0, start, |_, _, _, _| {}).is_err());
        append_positions(&mut s, 0, start, 7).unwrap();
        let now = s.retained_start(0).unwrap();
        check_positions(&s, 0, now, start + 7);
    }
}

#[test]
fn memory_limit_is_checked_before_anything_changes() {
    let mut c = cfg(4, vec![None]);
    // Room for exactly two blocks per head (k and v of 2 heads).
    c.host_memory_limit = Some(2 * 2 * 2 * c.block_bytes());
    let mut s = CpuStore::new(c).unwrap();
    append_positions(&mut s, 0, 0, 8).unwrap();
    let err = append_positions(&mut s, 0, 8, 1).unwrap_err();
    match err {
        Error::OutOfHostMemory {
            needed, available, ..
        } => {
            assert_eq!(needed, 2 * 2 * 4 * 4 * 4);
            assert_eq!(available, 0);
        }
        e => panic!("wrong error {e}"),
    }
    assert_eq!(s.seq_len(0).unwrap(), 8);
    check_positions(&s, 0, 0, 8);
    s.crop(4).unwrap();
    append_positions(&mut s, 0, 4, 4).unwrap();
    check_positions(&s, 0, 0, 8);
}

#[test]
fn bad_arguments_name_themselves() {
    let mut s = CpuStore::new(cfg(4, vec![None])).unwrap();
    let k = vec![0f32; 3 * 2 * 4];
    let e = s
        .append(
            0,
            View3::contiguous(&k, [3, 2, 4]),
            View3::contiguous(&k, [3, 2, 4]),
        )
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("key: expected shape"), "{e}");
    let e = append_positions(&mut s, 7, 0, 1).unwrap_err().to_string();
    assert!(e.starts_with("layer: 7 is out of range"), "{e}");
    let kb = vec![half::bf16::ZERO; 2 * 2 * 4];
    let e = s
        .append(
            0,
            View3::contiguous(&kb, [2, 2, 4]),
            View3::contiguous(&kb, [2, 2, 4]),
        )
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("key: dtype is bfloat16"), "{e}");
    assert_eq!(s.seq_len(0).unwrap(), 0);
    let e = CpuStore::new(cfg(0, vec![None])).err().unwrap().to_string();
    assert!(e.starts_with("block_size:"), "{e}");
    let mut c = cfg(4, vec![None]);
    c.windows = vec![];
    let e = CpuStore::new(c).err().unwrap().to_string();
    assert!(e.starts_with("windows:"), "{e}");
}

#[test]
fn block_sizes_that_overflow_are_refused() {
    let e = CpuStore::new(cfg(1 << 62, vec![None]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("block_size:"), "{e}");
}

#[test]
fn a_failed_allocation_leaves_every_head_as_it_was() {
    // One head's block allocates, the next fails: neither head may keep a new block.
    let mut s = CpuStore::new(cfg(4, vec![Some(6)])).unwrap();
    append_positions(&mut s, 0, 0, 8).unwrap();
    let reserved = s.bytes_reserved();
    crate::testing::local::arm(crate::testing::FailPoint::Alloc, 1);
    let e = append_positions(&mut s, 0, 8, 4).unwrap_err();
    assert!(matches!(e, Error::Injected("alloc")), "{e}");
    assert_eq!(s.seq_len(0).unwrap(), 8);
    let start = s.retained_start(0).unwrap();
    check_positions(&s, 0, start, 8);
    // The block allocated before the failure stays reserved for reuse, not leaked.
    assert!(s.bytes_reserved() >= reserved);
    append_positions(&mut s, 0, 8, 4).unwrap();
    check_positions(&s, 0, s.retained_start(0).unwrap(), 12);
}

#[test]
fn runs_cut_a_range_at_block_boundaries() {
    use table::{runs, Run};
    let run = |pos, block, off, rows| Run {
        pos,
        block,
        off,
        rows,
    };
    // Blocks of 4 from position 8 (a window's retained start): 9..18 spans three blocks.
    assert_eq!(
        runs(8, 4, 9, 18).collect::<Vec<_>>(),
        vec![run(9, 0, 1, 3), run(12, 1, 0, 4), run(16, 2, 0, 2)]
    );
    // Within one block, and empty ranges.
    assert_eq!(runs(0, 4, 5, 7).collect::<Vec<_>>(), vec![run(5, 1, 1, 2)]);
    assert_eq!(runs(0, 4, 6, 6).count(), 0);
    assert_eq!(runs(0, 4, 7, 3).count(), 0);
    // Whole blocks.
    let all: Vec<_> = runs(0, 256, 0, 1024).collect();
    assert_eq!(all.len(), 4);
    assert!(all.iter().all(|r| r.off == 0 && r.rows == 256));
}
