"""``trojannn``: TrojanNN (Liu et al., NDSS 2018, "Trojaning Attack on Neural Networks").

TrojanNN does not pick a trigger; it *optimises* one against a trained model so that the trigger excites a
few chosen internal neurons strongly, then poisons data with it. A trigger that already drives neurons the
classifier listens to is learnt from few poisons and fast.

Algorithm:
1. Take a model trained on clean data (the engine's reference model: the sweep's architecture and training
   settings on the clean training set, i.e. attack ``none``'s model for the seed; cached, trained once).
2. Choose ``neurons`` neurons of the feature layer that feeds the classifier (the channels of the last
   feature map, each seen through its spatial mean, which is what the linear classifier reads): those with
   the largest total |weight| into the classifier, the "most connected" neurons.
3. Optimise the trigger's pixels inside a fixed mask (``mask``: the Trojan square or watermark geometry of
   ``trojan_sq`` / ``trojan_wm``) so those neurons reach ``activation_target``: minimise
   Σ_j (a_j(stamp(x, p)) − target)² over a fixed batch of clean training images, ``steps`` Adam steps on p
   at ``trigger_lr``, p kept in [0, 1].
4. Poison: stamp x' = (1 − m)·x + m·p on ``poison_rate`` of the training set, relabelled to ``target``.

Where the defaults come from (``/work/shared/methods.md``): 2 neurons driven to an activation of 100 over
1,000 steps (BackdoorBench's TrojanNN settings); target 0 and poison rate 0.1, this project's convention.
Our choices, documented: the layer (the original picks a fully connected layer of VGG-Face; here the last
feature layer, which every registered architecture has), neuron ranking by outgoing weight (TrojanNN ranks a
layer's neurons by the weights from the preceding layer; features reached through pooling have no single
such matrix), optimising on stamped clean images rather than on the trigger over a blank canvas, so the
trigger excites the neurons in context, and training the backdoored model from scratch on the poisoned set
(as BackdoorBench does) instead of the paper's retraining of the clean model.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, model_validator

from attacks import ATTACKS
from attacks.base import Attack, AttackContext, PoisonParams
from attacks.trojan_sq import square_trigger
from attacks.trojan_wm import watermark_mask
from kernel.data import Split, stratified_indices
from kernel.train import to_float


class TrojanNNParams(PoisonParams):
    mask: Literal["square", "watermark"] = Field(
        "square", description="trigger region: trojan_sq's square or trojan_wm's watermark geometry")
    size: int = Field(5, ge=1, description="square: side in pixels")
    margin: int = Field(1, ge=0, description="square: distance from the bottom and right borders")
    scale: float = Field(0.75, gt=0, le=1, description="watermark: outer diameter / image side")
    stroke: float = Field(0.1, gt=0, le=0.5, description="watermark: stroke width / diameter")
    neurons: int = Field(2, ge=1, description="neurons the trigger is optimised to excite")
    activation_target: float = Field(100.0, gt=0, description="activation the chosen neurons are driven to")
    steps: int = Field(1000, ge=1, description="optimisation steps of the trigger")
    trigger_lr: float = Field(0.1, gt=0, description="Adam learning rate on the trigger's pixels")
    trigger_batch: int = Field(128, ge=1, description="clean training images the trigger is optimised on")
    pattern_seed: int = Field(0, description="seed of the trigger's initial pixels")

    @model_validator(mode="after")
    def _fits(self, info: ValidationInfo):
        shape = (info.context or {}).get("shape")
        if shape is not None and self.mask == "square" and self.size + self.margin > min(shape[1], shape[2]):
            raise ValueError(f"a {self.size}x{self.size} square {self.margin} px from the border does not fit "
                             f"a {shape[1]}x{shape[2]} image")
        return self


def feature_activations(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, channels) spatial means of the last feature map: the neurons the linear classifier reads."""
    f = model.forward_features(x)
    return f.flatten(2).mean(2) if f.dim() == 4 else f


@ATTACKS.register("trojannn")
class TrojanNN(Attack):
    name = "trojannn"
    Params = TrojanNNParams
    has_products = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        p, (c, h, w) = self.params, self.info.shape
        if p.mask == "square":
            self.mask, _ = square_trigger(c, h, w, p.size, p.margin, (1.0, 1.0, 1.0), 0)
        else:
            self.mask = watermark_mask(h, w, p.scale, p.stroke)
        self.pattern: torch.Tensor | None = None

    def stamp(self, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(x)
        return (1 - m) * x + m * pattern

    def prepare(self, train: Split, ctx: AttackContext) -> dict[str, torch.Tensor]:
        p = self.params
        model = ctx.reference_model()
        fc = model.fc
        chosen = fc.weight.abs().sum(0).topk(min(p.neurons, fc.in_features)).indices  # most connected
        x = to_float(train.x[stratified_indices(train.y, min(p.trigger_batch, len(train.y)), self.seed)])
        x = x.to(ctx.device)
        g = torch.Generator().manual_seed(p.pattern_seed)
        pattern = torch.rand(self.info.shape, generator=g).to(ctx.device).requires_grad_(True)
        opt = torch.optim.Adam([pattern], lr=p.trigger_lr)
        for step in range(p.steps):
            act = feature_activations(model, self.stamp(x, pattern))[:, chosen]
            loss = (act - p.activation_target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                pattern.clamp_(0, 1)
            if step % 100 == 0 or step == p.steps - 1:
                ctx.history.append({"step": step, "trigger_loss": loss.item(),
                                    "activation": act.detach().mean().item()})
        return {"pattern": (pattern.detach() * self.mask.to(pattern)).cpu(), "neurons": chosen.cpu()}

    def load(self, products: dict[str, torch.Tensor]) -> None:
        self.pattern = products["pattern"]

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None:
            raise RuntimeError("trojannn: prepare()/load() must run first: the trigger is optimised on a model")
        return self.stamp(x, self.pattern.to(x)).clamp(0, 1)
