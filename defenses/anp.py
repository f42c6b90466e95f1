"""``anp``: Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021; code csdongxian/ANP_backdoor, ``optimize_mask_cifar.py``,
``prune_neuron_cifar.py``, ``models/anp_batchnorm.py``).

The paper's observation: the neurons that carry a backdoor are *sensitive*. Perturbing them a little
makes a backdoored model misclassify clean inputs, where perturbing the neurons of the clean task does
not. A neuron here is a channel of a BatchNorm layer, y = γ·x̂ + β. So:

1. **Learn a mask under adversarial neuron perturbation.** Every BatchNorm neuron k gets a mask
   m_k ∈ [0, 1] (starting at 1) and multiplicative perturbations δ_k, ξ_k ∈ [−ε, ε] of its weight and
   bias, as the authors' ``NoisyBatchNorm2d``:

       perturbed:  y = γ·(m + δ)·x̂ + β·(1 + ξ)        unperturbed:  y = γ·m·x̂ + β

   For every batch of the clean set, δ and ξ are drawn uniformly from [−ε, ε] and take ``anp_steps``
   signed-gradient ascent steps of size ε/``anp_steps`` on the clean loss (the worst perturbation),
   kept in [−ε, ε]. Then the mask takes an SGD step (lr 0.2, momentum 0.9) on

       α · CE(f_m(x), y) + (1 − α) · CE(f_{m+δ, ξ}(x), y)

   and is clipped to [0, 1]. The network's own weights stay fixed. Each BatchNorm layer of a copy of
   the model is wrapped by :class:`NoisyBatchNorm` for this (kernel/models.py is not touched); the copy
   runs in train mode with the kernel's crop and flip, as the code's mask training does, and goes away
   afterwards.
2. **Prune.** Neurons whose mask ended at or below ``threshold`` (``pruning_by`` 'threshold'), or the
   ``pruning_fraction`` of all neurons with the smallest masks (``pruning_by`` 'number'), are pruned in
   the backdoored model itself: their BatchNorm weight γ is set to 0 (``prune_neuron_cifar.pruning``;
   the neuron then outputs its bias β). There is no fine-tuning.

Defaults (the code's ``optimize_mask_cifar.py`` and ``prune_neuron_cifar.py``, and BackdoorBench's
``config/defense/anp/config.yaml``): ε (``anp_eps``) 0.4, ``anp_steps`` 1, α (``anp_alpha``) 0.2,
2,000 mask iterations (``nb_iter``), mask lr 0.2, batch 128, ``pruning_by`` 'threshold' at 0.2 (the
paper's default threshold), clean data 1% of the training set (the code's ``val_frac`` 0.01; BackdoorBench
uses 5%). ``pruning_fraction`` 0.05 for 'number' is ours (the code scans counts up to ``pruning_max``
and has no single default).

Deviations from the code, on purpose:
- the perturbation is projected back into [−ε, ε] after its ascent steps (the paper's constraint); the
  code does not project, so its single step from a uniform start can reach 2ε;
- batches are the kernel's shuffled epochs over the clean set (as many as make ``iterations`` steps)
  rather than the code's draws with replacement.

Reported columns: ``pruned_neurons`` and ``pruned_ratio`` (of all BatchNorm neurons). The mask
optimisation logs its loss, the mean mask and how many masks sit at or below the threshold every 500
iterations (the code's ``print_every``), with the masked copy's curve metrics.
"""
from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from defenses import DEFENSES
from defenses.base import CleanSetParams, CleanSize, Defense
from kernel.train import TrainConfig, fit, make_generator

LOG_EVERY = 500  # mask iterations between log records (the code's print_every)


