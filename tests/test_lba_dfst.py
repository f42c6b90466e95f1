"""``lba`` (a trigger optimised so that stamped inputs' latent representation matches the target class's mean)
and ``dfst`` (a style generator trained in prepare, whose output is the trigger): deterministic products, a
trigger that does better than its starting point at its own objective, exact poison counts and labels,
no trigger before the products are loaded, and one engine run each. Small: toy tensors, a few steps."""
import pytest
import torch
import torch.nn.functional as F

from attacks.base import AttackContext
from attacks.dfst import StyleGenerator, sunrise
from attacks.lba import latent
from kernel.data import Split
from kernel.models import create_model
from kernel.train import TrainConfig, to_float, to_uint8
from sweep.spec import SpecError, expand, parse_spec
from sweep.store import Store
from sweep.trial import execute
from toys import GRAY, INFO, make, toy_model

torch.set_num_threads(1)
LBA = dict(trigger_samples=64, trigger_batch=16, trigger_epochs=3)
DFST = dict(gen_images=128, gen_batch=16, gen_epochs=3)


def toy_split(n=400, seed=1, info=INFO):
    """Smooth random images (a coarse colour grid, upsampled, plus a little noise): something to stylise."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = info.shape
    coarse = F.interpolate(torch.rand(n, c, 4, 4, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    x = (coarse * 0.8 + 0.2 * torch.rand(n, c, h, w, generator=g)).mul(255).round().to(torch.uint8)
    return Split(x, torch.arange(n) % 10)


def ctx_with(model=None):
    def no_model():
        raise AssertionError("this attack should not need the reference model")
    return AttackContext(train_cfg=TrainConfig(epochs=1, batch_size=32), device=torch.device("cpu"),
                         new_model=lambda: create_model("small_cnn", 10),
                         reference_model=(lambda: model.eval().requires_grad_(False))  # as the engine lends it
                         if model is not None else no_model)


def check_poison(a, train, target):
    p = a.poison(train)
    k = round(a.params.poison_rate * len(train))
    assert len(p.indices) == k == len(set(p.indices.tolist()))
    img = (p.train.x != train.x).flatten(1).any(1).nonzero().flatten()
    lab = (p.train.y != train.y).nonzero().flatten()
    assert torch.equal(lab, p.indices) and set(img.tolist()) <= set(p.indices.tolist())
    want = (train.y[p.indices] + 1) % 10 if target == "all" else torch.full((k,), target)
    assert torch.equal(p.train.y[p.indices], want)
    assert torch.equal(p.train.x[p.indices], to_uint8(a.apply_trigger(to_float(train.x[p.indices]))))
    return p


# -- lba --------------------------------------------------------------------------------------------

def test_lba_trigger_pulls_the_latent_towards_the_target_mean_inside_its_mask():
    train, model = toy_split(), toy_model()
    a, ctx = make("lba", **LBA), ctx_with(model)
    products = a.prepare(train, ctx)
    again = make("lba", **LBA).prepare(train, ctx_with(model))
    assert torch.equal(products["pattern"], again["pattern"])  # deterministic for its parameters and seed
    assert 0 <= products["pattern"].min() and products["pattern"].max() <= 1
    # the authors' mask: side int(0.2 * 32) = 6, 1 px from the bottom and right borders
    assert int(a.mask.sum()) == 36 and a.mask[0, 25:31, 25:31].all()
    assert products["pattern"][~a.mask.bool().expand(3, 32, 32)].abs().max() == 0
    assert ctx.history[-1]["trigger_loss"] < ctx.history[0]["trigger_loss"]
    a.load(products)
    held_out = to_float(toy_split(200, seed=5).x)  # images the trigger was not optimised on
    mu = a.class_means(model, train, torch.tensor([0]), torch.device("cpu"))[0]
    with torch.no_grad():
        def dist(z):
            return (latent(model, z, "classifier_input") - mu).pow(2).mean().item()
        d_opt, d_init = dist(a.apply_trigger(held_out)), dist(a.stamp(held_out, a.initial_pattern()))
    assert d_opt < 0.95 * d_init and d_opt < dist(held_out)
    check_poison(a, train, 0)


def test_lba_all_to_all_pulls_each_class_towards_its_attack_label_and_feature_mean_latent_works():
    train, model = toy_split(), toy_model()
    a = make("lba", target="all", latent="feature_mean", **LBA)
    ctx = ctx_with(model)
    a.load(a.prepare(train, ctx))
    assert ctx.history[-1]["trigger_loss"] < ctx.history[0]["trigger_loss"]
    check_poison(a, train, "all")


def test_lba_refusals():
    with pytest.raises(RuntimeError, match="prepare"):
        make("lba").apply_trigger(torch.rand(2, 3, 32, 32))
    spec = {"name": "s", "dataset": {"name": "synthetic"}, "model": "small_cnn",
            "attacks": [{"name": "lba", "size_ratio": 1.0}], "defenses": [{"name": "none"}]}
    with pytest.raises(SpecError, match="does not fit"):
        expand(parse_spec(spec))


# -- dfst -------------------------------------------------------------------------------------------

def test_sunrise_is_a_fixed_warm_image_for_any_shape():
    s = sunrise((3, 32, 32))
    assert torch.equal(s, sunrise((3, 32, 32))) and not torch.equal(s, sunrise((3, 32, 32), seed=1))
    assert 0 <= s.min() and s.max() <= 1
    assert s[0].mean() > s[2].mean() + 0.1  # warm: red over blue
    assert sunrise((1, 28, 28)).shape == (1, 28, 28) and sunrise((3, 64, 64)).shape == (3, 64, 64)


def test_untrained_generator_is_the_identity():
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(StyleGenerator(3)(x), x)


def test_dfst_generator_learns_the_style_keeps_the_content_and_is_deterministic():
    train = toy_split()
    a, ctx = make("dfst", **DFST), ctx_with()  # no reference model: the generator ignores the classifier
    products = a.prepare(train, ctx)
    assert products and all(k.startswith("gen.") for k in products)
    again = make("dfst", **DFST).prepare(train, ctx_with())
    assert all(torch.equal(products[k], again[k]) for k in products)
    assert ctx.history[-1]["style_loss"] < ctx.history[0]["style_loss"]
    a.load(products)
    x = to_float(toy_split(32, seed=5).x)  # images the generator was not trained on
    out = a.apply_trigger(x)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert torch.equal(torch.cat([a.apply_trigger(x[:5]), a.apply_trigger(x[5:])]), out)  # per image
    obj = a.objective(a.new_generator())
    with torch.no_grad():
        style_before, _ = obj.losses(x, x)  # the untrained generator is the identity
        style_after, _ = obj.losses(x, out)
    assert style_after < 0.8 * style_before
    assert (out - x).abs().mean() > 0.02  # visibly changed...
    corr = torch.stack([torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1] for u, v in zip(x, out)])
    assert corr.mean() > 0.5  # ...but the content is kept
    check_poison(a, train, 0)
    b = make("dfst", target="all", **DFST)
    b.load(products)
    check_poison(b, train, "all")


def test_dfst_one_channel_and_refusals():
    a = make("dfst", info=GRAY, **{**DFST, "gen_epochs": 1})
    with pytest.raises(RuntimeError, match="prepare"):
        a.apply_trigger(torch.rand(2, 1, 28, 28))
    a.load(a.prepare(toy_split(info=GRAY), ctx_with()))
    out = a.apply_trigger(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 1, 28, 28) and 0 <= out.min() and out.max() <= 1


# -- through the engine -----------------------------------------------------------------------------

def test_lba_and_dfst_run_in_the_engine(tmp_path):
    spec = {"name": "ld", "dataset": {"name": "synthetic", "train_size": 300, "test_size": 100},
            "model": "small_cnn", "train": {"epochs": 1}, "seeds": [0],
            "attacks": [{"name": "lba", "trigger_samples": 64, "trigger_epochs": 1},
                        {"name": "dfst", "gen_images": 64, "gen_epochs": 1}],
            "defenses": [{"name": "none"}]}
    store = Store(tmp_path)
    for t in expand(parse_spec(spec)):
        row = execute(t, store).row
        assert row["status"] == "ok", row["error"]
        assert row["asr"] is not None and store.exists("products", t.model_key)
