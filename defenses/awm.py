"""``awm``: Adversarial Weight Masking (Chen, Gong, Wang, Gu: "One-shot Neural Backdoor Erasing via
Adversarial Weight Masking", NeurIPS 2022; authors' code jinghuichen/AWM, main.py).

A soft mask m ∈ [0, 1] over every convolution weight (initialised to 1; BatchNorm and linear layers are
not masked) is learnt against a recovered trigger. Each of ``rounds`` rounds:

1. Trigger recovery: δ (one universal additive pattern) starts at 0 and takes SGD steps maximising
   CE(f_{m⊙θ}(clip(x + δ)), f's prediction on x), projected onto the L1 ball ‖δ‖₁ ≤ τ.
2. Mask update: Adam steps on m minimising
       α·CE(f_{m⊙θ}(x), y) + β·CE(f_{m⊙θ}(clip(x + δ, 0, 1)), y) + γ‖m‖₁,
   m clipped to [0, 1] after each step.

The original weights θ never change: the masked network is evaluated with
``torch.func.functional_call`` on {name: m ⊙ θ}. The returned model has m ⊙ θ baked into its conv weights.

Defaults and where they come from (methods.md, "AWM"):
- ``rounds`` **10**: the code's ``outer`` is 20. Without the lr decay (below), 10 rounds measured better
  than 20 on ``small_cnn`` / 10k-image CIFAR-10 with 500 clean images (BadNets ASR 9.3% / CA 66.9% vs
  10.1% / 64.9%). With the decay the two are close (grid BadNets: 10 rounds CA -3.98 / ASR 8.6%, 20
  rounds CA -3.68 / ASR 10.6%; docs/ibau_awm_probes.md), and 10 take half the time.
- ``lr_decay`` 0.9: the code steps ``ExponentialLR(gamma=0.9)`` on the mask optimiser once a round.
- ``inner`` 5, ``alpha`` 0.9, ``beta`` 0.1 (code: 1 − α), ``gamma`` 1e-8,
  ``trigger_norm`` τ = 1000 (CIFAR-10; [0, 1] pixel units summed over C×H×W), ``trigger_lr`` 10 (SGD),
  ``lr`` 1e-2 (Adam on the mask), ``batch_size`` 128, ``clean_size`` 500 (the code's 500 images): the
  authors' code. Each phase takes ⌈n / batch⌉·inner batches drawn with replacement, as the code does.
- ``projection``: 'euclidean' (the exact Euclidean projection onto the L1 ball, Duchi et al. 2008) after
  every step; 'scale' rescales δ onto the ball instead, the code's ``δ·min(1, τ/‖δ‖₁)``.
- One-shot (one image per class): batches are random crops + flips (kernel.train.augment) of the few
  images, and each phase is sized as if the set held ``min_samples`` (default 500) images, i.e. the set is
  expanded into augmented copies, as the paper's one-shot setting does. Augmentation is applied to every
  batch whatever the clean-set size (``augment``). Measured on CIFAR-10 BadNets (docs/ibau_awm_probes.md):
  min_samples 500 took ASR to 10.7% (CA 71.2 -> 40.2), 128 (= the code's ⌈n/batch⌉·inner) only to 40.4%
  (CA 51.0); for n >= 500 the setting changes nothing.
- The model stays in eval mode (BatchNorm statistics frozen), as in the code.
- ``trigger_inner`` (default: ``inner``, the code) sizes the trigger phase on its own. One-shot on
  CIFAR-10, 30 (120 steps a round) met ASR <= 20% in 7 of 8 runs against the default's 5 of 8
  (BadNets 4 of 4 against 1 of 4; docs/ibau_awm.md, "AWM one-shot over four seeds").
- ``clean_target`` 'label' (the paper's CE against the clean labels). 'teacher' (not in the paper)
  replaces the labels of both loss terms with the *unmasked* model's softmax on the clean image: the
  clean term then has its minimum at m = 1, so it only holds the model's clean behaviour instead of
  refitting 500 labels, which alone cost 2.0-2.7 CA points on small_cnn (``beta`` 0 probe,
  docs/ibau_awm.md); the triggered term asks the trigger to change nothing of that behaviour. Its
  weakness: it also pulls towards the backdoored weights, so once the trigger phase stops finding the
  trigger, ASR creeps back up over rounds. Measured with ``trigger_norm`` 2000, 20 rounds, ``lr_decay``
  1 and ``trigger_inner`` 15 (a longer trigger search keeps finding it): CA -1.2 to -2.5 and ASR 3.6-9.6%
  on 3 of 4 CIFAR-10 runs at 500 images, where the label defaults cost -3.9 to -4.5 (docs/ibau_awm.md).
  The logged ``clean_ce`` is then the cross-entropy against the teacher (it includes the teacher's
  entropy, so it does not go to 0).

Why not ``kernel.train.fit``: only the mask is optimised, with Adam, through ``functional_call``, with
eval-mode BatchNorm, and the trigger phase is a gradient *ascent* on the input; fit trains the module's
own parameters with SGD in train mode.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from defenses import DEFENSES
from defenses.base import CleanSetParams, CleanSize, Defense
from kernel.train import _autocast, augment, make_generator, to_float


class AWMParams(CleanSetParams):
    clean_size: CleanSize = Field(500, description="defender's clean images (code: 500); 'one_shot' supported")
    rounds: int = Field(10, ge=1, description="outer rounds (code: outer = 20; 10 measured as good at half the time)")
    inner: int = Field(5, ge=1, description="each phase runs ceil(n/batch)*inner batches (code: 5)")
    alpha: float = Field(0.9, ge=0, description="weight of the clean loss (code: 0.9)")
    beta: float = Field(0.1, ge=0, description="weight of the triggered loss (code: 1 - alpha)")
    gamma: float = Field(1e-8, ge=0, description="weight of the mask's L1 norm (code: 1e-8)")
    trigger_norm: float = Field(1000.0, gt=0, description="tau: L1 bound of the trigger (code: 1000 on CIFAR-10)")
    trigger_lr: float = Field(10.0, gt=0, description="SGD step of the trigger recovery (code: 10)")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of the mask (code: 1e-2)")
    lr_decay: float = Field(0.9, gt=0, le=1, description="the mask's lr is multiplied by this after each round "
                            "(code: ExponentialLR, gamma 0.9)")
    batch_size: int = Field(128, ge=1)
    projection: Literal["euclidean", "scale"] = Field(
        "euclidean", description="'euclidean': exact L1-ball projection; 'scale': the code's rescaling")
    augment: bool = Field(True, description="random crop + flip of every batch")
    min_samples: int = Field(500, ge=1, description="phases are sized for at least this many (augmented) images")
    trigger_inner: Optional[int] = Field(None, ge=1, description="the trigger phase runs ceil(n/batch)*this "
                                         "batches (None: inner, the code)")
    clean_target: Literal["label", "teacher"] = Field(
        "label", description="'label': CE against the clean labels (paper); 'teacher': KL to the unmasked "
        "model's own prediction on the clean image, for both loss terms")


def project_l1(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Euclidean projection of ``v`` (any shape) onto {w : ‖w‖₁ ≤ radius} (Duchi et al., ICML 2008).

    Inside the ball ``v`` is returned unchanged; outside, the result is the soft-thresholding
    sign(v)·max(|v| − θ, 0) with θ chosen so that its L1 norm is exactly ``radius``.
    """
    a = v.abs().flatten()
    if float(a.sum()) <= radius:
        return v
    u = a.sort(descending=True).values
    css = u.cumsum(0)
    j = torch.arange(1, len(u) + 1, device=v.device, dtype=u.dtype)
    rho = int((u * j > css - radius).nonzero().max())
    theta = (css[rho] - radius) / (rho + 1)
    return v.sign() * (v.abs() - theta).clamp_min(0)


