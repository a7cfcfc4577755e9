"""RULER's synthetic tasks, generated locally, run through headinfer (and standard attention).

``python -m headinfer.eval.ruler --lengths 1024,4096 --compare standard`` builds RULER samples
(Hsieh et al., 2024, https://github.com/NVIDIA/RULER) with the model's own tokenizer at each
length, runs them by greedy decoding through headinfer, and prints RULER's scores per task and
length; ``--compare standard`` also runs the same model unpatched on the same samples and prints
both scores side by side with the share of identical outputs.

The tasks follow RULER's ``synthetic.yaml`` and ``constants.py`` (templates, answer prefixes,
tokens to generate, needle formats, haystacks):

- ``niah_single_1``: one number needle in the noise haystack ("The grass is green. ...").
- ``niah_single_2``, ``niah_single_3``: one needle (a number; a UUID) in an essay haystack.
- ``niah_multikey_1``: the needle among 3 distractor needles with other keys, essay haystack;
  ``niah_multikey_2``: the haystack is made of distractor needles; ``niah_multikey_3``: the
  same with UUIDs as keys and values.
- ``niah_multivalue``: 4 values for one key; ``niah_multiquery``: 4 keys queried.
- ``vt``: variable tracking, one chain of 4 hops ("VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE")
  in the noise haystack, after one worked example, as RULER adds it.
- ``cwe``: common words extraction (10 words repeated 30 times among words repeated 3 times; 6
  and 1 below 4096 tokens), after one worked example.
- ``fwe``: frequent words extraction from coded six-letter words drawn from a Zipf (alpha 2)
  distribution; the three most frequent after the top one ("...", noise) are the answer.

Differences from RULER, all because nothing is downloaded: the essay haystack is generated text
in the style of an essay (RULER uses Paul Graham's essays); needle keys and common words come
from a fixed word list in this file (RULER uses the ``wonderwords`` lists), extended by
generated pronounceable words where a long ``cwe`` sample needs more; the QA tasks (SQuAD,
HotpotQA) are left out. Each sample is fitted to its length (prompt plus ``max_new_tokens``, with
the chat template when the tokenizer has one) by a binary search on the haystack's size; the
answer prefix is placed after the assistant's turn opens, as RULER does, with surrounding spaces
stripped. A sample is determined by (seed, task, length, index).

Scoring is RULER's: predictions are stripped of control characters, and a sample scores the
fraction of its reference strings found in the prediction, ignoring case (``string_match_all``;
``string_match_part``, 1 if any is found, is what RULER uses for QA). A task's score is the mean
over its samples, times 100.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ...distributed import is_main_rank
from .. import _common as common
from .._common import Generator, load_model
from .haystack import WORDS, essay_words, word_pool
from .samples import RulerSample, make_sample
from .scoring import postprocess_pred, sample_score, string_match_all, string_match_part
from .tasks import NOISE, TASKS, TaskSpec

__all__ = [
    "NOISE",
    "TASKS",
    "WORDS",
    "RulerSample",
    "TaskSpec",
    "essay_words",
    "main",
    "make_sample",
    "postprocess_pred",
    "sample_score",
    "string_match_all",
    "string_match_part",
    "word_pool",
]

logger = logging.getLogger("headinfer.eval.ruler")


# ------------------------------------------------------------------------------------------
# The runner


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _task_list(text: str) -> list[str]:
    tasks = [part.strip() for part in text.split(",") if part.strip()]
    if tasks == ["all"]:
        return list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(
            f"unknown task(s) {', '.join(unknown) if unknown else repr(text)}; "
            f"the tasks are: {', '.join(TASKS)}"
        )
    return tasks


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m headinfer.eval.ruler",
        description="RULER's synthetic tasks, generated locally with the model's tokenizer, "
        "through headinfer; --compare standard also runs standard attention on the same "
        "samples.",
    )
    common.add_model_arguments(parser)
    parser.add_argument(
        "--lengths",
        type=_int_list,
        default=[1024, 2048, 4096],
        help="sequence lengths in tokens, prompt plus generated (default 1024,2048,4096)",
    )
    parser.add_argument(
        "--tasks",
        type=_task_list,
        default=list(TASKS),
        help=f"comma-separated tasks, or 'all' (default): {', '.join(TASKS)}",
    )
    parser.add_argument("--samples", type=int, default=10, help="samples per task and length (10)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate (default: each task's RULER value, 30 to 128)",
    )
    parser.add_argument("--seed", type=int, default=42, help="sample seed (42, as RULER)")
    parser.add_argument(
        "--compare",
        choices=["standard"],
        default=None,
        help="also run standard attention (the model unpatched) and compare",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="write one JSON line per sample here, and the scores with the run's settings and "
        "versions beside it (results.jsonl -> results.json)",
    )
    return parser


def _fmt(score: float | None) -> str:
    return "-" if score is None else f"{score:.2f}"


def _print_table(
    rows: list[dict[str, Any]], lengths: list[int], tasks: list[str], title: str, compare: bool
) -> None:
    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values) * 100, 2) if values else None

    print(title)
    header = f"{'task':<18}{'length':>8}{'samples':>9}{'headinfer':>11}"
    if compare:
        header += f"{'standard':>10}{'identical':>11}"
    print(header)
    print("-" * len(header))
    for length in lengths:
        task_scores: list[tuple[float | None, float | None]] = []
        for task in tasks:
            mine = [r for r in rows if r["task"] == task and r["length"] == length]
            score = mean([r["score"] for r in mine])
            line = f"{task:<18}{length:>8}{len(mine):>9}{_fmt(score):>11}"
            ref = None
            if compare:
                ref = mean([r["standard_score"] for r in mine])
                same = sum(r["identical"] for r in mine)
                line += f"{_fmt(ref):>10}{f'{same}/{len(mine)}':>11}"
            task_scores.append((score, ref))
            print(line)
        if len(tasks) > 1:
            avg = [s for s, _ in task_scores if s is not None]
            line = (
                f"{'average':<18}{length:>8}{'':>9}{_fmt(sum(avg) / len(avg) if avg else None):>11}"
            )
            if compare:
                refs = [r for _, r in task_scores if r is not None]
                line += f"{_fmt(sum(refs) / len(refs) if refs else None):>10}"
            print(line)
    if compare and rows:
        same = sum(r["identical"] for r in rows)
        print(f"identical outputs: {same}/{len(rows)} ({same / len(rows):.2f})")


def scores(rows: list[dict[str, Any]], compare: bool) -> dict[str, Any]:
    """Scores per task and length (``{task: {length: {...}}}``, lengths as strings): the mean
    score times 100, the number of samples, and with ``compare`` the standard attention's score
    and how many outputs were identical."""
    table: dict[str, Any] = {}
    for row in rows:
        cell = table.setdefault(row["task"], {}).setdefault(str(row["length"]), [])
        cell.append(row)
    results: dict[str, Any] = {}
    for task, by_length in table.items():
        results[task] = {}
        for length, cell in by_length.items():
            entry: dict[str, Any] = {
                "score": round(sum(r["score"] for r in cell) / len(cell) * 100, 2),
                "samples": len(cell),
            }
            if compare:
                entry["standard_score"] = round(
                    sum(r["standard_score"] for r in cell) / len(cell) * 100, 2
                )
                entry["identical"] = sum(bool(r["identical"]) for r in cell)
            results[task][length] = entry
    return results


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run RULER; print the scores table to stdout. Returns 0."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    common.check_positive(parser, args, "samples", "max_new_tokens", "chunk_size")
    device, dtype = common.run_setup(args)
    try:
        model, tokenizer = load_model(args.model, device, dtype, args.gpus)
    except ValueError as exc:
        parser.error(f"--{exc}")
    positions = common.model_positions(model)
    if positions is not None and max(args.lengths) > positions:
        parser.error(
            f"--lengths: {max(args.lengths)} is more than the model's {positions} positions"
        )

    jobs = [(n, t, i) for n in args.lengths for t in args.tasks for i in range(args.samples)]
    samples: list[RulerSample] = []
    for length, task, index in tqdm(jobs, desc="building samples", unit="sample", file=sys.stderr):
        try:
            sample = make_sample(tokenizer, task, length, index, args.seed, args.max_new_tokens)
        except ValueError as exc:
            parser.error(f"--lengths: {length}: {exc}")
        samples.append(sample)

    compare = args.compare == "standard"
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    generator = Generator(model, tokenizer, args.chunk_size, device, args.gpu_budget, args.kv_dtype)
    with common.records_file(args.out, "w") as write, generator:
        bar = tqdm(samples, desc="RULER", unit="sample", file=sys.stderr)
        for sample in bar:
            bar.set_postfix_str(f"{sample.task} @ {sample.length}")
            metric = TASKS[sample.task].metric
            got = generator.generate(sample.input_ids, sample.max_new_tokens)
            prediction = postprocess_pred(got.text)
            row: dict[str, Any] = {
                "task": sample.task,
                "length": sample.length,
                "index": sample.index,
                "seed": sample.seed,
                "prompt_tokens": sample.num_tokens,
                "max_new_tokens": sample.max_new_tokens,
                "references": sample.references,
                "prediction": prediction,
                "score": sample_score(prediction, sample.references, metric),
                "seconds": round(got.seconds, 3),
            }
            if compare:
                ref = generator.generate(sample.input_ids, sample.max_new_tokens, standard=True)
                ref_prediction = postprocess_pred(ref.text)
                row["standard_prediction"] = ref_prediction
                row["standard_score"] = sample_score(ref_prediction, sample.references, metric)
                row["standard_seconds"] = round(ref.seconds, 3)
                row["identical"] = ref.token_ids == got.token_ids
            rows.append(row)
            write(row)

    title = (
        f"RULER: {args.model}, {len(args.tasks)} task(s) x {len(args.lengths)} length(s) x "
        f"{args.samples} sample(s), seed {args.seed}, {device}, chunk_size {args.chunk_size}, "
        f"kv_dtype {args.kv_dtype}, "
        f"{time.perf_counter() - start:.0f} s"
    )
    if not is_main_rank():  # under torchrun every rank runs; rank 0 prints and writes
        return 0
    _print_table(rows, args.lengths, args.tasks, title, compare)
    config = {
        "lengths": args.lengths,
        "tasks": args.tasks,
        "samples": args.samples,
        "seed": args.seed,
    }
    common.report(args, "ruler", device, dtype, config, scores(rows, compare), start, "sample")
    return 0
