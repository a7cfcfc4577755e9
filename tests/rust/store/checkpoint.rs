//! Unit tests of `src/store/checkpoint.rs`: a step rolled back or committed exactly, with
//! windows that cross block boundaries inside the step.

use super::super::{CpuStore, StoreConfig};
use crate::attention::args::Params;
use crate::attention::cpu::attend;
use crate::error::{Error, Result};
use crate::tensor::{DType, View3};
use crate::test_common::Rng;

const H: usize = 2;
const D: usize = 4;

fn cfg(block_size: usize, windows: Vec<Option<usize>>) -> StoreConfig {
    StoreConfig {
        num_layers: windows.len(),
        num_kv_heads: H,
        head_dim: D,
        dtype: DType::F32,
        kv: crate::quant::KvFormat::Exact,
        block_size,
        windows,
        host_memory_limit: None,
    }
}

/// The key of (head, position) in generation `salt`: a step's tokens get a salt of their own,
/// so a rollback that left any of them readable is seen.
fn key_of(head: usize, pos: usize, j: usize, salt: usize) -> f32 {
    (salt * 1_000_000 + head * 100_000 + pos * 10 + j) as f32
}

/// A store and, per layer, the salt every position was appended with.
struct Model {
    s: CpuStore,
    salts: Vec<Vec<usize>>,
}

impl Model {
    fn new(c: StoreConfig) -> Self {
        let layers = c.num_layers;
        Model {
            s: CpuStore::new(c).unwrap(),
            salts: vec![Vec::new(); layers],
        }
    }

    fn append(&mut self, layer: usize, n: usize, salt: usize) -> Result<()> {
        let from = self.salts[layer].len();
        let mut k = vec![0f32; H * n * D];
        let mut v = vec![0f32; H * n * D];
        for hi in 0..H {
            for i in 0..n {
                for j in 0..D {
                    k[(hi * n + i) * D + j] = key_of(hi, from + i, j, salt);
                    v[(hi * n + i) * D + j] = -key_of(hi, from + i, j, salt);
                }
            }
        }
        self.s.append(
            layer,
            View3::contiguous(&k, [H, n, D]),
            View3::contiguous(&v, [H, n, D]),
        )?;
        self.salts[layer].extend(std::iter::repeat_n(salt, n));
        Ok(())
    }

    /// Every held position of every layer reads as appended.
    fn check(&self) {
        for (layer, salts) in self.salts.iter().enumerate() {
            assert_eq!(self.s.seq_len(layer).unwrap(), salts.len(), "layer {layer}");
            let a = self.s.retained_start(layer).unwrap();
            let mut seen = 0;
            self.s
                .read::<f32>(layer, a, salts.len(), |h, i, k, v| {
                    let pos = a + i;
                    for j in 0..D {
                        let want = key_of(h, pos, j, salts[pos]);
                        assert_eq!(k[j], want, "layer {layer} key head {h} pos {pos}");
                        assert_eq!(v[j], -want, "layer {layer} value head {h} pos {pos}");
                    }
                    seen += 1;
                })
                .unwrap();
            assert_eq!(seen, H * (salts.len() - a));
        }
    }

    /// Every layer's (length, retained start).
    fn shape(&self) -> Vec<(usize, usize)> {
        (0..self.salts.len())
            .map(|l| {
                (
                    self.s.seq_len(l).unwrap(),
                    self.s.retained_start(l).unwrap(),
                )
            })
            .collect()
    }

    /// Decode attention of a fixed query over every layer (its own window on window layers;
    /// none over an empty layer).
    fn attention(&self) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(9);
        let q = rng.vec(2 * H * D, 1.0);
        (0..self.salts.len())
            .map(|l| {
                if self.salts[l].is_empty() {
                    return Vec::new();
                }
                let params = Params {
                    scale: 0.5,
                    softcap: None,
                    window: self.s.config().windows[l],
                };
                let kv = self.s.view::<f32>(l).unwrap();
                attend(View3::contiguous(&q, [2 * H, 1, D]), &kv, &params, None).unwrap()
            })
            .collect()
    }
}

