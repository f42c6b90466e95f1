"""``finetune``: fine-tune the backdoored model on the defender's clean set (the simplest baseline of
every backdoor-defense paper). Uses the kernel's training loop with its augmentation.

Defaults: 20 epochs, SGD lr 0.01 (cosine), batch 128, weight decay 5e-4 — BackdoorBench's fine-tuning
settings with fewer epochs, as the clean sets here are small. ``fine_pruning``, ``nad`` (its teacher)
and ``neural_cleanse`` (its unlearning) fine-tune through :func:`fine_tune`.
"""
from pydantic import Field

from defenses import DEFENSES
from defenses.base import CleanSetParams, Defense
from kernel.train import TrainConfig, fit


class FinetuneParams(CleanSetParams):
    epochs: int = Field(20, ge=1)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(128, ge=1)
    weight_decay: float = Field(5e-4, ge=0)


def fine_tune(model, ctx, p: FinetuneParams, *, metric: str = "finetune_loss", batch_fn=None):
    """Fit ``model`` to ``ctx.clean`` with ``p``'s optimiser settings, logging each epoch's loss as
    ``metric`` with the curve metrics. ``batch_fn`` (kernel ``fit``'s hook) may rewrite each batch, as
    Neural Cleanse's unlearning stamps a share of it."""
    cfg = TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                      schedule="cosine")
    step0 = len(ctx.history)  # after an earlier phase's records, so the steps stay increasing

    def on_epoch(epoch, record):
        ctx.log(step0 + epoch, **{metric: record["loss"]}, **ctx.curve(model))

    fit(model, ctx.clean.x, ctx.clean.y, cfg, seed=ctx.seed, device=ctx.device, batch_fn=batch_fn,
        on_epoch=on_epoch)
    return model


@DEFENSES.register("finetune")
class Finetune(Defense):
    name = "finetune"
    Params = FinetuneParams

    @classmethod
    def work(cls, params, n_clean):
        return params.epochs * n_clean  # epochs over the clean set

    def apply(self, model, ctx):
        return fine_tune(model, ctx, self.params)
