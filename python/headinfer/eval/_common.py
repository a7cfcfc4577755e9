"""What the evaluation runners share: loading a model, prompts, greedy generation through
headinfer and through standard attention, command-line options and JSON lines output.

``Generator`` runs one model both ways: ``generate(ids, n)`` through headinfer (the model is
patched with ``headinfer.patch(model, chunk_size=..., kv_dtype=...)``), ``generate(ids, n,
standard=True)``
through the same model unpatched (standard attention, transformers' own cache). It patches and
unpatches the model as needed and ``close()`` leaves it as it found it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import logging
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import headinfer

from .. import _command

__all__ = [
    "DTYPES",
    "Generation",
    "Generator",
    "add_model_arguments",
    "check_positive",
    "encode",
    "has_chat_template",
    "load_model",
    "model_positions",
    "pick_device",
    "pick_dtype",
    "records_file",
    "render_prompt",
    "report",
    "results_path",
    "run_config",
    "run_setup",
    "setup_logging",
    "write_results",
]

logger = logging.getLogger("headinfer.eval")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: ``--model`` value for the bundled SmolLM2-135M-Instruct (headinfer.smollm2.load_smollm2).
SMOLLM2 = "smollm2"


def pick_device(name: str) -> str:
    """``"auto"``: CUDA where torch sees a GPU, else the CPU; else the name, checked
    (``ValueError`` for a device this machine has not, or headinfer does not run on)."""
    from ..device import resolve_device

    return resolve_device(name)


def pick_dtype(name: str, device: str) -> torch.dtype:
    """``"auto"``: float32 on the CPU, bfloat16 on a GPU; else a name ``parse_dtype`` takes
    (``bf16``, ``fp16``, ``fp32``, or the torch names)."""
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    from ..plan import parse_dtype

    return DTYPES[parse_dtype(name)]


def load_model(
    name: str, device: str = "cpu", dtype: torch.dtype | None = None, gpus: int | None = None
) -> Any:
    """``(model, tokenizer)`` for a Hugging Face name or folder, or ``"smollm2"``.

    The model uses standard attention (``sdpa``), is on ``device`` and in eval mode. With
    ``gpus > 1`` its layers spread over GPUs ``0..gpus-1`` (``device_map="auto"``); under
    torchrun it is split by tensor parallelism over the processes instead
    (``headinfer.distributed.placement``).

    Raises:
        ValueError: ``gpus`` this machine or launch cannot give (the message names it).
    """
    from ..distributed import placement

    dtype = dtype if dtype is not None else torch.float32
    spread, how = placement(gpus)
    if _command.is_smollm2(name, how):
        from ..smollm2 import load_smollm2

        return load_smollm2(dtype=dtype, device=device, attn_implementation="sdpa")
    start = time.perf_counter()
    model, tokenizer = _command.load_pretrained(name, dtype, spread, attn_implementation="sdpa")
    if how is not None:
        logger.info("loaded %s: %s", name, how)
    else:
        model.to(device)
        logger.info("loaded %s in %.1f s", name, time.perf_counter() - start)
    return model, tokenizer


def model_positions(model: Any) -> int | None:
    """The model's maximum number of positions (prompt plus generated tokens), if it says."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, user: str, answer_prefix: str = "") -> str:
    """The model's input text: ``user`` as one user turn of the chat template (when the
    tokenizer has one), the assistant's turn opened, and ``answer_prefix`` after it.

    Without a chat template: ``user`` followed by ``answer_prefix`` after a space.
    """
    answer_prefix = answer_prefix.strip()
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{text}{answer_prefix}"
    return f"{user} {answer_prefix}" if answer_prefix else user


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt made by ``render_prompt``.

    A chat template writes its special tokens into the text, so none are added then; without
    one, the tokenizer adds its own (e.g. a BOS token).
    """
    add = not has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


@dataclass(frozen=True)
class Generation:
    """One greedy generation.

    Attributes:
        token_ids: the new tokens (the prompt excluded), end-of-sequence token included if any.
        text: ``token_ids`` decoded, special tokens skipped.
        seconds: wall time of ``generate()`` (prefill and decode).
    """

    token_ids: list[int]
    text: str
    seconds: float


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    # patch()/unpatch() log at INFO each time; the runners switch for every sample.
    library = logging.getLogger("headinfer")
    level = library.level
    library.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        library.setLevel(level)


class Generator:
    """Greedy generation with one model, through headinfer or through standard attention.

    Args:
        model: a causal LM that ``headinfer.patch`` supports, unpatched.
        tokenizer: its tokenizer (for decoding).
        chunk_size: headinfer's prefill chunk, in tokens.
        device: where the inputs go (the model's device).
        gpu_budget: ``patch``'s ``gpu_budget``.
        kv_dtype: ``patch``'s ``kv_dtype``: ``"exact"`` or ``"int8"``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        chunk_size: int,
        device: str,
        gpu_budget: int | None = None,
        kv_dtype: str = "exact",
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.device = device
        if getattr(model, "hf_device_map", None) or (getattr(model, "_tp_size", None) or 1) > 1:
            # Spread over GPUs (--gpus, torchrun): inputs go to the first layer's, or this rank's.
            self.device = str(model.device)
        self.gpu_budget = gpu_budget
        self.kv_dtype = kv_dtype
        self._was_patched = headinfer.is_patched(model)
        self._announced = False

    def _patch(self) -> None:
        headinfer.patch(
            self.model,
            chunk_size=self.chunk_size,
            gpu_budget=self.gpu_budget,
            kv_dtype=self.kv_dtype,
        )

    def _use_headinfer(self, on: bool) -> None:
        if on == headinfer.is_patched(self.model):
            return
        if on and not self._announced:
            self._patch()
            self._announced = True
            return
        with _quiet_library():
            if on:
                self._patch()
            else:
                headinfer.unpatch(self.model)

    def generate(
        self, input_ids: Sequence[int], max_new_tokens: int, *, standard: bool = False
    ) -> Generation:
        """Greedy decoding of up to ``max_new_tokens`` tokens after ``input_ids``.

        Args:
            input_ids: the prompt's token ids (batch size 1).
            max_new_tokens: the most tokens to generate (fewer at end of sequence).
            standard: run the model unpatched (standard attention) instead of through headinfer.
        """
        self._use_headinfer(not standard)
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1] :].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(token_ids=new, text=text, seconds=seconds)

    def close(self) -> None:
        """Leave the model patched or unpatched, as it was given."""
        self._use_headinfer(self._was_patched)

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--chunk-size``, ``--gpu-budget``,
    ``--kv-dtype``, ``--gpus``, ``-v``."""
    parser.add_argument(
        "--model",
        default=SMOLLM2,
        help="Hugging Face name or folder, or 'smollm2' for the bundled SmolLM2-135M-Instruct "
        "(default)",
    )
    _command.add_device(parser)
    parser.add_argument(
        "--dtype",
        type=_command.dtype_or_auto,
        default="auto",
        help="weights' dtype: bf16, fp16, fp32 (default auto: fp32 on the CPU, bf16 on a GPU)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=4096, help="headinfer's prefill chunk (4096)"
    )
    _command.add_gpu_budget(parser)
    _command.add_kv_dtype(parser, "headinfer's cache holds")
    parser.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="spread the model's layers over GPUs 0..N-1 (device_map='auto'); under torchrun "
        "(torchrun --nproc-per-node N -m headinfer eval ...) tensor parallelism over its "
        "processes instead (leave --gpus out, or give the process count); only rank 0 writes",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_config(args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config`` and ``versions`` entries of a results file (lm-eval's layout)."""
    import transformers

    return {
        "config": {
            "model": args.model,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "chunk_size": args.chunk_size,
            "gpu_budget": args.gpu_budget,
            "kv_dtype": args.kv_dtype,
            "gpus": args.gpus,
            "max_new_tokens": args.max_new_tokens,
        },
        "versions": {
            "headinfer": headinfer.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "accelerate": _version("accelerate"),
        },
    }


