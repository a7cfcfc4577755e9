//! Residency: which blocks sit on the GPU. Pure planning, no memory touched: given where every
//! block is and how many device blocks the budget allows, the moves that get there. The store
//! carries the moves out (`CudaStore::rebalance`). Unit-tested without a GPU.

use super::pool::Placement;

/// One block to move: block `index` (in position order) of kv head `head` of `layer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub layer: usize,
    pub head: usize,
    pub index: usize,
    pub to: Placement,
}

/// The moves that bring the device's blocks in use from `in_use` to `target`:
/// `placement[layer][head][index]` says where each block is now. Promotions take the earliest
/// positions first and demotions the latest first, every layer and head alike, so each head
/// keeps its device blocks before its host blocks (what a shared decode needs).
pub fn plan_moves(placement: &[Vec<Vec<Placement>>], in_use: usize, target: usize) -> Vec<Move> {
    let (want, from, to, latest_first) = if target > in_use {
        (target - in_use, Placement::Host, Placement::Device, false)
    } else if in_use > target {
        (in_use - target, Placement::Device, Placement::Host, true)
    } else {
        return Vec::new();
    };
    let longest = placement
        .iter()
        .flat_map(|l| l.iter().map(Vec::len))
        .max()
        .unwrap_or(0);
    let mut moves = Vec::new();
    let order: Box<dyn Iterator<Item = usize>> = if latest_first {
        Box::new((0..longest).rev())
    } else {
        Box::new(0..longest)
    };
    for index in order {
        for (layer, heads) in placement.iter().enumerate() {
            for (head, blocks) in heads.iter().enumerate() {
                if blocks.get(index) == Some(&from) {
                    moves.push(Move {
                        layer,
                        head,
                        index,
                        to,
                    });
                    if moves.len() == want {
                        return moves;
                    }
                }
            }
        }
    }
    moves
}

/// How `wanted` new blocks split between the device (while it has `device_room`) and the
/// host: `(device, host)`.
pub fn place_new(wanted: usize, device_room: usize) -> (usize, usize) {
    let device = wanted.min(device_room);
    (device, wanted - device)
}

/// Per kv head `0..heads`: the first position of its host blocks (`len` when it has none),
/// or `None` for a head with a device block after a host block; `start` is the layer's first
/// position, `len` one past its last.
pub fn host_tail(
    placement: &[Vec<Placement>],
    heads: usize,
    start: usize,
    len: usize,
    block_size: usize,
) -> Vec<Option<usize>> {
    placement
        .iter()
        .take(heads)
        .map(|blocks| {
            let first = blocks
                .iter()
                .position(|p| *p == Placement::Host)
                .unwrap_or(blocks.len());
            let ordered = blocks[first..].iter().all(|p| *p == Placement::Host);
            ordered.then_some((start + first * block_size).min(len))
        })
        .collect()
}

#[cfg(test)]
#[path = "../../tests/rust/store/residency.rs"]
mod tests;