#[test]
fn rollback_restores_what_a_window_let_go_of() {
    let mut m = Model::new(cfg(4, vec![Some(6), None, Some(9)]));
    for l in 0..3 {
        m.append(l, 10, 0).unwrap();
    }
    let (before, reads) = (m.shape(), m.attention());
    let salts = m.salts.clone();
    m.s.checkpoint();
    assert!(m.s.in_step());
    // Chunks that cross block boundaries; the windows let go of every block held before.
    for n in [3, 5, 7, 1, 9] {
        for l in 0..3 {
            m.append(l, n, 1).unwrap();
        }
    }
    m.check();
    assert!(
        m.s.retained_start(0).unwrap() >= 12,
        "the window moved past the checkpoint"
    );
    assert!(m.s.retained_start(2).unwrap() >= 12);
    let reserved = m.s.bytes_reserved();
    m.s.rollback().unwrap();
    assert!(!m.s.in_step());
    m.salts = salts;
    assert_eq!(m.shape(), before);
    m.check();
    assert_eq!(
        m.attention(),
        reads,
        "attention reads exactly as before the step"
    );
    assert_eq!(
        m.s.bytes_reserved(),
        reserved,
        "the step's blocks stay reserved for reuse"
    );
    // The store goes on from the restored state, reusing the blocks.
    for n in [3, 5, 7, 1, 9] {
        for l in 0..3 {
            m.append(l, n, 2).unwrap();
        }
    }
    m.check();
    assert_eq!(m.s.bytes_reserved(), reserved);
}

#[test]
fn commit_releases_the_kept_blocks_for_reuse() {
    let c = cfg(4, vec![Some(6)]);
    let mut m = Model::new(c.clone());
    let mut twin = Model::new(c);
    for x in [&mut m, &mut twin] {
        x.append(0, 10, 0).unwrap();
    }
    m.s.checkpoint();
    for n in [3, 5, 7, 1, 9] {
        for x in [&mut m, &mut twin] {
            x.append(0, n, 1).unwrap();
        }
    }
    // Kept aside: at most the three blocks per head held at the checkpoint.
    let pair = 2 * m.s.config().block_bytes();
    assert!(m.s.bytes_reserved() > twin.s.bytes_reserved());
    assert!(m.s.bytes_reserved() <= twin.s.bytes_reserved() + 3 * H * pair);
    m.s.commit();
    assert!(!m.s.in_step());
    assert_eq!(m.shape(), twin.shape());
    m.check();
    assert_eq!(m.attention(), twin.attention());
    // Released: the next blocks come from them, nothing new is allocated.
    let reserved = m.s.bytes_reserved();
    for n in [4, 4, 4] {
        m.append(0, n, 2).unwrap();
    }
    m.check();
    assert_eq!(m.s.bytes_reserved(), reserved);
}

#[test]
fn a_long_step_keeps_at_most_the_blocks_held_at_its_start() {
    let c = cfg(4, vec![Some(5)]);
    let mut m = Model::new(c.clone());
    let mut twin = Model::new(c);
    for x in [&mut m, &mut twin] {
        x.append(0, 7, 0).unwrap();
    }
    m.s.checkpoint();
    for _ in 0..200 {
        for x in [&mut m, &mut twin] {
            x.append(0, 1, 1).unwrap();
        }
    }
    // Two blocks per head were held at the checkpoint (positions 0..7): no more is kept.
    let pair = 2 * m.s.config().block_bytes();
    assert!(m.s.bytes_reserved() <= twin.s.bytes_reserved() + 2 * H * pair);
    m.s.rollback().unwrap();
    m.salts = vec![vec![0; 7]];
    m.check();
}

