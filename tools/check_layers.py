"""Fails on an import circle among the files of ``src/`` (Rust) or ``python/headinfer/``.

Rust: each file under ``src/`` is a module; an edge ``a -> b`` for every ``crate::``, ``super::``
or ``self::`` path (or one through a child that ``a`` declares) in ``a``'s code (``use``
lines, brace groups expanded, and paths written inline) that names an item of ``b``, the deepest
module file the path reaches. A module and its own submodules are one unit: the edges between
them are left out (a child implements its parent's types, the parent re-exports it). Tests are left
out: a file's ``#[cfg(test)]`` module and everything after it.

Python: each module of ``python/headinfer`` (``import``/``from`` lines at any depth, including
the function-local imports that run on first call); a package's ``__init__`` depends on what
it imports, and importing ``pkg.mod`` depends on ``pkg.mod`` only.

And src/'s top-level modules keep their layers (``RUST_LAYERS``, lowest first, as
docs/architecture.md draws them): a module uses only modules of lower layers.

Prints each circle (and each upward use) found and exits 1; exits 0 when there is none.

    python tools/check_layers.py [--root DIR]
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

# Strings, char literals and comments, in one pass (a string may hold "//", a comment '"').
_NOT_CODE = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])\'|//[^\n]*|/\*.*?\*/', re.S)
_USE = re.compile(r"\buse\s+([^;]*);", re.S)
_INLINE = re.compile(r"(?<![:\w])([a-z_][a-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)+)")
_TEST_MOD = re.compile(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub\s+)?mod\s+tests\b")


def _expand(path: str) -> list[str]:
    """``crate::a::{b, c::{d, e}}`` -> ``crate::a::b``, ``crate::a::c::d``, ``crate::a::c::e``."""
    path = re.sub(r"\s+", "", path)
    brace = path.find("{")
    if brace < 0:
        return [path.split(" as ")[0]]
    prefix, depth, parts, start = path[:brace], 0, [], brace + 1
    for i in range(brace, len(path)):
        c = path[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                parts.append(path[start:i])
                break
        elif c == "," and depth == 1:
            parts.append(path[start:i])
            start = i + 1
    out = []
    for part in parts:
        if not part:
            continue
        for sub in _expand(part):
            out.append(prefix.rstrip(":") if sub == "self" else prefix + sub)
    return out


def _rust_modules(src: Path) -> dict[tuple[str, ...], Path]:
    mods = {}
    for f in sorted(src.rglob("*.rs")):
        parts = f.relative_to(src).with_suffix("").parts
        if parts[-1] in ("mod", "lib"):
            parts = parts[:-1]
        mods[tuple(parts)] = f
    return mods


def _rust_paths(mods: dict[tuple[str, ...], Path]) -> dict[tuple[str, ...], tuple[str, list]]:
    """Per module: its code (tests cut) and the paths it names, each as (base, segments)."""
    out = {}
    for mod, f in mods.items():
        text = _NOT_CODE.sub(lambda m: '""' if m.group().startswith('"') else " ", f.read_text())
        m = _TEST_MOD.search(text)
        if m:
            text = text[: m.start()]
        # A path may start at the crate, at this module or its parent, or at a child module
        # (what `mod x;` declares, written `x::y` from the declaring file).
        children = {m[-1] for m in mods if len(m) == len(mod) + 1 and m[: len(mod)] == mod}
        starts = {"crate", "super", "self"} | children
        paths = [p for u in _USE.findall(text) for p in _expand(u)]
        paths += _INLINE.findall(_USE.sub("", text))
        resolved = []
        for p in paths:
            segs = p.split("::")
            if segs[0] not in starts:
                continue
            if segs[0] == "crate":
                base, segs = [], segs[1:]
            else:
                # super:: from a file is its parent module; self:: and a child start here.
                base = list(mod)
                while segs and segs[0] in ("super", "self"):
                    if segs[0] == "super":
                        base = base[:-1]
                    segs = segs[1:]
            resolved.append(base + segs)
        out[mod] = (text, resolved)
    return out


def _deepest(mods: dict[tuple[str, ...], Path], full: list[str]) -> tuple[tuple[str, ...], list]:
    for n in range(len(full), -1, -1):
        if tuple(full[:n]) in mods:
            return tuple(full[:n]), full[n:]
    return (), full


def rust_graph(src: Path) -> dict[str, set[str]]:
    mods = _rust_modules(src)
    paths = _rust_paths(mods)
    # Re-exports (`pub use inner::T` in a): a path to `a::T` depends on `a/inner`, where T is.
    reexports: dict[tuple[str, ...], dict[str, list[str]]] = {}
    for mod, (text, _) in paths.items():
        for use in re.findall(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]*);", text, re.S):
            for p in _expand(use):
                segs = p.split("::")
                if segs[0] == "crate":
                    full = segs[1:]
                else:
                    base = list(mod)
                    while segs and segs[0] in ("super", "self"):
                        base = base[:-1] if segs[0] == "super" else base
                        segs = segs[1:]
                    full = base + segs
                reexports.setdefault(mod, {})[full[-1]] = full

    def resolve(full: list[str], depth: int = 0) -> tuple[str, ...]:
        target, rest = _deepest(mods, full)
        again = reexports.get(target, {}).get(rest[0]) if rest else None
        if again is not None and again != full and depth < 8:
            return resolve(again, depth + 1)
        return target

    graph: dict[str, set[str]] = {}
    for mod, (_, resolved) in paths.items():
        deps = graph.setdefault("/".join(mod) or "lib", set())
        for full in resolved:
            target = resolve(full)
            # A module and its own submodules are one unit (Rust lets them see each other's
            # private items; impls of a parent's type live in its children's files).
            n = min(len(target), len(mod))
            if target[:n] == mod[:n]:
                continue
            deps.add("/".join(target) or "lib")
    return graph


def python_graph(pkg: Path) -> dict[str, set[str]]:
    root = pkg.parent
    mods = {}
    for f in sorted(pkg.rglob("*.py")) + sorted(pkg.rglob("*.pyi")):
        parts = f.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods.setdefault(name, f)  # an extension module by its stub
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        is_pkg = f.name == "__init__.py"
        here = name if is_pkg else name.rsplit(".", 1)[0]
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # from pkg import sub: the submodule if there is one, else pkg itself.
                for a in node.names:
                    sub = f"{mod}.{a.name}"
                    targets.append(sub if sub in mods else mod)
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name:
                    deps.add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    # One circle through the component's first node, for the message.
    inside = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & inside):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


#: The layers of src/'s top-level modules, lowest first (docs/architecture.md): a module uses
#: only modules of lower layers, none of its own layer or above.
RUST_LAYERS = (
    ("error",),
    ("tensor", "testing", "plan"),
    ("quant",),
    ("cpu",),
    ("cuda",),
    ("store",),
    ("attention",),
    ("py",),
)


def layer_violations(
    graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...] = RUST_LAYERS
) -> list[str]:
    """Each edge from a file of one top-level module to a module of the same or a higher layer
    (``lib``, the crate root, and modules the layers do not name are left out)."""
    level = {name: i for i, names in enumerate(layers) for name in names}
    out = []
    for source, targets in sorted(graph.items()):
        a = source.split("/")[0]
        for target in sorted(targets):
            b = target.split("/")[0]
            if a == b or a not in level or b not in level:
                continue
            if level[b] >= level[a]:
                out.append(f"{source} -> {target} ({a} may not use {b})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args(argv)
    root = Path(args.root)
    bad = 0
    for what, graph in (
        ("src/", rust_graph(root / "src")),
        ("python/headinfer/", python_graph(root / "python" / "headinfer")),
    ):
        found = cycles(graph)
        for comp in found:
            circle = " -> ".join(_path(graph, comp))
            print(f"{what}: import circle among {len(comp)} modules: {circle}")
            print(f"    all of: {', '.join(comp)}")
        bad += len(found)
        if what == "src/":
            upward = layer_violations(graph)
            for edge in upward:
                print(f"src/: against the layers: {edge}")
            bad += len(upward)
    if bad == 0:
        print(
            "no import circles in src/ or python/headinfer/; src/'s modules depend downwards only"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
