"""Where a warning should point: the first frame of the caller's own code.

A warning raised inside a patched ``forward`` or ``generate`` sits under frames of headinfer,
transformers and torch; ``warnings.warn(..., stacklevel=user_stacklevel())`` attributes it to the
line of the user's code that called into them (what Python 3.12's ``skip_file_prefixes`` does).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

__all__ = ["user_stacklevel"]


def _package_dir(module: ModuleType | None) -> str | None:
    path = getattr(module, "__file__", None)
    return None if path is None else os.path.dirname(os.path.abspath(path)) + os.sep


def _library_dirs() -> tuple[str, ...]:
    dirs = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    for name in ("torch", "transformers", "accelerate"):
        found = _package_dir(sys.modules.get(name))
        if found is not None:
            dirs.append(found)
    return tuple(dirs)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, called by the caller of this function,
    name the first frame outside headinfer, torch, transformers and accelerate (or the
    outermost frame if every frame is theirs)."""
    dirs = _library_dirs()
    frame = sys._getframe(1)  # the function that will call warnings.warn: stacklevel 1
    level = 1
    while frame.f_back is not None:
        raw = frame.f_code.co_filename
        if not raw.startswith("<frozen") and not os.path.abspath(raw).startswith(dirs):
            return level
        frame = frame.f_back
        level += 1
    return level
