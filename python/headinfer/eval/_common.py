"""What the evaluation runners share: loading a model, prompts, greedy generation through
headinfer and through standard attention, command-line options and JSON lines output.

``Generator`` runs one model both ways: ``generate(ids, n)`` through headinfer (the model is
patched with ``headinfer.patch(model, chunk_size=...)``), ``generate(ids, n, standard=True)``
through the same model unpatched (standard attention, transformers' own cache). It patches and
unpatches the model as needed and ``close()`` leaves it as it found it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

import headinfer

__all__ = [
    "DTYPES",
    "Generation",
    "Generator",
    "add_model_arguments",
    "encode",
    "has_chat_template",
    "load_model",
    "model_positions",
    "open_output",
    "pick_device",
    "pick_dtype",
    "render_prompt",
    "setup_logging",
    "write_record",
]

logger = logging.getLogger("headinfer.eval")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: ``--model`` value for the bundled SmolLM2-135M-Instruct (headinfer.smollm2.load_smollm2).
SMOLLM2 = "smollm2"


def pick_device(name: str) -> str:
    """``"auto"``: CUDA where torch sees a GPU, else the CPU; any other name is kept."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    """``"auto"``: float32 on the CPU, bfloat16 on a GPU; else one of ``DTYPES``."""
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return DTYPES[name]


def load_model(name: str, device: str = "cpu", dtype: torch.dtype | None = None) -> Any:
    """``(model, tokenizer)`` for a Hugging Face name or folder, or ``"smollm2"``.

    The model uses standard attention (``sdpa``), is on ``device`` and in eval mode.
    """
    dtype = dtype if dtype is not None else torch.float32
    if name.lower() == SMOLLM2:
        from ..smollm2 import load_smollm2

        return load_smollm2(dtype=dtype, device=device, attn_implementation="sdpa")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model: Any = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
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
    """

    def __init__(self, model: Any, tokenizer: Any, chunk_size: int, device: str) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.device = device
        self._was_patched = headinfer.is_patched(model)
        self._announced = False

    def _use_headinfer(self, on: bool) -> None:
        if on == headinfer.is_patched(self.model):
            return
        if on and not self._announced:
            headinfer.patch(self.model, chunk_size=self.chunk_size)
            self._announced = True
            return
        with _quiet_library():
            if on:
                headinfer.patch(self.model, chunk_size=self.chunk_size)
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
    """``--model``, ``--device``, ``--dtype``, ``--chunk-size``, ``-v``."""
    parser.add_argument(
        "--model",
        default=SMOLLM2,
        help="Hugging Face name or folder, or 'smollm2' for the bundled SmolLM2-135M-Instruct "
        "(default)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default="auto",
        help="weights' dtype (auto: float32 on the CPU, bfloat16 on a GPU)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=4096, help="headinfer's prefill chunk (4096)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def write_record(stream: IO[str], record: dict[str, Any]) -> None:
    """One JSON line, flushed (so a run that stops keeps what it did)."""
    stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    stream.flush()


def open_output(path: str | None, mode: str) -> IO[str] | None:
    if path is None:
        return None
    out = Path(path)
    if out.parent != Path():
        out.parent.mkdir(parents=True, exist_ok=True)
    return out.open(mode, encoding="utf-8")
