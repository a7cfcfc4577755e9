//! Who attends where in a decode step of a CUDA store: the policy beside its mechanism
//! (`shared`).
//!
//! The GPU kernel reads host-resident blocks over PCIe; the host's cores can read the same
//! pinned memory at the same time. The policy picks, per layer and step, which keys the CPU
//! takes. Two ways:
//! - `cpu_heads = n` (an override): kv heads `0..n` from their first host block on, once the
//!   host part is long enough to repay the hand-off;
//! - measured `Rates` (the default where the planner turns the share on): per head a range of
//!   host blocks cut so that the CPU and the GPU finish together (`balance`).
//!
//! Either way the output (`Split`) is per kv head `0..k` the first key the CPU takes (`len`:
//! none), so the GPU kernel reads everything before it and the CPU everything after.

use crate::cuda::kernels::MAX_CPU_HEADS;
use crate::error::{Error, Result};
use crate::store::DeviceLayer;
use crate::store::LayerPlacement;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The CPU share's thread pools, by thread count (`SharePolicy::set_threads`).
static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();

fn shared_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>> {
    let mut pools = POOLS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .expect("pools");
    if let Some(p) = pools.get(&threads) {
        return Ok(p.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("headinfer-share-{i}"))
        .build()
        .map_err(|e| Error::value("share_threads", format!("no thread pool: {e}")))?;
    let pool = Arc::new(pool);
    pools.insert(threads, pool.clone());
    Ok(pool)
}

/// Below this many host tokens in a head, the hand-off costs more than the CPU saves (the
/// `cpu_heads` override only; measured rates decide for themselves).
pub const MIN_HOST_TOKENS: usize = 8192;

/// The CPU's part of one decode step: for kv heads `0..from.len()`, the keys `from[h]..len`
/// (`from[h] == len`: none of that head).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub from: Vec<usize>,
}

/// Measured rates of one machine (for one dtype and head size), all in bytes of keys and
/// values read per second, and the fixed cost of a shared step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// The GPU kernel reading host blocks (mapped pinned memory, over PCIe: zero-copy).
    pub pcie: f64,
    /// The CPU share's workers reading and attending over pinned blocks (0: no CPU share).
    pub cpu: f64,
    /// The GPU kernel reading device-resident blocks.
    pub device: f64,
    /// Seconds a shared step adds whatever its size: the query's copy to the host, waking the
    /// worker and its threads, the stream's wait for the rows.
    pub handoff: f64,
    /// The copy engine staging host blocks into device memory while the kernel attends over
    /// the previous piece (0: not measured).
    pub copy: f64,
}

/// How the GPU reads a layer's host blocks in decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostReader {
    /// The kernel reads mapped pinned memory directly, over PCIe.
    ZeroCopy,
    /// The copy engine stages blocks into device buffers (`attention::staged`).
    CopyEngine,
}

/// The store's setting for `HostReader`: fixed, or the faster by measured rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReaderChoice {
    Auto,
    Fixed(HostReader),
}

impl ReaderChoice {
    /// `"auto"`, `"copy"` or `"zero-copy"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(ReaderChoice::Auto),
            "copy" => Ok(ReaderChoice::Fixed(HostReader::CopyEngine)),
            "zero-copy" => Ok(ReaderChoice::Fixed(HostReader::ZeroCopy)),
            _ => Err(Error::value(
                "host_reader",
                format!("must be 'auto', 'copy' or 'zero-copy', got {s:?}"),
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ReaderChoice::Auto => "auto",
            ReaderChoice::Fixed(HostReader::CopyEngine) => "copy",
            ReaderChoice::Fixed(HostReader::ZeroCopy) => "zero-copy",
        }
    }
}

/// The faster reader by `rates` (the copy engine where nothing was measured: on every host
/// measured it moves at least as much as zero-copy reads, and on some far more).
pub fn choose_reader(rates: Option<&Rates>) -> HostReader {
    match rates {
        Some(r) if r.copy > 0.0 && r.pcie > r.copy => HostReader::ZeroCopy,
        _ => HostReader::CopyEngine,
    }
}

