"""``input_aware``: Input-Aware Dynamic Backdoor Attack (Nguyen & Tran, NeurIPS 2020). A training-controlled
attack: the trigger is *generated per input*. A mask generator M and a pattern generator G (small conv
encoder-decoders) turn an image x into a mask m = M(x) (1 channel, nearly binary, sparse) and a pattern
p = G(x) (C channels), both in [0, 1]; the triggered image is x' = x + m·(p − x). The attacker trains the
classifier itself, jointly with G, so no fixed trigger exists for a defense to invert.

Training, as the authors' code (``VinAIResearch/input-aware-backdoor-attack-release``, ``train.py``):

1. M alone, for ``mask_epochs``: loss λ_norm·L_norm + λ_div·L_div(M), with m = threshold(M(x)) =
   tanh(20·M(x) − 10)/2 + 1/2 (a sharp sigmoid that makes masks nearly binary) and the diversity loss
   L_div = mean over pairs (x1, x2) of ‖x1 − x2‖ / (‖m1 − m2‖ + 1e-7), with ‖·‖ the RMS over (C, H, W).
   M is then frozen (eval mode, no gradient). The density term L_norm (``density_loss``):

   - ``mean`` (default): relu(mean(m) − mask_density), a bound on the batch's mean mask: the diversity term
     pushes masks to grow, so the density settles at ``mask_density`` (measured: 0.031 in training, 0.026-0.038
     on test images, for 0.032).
   - ``pixel``: mean(relu(m − mask_density)), what the authors' release and BackdoorBench's port compute. On
     nearly binary masks every "on" pixel pays ~1 − mask_density, so it is an L1 penalty: the density keeps
     falling for as long as M trains at full lr and ends wherever the schedule stops it, whatever
     ``mask_density`` is (synthetic data: 0.036 after the default 10 epochs of 5,000 images, 0.011 when trained
     to convergence on 10,000).

   ``mean`` is the default because it makes ``mask_density`` (methods.md: 3.2%) the density the trigger gets,
   on any dataset size; ``pixel`` reproduces the reference code. At equal density the two backdoors are alike
   (5,000 synthetic images, small_cnn, 20 epochs, seed 0: ``mean`` CA 0.93 / ASR 0.72, ``pixel`` CA 0.93 /
   ASR 0.80; the ASR of one seed at this size varies by about ±0.1).
2. The classifier (the sweep's model and training settings) and G, jointly, in :func:`kernel.train.fit`: in
   every batch the first ⌊poison_rate·B⌋ samples (batches are shuffled) get the backdoor x' with the attack
   label, the next ⌊cross_ratio·poison_rate·B⌋ get the *cross* trigger x + m2·(p2 − x) made from another
   image's mask and pattern (m2, p2 = M(x2), G(x2)) and keep their true label, and λ_div·L_div(G) (same form,
   on patterns) joins the loss. G learns from the classifier's loss too (through x'). The classifier's SGD
   is fit's; G's Adam (betas 0.5, 0.9) is stepped with it.

The pairs (x1, x2) are the batch and the batch rolled by half its length (so never an image with itself):
the authors draw x2 from a second, independently shuffled loader; since the batch is already a random
draw, a roll is an equally random pairing and costs one generator pass instead of two.

Defaults (``/work/shared/methods.md``; the authors' ``config.py``; BackdoorBench's input-aware config):
lr_G = lr_M = 0.01 (Adam, betas (0.5, 0.9)), λ_div = 1, λ_norm = 100, mask_density = 0.032, target 0,
poison_rate (the code's p_attack) 0.1, cross_ratio 1 (p_cross = cross_ratio·p_attack = 0.1, the authors'
release; BackdoorBench uses 2, p_cross 0.2), mask_epochs 25 with lr_M ×0.1 at epochs 10 and 20 (the
authors'). Measured on real CIFAR-10 (docs/attacks.md; small_cnn, 10k images, 20 epochs, seed 0): these
two give ASR 92.8% at CA −1.0; BackdoorBench's cross_ratio 2 with 10 mask epochs (the default until
2026-12-02) gave 87.3%, cross_ratio 1 with 10 mask epochs 89.5%.

Deliberate deviations, the last two for a 2-core CPU budget and short training runs (measured on one core,
small_cnn, batch 256: a mask epoch costs 1.5× a plain training epoch, a joint epoch 1.7×; with 25 mask epochs
and a 20-epoch sweep, prepare() costs ~3.6× training the model plainly, ~2.4× with ``mask_epochs`` 10):

- ``density_loss`` ``mean`` rather than the authors' per-pixel hinge (see 1. above).
- Generator size: the authors' *MNIST* generator (widths 16-32, two down/up-sampling steps) for every
  dataset, instead of their CIFAR/GTSRB one (32-64-128, three steps, ~6× the FLOPs). Same block layout
  (conv3×3-BN-ReLU pairs, max-pool down, nearest up-sampling, BN-without-ReLU last layer, tanh/2 + 1/2).
  Up-sampling goes back to each level's exact size, so any H×W ≥ 4×4 works (not only multiples of 4).
- M's schedule is given as fractions, lr_M ×0.1 after 40% and 80% of ``mask_epochs`` (the authors' epochs
  10 and 20 of 25), so a shorter pretraining keeps its shape. At a constant lr the density settles within
  ~6 epochs of 5,000-10,000 synthetic images (batch 256), but M's BatchNorm running statistics, which the
  frozen M uses from then on, lag its still-moving weights: eval-mode masks came out up to 3× sparser than
  the training-mode masks the loss had shaped. The decay lets them settle.
- G's learning rate is constant (the authors decay it ×0.1 at epoch 200 of 600, i.e. never in a short run);
  the classifier follows the sweep's training settings (schedule, epochs), not their 600-epoch recipe.

Static poisoning for the engine's other uses (training-time defenses such as ABL, and keeping poisoned
samples out of a defender's clean set): :meth:`poison` stamps a seeded ``poison_rate`` share of eligible
samples with the trained generators and relabels them (the base class), and stamps ``cross_ratio`` × that
many further samples with a *cross* trigger (another, seeded, training image's mask and pattern), labels
kept, listed in ``Poisoned.noise_indices`` (as WaNet's noise samples). The backdoored model itself is the
one trained in :meth:`prepare`, whose per-batch poisoning is the authors'.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from attacks import ATTACKS
from attacks.base import Attack, AttackContext, PoisonParams, Poisoned, weights
from kernel.data import Split, stratified_indices
from kernel.train import fit, predict, to_float, to_uint8

EPSILON = 1e-7  # the authors' opt.EPSILON: in the diversity ratio and the generators' tanh scaling
ADAM_BETAS = (0.5, 0.9)  # the authors' Adam for both generators
CURVE_IMAGES = 256  # training images on which the per-epoch backdoor curves are measured
# The authors' M schedule, lr ×0.1 at epochs 10 and 20 of 25, as fractions of mask_epochs.
MASK_LR_MILESTONES, MASK_LR_GAMMA = (0.4, 0.8), 0.1


class InputAwareParams(PoisonParams):
    poison_rate: float = Field(0.1, gt=0, le=1, description=(
        "fraction of every training batch given the backdoor trigger and the attack label (the authors' "
        "p_attack, 0.1); also the fraction poison() stamps for training-time defenses"))
    cross_ratio: float = Field(1.0, ge=0, description=(
        "cross-trigger samples (another image's mask and pattern, true label kept) per backdoor sample: "
        "p_cross = cross_ratio·poison_rate (authors' release: 1, p_cross 0.1; BackdoorBench: 2)"))
    lambda_div: float = Field(1.0, ge=0, description="weight of the diversity loss, for M and for G (authors: 1)")
    lambda_norm: float = Field(100.0, ge=0, description="weight of the mask density hinge (authors: 100)")
    mask_density: float = Field(0.032, gt=0, lt=1, description=(
        "allowed mask density, the fraction of the image the trigger may cover (authors: 0.032)"))
    lr_G: float = Field(0.01, gt=0, description="Adam learning rate of the pattern generator (authors: 0.01)")
    lr_M: float = Field(0.01, gt=0, description="Adam learning rate of the mask generator (authors: 0.01)")
    density_loss: Literal["mean", "pixel"] = Field("mean", description=(
        "mask density term: 'mean' relu(mean(m) − mask_density), the density settles at mask_density; "
        "'pixel' mean(relu(m − mask_density)), the authors' code, an L1-like penalty: the density ends "
        "wherever M's training stops it"))
    mask_epochs: int = Field(25, ge=1, description=(
        "epochs of mask-generator pretraining, lr ×0.1 after 40% and 80% of them (authors: 25, ×0.1 at "
        "10 and 20)"))

    @model_validator(mode="after")
    def _room_for_cross_samples(self):
        if self.poison_rate * (1 + self.cross_ratio) > 1:
            raise ValueError(f"poison_rate {self.poison_rate} × (1 + cross_ratio {self.cross_ratio}) exceeds the "
                             "training set")
        return self


def _block(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    """The authors' Conv2dBlock: 3×3 conv, BatchNorm, ReLU (no ReLU on the last layer)."""
    layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Generator(nn.Module):
    """Conv encoder-decoder x -> [0, 1]^(out_channels×H×W): the authors' generator at their MNIST size
    (widths 16-32, two max-pool steps down, a middle block, two nearest-upsampling steps back)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 16):
        super().__init__()
        w1, w2 = width, 2 * width
        self.down = nn.ModuleList([nn.Sequential(_block(in_channels, w1), _block(w1, w1)),
                                   nn.Sequential(_block(w1, w2), _block(w2, w2))])
        self.middle = _block(w2, w2)
        self.up = nn.ModuleList([nn.Sequential(_block(w2, w2), _block(w2, w1)),
                                 nn.Sequential(_block(w1, w1), _block(w1, out_channels, relu=False))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = []
        for stage in self.down:
            x = stage(x)
            sizes.append(x.shape[-2:])
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for stage, size in zip(self.up, reversed(sizes)):
            x = stage(F.interpolate(x, size=tuple(size), mode="nearest"))
        return torch.tanh(x.float()) / (2 + EPSILON) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """The authors' mask sharpening: a steep sigmoid around 0.5, so masks are nearly binary."""
    return torch.tanh(m * 20 - 10) / (2 + EPSILON) + 0.5


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """mean ‖x1 − x2‖ / (‖g1 − g2‖ + ε), with ‖·‖ the per-sample RMS: small when different inputs get
    different generator outputs. Computed in fp32 (the ratio of two small distances under bf16 is noise)."""
    d_x = (x1.float() - x2.float()).pow(2).mean((1, 2, 3)).sqrt()
    d_g = (g1.float() - g2.float()).pow(2).mean((1, 2, 3)).sqrt()
    return (d_x / (d_g + EPSILON)).mean()


