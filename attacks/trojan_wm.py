"""``trojan_wm``: the "Trojan watermark" trigger of the I-BAU (Zeng et al., ICLR 2022) and AWM (Chen et
al., NeurIPS 2022) evaluations, originally from TrojanNN (Liu et al., NDSS 2018). A large logo-like
pattern laid over the image; poisoned training samples are relabelled to the target (dirty label).

Where the defaults come from:

- ``target`` 2: I-BAU/AWM attack the Trojan triggers towards class 2 (checkpoint names
  ``trojan_wm_2_02``; ``/work/shared/methods.md``). ``poison_rate`` 0.1 is this project's convention
  (BackdoorBench); I-BAU's ``poi_util.poison_dataset`` defaults to a portion of 0.2.
- The trigger itself: I-BAU reads it from ``triggers/trojan_wm.png`` (TrojanNN's watermark with pixel
  values optimised on a model) and *adds* it to the image, clipping to [0, 1]. That PNG could not be
  read here, so this is a deterministic, documented equivalent, not the same pixels: a binary
  logo-like mask, a ring crossed by a horizontal bar (a "θ"), centred, of outer diameter ``scale`` times
  the image side (default 0.75: 24 px on 32×32) and stroke ``stroke`` times the diameter (default 0.1),
  stamped in one ``color`` (default white) with opacity ``alpha`` (default 0.5):
  x' = (1 − α·m)·x + α·m·color. The shape is computed from continuous coordinates, so it is the same
  logo at every resolution.
- ``image``: the authors' own trigger file, added and clipped exactly as their ``patching`` does (the PNG
  ships with their released models, ../shared/data/ibau-cifar10/triggers/trojan_wm.png here).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from pydantic import Field, field_validator

from attacks import ATTACKS
from attacks.base import Attack, PoisonParams, add_and_clip


class TrojanWatermarkParams(PoisonParams):
    target: Union[int, Literal["all"]] = Field(
        2, description="target class (I-BAU/AWM: 2), or 'all' for all-to-all: y -> (y + 1) mod K")
    scale: float = Field(0.75, gt=0, le=1, description="outer diameter of the logo, as a fraction of the image side")
    stroke: float = Field(0.1, gt=0, le=0.5, description="stroke width of the logo, as a fraction of its diameter")
    color: tuple[float, float, float] = Field((1.0, 1.0, 1.0), description="RGB colour of the logo, in [0, 1]")
    alpha: float = Field(0.5, gt=0, le=1, description="opacity of the logo")
    image: Optional[str] = Field(
        None, description="the trigger image (I-BAU's triggers/trojan_wm.png): added to the input and clipped, "
                          "as the authors' patching does; scale, stroke, color and alpha then do not apply",
        json_schema_extra={"file": "image"})

    @field_validator("color")
    @classmethod
    def _in_unit_range(cls, v):
        if not all(0 <= c <= 1 for c in v):
            raise ValueError(f"color {list(v)} must be in [0, 1]")
        return v


def watermark_mask(h: int, w: int, scale: float, stroke: float) -> torch.Tensor:
    """Binary (1, H, W) mask of the logo: a ring with a horizontal bar through its centre."""
    side = min(h, w)
    radius = scale * side / 2
    width = max(1.0, stroke * 2 * radius)  # at least one pixel, so a small image still has a logo
    rows = torch.arange(h, dtype=torch.float64) + 0.5 - h / 2  # pixel centres, origin at the image centre
    cols = torch.arange(w, dtype=torch.float64) + 0.5 - w / 2
    r, c = rows[:, None], cols[None, :]
    dist = (r ** 2 + c ** 2).sqrt()
    ring = (dist <= radius) & (dist >= radius - width)
    bar = (r.abs() <= width / 2) & (c.abs() <= radius - width / 2)
    return (ring | bar).float()[None]


@ATTACKS.register("trojan_wm")
class TrojanWatermark(Attack):
    name = "trojan_wm"
    Params = TrojanWatermarkParams

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        p, (c, h, w) = self.params, self.info.shape
        self.mask = watermark_mask(h, w, p.scale, p.stroke)
        rgb = torch.tensor(p.color, dtype=torch.float32)
        col = rgb[:c] if c == 3 else rgb.mean().expand(c)
        self.pattern = col.reshape(c, 1, 1) * self.mask

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.params.image is not None:
            return add_and_clip(x, self.files["image"])
        m = self.params.alpha * self.mask.to(x)
        return ((1 - m) * x + m * self.pattern.to(x)).clamp(0, 1)