impl Rates {
    /// From `(pcie, cpu, device, handoff[, copy])`, as Python passes them (`arg` names the
    /// argument in errors); checked.
    pub fn from_slice(arg: &str, v: &[f64]) -> Result<Self> {
        let r = match *v {
            [pcie, cpu, device, handoff] => Rates {
                pcie,
                cpu,
                device,
                handoff,
                copy: 0.0,
            },
            [pcie, cpu, device, handoff, copy] => Rates {
                pcie,
                cpu,
                device,
                handoff,
                copy,
            },
            _ => {
                return Err(Error::value(
                    arg,
                    format!(
                        "expected (pcie, cpu, device, handoff[, copy]), got {} numbers",
                        v.len()
                    ),
                ))
            }
        };
        r.check().map_err(|e| match e {
            Error::Value { msg, .. } => Error::value(arg, msg),
            other => other,
        })?;
        Ok(r)
    }

    /// `(pcie, cpu, device, handoff, copy)`.
    pub fn to_tuple(&self) -> (f64, f64, f64, f64, f64) {
        (self.pcie, self.cpu, self.device, self.handoff, self.copy)
    }

    /// The rate at which `reader` moves host blocks (zero-copy's where the copy engine was
    /// not measured).
    pub fn host_rate(&self, reader: HostReader) -> f64 {
        match reader {
            HostReader::CopyEngine if self.copy > 0.0 => self.copy,
            _ => self.pcie,
        }
    }

