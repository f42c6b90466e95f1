"""``none``: no attack. Trains on clean data, giving the reference clean accuracy; ASR and RA are null."""
from __future__ import annotations

import torch

from attacks import ATTACKS
from attacks.base import Attack, AttackParams, Poisoned
from kernel.data import Split


@ATTACKS.register("none")
class NoAttack(Attack):
    name = "none"
    Params = AttackParams

    def poison(self, train: Split) -> Poisoned:
        return Poisoned(train, torch.empty(0, dtype=torch.long))

    def triggered_test(self, test: Split):
        return None
