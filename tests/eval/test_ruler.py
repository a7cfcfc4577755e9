"""headinfer.eval.ruler: RULER's task generators, its scorer, and a run of SmolLM2 through
headinfer and standard attention on the same samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import headinfer
from headinfer.eval import ruler
from headinfer.eval.ruler import (
    TASKS,
    make_sample,
    postprocess_pred,
    sample_score,
    string_match_all,
    string_match_part,
)

# ------------------------------------------------------------------------------ generators


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("task", list(TASKS))
def test_sample_fits_its_length_and_holds_its_answer(
    smollm2_tokenizer: Any, task: str, length: int
) -> None:
    sample = make_sample(smollm2_tokenizer, task, length, index=0, seed=42)
    total = sample.num_tokens + sample.max_new_tokens
    assert total <= length
    # Fitted: at most about one haystack unit (a sentence, needle or word) short.
    assert total >= length - 64, (total, length)
    assert sample.max_new_tokens == TASKS[task].tokens_to_generate
    assert sample.input_ids == smollm2_tokenizer(sample.text, add_special_tokens=False)["input_ids"]
    # The chat template is used, and the answer prefix opens the assistant's turn.
    assert sample.text.startswith("<|im_start|>")
    assert "<|im_start|>assistant\n" in sample.text
    assert not sample.text.endswith((" ", "\n"))
    assert sample.references
    prompt = sample.text.split("<|im_start|>assistant")[0]
    for reference in sample.references:
        assert reference in prompt, reference


@pytest.mark.parametrize("task", list(TASKS))
def test_sample_is_determined_by_seed_task_length_index(smollm2_tokenizer: Any, task: str) -> None:
    first = make_sample(smollm2_tokenizer, task, 1024, index=0, seed=7)
    again = make_sample(smollm2_tokenizer, task, 1024, index=0, seed=7)
    assert (first.text, first.references) == (again.text, again.references)
    assert first.input_ids == again.input_ids
    assert make_sample(smollm2_tokenizer, task, 1024, index=0, seed=8).text != first.text
    assert make_sample(smollm2_tokenizer, task, 1024, index=1, seed=7).text != first.text


def test_task_shapes(smollm2_tokenizer: Any) -> None:
    def sample(task: str, length: int = 2048) -> Any:
        return make_sample(smollm2_tokenizer, task, length, seed=3)

    single = sample("niah_single_1")
    assert ruler.NOISE in single.text
    assert len(single.references) == 1 and len(single.references[0]) == 7
    assert "A special magic number is hidden" in single.text
    assert single.text.endswith("mentioned in the provided text is")
    assert single.references[0].isdigit()
    uuid_value = sample("niah_single_3").references[0]
    assert len(uuid_value) == 36 and uuid_value.count("-") == 4
    multikey = sample("niah_multikey_1")
    assert multikey.text.count("One of the special magic numbers for") == 4
    assert sample("niah_multikey_2").text.count("One of the special magic numbers for") > 20
    multikey_3 = sample("niah_multikey_3")
    assert len(multikey_3.references[0]) == 36
    assert "special magic uuid for " in multikey_3.text
    multivalue = sample("niah_multivalue")
    assert len(multivalue.references) == 4
    assert "Some special magic numbers are hidden" in multivalue.text
    multiquery = sample("niah_multiquery")
    assert len(multiquery.references) == 4 and ", and " in multiquery.text

    vt = sample("vt")
    assert len(vt.references) == 5 and all(len(v) == 5 and v.isupper() for v in vt.references)
    value = vt.text.split("are assigned the value ")[-1].split(",")[0]
    assert f"VAR {vt.references[0]} = {value}" in vt.text
    for before, after in zip(vt.references, vt.references[1:]):
        assert f"VAR {after} = VAR {before}" in vt.text
    assert vt.text.count("Memorize and track") == 2  # the worked example, then the task

    for length, common_repeats in ((2048, 6), (4096, 30)):
        cwe = sample("cwe", length)
        listed = cwe.text.split("the list are:")[1].split("Question:")[0].split()
        words = [w for w in listed if not w.endswith(".")]
        assert len(cwe.references) == 10
        for word in cwe.references:
            assert words.count(word) == common_repeats, (length, word)

    fwe = sample("fwe")
    coded = fwe.text.split("coded words. ")[1].split("\nQuestion")[0].split()
    counts = sorted(((coded.count(w), w) for w in set(coded) if w != "..."), reverse=True)
    assert [w for _, w in counts[:3]] == fwe.references
    assert coded.count("...") > counts[0][0]


def test_max_new_tokens_and_errors(smollm2_tokenizer: Any) -> None:
    sample = make_sample(smollm2_tokenizer, "niah_single_2", 1024, max_new_tokens=8)
    assert sample.max_new_tokens == 8
    assert 1024 - 64 <= sample.num_tokens + 8 <= 1024
    with pytest.raises(ValueError, match="unknown RULER task 'qa_1'"):
        make_sample(smollm2_tokenizer, "qa_1", 1024)
    with pytest.raises(ValueError, match="too few"):
        make_sample(smollm2_tokenizer, "vt", 300)


def test_word_lists_are_large_and_deterministic() -> None:
    assert len(ruler.WORDS) >= 700 and len(set(ruler.WORDS)) == len(ruler.WORDS)
    pool = ruler.word_pool(5000)
    assert len(pool) == 5000 and len(set(pool)) == 5000
    assert pool[: len(ruler.WORDS)] == ruler.WORDS
    assert ruler.word_pool(3000) == pool[:3000]
    assert ruler.essay_words(500) == ruler.essay_words(1000)[:500]


# ------------------------------------------------------------------------------ scorer


def test_scorer_is_rulers() -> None:
    assert postprocess_pred("  1234\x00567\t \n") == "1234\n567"
    assert sample_score("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert sample_score("Only 123 here", ["123", "456", "789"]) == pytest.approx(1 / 3)
    assert sample_score("HELLO-World", ["hello-world"]) == 1.0  # case is ignored
    assert sample_score("nothing", ["123"]) == 0.0
    assert sample_score("Only 123 here", ["123", "456"], "part") == 1.0
    assert sample_score("nothing", ["123", "456"], "part") == 0.0
    with pytest.raises(ValueError, match="metric"):
        sample_score("x", ["x"], "exact")
    preds = ["a b", "a", "c"]
    refs = [["a", "b"], ["a", "b"], ["a"]]
    assert string_match_all(preds, refs) == 50.0  # (1 + 0.5 + 0) / 3
    assert string_match_part(preds, refs) == 66.67  # rounded to 2 decimals, as RULER


# ------------------------------------------------------------------------------ runs


@pytest.mark.slow
def test_run_headinfer_matches_standard_attention(
    runner_model: tuple[Any, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    smollm2 = runner_model
    out = tmp_path / "ruler.jsonl"
    argv = ["--lengths", "1024,4096", "--tasks", "niah_single_1", "--samples", "1"]
    argv += ["--max-new-tokens", "8", "--chunk-size", "1024", "--compare", "standard"]
    assert ruler.main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    assert not headinfer.is_patched(smollm2[0])

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task"], r["length"]) for r in rows] == [
        ("niah_single_1", 1024),
        ("niah_single_1", 4096),
    ]
    for row in rows:
        assert row["identical"] is True, row
        assert row["score"] == row["standard_score"]
        assert row["prediction"] == row["standard_prediction"]
        assert row["prompt_tokens"] + 8 <= row["length"]
    printed = capsys.readouterr().out
    assert "identical outputs: 2/2 (1.00)" in printed
    assert "headinfer" in printed and "standard" in printed
    for row in rows:
        score = f"{row['score'] * 100:.2f}"
        line = f"{'niah_single_1':<18}{row['length']:>8}{1:>9}{score:>11}{score:>10}{'1/1':>11}"
        assert line in printed
    # The results JSON beside the samples: settings, versions, scores per task and length.
    summary = json.loads((tmp_path / "ruler.json").read_text())
    assert summary["benchmark"] == "ruler" and summary["samples_file"] == "ruler.jsonl"
    assert summary["config"]["model"] == "smollm2" and summary["config"]["chunk_size"] == 1024
    assert summary["config"]["dtype"] == "float32" and summary["config"]["gpu_budget"] is None
    assert summary["config"]["kv_dtype"] == "exact"
    assert summary["versions"]["headinfer"] == headinfer.__version__
    assert summary["versions"]["torch"] and summary["versions"]["transformers"]
    assert "T" in summary["date"]
    for row in rows:
        cell = summary["results"]["niah_single_1"][str(row["length"])]
        assert cell == {
            "score": round(row["score"] * 100, 2),
            "samples": 1,
            "standard_score": round(row["standard_score"] * 100, 2),
            "identical": 1,
        }


@pytest.mark.slow
def test_run_more_tasks_at_1k(
    runner_model: tuple[Any, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    tasks = "niah_multikey_2,vt,cwe"
    argv = ["--lengths", "1024", "--tasks", tasks, "--samples", "1", "--max-new-tokens", "6"]
    assert ruler.main([*argv, "--compare", "standard", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "identical outputs: 3/3 (1.00)" in printed
    assert "average" in printed
    for task in tasks.split(","):
        assert task in printed


def test_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    cases = [["--tasks", "nope"], ["--lengths", "1024,x"], ["--lengths", "0"]]
    cases += [["--device", "mps"], ["--dtype", "int8"], ["--gpu-budget", "lots"]]
    cases += [["--kv-dtype", "fp8"]]
    for argv in cases:
        with pytest.raises(SystemExit) as exc:
            ruler.main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown task(s) nope" in err and "comma-separated integers" in err
    assert "not 'mps'" in err and "bf16, fp16 or fp32" in err and "20GiB" in err
    assert "--kv-dtype: invalid choice: 'fp8'" in err


def test_kv_dtype_reaches_the_patch() -> None:
    # --kv-dtype int8: the runs through headinfer use int8 caches; standard attention is the
    # model unpatched (its own exact cache), as --compare standard runs it.
    from _tiny import tiny_model

    from headinfer.eval._common import Generator

    args = ruler._parser().parse_args(["--kv-dtype", "int8"])
    assert args.kv_dtype == "int8"
    assert ruler._parser().parse_args([]).kv_dtype == "exact"
    model = tiny_model("llama")
    with Generator(model, None, 64, "cpu", kv_dtype=args.kv_dtype) as generator:
        generator._use_headinfer(True)
        assert model._headinfer.kv_dtype == "int8"
        generator._use_headinfer(False)
        assert not headinfer.is_patched(model)
        generator._use_headinfer(True)
        assert model._headinfer.kv_dtype == "int8"
    assert not headinfer.is_patched(model)


def test_dtype_short_names() -> None:
    from headinfer.eval._common import pick_dtype

    assert pick_dtype("bf16", "cpu") == torch.bfloat16
    assert pick_dtype("fp16", "cpu") == torch.float16
    assert pick_dtype("auto", "cpu") == torch.float32
