"""``tools/check_layers.py``: the import-circle check that ``make test`` runs (``make layers``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "check_layers.py"


def _tool():
    spec = importlib.util.spec_from_file_location("check_layers", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"src/lib.rs": "pub mod a;\n", "python/headinfer/__init__.py": ""}.items():
        files.setdefault(name, text)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _run(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), "--root", str(root)], capture_output=True, text=True
    )


def test_this_repository_has_no_circles():
    got = _run(ROOT)
    assert got.returncode == 0, got.stdout + got.stderr


@pytest.mark.parametrize(
    "files",
    [
        # Two sibling modules using each other, one through a brace group, one inline.
        {
            "src/a/mod.rs": "pub mod x;\npub mod y;\n",
            "src/a/x.rs": "use crate::a::{y::Thing, z};\n",
            "src/a/y.rs": "fn f() { super::x::g(); }\n",
        },
        # Across top-level modules, through a re-export in a mod.rs.
        {
            "src/lib.rs": "pub mod a;\npub mod b;\n",
            "src/a/mod.rs": "mod inner;\npub use inner::T;\n",
            "src/a/inner.rs": "use crate::b::U;\n",
            "src/b.rs": "use crate::a::T;\n",
        },
    ],
)
def test_a_rust_circle_fails(tmp_path, files):
    got = _run(_tree(tmp_path, files))
    assert got.returncode == 1
    assert "src/: import circle" in got.stdout


def test_rust_parents_and_children_tests_and_strings_are_not_circles(tmp_path):
    files = {
        "src/lib.rs": "pub mod a;\npub mod b;\n",
        # A parent re-exports its child, the child implements the parent's type.
        "src/a/mod.rs": "mod c;\npub use c::T;\npub struct S;\n",
        "src/a/c.rs": "use super::S;\nimpl S {}\npub struct T;\n",
        # b uses a; a mentions b only in a string, a comment and its tests.
        "src/b.rs": (
            'use crate::a::S;\nconst X: &str = "crate::a::c";\n'
            "#[cfg(test)]\nmod tests {\n    use crate::a::T;\n}\n"
        ),
    }
    files["src/a/c.rs"] += '// crate::b::nothing\nconst Y: &str = "crate::b::Z";\n'
    got = _run(_tree(tmp_path, files))
    assert got.returncode == 0, got.stdout


def test_a_python_circle_fails_even_under_type_checking(tmp_path):
    files = {
        "python/headinfer/p.py": "from .q import f\n",
        "python/headinfer/q.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .p import g\n"
        ),
    }
    got = _run(_tree(tmp_path, files))
    assert got.returncode == 1
    assert "headinfer.p -> headinfer.q -> headinfer.p" in got.stdout


def test_python_imports_inside_functions_count(tmp_path):
    files = {
        "python/headinfer/p.py": "import headinfer.q\n",
        "python/headinfer/q.py": "def f():\n    from . import p\n",
    }
    tool = _tool()
    graph = tool.python_graph(_tree(tmp_path, files) / "python" / "headinfer")
    assert graph["headinfer.p"] == {"headinfer.q"}
    assert graph["headinfer.q"] == {"headinfer.p"}
    assert tool.cycles(graph) == [["headinfer.p", "headinfer.q"]]


def test_an_upward_use_between_rust_layers_fails(tmp_path):
    files = {
        "src/lib.rs": "pub mod error;\npub mod store;\npub mod attention;\n",
        "src/error.rs": "",
        "src/attention.rs": "use crate::error::E;\n",
        # The store is below attention: using it is upward, though there is no circle.
        "src/store.rs": "use crate::attention::A;\n",
    }
    got = _run(_tree(tmp_path, files))
    assert got.returncode == 1
    assert "src/: against the layers: store -> attention (store may not use attention)" in (
        got.stdout
    )
    assert "import circle" not in got.stdout