def results_path(out: str | Path) -> Path:
    """Where the results JSON goes: beside the per-sample ``out`` file, ``.json`` for its
    ``.jsonl`` (``run.jsonl`` -> ``run.json``; ``run.json`` -> ``run.results.json``)."""
    out = Path(out)
    path = out.with_suffix(".json")
    return out.with_name(out.name + ".results.json") if path == out else path


def run_setup(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """Logging as ``-v`` asks, and the run's device and dtype (``--device``, ``--dtype``)."""
    setup_logging(args.verbose)
    device = pick_device(args.device)
    return device, pick_dtype(args.dtype, device)


def write_results(
    out: str | Path, benchmark: str, header: dict[str, Any], results: dict[str, Any], **extra: Any
) -> Path:
    """Write the results JSON beside ``out`` (``results_path``) and return its path.

    ``{"benchmark", "date", "config", "versions", "results", "samples_file", ...extra}``: the
    scores per task and length (or group) as lm-eval's ``results`` holds them per task.
    """
    path = results_path(out)
    from ..distributed import is_main_rank

    if not is_main_rank():  # under torchrun every rank runs; rank 0 writes
        return path
    record = {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **header,
        "results": results,
        "samples_file": Path(out).name,
        **extra,
    }
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


@contextlib.contextmanager
def records_file(path: str | None, mode: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """The per-sample output file, as a function that writes one record to it as a JSON line,
    flushed (so a run that stops keeps what it did); it writes nothing when ``path`` is
    ``None``, or under torchrun on ranks other than 0."""
    from ..distributed import is_main_rank

    if path is None or not is_main_rank():
        yield lambda record: None
        return
    out = Path(path)
    if out.parent != Path():
        out.parent.mkdir(parents=True, exist_ok=True)
    with out.open(mode, encoding="utf-8") as stream:

        def write(record: dict[str, Any]) -> None:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            stream.flush()

        yield write


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """``parser.error`` for the first of the options ``names`` (dests) given as 0 or less."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')}: must be positive, got {value}")


def report(
    args: argparse.Namespace,
    benchmark: str,
    device: str,
    dtype: torch.dtype,
    config: dict[str, Any],
    results: dict[str, Any],
    start: float,
    unit: str,
) -> None:
    """With ``--out``: write the results JSON beside it (``write_results``; ``config``: the
    benchmark's own settings) and print where both files are."""
    if not args.out:
        return
    header = run_config(args, device, dtype)
    header["config"].update(config)
    seconds = round(time.perf_counter() - start, 1)
    summary = write_results(args.out, benchmark, header, results, seconds=seconds)
    print(f"results: {args.out} (per {unit}), {summary} (scores)")
