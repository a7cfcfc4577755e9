"""headinfer.eval.longbench: LongBench v2's prompt, middle truncation, answer extraction, data
checks, scores, and the three-item fixture end to end (with resume) on SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import headinfer
from headinfer.eval import longbench
from headinfer.eval.longbench import (
    FIELDS,
    LongBenchDataError,
    build_prompt,
    extract_answer,
    load_data,
    scores,
    truncate_middle,
)

FIXTURE = Path(__file__).parent / "fixtures" / "longbench_3.json"


def test_fixture_is_valid_longbench_v2() -> None:
    data = load_data(FIXTURE)
    assert len(data) == 3
    assert {d["difficulty"] for d in data} == {"easy", "hard"}
    assert {d["length"] for d in data} == {"short", "medium", "long"}
    for item in data:
        assert set(FIELDS) <= set(item)


def test_prompt_is_the_zero_shot_template() -> None:
    item = {name: f" {name} value " for name in FIELDS}
    prompt = build_prompt(item)
    assert prompt.startswith("Please read the following text and answer the question below.")
    assert "<text>\ncontext value\n</text>" in prompt
    assert "What is the correct answer to this question: question value\nChoices:\n" in prompt
    assert (
        "(A) choice_A value\n(B) choice_B value\n(C) choice_C value\n(D) choice_D value\n\n"
        in prompt
    )
    assert prompt.endswith(
        'Format your response as follows: "The correct answer is (insert answer here)".'
    )


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The correct answer is (C)", "C"),
        ("The correct answer is (B) Morning Star.", "B"),
        ("**The correct answer is D**", "D"),
        ("The correct answer is **(A)**", "A"),
        ("The correct answer is A, but (B) is close", "A"),
        ("The correct answer is B. Or: The correct answer is (C)", "C"),  # (X) is looked for first
        ("The correct answer is (E)", None),
        ("the correct answer is (A)", None),  # case matters, as in LongBench v2
        ("I think it is A.", None),
        ("", None),
    ],
)
def test_extract_answer(response: str, letter: str | None) -> None:
    assert extract_answer(response) == letter


def test_truncate_middle(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    prompt = " ".join(f"w{i}" for i in range(200))
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 200

    same, cut = truncate_middle(tok, prompt, len(ids))
    assert (same, cut) == (prompt, False)

    for budget in (40, 41):
        text, cut = truncate_middle(tok, prompt, budget)
        assert cut
        first, last = budget // 2, budget - budget // 2
        assert text == tok.decode(ids[:first] + ids[-last:])
        assert text.startswith("w0 w1 w2") and text.endswith("w198 w199")
        assert "w100 " not in text
        assert abs(len(tok(text, add_special_tokens=False)["input_ids"]) - budget) <= 1
    with pytest.raises(ValueError, match="max_tokens"):
        truncate_middle(tok, prompt, 0)


def test_scores_by_difficulty_and_length() -> None:
    def record(difficulty: str, length: str, judge: bool) -> dict[str, Any]:
        return {"difficulty": difficulty, "length": length, "judge": judge}

    table = scores(
        [
            record("easy", "short", True),
            record("easy", "long", False),
            record("hard", "short", True),
            record("hard", "medium", False),
        ]
    )
    assert table["overall"] == {"accuracy": 50.0, "n": 4}
    assert table["easy"] == {"accuracy": 50.0, "n": 2}
    assert table["hard"] == {"accuracy": 50.0, "n": 2}
    assert table["short"] == {"accuracy": 100.0, "n": 2}
    assert table["medium"] == {"accuracy": 0.0, "n": 1}
    assert table["long"] == {"accuracy": 0.0, "n": 1}
    assert scores([])["overall"] == {"accuracy": None, "n": 0}


# ------------------------------------------------------------------------------ bad input


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return path


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="LongBench data file not found: .*nope.json"):
        load_data(missing)
    assert longbench.main(["--data", str(missing)]) == 2
    assert "LongBench data file not found" in capsys.readouterr().err


def test_wrong_format_names_the_item_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = json.loads(FIXTURE.read_text())
    broken = [dict(item) for item in items]
    del broken[1]["choice_C"]
    path = _write(tmp_path, broken)
    message = r"item 1 \(_id 'headinfer-fixture-0002'\): missing field 'choice_C'"
    with pytest.raises(LongBenchDataError, match=message):
        load_data(path)
    assert longbench.main(["--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert "missing field 'choice_C'" in err and "item 1" in err

    cases = [
        ({"items": items}, "expected a JSON list of LongBench v2 items"),
        ([items[0], "text"], "item 1: expected an object, got str"),
        ([{**items[0], "answer": "E"}], "field 'answer' must be one of A, B, C, D, got 'E'"),
        ([{**items[0], "length": 5}], "field 'length' must be a string, got int"),
        ([{**items[0], "difficulty": "medium"}], "field 'difficulty' must be one of easy, hard"),
        ([items[0], items[0]], "appears twice"),
        ([{k: v for k, v in items[0].items() if k not in ("context", "_id")}], "item 0: missing"),
    ]
    for data, expected in cases:
        with pytest.raises(LongBenchDataError, match=expected.replace("(", r"\(")):
            load_data(_write(tmp_path, data))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(LongBenchDataError, match="not valid JSON"):
        load_data(tmp_path / "bad.json")


# ------------------------------------------------------------------------------ runs


@pytest.mark.slow
def test_fixture_end_to_end(
    runner_model: tuple[Any, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    smollm2 = runner_model
    out = tmp_path / "results.jsonl"
    argv = ["--data", str(FIXTURE), "--out", str(out), "--max-new-tokens", "16"]
    assert longbench.main([*argv, "--chunk-size", "512", "--device", "cpu"]) == 0
    assert not headinfer.is_patched(smollm2[0])

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["_id"] for r in records] == [item["_id"] for item in load_data(FIXTURE)]
    for record in records:
        assert "context" not in record
        assert record["pred"] == extract_answer(record["response"])
        assert record["judge"] == (record["pred"] == record["answer"])
        assert record["truncated"] is False
    printed = capsys.readouterr().out
    table = scores(records)
    assert "Overall      Easy      Hard     Short    Medium      Long" in printed
    accuracy = "".join(
        f"{table[c]['accuracy']:>10.1f}"
        for c in ("overall", "easy", "hard", "short", "medium", "long")
    )
    assert f"headinfer   {accuracy}" in printed
    assert f"{'items':<12}{3:>10}{2:>10}{1:>10}{1:>10}{1:>10}{1:>10}" in printed
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["benchmark"] == "longbench_v2" and summary["samples_file"] == "results.jsonl"
    assert summary["results"]["headinfer"] == table
    assert summary["config"]["chunk_size"] == 512 and summary["config"]["max_new_tokens"] == 16
    assert set(summary["versions"]) >= {"headinfer", "transformers", "torch", "python"}


def test_json_lines_input(tmp_path: Path) -> None:
    items = load_data(FIXTURE)
    lines = tmp_path / "data.jsonl"
    lines.write_text("\n".join(json.dumps(item) for item in items) + "\n")
    assert load_data(lines) == items
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(items[0]) + "\n{oops\n")
    with pytest.raises(LongBenchDataError, match="line 2 is not valid JSON"):
        load_data(bad)


def test_results_path() -> None:
    from headinfer.eval._common import results_path

    assert results_path("out/run.jsonl") == Path("out/run.json")
    assert results_path("run.json") == Path("run.json.results.json")


@pytest.mark.slow
def test_resume_runs_only_what_is_missing(
    runner_model: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    items = load_data(FIXTURE)
    out = tmp_path / "results.jsonl"
    earlier = []
    for item, judge in zip(items[:2], (True, False)):
        record = {k: item[k] for k in FIELDS if k != "context"}
        record.update(response="(from an earlier run)", pred=None, judge=judge)
        earlier.append(json.dumps(record))
    out.write_text("\n".join(earlier) + "\n")

    # The third item, cut to 256 tokens in the middle: quick, and exercises truncation.
    argv = ["--data", str(FIXTURE), "--out", str(out), "--max-new-tokens", "4"]
    assert longbench.main([*argv, "--max-context", "256", "--device", "cpu"]) == 0
    lines = out.read_text().splitlines()
    assert lines[:2] == earlier
    assert len(lines) == 3
    new = json.loads(lines[2])
    assert new["_id"] == items[2]["_id"]
    assert new["truncated"] is True
    assert new["prompt_tokens"] < 256 + 64
    printed = capsys.readouterr().out
    assert "3 item(s) (1 run now, 2 from" in printed
    assert f"{'items':<12}{3:>10}" in printed

    # Everything done: nothing runs, the scores are printed again.
    monkeypatch.setattr(longbench, "load_model", None)  # would fail if called
    assert longbench.main(argv) == 0
    assert "3 item(s) (0 run now, 3 from" in capsys.readouterr().out


def test_resume_refuses_results_of_another_kv_dtype(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One file mixing exact and int8 answers would score neither mode.
    item = load_data(FIXTURE)[0]
    out = tmp_path / "results.jsonl"
    record = {k: item[k] for k in FIELDS if k != "context"}
    record.update(response="(earlier)", pred=None, judge=False, kv_dtype="int8")
    out.write_text(json.dumps(record) + "\n")
    argv = ["--data", str(FIXTURE), "--out", str(out), "--device", "cpu"]
    assert longbench.main(argv) == 2
    assert "holds results of --kv-dtype int8, not exact" in capsys.readouterr().err
    # A record from before the 8-bit mode (no kv_dtype) is exact, so int8 refuses it too.
    del record["kv_dtype"]
    out.write_text(json.dumps(record) + "\n")
    assert longbench.main([*argv, "--kv-dtype", "int8"]) == 2
    assert "holds results of --kv-dtype exact, not int8" in capsys.readouterr().err


def test_only_rank_0_prints_and_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every item already in --out: nothing is loaded or run, only the scores are reported.
    items = load_data(FIXTURE)
    out = tmp_path / "results.jsonl"
    records = []
    for item in items:
        record = {k: item[k] for k in FIELDS if k != "context"}
        record.update(response="(from an earlier run)", pred=None, judge=True)
        records.append(json.dumps(record))
    out.write_text("\n".join(records) + "\n")
    monkeypatch.setattr(longbench, "load_model", None)  # would fail if called
    argv = ["--data", str(FIXTURE), "--out", str(out), "--device", "cpu"]

    monkeypatch.setenv("RANK", "1")  # another rank of a torchrun launch
    assert longbench.main(argv) == 0
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "results.json").exists()

    monkeypatch.setenv("RANK", "0")
    assert longbench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 item(s) (0 run now, 3 from" in printed
    assert f"results: {out} (per item)" in printed
    assert (tmp_path / "results.json").is_file()
