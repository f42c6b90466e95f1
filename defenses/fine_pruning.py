"""``fine_pruning``: Fine-Pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018). A baseline of the I-BAU, AWM and ABL tables.

The paper's observation: a backdoor tends to live in neurons of the last convolutional layer that clean
inputs leave dormant. So:

1. **Prune.** Run the defender's clean set through the backdoored model and rank the channels of its
   last convolutional feature map (``forward_features``) by their mean activation over images and
   positions. Prune them one at a time in increasing order of activation, and stop before the first
   one whose pruning puts the clean-set accuracy more than ``max_acc_drop`` below the unpruned model's
   (the paper stops "when the accuracy on the validation set drops below a threshold"), or once
   ``max_ratio`` of the channels are gone. A pruned channel is held at zero by a forward pre-hook on the
   classifier (every head here pools each channel on its own, so zeroing the pooled value is zeroing
   the map; ``vgg_small``'s 4x4 pooled cells of a channel are zeroed together).
2. **Fine-tune** the pruned model on the clean set with the ``finetune`` baseline's settings (the same
   parameters and code path, so the two rows differ by the pruning alone); the pruned channels stay at
   zero while it trains.

Only the classifier's input is recomputed per pruning step (the features are computed once), so the
pruning costs one forward pass of the clean set whatever the channel count.

Defaults: ``max_acc_drop`` 0.1 and one channel per step follow BackdoorBench's configuration
(``acc_ratio`` 0.1, ``once_prune_ratio`` 0.01 of 512 channels, i.e. about one at a time on small_cnn's
128); ``max_ratio`` 0.9 is a guard of ours against pruning a model to nothing on a tiny clean set. The
fine-tuning defaults are ``finetune``'s (20 epochs, SGD lr 0.01 cosine; BackdoorBench: 100 epochs).
Reported columns: ``pruned_channels`` and ``pruned_ratio``.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from defenses import DEFENSES
from defenses.base import Defense
from defenses.finetune import FinetuneParams, fine_tune
from kernel.train import to_float


class FinePruningParams(FinetuneParams):
    max_acc_drop: float = Field(0.1, ge=0, le=1, description="clean-set accuracy the pruning may cost")
    max_ratio: float = Field(0.9, gt=0, le=1, description="most of the channels that may be pruned")
    finetune: bool = Field(True, description="fine-tune after pruning (false: the pruning alone)")


@torch.no_grad()
def channel_activity(model: nn.Module, x: torch.Tensor, batch_size: int = 512):
    """Mean activation of each last-layer channel over ``x`` and the classifier's inputs for ``x``."""
    model.eval()
    acts, head_in = [], []
    grab = model.fc.register_forward_pre_hook(lambda _m, args: head_in.append(args[0].float()))
    try:
        for xb in x.split(batch_size):
            f = model.forward_features(to_float(xb))
            acts.append(f.float().mean(dim=(2, 3)))
            model.forward_head(f)
    finally:
        grab.remove()
    return torch.cat(acts).mean(0), torch.cat(head_in)


def head_mask(keep: torch.Tensor, in_features: int) -> torch.Tensor:
    """A per-channel keep mask spread over the classifier's inputs (channel-major, as flatten lays them)."""
    return keep.repeat_interleave(in_features // keep.numel())


@torch.no_grad()
def prune_count(fc: nn.Linear, head_in: torch.Tensor, y: torch.Tensor, order: torch.Tensor,
                max_drop: float, max_count: int) -> tuple[int, list[float]]:
    """How many channels of ``order`` to prune: the most before clean accuracy first falls more than
    ``max_drop`` below the unpruned model's; and the accuracy after each count (0 = unpruned)."""
    keep = torch.ones(order.numel(), device=head_in.device)
    accs = [(fc(head_in).argmax(1) == y).float().mean().item()]
    for k in range(1, max_count + 1):
        keep[order[k - 1]] = 0
        accs.append((fc(head_in * head_mask(keep, head_in.shape[1])).argmax(1) == y).float().mean().item())
        if accs[-1] < accs[0] - max_drop:
            return k - 1, accs
    return max_count, accs


@DEFENSES.register("fine_pruning")
class FinePruning(Defense):
    name = "fine_pruning"
    Params = FinePruningParams
    outputs = {"pruned_channels": "int", "pruned_ratio": "float"}

    def apply(self, model, ctx):
        p = self.params
        model.to(ctx.device)
        x, y = ctx.clean.x.to(ctx.device), ctx.clean.y.to(ctx.device)
        activity, head_in = channel_activity(model, x)
        order = activity.argsort()  # the most dormant first
        n = prune_count(model.fc, head_in, y, order, p.max_acc_drop, int(p.max_ratio * order.numel()))[0]

        keep = torch.ones(order.numel(), device=ctx.device)
        keep[order[:n]] = 0
        mask = head_mask(keep, model.fc.in_features)
        # Stays on the returned model: the pruned channels read as zero in fine-tuning and evaluation.
        model.fc.register_forward_pre_hook(lambda _m, args: (args[0] * mask.to(args[0].dtype),))
        ctx.outputs.update(pruned_channels=n, pruned_ratio=n / order.numel())
        ctx.log(0, pruned_channels=n, **ctx.curve(model))
        if p.finetune:
            fine_tune(model, ctx, p)
        return model