def scale_l1(v: torch.Tensor, radius: float) -> torch.Tensor:
    """The AWM code's projection: ``v · min(1, radius / ‖v‖₁)``."""
    return v * min(1.0, radius / max(float(v.abs().sum()), 1e-12))


def conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> weight of every Conv2d in ``model`` (the weights AWM masks)."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d)}


@DEFENSES.register("awm")
class AWM(Defense):
    name = "awm"
    Params = AWMParams

    @classmethod
    def work(cls, params, n_clean):
        # each round: the trigger phase and the mask phase, both sized by the (expanded) clean set
        per_inner = math.ceil(max(n_clean, params.min_samples) / params.batch_size) * params.batch_size
        return params.rounds * per_inner * (params.inner + (params.trigger_inner or params.inner))

    def apply(self, model, ctx):
        p, dev = self.params, ctx.device
        model.to(dev).eval()
        x, y = ctx.clean.x.to(dev), ctx.clean.y.to(dev)
        n = len(y)
        gen = make_generator(ctx.seed, dev)
        weights = conv_weights(model)
        orig = {k: w.detach().clone() for k, w in weights.items()}
        masks = {k: torch.ones_like(w, requires_grad=True) for k, w in orig.items()}
        opt = torch.optim.Adam(masks.values(), lr=p.lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=p.lr_decay)
        batches_per_inner = math.ceil(max(n, p.min_samples) / p.batch_size)
        steps = batches_per_inner * p.inner
        trigger_steps = batches_per_inner * (p.trigger_inner or p.inner)
        project = project_l1 if p.projection == "euclidean" else scale_l1

        def masked(inputs):
            return torch.func.functional_call(model, {k: orig[k] * masks[k] for k in orig}, (inputs,))

        def batch():
            idx = torch.randint(n, (min(p.batch_size, max(n, p.min_samples)),), device=dev, generator=gen)
            xb = augment(x[idx], gen) if p.augment else x[idx]
            return to_float(xb), y[idx]

        for rnd in range(p.rounds):
            # 1. trigger recovery against the current masked model
            delta = torch.zeros(1, *x.shape[1:], device=dev, requires_grad=True)
            topt = torch.optim.SGD([delta], lr=p.trigger_lr)
            for _ in range(trigger_steps):
                xb, _y = batch()
                with torch.no_grad(), _autocast(dev):
                    pseudo = masked(xb).argmax(1)
                with _autocast(dev):
                    loss = -F.cross_entropy(masked((xb + delta).clamp(0, 1)).float(), pseudo)
                (g,) = torch.autograd.grad(loss, delta)
                delta.grad = g
                topt.step()
                with torch.no_grad():
                    delta.copy_(project(delta, p.trigger_norm))
            delta = delta.detach()
            trig_loss = -float(loss.detach())
            # 2. mask update against that trigger
            for _ in range(steps):
                xb, yb = batch()
                if p.clean_target == "teacher":
                    with torch.no_grad(), _autocast(dev):
                        yb = torch.func.functional_call(model, orig, (xb,)).float().softmax(1)
                with _autocast(dev):
                    nat = F.cross_entropy(masked(xb).float(), yb)
                    rob = F.cross_entropy(masked((xb + delta).clamp(0, 1)).float(), yb)
                l1 = sum(m.sum() for m in masks.values())
                loss = p.alpha * nat + p.beta * rob + p.gamma * l1
                grads = torch.autograd.grad(loss, list(masks.values()))
                opt.zero_grad(set_to_none=True)
                for m, g in zip(masks.values(), grads):
                    m.grad = g
                opt.step()
                with torch.no_grad():
                    for m in masks.values():
                        m.clamp_(0, 1)
            record = {"mask_lr": opt.param_groups[0]["lr"], "trigger_ce": trig_loss, "clean_ce": float(nat.detach()),
                      "trigger_ce_after": float(rob.detach()),
                      "mask_mean": float(sum(float(m.detach().sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()))}
            if not all(math.isfinite(v) for v in record.values()):
                raise FloatingPointError(f"AWM diverged in round {rnd}: {record}")
            if ctx.evaluate:
                self._bake(weights, orig, masks)
                record.update(ctx.evaluate(model))
            ctx.log(rnd, **record)
            sched.step()
        self._bake(weights, orig, masks)
        model.eval()
        scale = float(delta.abs().max()) or 1.0
        ctx.artifacts["trigger"] = (0.5 + delta[0].cpu() / (2 * scale)).clamp(0, 1)
        return model

    @staticmethod
    @torch.no_grad()
    def _bake(weights, orig, masks) -> None:
        """Write m ⊙ θ into the model's conv weights (θ itself is kept in ``orig``)."""
        for k, w in weights.items():
            w.copy_(orig[k] * masks[k])
