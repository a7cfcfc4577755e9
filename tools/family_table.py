"""Fills the GPU column of README.md's family table from a ``headinfer check --json`` report.

    headinfer check --json > check.json          # on the GPU machine
    python tools/family_table.py check.json      # rewrites README.md's table in place

A family's cell is ``yes`` when every GPU run of its self-test cases passed (float32 and
bfloat16; KV resident, streamed from the host, shared with the CPU), else ``FAIL`` with the runs
that failed; the line under the table names the card and the date. Exit status 1 when the report
has no GPU runs (it was made on a machine without a GPU) or a family has none.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

#: README row (its `model_type`) -> the self-test cases that stand for it.
ROWS = {
    "llama": ("llama", "llama3"),
    "mistral": ("mistral", "mistral_nemo"),
    "gemma3": ("gemma3", "gemma3_image_text"),
}
_NOTE = re.compile(r"\nGPU column: [^\n]*\n")
_ROW = re.compile(r"^\| `(?P<family>[a-z0-9_]+)`.*\|$", re.M)


def cells(report: dict[str, Any]) -> dict[str, str]:
    """README family -> its GPU cell, from the report's self-test."""
    gpu_runs: dict[str, list[dict[str, Any]]] = {}
    for run in report["self_test"]:
        if run["mode"] != "cpu":
            gpu_runs.setdefault(run["family"], []).append(run)
    out = {}
    families = {f for f in gpu_runs} | set(ROWS)
    for family in families:
        runs = [r for case in ROWS.get(family, (family,)) for r in gpu_runs.get(case, [])]
        if not runs:
            continue
        failed = [f"{r['family']} {r['mode']} {r['dtype']}" for r in runs if not r["ok"]]
        out[family] = "yes" if not failed else "FAIL: " + ", ".join(failed)
    return out


def fill(readme: str, report: dict[str, Any]) -> tuple[str, list[str]]:
    """``readme`` with the GPU column filled, and the table's families the report lacks."""
    got = cells(report)
    missing = []

    def row(m: re.Match[str]) -> str:
        family = m.group("family")
        parts = m.group(0).split(" | ")
        # | family | e.g. | what is special | CPU | GPU | known limits |
        if len(parts) < 6 or family == "family":
            return m.group(0)
        if family not in got:
            missing.append(family)
            return m.group(0)
        parts[4] = got[family]
        return " | ".join(parts)

    text = _ROW.sub(row, readme)
    gpus = report["environment"]["gpus"]
    card = gpus[0]["name"] if gpus else "no GPU"
    note = (
        f"GPU column: `headinfer check` on an {card}, {report['date'][:10]} (float32 and "
        "bfloat16; KV resident, streamed from the host, shared with the CPU).\n"
    )
    text = _NOTE.sub("", text)
    end = text.index("\n\n", text.index("| family (`model_type`)"))
    return text[: end + 1] + "\n" + note + text[end + 1 :], missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="the JSON of `headinfer check --json`")
    parser.add_argument("--readme", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    args = parser.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    if not any(r["mode"] != "cpu" for r in report["self_test"]):
        print(f"{args.report}: no GPU runs in the self-test (made without a GPU?)", file=sys.stderr)
        return 1
    readme = Path(args.readme)
    text, missing = fill(readme.read_text(), report)
    readme.write_text(text)
    if missing:
        print(f"no GPU runs for: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
