"""The install commands of README.md (its Install section) and of examples/quickstart.ipynb
(its Install cell) work as written, in a fresh virtual environment, from this checkout.

The commands are read from the files, not copied here. Each runs in the checkout's root with
the fresh venv first on ``PATH``. The checkout route (``pip install ".[demo]"``) builds the Rust
core with maturin; the PyPI route (``pip install "headinfer[demo]"``) gets headinfer from a
wheel built here (``PIP_FIND_LINKS``), as it would from PyPI, and everything else from the
index. Then everything the notebook and the demo import must import, with nothing more
installed.

To keep it fast:
- torch (with its CUDA libraries, gigabytes) is lent from this interpreter's environment: its
  dependency closure is linked into a folder the fresh venv sees through a ``.pth`` file, so pip
  finds torch installed; every other requirement is installed into the venv itself;
- cargo builds into ``target/install-test`` (kept between runs, so a rerun relinks nothing that
  did not change), and the venv's path is fixed (``target/install-test-venv``) so that its
  interpreter's path, which the build sees, does not change between runs either.

Skips, with the reason, only where PyPI cannot be reached (in CI it fails instead).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
TARGET = REPO / "target"
STEP_TIMEOUT_S = 1500

pytestmark = pytest.mark.slow


def _fenced_pip_commands(markdown: str) -> list[str]:
    """``pip install ...`` lines of the fenced code blocks, comments stripped."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", markdown, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("pip install"):
                commands.append(line)
    return commands


def readme_commands() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    return _fenced_pip_commands(section)


def notebook_commands() -> list[str]:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    install = [c for c in cells if "".join(c["source"]).startswith("## Install")]
    assert len(install) == 1, "the notebook has one Install cell"
    return _fenced_pip_commands("".join(install[0]["source"]))


def notebook_imports() -> list[str]:
    """The import statements of the notebook's code cells."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            for line in "".join(cell["source"]).splitlines():
                if re.match(r"(import|from) \w", line):
                    lines.append(line)
    return lines


def test_the_files_hold_both_routes() -> None:
    # What the fresh-venv test below runs; this fails first if the files lose a route.
    readme, notebook = readme_commands(), notebook_commands()
    assert "pip install ." in readme and 'pip install ".[demo]"' in readme
    assert "pip install headinfer" in readme and 'pip install "headinfer[demo]"' in readme
    assert notebook == ['pip install ".[demo]"']
    assert "import headinfer" in notebook_imports()


def _index_reachable() -> None:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    host = urllib.parse.urlparse(index).hostname or "pypi.org"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must reach the package index {host}: {exc}")
        pytest.skip(f"the package index {host} is not reachable: {exc}")


def _lend_torch(site_packages: Path, lent: Path) -> None:
    """Link torch and its requirements (this environment's copies) into ``lent`` and make the
    venv at ``site_packages`` see them, so that pip counts them as installed."""
    from packaging.requirements import Requirement

    lent.mkdir()
    todo, seen = ["torch"], set()
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        root = Path(str(dist.locate_file(""))).resolve()
        for file in dist.files or []:
            top = file.parts[0]
            if top == ".." or (lent / top).exists():
                continue
            (lent / top).symlink_to(root / top)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    (site_packages / "headinfer-test-lent-torch.pth").write_text(f"{lent}\n")


def _run(command: str, env: dict[str, str]) -> None:
    start = time.perf_counter()
    done = subprocess.run(
        command,
        shell=True,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        check=False,
    )
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, f"`{command}` failed (status {done.returncode}):\n{tail}"
    print(f"{time.perf_counter() - start:6.1f} s  {command}")  # shown with pytest -s


def test_install_commands_work_as_written_in_a_fresh_venv(tmp_path: Path) -> None:
    _index_reachable()
    venv = TARGET / "install-test-venv"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    _lend_torch(Path(site), tmp_path / "lent")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        CARGO_TARGET_DIR=str(TARGET / "install-test"),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
    )
    env.pop("PYO3_PYTHON", None)

    def check(imports: list[str]) -> None:
        # In the venv's interpreter, away from the checkout: the installed package is used.
        code = "\n".join(
            [*imports, "import headinfer, pathlib", "print(headinfer.__file__)"]
            + ["assert (pathlib.Path(headinfer.__file__).parent / 'py.typed').is_file()"]
        )
        done = subprocess.run(
            [str(python), "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        assert done.stdout.strip().startswith(site), done.stdout

    # The checkout route: the README's commands, then the notebook's.
    for command in readme_commands() + notebook_commands():
        if "headinfer" in command.split("install", 1)[1]:
            continue  # the PyPI route, below
        _run(command, env)
    demo = [*notebook_imports(), "import gguf, accelerate, safetensors, nbclient, ipykernel"]
    demo += ["from headinfer.pipelines import HeadInferQAPipeline", "import headinfer.demo"]
    check(demo)
    _run("headinfer --version", env)
    _run("jupyter kernelspec list | grep -q python3", env)  # the kernel the notebook runs in
    _run("jupyter execute --help > /dev/null", env)

    # The PyPI route, served by a wheel of this checkout instead of PyPI.
    wheels = tmp_path / "wheels"
    _run(f"python -m pip wheel --no-deps -w {wheels} .", env)
    _run("python -m pip uninstall -y headinfer", env)
    env["PIP_FIND_LINKS"] = " ".join(filter(None, [str(wheels), env.get("PIP_FIND_LINKS")]))
    for command in readme_commands():
        if "headinfer" in command.split("install", 1)[1]:
            _run(command, env)
    check(demo)
