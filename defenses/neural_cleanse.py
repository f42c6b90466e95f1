"""``neural_cleanse``: Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse:
Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019; code
bolunwang/backdoor). A baseline of the I-BAU and AWM tables.

1. **Reverse-engineer a trigger for every label t.** A mask m (1×H×W) and a pattern p (C×H×W), both
   tanh-parametrised into [0, 1], stamp x' = (1 − m)·x + m·p. Adam (lr ``trigger_lr``, betas 0.5/0.9)
   minimises CE(f(x'), t) + cost·‖m‖₁ over the clean set for up to ``trigger_epochs`` epochs. The cost
   starts at 0. It is set to ``init_cost`` once the stamp has reached ``attack_succ_threshold`` for
   ``patience`` epochs. It is then multiplied by ``cost_multiplier`` after ``patience`` epochs above the
   threshold, and divided by ``cost_multiplier``^1.5 after ``patience`` epochs below it. The kept trigger
   is the smallest mask that reached the threshold. The search stops early once the cost has moved
   both ways and the best norm has improved by less than 1% for 2·``patience`` epochs.
2. **Detect.** Anomaly index of each label = |‖m_t‖₁ − median| / (1.4826 · MAD) over the labels'
   norms. Labels whose norm is below the median with an index above ``anomaly_threshold`` (2) are
   flagged as backdoor targets.
3. **Mitigate by unlearning** (the paper's second mitigation). Fine-tune on the clean set, where
   ``unlearning_ratio`` (20%) of every batch is stamped with a flagged label's reversed trigger and
   keeps its true label, through ``finetune``'s own ``fine_tune`` and its parameters. With
   no label flagged, the model is returned as it is: Neural Cleanse found no backdoor.

Defaults: the code (Visualizer) and BackdoorBench (``config/defense/nc``): init_cost 1e-3, lr 0.1,
success threshold 0.99, batch 32, early-stop threshold 0.99. ``trigger_epochs`` 80 and
``unlearning_ratio`` 0.2 come from BackdoorBench. ``patience`` is 5 and ``cost_multiplier`` 1.5 (the
code: 10 and 1.5; BackdoorBench: 5 and 2). The search costs K × ``trigger_epochs`` passes over the
clean set (K: the class count), so on Tiny-ImageNet's 200 classes it is by far the slowest defense here.

Outputs: ``nc_flagged`` (flagged labels, comma-separated, smallest norm first; empty when none),
``nc_anomaly_index`` (of the smallest norm), ``nc_target`` (the smallest-norm label). Artifacts:
``trigger`` (m·p of the smallest-norm label) and ``masks`` (every label's mask).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from defenses import DEFENSES
from defenses.base import Defense
from defenses.finetune import FinetuneParams, fine_tune
from kernel.train import make_generator, to_float


class NeuralCleanseParams(FinetuneParams):
    trigger_epochs: int = Field(80, ge=1, description="most epochs of the trigger search per label")
    trigger_lr: float = Field(0.1, gt=0)
    trigger_batch: int = Field(32, ge=1)
    init_cost: float = Field(1e-3, gt=0)
    attack_succ_threshold: float = Field(0.99, gt=0, le=1)
    patience: int = Field(5, ge=1)
    cost_multiplier: float = Field(1.5, gt=1)
    anomaly_threshold: float = Field(2.0, gt=0)
    unlearning_ratio: float = Field(0.2, gt=0, lt=1)


def reverse_trigger(model, x, target: int, p: NeuralCleanseParams, gen: torch.Generator):
    """The smallest mask (and its pattern) that sends ≥ the threshold of ``x`` to ``target``, or the last
    one tried if none did; and the search's per-epoch record."""
    dev = x.device
    n, (c, h, w) = len(x), x.shape[1:]
    mask_t = torch.zeros(1, 1, h, w, device=dev, requires_grad=True)  # tanh space: m = 0.5 at start
    pattern_t = torch.zeros(1, c, h, w, device=dev, requires_grad=True)
    opt = torch.optim.Adam([mask_t, pattern_t], lr=p.trigger_lr, betas=(0.5, 0.9))
    squash = lambda v: torch.tanh(v) / 2 + 0.5  # noqa: E731 - into [0, 1]
    y = torch.full((min(p.trigger_batch, n),), target, device=dev)
    cost, best, best_norm, log = 0.0, None, float("inf"), []
    set_count = up = down = stale = 0
    up_flag = down_flag = False
    early_best = float("inf")
    for epoch in range(p.trigger_epochs):
        hits = norm_sum = 0.0
        for idx in torch.randperm(n, generator=gen, device=dev).split(p.trigger_batch):
            m, pat = squash(mask_t), squash(pattern_t)
            logits = model((1 - m) * x[idx] + m * pat)
            norm = m.abs().sum()
            loss = F.cross_entropy(logits, y[: len(idx)]) + cost * norm
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hits += (logits.argmax(1) == target).sum().item()
            norm_sum += norm.item() * len(idx)
        acc, norm = hits / n, norm_sum / n
        if acc >= p.attack_succ_threshold and norm < best_norm:
            best = (squash(mask_t).detach()[0], squash(pattern_t).detach()[0])
            best_norm = norm
        log.append({"acc": acc, "norm": norm, "cost": cost})
        # early stop: only once a trigger was found and the cost has moved both ways
        if best_norm < float("inf"):
            stale = stale + 1 if best_norm >= 0.99 * early_best else 0
        early_best = min(early_best, best_norm)
        if up_flag and down_flag and stale >= 2 * p.patience:
            break
        # the cost schedule of the code
        if cost == 0 and acc >= p.attack_succ_threshold:
            set_count += 1
            if set_count >= p.patience:
                cost, up, down, up_flag, down_flag = p.init_cost, 0, 0, False, False
        else:
            set_count = 0
        up, down = (up + 1, 0) if acc >= p.attack_succ_threshold else (0, down + 1)
        if up >= p.patience:
            up, cost, up_flag = 0, cost * p.cost_multiplier, True
        elif down >= p.patience:
            down, cost, down_flag = 0, cost / p.cost_multiplier ** 1.5, True
    if best is None:
        best = (squash(mask_t).detach()[0], squash(pattern_t).detach()[0])
    return best, log


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """|norm − median| / (1.4826 · MAD) per label (MAD: median absolute deviation)."""
    median = norms.median()
    mad = 1.4826 * (norms - median).abs().median()
    return (norms - median).abs() / mad.clamp_min(1e-12)


