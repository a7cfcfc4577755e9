"""LongBench v2 (Bai et al., 2024, https://github.com/THUDM/LongBench) through headinfer.

``python -m headinfer.eval.longbench --data data.json --out results.jsonl`` reads the
benchmark's JSON file (a list of objects with ``_id, domain, sub_domain, difficulty, length,
question, choice_A, choice_B, choice_C, choice_D, answer, context``), asks each question with
LongBench v2's zero-shot prompt (``prompts/0shot.txt``), greedy-decodes the answer through
headinfer and prints the accuracy overall, by difficulty (easy, hard) and by length (short,
medium, long), as the paper's Table 1 does.

As in LongBench v2's ``pred.py``: a prompt longer than ``--max-context`` tokens is cut in the
middle (its first and last halves are kept) before the chat template is applied; the answer is
read from "The correct answer is (X)" or "The correct answer is X" (asterisks removed first),
and an item is right when that letter is its ``answer``. Decoding is greedy (LongBench v2 samples
at temperature 0.1), so that headinfer and standard attention can be compared token for token
with ``--compare standard``.

With ``--out``, each item's result is one JSON line, written as soon as it is done; rerunning
with the same ``--out`` skips the ``_id``\\ s already there and scores everything in the file
(each record names its ``--kv-dtype``; a file of another one is refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..distributed import is_main_rank
from . import _common as common
from ._common import Generator, load_model

__all__ = [
    "FIELDS",
    "TEMPLATE",
    "LongBenchDataError",
    "build_prompt",
    "extract_answer",
    "load_data",
    "main",
    "read_results",
    "scores",
    "truncate_middle",
]

logger = logging.getLogger("headinfer.eval.longbench")

#: LongBench v2's prompts/0shot.txt.
TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n"
    "(C) $C_C$\n(D) $C_D$\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)

#: The fields every item must have (all strings).
FIELDS = (
    "_id",
    "domain",
    "sub_domain",
    "difficulty",
    "length",
    "question",
    "choice_A",
    "choice_B",
    "choice_C",
    "choice_D",
    "answer",
    "context",
)
DIFFICULTIES = ("easy", "hard")
LENGTHS = ("short", "medium", "long")
CHOICES = ("A", "B", "C", "D")


class LongBenchDataError(ValueError):
    """The data file is not in LongBench v2's format; the message says where and why."""


def _read_items(path: Path) -> Any:
    # A JSON list (the benchmark's data.json), or JSON lines (one item per line).
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if not text.lstrip().startswith("{"):
            raise LongBenchDataError(f"{path}: not valid JSON ({exc})") from None
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise LongBenchDataError(
                f"{path}: line {number} is not valid JSON ({exc}); expected a JSON list of "
                "items, or one item per line"
            ) from None
    return items


def load_data(path: str | Path) -> list[dict[str, Any]]:
    """Read and check a LongBench v2 data file: a JSON list of items (the benchmark's
    ``data.json``) or JSON lines (one item per line).

    Raises:
        FileNotFoundError: no such file.
        LongBenchDataError: not JSON, not a list of objects, or an item lacks a field, has a
            field that is not a string, an ``answer`` not in A-D, a ``difficulty`` not easy/hard,
            a ``length`` not short/medium/long, or an ``_id`` seen before.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LongBench data file not found: {path}")
    data = _read_items(path)
    if not isinstance(data, list):
        raise LongBenchDataError(
            f"{path}: expected a JSON list of LongBench v2 items (objects with the fields "
            f"{', '.join(FIELDS)}), got a JSON {type(data).__name__}"
        )
    seen: set[str] = set()
    for number, item in enumerate(data):
        where = f"{path}: item {number}"
        if not isinstance(item, dict):
            raise LongBenchDataError(f"{where}: expected an object, got {type(item).__name__}")
        if isinstance(item.get("_id"), str):
            where += f" (_id {item['_id']!r})"
        missing = [name for name in FIELDS if name not in item]
        if missing:
            names = ", ".join(repr(m) for m in missing)
            plural = "s" if len(missing) > 1 else ""
            raise LongBenchDataError(f"{where}: missing field{plural} {names}")
        for name in FIELDS:
            if not isinstance(item[name], str):
                raise LongBenchDataError(
                    f"{where}: field {name!r} must be a string, got {type(item[name]).__name__}"
                )
        for name, allowed in (
            ("answer", CHOICES),
            ("difficulty", DIFFICULTIES),
            ("length", LENGTHS),
        ):
            if item[name] not in allowed:
                raise LongBenchDataError(
                    f"{where}: field {name!r} must be one of {', '.join(allowed)}, "
                    f"got {item[name]!r}"
                )
        if item["_id"] in seen:
            raise LongBenchDataError(f"{where}: _id {item['_id']!r} appears twice")
        seen.add(item["_id"])
    return data


def build_prompt(item: dict[str, Any]) -> str:
    """LongBench v2's zero-shot prompt for one item (its fields stripped, as ``pred.py`` does)."""
    return (
        TEMPLATE.replace("$DOC$", item["context"].strip())
        .replace("$Q$", item["question"].strip())
        .replace("$C_A$", item["choice_A"].strip())
        .replace("$C_B$", item["choice_B"].strip())
        .replace("$C_C$", item["choice_C"].strip())
        .replace("$C_D$", item["choice_D"].strip())
    )


