//! The CPU attention's decode rate per instruction set: one decode step (one query per q
//! head) of one layer over `tokens` keys, Llama-3-8B's shape (8 kv heads, GQA group 4,
//! head_dim 128), in bf16 and f16, and over a CPU store of the int8 format (bf16 queries),
//! with rayon's default pool (one thread per core; `RAYON_NUM_THREADS` sets it). The rate is
//! the stored KV bytes read (keys + values) per second of the whole call, merge included.
//!
//!     cargo bench --bench bench_cpu_attend -- [tokens=131072] [iters=10] [scalar,avx2,avx512]
//!
//! Prints one line per (dtype, instruction set): median and best seconds per call, GB/s.

use half::{bf16, f16};
use headinfer::attention::args::Params;
use headinfer::attention::cpu::attend_lse_on;
use headinfer::attention::cpu::DenseKv;
use headinfer::cpu::simd::Isa;
use headinfer::quant::KvFormat;
use headinfer::store::view::KvSource;
use headinfer::store::{CpuStore, StoreConfig};
use headinfer::tensor::{Element, View3};
use std::time::Instant;

const KV_HEADS: usize = 8;
const GROUP: usize = 4;
const HEAD_DIM: usize = 128;

/// Deterministic values in [-2, 2), rounded to `E`.
fn fill<E: Element>(n: usize, seed: u64) -> Vec<E> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let u = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            E::from_f32(4.0 * u - 2.0)
        })
        .collect()
}

fn run<E: Element>(tokens: usize, iters: usize, isas: &[Isa]) {
    let k = fill::<E>(KV_HEADS * tokens * HEAD_DIM, 1);
    let v = fill::<E>(KV_HEADS * tokens * HEAD_DIM, 2);
    let q = fill::<E>(KV_HEADS * GROUP * HEAD_DIM, 3);
    let kv = DenseKv::new(
        View3::contiguous(&k, [KV_HEADS, tokens, HEAD_DIM]),
        View3::contiguous(&v, [KV_HEADS, tokens, HEAD_DIM]),
    )
    .expect("shapes");
    let bytes = 2.0 * (k.len() * std::mem::size_of::<E>()) as f64;
    time(E::DTYPE.name(), &q, &kv, bytes, iters, isas);
}

/// Over a CPU store of the int8 format (blocks of 256 tokens, as `KVStore`'s default),
/// quantized from bf16 keys and values, with bf16 queries.
fn run_int8(tokens: usize, iters: usize, isas: &[Isa]) {
    let k = fill::<bf16>(KV_HEADS * tokens * HEAD_DIM, 1);
    let v = fill::<bf16>(KV_HEADS * tokens * HEAD_DIM, 2);
    let q = fill::<bf16>(KV_HEADS * GROUP * HEAD_DIM, 3);
    let mut store = CpuStore::new(StoreConfig {
        num_layers: 1,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        dtype: bf16::DTYPE,
        kv: KvFormat::Int8,
        block_size: 256,
        windows: vec![None],
        host_memory_limit: None,
    })
    .expect("store");
    store
        .append(
            0,
            View3::contiguous(&k, [KV_HEADS, tokens, HEAD_DIM]),
            View3::contiguous(&v, [KV_HEADS, tokens, HEAD_DIM]),
        )
        .expect("append");
    drop((k, v));
    let row = KvFormat::Int8.row_bytes(HEAD_DIM, bf16::DTYPE);
    let bytes = 2.0 * (KV_HEADS * tokens * row) as f64;
    let layer = store.view::<bf16>(0).expect("view");
    time("int8", &q, &layer, bytes, iters, isas);
}

/// Times `attend_lse_on` per instruction set over `kv` (`bytes` stored), each result checked
/// against the first.
fn time<E: Element, S: KvSource<E>>(
    what: &str,
    q: &[E],
    kv: &S,
    bytes: f64,
    iters: usize,
    isas: &[Isa],
) {
    let qv = View3::contiguous(q, [KV_HEADS * GROUP, 1, HEAD_DIM]);
    let params = Params {
        scale: 1.0 / (HEAD_DIM as f32).sqrt(),
        softcap: None,
        window: None,
    };
    let mut first: Option<Vec<f32>> = None;
    for &isa in isas {
        let mut times = Vec::with_capacity(iters);
        for i in 0..iters + 2 {
            let t0 = Instant::now();
            let (out, _) = attend_lse_on(isa, qv, kv, &params, None).expect("attend");
            let dt = t0.elapsed().as_secs_f64();
            // Two warm-up calls (page faults, scratch); every result checked against the first.
            if i >= 2 {
                times.push(dt);
            }
            match &first {
                None => first = Some(out),
                Some(f) => {
                    let scale = f.iter().fold(0f32, |a, b| a.max(b.abs()));
                    let err = out
                        .iter()
                        .zip(f)
                        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                    assert!(err <= 1e-5 * scale, "{isa:?} differs: {err}");
                }
            }
        }
        times.sort_by(f64::total_cmp);
        let (med, best) = (times[times.len() / 2], times[0]);
        println!(
            "{:>5} {:>7} tokens={} median {:.2} ms ({:.1} GB/s)  best {:.2} ms ({:.1} GB/s)",
            what,
            isa.name(),
            kv.len(),
            med * 1e3,
            bytes / med / 1e9,
            best * 1e3,
            bytes / best / 1e9,
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; the numbers are the positional arguments.
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let tokens = nums.first().copied().unwrap_or(131_072);
    // The sets to run (default: every one this CPU supports).
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.chars().next().is_some_and(|c| c.is_ascii_alphabetic()))
        .flat_map(|a| a.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let isas: Vec<Isa> = Isa::ALL
        .into_iter()
        .filter(|i| i.supported() && (named.is_empty() || named.iter().any(|n| n == i.name())))
        .collect();
    let iters = nums.get(1).copied().unwrap_or(10).max(1);
    println!(
        "CPU decode attend: {KV_HEADS} kv heads x {GROUP} q per kv x head_dim {HEAD_DIM}, \
         {} threads, best set {:?}",
        rayon::current_num_threads(),
        Isa::best()
    );
    run::<bf16>(tokens, iters, &isas);
    run::<f16>(tokens, iters, &isas);
    run_int8(tokens, iters, &isas);
}
