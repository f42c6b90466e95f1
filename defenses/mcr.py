"""``mcr``: Mode Connectivity Repair (Zhao, Chen, Das, Natesan Ramamurthy & Lin, "Bridging Mode
Connectivity in Loss Landscapes and Adversarial Robustness", ICLR 2020; code IBM/model-sanitization,
after Garipov et al.'s dnn-mode-connectivity).

Two models that both fit the data are joined by a curve of low loss; trained on a little clean data,
the curve's interior keeps the clean task but not what only the end points learnt, such as a backdoor.

1. **End points.** θ₀ is the backdoored model. θ₁ is that model fine-tuned on the defender's clean set
   with the ``finetune`` baseline's parameters and code path (``epochs``, ``lr``, ``batch_size``,
   ``weight_decay``): BackdoorBench's choice when there is one backdoored model (the paper's code joins
   two backdoored models).
2. **Curve.** A quadratic Bézier curve (``num_bends`` 3 in the code) over every parameter,

       θ(t) = (1 − t)²·θ₀ + 2t(1 − t)·θ_c + t²·θ₁,   t ∈ [0, 1],

   with the ends fixed and the control point θ_c starting at their midpoint (the code's
   ``init_linear``). θ_c is trained on the clean set by SGD (momentum 0.9) on CE(f_θ(t)(x), y), with
   one t drawn uniformly from [0, 1] for every batch, through the kernel's loop (crop and flip, the
   network in train mode, so BatchNorm normalises with batch statistics).
3. **Repair.** The returned model is the curve's point at ``t``. Its BatchNorm statistics are then
   recomputed on the clean set (the code's ``utils.update_bn``: running averages over one pass of its
   training loader, so over augmented images: see :func:`recompute_batchnorm`).

When the engine lends its evaluator, the curve's CA/ASR/RA at ``curve_points`` evenly spaced t
(0, 0.1, ..., 1 by default; each with its BatchNorm statistics recomputed) are logged as steps with
``mcr_t``, after the fine-tuning's and the curve training's per-epoch records.

Defaults and sources:
- curve: ``curve_epochs`` 100, ``curve_lr`` 0.01 with the code's schedule (constant for the first half,
  then linear decay to 1% at 90% of the epochs, then 1%), momentum 0.9, batch 128: the paper's code
  (``backdoor-cifar/train.py``). ``curve_weight_decay`` 1e-4 is the code's value, applied here as SGD
  weight decay on θ_c (BackdoorBench's form) where the code penalises the L2 norm of θ(t).
  BackdoorBench (``config/defense/mcr``): 100 epochs, lr 3e-5 cosine, wd 5e-4, for its PreAct-ResNet18.
- ``t`` 0.3: this project's choice (BackdoorBench reports t = 0.1); sweepable, and the curve log
  shows CA/ASR along the whole curve.
- end point fine-tuning: ``finetune``'s 20 epochs at lr 0.01 cosine (BackdoorBench: 100 epochs, lr 0.01
  cosine, wd 5e-4); clean set 5% of the training data (BackdoorBench's ``ratio`` 0.05).
"""
from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn
from torch.optim.swa_utils import update_bn

from defenses import DEFENSES
from defenses.base import Defense
from defenses.finetune import FinetuneParams, fine_tune
from kernel.train import TrainConfig, augment, fit, make_generator, to_float


class MCRParams(FinetuneParams):
    t: float = Field(0.3, ge=0, le=1, description="point of the curve returned (0: backdoored, 1: fine-tuned)")
    curve_epochs: int = Field(100, ge=1, description="epochs of training the curve's control point")
    curve_lr: float = Field(0.01, gt=0, description="initial SGD lr of the control point (the code's schedule)")
    curve_weight_decay: float = Field(1e-4, ge=0)
    curve_points: int = Field(11, ge=2, description="evenly spaced t at which the curve is logged")