def _partners(x: torch.Tensor) -> torch.Tensor:
    """The batch rolled by half its length: a random pairing of a shuffled batch, never an image with itself."""
    return x.roll(max(1, len(x) // 2), 0)


class _MaskObjective(nn.Module):
    """M wrapped so that :func:`fit` can pretrain it: forward returns the batch's mask loss (a scalar)."""

    def __init__(self, net: Generator, p: InputAwareParams):
        super().__init__()
        self.net, self.p = net, p
        self.last: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = threshold(self.net(x))
        m2, x2 = _partners(m), _partners(x)
        if self.p.density_loss == "mean":
            norm = F.relu(m.mean() - self.p.mask_density)
        else:
            norm = F.relu(m - self.p.mask_density).mean()
        div = diversity_loss(x, x2, m, m2)
        self.last = {"density": m.detach().mean(), "norm": norm.detach(), "div": div.detach()}
        return self.p.lambda_norm * norm + self.p.lambda_div * div


@ATTACKS.register("input_aware")
class InputAware(Attack):
    name = "input_aware"
    Params = InputAwareParams
    has_products = True
    trains_model = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gen: Generator | None = None
        self.mask_net: Generator | None = None

    def _new_generators(self) -> tuple[Generator, Generator]:
        """(G, M), freshly initialised from the trial seed (whatever ran before in this process)."""
        c = self.info.shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return Generator(c, c), Generator(c, 1)

    # -- the trigger ------------------------------------------------------------------------------
    def _nets(self, x: torch.Tensor) -> tuple[Generator, Generator]:
        gen, mask = self.gen, self.mask_net
        if gen is None or mask is None:
            raise RuntimeError("input_aware: the generators are not loaded (the engine calls prepare() and "
                               "load() before any trigger is applied)")
        return gen.to(x.device), mask.to(x.device)

    @torch.no_grad()
    def _stamp(self, x: torch.Tensor, source: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """x + M(source)·(G(source) − x), clamped to [0, 1]; source = x is the backdoor trigger."""
        gen, mask = self._nets(x)
        out = []
        for xb, sb in zip(x.split(batch_size), source.split(batch_size)):
            out.append((xb + threshold(mask(sb)) * (gen(sb) - xb)).clamp(0, 1))
        return torch.cat(out) if out else x.clone()

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self._stamp(x, x)

    def apply_cross(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """The cross trigger: x stamped with ``other``'s mask and pattern (the attack keeps x's label)."""
        return self._stamp(x, other)

    @torch.no_grad()
    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._nets(x)[0](b) for b in x.split(1024)])

    @torch.no_grad()
    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([threshold(self._nets(x)[1](b)) for b in x.split(1024)])

    # -- training ---------------------------------------------------------------------------------
    def prepare(self, train: Split, ctx: AttackContext) -> dict[str, torch.Tensor]:
        p, dev, cfg = self.params, ctx.device, ctx.train_cfg
        gen, mask_net = self._new_generators()
        gen.to(dev, memory_format=torch.channels_last)

        # 1. Mask generator alone, with the authors' Adam as fit's optimizer and their step schedule (fit's
        #    schedule constant; mask_epoch lowers the lr fit starts each step from, ``initial_lr``).
        objective = _MaskObjective(mask_net, p)
        opt_m = torch.optim.Adam(mask_net.parameters(), lr=p.lr_M, betas=ADAM_BETAS)
        mask_cfg = replace(cfg, epochs=p.mask_epochs, schedule="constant")
        sums: dict = {}
        milestones = [round(f * p.mask_epochs) for f in MASK_LR_MILESTONES]

        def mask_loss(loss, yb, idx):  # noqa: ARG001 - the objective already is the batch's loss
            for k, v in objective.last.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            return loss

        def mask_epoch(epoch, rec):
            n = len(train)
            ctx.history.append({"epoch": epoch, "mask_loss": rec["loss"], "mask_lr": opt_m.param_groups[0]["lr"],
                                "mask_seconds": rec["seconds"], **{f"mask_{k}": float(v) / n for k, v in sums.items()}})
            sums.clear()
            for group in opt_m.param_groups:  # the authors' MultiStepLR, stepped once an epoch
                group["initial_lr"] = p.lr_M * MASK_LR_GAMMA ** sum(epoch + 1 >= m for m in milestones)

        fit(objective, train.x, train.y, mask_cfg, seed=self.seed, device=dev, loss_fn=mask_loss,
            optimizer=opt_m, on_epoch=mask_epoch)
        mask_net.eval().requires_grad_(False)

        # 2. Classifier and pattern generator, jointly, with M frozen.
        model = ctx.new_model()
        opt_g = torch.optim.Adam(gen.parameters(), lr=p.lr_G, betas=ADAM_BETAS)
        gen.train()

        def batch_fn(xb, yb, idx):  # noqa: ARG001
            b = len(xb)
            nb = int(p.poison_rate * b)
            nc = min(int(p.cross_ratio * p.poison_rate * b), b - nb)
            if nb == 0 and nc == 0:
                return xb, yb, None
            x2 = _partners(xb)
            src = torch.cat([xb[:nb], x2[nb:nb + nc]])  # images whose mask and pattern are used
            with torch.no_grad():
                m = threshold(mask_net(src))
            pat = gen(src)
            stamped = xb[:nb + nc] + m * (pat - xb[:nb + nc])
            x_new = torch.cat([stamped, xb[nb + nc:]])
            y_new = torch.cat([self.attack_label(yb[:nb]), yb[nb:]])
            k = min(nb, nc)  # the authors pair each backdoor sample with one cross partner
            extra = p.lambda_div * diversity_loss(xb[:k], x2[nb:nb + k], pat[:k], pat[nb:nb + k]) if k else None
            return x_new, y_new, extra

        curve_idx = stratified_indices(train.y, min(CURVE_IMAGES, len(train)), 0)
        cx, cy = to_float(train.x[curve_idx]).to(dev), train.y[curve_idx]
        target = self.attack_label(cy)
        keep = target != cy

        def on_epoch(epoch, rec):
            rec.update(ctx.curve(model))
            gen.eval()
            with torch.no_grad():  # one generator pass: the cross partners are the same images, rolled
                m, pat = threshold(mask_net(cx)), gen(cx)
                bd = (cx + m * (pat - cx)).clamp(0, 1)
                cross = (cx + _partners(m) * (_partners(pat) - cx)).clamp(0, 1)
            gen.train()
            pred_bd, pred_cross = predict(model, bd[keep], device=dev), predict(model, cross, device=dev)
            # measured on training images (prepare sees no test set): how the backdoor is being learnt
            rec["train_asr"] = float((pred_bd == target[keep]).float().mean()) if keep.any() else float("nan")
            rec["train_cross_acc"] = float((pred_cross == cy).float().mean())
            ctx.history.append(rec)

        fit(model, train.x, train.y, cfg, seed=self.seed, device=dev, batch_fn=batch_fn,
            extra_optimizers=(opt_g,), on_epoch=on_epoch)
        gen.eval()

        return {**weights(model), **weights(gen, "gen"), **weights(mask_net, "mask")}

    def load(self, products: dict[str, torch.Tensor]) -> None:
        gen, mask_net = self._new_generators()
        for prefix, net in (("gen", gen), ("mask", mask_net)):
            state = {k[len(prefix) + 1:]: v for k, v in products.items() if k.startswith(prefix + ".")}
            net.load_state_dict(state)
            net.eval().requires_grad_(False)
        self.gen, self.mask_net = gen, mask_net

    # -- static poisoning (training-time defenses, clean-set exclusion) ---------------------------
    @classmethod
    def num_extra(cls, params, n_poison: int) -> int:
        return round(params.cross_ratio * n_poison)

    def poison(self, train: Split) -> Poisoned:
        base = super().poison(train)
        idx, n = base.indices, len(train)
        k = self.num_extra(self.params, len(idx))
        cross, g = self.draw_unpoisoned(n, idx, k, "cross samples")
        x = base.train.x
        if k:
            r = torch.randint(0, n - 1, (k,), generator=g)
            partner = r + (r >= cross).long()  # any other training image
            x[cross] = to_uint8(self.apply_cross(to_float(train.x[cross]), to_float(train.x[partner])))
        return Poisoned(Split(x, base.train.y), idx, noise_indices=cross)
