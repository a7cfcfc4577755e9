"""The ``headinfer`` command: ``generate``, ``plan``, ``check``, ``eval`` and ``demo``.

::

    headinfer generate --model smollm2 --prompt-file doc.txt --chat --max-new-tokens 64
    headinfer plan --model meta-llama/Llama-3.1-8B-Instruct --context 1M --gpu-budget 24GiB
    headinfer check --model meta-llama/Llama-3.1-8B-Instruct --context 1M
    headinfer eval ruler --lengths 4096 --gpu-budget 20GiB
    headinfer demo --compare

``check`` reports this machine, measures its rates, runs the exactness self-test of every family
and predicts decode time and the longest context (exit 1 when a self-test fails).
``generate`` streams the answer to stdout, and the prefill progress, times and where the KV bytes
sat to stderr. ``plan`` reads only the model's config and prints where every byte of a run would
sit (the runtime's own planner), whether that fits this machine, the longest context that does,
and the time floors; ``--json`` prints the same figures as JSON, ``--plot`` draws them. It exits
with status 0 when the run fits, 1 when it does not, 2 for a bad argument. ``eval`` runs the
benchmark runners (``python -m headinfer.eval.ruler``, ``.longbench``); ``demo`` is ``make
demo`` (``python -m headinfer.demo``). Also runnable as ``python -m headinfer``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TextStreamer

from . import _command as opt
from .device import resolve_device
from .distributed import is_main_rank, placement, torchrun_world
from .floor_rates import Rates, plan_rates
from .model_config import ModelNotFoundError, load_config
from .plan import (
    DEFAULT_CHUNK_SIZE,
    KV_DTYPES,
    SPLITS,
    default_budget,
    fits,
    longest_figures,
    machine_figures,
    make_plan,
)
from .plan_report import plot_plan, render_plan
from .sizes import format_bytes

__all__ = ["main"]

logger = logging.getLogger("headinfer")

_PROG = "headinfer"


def _version() -> str:
    import torch
    import transformers

    from . import __version__

    return (
        f"headinfer {__version__} (transformers {transformers.__version__}, "
        f"torch {torch.__version__})"
    )


class _VersionAction(argparse.Action):
    # argparse's own "version" action formats its string eagerly; this imports torch only when
    # --version is asked for.
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(_version())
        parser.exit()


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Exact long-context inference with the KV cache in host memory.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="{generate,plan,check,eval,demo}")
    sub.required = True

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            required=True,
            metavar="NAME_OR_PATH",
            help="'smollm2' (the bundled SmolLM2-135M-Instruct), a local model folder, a "
            "GGUF file, or a Hugging Face Hub id",
        )
        p.add_argument("--gguf-file", metavar="F", help="the GGUF file inside --model's folder")
        p.add_argument(
            "--chunk-size",
            type=opt.context,
            default=DEFAULT_CHUNK_SIZE,
            metavar="N",
            help=f"prefill chunk in tokens, e.g. 8192 or 8K (default {DEFAULT_CHUNK_SIZE})",
        )
        opt.add_gpu_budget(p)
        p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")

    gen = sub.add_parser(
        "generate",
        help="stream a model's answer to a (long) prompt",
        description="Stream the answer to stdout; progress, times and memory go to stderr.",
    )
    model_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the prompt")
    source.add_argument("--prompt-file", metavar="F", help="the prompt, as text; '-' for stdin")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt in the model's chat template (surrounding whitespace stripped)",
    )
    gen.add_argument("--max-new-tokens", type=opt.positive, default=256, metavar="N")
    gen.add_argument(
        "--temperature",
        type=opt.non_negative,
        default=0.0,
        metavar="T",
        help="sample at this temperature (default 0: greedy decoding)",
    )
    gen.add_argument(
        "--top-p", type=opt.fraction, metavar="P", help="sample from the top-p nucleus (0 < P <= 1)"
    )
    gen.add_argument(
        "--top-k", type=opt.positive, metavar="K", help="sample from the K most likely tokens"
    )
    gen.add_argument("--seed", type=int, metavar="N", help="seed for sampling (default: random)")
    gen.add_argument(
        "--dtype",
        type=opt.dtype,
        help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)",
    )
    opt.add_device(gen)
    opt.add_kv_dtype(gen)
    gen.add_argument(
        "--gpus",
        type=opt.positive,
        metavar="N",
        help="spread the model over N GPUs: its layers over GPUs 0..N-1 (accelerate's "
        "device_map='auto'; each GPU keeps and streams its layers' KV). Under torchrun "
        "(torchrun --nproc-per-node N -m headinfer generate ...) it is tensor parallelism "
        "instead: every process runs every layer for its share of the kv heads, and --gpus "
        "may be left out (it must equal the process count)",
    )

    plan = sub.add_parser(
        "plan",
        help="where every byte of a long-context run would sit, from the config alone",
        description="Read only the model's config (no weights) and plan a run of --context "
        "tokens with the runtime's own planner: the GPU budget's split, host KV, whether it "
        "fits this machine, the longest context that does, and the prefill and decode floors. "
        "Exit status: 0 when the run fits (the budget, this GPU if there is one, this host's "
        "RAM), 1 when it does not, 2 for a bad argument.",
    )
    model_args(plan)
    plan.add_argument(
        "--context",
        type=opt.context,
        required=True,
        metavar="TOKENS",
        help="tokens in the cache, e.g. 131072, 128K (= 131,072) or 1M (= 1,048,576)",
    )
    plan.add_argument(
        "--dtype",
        type=opt.dtype,
        default="bfloat16",
        metavar="DTYPE",
        help="bf16 (default), fp16, fp32",
    )
    opt.add_kv_dtype(plan, "the planned cache holds")
    plan.add_argument(
        "--force",
        action="store_true",
        help="plan a context longer than the model's max_position_embeddings",
    )
    defaults = Rates()
    for name, what, measured in (
        ("sdpa_tflops", "causal attention rate", "H200"),
        ("matmul_tflops", "matmul rate", "H200 bf16"),
    ):
        default = getattr(defaults, name)
        plan.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=default,
            metavar="R",
            help=f"{what} (default {default:g}: {measured}, BENCHMARKS.md)",
        )
    plan.add_argument(
        "--h2d-gbs",
        type=float,
        metavar="R",
        help="rate at which decode reads host KV, GB/s (default: this machine's, where "
        f"`headinfer check` measured it; else {defaults.h2d_gbs:g}: H200 PCIe, BENCHMARKS.md)",
    )
    plan.add_argument(
        "--gpus",
        type=opt.positive,
        default=1,
        metavar="N",
        help="plan for N GPUs, --gpu-budget each: the per-GPU split, host KV and the longest "
        "context for N GPUs (default 1)",
    )
    plan.add_argument(
        "--split",
        choices=SPLITS,
        default="layers",
        help="with --gpus: 'layers' (device_map, what `generate --gpus N` does; default) or "
        "'heads' (tensor parallelism, what torchrun --nproc-per-node N does)",
    )
    plan.add_argument("--json", action="store_true", help="print the figures as JSON")
    plan.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw where the bytes sit and the longest context against the GPU budget",
    )

    check = sub.add_parser(
        "check",
        help="does headinfer work here, and how fast will it be: environment, measured rates, "
        "a self-test of every family, what to expect",
        description="Report this machine (versions, CUDA, GPUs, cores, the CPU kernels' "
        "instruction set, RAM), measure its rates (saved where `headinfer plan` and the "
        "runtime read them), run the exactness self-test of every supported family with tiny "
        "random models (no download), and predict decode time and the longest context for "
        "--model. Exit status: 0 when every self-test passes, 1 when one fails, 2 for a bad "
        "argument.",
    )
    check.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        help="what to predict for: a config.json, a model folder, a GGUF file, a Hub id "
        "already downloaded, or 'smollm2' (default: the Llama-3-8B shape)",
    )
    check.add_argument("--gguf-file", metavar="F", help="the GGUF file inside --model's folder")
    check.add_argument(
        "--context",
        type=opt.context,
        default=128 << 10,
        metavar="TOKENS",
        help="tokens to predict for (default 128K)",
    )
    check.add_argument(
        "--dtype", type=opt.dtype, default="bfloat16", metavar="DTYPE", help="bf16 (default)"
    )
    opt.add_kv_dtype(check, "the cache to measure and predict for holds")
    opt.add_gpu_budget(check)
    check.add_argument(
        "--no-self-test", action="store_true", help="skip the self-test (environment and rates)"
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("-v", "--verbose", action="count", default=0, help="log more")

    sub.add_parser(
        "eval",
        help="long-context benchmarks through headinfer: `headinfer eval ruler|longbench "
        "--help` for their options",
        add_help=False,
    )

    sub.add_parser(
        "demo",
        help="needle-in-a-haystack with SmolLM2 (what `make demo` runs); "
        "`headinfer demo --help` for its options",
        add_help=False,
    )
    return parser, {"generate": gen, "plan": plan, "check": check}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argument errors exit with status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from . import demo

        return demo.main(argv[1:])
    if argv and argv[0] == "eval":
        return _eval(argv[1:])
    parser, subs = _parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    # A no-op where the application (or pytest) already configured logging.
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)
    sub = subs[args.command]
    try:
        if args.command == "plan":
            return _plan(args, sub)
        if args.command == "check":
            return _check(args, sub)
        return _generate(args, sub)
    except ModelNotFoundError as exc:
        sub.error(str(exc))
    except FileNotFoundError as exc:  # e.g. the SmolLM2 package, or a prompt file
        sub.error(str(exc))
    except BrokenPipeError:
        # stdout closed early (`headinfer plan ... | head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 2  # not reached: error() exits


_EVALS = ("ruler", "longbench")


def _eval(argv: list[str]) -> int:
    usage = f"usage: {_PROG} eval {{{','.join(_EVALS)}}} [options]  (--help after the name)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        print("\n  ruler       RULER's synthetic tasks, generated locally")
        print("  longbench   LongBench v2 from its data file (JSON list or JSON lines)")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in _EVALS:
        print(f"{usage}\n{_PROG} eval: error: unknown benchmark {name!r}", file=sys.stderr)
        return 2
    if name == "ruler":
        from .eval import ruler as runner
    else:
        from .eval import longbench as runner  # type: ignore[no-redef]
    try:
        return runner.main(rest, prog=f"{_PROG} eval {name}")
    except SystemExit as exc:  # argparse's exits: keep their status
        return int(exc.code or 0)


def _plan(args: argparse.Namespace, sub: argparse.ArgumentParser) -> int:
    from .errors import UnsupportedModelError

    config, label = load_config(args.model, args.gguf_file)
    if args.gpu_budget is not None:
        budget, source = args.gpu_budget, ""
    else:
        budget, source = default_budget()
    try:
        rates = plan_rates(config, args.dtype, args.sdpa_tflops, args.matmul_tflops, args.h2d_gbs)
        plan = make_plan(
            config,
            context=args.context,
            gpu_budget=budget,
            chunk_size=args.chunk_size,
            dtype=args.dtype,
            rates=rates,
            label=label,
            gpus=args.gpus,
            split=args.split,
            kv_dtype=args.kv_dtype,
        )
    except UnsupportedModelError as exc:
        sub.error(f"--gpus {args.gpus} --split {args.split}: {exc}" if args.gpus > 1 else str(exc))
    except ValueError as exc:
        sub.error(f"--{exc}")
    if not args.force:
        limit = plan["max_position_embeddings"]
        if limit is not None and args.context > limit:
            sub.error(
                f"--context {args.context:,} is longer than {label}'s max_position_embeddings "
                f"({limit:,}): the model has no positions for it and generate() refuses it; "
                "pass --force to plan it anyway"
            )
    plan["gpu_budget_source"] = source
    plan["machine"] = machine_figures(plan)
    plan["longest_context"] = longest_figures(
        config, plan, plan["machine"]["ram_available_bytes"], kv_dtypes=KV_DTYPES
    )
    plan["fits"] = fits(plan)
    if args.plot:
        try:
            plot_plan(config, plan, args.plot, plan["machine"]["ram_available_bytes"])
        except ImportError:
            sub.error("--plot needs matplotlib: pip install matplotlib")
        except OSError as exc:
            sub.error(f"--plot {args.plot}: {exc.strerror or exc}")
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(render_plan(plan))
    if args.plot:
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0 if plan["fits"] else 1


def _check(args: argparse.Namespace, sub: argparse.ArgumentParser) -> int:
    from .errors import UnsupportedModelError
    from .selfcheck import DEFAULT_MODEL_LABEL, render, run_check

    config, label = None, DEFAULT_MODEL_LABEL
    if args.model is not None:
        # A check makes no download: a Hub id must already be in the cache.
        config, label = load_config(args.model, args.gguf_file, local_files_only=True)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        report = run_check(
            config,
            label,
            context=args.context,
            gpu_budget=args.gpu_budget,
            dtype=args.dtype,
            self_test=not args.no_self_test,
            say=say,
            kv_dtype=args.kv_dtype,
        )
    except UnsupportedModelError as exc:
        sub.error(f"--model {args.model}: {exc}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0 if report["self_test_ok"] else 1


def _read_prompt(name: str, sub: argparse.ArgumentParser) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text()
    except OSError as exc:
        sub.error(f"--prompt-file {name}: {exc.strerror or exc}")
    return ""  # not reached


def _load_model(
    args: argparse.Namespace,
    device: str,
    dtype: Any,
    dtype_name: str,
    spread: tuple[dict[str, Any], str | None] = ({}, None),
) -> tuple[Any, Any, str]:
    """``(model, tokenizer, label)``; checks the config first so errors come before weights.

    ``spread``: ``distributed.placement``'s keywords and description (several GPUs), if any.
    """
    from .smollm2 import load_smollm2
    from .spec import model_spec

    config, label = load_config(args.model, args.gguf_file)
    model_spec(config)  # UnsupportedModelError before any weight is read
    start = time.perf_counter()
    where_to = spread[1] or device
    print(f"loading {label} ({dtype_name}, {where_to})...", file=sys.stderr, flush=True)
    if opt.is_smollm2(args.model, spread[1]):
        model, tokenizer = load_smollm2(dtype=dtype, device=device)
    else:
        placement = {"device_map": device} if device != "cpu" else {}
        if spread[1] is not None:
            placement = spread[0]
        model, tokenizer = opt.load_pretrained(args.model, dtype, placement, args.gguf_file)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return model, tokenizer, label


def _generate(args: argparse.Namespace, sub: argparse.ArgumentParser) -> int:
    import torch

    import headinfer

    from .prefill import cache_kwarg_name

    device = resolve_device(args.device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = dtypes[dtype_name]
    if args.prompt is not None:
        text, source = args.prompt, "--prompt"
    else:
        text, source = _read_prompt(args.prompt_file, sub), f"--prompt-file {args.prompt_file}"
    if not text.strip():
        sub.error(f"{source}: the prompt is empty")
    sampling = _sampling(args)

    try:
        spread = placement(args.gpus)
        model, tokenizer, label = _load_model(args, device, dtype, dtype_name, spread)
    except headinfer.UnsupportedModelError as exc:
        sub.error(str(exc))
    except ValueError as exc:
        sub.error(f"--{exc}")
    if spread[1] is not None:
        device = str(model.device)  # where the inputs go: the first layer's GPU, or this rank's
    main_rank = is_main_rank()
    try:
        headinfer.patch(
            model,
            chunk_size=args.chunk_size,
            gpu_budget=args.gpu_budget,
            kv_dtype=args.kv_dtype,
        )
    except headinfer.GpuNotSupportedError as exc:
        if args.device != "auto" or spread[1] is not None:
            sub.error(str(exc))
        print(f"{exc}; running on the CPU instead", file=sys.stderr)
        device = "cpu"
        model.to(device)
        headinfer.patch(
            model,
            chunk_size=args.chunk_size,
            gpu_budget=args.gpu_budget,
            kv_dtype=args.kv_dtype,
        )

    if args.chat:
        if getattr(tokenizer, "chat_template", None) is None:
            sub.error(f"--chat: {label}'s tokenizer has no chat template; leave out --chat")
        # A prompt file's trailing newline is not part of the question.
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": text.strip()}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        enc = tokenizer(text, return_tensors="pt")
    input_ids = enc["input_ids"].to(device)
    prompt_len = input_ids.shape[1]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_len + args.max_new_tokens > limit:
        sub.error(
            f"the prompt's {prompt_len:,} tokens + --max-new-tokens {args.max_new_tokens} are "
            f"more than {label}'s max_position_embeddings ({limit:,}): shorten the prompt or "
            "lower --max-new-tokens"
        )

    try:
        cache = headinfer.HeadInferCache(model)
    except ValueError as exc:  # e.g. kv_dtype="int8" where the device cannot hold it
        sub.error(f"--kv-dtype {args.kv_dtype}: {exc}" if "kv_dtype" in str(exc) else str(exc))
    cache.expected_new_tokens = args.max_new_tokens
    # Under torchrun every rank generates (their attention all-reduces); rank 0 prints.
    streamer = _TimedStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if not main_rank:
        streamer.put = lambda value: None  # type: ignore[method-assign]
        streamer.end = lambda: None  # type: ignore[method-assign]
    print(
        f"prefill: {prompt_len:,} tokens in chunks of {args.chunk_size:,} on "
        f"{spread[1] or device}...",
        file=sys.stderr,
        flush=True,
    )
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=args.max_new_tokens,
            streamer=streamer,
            **sampling,
            **{cache_kwarg_name(model): cache},
        )
    end = time.perf_counter()
    if not main_rank:
        return 0
    sys.stdout.write("\n")
    sys.stdout.flush()

    new = out.shape[1] - prompt_len
    times = streamer.token_times
    first = times[0] if times else end
    prefill_s = first - start
    decode_s = (times[-1] - first) if len(times) > 1 else 0.0
    steps = max(len(times) - 1, 0)
    lines = [
        f"prefill: {prompt_len:,} tokens in {prefill_s:.2f} s "
        f"({prompt_len / max(prefill_s, 1e-9):,.0f} tokens/s)",
        f"decode:  {new} tokens"
        + (f", {decode_s / steps * 1000:.1f} ms/token" if steps else "")
        + f" ({end - start:.2f} s in all)",
    ]
    mem = cache.memory()
    lines.append(
        f"KV cache{'' if args.kv_dtype == 'exact' else f' ({args.kv_dtype})'}: "
        f"{format_bytes(mem['used'])} for {cache.get_seq_length():,} tokens: "
        f"{format_bytes(mem['device_used'])} on the GPU, "
        f"{format_bytes(mem['used'] - mem['device_used'])} in host memory; blocks reserved: "
        f"{format_bytes(mem['host_reserved'])} host, {format_bytes(mem['device_reserved'])} GPU"
        + (" (this rank's kv heads)" if torchrun_world() > 1 else "")
    )
    if len(cache.stores) > 1:
        for name, figures in cache.memory_by_device().items():
            lines.append(
                f"  {name}: {format_bytes(figures['device_used'])} on the GPU, "
                f"{format_bytes(figures['used'] - figures['device_used'])} in host memory"
            )
    if device.startswith("cuda"):
        lines.append(f"GPU peak: {format_bytes(torch.cuda.max_memory_allocated())} by torch")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return 0


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """generate()'s decoding arguments: greedy unless a temperature (or top-p/top-k) is given."""
    if args.temperature == 0 and args.top_p is None and args.top_k is None:
        return {"do_sample": False}
    if args.temperature == 0:
        args.temperature = 1.0  # top-p/top-k alone: sample at the model's own temperature
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    kwargs: dict[str, Any] = {"do_sample": True, "temperature": args.temperature}
    # 0 and 1.0 switch them off (the model's generation config may set its own).
    kwargs["top_p"] = args.top_p if args.top_p is not None else 1.0
    kwargs["top_k"] = args.top_k if args.top_k is not None else 0
    return kwargs


class _TimedStreamer(TextStreamer):
    """transformers' ``TextStreamer`` (stdout), noting when each new token arrives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            self.token_times.append(time.perf_counter())
        self._prompt_seen = True
        super().put(value)


if __name__ == "__main__":
    sys.exit(main())