class ANPParams(CleanSetParams):
    clean_size: CleanSize = Field(0.01, description="defender's clean images (the code's val_frac 0.01)")
    anp_eps: float = Field(0.4, ge=0, description="bound ε of the multiplicative neuron perturbation (0: none)")
    anp_steps: int = Field(1, ge=1, description="signed-gradient ascent steps of the perturbation per batch")
    anp_alpha: float = Field(0.2, ge=0, le=1, description="weight of the unperturbed loss against the perturbed")
    iterations: int = Field(2000, ge=1, description="mask optimisation steps (the code's nb_iter)")
    lr: float = Field(0.2, gt=0, description="SGD (momentum 0.9) learning rate of the masks")
    batch_size: int = Field(128, ge=1)
    pruning_by: Literal["threshold", "number"] = Field(
        "threshold", description="'threshold': prune masks <= threshold; 'number': the smallest pruning_fraction")
    threshold: float = Field(0.2, ge=0, le=1, description="mask value at or below which a neuron is pruned")
    pruning_fraction: float = Field(0.05, gt=0, le=1, description="share of all neurons pruned by 'number'")


class NoisyBatchNorm(nn.Module):
    """A BatchNorm layer with a per-neuron mask and multiplicative perturbations of its weight and bias
    (the authors' ``NoisyBatchNorm2d``, as a wrapper around the existing layer, which it shares)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        if not bn.affine:
            raise ValueError("ANP perturbs BatchNorm's weight and bias; this layer has none")
        self.bn = bn
        self.neuron_mask = nn.Parameter(torch.ones_like(bn.weight))
        # perturbations of the weight and of the bias (plain tensors: the ascent step differentiates them)
        self.neuron_noise = torch.zeros_like(bn.weight, requires_grad=False)
        self.neuron_noise_bias = torch.zeros_like(bn.bias, requires_grad=False)
        self.perturbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if self.perturbed:
            weight = bn.weight * (self.neuron_mask + self.neuron_noise)
            bias = bn.bias * (1 + self.neuron_noise_bias)
        else:
            weight, bias = bn.weight * self.neuron_mask, bn.bias
        use_batch_stats = bn.training or bn.running_mean is None
        return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, use_batch_stats,
                            bn.momentum if bn.momentum is not None else 0.1, bn.eps)


def batchnorm_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def wrap_batchnorms(model: nn.Module, names: list[str]) -> list[NoisyBatchNorm]:
    """Replace each named BatchNorm layer of ``model`` by a :class:`NoisyBatchNorm` around it."""
    wrapped = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = NoisyBatchNorm(parent.get_submodule(child))
        setattr(parent, child, layer)
        wrapped.append(layer)
    return wrapped


def optimize_masks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: ANPParams, *, seed: int,
                   device: torch.device, on_log=None) -> list[torch.Tensor]:
    """Step 1 on a copy of ``model``: the learnt mask of every BatchNorm layer (in ``batchnorm_names``
    order). ``on_log(iteration, record, masked_copy)`` is called every ``LOG_EVERY`` iterations and at
    the end."""
    noisy = copy.deepcopy(model).to(device)
    noisy.requires_grad_(False)  # only the masks learn
    layers = wrap_batchnorms(noisy, batchnorm_names(noisy))
    if not layers:
        raise ValueError("ANP needs a model with BatchNorm layers")
    masks = [layer.neuron_mask for layer in layers]
    noises = [t for layer in layers for t in (layer.neuron_noise, layer.neuron_noise_bias)]
    gen = make_generator(seed + 1, device)

    def set_perturbed(on: bool):
        for layer in layers:
            layer.perturbed = on

    def clip_masks():
        with torch.no_grad():
            for m in masks:
                m.clamp_(0, 1)

    def batch_fn(xb, yb, idx):  # noqa: ARG001 - the worst perturbation of this batch, then its loss
        clip_masks()  # after the previous batch's mask step, as the code clips after every step
        if p.anp_eps == 0:
            return xb, yb, None
        with torch.no_grad():
            for t in noises:  # uniform start in [-eps, eps]
                t.copy_(torch.rand(t.shape, generator=gen, device=device).mul_(2 * p.anp_eps).sub_(p.anp_eps))
        set_perturbed(True)
        for _ in range(p.anp_steps):
            for t in noises:
                t.requires_grad_(True)
            grads = torch.autograd.grad(F.cross_entropy(noisy(xb), yb), noises)
            with torch.no_grad():
                for t, g in zip(noises, grads):
                    t.requires_grad_(False)
                    t.add_(g.sign(), alpha=p.anp_eps / p.anp_steps).clamp_(-p.anp_eps, p.anp_eps)
        loss_rob = F.cross_entropy(noisy(xb), yb)  # differentiable in the masks; the noise held fixed
        set_perturbed(False)  # fit's own forward is the unperturbed one
        return xb, yb, (1 - p.anp_alpha) * loss_rob

    def loss_fn(logits, yb, idx):  # noqa: ARG001
        return p.anp_alpha * F.cross_entropy(logits, yb)

    steps_per_epoch = math.ceil(len(y) / p.batch_size)
    done = {"steps": 0}

    def on_epoch(epoch, record):  # noqa: ARG001
        before, done["steps"] = done["steps"], done["steps"] + steps_per_epoch
        if on_log is not None and (done["steps"] // LOG_EVERY > before // LOG_EVERY or done["steps"] >= p.iterations):
            clip_masks()
            on_log(min(done["steps"], p.iterations), record, noisy)

    cfg = TrainConfig(epochs=math.ceil(p.iterations / steps_per_epoch), batch_size=p.batch_size, lr=p.lr,
                      schedule="constant")
    opt = torch.optim.SGD(masks, lr=p.lr, momentum=0.9)
    fit(noisy, x, y, cfg, seed=seed, device=device, loss_fn=loss_fn, batch_fn=batch_fn, optimizer=opt,
        on_epoch=on_epoch)
    clip_masks()
    return [m.detach() for m in masks]


def neurons_to_prune(masks: list[torch.Tensor], p: ANPParams) -> list[torch.Tensor]:
    """Per layer, the indices of the neurons to prune: masks <= ``threshold``, or the smallest
    ``pruning_fraction`` of all neurons together (ties broken by layer order, as a stable sort)."""
    if p.pruning_by == "threshold":
        return [(m <= p.threshold).nonzero().flatten() for m in masks]
    flat = torch.cat(masks)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[flat.argsort(stable=True)[:round(p.pruning_fraction * flat.numel())]] = True
    return [c.nonzero().flatten() for c in chosen.split([m.numel() for m in masks])]


@DEFENSES.register("anp")
class ANP(Defense):
    name = "anp"
    Params = ANPParams
    outputs = {"pruned_neurons": "int", "pruned_ratio": "float"}

    def apply(self, model, ctx):
        p = self.params
        model.to(ctx.device)
        names = batchnorm_names(model)

        def on_log(iteration, record, masked):
            mask = torch.cat([layer.neuron_mask.detach() for layer in masked.modules()
                              if isinstance(layer, NoisyBatchNorm)])
            ctx.log(iteration, anp_loss=record["loss"], anp_mask_mean=float(mask.mean()),
                    anp_masks_below_threshold=int((mask <= p.threshold).sum()), **ctx.curve(masked))

        masks = optimize_masks(model, ctx.clean.x, ctx.clean.y, p, seed=ctx.seed, device=ctx.device, on_log=on_log)
        pruned = neurons_to_prune(masks, p)
        with torch.no_grad():
            for name, idx in zip(names, pruned):
                model.get_submodule(name).weight[idx] = 0
        n, total = sum(len(i) for i in pruned), sum(m.numel() for m in masks)
        ctx.outputs.update(pruned_neurons=n, pruned_ratio=n / total)
        ctx.log(p.iterations + 1, pruned_neurons=n, **ctx.curve(model))
        return model.eval()
