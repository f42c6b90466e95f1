"""The one training and evaluation loop, used by every attack and every defense.

Design (after airbench94):
- The whole split lives on the device as uint8; each batch is converted to float and augmented *there*
  (random crop with padding + horizontal flip as two batched tensor ops). No DataLoader, no worker
  processes, no PIL: on a 2-core CPU the input pipeline otherwise costs as much as the model.
- Mixed precision (bf16 autocast) on GPU, and on CPUs with native bf16 (AVX512-BF16/AMX), where it made a
  small_cnn step 1.6x faster on the 2-core AMD EPYC dev machine; fp32 on other CPUs, where bf16 is
  emulated and slower. ``TrainConfig.precision`` overrides the choice. channels_last everywhere.
- Everything random (shuffling, augmentation) is drawn from one seeded generator, so a run is
  reproducible for a seed on a given device.
- Callers customise *what* is minimised through ``loss_fn`` (ABL's LGA, unlearning, ...) and observe
  progress through ``on_epoch``; they never write another loop over epochs and batches.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    # 'onecycle': linear warm-up over the first `warmup` fraction then linear decay to 0 (fast convergence
    # in few epochs, as in airbench); 'cosine': the backdoor literature's default; 'constant'.
    schedule: str = "onecycle"
    warmup: float = 0.2
    augment: bool = True  # random crop (pad 4) + horizontal flip, the CIFAR standard
    crop_pad: int = 4
    label_smoothing: float = 0.0
    # Dropout probability of every nn.Dropout layer while this training runs (None: the architecture's
    # own). vgg_small's 0.3/0.4/0.4 regularise a 50-epoch run; a short full-data schedule converges
    # faster without them (docs/benchmarks.md, "Full-data recipes"). fit gives the layers their own rates
    # back when it returns; the engine builds every model of a trial it trains at this rate
    # (sweep.trial), so a defense's fine-tuning runs the network as it was trained, while a user's
    # checkpoint keeps the architecture's rates, as its authors trained it.
    dropout: float | None = None
    # 'auto': bf16 autocast where the hardware computes bf16 natively (see mixed_precision), else fp32.
    precision: str = "auto"

    def as_dict(self) -> dict:
        # Fields added later are left out at their neutral default, so the ids of trials (hashes of
        # this dict) from specs that never set them stay what they were.
        return {k: v for k, v in asdict(self).items() if not (k in _LATER and v is None)}


_LATER = ("dropout",)


class TrainingDiverged(RuntimeError):
    """Raised when the loss becomes NaN or infinite; the engine records the trial as failed."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images pass through."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [0, 1] -> uint8 (rounded), as a poisoned image saved to disk would be."""
    return x.clamp(0, 1).mul(255).round_().to(torch.uint8)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip for a whole batch.

    Two ``gather`` calls (rows, then columns with the flip folded into the column index): 2.4x faster on
    CPU than one four-index advanced-indexing gather followed by a separate flip.
    """
    b, c, h, w = x.shape
    dev = x.device
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip:
        mirrored = torch.rand(b, device=dev, generator=gen) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    if not pad:
        return x.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w)) if flip else x
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=gen)
    rows = (dy[:, None] + torch.arange(h, device=dev)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    cols = (dx[:, None] + cols).view(b, 1, 1, w).expand(b, c, h, w)
    return xp.gather(2, rows).gather(3, cols)


def mixed_precision(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device`` (None: plain fp32).

    'auto' picks bf16 on CUDA GPUs that support it and on CPUs that compute bf16 natively (oneDNN's
    check for AVX512-BF16/AMX); bf16 needs no loss scaling. 'fp32' and 'bf16' force the choice.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r} (auto, fp32, bf16)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None  # fp16 would need loss scaling
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return None


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private API: if it moves, fall back to fp32
        return False


def _autocast(device: torch.device, precision: str = "auto"):
    dtype = mixed_precision(device, precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def batches(n: int, batch_size: int, gen: torch.Generator | None, device: torch.device) -> Iterator[torch.Tensor]:
    """Index batches over n samples; shuffled when a generator is given. The last batch may be short."""
    order = torch.randperm(n, device=device, generator=gen) if gen is not None else torch.arange(n, device=device)
    yield from order.split(batch_size)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    t = step / max(1, total)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "onecycle":
        return t / cfg.warmup if t < cfg.warmup else max(0.0, (1 - t) / (1 - cfg.warmup))
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (float batch, labels, positions) -> (batch, labels, extra loss or None): rewrites a batch after
# augmentation, e.g. a training-controlled attack stamping some of it with a generator being trained.
BatchFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]"]
EpochHook = Callable[[int, dict], "bool | None"]


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    device: torch.device | None = None,
    loss_fn: LossFn | None = None,
    on_epoch: EpochHook | None = None,
    params=None,
    batch_fn: BatchFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra_optimizers: tuple = (),
) -> list[dict]:
    """Train ``model`` on images ``x`` (uint8 or float in [0, 1]) with labels ``y``.

    ``loss_fn(logits, targets, idx)`` returns the scalar loss of a batch (``idx``: the batch's positions
    in ``x``, so a loss can weight or treat samples individually); default: cross-entropy.
    ``on_epoch(epoch, record)`` is called after every epoch with that epoch's record (mean loss, lr, time)
    and may add entries to it; returning True stops training early.
    ``params`` restricts the optimised parameters (default: all).
    ``optimizer`` replaces the default SGD (``cfg.lr``, momentum, weight decay) with one the caller built,
    e.g. Adam for a generator; each group's lr is ``group['initial_lr']`` (its lr when fit starts) times
    ``cfg.schedule``'s factor, so an ``on_epoch`` hook can decay ``initial_lr`` (a step schedule).
    ``batch_fn(xb, yb, idx)`` rewrites each augmented float batch and may add a loss term (the extra term
    joins the batch's loss); ``extra_optimizers`` (e.g. a generator's Adam) are zeroed and stepped with the
    model's SGD on every batch, so models trained jointly share this one loop. Returns the per-epoch records.
    """
    device = device or default_device()
    model.to(device=device, memory_format=torch.channels_last)  # oneDNN's and cuDNN's native layout
    x, y = x.to(device), y.to(device)
    gen = make_generator(seed, device)
    if loss_fn is None:
        def loss_fn(logits, targets, idx):  # noqa: ARG001 - idx unused by plain CE
            return F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)

    opt = optimizer or torch.optim.SGD(
        params if params is not None else model.parameters(),
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0,
    )
    for group in opt.param_groups:  # the schedule scales this (torch's LR schedulers keep the same key)
        group.setdefault("initial_lr", group["lr"])
    with _dropout(model, cfg.dropout):
        return _fit(model, x, y, cfg, gen, device, loss_fn, on_epoch, batch_fn, opt, extra_optimizers)


