//! The one planner. Pure arithmetic of where bytes sit: the GPU budget split into weights, working set,
//! prefill staging and resident KV; the rest of the KV on the host; and the floors that no
//! implementation beats. The runtime (`HeadInferCache` on CUDA) and `headinfer plan` both use
//! this one function.

use crate::error::{Error, Result};

/// The shape of a model, as far as memory and time go.
#[derive(Clone, Debug)]
pub struct ModelShape {
    pub num_layers: usize,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// Bytes per element of activations (and of the prefill's staged KV, which readers
    /// dequantize into the model's dtype).
    pub elem_bytes: usize,
    /// Bytes the store holds per token per kv head for its keys (as many for its values):
    /// `head_dim * elem_bytes` exact, `KvFormat::row_bytes` in 8 bits.
    pub kv_row_bytes: usize,
    /// Bytes of the weights on the GPU.
    pub weight_bytes: usize,
    /// Per layer, the sliding window (`None`: full attention).
    pub windows: Vec<Option<usize>>,
}

/// What the plan is for.
#[derive(Clone, Debug)]
pub struct Request {
    /// Tokens the cache will hold (prompt + new tokens).
    pub context: usize,
    pub chunk_size: usize,
    /// Bytes of GPU memory the process may use in all.
    pub gpu_budget: usize,
    /// Bytes kept free for the CUDA context, library workspaces and fragmentation.
    pub margin: usize,
    /// Most bytes one prefill staging buffer (K and V of a head group) may take.
    pub staging_cap: usize,
    /// `true`: a prefill is coming (a chunk's activations and staging buffers need room);
    /// `false`: decode only, whose working set is one token's, so the KV gets the rest.
    pub prefill: bool,
    /// Device bytes of the copy engine's decode staging (fixed, whatever the context).
    pub ring_bytes: usize,
}

/// Where every byte goes, and the floors.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub weight_bytes: usize,
    /// Activations of one prefill chunk (the working set), estimated.
    pub activation_bytes: usize,
    /// KV heads gathered together for prefill attention, and the bytes of the two
    /// staging buffers (double buffering) this takes at full context, plus the copy engine's
    /// decode staging (`Request::ring_bytes`).
    pub heads_per_group: usize,
    pub staging_bytes: usize,
    /// Bytes of KV blocks kept on the GPU, and the KV bytes of the whole context.
    pub kv_device_bytes: usize,
    pub kv_total_bytes: usize,
    pub kv_host_bytes: usize,
    /// Bytes kept free for the CUDA context, library workspaces and fragmentation.
    pub margin_bytes: usize,
    /// Whether weights + working set + staging fit the budget at all.
    pub fits_gpu: bool,
}

impl ModelShape {
    /// KV bytes of one token of one layer (keys and values of every kv head).
    pub fn kv_bytes_per_token_layer(&self) -> usize {
        2 * self.num_kv_heads * self.kv_row_bytes
    }

    /// KV bytes held at `context` tokens: window layers hold at most their window plus a
    /// chunk.
    pub fn kv_bytes(&self, context: usize, chunk: usize) -> usize {
        self.windows
            .iter()
            .map(|w| {
                w.map_or(context, |w| context.min(w + chunk)) * self.kv_bytes_per_token_layer()
            })
            .sum()
    }

    /// Activation bytes of one layer's forward over `chunk` tokens: hidden states, q/k/v,
    /// the MLP's intermediate tensors, and the f32 partials of the attention merge.
    pub fn activation_bytes(&self, chunk: usize) -> usize {
        let per_token = 4 * self.hidden_size
            + 3 * self.intermediate_size
            + 2 * self.num_q_heads * self.head_dim
            + 2 * self.num_kv_heads * self.head_dim;
        chunk * per_token * self.elem_bytes
            + 3 * self.num_q_heads * chunk * self.head_dim * 4
            + self.vocab_size * 4
    }
}

/// Splits the GPU budget. Errors name the argument that cannot work.
pub fn plan(m: &ModelShape, r: &Request) -> Result<Plan> {
    if m.windows.len() != m.num_layers {
        return Err(Error::value("windows", "needs one entry per layer"));
    }
    if r.chunk_size == 0 {
        return Err(Error::value("chunk_size", "must be at least 1"));
    }
    let kv_total = m.kv_bytes(r.context, r.chunk_size);
    let tokens = if r.prefill { r.chunk_size } else { 1 };
    let activation = m.activation_bytes(tokens.min(r.context.max(1)));
    // Prefill gathers a head group's keys and values of one layer: at most the context.
    let per_head = if r.prefill {
        2 * r.context.max(1) * m.head_dim * m.elem_bytes
    } else {
        0
    };
    let mut heads_per_group = (r.staging_cap / per_head.max(1)).clamp(1, m.num_kv_heads);
    let fixed_with =
        |hpg: usize| m.weight_bytes + activation + 2 * hpg * per_head + r.ring_bytes + r.margin;
    // A tight budget gets smaller head groups (more, smaller transfers) before anything else.
    while heads_per_group > 1 && fixed_with(heads_per_group) > r.gpu_budget {
        heads_per_group -= 1;
    }
    let staging = 2 * heads_per_group * per_head + r.ring_bytes;
    let fixed = fixed_with(heads_per_group);
    let room = r.gpu_budget.saturating_sub(fixed);
    let kv_device = room.min(kv_total);
    Ok(Plan {
        weight_bytes: m.weight_bytes,
        activation_bytes: activation,
        heads_per_group,
        staging_bytes: staging,
        kv_device_bytes: kv_device,
        kv_total_bytes: kv_total,
        kv_host_bytes: kv_total - kv_device,
        margin_bytes: r.margin,
        fits_gpu: fixed <= r.gpu_budget,
    })
}

#[cfg(test)]
#[path = "../tests/rust/plan.rs"]
mod tests;
