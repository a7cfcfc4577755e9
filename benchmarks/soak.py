"""Soak: one patched model, many ``generate()`` calls in a row, memory sampled after each.

What users mix, in one process: prompt lengths across a range, an explicit cache reused with
``crop()`` (a document prefilled once, a question per call), implicit caches (``generate()``
makes its own), the ``headinfer-qa`` pipeline, sampling and greedy; every 50th call a
``KeyboardInterrupt`` raised from a decoder layer's forward hook in the middle of decoding,
every 100th the model unpatched and patched again. After every call the process's RSS, the
host bytes headinfer reports (the stores' blocks of every live cache, and the pinned pool) and,
on a GPU, NVML's device memory of this process are sampled. Every call is also replayed on
fresh objects (a new cache, the same seed) and its tokens compared: equal, or the call counts
as a mismatch; a mismatch is then read from both runs' logits at the first token where they
part: a *near tie* when the logits there differ by no more than the model dtype's rounding
allows (``--tie-tol``, relative: then the two tokens were within that difference, and summation
order decided between them), else *unexplained* (a failure).
With ``--tracemalloc`` the Python heap that tracemalloc traces is sampled too,
and the allocation sites that grew most between the end of warm-up and the end are printed (what
RSS alone cannot say: whether a climb is Python objects, and whose).

At the end it prints the growth after warm-up (the highest sample in the last tenth of the calls
less the highest in the tenth right after warm-up, so a plateau reads 0) as a share of the peak,
and exits 1 when any replay differed or growth is above ``--max-growth`` (1% by default).

    python benchmarks/soak.py --model smollm2 --calls 1000            # the CPU soak
    python benchmarks/soak.py --model tiny-llama --calls 200          # GPU (CUDA if present)
    python benchmarks/soak.py --model llama8b --min-len 8192 --max-len 32768 --calls 200 \
        --time-limit 500                                     # Llama-3-8B's shape, H100: ~6 min
    python benchmarks/soak.py --model tiny-llama --calls 300 --tracemalloc   # + Python's heap

``--json`` writes every sample; ``--plot`` draws memory against call number.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import string
import sys
import time
import tracemalloc
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from transformers import pipeline

import headinfer
from headinfer import _core
from headinfer.prefill import cache_kwarg_name

# ---------------------------------------------------------------------------------------------
# memory figures


def rss_bytes() -> int:
    """This process's resident set, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Nvml:
    """This process's device memory by NVML (what the driver charges it, context included);
    ``None`` figures where pynvml or a GPU is missing."""

    def __init__(self, device: torch.device) -> None:
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # no pynvml, no driver: torch's own figure stands in
            print(f"NVML unavailable ({exc}); device memory from torch.cuda.memory_reserved")

    def used(self) -> int | None:
        if self.handle is None:
            return torch.cuda.memory_reserved() if torch.cuda.is_available() else None
        pid = os.getpid()
        for proc in self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        # In a container the pids NVML reports may not be ours: the device's total use.
        return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)


#: Every HeadInferCache the soak has seen, weakly: how many are still alive after a call shows
#: a leak (a cache kept alive by a reference cycle or a global).
_CACHES: weakref.WeakSet[headinfer.HeadInferCache] = weakref.WeakSet()


def store_host_bytes() -> int:
    """Host bytes the stores of every live cache the soak has seen hold in blocks."""
    return sum(c.memory()["host_reserved"] for c in list(_CACHES))


@dataclass
class Sample:
    call: int
    kind: str
    prompt_len: int
    seconds: float
    exact: bool
    rss: int
    store_host: int
    pinned: int
    device_blocks: int
    nvml: int | None
    live_caches: int
    #: tracemalloc's current traced bytes (``--tracemalloc``; ``None`` without it).
    traced: int | None = None
    #: Where an inexact call's two runs part (``divergence``), ``None`` for exact calls.
    parted: dict[str, Any] | None = None

    @property
    def unexplained(self) -> bool:
        return not self.exact and not (self.parted or {}).get("near_tie", False)


