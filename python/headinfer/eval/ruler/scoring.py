"""RULER's scoring (``scripts/eval/synthetic/constants.py`` and ``evaluate.py``): predictions
stripped of control characters; a sample scores the fraction of its references found in the
prediction, ignoring case."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["postprocess_pred", "sample_score", "string_match_all", "string_match_part"]


# ------------------------------------------------------------------------------------------
# Scoring: RULER's scripts/eval/synthetic/constants.py and evaluate.py

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_pred(prediction: str) -> str:
    """RULER's clean-up of a prediction: control characters become newlines, ends stripped."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def sample_score(prediction: str, references: Sequence[str], metric: str = "all") -> float:
    """One sample's score in [0, 1]: the fraction of ``references`` found in ``prediction``
    (``"all"``), or 1 if any of them is (``"part"``); case is ignored."""
    if not references:
        raise ValueError("references: empty")
    found = [ref.lower() in prediction.lower() for ref in references]
    if metric == "all":
        return sum(found) / len(found)
    if metric == "part":
        return float(any(found))
    raise ValueError(f"metric: 'all' or 'part', got {metric!r}")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_all``: mean over samples of the fraction of references found, x100,
    rounded to 2 decimals."""
    score = sum(sample_score(p, r, "all") for p, r in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's ``string_match_part`` (its QA metric): share of samples with any reference found,
    x100, rounded to 2 decimals."""
    score = sum(sample_score(p, r, "part") for p, r in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)
