"""The three numbers every trial reports, defined once.

- CA  (clean accuracy): accuracy on the clean test set.
- ASR (attack success rate): over the triggered test inputs whose true label differs from the attack's
  label for them, the fraction classified as the attack's label. (BackdoorBench's definition; BackdoorBox
  by default also counts target-class images, which inflates ASR: we exclude them.)
- RA  (robust accuracy): over the same triggered inputs, the fraction classified as their *true* label.

For the clean reference (attack ``none``) ASR and RA are undefined and reported as None (null).
Rates are fractions in [0, 1].

DER (defense effectiveness rating, BackdoorBench) = (max(0, ΔASR) − max(0, ΔCA) + 1) / 2 with
Δ = before − after. (BackdoorBench's own code adds ΔCA instead of subtracting it; we follow the paper.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernel.train import predict


@dataclass(frozen=True)
class TriggeredSet:
    """Test inputs with the trigger applied: images, their true labels and the attack's labels."""

    x: torch.Tensor
    y_true: torch.Tensor
    y_attack: torch.Tensor


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels.cpu()).float().mean()) if len(labels) else float("nan")


def evaluate(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, triggered: TriggeredSet | None,
             device: torch.device | None = None) -> dict:
    """CA, ASR and RA of ``model``; ASR and RA are None when there is no trigger."""
    out = {"clean_acc": accuracy(predict(model, x_test, device=device), y_test), "asr": None, "robust_acc": None}
    if triggered is not None and len(triggered.y_true):
        pred = predict(model, triggered.x, device=device)
        out["asr"] = accuracy(pred, triggered.y_attack)
        out["robust_acc"] = accuracy(pred, triggered.y_true)
    return out


def der(asr_before: float, asr_after: float, ca_before: float, ca_after: float) -> float:
    return (max(0.0, asr_before - asr_after) - max(0.0, ca_before - ca_after) + 1) / 2
