"""``nad``: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation:
Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021; code bboylyg/NAD). A baseline of the
I-BAU, AWM and ABL tables.

1. **Teacher**: a copy of the backdoored model fine-tuned on the defender's clean set
   (``teacher_epochs``, ``teacher_lr``; the ``finetune`` baseline's code path). Fine-tuning alone
   weakens the backdoor; the teacher's attention is where the clean task looks.
2. **Student**: the backdoored model itself, trained on the same clean set with
   CE(student(x), y) + Σ_i β_i · AT(student_i(x), teacher_i(x)), where i runs over the last three
   resolution stages (``stages()`` of the model: shallow ``beta1``, middle ``beta2``, deep ``beta3``)
   and AT is attention transfer (Zagoruyko & Komodakis 2017) as in the code: a stage's attention map is
   the channel sum of |activation|^``p``, divided by its L2 norm over positions, and AT the mean squared
   difference of the two maps. The teacher is frozen in eval mode; the student trains in train mode, on
   the kernel's augmented batches (the teacher sees the same augmented batch).

Defaults, from the code (``config.py``, ``main.py``, ``utils.adjust_learning_rate``): student 20 epochs,
SGD lr 0.1 for the first ``lr_drop_epoch`` (2) epochs then 0.01, momentum 0.9, Nesterov, weight decay
1e-4, batch 64; β = (0, 0, 5000) (the deep stage only; BackdoorBench uses 500 / 1000 / 1000), p 2;
the clean set 5% of the training data (``clean_size`` 0.05). Teacher: 10 epochs (the paper, and
BackdoorBench's ``te_epochs``) at lr 0.01 with the ``finetune`` baseline's cosine schedule (the release
does not include its teacher script).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field

from defenses import DEFENSES
from defenses.base import CleanSetParams, Defense
from defenses.finetune import FinetuneParams, fine_tune
from kernel.train import TrainConfig, fit


class NADParams(CleanSetParams):
    epochs: int = Field(20, ge=1, description="student epochs")
    lr: float = Field(0.1, gt=0, description="student lr for the first lr_drop_epoch epochs, then a tenth")
    lr_drop_epoch: int = Field(2, ge=1, description="epochs at lr before it drops to a tenth")
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(1e-4, ge=0)
    beta1: float = Field(0.0, ge=0, description="attention weight of the shallowest of the last three stages")
    beta2: float = Field(0.0, ge=0)
    beta3: float = Field(5000.0, ge=0, description="attention weight of the deepest stage")
    p: float = Field(2.0, gt=0, description="power of the attention map")
    teacher_epochs: int = Field(10, ge=1)
    teacher_lr: float = Field(0.01, gt=0)


def attention_map(f: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): the channel sum of |f|^p, L2-normalised over positions."""
    a = f.float().abs().pow(p).sum(1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + eps)


def attention_loss(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return F.mse_loss(attention_map(fs, p), attention_map(ft, p))


@DEFENSES.register("nad")
class NAD(Defense):
    name = "nad"
    Params = NADParams

    @classmethod
    def work(cls, params, n_clean):  # the teacher's epochs, then the student's, over the clean set
        return (params.teacher_epochs + params.epochs) * n_clean

    def apply(self, model, ctx):
        p = self.params
        teacher = copy.deepcopy(model)
        fine_tune(teacher, ctx, FinetuneParams(clean_size=p.clean_size, epochs=p.teacher_epochs, lr=p.teacher_lr,
                                               batch_size=p.batch_size, weight_decay=p.weight_decay),
                  metric="teacher_loss")
        teacher.eval().requires_grad_(False)

        betas = [(i, b) for i, b in enumerate((p.beta1, p.beta2, p.beta3)) if b > 0]
        seen_s, seen_t = {}, {}

        def keep(store, i):
            def hook(_module, _inputs, output):
                store[i] = output
            return hook

        s_stages, t_stages = model.stages(), teacher.stages()
        hooks = [s_stages[i].register_forward_hook(keep(seen_s, i)) for i, _ in betas]
        hooks += [t_stages[i].register_forward_hook(keep(seen_t, i)) for i, _ in betas]
        at_sum = torch.zeros((), device=ctx.device)

        def batch_fn(xb, yb, idx):  # the teacher's maps of the very batch the student will see
            with torch.no_grad():
                teacher(xb)
            return xb, yb, None

        def loss_fn(logits, yb, idx):
            nonlocal at_sum
            at = sum((b * attention_loss(seen_s[i], seen_t[i], p.p) for i, b in betas),
                     torch.zeros((), device=logits.device))
            at_sum = at_sum + at.detach() * len(idx)
            return F.cross_entropy(logits, yb) + at

        opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=0.9, weight_decay=p.weight_decay, nesterov=True)
        step0 = len(ctx.history)

        def on_epoch(epoch, record):
            nonlocal at_sum
            ctx.log(step0 + epoch, nad_loss=record["loss"], attention_loss=float(at_sum) / len(ctx.clean),
                    **ctx.curve(model))
            at_sum = torch.zeros((), device=ctx.device)
            if epoch + 1 == p.lr_drop_epoch:  # the code's step: lr 0.1, then 0.01 from the third epoch
                for group in opt.param_groups:
                    group["initial_lr"] = p.lr / 10

        cfg = TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                          schedule="constant")
        try:
            fit(model, ctx.clean.x, ctx.clean.y, cfg, seed=ctx.seed, device=ctx.device, loss_fn=loss_fn,
                batch_fn=batch_fn, optimizer=opt, on_epoch=on_epoch)
        finally:
            for h in hooks:
                h.remove()
        return model
