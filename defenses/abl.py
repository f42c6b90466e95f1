"""``abl``: Anti-Backdoor Learning (Li et al., NeurIPS 2021; code bboylyg/ABL). A training-time defense: it
never sees the attacker's backdoored model, it trains its own from the poisoned training set.

1. Isolation (``turning_epoch`` epochs from a fresh model): train on the poisoned set with the LGA loss
   ``sign(l - gamma) * l`` (``l``: the batch's mean cross-entropy, as in the paper), which holds the loss
   near ``gamma``: samples the model fits far faster than that (the backdoor's) end up with the lowest
   loss. ``loss: flooding`` uses ``|l - gamma| + gamma`` instead (the code's default).
   The per-sample losses of the whole training set (no augmentation) are ranked and the lowest
   ``isolation_rate`` fraction is isolated (D_b). Precision/recall of D_b against the engine's ground
   truth go to the ``isolation_precision`` / ``isolation_recall`` columns.
2. The same ranking also marks the lowest ``suspect_rate`` fraction (default 20%, a superset of D_b) as
   suspects: neither trusted nor unlearned. Keep training on the trusted rest (``finetune_epochs``, plain
   CE, the sweep's optimiser and schedule; default half the sweep's epochs, 10 for small_cnn; the paper's
   code: 60), then unlearn D_b (``unlearning``) for ``unlearning_epochs`` (constant lr, SGD momentum 0.9,
   wd 1e-4, no augmentation), stopped early once fewer than ``unlearning_stop_acc`` of D_b are still
   predicted as their (poisoned) training label:
   - ``joint`` (default): the paper's objective, CE on the trusted data minus the unlearning loss on D_b,
     in the same batches (the sweep's batch size, lr 1e-3), 5 epochs (the code's count), no early stop:
     the CE holds CA in place (measured, Blended: ASR 33, 5, 3.5, 4.4, 2.8% after epochs 1-5, CA 72.5-73.4).
     Each isolated sample's loss weighs ``ascent_weight`` (5) times a trusted one's: D_b is 1% of the
     batches and the poison left among the trusted (127 of Blended's 1,000) re-taught it at weight 1
     (Blended seed 0: ASR 12.3% at 1, 1.3% at 5; CA 74.1 and 73.7). The paper's D_c is everything not isolated
     (``suspect_rate: 0``); but 1% isolation catches a tenth of a 10% poison, and the other nine tenths,
     trained on, re-taught the backdoor as fast as D_b unlearnt it (measured: Blended ASR back to 100%).
     Left out, they cost nothing: on CIFAR-10 the lowest-loss 10-20% held every poisoned sample of
     BadNets and the trusted 80% none, and the fine-tuned model lost no CA to the smaller set;
   - ``ascent`` (the paper's code): fit on D_b alone (lr 1e-4, batch ``unlearning_batch_size``, at most 20
     epochs, stopped once fewer than 20% of D_b keep their label: the ascent runs away). Measured
     on CIFAR-10 with ABL's grid BadNets: CA and ASR fall together (ASR 59% at CA -6; 0% at CA -34),
     since nothing holds the clean function in place.
   The unlearning loss (``unlearning_loss``) is ``margin`` (default) = z_y - logsumexp_{k != y} z_k, or
   ``ce`` = -CE, the paper's gradient ascent: -CE's gradient vanishes on the confidently fitted backdoor
   samples; measured on CIFAR-10/small_cnn: with BatchNorm frozen it did not move in 10 epochs at lr
   5e-3, and with BatchNorm in train mode (the code's) its all-poisoned batches moved the running
   statistics and the forward used batch statistics unlike the evaluated model's (BadNets: CA fell with
   ASR; Blended: CA 71 -> 68 while ASR stayed at 96%). ``unlearning_bn``: ``frozen`` (default; BatchNorm
   in eval mode throughout, a forward pre-hook, since ``fit`` sets train mode), ``batch`` (batch
   statistics, running ones not updated) or ``train`` (the code's).
   Everything is trained by ``kernel.train.fit``, the losses passed as ``loss_fn``.

Paper defaults: gamma 0.5, turning epoch 20, isolation rate 1%, unlearning lr 5e-4, 5 epochs (20 in
BackdoorBench). Epoch counts here, when left out, follow the sweep's training settings (``train_cfg``):
``turning_epoch`` = the sweep's epochs (20 for small_cnn, the paper's value), and isolation and
fine-tuning use the sweep's optimiser, batch size and schedule. See docs/abl_baerase.md for the measurements.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from defenses import DEFENSES
from defenses.base import Defense, DefenseParams
from kernel.train import TrainConfig, fit, frozen_batchnorm, per_sample_loss, predict


class ABLParams(DefenseParams):
    loss: Literal["lga", "flooding"] = Field("lga", description="isolation loss: LGA (paper) or Flooding (code)")
    gamma: float = Field(0.5, ge=0, description="LGA's gamma, or Flooding's flood level b")
    turning_epoch: Optional[int] = Field(None, ge=1, description="isolation epochs; default: the sweep's epochs")
    isolation_rate: float = Field(0.01, gt=0, lt=1, description="fraction of the training set isolated")
    finetune_epochs: Optional[int] = Field(
        None, ge=0, description="plain-CE epochs on the non-isolated data before unlearning; default: half the sweep's")
    suspect_rate: float = Field(
        0.2, ge=0, lt=1, description="fraction of the training set, lowest isolation loss first, kept out of "
                                     "fine-tuning and of the descent (0: all but the isolated samples, the paper's D_c)")
    unlearning: Literal["ascent", "joint"] = Field(
        "joint", description="joint: descend on the trusted data and unlearn the isolated set at once (the "
                             "paper's objective); ascent: the isolated set alone (the paper's code)")
    unlearning_epochs: Optional[int] = Field(
        None, ge=1, description="(most) unlearning epochs; default 5 joint (the paper's code), 20 ascent (BackdoorBench)")
    unlearning_lr: Optional[float] = Field(
        None, gt=0, description="default 1e-3 joint (batch: the sweep's), 1e-4 ascent (paper 5e-4 with the CE ascent)")
    unlearning_batch_size: int = Field(64, ge=1)
    unlearning_stop_acc: Optional[float] = Field(
        None, ge=0, le=1, description="stop unlearning once the model predicts fewer than this fraction of the "
                                      "isolated samples as their (training) label; 0: run all epochs. "
                                      "Default 0 joint, 0.2 ascent")
    ascent_weight: float = Field(
        5.0, gt=0, description="weight of each isolated sample's unlearning loss against a trusted sample's CE "
                               "in 'joint' unlearning (1: the paper's plain sum)")
    unlearning_loss: Literal["ce", "margin"] = Field(
        "margin", description="what is ascended on D_b: its cross-entropy (paper) or its logit margin")
    unlearning_bn: Literal["frozen", "batch", "train"] = Field(
        "frozen", description="BatchNorm while unlearning: batch statistics without updating the running ones "
                             "(batch), batch statistics updating them (train, the paper's code), or eval mode (frozen)")


def lga_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """Local gradient ascent: sign(l - gamma) * l of the batch's mean cross-entropy l."""
    loss = F.cross_entropy(logits.float(), y)
    return torch.sign(loss - gamma) * loss


