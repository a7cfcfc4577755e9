"""Evaluation runners: long-context benchmarks through headinfer, with standard attention beside.

- ``python -m headinfer.eval.ruler``: RULER's synthetic tasks, generated locally
  (``headinfer.eval.ruler``).
- ``python -m headinfer.eval.longbench --data data.json``: LongBench v2
  (``headinfer.eval.longbench``).

Both print their scores to stdout and progress to stderr, and write one JSON line per sample
with ``--out``; ``--compare standard`` also runs the model unpatched on the same inputs.
"""