def divergence(
    got: list[int],
    ref: list[int],
    got_logits: list[torch.Tensor],
    ref_logits: list[torch.Tensor],
    tol: float,
) -> dict[str, Any] | None:
    """Where two runs of one call part, read from their logits (``[vocab]`` per step, float32);
    ``None`` when their tokens are equal.

    Both runs saw the same tokens before the first differing step, so their logits there should
    agree up to rounding: ``rel`` is their relative difference (L2), ``max_abs`` its largest
    element, and ``gap`` how far apart the two chosen tokens' logits were (the larger of the
    two runs' gaps; a flip needs ``gap <= 2 * max_abs``). It is a near tie when ``rel <= tol``:
    rounding moved the logits, and the two tokens were that close.
    """
    if got == ref:
        return None
    step = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    if step >= min(len(got_logits), len(ref_logits)):
        return {"step": step, "near_tie": False, "why": "lengths differ, no logits to compare"}
    g, r = got_logits[step].float(), ref_logits[step].float()
    diff = (g - r).abs()
    rel = float(diff.norm() / r.norm().clamp_min(1e-30))
    max_abs = float(diff.max())
    out: dict[str, Any] = {"step": step, "rel": rel, "max_abs": max_abs}
    if step < min(len(got), len(ref)):
        a, b = got[step], ref[step]
        gap = max(float(r[b] - r[a]), float(g[a] - g[b]))
        out["gap"] = gap
        tie = rel <= tol
    else:
        tie = False
    out["near_tie"] = bool(tie)
    return out


class PyHeap:
    """The Python heap by tracemalloc (``--tracemalloc``): the traced bytes after each call, and
    snapshots at the end of warm-up and at the end whose difference names the sites that grew.
    Only allocations made after ``start`` are traced: the model's load is not counted."""

    def __init__(self, frames: int | None) -> None:
        self.frames = frames
        self.warm: tracemalloc.Snapshot | None = None
        if frames:
            tracemalloc.start(frames)

    def traced(self) -> int | None:
        return tracemalloc.get_traced_memory()[0] if self.frames else None

    def snapshot(self) -> tracemalloc.Snapshot:
        # Garbage that a collection would free is not growth; tracemalloc's own allocations
        # and the import machinery's are not the soak's.
        gc.collect()
        return tracemalloc.take_snapshot().filter_traces(
            [
                tracemalloc.Filter(False, tracemalloc.__file__),
                tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
                tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
                tracemalloc.Filter(False, "<unknown>"),
            ]
        )

    def mark_warm(self) -> None:
        if self.frames:
            self.warm = self.snapshot()

    def growth(self, top: int = 10) -> list[dict[str, Any]]:
        """The ``top`` sites whose traced bytes grew most since ``mark_warm`` (printed too)."""
        if not self.frames or self.warm is None:
            return []
        key = "lineno" if self.frames == 1 else "traceback"
        diff = self.snapshot().compare_to(self.warm, key)
        grown = sorted((d for d in diff if d.size_diff > 0), key=lambda d: -d.size_diff)[:top]
        overhead = tracemalloc.get_tracemalloc_memory()
        print(
            f"\ntracemalloc: the {len(grown)} sites that grew most after warm-up (of "
            f"{len(diff)}; tracemalloc's own memory, in RSS too: {overhead / 2**20:.1f} MiB)"
        )
        rows = []
        for d in grown:
            # The allocating line first (a traceback runs from the oldest frame).
            frames = [f"{f.filename}:{f.lineno}" for f in reversed(d.traceback)]
            print(
                f"  {d.size_diff / 2**10:+10.1f} KiB {d.count_diff:+7d} blocks "
                f"(now {d.size / 2**10:.1f} KiB)  {frames[0]}"
            )
            for f in frames[1:]:
                print(f"{'':41s}{f}")
            rows.append(
                {
                    "site": frames,
                    "size_diff": d.size_diff,
                    "count_diff": d.count_diff,
                    "size": d.size,
                }
            )
        return rows


# ---------------------------------------------------------------------------------------------
# models