def truncate_middle(tokenizer: Any, prompt: str, max_tokens: int) -> tuple[str, bool]:
    """Cut ``prompt`` to ``max_tokens`` tokens in the middle, as LongBench does.

    The first ``max_tokens // 2`` and the last ``max_tokens - max_tokens // 2`` tokens are kept
    and decoded back into text. Returns ``(text, whether it was cut)``.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens: must be positive, got {max_tokens}")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return prompt, False
    kept = list(ids[: max_tokens // 2]) + list(ids[-(max_tokens - max_tokens // 2) :])
    return tokenizer.decode(kept, skip_special_tokens=True), True


_ANSWER_PAREN = re.compile(r"The correct answer is \(([A-D])\)")
_ANSWER_BARE = re.compile(r"The correct answer is ([A-D])")


def extract_answer(response: str) -> str | None:
    """The chosen letter, as LongBench v2's ``extract_answer``: "The correct answer is (X)",
    else "The correct answer is X", after removing asterisks; ``None`` if neither is there."""
    response = response.replace("*", "")
    match = _ANSWER_PAREN.search(response) or _ANSWER_BARE.search(response)
    return match.group(1) if match else None


def read_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """The records of a results file by ``_id`` (empty if the file does not exist).

    A last line cut short (a run that was stopped while writing) is ignored with a warning.

    Raises:
        LongBenchDataError: a line other than the last is not a JSON object with an ``_id``.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    records: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("_id"), str):
                raise ValueError("not an object with an '_id'")
        except ValueError as exc:
            if number == len(lines):
                logger.warning("%s: ignoring its incomplete last line (%s)", path, exc)
                continue
            raise LongBenchDataError(
                f"{path}: line {number} is not a result record ({exc})"
            ) from None
        records[record["_id"]] = record
    return records


def _percent(right: float, total: int) -> float | None:
    return round(100 * right / total, 1) if total else None


def scores(records: Iterable[dict[str, Any]], judge: str = "judge") -> dict[str, Any]:
    """Accuracy in percent (1 decimal; ``None`` where there is no item) overall, by difficulty
    and by length, with the number of items in each, as LongBench v2's Table 1."""
    records = list(records)
    groups: dict[str, list[dict[str, Any]]] = {"overall": records}
    for value in DIFFICULTIES:
        groups[value] = [r for r in records if r["difficulty"] == value]
    for value in LENGTHS:
        groups[value] = [r for r in records if r["length"] == value]
    return {
        name: {"accuracy": _percent(sum(bool(r[judge]) for r in rows), len(rows)), "n": len(rows)}
        for name, rows in groups.items()
    }


