"""``multi_target``: several BadNets-style (trigger, target) pairs in one poisoned training set, as in the
multi-target setting of I-BAU (Zeng et al., ICLR 2022), where one model carries several backdoors, each
trigger leading to its own target class.

Each pair is a ``patch_size``×``patch_size`` patch (content ``pattern``: ABL's grid, white, black, checkerboard or a
fixed random binary pattern from ``pattern_seed``) at a corner or an explicit [row, col], and a target
class. The total ``poison_rate`` is split across the pairs as evenly as integers allow (the first pairs
take the remainder); each pair poisons its own, disjoint, seeded choice of training samples whose label is
not its target, stamps its patch and relabels them to its target. ASR is measured over all pairs at once:
the triggered test set is, for each pair, the test inputs whose label is not that pair's target with that
pair's patch, concatenated.

Defaults (this project's choice; I-BAU gives no canonical pair list): four 3×3 patches (BackdoorBench's
BadNets size), one at each corner, 1 px from the borders: top-left random (binary, from ``pattern_seed``
+ pair index) → 0, top-right checkerboard → 1, bottom-left ABL's grid → 2, bottom-right random → 3;
poison_rate 0.1 in all (2.5% per pair). The contents differ, and differ from the horizontal mirror of the
patch on the opposite side, because training's random flip moves a left patch to the right: with four
white patches the model cannot tell top-left from top-right (measured on the synthetic set: each pair's
inputs split between the two same-row targets). Why no plain white or black patch: on CIFAR-10 (small_cnn,
10k images, seed 0) the first layout, white/checkerboard/black/random, reached 85.6% ASR, and white
patches were the weak pairs in every layout tried (72.7% and 79.8% while the others were at 85–100%;
CIFAR's corners are often near-white or near-black); the current layout reaches 98.8% (every pair ≥
96.8%), CA −2.2 (docs/attacks.md). Patches may not overlap. Targets are classes; all-to-all has no
meaning here.
"""
from __future__ import annotations

from typing import Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from attacks import ATTACKS
from attacks.badnets import patch_content
from attacks.base import Attack, AttackParams, Poisoned, corner
from kernel.data import Split
from kernel.metrics import TriggeredSet
from kernel.train import to_float, to_uint8

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left"]


class TriggerPair(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    position: Union[Corner, tuple[int, int]] = Field(
        description="a corner (``margin`` px from the borders), or [row, col] of the top-left pixel")
    target: int = Field(ge=0, description="the class this trigger leads to")
    pattern: Literal["grid", "white", "black", "checkerboard", "random"] = "white"


def _default_pairs() -> tuple[TriggerPair, ...]:
    # Distinct contents, not only distinct corners: the standard horizontal-flip augmentation moves a
    # left patch to the right, so two pairs told apart by their side alone become one trigger.
    # Plain white/black patches are weak on CIFAR's bright and dark corners (module docstring).
    layout = [("top_left", "random"), ("top_right", "checkerboard"), ("bottom_left", "grid"), ("bottom_right", "random")]
    return tuple(TriggerPair(position=p, target=t, pattern=c) for t, (p, c) in enumerate(layout))


class MultiTargetParams(AttackParams):
    poison_rate: float = Field(0.1, gt=0, le=1,
                               description="fraction of the training set poisoned, all pairs together")
    patch_size: int = Field(3, ge=1, description="side of every square patch, in pixels")
    margin: int = Field(1, ge=0, description="distance of a corner patch from the borders")
    pairs: tuple[TriggerPair, ...] = Field(default_factory=_default_pairs, min_length=1,
                                           description="the (trigger, target) pairs")
    pattern_seed: int = 0

    @field_validator("pairs")
    @classmethod
    def _targets_are_classes(cls, v, info: ValidationInfo):
        k = (info.context or {}).get("num_classes")
        for i, pair in enumerate(v):
            if k is not None and pair.target >= k:
                raise ValueError(f"pairs[{i}].target {pair.target} is not a class of this dataset (0..{k - 1})")
        return v

    @model_validator(mode="after")
    def _patches_fit_and_do_not_overlap(self, info: ValidationInfo):
        shape = (info.context or {}).get("shape")
        if shape is not None:
            boxes = [corner(p.position, self.patch_size, shape[1], shape[2], self.margin) for p in self.pairs]
            s = self.patch_size
            for i in range(len(boxes)):
                for j in range(i):
                    (r1, c1), (r2, c2) = boxes[i], boxes[j]
                    if abs(r1 - r2) < s and abs(c1 - c2) < s:
                        raise ValueError(f"pairs[{i}] and pairs[{j}]: the patches overlap")
        return self


@ATTACKS.register("multi_target")
class MultiTarget(Attack):
    name = "multi_target"
    Params = MultiTargetParams

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        p, (c, h, w) = self.params, self.info.shape
        self.corners = [corner(q.position, p.patch_size, h, w, p.margin) for q in p.pairs]
        self.patches = [patch_content(q.pattern, c, p.patch_size, p.pattern_seed + i) for i, q in enumerate(p.pairs)]
        self.targets = [q.target for q in p.pairs]

    # -- per pair ----------------------------------------------------------------------------------
    def apply_pair(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Stamp pair ``i``'s patch."""
        x = x.clone()
        (r, c), s = self.corners[i], self.params.patch_size
        x[:, :, r:r + s, c:c + s] = self.patches[i].to(x)
        return x

    def apply_trigger(self, x: torch.Tensor, pair: int = 0) -> torch.Tensor:
        return self.apply_pair(x, pair)

    def attack_label(self, y: torch.Tensor, pair: int = 0) -> torch.Tensor:
        return torch.full_like(y, self.targets[pair])

    def eligible(self, y: torch.Tensor, pair: int = 0) -> torch.Tensor:
        return y != self.targets[pair]

    def counts(self, n_train: int) -> list[int]:
        """Poisoned samples per pair: the total split as evenly as integers allow, first pairs first."""
        total, n = self.num_poison(n_train), len(self.targets)
        return [total // n + (1 if i < total % n else 0) for i in range(n)]

    # -- the engine's interface --------------------------------------------------------------------
    def poison(self, train: Split) -> Poisoned:
        x, y = train.x.clone(), train.y.clone()
        free = torch.ones(len(train), dtype=torch.bool)
        g = torch.Generator().manual_seed(self.seed)
        chosen = []
        for i, k in enumerate(self.counts(len(train))):
            pool = (free & self.eligible(train.y, i)).nonzero().flatten()
            if k > len(pool):
                raise ValueError(f"{self.name}: pair {i} (target {self.targets[i]}) asks for {k} samples but only "
                                 f"{len(pool)} are eligible")
            idx = pool[torch.randperm(len(pool), generator=g)[:k]].sort().values
            free[idx] = False
            if len(idx):
                x[idx] = to_uint8(self.apply_pair(to_float(train.x[idx]), i))
                y[idx] = self.targets[i]
            chosen.append(idx)
        return Poisoned(Split(x, y), torch.cat(chosen).sort().values)

    def triggered_test(self, test: Split) -> TriggeredSet:
        xs, ys, ts = [], [], []
        for i, t in enumerate(self.targets):
            keep = test.y != t
            xs.append(self.apply_pair(to_float(test.x[keep]), i))
            ys.append(test.y[keep])
            ts.append(torch.full_like(test.y[keep], t))
        return TriggeredSet(torch.cat(xs), torch.cat(ys), torch.cat(ts))
