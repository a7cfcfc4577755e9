//! Unit tests of `src/plan.rs`.

use super::*;

fn llama8b() -> ModelShape {
    ModelShape {
        num_layers: 32,
        num_q_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        hidden_size: 4096,
        intermediate_size: 14336,
        vocab_size: 128256,
        elem_bytes: 2,
        kv_row_bytes: 256,
        weight_bytes: 16_060_000_000,
        windows: vec![None; 32],
    }
}

const GIB: usize = 1 << 30;

fn req(context: usize, budget: usize) -> Request {
    Request {
        context,
        chunk_size: 8192,
        gpu_budget: budget,
        margin: GIB / 2,
        staging_cap: GIB,
        prefill: true,
        ring_bytes: 0,
    }
}

#[test]
fn the_copy_engines_ring_is_counted_whatever_the_context() {
    for prefill in [true, false] {
        let base = Request {
            prefill,
            ..req(131_072, 24 * GIB)
        };
        let with = Request {
            ring_bytes: 48 << 20,
            ..base.clone()
        };
        let (a, b) = (
            plan(&llama8b(), &base).unwrap(),
            plan(&llama8b(), &with).unwrap(),
        );
        assert_eq!(b.staging_bytes, a.staging_bytes + (48 << 20));
        assert_eq!(b.kv_device_bytes + (48 << 20), a.kv_device_bytes);
    }
}

#[test]
fn kv_bytes_match_the_facts() {
    // FACTS.md: 131,072 bytes per token for Llama-3-8B in bf16; 16 GiB at 128K.
    let m = llama8b();
    assert_eq!(m.kv_bytes_per_token_layer() * 32, 131_072);
    assert_eq!(m.kv_bytes(128 * 1024, 8192), 16 * GIB);
}

#[test]
fn short_contexts_are_fully_resident() {
    let p = plan(&llama8b(), &req(8192, 24 * GIB)).unwrap();
    assert!(p.fits_gpu);
    assert_eq!(p.kv_device_bytes, p.kv_total_bytes);
    assert_eq!(p.kv_host_bytes, 0);
    assert_eq!(p.heads_per_group, 8);
}

#[test]
fn long_contexts_spill_and_the_budget_holds() {
    let m = llama8b();
    for ctx in [128 * 1024, 1 << 20] {
        let r = req(ctx, 24 * GIB);
        let p = plan(&m, &r).unwrap();
        assert!(p.kv_host_bytes > 0);
        let used =
            p.weight_bytes + p.activation_bytes + p.staging_bytes + r.margin + p.kv_device_bytes;
        assert!(used <= r.gpu_budget, "{ctx}: {used} > budget");
        assert!(p.staging_bytes <= 2 * GIB.max(2 * ctx * 128 * 2));
        assert_eq!(p.kv_device_bytes + p.kv_host_bytes, p.kv_total_bytes);
    }
    // At 1M one head's K and V (512 MiB) is the group: the staging stays bounded.
    let p = plan(&m, &req(1 << 20, 24 * GIB)).unwrap();
    assert_eq!(p.heads_per_group, 2);
}

#[test]
fn a_tight_budget_shrinks_the_head_groups_first() {
    let m = llama8b();
    let mut r = req(1 << 19, m.weight_bytes + 2 * GIB);
    r.margin = GIB / 4;
    let p = plan(&m, &r).unwrap();
    assert_eq!(p.heads_per_group, 1);
    assert_eq!(p.staging_bytes, 2 * 2 * (1 << 19) * 128 * 2);
}

#[test]
fn a_budget_below_the_weights_does_not_fit() {
    let p = plan(&llama8b(), &req(8192, 10 * GIB)).unwrap();
    assert!(!p.fits_gpu);
    assert_eq!(p.kv_device_bytes, 0);
}

#[test]
fn window_layers_hold_only_their_window() {
    let mut m = llama8b();
    m.windows = vec![Some(4096); 32];
    assert_eq!(m.kv_bytes(1 << 20, 8192), (4096 + 8192) * 131_072);
}

#[test]
fn bad_requests_name_the_argument() {
    let mut m = llama8b();
    let mut r = req(10, GIB);
    r.chunk_size = 0;
    assert!(plan(&m, &r)
        .unwrap_err()
        .to_string()
        .starts_with("chunk_size:"));
    m.windows.pop();
    assert!(plan(&m, &req(10, GIB))
        .unwrap_err()
        .to_string()
        .starts_with("windows:"));
}

#[test]
fn decode_gives_the_working_set_to_the_kv() {
    let m = llama8b();
    let mut r = req(128 * 1024, 24 * GIB);
    let pre = plan(&m, &r).unwrap();
    r.prefill = false;
    let dec = plan(&m, &r).unwrap();
    assert_eq!(dec.staging_bytes, 0);
    assert!(dec.activation_bytes < 2 << 20);
    assert_eq!(
        dec.kv_device_bytes - pre.kv_device_bytes,
        pre.activation_bytes + pre.staging_bytes - dec.activation_bytes
    );
}

#[test]
fn int8_rows_hold_more_tokens_in_the_same_room_and_stage_as_exact() {
    // Rows of 136 bytes (int8 values and bf16 scales at head_dim 128) against 256: the same
    // device room holds 256 / 136 as many tokens; the prefill still stages dequantized rows,
    // so the working set and staging are those of the exact format.
    let exact = llama8b();
    let int8 = ModelShape {
        kv_row_bytes: 136,
        ..llama8b()
    };
    let r = req(1 << 20, 24 * GIB);
    let (pe, pq) = (plan(&exact, &r).unwrap(), plan(&int8, &r).unwrap());
    assert_eq!(pq.kv_total_bytes * 256, pe.kv_total_bytes * 136);
    assert_eq!(pq.staging_bytes, pe.staging_bytes);
    assert_eq!(pq.heads_per_group, pe.heads_per_group);
    assert_eq!(pq.kv_device_bytes, pe.kv_device_bytes);
    assert!(pq.kv_host_bytes < pe.kv_host_bytes);
}
