//! Unit tests of `src/attention/policy.rs`: who attends where, without a GPU.

use super::*;
use crate::store::HeadPlacement;

fn policy(cpu_heads: usize, min_host_tokens: usize) -> SharePolicy {
    SharePolicy {
        cpu_heads,
        min_host_tokens,
        ..SharePolicy::default()
    }
}

/// An H200-like host: PCIe 51 GB/s, 16 cores reading 40 GB/s, HBM 2.5 TB/s, 100 us hand-off.
const H200: Rates = Rates {
    pcie: 51e9,
    cpu: 40e9,
    device: 2.5e12,
    handoff: 100e-6,
    copy: 0.0,
};

/// Llama-3-8B bf16: 2 * 128 * 2 bytes per token of a head.
const TB: usize = 512;

/// A layer of `len` tokens from `start`, blocks of `bs`, each head's host blocks from
/// `tails[h]` on (`None`: a device block after a host one, with `mixed` device tokens).
fn layer(len: usize, start: usize, bs: usize, tails: &[Option<usize>]) -> LayerPlacement {
    layer_lo(len, start, start, bs, tails)
}

fn layer_lo(
    len: usize,
    start: usize,
    lo: usize,
    bs: usize,
    tails: &[Option<usize>],
) -> LayerPlacement {
    let heads = tails
        .iter()
        .map(|t| match *t {
            Some(t) => HeadPlacement {
                device_tokens: t.min(len).saturating_sub(lo),
                host_tokens: len - t.max(lo).min(len),
                tail: Some(t),
            },
            // Half on the device, half on the host, interleaved.
            None => HeadPlacement {
                device_tokens: (len - lo) / 2,
                host_tokens: (len - lo) - (len - lo) / 2,
                tail: None,
            },
        })
        .collect();
    LayerPlacement {
        len,
        start,
        lo,
        block_size: bs,
        token_bytes: TB,
        heads,
    }
}

/// The bytes the CPU's ranges hold, counted from `from` itself.
fn cpu_bytes(l: &LayerPlacement, from: &[usize]) -> f64 {
    from.iter()
        .map(|&f| l.len.saturating_sub(f.max(l.lo)) * l.token_bytes)
        .sum::<usize>() as f64
}

/// The checks every split must pass: one entry per shareable head, each a block boundary at
/// or after the head's tail (or `len`), the bytes as reported, the times as reported.
fn check_split(r: &Rates, l: &LayerPlacement, max_heads: usize, e: &ShareEstimate) {
    let from = &e.split.from;
    assert_eq!(from.len(), l.heads.len().min(max_heads));
    for (h, &f) in from.iter().enumerate() {
        assert!(f <= l.len, "head {h}: from {f} past len {}", l.len);
        if f < l.len {
            let t = l.heads[h]
                .tail
                .expect("only heads with a host tail are split");
            assert!(f >= t, "head {h}: from {f} before its host blocks at {t}");
            assert_eq!(
                (f - l.start) % l.block_size,
                0,
                "head {h}: {f} not a block start"
            );
            assert!(
                f + l.block_size > l.lo,
                "head {h}: a block wholly out of sight"
            );
        }
    }
    let bytes = cpu_bytes(l, from);
    assert_eq!(bytes, e.cpu_bytes);
    let (dev, host) = l
        .heads
        .iter()
        .fold((0, 0), |(d, h), p| (d + p.device_tokens, h + p.host_tokens));
    let tb = l.token_bytes as f64;
    let alone = dev as f64 * tb / r.device + host as f64 * tb / r.pcie;
    assert!((e.alone_seconds - alone).abs() <= 1e-12 * alone.max(1.0));
    assert!((e.gpu_seconds - (alone - bytes / r.pcie)).abs() < 1e-12);
    assert!((e.cpu_seconds - (r.handoff + bytes / r.cpu)).abs() < 1e-12);
    // The GPU's part, as the meter learns it: its host bytes and its device blocks' time.
    assert_eq!(e.gpu_host_bytes + bytes, host as f64 * tb);
    assert!((e.device_seconds - dev as f64 * tb / r.device).abs() < 1e-15);
    assert!((e.gpu_seconds - (e.device_seconds + e.gpu_host_bytes / r.pcie)).abs() < 1e-12);
    assert!(
        e.gpu_seconds.max(e.cpu_seconds) < alone,
        "a split that does not pay"
    );
}