def char_tokenizer(vocab_size: int) -> Any:
    """One token per character (for random-weight models, which have no tokenizer of their
    own): enough for the pipeline's prompt, a chat template included."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " .,?!<>/\n"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(chars)})
    assert len(vocab) <= vocab_size
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def load(name: str, device: torch.device, max_len: int) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``--model``."""
    if name == "smollm2":
        from headinfer.smollm2 import load_smollm2

        return load_smollm2(dtype=torch.float32, device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "tiny-llama":
        cfg = LlamaConfig(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=max(max_len * 2, 4096),
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif name == "llama8b":
        # Llama-3-8B's shape with random weights: nothing is downloaded (the GPU machine has no
        # network), and every call is checked against a fresh run, not against real weights.
        cfg = LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=max(max_len * 2, 8192),
            rope_theta=500000.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        dtype = torch.bfloat16
    else:
        raise SystemExit(f"--model: unknown model {name!r}")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return model, char_tokenizer(cfg.vocab_size)


# ---------------------------------------------------------------------------------------------
# the calls


class Interrupt:
    """Raises ``KeyboardInterrupt`` from a decoder layer's forward hook at its ``after``-th
    call (so in the middle of a step, after some layers appended their keys)."""

    def __init__(self, model: Any, layer: int, after: int) -> None:
        self.left = after
        layers = model.model.layers
        self.handle = layers[layer % len(layers)].register_forward_hook(self.hook)

    def hook(self, *_: Any) -> None:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt("soak: interrupt from a forward hook")

    def remove(self) -> None:
        self.handle.remove()


#: A call's outcome: ``None`` when exact, else ``divergence``'s reading (``FAILED``: a call
#: whose tokens cannot be compared, such as the pipeline's text or a misfired interrupt).
Outcome = dict[str, Any] | None
FAILED: dict[str, Any] = {"near_tie": False, "why": "no tokens to compare"}


@dataclass
class Soak:
    model: Any
    tok: Any
    args: argparse.Namespace
    device: torch.device
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    doc: headinfer.HeadInferCache | None = None
    doc_ids: torch.Tensor | None = None
    doc_uses: int = 0
    pipe: Any = None
    #: What ``patch`` was given (``repatch`` gives it again).
    patch_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Prompts of the longest length (the first calls: warm-up meets the high-water mark of
    #: each kind's activations, so later growth is not a longer prompt arriving late).
    longest: bool = False

    @property
    def kw(self) -> str:
        return cache_kwarg_name(self.model)

    def ids(self, n: int) -> torch.Tensor:
        # Token ids the tokenizer knows, avoiding the first 4 (special ids of the stand-ins).
        hi = min(self.model.config.vocab_size, len(self.tok))
        g = torch.Generator().manual_seed(self.rng.randrange(1 << 30))
        return torch.randint(4, hi, (1, n), generator=g).to(self.device)

    def prompt_len(self) -> int:
        # Log-uniform over the range, so short prompts are as common as users make them.
        lo, hi = self.args.min_len, self.args.max_len
        r = self.rng.random()
        return hi if self.longest else int(round(lo * (hi / lo) ** r))

    def gen(self, ids: torch.Tensor, seed: int, sample: bool, **kw: Any) -> Any:
        """The new tokens of one ``generate()`` call, and each step's logits (float32, CPU)."""
        torch.manual_seed(seed)
        opts: dict[str, Any] = dict(do_sample=False)
        if sample:
            opts = dict(do_sample=True, top_k=50, temperature=0.9)
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.args.new_tokens,
                return_dict_in_generate=True,
                pad_token_id=self.tok.pad_token_id,
                output_logits=True,
                **opts,
                **kw,
            )
        cache = getattr(out, "past_key_values", None)
        if isinstance(cache, headinfer.HeadInferCache):
            _CACHES.add(cache)
        logits = [step[0].float().cpu() for step in out.logits]
        return out.sequences[0, ids.shape[1] :].tolist(), logits

    def compare(self, got: Any, ref: Any) -> dict[str, Any] | None:
        """``divergence`` of two ``gen`` results."""
        return divergence(got[0], ref[0], got[1], ref[1], self.args.tie_tol)

    def new_doc(self) -> None:
        self.doc = None
        gc.collect()
        self.doc_ids = self.ids(self.prompt_len())
        self.doc = self.prefilled(self.doc_ids)
        self.doc_uses = 0

    def prefilled(self, ids: torch.Tensor) -> headinfer.HeadInferCache:
        cache = headinfer.HeadInferCache(self.model)
        _CACHES.add(cache)
        with torch.inference_mode():
            self.model(ids, logits_to_keep=1, use_cache=True, **{self.kw: cache})
        return cache

    # -- kinds: each returns (prompt length, exact) ----------------------------------------

    def implicit(self, seed: int, sample: bool) -> tuple[int, Outcome]:
        ids = self.ids(self.prompt_len())
        got = self.gen(ids, seed, sample)
        return ids.shape[1], self.compare(got, self.gen(ids, seed, sample))

    def explicit(self, seed: int, sample: bool, interrupt: bool = False) -> tuple[int, Outcome]:
        if self.doc is None or self.doc_uses >= 20:
            self.new_doc()
        assert self.doc is not None and self.doc_ids is not None
        self.doc_uses += 1
        length = self.doc_ids.shape[1]
        ids = torch.cat([self.doc_ids, self.ids(self.rng.randint(4, 40))], dim=1)
        if interrupt:
            # The hooked layer runs once per forward step: the question's prefill, then one
            # step per new token; interrupt one of them.
            after = self.rng.randint(1, max(self.args.new_tokens - 1, 1))
            hook = Interrupt(self.model, self.rng.randrange(64), after)
            try:
                self.gen(ids, seed, sample, **{self.kw: self.doc})
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
            finally:
                hook.remove()
            # The cache is left at the last complete token: the document and some of the
            # question, or more, never a partial step.
            seq = self.doc.get_seq_length()
            if seq < length or any(p.store.in_step for p in self.doc.stores):
                print(f"interrupt left the cache at {seq} tokens (document {length}), in a step")
                return ids.shape[1], FAILED
            if not interrupted:
                print("interrupt: the hook never fired (generate finished first)")
                return ids.shape[1], FAILED
            self.doc.crop(length)
        got = self.gen(ids, seed, sample, **{self.kw: self.doc})
        self.doc.crop(length)
        fresh = self.prefilled(self.doc_ids)
        ref = self.gen(ids, seed, sample, **{self.kw: fresh})
        return ids.shape[1], self.compare(got, ref)

    def qa(self, seed: int, sample: bool) -> tuple[int, Outcome]:
        if self.pipe is None:
            self.pipe = pipeline("headinfer-qa", model=self.model, tokenizer=self.tok)
        n = self.prompt_len()
        # Text of about n tokens: words of random letters (a few characters a token, or one
        # with the character tokenizer).
        words = max(n // 2, 4) if len(self.tok) > 1000 else max(n // 6, 4)
        r = random.Random(self.rng.randrange(1 << 30))
        text = " ".join(
            "".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(2, 7)))
            for _ in range(words)
        )
        questions = [f"What is word {r.randint(1, words)}?" for _ in range(2)]
        opts: dict[str, Any] = dict(questions=questions, max_new_tokens=self.args.new_tokens)
        if sample:
            opts.update(do_sample=True, top_k=50)
        torch.manual_seed(seed)
        got = self.pipe(text, **opts)
        torch.manual_seed(seed)
        ref = self.pipe(text, **opts)
        prompt = self.pipe.preprocess(text, questions=questions[:1])["context_ids"].shape[1]
        return prompt, None if got == ref else FAILED

    def repatch(self) -> None:
        """Unpatch and patch the model again; the document cache is kept and reused."""
        settings = self.model._headinfer
        headinfer.unpatch(self.model)
        assert not headinfer.is_patched(self.model)
        headinfer.patch(self.model, **{**self.patch_kwargs, "chunk_size": settings.chunk_size})

    def call(self, i: int) -> tuple[str, int, Outcome]:
        seed = self.rng.randrange(1 << 30)
        sample = self.rng.random() < 0.3
        if i % 100 == 99:
            self.repatch()
        if i % 50 == 49:
            n, ok = self.explicit(seed, sample, interrupt=True)
            return "interrupt", n, ok
        kind = self.rng.choices(["explicit", "implicit", "qa"], weights=[5, 4, 1])[0]
        self.longest = i < 6
        if self.longest:
            kind = ["explicit", "implicit", "qa"][i % 3]
            sample = i >= 3
        fn: Callable[[int, bool], tuple[int, Outcome]] = getattr(self, kind)
        n, ok = fn(seed, sample)
        return f"{kind}{'+sample' if sample else ''}", n, ok


# ---------------------------------------------------------------------------------------------
# figures


def growth(samples: list[Sample], key: str, warmup: int) -> tuple[int, int]:
    """``(growth, peak)`` of ``key``: the highest value in the last tenth of the calls less the
    highest before it, after warm-up (a new high-water mark at the end: what a leak makes;
    the same plateau reads <= 0); the peak over every call."""
    values = [getattr(s, key) for s in samples]
    if any(v is None for v in values):
        return 0, 0
    rest = values[warmup:]
    tenth = max(len(rest) // 10, 1)
    before = rest[:-tenth] or rest[:1]
    return max(rest[-tenth:]) - max(before), max(values)


def floor_rise(samples: list[Sample], key: str, warmup: int) -> int:
    """The lowest value in the last tenth less the lowest in the tenth right after warm-up (a
    leak raises the floor too; allocator caching after a larger call moves it once)."""
    values = [getattr(s, key) for s in samples][warmup:]
    tenth = max(len(values) // 10, 1)
    return min(values[-tenth:]) - min(values[:tenth]) if values else 0


def plot(samples: list[Sample], path: str, title: str, warmup: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = [s.call for s in samples]
    series = [
        ("RSS", [s.rss for s in samples]),
        ("store host blocks (live caches)", [s.store_host for s in samples]),
        ("pinned (headinfer)", [s.pinned for s in samples]),
    ]
    if samples and samples[0].traced is not None:
        series.append(("Python heap (tracemalloc)", [s.traced or 0 for s in samples]))
    if samples and samples[0].nvml is not None:
        series.append(("device (NVML)", [s.nvml or 0 for s in samples]))
        series.append(("device KV blocks", [s.device_blocks for s in samples]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, ys in series:
        ax.plot(calls, [y / 2**20 for y in ys], label=label, lw=1)
    ax.axvline(warmup, color="grey", ls=":", lw=1, label="end of warm-up")
    ax.set_xlabel("call")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(
    args: argparse.Namespace, device: torch.device, samples: list[Sample], warmup: int, t0: float
) -> dict[str, Any]:
    return {
        "model": args.model,
        "device": str(device),
        "calls": len(samples),
        "warmup": warmup,
        "wall_s": round(time.perf_counter() - t0, 1),
        "not_exact": [s.call for s in samples if not s.exact],
        "unexplained": [s.call for s in samples if s.unexplained],
        "args": vars(args),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "samples": [asdict(s) for s in samples],
    }


def dump(path: str, result: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-llama", "llama8b"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=6000)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=None, help="patch(chunk_size=...)")
    p.add_argument(
        "--gpu-budget",
        default=None,
        help="patch(gpu_budget=...), e.g. 24GiB: less KV on the GPU, more in pinned host blocks",
    )
    p.add_argument("--warmup", type=float, default=0.1, help="share of the calls (0.1)")
    p.add_argument("--max-growth", type=float, default=0.01, help="of the peak (0.01)")
    p.add_argument(
        "--tie-tol",
        type=float,
        default=None,
        help="relative logit difference a near tie may show (default: 0.05 for 16-bit models,\n"
        "about bf16's own noise of chunked against one-shot prefill at 128K, 0.044; 1e-4 for\n"
        "float32)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="stop after this many seconds (the figures are then of the calls done)",
    )
    p.add_argument(
        "--tracemalloc",
        type=int,
        nargs="?",
        const=1,
        default=None,
        metavar="FRAMES",
        help="sample the Python heap (tracemalloc) after each call and print the 10 sites that\n"
        "grew most after warm-up; FRAMES > 1 groups them by tracebacks that deep (slower)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--from-json", default=None, help="print (and --plot) a saved run's figures")
    args = p.parse_args(argv)
    if args.from_json:
        return from_json(args.from_json, args.plot)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = load(args.model, device, args.max_len)
    if args.tie_tol is None:
        args.tie_tol = 1e-4 if model.dtype == torch.float32 else 0.05
    kwargs: dict[str, Any] = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    if args.gpu_budget is not None:
        kwargs["gpu_budget"] = args.gpu_budget
    headinfer.patch(model, **kwargs)
    soak = Soak(model, tok, args, device, rng=random.Random(args.seed), patch_kwargs=kwargs)
    nvml = Nvml(device)
    warmup = int(args.calls * args.warmup)
    heap = PyHeap(args.tracemalloc)
    if warmup == 0:
        heap.mark_warm()
    samples: list[Sample] = []
    start = time.perf_counter()
    print(
        f"soak: {args.model} on {device}, {args.calls} calls, prompts {args.min_len}-"
        f"{args.max_len} tokens, {args.new_tokens} new tokens, torch threads "
        f"{torch.get_num_threads()}, headinfer {headinfer.__version__}, torch {torch.__version__}"
    )
    for i in range(args.calls):
        if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
            print(f"--time-limit: stopped after {i} calls")
            warmup = int(i * args.warmup)
            break
        t = time.perf_counter()
        kind, n, parted = soak.call(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        s = Sample(
            call=i,
            kind=kind,
            prompt_len=n,
            seconds=time.perf_counter() - t,
            exact=parted is None,
            rss=rss_bytes(),
            store_host=store_host_bytes(),
            pinned=_core.pinned_bytes(),
            device_blocks=_core.device_block_bytes(),
            nvml=nvml.used(),
            live_caches=len(_CACHES),
            traced=heap.traced(),
            parted=parted,
        )
        samples.append(s)
        if i == warmup - 1:
            heap.mark_warm()
        if parted is not None:
            how = "a near tie" if parted.get("near_tie") else "UNEXPLAINED"
            figures = ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in parted.items()
                if k != "near_tie"
            )
            print(
                f"call {i} ({kind}, {n} tokens): not exact against a fresh run, {how} ({figures})"
            )
        if i % 10 == 0 or i == args.calls - 1:
            print(
                f"call {i:5d} {kind:18s} {n:6d} tok {s.seconds:6.1f}s  rss {s.rss / 2**20:8.1f} "
                f"MiB  store {s.store_host / 2**20:7.1f} MiB  pinned {s.pinned / 2**20:6.1f} MiB"
                + (f"  nvml {s.nvml / 2**20:8.1f} MiB" if s.nvml is not None else "")
                + (f"  traced {s.traced / 2**20:7.1f} MiB" if s.traced is not None else "")
                + f"  caches {s.live_caches}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        if args.json and i % 50 == 49:  # a partial record, should the run be cut short
            dump(args.json, report(args, device, samples, warmup, start))
    result = report(args, device, samples, warmup, start)
    failed = summarize(args, samples, warmup, result)
    if args.tracemalloc:
        if heap.warm is None:
            print("\ntracemalloc: the run stopped before the end of warm-up; no sites compared")
        result["tracemalloc_top"] = heap.growth()
    if args.json:
        dump(args.json, result)
    if args.plot:
        title = f"soak: {args.model} on {device}, {len(samples)} calls"
        plot(samples, args.plot, title, warmup)
    return 1 if failed else 0


def summarize(
    args: argparse.Namespace, samples: list[Sample], warmup: int, result: dict[str, Any]
) -> bool:
    """Prints the figures (and adds them to ``result``); whether the soak failed."""
    bad = [s.call for s in samples if not s.exact]
    unexplained = [s.call for s in samples if s.unexplained]
    wall = sum(s.seconds for s in samples)
    failed = bool(unexplained)
    print(
        f"\n{len(samples)} calls ({wall:.0f} s in calls); not exact: {len(bad)} {bad[:20]}; of "
        f"them near ties (--tie-tol {args.tie_tol:g}): {len(bad) - len(unexplained)}, "
        f"unexplained: {len(unexplained)} {unexplained[:20]}"
    )
    for key in ("rss", "pinned", "device_blocks", "nvml", "store_host", "traced"):
        g, peak = growth(samples, key, warmup)
        if peak == 0:
            continue
        share = g / peak
        floor = floor_rise(samples, key, warmup)
        result[key] = {"growth": g, "peak": peak, "share": share, "floor_rise": floor}
        # store_host is what the live caches hold: the current document's size, which varies
        # by design; it is reported, and its bound is the live cache count. traced (the Python
        # heap) is a lead for reading RSS, not a target of its own.
        over = share > args.max_growth and key not in ("store_host", "traced")
        failed |= over
        print(
            f"{key:14s} peak {peak / 2**20:9.1f} MiB  growth after warm-up "
            f"{g / 2**20:+8.2f} MiB = {100 * share:+.2f}% of the peak{'  OVER' if over else ''}"
            f"  (floor {floor / 2**20:+.1f} MiB)"
        )
    live = max((s.live_caches for s in samples[warmup:]), default=0)
    print(f"live caches: at most {live} after warm-up, {samples[-1].live_caches} at the end")
    failed |= live > 1
    return failed


def from_json(path: str, plot_path: str | None) -> int:
    """The figures (and the plot) of a run saved with ``--json``."""
    with open(path) as f:
        result = json.load(f)
    args = argparse.Namespace(**{"tie_tol": float("nan"), **result["args"]})
    samples = [Sample(**s) for s in result["samples"]]
    warmup = int(len(samples) * args.warmup)
    print(f"{path}: {result['model']} on {result['device']}, {result.get('date')}")
    failed = summarize(args, samples, warmup, result)
    if plot_path:
        title = f"soak: {result['model']} on {result['device']}, {len(samples)} calls"
        plot(samples, plot_path, title, warmup)
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
