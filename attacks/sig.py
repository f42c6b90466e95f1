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
from pydantic import Field

from attacks import ATTACKS
from attacks.base import CleanLabelAttack, CleanLabelParams


class SigParams(CleanLabelParams):
    target: Union[int, Literal["all"]] = Field(0, description="target class; the only class poisoned (clean label)")
    delta: float = Field(40, gt=0, le=255, description="amplitude Δ of the sinusoid on the 0-255 scale "
                                                          "(BackdoorBench 40; ABL/NAD code 20)")
    frequency: float = Field(6, gt=0, description="number of periods f across the image width")


@ATTACKS.register("sig")
class Sig(CleanLabelAttack):
    name = "sig"
    Params = SigParams

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        p, (c, h, w) = self.params, self.info.shape
        j = torch.arange(w, dtype=torch.float64)
        row = p.delta / 255 * torch.sin(2 * math.pi * j * p.frequency / w)
        self.signal = row.float().reshape(1, 1, w).expand(c, h, w).clone()

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.signal.to(x)).clamp(0, 1)
