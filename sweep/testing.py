"""Trial bodies that stand in for a trial's training, to measure and test the engine itself.

``run_sweep(..., body=...)`` runs one of these instead of :func:`sweep.trial.execute`:
benchmarks/sweep_overhead.py times the engine around :func:`trivial_body`; the cluster tests use
:func:`sleepy_body` so that trials are still running when a node is removed.
"""
from __future__ import annotations

import time

from sweep.trial import Outcome, base_row


def trivial_body(trial, store, **_):
    """Build the trial's row and return it: no data, no training."""
    row = base_row(trial)
    row.update(status="ok", clean_acc=0.5, asr=0.5, robust_acc=0.5, defense_seconds=0.0)
    return Outcome(row)


def sleepy_body(trial, store, **_):
    """A trivial trial that takes 1 s."""
    time.sleep(1.0)
    return trivial_body(trial, store)
