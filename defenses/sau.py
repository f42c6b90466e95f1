"""``sau``: Shared Adversarial Unlearning (Wei, Zhang, Zha & Wu, "Shared Adversarial Unlearning: Backdoor
Mitigation by Unlearning Shared Adversarial Examples", NeurIPS 2023; the authors' implementation is
BackdoorBench's ``defense/sau.py``).

The paper bounds the backdoor risk of the purified model f by its *shared* adversarial risk with the
backdoored model f₀: adversarial examples that both models misclassify *the same way* are the ones
a trigger would produce. So every batch of the defender's clean set:

1. **Shared adversarial examples.** A perturbation p (L∞ ball of radius ``norm_bound``, pixel units;
   start ``pgd_init``) takes ``pgd_steps`` signed steps of size ``pgd_step`` (projected) descending

       β₁ · L_adv + β₂ · L_share
       L_adv   = −[Σ_{i: f not yet fooled} CE(f(x_i + p_i), y_i) + Σ_{i: f₀ not yet fooled} CE(f₀(x_i + p_i), y_i)] / 2n
       L_share = Σ_{i: not yet shared} JS(f(x_i + p_i) ‖ f₀(x_i + p_i)) / n

   where "fooled" is a prediction that differs from the model's prediction on x, "shared" that both
   are fooled to the same label, and JS the Jensen-Shannon divergence of the two softmaxes. The steps
   stop early once every example is shared. x + p is not clipped to [0, 1] (as in the code).
2. **Unlearning.** f takes an Adam step on

       λ₁ · CE(f(x), y) + λ₂ · CE(f(x + p), y) + λ₃ · L_sar

   where L_sar = −Σ_{i ∈ S} log(1 − f(x_i + p_i)_{ŷ₀ᵢ}) / n over the examples S whose adversarial label
   ŷ₀ᵢ under f₀ differs from both y_i and f₀'s prediction on x_i: f unlearns the label that f₀ is
   fooled into (computed, as the code does, from both of the two forms equal in exact arithmetic).

f₀ is a frozen copy of the backdoored model. Both models run in eval mode (BatchNorm statistics and
dropout fixed; ``train_mode`` true puts f in train mode for its unlearning forward, as the code's
``--train_mode``), on the clean images without augmentation (the code's test transform). The kernel's
loop puts the model in train mode at each epoch; the batch hook puts it back.

Defaults: BackdoorBench's ``config/defense/sau/config.yaml``: ``rounds`` 100 (``n_rounds``), batch 256,
Adam lr 1e-4 (no weight decay; the code builds a cosine schedule but never steps it, so the lr is
constant), L∞ ``norm_bound`` 0.2, ``pgd_step`` 0.2, ``pgd_steps`` 5, ``pgd_init`` 'max', β₁ 0.01, β₂ 1,
λ₁ 1, λ₂ 0, λ₃ 1; clean set 5% of the training data (``ratio`` 0.05).

Logged per round: the loss, the share of the round's examples that were shared adversarial ones at the
search's last step (``sau_shared``), and the curve metrics.
"""
from __future__ import annotations

import copy
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from defenses import DEFENSES
from defenses.base import CleanSetParams, Defense
from kernel.train import TrainConfig, fit, make_generator


class SAUParams(CleanSetParams):
    rounds: int = Field(100, ge=1, description="passes over the clean set (the code's n_rounds)")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (constant)")
    norm_bound: float = Field(0.2, gt=0, description="L-inf bound of the perturbation, in [0, 1] pixel units")
    pgd_step: float = Field(0.2, gt=0, description="signed step of the perturbation")
    pgd_steps: int = Field(5, ge=1)
    pgd_init: Literal["max", "min", "zero", "random"] = Field("max", description="start of the perturbation")
    beta1: float = Field(0.01, ge=0, description="weight of the adversarial loss in the search")
    beta2: float = Field(1.0, ge=0, description="weight of the sharing (JS) loss in the search")
    lmd1: float = Field(1.0, ge=0, description="weight of the clean loss in unlearning")
    lmd2: float = Field(0.0, ge=0, description="weight of plain adversarial training in unlearning")
    lmd3: float = Field(1.0, ge=0, description="weight of the shared adversarial loss in unlearning")
    train_mode: bool = Field(False, description="the unlearning forward in train mode (BatchNorm not fixed)")