class BezierCurve(nn.Module):
    """A quadratic Bézier curve θ(t) = (1−t)²·θ₀ + 2t(1−t)·θ_c + t²·θ₁ through the parameters of two
    models of one architecture; θ₀, θ₁ fixed, the control point θ_c trained. Calling the curve runs the
    network at θ(``self.t``) (the template's own buffers, e.g. BatchNorm statistics, are used)."""

    def __init__(self, start: nn.Module, end: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(start).requires_grad_(False)  # template: architecture and buffers
        self.names = [name for name, _ in start.named_parameters()]
        ends = dict(end.named_parameters())

        def frozen(tensors):
            return nn.ParameterList(nn.Parameter(t.detach().clone(), requires_grad=False) for t in tensors)

        self.start = frozen(q for _, q in start.named_parameters())
        self.end = frozen(ends[name] for name in self.names)
        self.control = nn.ParameterList(nn.Parameter((a + b).detach() / 2) for a, b in zip(self.start, self.end))
        self.t = 0.5

    @staticmethod
    def coefficients(t: float) -> tuple[float, float, float]:
        """The Bernstein weights of the two ends and the control point at ``t``."""
        return (1 - t) ** 2, 2 * t * (1 - t), t ** 2

    def weights(self, t: float) -> dict[str, torch.Tensor]:
        c0, c1, c2 = self.coefficients(t)
        return {name: c0 * a + c1 * c + c2 * b
                for name, a, c, b in zip(self.names, self.start, self.control, self.end)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.net, self.weights(self.t), (x,))

    @torch.no_grad()
    def point(self, t: float) -> nn.Module:
        """A standalone model with the parameters θ(t) (BatchNorm statistics: the template's)."""
        model = copy.deepcopy(self.net)
        w = self.weights(t)
        for name, q in model.named_parameters():
            q.copy_(w[name])
        return model.requires_grad_(True)


def paper_lr_factor(epoch: int, total: int) -> float:
    """The code's ``learning_rate_schedule`` for ``epoch`` counted from 1."""
    a = epoch / total
    if a <= 0.5:
        return 1.0
    if a <= 0.9:
        return 1.0 - (a - 0.5) / 0.4 * 0.99
    return 0.01


def recompute_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device,
                        gen: torch.Generator | None = None) -> nn.Module:
    """BatchNorm running statistics of ``model`` recomputed over ``x`` (one pass, plain averages). With
    ``gen``, over the kernel's crop-and-flip of each batch, as the code's ``update_bn`` runs over its
    training loader (RandomCrop + flip). That matters: the network was trained with statistics of
    augmented (zero-padded) images. Measured on small_cnn, CIFAR-10 BadNets seed 0, the backdoored model
    itself: 71.9% CA with its own statistics, 65.8 with statistics of 500 plain clean images, 69.9 with
    those of their augmented copies."""
    model.to(device)
    batches = (xb.to(device) for xb in x.split(batch_size))
    update_bn((to_float(augment(xb, gen) if gen is not None else xb) for xb in batches), model)
    return model.eval()


def train_curve(curve: BezierCurve, ctx, p: MCRParams) -> None:
    """Fit the control point on ``ctx.clean``: a fresh uniform t per batch, the code's lr schedule."""
    gen = make_generator(ctx.seed + 1, ctx.device)
    opt = torch.optim.SGD(curve.control.parameters(), lr=p.curve_lr * paper_lr_factor(1, p.curve_epochs),
                          momentum=0.9, weight_decay=p.curve_weight_decay)
    step0 = len(ctx.history)

    def batch_fn(xb, yb, idx):  # noqa: ARG001
        curve.t = float(torch.rand((), generator=gen, device=ctx.device))
        return xb, yb, None

    def on_epoch(epoch, record):
        ctx.log(step0 + epoch, curve_loss=record["loss"])
        for group in opt.param_groups:  # the next epoch's lr (fit scales initial_lr by a constant 1)
            group["initial_lr"] = p.curve_lr * paper_lr_factor(epoch + 2, p.curve_epochs)

    cfg = TrainConfig(epochs=p.curve_epochs, batch_size=p.batch_size, lr=p.curve_lr, schedule="constant")
    fit(curve, ctx.clean.x, ctx.clean.y, cfg, seed=ctx.seed, device=ctx.device, batch_fn=batch_fn,
        optimizer=opt, on_epoch=on_epoch)


@DEFENSES.register("mcr")
class MCR(Defense):
    name = "mcr"
    Params = MCRParams

    @classmethod
    def work(cls, params, n_clean):  # the fine-tuned end point, then the curve's control point
        return (params.epochs + params.curve_epochs) * n_clean

    def apply(self, model, ctx):
        p = self.params
        model.to(ctx.device)
        end = fine_tune(copy.deepcopy(model).requires_grad_(True), ctx, p)  # θ₁
        curve = BezierCurve(model, end)
        train_curve(curve, ctx, p)

        def repaired(t):  # every point's statistics from the same augmented draws
            return recompute_batchnorm(curve.point(t), ctx.clean.x, p.batch_size, ctx.device,
                                       make_generator(ctx.seed + 2, ctx.device))

        if ctx.evaluate is not None:
            step0 = len(ctx.history)
            for i, t in enumerate(torch.linspace(0, 1, p.curve_points).tolist()):
                ctx.log(step0 + i, mcr_t=t, **ctx.curve(repaired(t)))
        return repaired(p.t)
