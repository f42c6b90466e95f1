"""``lc``: the label-consistent (clean-label) backdoor attack (Turner, Tsipras & Madry, 2019,
"Label-Consistent Backdoor Attacks").

A clean-label attack only poisons target-class images and keeps their labels. Stamping a trigger on them
is not enough: a model classifies those images correctly from their natural features and has no reason to
look at the trigger. LC first makes them *hard*: each chosen target-class image is perturbed adversarially
(untargeted PGD within an L∞ ball of radius ε) against a model trained on clean data, so its natural
features no longer point at its label; then the trigger is stamped. Trained on these, the model leans on
the trigger to get them right, and the trigger alone then sends other classes' inputs to the target.

Algorithm, per chosen image x of the target class (label t):
1. x_adv = PGD(x): ``steps`` steps of x ← Π_{‖x − x0‖∞ ≤ ε, [0, 1]}(x + step · sign ∇ CE(f_clean(x), t)),
   from x0 itself (no random start, as in the authors' code), f_clean in eval mode.
2. x_poison = stamp(x_adv): a 3×3 checkerboard in each of the four corners (four corners, not one, so
   that training's horizontal flips keep a trigger in place), mixed in at ``amplitude``.
At test time the full-amplitude trigger is stamped on other classes' inputs.

Where the defaults come from (``/work/shared/methods.md``, BackdoorBench):
- ``epsilon`` 8/255, ``step_size`` 1.5/255, ``steps`` 100: the PGD settings in common use.
- ``target`` 0, ``poison_rate`` 0.1 with ``rate_of: train``: on a balanced 10-class set, every
  target-class image (see :class:`attacks.base.CleanLabelParams`).
- The four-corner 3×3 checkerboard at ``amplitude`` 1: Turner et al.'s pattern; they also study reduced
  amplitudes (e.g. 16/255 or 64/255) to make the poisons less visible, with the test trigger at full
  amplitude, which is what ``amplitude`` < 1 does here.

The clean model is the engine's reference model (a model of the sweep's architecture trained with the
sweep's settings on the clean training set: attack ``none``'s model for the seed), so the adversarial
images are computed once per (dataset, model, training settings, parameters, seed) and cached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from attacks import ATTACKS
from attacks.base import AttackContext, CleanLabelParams, PrecomputedPoisonsAttack
from kernel.data import Split
from kernel.train import to_float, to_uint8


class LCParams(CleanLabelParams):
    epsilon: float = Field(8 / 255, ge=0, le=1, description="L∞ radius of the adversarial perturbation")
    step_size: float = Field(1.5 / 255, gt=0, le=1, description="PGD step (sign of the gradient)")
    steps: int = Field(100, ge=0, description="PGD steps (0: no perturbation, trigger only)")
    amplitude: float = Field(1.0, gt=0, le=1, description="trigger opacity on the poisoned training images "
                                                          "(test inputs always get the full trigger)")
    batch_size: int = Field(256, ge=1, description="images perturbed at once (memory, not results)")


def corner_checkers(c: int, h: int, w: int, size: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (1, H, W), pattern (C, H, W)): a size×size checkerboard (top-left pixel white) in each corner."""
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((ii + jj) % 2 == 0).float()
    mask, pattern = torch.zeros(1, h, w), torch.zeros(c, h, w)
    for r in (0, h - size):
        for q in (0, w - size):
            mask[:, r:r + size, q:q + size] = 1
            # mirrored on the right so that a horizontal flip maps the whole trigger onto itself
            pattern[:, r:r + size, q:q + size] = board if q == 0 else board.flip(1)
    return mask, pattern


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
        steps: int) -> torch.Tensor:
    """Untargeted L∞ PGD from x itself: maximise CE(model(x'), y) with ‖x' − x‖∞ ≤ eps, x' in [0, 1]."""
    x0, xa = x.detach(), x.detach().clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
        xa = torch.min(torch.max(xa.detach() + step * grad.sign(), x0 - eps), x0 + eps).clamp_(0, 1)
    return xa.detach()


@ATTACKS.register("lc")
class LabelConsistent(PrecomputedPoisonsAttack):
    name = "lc"
    Params = LCParams

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.mask, self.pattern = corner_checkers(*self.info.shape)

    def stamp(self, x: torch.Tensor, amplitude: float) -> torch.Tensor:
        m = amplitude * self.mask.to(x)
        return ((1 - m) * x + m * self.pattern.to(x)).clamp(0, 1)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.stamp(x, 1.0)

    def prepare(self, train: Split, ctx: AttackContext) -> dict[str, torch.Tensor]:
        p, idx = self.params, self.select(train.y)
        model = ctx.reference_model()
        out = []
        for chunk in idx.split(p.batch_size):
            x = to_float(train.x[chunk]).to(ctx.device)
            out.append(to_uint8(pgd(model, x, train.y[chunk].to(ctx.device), p.epsilon, p.step_size,
                                    p.steps)).cpu())
        empty = torch.empty(0, *self.info.shape, dtype=torch.uint8)
        return {"indices": idx, "images": torch.cat(out) if out else empty}

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        return to_uint8(self.stamp(to_float(images), self.params.amplitude))