/// Where both would finish together, in bytes.
fn target(r: &Rates, l: &LayerPlacement) -> f64 {
    let (dev, host) = l
        .heads
        .iter()
        .fold((0, 0), |(d, h), p| (d + p.device_tokens, h + p.host_tokens));
    let tb = l.token_bytes as f64;
    let alone = dev as f64 * tb / r.device + host as f64 * tb / r.pcie;
    (alone - r.handoff) / (1.0 / r.pcie + 1.0 / r.cpu)
}

#[test]
fn both_sides_finish_within_one_block_of_each_other() {
    let bs = 2048;
    for len in [40_000, 131_072, 131_072 + 777, 716_800] {
        for device_blocks in [0, 3, 20] {
            let tail = device_blocks * bs;
            if tail + 4 * bs > len {
                continue; // too little host KV to split for sure (covered below)
            }
            let l = layer(len, 0, bs, &[Some(tail); 8]);
            for r in [
                H200,
                Rates { cpu: 10e9, ..H200 },
                Rates { cpu: 100e9, ..H200 },
                Rates { pcie: 25e9, ..H200 },
            ] {
                let e = balance(&r, &l, MAX_CPU_HEADS).expect("a long host part pays");
                check_split(&r, &l, MAX_CPU_HEADS, &e);
                let block = (bs * TB) as f64;
                let gap = (e.gpu_seconds - e.cpu_seconds).abs();
                assert!(
                    gap <= block * (1.0 / r.pcie + 1.0 / r.cpu),
                    "len {len}, {device_blocks} device blocks, {r:?}: gap {gap}"
                );
                assert!((e.cpu_bytes - target(&r, &l)).abs() <= block / 2.0 + 1.0);
                // The heads' shares stay within one block of each other.
                let most = e.split.from.iter().max().unwrap();
                let least = e.split.from.iter().min().unwrap();
                assert!(most - least <= bs, "{:?}", e.split.from);
            }
        }
    }
}

#[test]
fn the_share_grows_with_the_cpu_rate_and_shrinks_with_the_gpus() {
    let l = layer(131_072, 0, 1024, &[Some(8192); 8]);
    let bytes = |r: Rates| balance(&r, &l, MAX_CPU_HEADS).map_or(0.0, |e| e.cpu_bytes);
    let mut last = 0.0;
    for cpu in [1e9, 5e9, 10e9, 20e9, 40e9, 80e9, 160e9, 1e12] {
        let b = bytes(Rates { cpu, ..H200 });
        assert!(b >= last, "cpu {cpu}: {b} < {last}");
        last = b;
    }
    let mut last = f64::INFINITY;
    for pcie in [5e9, 10e9, 25e9, 51e9, 100e9, 400e9] {
        let b = bytes(Rates { pcie, ..H200 });
        assert!(b <= last, "pcie {pcie}: {b} > {last}");
        last = b;
    }
    // With device blocks too: a faster HBM leaves the GPU less to do, so the CPU less.
    let l = layer(131_072, 0, 1024, &[Some(65_536); 8]);
    let bytes = |r: Rates| balance(&r, &l, MAX_CPU_HEADS).map_or(0.0, |e| e.cpu_bytes);
    let mut last = f64::INFINITY;
    for device in [100e9, 500e9, 1e12, 3e12] {
        let b = bytes(Rates { device, ..H200 });
        assert!(b <= last, "device {device}: {b} > {last}");
        last = b;
    }
    let mut last = f64::INFINITY;
    for handoff in [0.0, 1e-5, 1e-4, 1e-3, 1e-2] {
        let b = bytes(Rates { handoff, ..H200 });
        assert!(b <= last, "handoff {handoff}: {b} > {last}");
        last = b;
    }
}

