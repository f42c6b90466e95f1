"""The training kernel: batched augmentation, precision choice, seeding, divergence detection."""
import pytest
import torch
import torch.nn.functional as F

from kernel.models import create_model
from kernel.train import (TrainConfig, TrainingDiverged, augment, fit, frozen_batchnorm, make_generator,
                          mixed_precision)


def _candidates(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every crop of the zero-padded image, flipped and not."""
    h, w = img.shape[-2:]
    padded = F.pad(img, (pad, pad, pad, pad))
    crops = [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return crops + [c.flip(-1) for c in crops]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_returns_a_crop_or_flipped_crop_of_each_image(dtype):
    x = torch.randint(0, 256, (16, 3, 8, 8)).to(dtype)
    out = augment(x, make_generator(0, torch.device("cpu")), pad=2)
    assert out.shape == x.shape and out.dtype == dtype
    for img, o in zip(x, out):
        assert any(torch.equal(o, c) for c in _candidates(img, 2))


def test_augment_varies_over_the_batch_and_is_seeded():
    x = torch.arange(64 * 3 * 8 * 8, dtype=torch.float32).view(64, 3, 8, 8)
    a = augment(x, make_generator(1, torch.device("cpu")), pad=2)
    b = augment(x, make_generator(1, torch.device("cpu")), pad=2)
    assert torch.equal(a, b)
    shifted = [not torch.equal(o, img) for img, o in zip(x, a)]
    assert 40 < sum(shifted) < 64  # 1 in 50 images keeps offset (2, 2) unflipped
    flipped_only = augment(x, make_generator(1, torch.device("cpu")), pad=0)
    n_flipped = sum(torch.equal(o, img.flip(-1)) for img, o in zip(x, flipped_only))
    n_same = sum(torch.equal(o, img) for img, o in zip(x, flipped_only))
    assert n_flipped + n_same == 64 and 15 < n_flipped < 49


def test_precision_choice():
    cpu = torch.device("cpu")
    assert mixed_precision(cpu, "fp32") is None
    assert mixed_precision(cpu, "bf16") is torch.bfloat16
    assert mixed_precision(cpu, "auto") in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="precision"):
        mixed_precision(cpu, "fp8")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fit_learns_and_is_reproducible(precision):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.rand(200, 3, 16, 16, generator=gen) * 0.5
    x[y == 1, 0] += 0.5  # class 1: red channel brighter, learnable in a few epochs
    cfg = TrainConfig(epochs=6, batch_size=32, lr=0.05, augment=False, precision=precision)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("small_cnn", 2)
        hist = fit(model, x, y, cfg, seed=3, device=torch.device("cpu"))
        runs.append((hist, model.state_dict()))
    (h1, s1), (h2, s2) = runs
    assert h1[-1]["loss"] < 0.5 * h1[0]["loss"]
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_fit_raises_on_divergence():
    x, y = torch.rand(64, 3, 8, 8), torch.arange(64) % 4
    cfg = TrainConfig(epochs=2, batch_size=16, precision="fp32")
    with pytest.raises(TrainingDiverged):
        fit(create_model("small_cnn", 4), x, y, cfg, loss_fn=lambda z, t, i: z.sum() * float("nan"))


def test_a_callers_optimizer_follows_the_schedule_and_batch_fn_rewrites_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x, y = torch.rand(64, 3, 8, 8), torch.arange(64) % 4
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    seen = []

    def relabel(xb, yb, idx):  # every batch becomes "class 3", plus a term that is constant
        seen.append(len(idx))
        return xb, torch.full_like(yb, 3), torch.zeros(())

    cfg = TrainConfig(epochs=3, batch_size=16, schedule="cosine", augment=False, precision="fp32")
    fit(model, x, y, cfg, optimizer=opt, batch_fn=relabel)
    assert sum(seen) == 3 * 64
    last = (3 * 4 - 1) / (3 * 4)  # the lr was set for the last of 12 steps
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * last)).item()))
    with torch.no_grad():
        assert (model(x).argmax(1) == 3).all()  # trained on what batch_fn returned, not on y


def test_extra_optimizers_step_with_the_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    shift = torch.nn.Parameter(torch.zeros(1, 3, 1, 1))  # a second network's stand-in, trained jointly
    extra = torch.optim.SGD([shift], lr=0.1)
    cfg = TrainConfig(epochs=1, batch_size=16, augment=False, precision="fp32")
    fit(model, torch.rand(32, 3, 8, 8), torch.zeros(32, dtype=torch.long), cfg,
        batch_fn=lambda xb, yb, idx: (xb + shift, yb, None), extra_optimizers=(extra,))
    assert shift.abs().sum() > 0


def test_frozen_batchnorm_keeps_running_statistics_through_fit_and_lets_go_after():
    torch.manual_seed(0)
    model = create_model("small_cnn", 10)
    x, y = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.arange(64) % 10
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bn]
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.01)
    with frozen_batchnorm(model):
        fit(model, x, y, cfg, device=torch.device("cpu"))
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bn, before))  # fit ran, the statistics held
    assert all(m.training for m in bn)  # back in step with the model (fit left it in train mode)
    fit(model, x, y, cfg, device=torch.device("cpu"))
    assert not all(torch.equal(m.running_mean, b) for m, b in zip(bn, before))  # outside the block they move


def test_a_training_dropout_rate_applies_while_fitting_and_is_given_back():
    torch.manual_seed(0)
    model = create_model("vgg_small", 10)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert [m.p for m in drops] == [0.3, 0.4, 0.4]
    seen = []
    x, y = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8), torch.arange(32) % 10
    fit(model, x, y, TrainConfig(epochs=1, batch_size=16, dropout=0.0),
        on_epoch=lambda e, r: seen.append([m.p for m in drops]))
    assert seen == [[0.0, 0.0, 0.0]]  # during training
    assert [m.p for m in drops] == [0.3, 0.4, 0.4]  # the architecture's rates afterwards
    fit(model, x, y, TrainConfig(epochs=1, batch_size=16), on_epoch=lambda e, r: seen.append([m.p for m in drops]))
    assert seen[-1] == [0.3, 0.4, 0.4]  # None: untouched
    # a field added later stays out of the identity dict at its default, so older trial ids hold
    assert "dropout" not in TrainConfig().as_dict() and TrainConfig(dropout=0.0).as_dict()["dropout"] == 0.0


def test_a_spec_takes_the_recipes_dropout_or_the_architectures():
    from sweep.spec import SpecError, expand, parse_spec

    def train_of(**train):
        s = {"name": "x", "dataset": {"name": "synthetic", "train_size": 100, "test_size": 50}, "model": "vgg_small",
             "seeds": [0], "train": train, "attacks": [{"name": "badnets"}], "defenses": [{"name": "none"}]}
        return expand(parse_spec(s))[0].train

    assert train_of()["dropout"] == 0.0  # vgg_small's registered recipe trains without it
    assert train_of(dropout=0.2)["dropout"] == 0.2
    assert "dropout" not in train_of(dropout="architecture")  # TrainConfig's None: the layers' own rates
    with pytest.raises(SpecError, match="train.dropout"):
        train_of(dropout=1.5)
