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


TOY_BEFORE = {"clean_acc": 0.9, "asr": 1.0, "robust_acc": 0.0}  # the toy "backdoored model"


def toy_search_body(trial, store, **_):
    """A trial whose figures are a known function of its defense's ``lr`` and ``portion`` (I-BAU's), for
    searches: ASR = 0.5 ((log10 lr + 2.5) / 1.5)^2 + 0.5 (1 - portion), CA = 0.9 - 0.1 portion (a CA drop of
    10 x portion points). With ``max_ca_drop: 5`` the best trial is near lr = 10^-2.5, portion = 0.5.
    It "stores" the backdoored model's figures (what a search compares with), logs four rounds through
    ``DefenseContext.log`` (ASR converging to its final value: what ASHA sees), and appends its trial id to
    ``STORE/calls.log`` (what a test counts runs by)."""
    import math
    import os

    import torch

    from defenses.base import DefenseContext
    from kernel.data import dataset_info
    from kernel.train import TrainConfig

    store.get_or_build("models", trial.model_key, lambda: ({}, {"metrics": dict(TOY_BEFORE), "seconds": 0.0}))
    with open(os.path.join(store.root, "calls.log") if store.local else os.devnull, "a") as f:
        f.write(trial.trial_id + "\n")
    if "lr" not in trial.defense.params:  # a grid row beside the search (none): the model as it is
        row = base_row(trial)
        row.update(status="ok", defense_seconds=0.0, attack_seconds=0.0, attack_cached=True,
                   **TOY_BEFORE, **{f"attack_{k}": v for k, v in TOY_BEFORE.items()})
        return Outcome(row)
    p = trial.defense.params
    asr = min(1.0, 0.5 * ((math.log10(p["lr"]) + 2.5) / 1.5) ** 2 + 0.5 * (1 - p["portion"]))
    ca = TOY_BEFORE["clean_acc"] - 0.1 * p["portion"]
    ctx = DefenseContext(info=dataset_info(trial.dataset["name"]), train_cfg=TrainConfig(**trial.train),
                         seed=trial.seed, device=torch.device("cpu"))
    for step in range(1, 5):
        ctx.log(step, clean_acc=ca, asr=asr + (1 - asr) * 0.5 ** step, robust_acc=0.0)
    row = base_row(trial)
    row.update(status="ok", clean_acc=ca, asr=asr, robust_acc=1 - asr, defense_seconds=0.01,
               attack_clean_acc=TOY_BEFORE["clean_acc"], attack_asr=TOY_BEFORE["asr"],
               attack_robust_acc=TOY_BEFORE["robust_acc"], attack_seconds=0.0, attack_cached=True)
    return Outcome(row, curves={"defense": ctx.history})