    /// Checks the figures: finite, the GPU's positive, the CPU's, the copy engine's and the
    /// hand-off at least 0.
    pub fn check(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        for (name, v, positive) in [
            ("pcie", self.pcie, true),
            ("cpu", self.cpu, false),
            ("device", self.device, true),
            ("handoff", self.handoff, false),
            ("copy", self.copy, false),
        ] {
            if !ok(v) || (positive && v <= 0.0) {
                return Err(Error::value(
                    "rates",
                    format!(
                        "{name} must be a finite number {} 0, got {v}",
                        if positive { ">" } else { ">=" }
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What `balance` chose, and the times it expects (seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct ShareEstimate {
    pub split: Split,
    /// Bytes of keys and values the CPU reads.
    pub cpu_bytes: f64,
    /// Host bytes the GPU reads with the split, and the seconds of its device blocks.
    pub gpu_host_bytes: f64,
    pub device_seconds: f64,
    /// The GPU's part with the split, the CPU's (hand-off included), and the GPU alone.
    pub gpu_seconds: f64,
    pub cpu_seconds: f64,
    pub alone_seconds: f64,
}

/// The split of one layer's decode step that makes the CPU and the GPU finish together, from
/// measured `rates`; `None` where splitting does not pay (no CPU rate, too few host bytes to
/// repay the hand-off, no head with a host tail among the first `max_heads`).
///
/// The GPU alone takes `device_bytes / device + host_bytes / pcie`; moving `x` host bytes to
/// the CPU makes that `- x / pcie` and gives the CPU `handoff + x / cpu`; both equal at
/// `x* = (alone - handoff) / (1/pcie + 1/cpu)`. The CPU's bytes are taken in whole blocks
/// from the end of each head's host part, round-robin over the heads (the k-th block from the
/// end of every head before any (k+1)-th), so each head's share is a suffix and the heads'
/// shares stay even; the total lands within half a block of `x*` (unless every shareable
/// block is taken). `from.len()` is always `min(heads, max_heads)` so that the hand-off's
/// buffers keep one size for the store.
pub fn balance(rates: &Rates, layer: &LayerPlacement, max_heads: usize) -> Option<ShareEstimate> {
    if rates.cpu <= 0.0 || rates.pcie <= 0.0 || rates.device <= 0.0 || layer.block_size == 0 {
        return None;
    }
    let tb = layer.token_bytes as f64;
    let (dev, host): (usize, usize) = layer
        .heads
        .iter()
        .fold((0, 0), |(d, h), p| (d + p.device_tokens, h + p.host_tokens));
    let device_seconds = dev as f64 * tb / rates.device;
    let alone = device_seconds + host as f64 * tb / rates.pcie;
    let target = (alone - rates.handoff) / (1.0 / rates.pcie + 1.0 / rates.cpu);
    if target <= 0.0 {
        return None;
    }
    let n = layer.heads.len().min(max_heads);
    let (len, lo, bs) = (layer.len, layer.lo, layer.block_size);
    // Per shareable head, its block boundaries from the tail on (visible part only).
    let bounds = |h: usize| -> Vec<usize> {
        match layer.heads[h].tail {
            Some(t) if t < len && t >= layer.start && (t - layer.start).is_multiple_of(bs) => {
                // The first block that holds a visible key: blocks wholly below `lo` cost
                // nobody anything.
                let first = if lo > t { t + (lo - t) / bs * bs } else { t };
                (first..len).step_by(bs).collect()
            }
            _ => Vec::new(),
        }
    };
    let starts: Vec<Vec<usize>> = (0..n).map(bounds).collect();
    let mut from = vec![len; n];
    let mut taken = 0usize; // visible tokens given to the CPU
    let deepest = starts.iter().map(Vec::len).max().unwrap_or(0);
    'fill: for k in 0..deepest {
        for (h, s) in starts.iter().enumerate() {
            if k >= s.len() {
                continue;
            }
            let a = s[s.len() - 1 - k];
            let tokens = from[h].saturating_sub(a.max(lo));
            // Take the block if that lands nearer the target than stopping before it.
            if (taken as f64 + tokens as f64 / 2.0) * tb > target {
                break 'fill;
            }
            taken += tokens;
            from[h] = a;
        }
    }
    if taken == 0 {
        return None;
    }
    let cpu_bytes = taken as f64 * tb;
    let gpu_seconds = alone - cpu_bytes / rates.pcie;
    let cpu_seconds = rates.handoff + cpu_bytes / rates.cpu;
    if gpu_seconds.max(cpu_seconds) >= alone {
        return None;
    }
    Some(ShareEstimate {
        split: Split { from },
        cpu_bytes,
        gpu_host_bytes: host as f64 * tb - cpu_bytes,
        device_seconds,
        gpu_seconds,
        cpu_seconds,
        alone_seconds: alone,
    })
}

/// Seconds the GPU may wait for the CPU's rows and still count as the side that finished last
/// (the stream's wait and the timing events take a few microseconds themselves).
pub const WAIT_EPS: f64 = 20e-6;
/// A layer step's weight in that layer's rates (the rest is its earlier steps').
pub const STEP_WEIGHT: f64 = 0.5;
/// The most one step moves a layer's rate, as a factor either way: a step that something
/// else slowed (another process, the OS) does not swing the next split.
pub const STEP_FACTOR: f64 = 2.0;
/// The bounds of a layer's measured rates, as factors on the probe's.
pub const PROBE_RANGE: (f64, f64) = (1.0 / 8.0, 8.0);
/// Each earlier task's weight in the reported rate, per task since.
pub const METER_DECAY: f64 = 0.98;

/// The CPU share as a store's own steps find it. The probes time each side alone, over
/// buffers of their own; in a step, the share reads the store's pinned blocks beside the
/// GPU's copies and the thread that drives the GPU, and the GPU's side has costs of its own
/// per layer (on the H200 host the tasks computed at 62 GB/s where the probe said 90, and the
/// GPU's side fell short of its probe too). So each layer's split balances by the rates that
/// layer's own steps showed, both sides': the CPU's bytes over its task's seconds (`record`),
/// the GPU's host bytes over its own part's seconds less its device blocks' (`planned`, then
/// `gpu_step`).
///
/// Rates, not a nudge toward the side that finished first: a split is made a token after the
/// step it learns from (the caller queues a whole token ahead of the stream), so one factor
/// nudged 3 % per layer step took its 32 nudges a token all from the token before, swung
/// past the balance and back within each token, and the two sides waited for each other a
/// quarter of every step (exact and int8, 262,144 to 1,048,576 tokens, BENCHMARKS.md).
///
/// It also sums where the steps spent their time, both sides (`timeline`).
#[derive(Debug)]
pub struct CpuMeter {
    state: Mutex<MeterState>,
}

#[derive(Debug)]
struct MeterState {
    /// Bytes and seconds of the share's tasks (decayed by `METER_DECAY` a task), and tasks.
    bytes: f64,
    seconds: f64,
    tasks: usize,
    /// Shared steps read by `gpu_step`, and those in which the GPU waited.
    steps: usize,
    waited: usize,
    timeline: Timeline,
    /// When the last task ended (the CPU idles from then until the next one computes).
    last_end: Option<Instant>,
    /// Per layer.
    layers: Vec<LayerRates>,
}

impl MeterState {
    fn layer(&mut self, layer: usize) -> &mut LayerRates {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, LayerRates::default());
        }
        &mut self.layers[layer]
    }
}

/// What one layer's own shared steps showed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerRates {
    /// Bytes per second of the CPU's tasks and of the GPU's host part (`STEP_WEIGHT` on the
    /// latest step; `None`: not measured yet).
    pub cpu: Option<f64>,
    pub gpu: Option<f64>,
    /// The GPU's part of the step split last, until that step is read: its host bytes, and
    /// its device blocks' seconds at the probe's rate.
    planned: Option<(f64, f64)>,
}

/// `old` moved toward one step's `rate` (`STEP_WEIGHT`, at most `STEP_FACTOR`); a rate that
/// is not a positive number measures nothing.
fn smooth(old: Option<f64>, rate: f64) -> Option<f64> {
    if !(rate.is_finite() && rate > 0.0) {
        return old;
    }
    Some(match old {
        Some(o) => o + STEP_WEIGHT * (rate.clamp(o / STEP_FACTOR, o * STEP_FACTOR) - o),
        None => rate,
    })
}

/// Where a store's shared decode steps spent their time, summed over its layers' steps
/// (seconds): what separates a step from the balance's ideal, where both sides compute all
/// along. Undecayed, since the first step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timeline {
    /// Layer steps the GPU's side was read from (`CpuMeter::gpu_step`).
    pub gpu_steps: usize,
    /// The GPU's own part of each step (its start to its kernels and staged pieces done).
    pub gpu_own: f64,
    /// The GPU then waiting for the CPU's rows.
    pub gpu_waited: f64,
    /// The CPU's tasks (`CpuMeter::record`).
    pub cpu_tasks: usize,
    /// The tasks computing.
    pub cpu_busy: f64,
    /// The CPU between one task's end and the next one's start (waiting for its query), where
    /// shorter than `IDLE_LIMIT` (longer: between calls, not within a decode).
    pub cpu_idle: f64,
}

/// A gap between two tasks longer than this is not counted as the CPU idling in a decode.
pub const IDLE_LIMIT: Duration = Duration::from_secs(1);

impl Default for CpuMeter {
    fn default() -> Self {
        CpuMeter {
            state: Mutex::new(MeterState {
                bytes: 0.0,
                seconds: 0.0,
                tasks: 0,
                steps: 0,
                waited: 0,
                timeline: Timeline::default(),
                last_end: None,
                layers: Vec::new(),
            }),
        }
    }
}

impl CpuMeter {
    fn state(&self) -> std::sync::MutexGuard<'_, MeterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one task of `layer`: `bytes` of keys and values read from `start` to `end`.
    pub fn record(&self, layer: usize, bytes: f64, start: Instant, end: Instant) {
        let seconds = end.saturating_duration_since(start).as_secs_f64();
        let mut s = self.state();
        if let Some(gap) = s.last_end.map(|e| start.saturating_duration_since(e)) {
            if gap < IDLE_LIMIT {
                s.timeline.cpu_idle += gap.as_secs_f64();
            }
        }
        s.last_end = Some(end);
        s.timeline.cpu_tasks += 1;
        s.timeline.cpu_busy += seconds;
        if !(bytes > 0.0 && seconds > 0.0 && bytes.is_finite()) {
            return;
        }
        s.bytes = s.bytes * METER_DECAY + bytes;
        s.seconds = s.seconds * METER_DECAY + seconds;
        s.tasks += 1;
        let l = s.layer(layer);
        l.cpu = smooth(l.cpu, bytes / seconds);
    }

    /// Notes the GPU's part of `layer`'s shared step about to be queued: `host_bytes` read
    /// from host blocks, and `device_seconds` over device blocks (`gpu_step` reads it back).
    pub fn planned(&self, layer: usize, host_bytes: f64, device_seconds: f64) {
        self.state().layer(layer).planned = Some((host_bytes, device_seconds));
    }

    /// Records how `layer`'s last shared step went on the GPU: `own` seconds of its own part,
    /// then `waited` for the CPU's rows; with the part `planned` for it, the layer's GPU rate.
    pub fn gpu_step(&self, layer: usize, own: f64, waited: f64) {
        if !(own.is_finite() && waited.is_finite()) {
            return;
        }
        let mut s = self.state();
        s.timeline.gpu_steps += 1;
        s.timeline.gpu_own += own.max(0.0);
        s.timeline.gpu_waited += waited.max(0.0);
        s.steps += 1;
        s.waited += usize::from(waited > WAIT_EPS);
        let l = s.layer(layer);
        if let Some((host_bytes, device_seconds)) = l.planned.take() {
            l.gpu = smooth(l.gpu, host_bytes / (own - device_seconds));
        }
    }

    /// The sums so far.
    pub fn timeline(&self) -> Timeline {
        self.state().timeline
    }

    /// Bytes per second of the tasks recorded, the latest weighing most (`None`: none yet).
    pub fn rate(&self) -> Option<f64> {
        let s = self.state();
        (s.seconds > 0.0).then(|| s.bytes / s.seconds)
    }

    /// Tasks recorded so far.
    pub fn tasks(&self) -> usize {
        self.state().tasks
    }

    /// What `layer`'s own steps showed so far.
    pub fn layer(&self, layer: usize) -> LayerRates {
        self.state().layers.get(layer).copied().unwrap_or_default()
    }

    /// `(steps, of them the GPU waited)` read by `gpu_step`.
    pub fn steps(&self) -> (usize, usize) {
        let s = self.state();
        (s.steps, s.waited)
    }
}

/// How a store splits decode attention between the CPU and the GPU.
#[derive(Clone, Debug)]
pub struct SharePolicy {
    /// The override: kv heads whose host blocks the CPU takes (0: see `rates`).
    pub cpu_heads: usize,
    /// Measured rates: with `cpu_heads == 0`, each step's split is balanced from these
    /// (`None` and `cpu_heads == 0`: the GPU reads everything).
    pub rates: Option<Rates>,
    /// The least host tokens (of the longest share) that make a `cpu_heads` split worth it.
    pub min_host_tokens: usize,
    /// The threads the CPU share runs on (`None`: rayon's global pool).
    pub pool: Option<Arc<rayon::ThreadPool>>,
    /// How the GPU reads host blocks.
    pub reader: ReaderChoice,
    /// The CPU share in this store's own steps (shared by the policy's clones).
    pub meter: Arc<CpuMeter>,
    /// Whether `split` balances each layer by the rates its own steps showed (else by the
    /// probe's alone).
    pub calibrate: bool,
}

impl Default for SharePolicy {
    fn default() -> Self {
        SharePolicy {
            cpu_heads: 0,
            rates: None,
            min_host_tokens: MIN_HOST_TOKENS,
            pool: None,
            reader: ReaderChoice::Auto,
            meter: Arc::default(),
            calibrate: true,
        }
    }
}

impl SharePolicy {
    /// Checks `cpu_heads` against a store of `num_kv_heads` heads.
    pub fn check(cpu_heads: usize, num_kv_heads: usize) -> Result<()> {
        let most = num_kv_heads.min(MAX_CPU_HEADS);
        if cpu_heads > most {
            return Err(Error::value(
                "cpu_heads",
                format!("must be between 0 and {most} (the store's kv heads, at most {MAX_CPU_HEADS}), got {cpu_heads}"),
            ));
        }
        Ok(())
    }

    /// A pool of `threads` threads for the CPU share (0: rayon's global pool). Pools are
    /// shared by every store of the process and kept for its life, one per thread count: a
    /// pool per store spawned and joined as many threads per `generate()` call (each call's
    /// cache has a store), and the process's RSS climbed about 1-3 MiB a call on the GPU host.
    pub fn set_threads(&mut self, threads: usize) -> Result<()> {
        self.pool = if threads == 0 {
            None
        } else {
            Some(shared_pool(threads)?)
        };
        Ok(())
    }

    /// The reader the GPU uses for host blocks.
    pub fn host_reader(&self) -> HostReader {
        match self.reader {
            ReaderChoice::Fixed(r) => r,
            ReaderChoice::Auto => choose_reader(self.rates.as_ref()),
        }
    }

    /// Threads of the CPU share's pool (rayon's global pool's where it has none).
    pub fn threads(&self) -> usize {
        self.pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
    }

    /// The split of one attention call of `layer` with `q_len` queries per head
    /// (`contiguous`: the query is `[num_q_heads, 1, head_dim]` with packed rows) over `view`
    /// (whose queries see the last `window` keys, if it has one; `token_bytes` per token of a
    /// head), or `None` for the GPU alone; split by rates, with the balance's estimate (a
    /// caller that queues the step notes its GPU part in the meter: `CpuMeter::planned`).
    pub fn split(
        &self,
        layer: usize,
        q_len: usize,
        contiguous: bool,
        view: &DeviceLayer<'_>,
        window: Option<usize>,
        token_bytes: usize,
    ) -> Option<(Split, Option<ShareEstimate>)> {
        if q_len != 1 || !contiguous || view.is_empty() {
            return None;
        }
        if self.cpu_heads > 0 {
            let heads = self.cpu_heads.min(view.num_kv_heads()).min(MAX_CPU_HEADS);
            return self
                .decide(view.len(), &view.host_tails(heads))
                .map(|s| (s, None));
        }
        let rates = self.layer_rates(layer)?;
        let lo = window
            .map_or(0, |w| view.len().saturating_sub(w))
            .max(view.start());
        balance(&rates, &view.placement(lo, token_bytes), MAX_CPU_HEADS)
            .map(|e| (e.split.clone(), Some(e)))
    }

    /// The rates `layer`'s split balances by (`None`: no rates): the probe's, with the GPU's
    /// side at the rate of the reader it uses; where `calibrate` is on, each side's replaced by
    /// what the layer's own steps showed, within `PROBE_RANGE` of the probe's.
    pub fn layer_rates(&self, layer: usize) -> Option<Rates> {
        let probe = self.rates.as_ref()?;
        let mut rates = Rates {
            pcie: probe.host_rate(self.host_reader()),
            ..*probe
        };
        if self.calibrate {
            let seen = self.meter.layer(layer);
            let within = |measured: Option<f64>, p: f64| {
                measured.map_or(p, |m| m.clamp(p * PROBE_RANGE.0, p * PROBE_RANGE.1))
            };
            rates.cpu = within(seen.cpu, rates.cpu);
            rates.pcie = within(seen.gpu, rates.pcie);
        }
        Some(rates)
    }

    /// The `cpu_heads` decision, pure: `tails[h]` is where head `h`'s host blocks start
    /// (`len`: none; `None`: a device block after a host block, which the kernel cannot
    /// skip). Every head asked about must be splittable, some must have host tokens, and the
    /// longest share at least `min_host_tokens`.
    pub fn decide(&self, len: usize, tails: &[Option<usize>]) -> Option<Split> {
        if tails.is_empty() {
            return None;
        }
        let from: Vec<usize> = tails.iter().copied().collect::<Option<_>>()?;
        let first = *from.iter().min()?;
        if first >= len || len - first < self.min_host_tokens.max(1) {
            return None;
        }
        Some(Split { from })
    }
}

#[cfg(test)]
#[path = "../../tests/rust/attention/policy.rs"]
mod tests;
