"""``clp``: Channel Lipschitzness-based Pruning (Zheng, Tang, Li & Liu, "Data-free Backdoor Removal based on
Channel Lipschitzness", ECCV 2022; code rkteddy/channel-Lipschitzness-based-pruning, ``defense.py``).

A trigger has to move the output a lot for a small change of the input, so the channels that carry it
have a large Lipschitz constant. The paper bounds each channel's from its weights alone, so the defense
needs no data at all:

1. **Upper bound of each channel's Lipschitz constant (UCLC).** For a convolution W followed by a
   BatchNorm layer (γ, β, running variance σ²), channel k computes γ_k/σ_k · (W_k * x) + const. Its
   Lipschitz constant is at most

       UCLC_k = |γ_k / σ_k| · ‖W_k‖₂,

   the largest singular value of the channel's BN-folded kernel W_k (C_in × k·k, as the code reshapes
   it). σ_k = √(running_var_k + eps), the scale the BatchNorm layer applies.
2. **Prune the outliers, layer by layer.** In every BatchNorm layer, the channels with
   UCLC_k > mean + ``u`` · std (over that layer's channels; std with Bessel's correction, as torch's)
   are pruned: their BatchNorm weight and bias are set to 0, so the channel outputs 0 (the code).

Which convolution a BatchNorm layer folds: the last ``nn.Conv2d`` before it in module order, as the
code pairs them ("a convolutional layer should be followed by a BN layer"); a BatchNorm layer with no
such convolution, or one with another channel count, is left alone. On pre-activation networks
(``preact_resnet18``, ``wrn16_1``) the BatchNorm layer comes *before* its block's convolution, so it is
paired with the previous block's last convolution, as the code and BackdoorBench (whose default model
is PreAct-ResNet18) do.

Defaults: ``u`` 3 (the paper's default; BackdoorBench's ``config/defense/clp`` likewise, and it scans
u from 0 to 10 for its plots). No clean data, so no ``clean_size``; no fine-tuning.

Reported columns: ``pruned_channels`` (over all BatchNorm layers) and ``pruned_ratio`` (of all their
channels). The per-layer counts and the largest UCLC of each layer are logged, one step per layer.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from defenses import DEFENSES
from defenses.base import Defense, DefenseParams


class CLPParams(DefenseParams):
    u: float = Field(3.0, ge=0, description="a channel is pruned above mean + u * std of its layer's UCLC")


def channel_lipschitz_bound(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """UCLC of each output channel of ``conv`` followed by ``bn``: the largest singular value of the
    channel's kernel (C_in × kh·kw) times |γ/σ|."""
    w = conv.weight.detach().float()
    scale = (bn.weight.detach().float() / (bn.running_var.float() + bn.eps).sqrt()).abs()
    return torch.linalg.matrix_norm(w.flatten(2), ord=2) * scale


def conv_batchnorm_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, nn.modules.batchnorm._BatchNorm]]:
    """(name of the BatchNorm layer, the convolution it folds, the layer), in module order."""
    pairs, conv = [], None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            conv = m
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.running_var is not None:
            if conv is not None and conv.out_channels == m.num_features:
                pairs.append((name, conv, m))
    return pairs


def outliers(values: torch.Tensor, u: float) -> torch.Tensor:
    """Indices of ``values`` above mean + u · std."""
    return (values > values.mean() + u * values.std()).nonzero().flatten()


@DEFENSES.register("clp")
class CLP(Defense):
    name = "clp"
    Params = CLPParams
    outputs = {"pruned_channels": "int", "pruned_ratio": "float"}

    def apply(self, model, ctx):
        pruned = total = 0
        with torch.no_grad():
            for step, (name, conv, bn) in enumerate(conv_batchnorm_pairs(model)):
                uclc = channel_lipschitz_bound(conv, bn)
                idx = outliers(uclc, self.params.u).to(bn.weight.device)
                bn.weight[idx] = 0
                bn.bias[idx] = 0
                pruned, total = pruned + len(idx), total + len(uclc)
                ctx.log(step, clp_pruned=len(idx), clp_max_uclc=float(uclc.max()))
        ctx.outputs.update(pruned_channels=pruned, pruned_ratio=pruned / max(1, total))
        return model.eval()