#[test]
fn no_split_where_it_does_not_pay() {
    // No CPU rate.
    let l = layer(131_072, 0, 1024, &[Some(0); 8]);
    assert_eq!(balance(&Rates { cpu: 0.0, ..H200 }, &l, 16), None);
    // Too few host bytes to repay the hand-off: 8 heads x 512 tokens = 2 MiB, 41 us on PCIe.
    let l = layer(1024, 0, 256, &[Some(512); 8]);
    assert_eq!(balance(&H200, &l, 16), None);
    // ... which a free hand-off would split.
    assert!(balance(
        &Rates {
            handoff: 0.0,
            ..H200
        },
        &l,
        16
    )
    .is_some());
    // No host blocks at all, however long.
    let l = layer(131_072, 0, 1024, &[Some(131_072); 8]);
    assert_eq!(balance(&H200, &l, 16), None);
    // Host blocks only in heads the kernel cannot leave a tail.
    let l = layer(131_072, 0, 1024, &[None; 8]);
    assert_eq!(balance(&H200, &l, 16), None);
    // The target is below half the smallest block: nothing to take.
    let l = layer(1 << 20, 0, 1 << 20, &[Some(0); 1]);
    assert_eq!(balance(&Rates { cpu: 1e6, ..H200 }, &l, 16), None);
    // No heads; no blocks.
    assert_eq!(balance(&H200, &layer(100, 0, 256, &[]), 16), None);
    assert_eq!(balance(&H200, &layer(0, 0, 256, &[Some(0); 8]), 16), None);
}

#[test]
fn a_fast_cpu_takes_every_shareable_block_and_no_more() {
    let r = Rates {
        cpu: 1e15,
        handoff: 0.0,
        ..H200
    };
    let tails = [Some(0), Some(4096), Some(10_000 - 10_000 % 512), None];
    let l = layer(10_000, 0, 512, &tails);
    let e = balance(&r, &l, 16).unwrap();
    check_split(&r, &l, 16, &e);
    assert_eq!(e.split.from, vec![0, 4096, 9728, 10_000]);
    // Only the first `max_heads` heads are candidates; the rest stay on the GPU.
    let l = layer(10_000, 0, 512, &[Some(0); 20]);
    let e = balance(&r, &l, 16).unwrap();
    check_split(&r, &l, 16, &e);
    assert_eq!(e.split.from, vec![0; 16]);
    let e = balance(&r, &l, 3).unwrap();
    assert_eq!(e.split.from, vec![0; 3]);
}

#[test]
fn any_single_head_can_be_the_one_shared() {
    for h in 0..8 {
        let mut tails = [Some(65_536); 8];
        tails[h] = Some(0);
        let l = layer(65_536, 0, 1024, &tails);
        let e = balance(&H200, &l, 16).expect("one head's 32 MiB of host KV pays");
        check_split(&H200, &l, 16, &e);
        for (i, &f) in e.split.from.iter().enumerate() {
            assert_eq!(f < 65_536, i == h, "head {i}: {f}");
        }
    }
}

#[test]
fn heads_with_device_blocks_after_host_ones_stay_on_the_gpu() {
    let tails = [Some(0), None, Some(2048), None];
    let l = layer(131_072, 0, 1024, &tails);
    let e = balance(&H200, &l, 16).unwrap();
    check_split(&H200, &l, 16, &e);
    assert_eq!(e.split.from[1], 131_072);
    assert_eq!(e.split.from[3], 131_072);
    assert!(e.split.from[0] < 131_072 && e.split.from[2] < 131_072);
}

#[test]
fn uneven_blocks_a_dropped_prefix_and_a_window() {
    // A partial last block, a layer whose first 3000 positions were dropped (start mid-way
    // through nothing: blocks count from `start`), and a window starting inside a block.
    let (len, start, bs) = (100_003, 3000, 1000);
    for lo in [start, 50_500, 99_999] {
        let tails = [
            Some(start),
            Some(start + 7000),
            Some(start + 40_000),
            Some(len),
        ];
        let l = layer_lo(len, start, lo, bs, &tails);
        for r in [
            H200,
            Rates {
                handoff: 0.0,
                ..H200
            },
        ] {
            if let Some(e) = balance(&r, &l, 16) {
                check_split(&r, &l, 16, &e);
                assert_eq!(e.split.from[3], len);
                let block = (bs * TB) as f64;
                let all: f64 = cpu_bytes(&l, &[start, start + 7000, start + 40_000, len]);
                let want = target(&r, &l).min(all);
                assert!(
                    (e.cpu_bytes - want).abs() <= block / 2.0 + 1.0,
                    "lo {lo}: {e:?}"
                );
            } else {
                assert!(target(&r, &l) < (bs * TB) as f64, "lo {lo}: no split");
            }
        }
    }
    // A tail that is not a block boundary (cannot happen in a store) is not shared.
    let l = layer(10_000, 0, 1000, &[Some(500)]);
    assert_eq!(
        balance(
            &Rates {
                handoff: 0.0,
                ..H200
            },
            &l,
            16
        ),
        None
    );
}

