//! Unit tests of `src/attention/policy.rs`: who attends where, without a GPU.

use super::*;

fn policy(cpu_heads: usize, min_host_tokens: usize) -> SharePolicy {
    SharePolicy {
        cpu_heads,
        min_host_tokens,
    }
}

#[test]
fn splits_only_where_every_head_can_and_the_share_is_long_enough() {
    let p = policy(2, 1000);
    assert_eq!(
        p.decide(5000, &[Some(1024), Some(4096)]),
        Some(Split {
            from: vec![1024, 4096]
        })
    );
    // A head whose host blocks are not all after its device blocks: no split at all.
    assert_eq!(p.decide(5000, &[Some(1024), None]), None);
    // No head has host tokens.
    assert_eq!(p.decide(5000, &[Some(5000), Some(5000)]), None);
    // The longest share is too short to repay the hand-off.
    assert_eq!(p.decide(5000, &[Some(4500), Some(4096)]), None);
    assert_eq!(
        policy(2, 0)
            .decide(5000, &[Some(4999), Some(5000)])
            .unwrap()
            .from,
        vec![4999, 5000]
    );
    assert_eq!(p.decide(5000, &[]), None);
}

#[test]
fn cpu_heads_are_checked_against_the_store() {
    assert!(SharePolicy::check(0, 8).is_ok());
    assert!(SharePolicy::check(8, 8).is_ok());
    let e = SharePolicy::check(9, 8).unwrap_err().to_string();
    assert!(e.starts_with("cpu_heads: must be between 0 and 8"), "{e}");
    let e = SharePolicy::check(17, 32).unwrap_err().to_string();
    assert!(e.starts_with("cpu_heads: must be between 0 and 16"), "{e}");
}

#[test]
fn default_is_off() {
    let p = SharePolicy::default();
    assert_eq!(p.cpu_heads, 0);
    assert_eq!(p.min_host_tokens, MIN_HOST_TOKENS);
}

#[test]
fn the_estimate_takes_the_cpus_share_of_the_bandwidth() {
    // 16 cores at 2.4 GB/s against 51 GB/s of PCIe: 38.4 / 89.4 of 8 heads, about 3.
    assert_eq!(estimate_cpu_heads(8, 16), 3);
    assert_eq!(estimate_cpu_heads(8, 1), 0);
    assert_eq!(estimate_cpu_heads(32, 1000), 16);
    assert!(estimate_cpu_heads(2, 1000) <= 2);
}
