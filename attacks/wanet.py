"""``wanet``: warping-based backdoor (Nguyen & Tran, ICLR 2021, "WaNet — Imperceptible Warping-based
Backdoor Attack"). The trigger is a fixed, smooth, small geometric warp of the image; poisoned training
samples are relabelled to the target (dirty label).

The warp, as in the authors' code: a k×k field of control-point offsets drawn uniformly from [−1, 1]
(from ``pattern_seed``) and normalised by its mean absolute value, upsampled bicubically to H×W; the
sampling grid is (identity + s·field / size)·grid_rescale, clamped to [−1, 1], and the image is resampled
with ``torch.nn.functional.grid_sample`` (bilinear, align_corners=True), which keeps values in [0, 1].

Noise mode: besides the poisoned samples, ``cross_ratio`` × (number poisoned) further training samples
(any class, chosen among the unpoisoned ones) are warped with the trigger grid plus per-sample random
noise (uniform in [−1, 1] / size per pixel, as the authors' code) and KEEP their labels, so the model
learns that only the exact warp means "target". Their positions are in ``Poisoned.noise_indices``,
not in ``Poisoned.indices`` (they carry no backdoor).

Defaults (``/work/shared/methods.md``; WaNet paper and BackdoorBench): k = 4, s = 0.5, grid_rescale = 1,
cross_ratio = 2, target 0, poison_rate 0.1.

Difference from the authors' code, deliberate: WaNet poisons *during* training, re-drawing which samples
of each batch are poisoned / noised (and the noise) at every step. Here poisoning is static, like every
attack of this engine: a fixed, seeded set of poisoned and noise samples, each with fixed noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from attacks import ATTACKS
from attacks.base import Attack, PoisonParams, Poisoned
from kernel.data import Split
from kernel.train import to_float, to_uint8


class WaNetParams(PoisonParams):
    k: int = Field(4, ge=2, description="control grid size: a k×k random flow field upsampled to the image")
    s: float = Field(0.5, gt=0, description="strength of the warp")
    grid_rescale: float = Field(1.0, gt=0, description="scale of the warped grid (1: none)")
    cross_ratio: float = Field(2.0, ge=0, description="noise-mode samples per poisoned sample (labels kept)")
    pattern_seed: int = Field(0, description="seed of the warp field (the trigger), fixed across trial seeds")

    @model_validator(mode="after")
    def _room_for_noise_samples(self):
        if self.poison_rate * (1 + self.cross_ratio) > 1:
            raise ValueError(f"poison_rate {self.poison_rate} × (1 + cross_ratio {self.cross_ratio}) exceeds the "
                             "training set")
        return self


@ATTACKS.register("wanet")
class WaNet(Attack):
    name = "wanet"
    Params = WaNetParams

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        p, (_, h, w) = self.params, self.info.shape
        g = torch.Generator().manual_seed(p.pattern_seed)
        ins = torch.rand(1, 2, p.k, p.k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        self.noise_grid = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        self.identity_grid = torch.stack((xs, ys), 2)[None]  # grid_sample wants (x, y) = (col, row)
        self.size = torch.tensor([w, h], dtype=torch.float32)  # offsets are in units of one pixel step
        self.grid = ((self.identity_grid + p.s * self.noise_grid / self.size) * p.grid_rescale).clamp(-1, 1)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(x).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True).clamp(0, 1)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self.grid)

    def apply_noise(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Noise mode: the trigger warp plus per-sample random noise (labels are kept)."""
        _, h, w = self.info.shape
        noise = (torch.rand(len(x), h, w, 2, generator=gen) * 2 - 1) / self.size
        return self._warp(x, (self.grid + noise).clamp(-1, 1))

    @classmethod
    def num_extra(cls, params, n_poison: int) -> int:
        return round(params.cross_ratio * n_poison)

    def poison(self, train: Split) -> Poisoned:
        base = super().poison(train)
        idx = base.indices
        n = self.num_extra(self.params, len(idx))
        cross, g = self.draw_unpoisoned(len(train), idx, n, "noise samples")
        x = base.train.x
        if n:
            x[cross] = to_uint8(self.apply_noise(to_float(train.x[cross]), g))
        return Poisoned(Split(x, base.train.y), idx, noise_indices=cross)