def js_divergence(logits: torch.Tensor, logits_ref: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence of the two softmaxes (probabilities floored at 1e-8)."""
    p, q = logits.float().softmax(1).clamp(min=1e-8), logits_ref.float().softmax(1).clamp(min=1e-8)
    m = (p + q) / 2
    return (0.5 * (p * p.log() + q * q.log()) - 0.5 * (p * m.log() + q * m.log())).sum(1)


def initial_perturbation(x: torch.Tensor, init: str, bound: float, gen: Optional[torch.Generator]) -> torch.Tensor:
    if init == "max":
        p = torch.full_like(x, bound)
    elif init == "min":
        p = torch.full_like(x, -bound)
    elif init == "random":  # the code: uniform [0, 1), then projected
        p = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    else:
        p = torch.zeros_like(x)
    return p.clamp(-bound, bound)


def shared_perturbation(model, ref, x: torch.Tensor, y: torch.Tensor, p: SAUParams,
                        gen: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: the perturbation of ``x`` (labels ``y``) that fools ``model`` and ``ref`` alike, and which
    examples were shared adversarial at the last step taken. Neither model's parameters get gradients."""
    n = len(x)
    with torch.no_grad():
        clean_pred, clean_pred_ref = model(x).argmax(1), ref(x).argmax(1)
    pert = initial_perturbation(x, p.pgd_init, p.norm_bound, gen)
    for _ in range(p.pgd_steps):
        pert.requires_grad_(True)
        logits, logits_ref = model(x + pert).float(), ref(x + pert).float()
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
        shared = fooled & fooled_ref & (pred == pred_ref)
        loss_adv = -((F.cross_entropy(logits, y, reduction="none") * ~fooled).sum()
                     + (F.cross_entropy(logits_ref, y, reduction="none") * ~fooled_ref).sum()) / (2 * n)
        loss_share = (js_divergence(logits, logits_ref) * ~shared).sum() / n
        (grad,) = torch.autograd.grad(p.beta1 * loss_adv + p.beta2 * loss_share, pert)
        pert = (pert.detach() - p.pgd_step * grad.sign()).clamp(-p.norm_bound, p.norm_bound)
        if shared.all():  # the code's early stop, on the examples before this last step
            break
    return pert.detach(), shared.detach()


def shared_adversarial_loss(adv_logits: torch.Tensor, adv_pred_ref: torch.Tensor,
                            unlearn: torch.Tensor) -> torch.Tensor:
    """L_sar: −log(1 − the model's probability of the reference's adversarial label), summed over the
    ``unlearn`` examples and divided by the batch size; the code's two numerically different forms of
    it, averaged."""
    if not unlearn.any():
        return adv_logits.new_zeros(())
    prob = adv_logits.float().softmax(1)
    on = F.one_hot(adv_pred_ref, prob.shape[1]).to(prob.dtype)
    pos = (prob * on).sum(1)[unlearn]
    neg = (prob * (1 - on)).sum(1)[unlearn]
    return (-torch.log(1e-6 + neg.clamp(max=0.999)).sum() - torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()) / (
        2 * len(adv_logits))


@DEFENSES.register("sau")
class SAU(Defense):
    name = "sau"
    Params = SAUParams

    @classmethod
    def work(cls, params, n_clean):
        return params.rounds * n_clean  # passes over the clean set

    def apply(self, model, ctx):
        p = self.params
        model.to(ctx.device).requires_grad_(True)
        ref = copy.deepcopy(model).eval().requires_grad_(False)  # f₀, the backdoored model
        gen = make_generator(ctx.seed + 1, ctx.device)
        seen = {}  # the reference's view of the batch, for the loss
        shared_sum, count = torch.zeros((), device=ctx.device), 0

        def batch_fn(xb, yb, idx):  # step 1; fit then runs f on [x, x + p] in one forward
            nonlocal shared_sum, count
            model.eval()
            pert, shared = shared_perturbation(model, ref, xb, yb, p, gen)
            with torch.no_grad():
                seen["clean_pred"] = ref(xb).argmax(1)
                seen["adv_pred"] = ref(xb + pert).argmax(1)
            shared_sum, count = shared_sum + shared.sum(), count + len(idx)
            model.train(p.train_mode)
            return torch.cat([xb, xb + pert]), torch.cat([yb, yb]), None

        def loss_fn(logits, y2, idx):  # step 2
            n = len(idx)
            logits, adv_logits, y = logits[:n], logits[n:], y2[:n]
            unlearn = (seen["adv_pred"] != y) & (seen["adv_pred"] != seen["clean_pred"])
            return (p.lmd1 * F.cross_entropy(logits, y) + p.lmd2 * F.cross_entropy(adv_logits, y)
                    + p.lmd3 * shared_adversarial_loss(adv_logits, seen["adv_pred"], unlearn))

        step0 = len(ctx.history)

        def on_epoch(epoch, record):
            nonlocal shared_sum, count
            ctx.log(step0 + epoch, sau_loss=record["loss"], sau_shared=float(shared_sum) / max(1, count),
                    **ctx.curve(model))
            shared_sum, count = torch.zeros((), device=ctx.device), 0

        cfg = TrainConfig(epochs=p.rounds, batch_size=p.batch_size, lr=p.lr, schedule="constant", augment=False)
        opt = torch.optim.Adam(model.parameters(), lr=p.lr)
        fit(model, ctx.clean.x, ctx.clean.y, cfg, seed=ctx.seed, device=ctx.device, loss_fn=loss_fn,
            batch_fn=batch_fn, optimizer=opt, on_epoch=on_epoch)
        return model.eval()