#[test]
fn steps_at_random_match_a_model() {
    let mut rng = Rng::new(7);
    for round in 0..30 {
        let bs = 1 + rng.below(6);
        let windows = (0..3)
            .map(|_| (rng.below(3) > 0).then(|| 1 + rng.below(12)))
            .collect();
        let mut m = Model::new(cfg(bs, windows));
        for step in 0..12 {
            let saved = (m.shape(), m.salts.clone(), m.attention());
            m.s.checkpoint();
            let salt = round * 100 + step + 1;
            for _ in 0..1 + rng.below(4) {
                let n = rng.below(3 * bs + 2);
                for l in 0..3 {
                    m.append(l, n, salt).unwrap();
                }
            }
            m.check();
            if rng.below(2) == 0 {
                m.s.rollback().unwrap();
                m.salts = saved.1;
                assert_eq!(m.shape(), saved.0, "round {round} step {step}");
                assert_eq!(m.attention(), saved.2, "round {round} step {step}");
            } else {
                m.s.commit();
            }
            m.check();
        }
    }
}

#[test]
fn rollback_without_a_step_raises_and_commit_is_a_no_op() {
    let mut m = Model::new(cfg(4, vec![Some(6)]));
    m.append(0, 9, 0).unwrap();
    m.s.commit();
    let e = m.s.rollback().unwrap_err().to_string();
    assert!(e.starts_with("checkpoint: no step is open"), "{e}");
    m.check();
    // A second checkpoint commits the first: rollback returns to the second.
    m.s.checkpoint();
    m.append(0, 5, 1).unwrap();
    m.s.checkpoint();
    let (shape, salts) = (m.shape(), m.salts.clone());
    m.append(0, 9, 2).unwrap();
    m.s.rollback().unwrap();
    m.salts = salts;
    assert_eq!(m.shape(), shape);
    m.check();
    assert!(m.s.rollback().is_err(), "rollback ends the step");
}

#[test]
fn crop_and_clear_within_a_step() {
    let mut m = Model::new(cfg(4, vec![Some(6), None]));
    for l in 0..2 {
        m.append(l, 10, 0).unwrap();
    }
    let (shape, salts) = (m.shape(), m.salts.clone());
    m.s.checkpoint();
    for l in 0..2 {
        m.append(l, 9, 1).unwrap();
    }
    // Cropping only the step's tokens keeps the step open.
    m.s.crop(14).unwrap();
    for s in &mut m.salts {
        s.truncate(14);
    }
    m.check();
    for l in 0..2 {
        m.append(l, 6, 1).unwrap();
    }
    m.s.rollback().unwrap();
    m.salts = salts.clone();
    assert_eq!(m.shape(), shape);
    m.check();

    // Cropping below the checkpoint ends the step: the kept blocks are released.
    m.s.checkpoint();
    for l in 0..2 {
        m.append(l, 2, 1).unwrap();
    }
    m.s.crop(9).unwrap();
    assert!(!m.s.in_step());
    for s in &mut m.salts {
        s.truncate(9);
    }
    m.check();
    assert!(m.s.rollback().is_err());

    // So does clear.
    m.s.checkpoint();
    for l in 0..2 {
        m.append(l, 12, 1).unwrap();
    }
    m.s.clear().unwrap();
    assert!(!m.s.in_step());
    m.salts = vec![Vec::new(); 2];
    m.check();
    for l in 0..2 {
        m.append(l, 5, 2).unwrap();
    }
    m.check();
}

#[test]
fn kept_blocks_are_not_counted_as_free_by_the_memory_check() {
    // Window 4, blocks of 4, 8 tokens: two blocks per head, 512 bytes; the limit allows no more.
    let mut c = cfg(4, vec![Some(4)]);
    c.host_memory_limit = Some(2 * H * 2 * c.block_bytes());
    let mut m = Model::new(c);
    m.append(0, 8, 0).unwrap();
    // Without a step the window's dropped block is reused: no new memory.
    m.append(0, 4, 1).unwrap();
    m.check();
    // Within one, it is kept: the next block needs memory the limit refuses, before any change.
    m.s.checkpoint();
    let e = m.append(0, 4, 2).unwrap_err();
    assert!(matches!(e, Error::OutOfHostMemory { .. }), "{e}");
    m.check();
    m.s.rollback().unwrap();
    m.check();
    m.append(0, 4, 3).unwrap();
    m.check();
}
