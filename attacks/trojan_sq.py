"""``trojan_sq``: the "Trojan square" trigger of the I-BAU (Zeng et al., ICLR 2022) and AWM (Chen et al.,
NeurIPS 2022) evaluations, originally from TrojanNN (Liu et al., NDSS 2018). A small square patch near
the bottom-right corner; poisoned training samples are relabelled to the target (dirty label).

Where the defaults come from:

- ``target`` 2: I-BAU/AWM attack the Trojan triggers towards class 2 (checkpoint names
  ``trojan_sq_2_02``; ``/work/shared/methods.md``). ``poison_rate`` 0.1 is this project's convention
  (BackdoorBench); I-BAU's ``poi_util.poison_dataset`` defaults to a portion of 0.2.
- The trigger itself: I-BAU reads it from ``triggers/trojan_sq.png`` (a TrojanNN trigger whose pixel
  values were optimised on a model) and *adds* it to the image, clipping to [0, 1]. That PNG could not be
  read here, so this is a deterministic, documented equivalent, not the same pixels: a ``size``×``size``
  square (default 5) ``margin`` pixels (default 1) from the bottom-right corner, i.e. rows/cols 26..30 of
  a 32×32 image, whose content is a fixed binary RGB pattern drawn from ``pattern_seed`` (the optimised
  TrojanNN squares look like saturated colour noise), or one fixed ``color`` when given. It is stamped
  with opacity ``alpha`` (1: replaced), x' = (1 − α·m)·x + α·m·t; for a saturated trigger that is what
  I-BAU's add-and-clip gives.
- ``image``: the authors' own trigger file, added and clipped exactly as their ``patching`` does (the PNG
  ships with their released models, ../shared/data/ibau-cifar10/triggers/trojan_sq.png here).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from attacks import ATTACKS
from attacks.base import Attack, PoisonParams, add_and_clip


class TrojanSquareParams(PoisonParams):
    target: Union[int, Literal["all"]] = Field(
        2, description="target class (I-BAU/AWM: 2), or 'all' for all-to-all: y -> (y + 1) mod K")
    size: int = Field(5, ge=1, description="side of the square, in pixels")
    margin: int = Field(1, ge=0, description="distance of the square from the bottom and right borders")
    color: Optional[tuple[float, float, float]] = Field(
        None, description="one RGB colour in [0, 1] for the whole square; default: a fixed binary RGB "
                          "pattern drawn from pattern_seed")
    alpha: float = Field(1.0, gt=0, le=1, description="opacity of the square (1: the pixels are replaced)")
    pattern_seed: int = 0
    image: Optional[str] = Field(
        None, description="the trigger image (I-BAU's triggers/trojan_sq.png): added to the input and clipped, "
                          "as the authors' patching does; size, margin, color, alpha and pattern_seed then "
                          "do not apply", json_schema_extra={"file": "image"})

    @field_validator("color")
    @classmethod
    def _in_unit_range(cls, v):
        if v is not None and not all(0 <= c <= 1 for c in v):
            raise ValueError(f"color {list(v)} must be in [0, 1]")
        return v

    @model_validator(mode="after")
    def _fits(self, info: ValidationInfo):
        shape = (info.context or {}).get("shape")
        if shape is not None and self.size + self.margin > min(shape[1], shape[2]):
            raise ValueError(f"a {self.size}x{self.size} square {self.margin} px from the border does not fit "
                             f"a {shape[1]}x{shape[2]} image")
        return self


def square_trigger(c: int, h: int, w: int, size: int, margin: int, color,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (1, H, W) in {0, 1}, pattern (C, H, W) in [0, 1]) of the square trigger."""
    r0, c0 = h - margin - size, w - margin - size
    if r0 < 0 or c0 < 0:
        raise ValueError(f"a {size}x{size} square {margin} px from the border does not fit a {h}x{w} image")
    mask = torch.zeros(1, h, w)
    mask[:, r0:r0 + size, c0:c0 + size] = 1
    if color is not None:
        rgb = torch.tensor(color, dtype=torch.float32)
        col = rgb[:c] if c == 3 else rgb.mean().expand(c)
        pattern = col.reshape(c, 1, 1).expand(c, h, w).clone()
    else:
        g = torch.Generator().manual_seed(seed)
        pattern = (torch.rand(c, h, w, generator=g) > 0.5).float()
    return mask, pattern * mask


@ATTACKS.register("trojan_sq")
class TrojanSquare(Attack):
    name = "trojan_sq"
    Params = TrojanSquareParams

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        p, (c, h, w) = self.params, self.info.shape
        self.mask, self.pattern = square_trigger(c, h, w, p.size, p.margin, p.color, p.pattern_seed)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.params.image is not None:
            return add_and_clip(x, self.files["image"])
        m = self.params.alpha * self.mask.to(x)
        return ((1 - m) * x + m * self.pattern.to(x)).clamp(0, 1)
