//! Where one layer's keys sit at one step, per kv head: tokens in device blocks, in host
//! blocks, and where the host blocks start. The store reports it (`DeviceLayer::placement`);
//! the attention policy (`attention::policy::balance`) decides its split from it, so the type
//! lives here, below both.

/// One kv head of a layer as the balance sees it: visible tokens in device and in host
/// blocks, and where its host blocks start (`None`: a device block follows a host block, so
/// the kernel cannot leave it a tail; it stays on the GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadPlacement {
    pub device_tokens: usize,
    pub host_tokens: usize,
    pub tail: Option<usize>,
}

/// One layer's placement at one step, what `balance` decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerPlacement {
    /// One past the last position.
    pub len: usize,
    /// The layer's first position (blocks start at `start + k * block_size`).
    pub start: usize,
    /// The first position the query sees (a sliding window's start, else `start`).
    pub lo: usize,
    pub block_size: usize,
    /// Bytes of one token of one head: keys and values (`2 * head_dim * element size`).
    pub token_bytes: usize,
    pub heads: Vec<HeadPlacement>,
}
