"""What the installed package carries: type information, its version, the registered pipeline."""

from __future__ import annotations

from pathlib import Path

import headinfer


def test_ships_py_typed() -> None:
    # PEP 561: mypy reads headinfer's annotations instead of asking for stubs.
    assert (Path(headinfer.__file__).parent / "py.typed").is_file()


def test_pipeline_registered_on_import() -> None:
    from transformers.pipelines import PIPELINE_REGISTRY

    assert "headinfer-qa" in PIPELINE_REGISTRY.get_supported_tasks()
    task = PIPELINE_REGISTRY.check_task("headinfer-qa")[1]
    assert task["impl"] is headinfer.HeadInferQAPipeline
