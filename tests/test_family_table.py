"""``tools/family_table.py``: README's family table, GPU column, from ``headinfer check --json``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from headinfer.selftest import CASES

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("family_table", ROOT / "tools/family_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(failing: tuple[str, ...] = ()) -> dict:
    runs = []
    for case in CASES:
        runs.append({"family": case, "mode": "cpu", "dtype": "float32", "ok": True})
        for mode in ("resident", "streamed", "shared"):
            for dtype in ("float32", "bfloat16"):
                ok = not (case in failing and mode == "shared" and dtype == "bfloat16")
                runs.append({"family": case, "mode": mode, "dtype": dtype, "ok": ok})
    env = {"gpus": [{"name": "NVIDIA H200"}]}
    return {"date": "2026-12-06 10:00:00 UTC", "environment": env, "self_test": runs}


def _gpu_cells(text: str) -> dict[str, str]:
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `")]
    return {row[0].split("`")[1]: row[4] for row in rows}


def test_every_family_of_the_readme_table_gets_its_cell(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    report = tmp_path / "check.json"
    report.write_text(json.dumps(_report(failing=("mistral_nemo",))))
    tool = _tool()
    assert tool.main([str(report), "--readme", str(readme)]) == 0
    text = readme.read_text()
    cells = _gpu_cells(text)
    assert cells["mistral"] == "FAIL: mistral_nemo shared bfloat16"
    assert all(v == "yes" for k, v in cells.items() if k != "mistral"), cells
    assert text.count("GPU column: `headinfer check` on an NVIDIA H200, 2026-12-06") == 1
    # A second run replaces the note and the cells, changing nothing else.
    report.write_text(json.dumps(_report()))
    assert tool.main([str(report), "--readme", str(readme)]) == 0
    again = readme.read_text()
    assert _gpu_cells(again)["mistral"] == "yes"
    assert again.count("GPU column:") == 1
    assert again.replace("FAIL: mistral_nemo shared bfloat16", "yes") == again
    assert len(again.splitlines()) == len(text.splitlines())


def test_a_report_without_gpu_runs_is_refused(tmp_path: Path) -> None:
    report = _report()
    report["self_test"] = [r for r in report["self_test"] if r["mode"] == "cpu"]
    path = tmp_path / "check.json"
    path.write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    assert _tool().main([str(path), "--readme", str(readme)]) == 1
    assert readme.read_text() == (ROOT / "README.md").read_text()
