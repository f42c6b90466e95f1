"""``sig``: the sinusoidal-signal clean-label attack (Barni, Kallas & Tondi, ICIP 2019, "A new backdoor
attack in CNNs by training set corruption without label poisoning").

The trigger is a horizontal sinusoid added to every row of the image (all channels):
x'[i, j] = clip(x[i, j] + Δ·sin(2π·j·f / W)), with Δ on the 0-255 scale (divided by 255 here, as images
are in [0, 1]). Clean label: only target-class training images are poisoned and they keep their label, so
the model learns "signal → target" from correctly labelled data; at test time the signal is added to
inputs of the other classes.

Where the defaults come from (``/work/shared/methods.md``):

- ``delta`` 40 and ``frequency`` 6: BackdoorBench (the project's default source). The ABL/NAD code uses
  Δ = 20; set ``delta: 20`` to match it.
- ``target`` 0, ``poison_rate`` 0.1: BackdoorBench.
- ``rate_of``: what ``poison_rate`` is a fraction of. ``train`` (default, BackdoorBench's
  ``generate_poison_index_from_label_transform`` with ``clean_label``): round(poison_rate · |train|)
  target-class images, as for every other attack here. On a balanced 10-class set 0.1 is then *every*
  target-class image, and a rate above the target class's share cannot be met: the spec refuses
  poison_rate > 1/K outright (an unbalanced set can still fail at poisoning time, with a message naming
  the count). ``target_class``: round(poison_rate · |target class|), the "fraction of the target class"
  convention of other clean-label code.
- All-to-all (``target: all``) has no meaning for a clean-label attack and is refused.
"""
from __future__ import annotations

import math
from typing import Literal, Union

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from attacks import ATTACKS
from attacks.base import Attack, PoisonParams


class SigParams(PoisonParams):
    target: Union[int, Literal["all"]] = Field(0, description="target class; the only class poisoned (clean label)")
    delta: float = Field(40, gt=0, le=255, description="amplitude Δ of the sinusoid on the 0-255 scale "
                                                          "(BackdoorBench 40; ABL/NAD code 20)")
    frequency: float = Field(6, gt=0, description="number of periods f across the image width")
    rate_of: Literal["train", "target_class"] = Field(
        "train", description="poison_rate is a fraction of the whole training set (BackdoorBench) or of "
                             "the target class")

    @field_validator("target")
    @classmethod
    def _not_all_to_all(cls, v):
        if v == "all":
            raise ValueError("sig is a clean-label attack: it poisons target-class images without changing "
                             "their labels, so all-to-all ('all') has no meaning; give one target class")
        return v

    @model_validator(mode="after")
    def _rate_fits_the_target_class(self, info: ValidationInfo):
        k = (info.context or {}).get("num_classes")
        if k and self.rate_of == "train" and self.poison_rate > 1 / k + 1e-9:
            raise ValueError(f"poison_rate {self.poison_rate} of the training set exceeds the share of one class "
                             f"(1/{k}); sig poisons only target-class images. Use rate_of: target_class to give "
                             "a fraction of the target class")
        return self


@ATTACKS.register("sig")
class Sig(Attack):
    name = "sig"
    Params = SigParams
    clean_label = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        p, (c, h, w) = self.params, self.info.shape
        j = torch.arange(w, dtype=torch.float64)
        row = p.delta / 255 * torch.sin(2 * math.pi * j * p.frequency / w)
        self.signal = row.float().reshape(1, 1, w).expand(c, h, w).clone()

    _n_target: int | None = None  # size of the target class, known once select() has seen the labels

    def num_poison(self, n_train: int) -> int:
        if self.params.rate_of == "train":
            return super().num_poison(n_train)
        if self._n_target is None:
            raise RuntimeError("sig with rate_of: target_class counts its poisons in select(), from the labels")
        return round(self.params.poison_rate * self._n_target)

    def select(self, y: torch.Tensor) -> torch.Tensor:
        self._n_target = int(self.eligible(y).sum())
        return super().select(y)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.signal.to(x)).clamp(0, 1)