def _print_scores(records: list[dict[str, Any]], compare: bool, title: str) -> None:
    columns = ["overall", *DIFFICULTIES, *LENGTHS]
    print(title)
    header = f"{'':<12}" + "".join(f"{c.capitalize():>10}" for c in columns)
    print(header)
    print("-" * len(header))
    rows = [("headinfer", "judge")]
    if compare:
        rows.append(("standard", "standard_judge"))
    for name, judge in rows:
        table = scores(records, judge)
        accuracies = [table[c]["accuracy"] for c in columns]
        cells = "".join(f"{'-' if a is None else f'{a:.1f}':>10}" for a in accuracies)
        print(f"{name:<12}{cells}")
    table = scores(records)
    print(f"{'items':<12}" + "".join(f"{table[c]['n']:>10}" for c in columns))
    if compare and records:
        same = sum(bool(r["identical"]) for r in records)
        print(f"identical outputs: {same}/{len(records)} ({same / len(records):.2f})")


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m headinfer.eval.longbench",
        description="LongBench v2 (multiple choice, zero-shot) through headinfer.",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="LongBench v2's data.json (a JSON list), or the same items as JSON lines",
    )
    common.add_model_arguments(parser)
    parser.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="cut longer prompts in the middle to this many tokens (default: the model's "
        "positions less --max-new-tokens and the chat template)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens to generate (128, as LongBench v2)"
    )
    parser.add_argument("--limit", type=int, default=None, help="run only the first N items")
    parser.add_argument(
        "--compare",
        choices=["standard"],
        default=None,
        help="also run standard attention (the model unpatched) on every item and compare",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="results, one JSON line per item; items already in it are skipped (resume); "
        "the scores with the run's settings and versions go beside it (results.jsonl -> "
        "results.json)",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run LongBench v2; print the scores table to stdout. Returns 0, or 2 for bad input."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    common.check_positive(parser, args, "max_context", "max_new_tokens", "limit", "chunk_size")
    try:
        data = load_data(args.data)
        done = read_results(args.out) if args.out else {}
    except (FileNotFoundError, LongBenchDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device, dtype = common.run_setup(args)
    if args.limit is not None:
        data = data[: args.limit]
    compare = args.compare == "standard"
    earlier = [done[i["_id"]] for i in data if i["_id"] in done]
    if compare and any("standard_judge" not in r for r in earlier):
        print(
            f"error: {args.out} holds results run without --compare standard; use another --out",
            file=sys.stderr,
        )
        return 2
    # Records before the 8-bit mode carry no kv_dtype: they are exact.
    other = sorted({r.get("kv_dtype", "exact") for r in earlier} - {args.kv_dtype})
    if other:
        print(
            f"error: {args.out} holds results of --kv-dtype {', '.join(other)}, not "
            f"{args.kv_dtype}; use another --out",
            file=sys.stderr,
        )
        return 2
    todo = [item for item in data if item["_id"] not in done]
    if done:
        logger.info(
            "%s: %d of %d items already done, %d to run",
            args.out,
            len(data) - len(todo),
            len(data),
            len(todo),
        )

    results = {r["_id"]: r for r in earlier}
    start = time.perf_counter()
    if todo:
        try:
            model, tokenizer = load_model(args.model, device, dtype, args.gpus)
        except ValueError as exc:
            parser.error(f"--{exc}")
        positions = common.model_positions(model)
        max_context = args.max_context
        if max_context is None:
            if positions is None:
                parser.error("--max-context: the model does not say its length; give one")
            overhead = len(common.encode(tokenizer, common.render_prompt(tokenizer, "")))
            max_context = positions - args.max_new_tokens - overhead
            if max_context <= 0:
                parser.error(f"--max-new-tokens: {args.max_new_tokens} leaves no room for a prompt")
        generator = Generator(
            model, tokenizer, args.chunk_size, device, args.gpu_budget, args.kv_dtype
        )
        with common.records_file(args.out, "a") as write, generator:
            bar = tqdm(todo, desc="LongBench v2", unit="item", file=sys.stderr)
            for item in bar:
                prompt, cut = truncate_middle(tokenizer, build_prompt(item), max_context)
                ids = common.encode(tokenizer, common.render_prompt(tokenizer, prompt))
                got = generator.generate(ids, args.max_new_tokens)
                pred = extract_answer(got.text)
                record = {k: item[k] for k in FIELDS if k != "context"}
                record.update(
                    kv_dtype=args.kv_dtype,
                    prompt_tokens=len(ids),
                    truncated=cut,
                    response=got.text.strip(),
                    pred=pred,
                    judge=pred == item["answer"],
                    seconds=round(got.seconds, 3),
                )
                if compare:
                    ref = generator.generate(ids, args.max_new_tokens, standard=True)
                    ref_pred = extract_answer(ref.text)
                    record.update(
                        standard_response=ref.text.strip(),
                        standard_pred=ref_pred,
                        standard_judge=ref_pred == item["answer"],
                        standard_seconds=round(ref.seconds, 3),
                        identical=ref.token_ids == got.token_ids,
                    )
                results[item["_id"]] = record
                write(record)

    records = [results[i["_id"]] for i in data if i["_id"] in results]
    title = (
        f"LongBench v2: {args.model}, {len(records)} item(s) ({len(todo)} run now, "
        f"{len(records) - len(todo)} from {args.out}), {time.perf_counter() - start:.0f} s"
        if done
        else f"LongBench v2: {args.model}, {len(records)} item(s), "
        f"{time.perf_counter() - start:.0f} s"
    )
    if not is_main_rank():  # under torchrun every rank runs; rank 0 prints and writes
        return 0
    _print_scores(records, compare, title)
    table: dict[str, Any] = {"headinfer": scores(records)}
    if compare:
        table["standard"] = scores(records, "standard_judge")
        table["identical"] = sum(bool(r["identical"]) for r in records)
    config = {"data": str(args.data), "max_context": args.max_context, "limit": args.limit}
    common.report(args, "longbench_v2", device, dtype, config, table, start, "item")
    return 0


if __name__ == "__main__":
    sys.exit(main())