#[test]
fn rates_are_checked() {
    assert!(H200.check().is_ok());
    assert!(Rates {
        cpu: 0.0,
        handoff: 0.0,
        ..H200
    }
    .check()
    .is_ok());
    for bad in [
        Rates { pcie: 0.0, ..H200 },
        Rates {
            device: -1.0,
            ..H200
        },
        Rates {
            cpu: f64::NAN,
            ..H200
        },
        Rates {
            handoff: f64::INFINITY,
            ..H200
        },
        Rates { cpu: -1.0, ..H200 },
    ] {
        let e = bad.check().unwrap_err().to_string();
        assert!(e.starts_with("rates: "), "{e}");
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
fn default_is_off_on_the_global_pool() {
    let p = SharePolicy::default();
    assert_eq!(p.cpu_heads, 0);
    assert_eq!(p.rates, None);
    assert_eq!(p.min_host_tokens, MIN_HOST_TOKENS);
    assert!(p.pool.is_none());
    assert_eq!(p.threads(), rayon::current_num_threads());
}

#[test]
fn a_pool_of_its_own() {
    let mut p = SharePolicy::default();
    p.set_threads(3).unwrap();
    assert_eq!(p.threads(), 3);
    let names: Vec<String> = p
        .pool
        .as_ref()
        .unwrap()
        .broadcast(|_| std::thread::current().name().unwrap_or("").to_string());
    assert!(
        names.iter().all(|n| n.starts_with("headinfer-share-")),
        "{names:?}"
    );
    p.set_threads(0).unwrap();
    assert!(p.pool.is_none());
}

#[test]
fn the_reader_is_the_faster_measured_one_and_the_copy_engine_unmeasured() {
    assert_eq!(choose_reader(None), HostReader::CopyEngine);
    // Copy engine not measured: the copy engine (never slower on the hosts measured).
    assert_eq!(choose_reader(Some(&H200)), HostReader::CopyEngine);
    let slow_zero_copy = Rates {
        pcie: 34.5e9,
        copy: 54.9e9,
        ..H200
    };
    assert_eq!(choose_reader(Some(&slow_zero_copy)), HostReader::CopyEngine);
    let fast_zero_copy = Rates {
        pcie: 56e9,
        copy: 54.9e9,
        ..H200
    };
    assert_eq!(choose_reader(Some(&fast_zero_copy)), HostReader::ZeroCopy);
    // The rate the balance uses follows the reader.
    assert_eq!(slow_zero_copy.host_rate(HostReader::CopyEngine), 54.9e9);
    assert_eq!(slow_zero_copy.host_rate(HostReader::ZeroCopy), 34.5e9);
    assert_eq!(H200.host_rate(HostReader::CopyEngine), H200.pcie);
    // A fixed choice wins over the rates.
    let mut p = SharePolicy {
        rates: Some(fast_zero_copy),
        ..SharePolicy::default()
    };
    assert_eq!(p.host_reader(), HostReader::ZeroCopy);
    p.reader = ReaderChoice::parse("copy").unwrap();
    assert_eq!(p.host_reader(), HostReader::CopyEngine);
    assert_eq!(p.reader.name(), "copy");
    assert!(ReaderChoice::parse("fast").is_err());
    // A slower CPU share against the faster reader: the CPU gets fewer bytes.
    let l = layer(131_072, 0, 4096, &[Some(0); 8]);
    let zc = balance(&slow_zero_copy, &l, 16).unwrap();
    let ce = balance(
        &Rates {
            pcie: slow_zero_copy.host_rate(HostReader::CopyEngine),
            ..slow_zero_copy
        },
        &l,
        16,
    )
    .unwrap();
    assert!(ce.cpu_bytes < zc.cpu_bytes, "{ce:?} vs {zc:?}");
}

#[test]
fn stores_share_one_pool_per_thread_count() {
    // A pool per store spawned and joined its threads once per `generate()` call.
    let (mut a, mut b, mut c) = (
        SharePolicy::default(),
        SharePolicy::default(),
        SharePolicy::default(),
    );
    a.set_threads(2).unwrap();
    b.set_threads(2).unwrap();
    c.set_threads(5).unwrap();
    let (pa, pb, pc) = (a.pool.unwrap(), b.pool.unwrap(), c.pool.unwrap());
    assert!(Arc::ptr_eq(&pa, &pb));
    assert!(!Arc::ptr_eq(&pa, &pc));
    assert_eq!(pc.current_num_threads(), 5);
    // Threads stay: a pool dropped by every store is the same pool the next store gets.
    let first = Arc::as_ptr(&pa);
    drop((pa, pb));
    let mut d = SharePolicy::default();
    d.set_threads(2).unwrap();
    assert_eq!(Arc::as_ptr(d.pool.as_ref().unwrap()), first);
}

/// Records a task of `bytes` over `seconds` on `m`, starting `gap` seconds after the last one
/// ended (`at`: where that was; returns where this one ends).
fn task(m: &CpuMeter, at: Instant, gap: f64, bytes: f64, seconds: f64) -> Instant {
    let start = at + Duration::from_secs_f64(gap);
    let end = start + Duration::from_secs_f64(seconds);
    m.record(0, bytes, start, end);
    end
}

#[test]
fn the_meter_rates_its_tasks_the_latest_weighing_most() {
    let m = CpuMeter::default();
    assert_eq!((m.rate(), m.tasks()), (None, 0));
    let mut at = Instant::now();
    // Nothing measured is not a task of the rate.
    at = task(&m, at, 0.0, 0.0, 1.0);
    at = task(&m, at, 0.0, 1.0, 0.0);
    at = task(&m, at, 0.0, f64::NAN, 1.0);
    assert_eq!(m.tasks(), 0);
    at = task(&m, at, 0.0, 10e9, 1.0);
    assert!((m.rate().unwrap() - 10e9).abs() < 1.0);
    // A slower machine now: the rate follows, the recent tasks weighing most.
    for _ in 0..200 {
        at = task(&m, at, 0.0, 5e9, 1.0);
    }
    let r = m.rate().unwrap();
    assert!(r < 5.2e9 && r > 5e9, "{r}");
    assert_eq!(m.tasks(), 201);
}

#[test]
fn the_meter_sums_where_the_shared_steps_spent_their_time() {
    let m = CpuMeter::default();
    assert_eq!(m.timeline(), Timeline::default());
    // Three tasks: busy 3 x 10 ms; idle 2 ms and 5 ms between them; a gap beyond
    // `IDLE_LIMIT` (between two calls, not within a decode) is not idling.
    let mut at = task(&m, Instant::now(), 0.0, 1e6, 0.010);
    at = task(&m, at, 0.002, 1e6, 0.010);
    at = task(&m, at, 0.005, 1e6, 0.010);
    task(&m, at, IDLE_LIMIT.as_secs_f64() + 1.0, 1e6, 0.010);
    // The GPU's side of two steps; nonsense is not a step.
    m.gpu_step(0, 0.020, 0.001);
    m.gpu_step(0, 0.018, 0.0);
    m.gpu_step(0, f64::NAN, 0.0);
    let t = m.timeline();
    assert_eq!((t.cpu_tasks, t.gpu_steps), (4, 2));
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(t.cpu_busy, 0.040), "{t:?}");
    assert!(close(t.cpu_idle, 0.007), "{t:?}");
    assert!(
        close(t.gpu_own, 0.038) && close(t.gpu_waited, 0.001),
        "{t:?}"
    );
    // Steps read, and those the GPU waited in.
    assert_eq!(m.steps(), (2, 1));
}

/// A policy balancing by probed rates: PCIe 50 GB/s, the CPU's `cpu`, HBM 2 TB/s, a 50 us
/// hand-off.
fn rated(cpu: f64) -> (Rates, SharePolicy) {
    let probe = Rates {
        pcie: 50e9,
        cpu,
        device: 2e12,
        handoff: 50e-6,
        copy: 0.0,
    };
    let p = SharePolicy {
        rates: Some(probe),
        ..SharePolicy::default()
    };
    (probe, p)
}

#[test]
fn each_layer_balances_by_the_rates_its_own_steps_showed() {
    let (probe, p) = rated(40e9);
    assert_eq!(
        p.layer_rates(3),
        Some(probe),
        "the probe's until a step was read"
    );
    // Layer 3's step: the CPU read 1 GB in 50 ms (20 GB/s); the GPU, planned 2 GB of host
    // blocks and 10 ms of device blocks, took 110 ms of its own (20 GB/s).
    let at = Instant::now();
    p.meter.record(3, 1e9, at, at + Duration::from_millis(50));
    p.meter.planned(3, 2e9, 0.010);
    p.meter.gpu_step(3, 0.110, 0.0);
    let r = p.layer_rates(3).unwrap();
    assert!(
        (r.cpu - 20e9).abs() < 1e3 && (r.pcie - 20e9).abs() < 1e3,
        "{r:?}"
    );
    assert_eq!((r.device, r.handoff), (probe.device, probe.handoff));
    // Other layers keep the probe's; the policy's clones share the meter (the store clones
    // its policy per call).
    assert_eq!(p.layer_rates(2), Some(probe));
    assert_eq!(p.clone().layer_rates(3), Some(r));
    // A step is read once: no plan, no GPU rate (the timeline still counts it).
    p.meter.gpu_step(3, 1.0, 0.0);
    assert_eq!(p.layer_rates(3).unwrap().pcie, r.pcie);
    assert_eq!(p.meter.steps(), (2, 0));
    // Later steps weigh `STEP_WEIGHT`, and one step moves a rate by at most `STEP_FACTOR`.
    p.meter.record(3, 1e9, at, at + Duration::from_millis(25)); // 40 GB/s
    let cpu = p.layer_rates(3).unwrap().cpu;
    assert!((cpu - (20e9 + STEP_WEIGHT * 20e9)).abs() < 1e3, "{cpu}");
    p.meter.record(3, 1e9, at, at + Duration::from_micros(1)); // an outlier
    let capped = p.layer_rates(3).unwrap().cpu;
    assert!((capped - (cpu + STEP_WEIGHT * cpu)).abs() < 1e3, "{capped}");
    // A step whose own part was all device blocks measures nothing.
    p.meter.planned(3, 1e9, 0.2);
    p.meter.gpu_step(3, 0.1, 0.0);
    assert_eq!(p.layer_rates(3).unwrap().pcie, r.pcie);
    // Bounded by `PROBE_RANGE` of the probe's.
    for _ in 0..100 {
        p.meter.record(5, 1e3, at, at + Duration::from_secs(1));
    }
    assert_eq!(p.layer_rates(5).unwrap().cpu, probe.cpu * PROBE_RANGE.0);
    // Off: the probe's; no rates: none.
    let mut off = p.clone();
    off.calibrate = false;
    assert_eq!(off.layer_rates(3), Some(probe));
    off.rates = None;
    assert_eq!(off.layer_rates(3), None);
}

#[test]
fn a_layer_that_shows_a_slow_side_gives_it_less() {
    let (probe, p) = rated(50e9);
    // 65,536 tokens of 8 heads, the first 1,024 of each on the device.
    let l = layer(65536, 0, 256, &[Some(1024); 8]);
    let cpu_bytes = |layer: usize| {
        balance(&p.layer_rates(layer).unwrap(), &l, 8)
            .map(|e| e.cpu_bytes)
            .unwrap()
    };
    let even = cpu_bytes(0);
    // Layer 0: a step in which the GPU's side ran at half its probe's rate.
    let e = balance(&p.layer_rates(0).unwrap(), &l, 8).unwrap();
    p.meter.planned(0, e.gpu_host_bytes, e.device_seconds);
    let own = e.device_seconds + e.gpu_host_bytes / (probe.pcie / 2.0);
    p.meter.gpu_step(0, own, 0.0);
    assert!((p.layer_rates(0).unwrap().pcie - probe.pcie / 2.0).abs() < 1e3);
    assert!(cpu_bytes(0) > even * 1.2, "the CPU takes more of layer 0");
    // Layer 1: a step in which the CPU ran at half.
    let at = Instant::now();
    p.meter.record(
        1,
        1e9,
        at,
        at + Duration::from_secs_f64(1e9 / (probe.cpu / 2.0)),
    );
    assert!(cpu_bytes(1) < even * 0.8, "the CPU takes less of layer 1");
    assert_eq!(cpu_bytes(2), even);
}
