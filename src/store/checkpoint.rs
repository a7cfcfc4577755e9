//! A step that can be undone exactly: `checkpoint` remembers each layer's length and retained
//! start; while the step is open, the blocks a sliding window lets go of that hold positions
//! from before the step are kept aside instead of going back to their pool (still reserved; at
//! most the blocks each layer held when the step began); `commit` releases them as the window
//! would have; `rollback` drops what the step appended and puts them back in place, so every
//! layer reads exactly as before the step.
//!
//! Blocks the step itself added are not kept when a window lets go of them: no state the
//! rollback restores holds their positions.
//!
//! Within a step: `rebalance` moves only the blocks the layers hold (kept blocks stay where
//! they are, counted as in use); `crop` that keeps every layer's checkpoint length keeps the
//! step open, one that cuts below it (or empties a layer) ends the step as `commit` would, and
//! so does `clear`.

use super::pool::{Block, Placement};
use super::{Backend, KvStore};
use crate::error::{Error, Result};

/// An open step.
pub(super) struct Checkpoint {
    layers: Vec<Saved>,
}

/// One layer at the start of the step, and what its window let go of since.
struct Saved {
    len: usize,
    start: usize,
    /// Per kv head, the blocks let go of since the step began, in position order: absolute
    /// blocks `start / block_size ..`.
    kept: Vec<Vec<Block>>,
}

impl Checkpoint {
    /// Keeps `block`, let go of by (`layer`, `head`)'s window, for a rollback.
    pub(super) fn keep(&mut self, layer: usize, head: usize, block: Block) {
        self.layers[layer].kept[head].push(block);
    }

    /// Length of `layer` when the step began.
    pub(super) fn len(&self, layer: usize) -> usize {
        self.layers[layer].len
    }

    fn into_blocks(self) -> impl Iterator<Item = Block> {
        self.layers
            .into_iter()
            .flat_map(|s| s.kept.into_iter().flatten())
    }
}

impl<B: Backend> KvStore<B> {
    /// Begins a step: from now on `rollback` restores every layer to its present state. A step
    /// already open is committed first (its state is kept as it is). Takes no memory and waits
    /// for nothing.
    pub fn checkpoint(&mut self) {
        self.commit();
        let layers = self
            .layers
            .iter()
            .map(|l| Saved {
                len: l.len,
                start: l.start,
                kept: (0..l.heads.len()).map(|_| Vec::new()).collect(),
            })
            .collect();
        self.step = Some(Checkpoint { layers });
    }

    /// Whether a step is open (begun by `checkpoint`, not yet ended).
    pub fn in_step(&self) -> bool {
        self.step.is_some()
    }

    /// Ends the open step, keeping what it appended: the blocks kept aside go back to their
    /// pools, as the window would have let them go. No step open: nothing to do.
    ///
    /// Like a window's own drops, this waits for nothing: later writes into these blocks are
    /// ordered after the reads in flight on the caller's stream.
    pub fn commit(&mut self) {
        if let Some(step) = self.step.take() {
            for b in step.into_blocks() {
                self.pool(b.placement()).give(b);
            }
        }
    }

    /// Ends the open step, undoing it: every layer holds exactly the positions, blocks and
    /// retained start it held at `checkpoint`; blocks the step added go back to their pools.
    ///
    /// Waits first for the work in flight (kernels, the CPU share) that may still write or
    /// read the blocks, as `crop` does. Errors, changing nothing (the step stays open), if that
    /// wait fails; errors if no step is open (none was begun, or `commit`, `clear` or a `crop`
    /// below the checkpoint ended it), since nothing could then be restored.
    pub fn rollback(&mut self) -> Result<()> {
        if self.step.is_none() {
            return Err(Error::value(
                "checkpoint",
                "no step is open to roll back (none was begun, or commit(), clear() or a crop() \
                 below its length ended it)",
            ));
        }
        // Blocks the step added may still be written by appends in flight, and the block
        // table's entries are rewritten below.
        self.backend.quiesce()?;
        let step = self.step.take().expect("checked above");
        let bs = self.cfg.block_size;
        let KvStore {
            layers,
            host,
            device,
            backend,
            ..
        } = self;
        for (li, (l, saved)) in layers.iter_mut().zip(step.layers).enumerate() {
            // The layer held absolute blocks `saved.start / bs .. end`.
            let end = saved.len.div_ceil(bs);
            let first = l.start / bs;
            for (hi, (blocks, kept)) in l.heads.iter_mut().zip(saved.kept).enumerate() {
                while !blocks.is_empty() && first + blocks.len() > end {
                    let b = blocks.pop_back().expect("not empty");
                    match b.placement() {
                        Placement::Host => host.give(b),
                        Placement::Device => device.give(b),
                    }
                }
                for b in kept.into_iter().rev() {
                    blocks.push_front(b);
                }
                debug_assert_eq!(blocks.len(), end.saturating_sub(saved.start / bs));
                for (i, b) in blocks.iter().enumerate() {
                    backend.place(li, hi, saved.start / bs + i, b);
                }
            }
            l.len = saved.len;
            l.start = saved.start;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "../../tests/rust/store/checkpoint.rs"]
mod tests;