def flooding_loss(logits: torch.Tensor, y: torch.Tensor, b: float) -> torch.Tensor:
    """Flooding: |l - b| + b of the batch's mean cross-entropy l."""
    loss = F.cross_entropy(logits.float(), y)
    return (loss - b).abs() + b


def isolate(losses: torch.Tensor, rate: float) -> torch.Tensor:
    """Sorted positions of the ``rate`` fraction of samples with the lowest loss (at least one)."""
    k = max(1, round(rate * len(losses)))
    return torch.topk(losses, k, largest=False).indices.sort().values


@DEFENSES.register("abl")
class ABL(Defense):
    name = "abl"
    Params = ABLParams
    needs_backdoored_model = False
    uses_poisoned_data = True
    outputs = {"isolation_precision": "float", "isolation_recall": "float"}

    def apply(self, model, ctx):
        p, data = self.params, ctx.poisoned_train
        model = ctx.new_model()
        step = 0

        def logger(stage, **extra):
            def on_epoch(epoch, record):
                nonlocal step
                extra_now = {k: record[k] for k in ("isolated_acc",) if k in record}
                ctx.log(step, **{f"{stage}_loss": record["loss"]}, **extra, **extra_now, **ctx.curve(model))
                step += 1
            return on_epoch

        # 1. isolation
        gamma = p.gamma
        iso_loss = lga_loss if p.loss == "lga" else flooding_loss
        cfg = replace(ctx.train_cfg, epochs=p.turning_epoch or ctx.train_cfg.epochs)
        fit(model, data.x, data.y, cfg, seed=ctx.seed, device=ctx.device,
            loss_fn=lambda z, y, idx: iso_loss(z, y, gamma), on_epoch=logger("isolation"))
        losses = per_sample_loss(model, data.x, data.y, device=ctx.device)
        isolated = isolate(losses, p.isolation_rate)
        suspects = isolate(losses, max(p.suspect_rate, p.isolation_rate))
        if ctx.score_isolation is not None:
            s = ctx.score_isolation(isolated)
            ctx.outputs.update(isolation_precision=s["precision"], isolation_recall=s["recall"])
        return purify(model, data, isolated, suspects, p, ctx.train_cfg, ctx.seed, ctx.device, logger)


