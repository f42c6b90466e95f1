"""What an attack is, in the engine's terms.

An attack (data poisoning, all the attacks of this package so far) says
1. which training samples it poisons (``select``), their new images (``apply_trigger``) and labels
   (``attack_label``): together :meth:`Attack.poison`;
2. how to stamp a test input (``apply_trigger``) and what label it then wants (``attack_label``):
   :meth:`Attack.triggered_test`, from which ASR and RA are computed.
Attacks work on float images in [0, 1] and do no I/O: a file a parameter names (a trigger image) is
read by the engine and handed over in ``files``.

Parameters are a pydantic model per attack (``Params``), with the literature's defaults; the sweep spec
is validated against it, so an unknown or ill-typed parameter is refused before any trial runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from kernel.data import DatasetInfo, Split
from kernel.metrics import TriggeredSet
from kernel.train import to_float, to_uint8


class AttackParams(BaseModel):
    """Parameters common to no attack: subclasses add theirs. Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PoisonParams(AttackParams):
    poison_rate: float = Field(0.1, gt=0, le=1, description="fraction of the training set poisoned")
    target: Union[int, Literal["all"]] = Field(
        0, description="target class (all-to-one), or 'all' for all-to-all: y -> (y + 1) mod K")

    @field_validator("target")
    @classmethod
    def _target_is_a_class(cls, v, info: ValidationInfo):
        k = (info.context or {}).get("num_classes")
        if isinstance(v, int) and k is not None and not 0 <= v < k:
            raise ValueError(f"target {v} is not a class of this dataset (0..{k - 1})")
        return v


@dataclass
class Poisoned:
    """The training set as the attacker hands it over, and which positions were poisoned."""

    train: Split
    indices: torch.Tensor  # int64 positions into train
    # Positions whose image the attack altered *without* making them backdoor samples, labels kept
    # (WaNet's noise-mode "cross" samples). Not in ``indices`` (they carry no backdoor), but not clean
    # data either: a defender's clean set should not be drawn from them.
    noise_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


class Attack:
    name: ClassVar[str]
    Params: ClassVar[type[AttackParams]] = AttackParams
    clean_label: ClassVar[bool] = False  # poisons keep their true labels (SIG, LC, ...)

    def __init__(self, params: AttackParams, info: DatasetInfo, seed: int, files: dict | None = None):
        self.params, self.info, self.seed, self.files = params, info, seed, files or {}
        self.num_classes = info.num_classes

    # -- the attack's own definition -------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (N, C, H, W) -> triggered images in [0, 1]."""
        raise NotImplementedError

    def attack_label(self, y: torch.Tensor) -> torch.Tensor:
        """The label the attacker wants for a triggered input of true label ``y``."""
        t = self.params.target
        return (y + 1) % self.num_classes if t == "all" else torch.full_like(y, t)

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        """Which training samples may be poisoned: dirty-label attacks take those whose label changes."""
        return self.attack_label(y) == y if self.clean_label else self.attack_label(y) != y

    def num_poison(self, n_train: int) -> int:
        return round(self.params.poison_rate * n_train)

    # -- derived, shared by all attacks ----------------------------------------------------------
    def select(self, y: torch.Tensor) -> torch.Tensor:
        """Seeded choice of ``num_poison`` eligible positions (sorted)."""
        pool = self.eligible(y).nonzero().flatten()
        k = self.num_poison(len(y))
        if k > len(pool):
            raise ValueError(f"{self.name}: poison_rate {self.params.poison_rate} asks for {k} samples "
                             f"but only {len(pool)} are eligible")
        g = torch.Generator().manual_seed(self.seed)
        return pool[torch.randperm(len(pool), generator=g)[:k]].sort().values

    def poison(self, train: Split) -> Poisoned:
        idx = self.select(train.y)
        x, y = train.x.clone(), train.y.clone()
        if len(idx):
            x[idx] = to_uint8(self.apply_trigger(to_float(train.x[idx])))  # stored as an image would be
            if not self.clean_label:
                y[idx] = self.attack_label(train.y[idx])
        return Poisoned(Split(x, y), idx)

    def triggered_test(self, test: Split) -> TriggeredSet | None:
        y_attack = self.attack_label(test.y)
        keep = y_attack != test.y  # inputs already of the attack's label say nothing about the backdoor
        return TriggeredSet(self.apply_trigger(to_float(test.x[keep])), test.y[keep], y_attack[keep])


def corner(position, size: int, h: int, w: int, margin: int = 0) -> tuple[int, int]:
    """Top-left (row, col) of a size×size patch at a named corner or an explicit [row, col]."""
    if not isinstance(position, str):
        r, c = position
    else:
        v, hpos = position.split("_")
        r = margin if v == "top" else h - size - margin
        c = margin if hpos == "left" else w - size - margin
    if not (0 <= r <= h - size and 0 <= c <= w - size):
        raise ValueError(f"a {size}x{size} patch at ({r}, {c}) does not fit a {h}x{w} image")
    return r, c
