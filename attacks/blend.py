"""``blend``: Blended injection (Chen et al., 2017). The trigger is an image blended over the whole input,
x' = (1 − α)·x + α·t; poisoned training samples are relabelled to the target.

Default α = 0.2 (BackdoorBench). The trigger ``t`` is the image file given in ``image`` (the literature
uses a Hello Kitty picture), resized to the dataset's shape, or, when none is given, a fixed uniform
noise pattern drawn from ``pattern_seed`` (the other classic choice).
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from attacks import ATTACKS
from attacks.base import Attack, PoisonParams


class BlendParams(PoisonParams):
    alpha: float = Field(0.2, gt=0, le=1, description="blend ratio of the trigger")
    image: Optional[str] = Field(None, description="path of the trigger image; noise when absent",
                                 json_schema_extra={"file": "image"})
    pattern_seed: int = 0


@ATTACKS.register("blend")
class Blend(Attack):
    name = "blend"
    Params = BlendParams

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        if self.params.image is not None:
            self.pattern = self.files["image"]  # float (C, H, W) in [0, 1], read by the engine
        else:
            g = torch.Generator().manual_seed(self.params.pattern_seed)
            self.pattern = torch.rand(self.info.shape, generator=g)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        a = self.params.alpha
        return (1 - a) * x + a * self.pattern.to(x)