def purify(model, data, isolated: torch.Tensor, suspects: torch.Tensor, p: ABLParams, train_cfg: TrainConfig,
           seed: int, device, logger=lambda stage: None):
    """Stage 2: optional training on the trusted data (all but ``suspects``, which include the isolated
    samples), then unlearning of the isolated set."""
    trusted = torch.ones(len(data), dtype=torch.bool)
    trusted[suspects] = False
    trusted[isolated] = False
    finetune_epochs = train_cfg.epochs // 2 if p.finetune_epochs is None else p.finetune_epochs
    if finetune_epochs:
        rest = trusted.nonzero().flatten()
        fit(model, data.x[rest], data.y[rest], replace(train_cfg, epochs=finetune_epochs),
            seed=seed + 1, device=device, on_epoch=logger("finetune"))
    epochs, lr, stop_acc = unlearning_settings(p)
    ucfg = TrainConfig(epochs=epochs, batch_size=p.unlearning_batch_size, lr=lr,
                       momentum=0.9, weight_decay=1e-4, schedule="constant", augment=False,
                       precision=train_cfg.precision)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    if p.unlearning_bn == "batch":
        for m in bns:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        with frozen_batchnorm(model) if p.unlearning_bn == "frozen" else nullcontext():
            _unlearn(model, data, isolated, trusted, p, ucfg, stop_acc, train_cfg, seed, device, logger)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    return model


def unlearning_loss(kind: str):
    """Per-sample loss whose descent unlearns a sample's label y.

    ``ce``: -CE(z, y), the paper's gradient ascent. Its gradient in the logits, p - onehot(y), vanishes as
    p_y -> 1, and the backdoor samples D_b are exactly the ones fitted with p_y ~ 1: with BatchNorm in eval
    mode it did not move on CIFAR-10 in 10 epochs at lr 5e-3 (docs/abl_baerase.md).
    ``margin``: z_y - logsumexp_{k != y} z_k = log(p_y / (1 - p_y)), whose gradient in z_y is 1 whatever p_y.
    """
    if kind == "ce":
        return lambda z, y: -F.cross_entropy(z, y, reduction="none")

    def margin(z, y):
        zy = z.gather(1, y[:, None]).squeeze(1)
        others = z.scatter(1, y[:, None], float("-inf"))
        return zy - torch.logsumexp(others, 1)

    return margin


def unlearning_settings(p: ABLParams) -> tuple[int, float, float]:
    """(epochs, lr, stop_acc) of the unlearning: the ones set, else the mode's defaults. The ascent alone
    runs away once it works, so it stops when D_b is unlearnt; the joint loss is held by the CE."""
    joint = p.unlearning == "joint"
    return (p.unlearning_epochs or (5 if joint else 20), p.unlearning_lr or (1e-3 if joint else 1e-4),
            p.unlearning_stop_acc if p.unlearning_stop_acc is not None else (0.0 if joint else 0.2))


def _unlearn(model, data, isolated, trusted, p, ucfg, stop_acc, train_cfg, seed, device, logger):
    log = logger("unlearning")
    xi, yi = data.x[isolated], data.y[isolated]

    def on_epoch(epoch, record):
        # the gradient ascent runs away once it starts to work: stop when D_b is unlearnt
        record["isolated_acc"] = acc = float((predict(model, xi, device=device) == yi).float().mean())
        if log:
            log(epoch, record)
        return acc < stop_acc

    forget = unlearning_loss(p.unlearning_loss)
    if p.unlearning == "ascent":
        fit(model, xi, yi, ucfg, seed=seed + 2, device=device,
            loss_fn=lambda z, y, idx: forget(z.float(), y).mean(), on_epoch=on_epoch)
    else:  # the isolated samples and the trusted ones, shuffled together; the suspects sit out
        use = torch.cat([isolated, trusted.nonzero().flatten()])
        iso = torch.zeros(len(use), dtype=torch.bool, device=device)
        iso[:len(isolated)] = True

        def joint(z, y, idx):
            z = z.float()
            keep = F.cross_entropy(z, y, reduction="none")
            # Floor at -10 (log-odds: the poisoned label's p below 5e-5): a sample unlearnt that far has
            # nothing left to give, and the unbounded margin would otherwise grow until it overflows.
            return torch.where(iso[idx], p.ascent_weight * forget(z, y).clamp(min=-10), keep).mean()

        fit(model, data.x[use], data.y[use], replace(ucfg, batch_size=train_cfg.batch_size), seed=seed + 2,
            device=device, loss_fn=joint, on_epoch=on_epoch)