@DEFENSES.register("neural_cleanse")
class NeuralCleanse(Defense):
    name = "neural_cleanse"
    Params = NeuralCleanseParams
    outputs = {"nc_flagged": "str", "nc_anomaly_index": "float", "nc_target": "int"}

    def apply(self, model, ctx):
        p = self.params
        model.to(ctx.device).eval().requires_grad_(False)
        x = to_float(ctx.clean.x.to(ctx.device))
        gen = make_generator(ctx.seed, ctx.device)
        triggers, norms = [], []
        for t in range(ctx.info.num_classes):
            (m, pat), log = reverse_trigger(model, x, t, p, gen)
            triggers.append((m, pat))
            norms.append(float(m.sum()))
            ctx.log(t, nc_label=t, nc_mask_l1=norms[-1], nc_epochs=len(log), nc_stamp_acc=log[-1]["acc"])
        norms_t = torch.tensor(norms)
        index = anomaly_index(norms_t)
        median = norms_t.median()
        flagged = sorted((t for t in range(len(norms)) if norms[t] < median and index[t] > p.anomaly_threshold),
                         key=lambda t: norms[t])
        smallest = int(norms_t.argmin())
        ctx.outputs.update(nc_flagged=",".join(map(str, flagged)), nc_anomaly_index=float(index[smallest]),
                           nc_target=smallest)
        m, pat = triggers[smallest]
        ctx.artifacts["trigger"] = (m * pat).cpu()
        ctx.artifacts["masks"] = torch.stack([tm for tm, _ in triggers]).cpu()
        model.requires_grad_(True)
        if not flagged:
            return model
        return self._unlearn(model, ctx, [triggers[t] for t in flagged])

    def _unlearn(self, model, ctx, triggers):
        """Fine-tune with a share of every batch stamped with a flagged trigger, true labels kept."""
        p = self.params
        masks = torch.stack([m for m, _ in triggers])
        patterns = torch.stack([pat for _, pat in triggers])
        gen = make_generator(ctx.seed + 1, ctx.device)

        def batch_fn(xb, yb, idx):
            k = max(1, round(p.unlearning_ratio * len(xb)))
            which = torch.randint(len(triggers), (k,), generator=gen, device=xb.device)
            m, pat = masks[which].to(xb.dtype), patterns[which].to(xb.dtype)
            xb = torch.cat([(1 - m) * xb[:k] + m * pat, xb[k:]])
            return xb, yb, None

        return fine_tune(model, ctx, p, metric="unlearning_loss", batch_fn=batch_fn)