def set_dropout(model: nn.Module, p: float | None) -> list[tuple[nn.Module, float]]:
    """Set every dropout layer of ``model`` to rate ``p`` (no change for None); returns each layer with its
    old rate, to give back."""
    old = [(m, m.p) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if p is not None:
        for m, _ in old:
            m.p = p
    return old


@contextmanager
def _dropout(model: nn.Module, p: float | None):
    """Every dropout layer of ``model`` at rate ``p`` inside the block (no change for None)."""
    old = set_dropout(model, p)
    try:
        yield
    finally:
        for m, r in old:
            m.p = r


def _fit(model, x, y, cfg, gen, device, loss_fn, on_epoch, batch_fn, opt, extra_optimizers) -> list[dict]:
    """fit's epochs, once the model, data and optimiser are in place."""
    n = int(y.shape[0])
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total, step, history = cfg.epochs * steps_per_epoch, 0, []
    for epoch in range(cfg.epochs):
        model.train()
        t0, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        for idx in batches(n, cfg.batch_size, gen, device):
            factor = lr_factor(cfg, step, total)
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
            xb = x[idx]
            if cfg.augment:  # on the uint8 batch: a quarter of the bytes to move
                xb = augment(xb, gen, cfg.crop_pad)
            xb, yb, extra = to_float(xb), y[idx], None
            with _autocast(device, cfg.precision):
                if batch_fn is not None:
                    xb, yb, extra = batch_fn(xb, yb, idx)
                loss = loss_fn(model(xb.contiguous(memory_format=torch.channels_last)), yb, idx)
                if extra is not None:
                    loss = loss + extra
            for o in (opt, *extra_optimizers):
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in (opt, *extra_optimizers):
                o.step()
            loss_sum += loss.detach() * len(idx)  # stays on device: no sync per step
            step += 1
        record = {"epoch": epoch, "loss": float(loss_sum) / n, "lr": opt.param_groups[0]["lr"],
                  "seconds": time.perf_counter() - t0}
        if not math.isfinite(record["loss"]):
            raise TrainingDiverged(f"loss became {record['loss']} at epoch {epoch}")
        # The loss is measured before each step, so a last step that blows the weights up is caught here.
        if not all(torch.isfinite(p).all() for o in (opt, *extra_optimizers) for g in o.param_groups
                   for p in g["params"]):
            raise TrainingDiverged(f"parameters became non-finite at epoch {epoch}")
        stop = on_epoch(epoch, record) if on_epoch else None
        history.append(record)
        if stop:
            break
    return history


@contextmanager
def frozen_batchnorm(model: nn.Module):
    """Inside the block every BatchNorm layer of ``model`` runs in eval mode (running statistics used, not
    updated) even while :func:`fit` puts the model in train mode: for fine-tuning that must not move the
    statistics (ABL's and BAERASE's unlearning). Other layers (dropout) keep the model's mode. The
    BatchNorm layers follow the model's mode again afterwards."""
    def to_eval(module, inputs):  # noqa: ARG001 - a forward pre-hook: runs before every call of the layer
        module.training = False

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_pre_hook(to_eval) for m in bns]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        model.train(model.training)  # BatchNorm layers back in step with the model


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024, device: torch.device | None = None,
            logits: bool = False) -> torch.Tensor:
    """Predicted labels (or logits) for images ``x`` (uint8 or float in [0, 1]), returned on the CPU."""
    device = device or next(model.parameters()).device
    model.to(device).eval()
    out = []
    for chunk in x.split(batch_size):
        xb = to_float(chunk.to(device, non_blocking=True))
        with _autocast(device):
            z = model(xb).float()
        out.append(z if logits else z.argmax(1))
    return torch.cat(out).cpu()


@torch.no_grad()
def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
                    device: torch.device | None = None) -> torch.Tensor:
    """Cross-entropy of every sample (no augmentation, eval mode), e.g. for ABL's isolation."""
    z = predict(model, x, batch_size=batch_size, device=device, logits=True)
    return F.cross_entropy(z, y.cpu(), reduction="none")
