//! Unit tests of `src/store/residency.rs`: the pure planner of block moves (no GPU).

use super::*;
use Placement::{Device as D, Host as H};

fn layers(spec: &[&[&[Placement]]]) -> Vec<Vec<Vec<Placement>>> {
    spec.iter()
        .map(|l| l.iter().map(|h| h.to_vec()).collect())
        .collect()
}

#[test]
fn promotes_earliest_blocks_across_layers_and_heads() {
    let p = layers(&[&[&[D, H, H], &[H, H]], &[&[H, H, H]]]);
    let m = plan_moves(&p, 1, 4);
    let got: Vec<(usize, usize, usize)> = m.iter().map(|m| (m.layer, m.head, m.index)).collect();
    // index 0 of every (layer, head) first, then index 1.
    assert_eq!(got, vec![(0, 1, 0), (1, 0, 0), (0, 0, 1)]);
    assert!(m.iter().all(|m| m.to == D));
}

#[test]
fn demotes_latest_blocks_first() {
    let p = layers(&[&[&[D, D, D], &[D, D]], &[&[D, H]]]);
    let m = plan_moves(&p, 6, 3);
    let got: Vec<(usize, usize, usize)> = m.iter().map(|m| (m.layer, m.head, m.index)).collect();
    assert_eq!(got, vec![(0, 0, 2), (0, 0, 1), (0, 1, 1)]);
    assert!(m.iter().all(|m| m.to == H));
}

#[test]
fn nothing_to_do_or_nothing_left_to_move() {
    let p = layers(&[&[&[D, H]]]);
    assert!(plan_moves(&p, 1, 1).is_empty());
    // A budget larger than every host block: all of them, and no more.
    assert_eq!(plan_moves(&p, 1, 10).len(), 1);
    assert_eq!(plan_moves(&p, 1, 0).len(), 1);
    assert!(plan_moves(&[], 0, 5).is_empty());
}

#[test]
fn moves_keep_device_blocks_before_host_blocks() {
    // Whatever the budget, promotions then demotions leave every head device-then-host.
    for target in 0..=9 {
        let mut p = layers(&[&[&[H, H, H], &[H, H, H]], &[&[H, H, H]]]);
        let mut in_use = 0;
        for t in [target, target / 2, 9 - target] {
            for m in plan_moves(&p, in_use, t) {
                p[m.layer][m.head][m.index] = m.to;
                in_use = if m.to == D { in_use + 1 } else { in_use - 1 };
            }
            for l in &p {
                let tails = host_tail(l, l.len(), 0, 300, 100);
                for (h, blocks) in l.iter().enumerate() {
                    let first_host = blocks.iter().position(|x| *x == H);
                    if let Some(f) = first_host {
                        assert!(blocks[f..].iter().all(|x| *x == H), "{p:?}");
                        assert_eq!(tails[h], Some(f * 100));
                    } else {
                        assert_eq!(tails[h], Some(300));
                    }
                }
            }
        }
    }
}

#[test]
fn host_tail_refuses_a_head_with_a_device_block_after_a_host_block() {
    let heads = vec![vec![D, H, D], vec![D, D, H], vec![D, D, D]];
    assert_eq!(
        host_tail(&heads, 3, 512, 512 + 250, 100),
        vec![None, Some(712), Some(762)]
    );
    // Only the heads asked about.
    assert_eq!(host_tail(&heads, 1, 0, 300, 100), vec![None]);
}

#[test]
fn new_blocks_fill_the_device_first() {
    assert_eq!(place_new(5, 3), (3, 2));
    assert_eq!(place_new(2, 3), (2, 0));
    assert_eq!(place_new(0, 0), (0, 0));
}
