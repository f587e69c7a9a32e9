"""Benchmarks of the compression studio (not part of CI): ``python bench/run.py [names] [--quick]``.

One module per benchmark (``quality``, ``throughput``, ``fidelity``, ``speedup``, ``streaming``, ``memory``),
each with ``run(ctx) -> dict``; ``common`` holds what they share (machine facts, load average, progress
lines, the trained models they use, statistics). Raw results go to ``bench/results/<name>.json``; the
tables and their reading are in ``docs/BENCHMARKS.md``. Work files (trained models, search runs, latency
tables) live in ``var/bench/`` (ignored by git).

This package imports ``compression`` (and, for the web benchmarks, starts ``webapp``/``workers`` processes);
nothing imports it.
"""
