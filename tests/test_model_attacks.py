"""Attacks that need a model to build their poison (``lc``: adversarial images against a clean model;
``trojannn``: a trigger optimised to excite chosen neurons), and the engine's by-product cache behind them:
the products are computed once per model key, the clean reference model is attack ``none``'s model."""
import pytest
import torch
import torch.nn.functional as F

from attacks import ATTACKS
from attacks.lc import corner_checkers, pgd
from kernel.train import to_float
from sweep.spec import SpecError, expand, parse_spec
from sweep.store import Store
from sweep.trial import execute
from toys import INFO, ctx_with, make, toy_model, toy_split

torch.set_num_threads(1)


# -- lc ---------------------------------------------------------------------------------------------

def test_pgd_stays_in_the_ball_and_the_image_range_and_raises_the_loss():
    model, x = toy_model(), to_float(toy_split(16).x)
    y = model(x).argmax(1)  # the model's own labels: PGD must move away from them
    xa = pgd(model, x, y, eps=8 / 255, step=1.5 / 255, steps=10)
    assert (xa - x).abs().max() <= 8 / 255 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert F.cross_entropy(model(xa), y) > F.cross_entropy(model(x), y)


def test_corner_trigger_survives_a_horizontal_flip():
    mask, pattern = corner_checkers(3, 32, 32)
    assert int(mask.sum()) == 4 * 9
    assert torch.equal(pattern.flip(2), pattern) and torch.equal(mask.flip(2), mask)


def test_lc_poisons_target_class_images_only_keeps_labels_and_uses_its_adversarial_images():
    train, a = toy_split(400), make("lc", poison_rate=0.05, target=3, steps=3)
    with pytest.raises(RuntimeError, match="prepare"):
        a.poison(train)  # no adversarial images yet
    products = a.prepare(train, ctx_with(toy_model()))
    assert products["images"].dtype == torch.uint8 and len(products["indices"]) == 20  # 5% of 400
    a.load(products)
    p = a.poison(train)
    assert torch.equal(p.train.y, train.y)  # clean label
    assert (train.y[p.indices] == 3).all() and len(p.indices) == 20
    changed = (p.train.x != train.x).flatten(1).any(1).nonzero().flatten()
    assert set(changed.tolist()) == set(p.indices.tolist())
    # inside the ball away from the trigger's corners, triggered at full amplitude in them
    mask = corner_checkers(3, 32, 32)[0].bool().expand(3, 32, 32)
    diff = (p.train.x[p.indices].int() - train.x[p.indices].int()).abs()
    assert diff[:, ~mask].max() <= 8 + 1  # 8/255, plus rounding
    assert torch.equal(to_float(p.train.x[p.indices])[:, mask], a.apply_trigger(
        to_float(train.x[p.indices]))[:, mask])
    # products made for another seed's selection are refused, not silently misapplied
    other = make("lc", seed=1, poison_rate=0.05, target=3, steps=3)
    other.load(products)
    with pytest.raises(RuntimeError, match="other samples"):
        other.poison(train)


def test_lc_is_refused_all_to_all_and_too_high_a_rate():
    for params, field in (({"name": "lc", "target": "all"}, "target"),
                          ({"name": "lc", "poison_rate": 0.2}, "rate_of")):
        spec = {"name": "s", "dataset": {"name": "synthetic"}, "model": "small_cnn",
                "attacks": [params], "defenses": [{"name": "none"}]}
        with pytest.raises(SpecError, match=field):
            expand(parse_spec(spec))


# -- trojannn ---------------------------------------------------------------------------------------

def test_trojannn_trigger_excites_the_chosen_neurons_and_lives_in_its_mask():
    train, model = toy_split(400), toy_model()
    a = make("trojannn", steps=40, trigger_batch=32)
    ctx = ctx_with(model)
    products = a.prepare(train, ctx)
    again = make("trojannn", steps=40, trigger_batch=32).prepare(train, ctx_with(model))
    assert torch.equal(products["pattern"], again["pattern"])  # deterministic for its parameters
    outside = ~a.mask.bool().expand(3, 32, 32)
    assert products["pattern"][outside].abs().max() == 0
    assert ctx.history[-1]["trigger_loss"] < ctx.history[0]["trigger_loss"]
    a.load(products)
    x = to_float(train.x[:64])
    f = lambda z: model.forward_features(z).flatten(2).mean(2)[:, products["neurons"]].mean()  # noqa: E731
    start = torch.rand(INFO.shape, generator=torch.Generator().manual_seed(0))  # the pattern it started from
    with torch.no_grad():  # on an untrained toy model pixels in [0, 1] saturate early: compare, not "100"
        assert f(a.apply_trigger(x)) > 1.05 * f(a.stamp(x, start)) and f(a.apply_trigger(x)) > 1.05 * f(x)
    p = a.poison(train)
    assert len(p.indices) == 40 and (p.train.y[p.indices] == 0).all()


def test_trojannn_before_prepare_is_an_error_not_a_blank_trigger():
    with pytest.raises(RuntimeError, match="prepare"):
        make("trojannn").apply_trigger(torch.rand(2, 3, 32, 32))


# -- through the engine: products once, the reference model shared with attack none ------------------

def test_products_are_built_once_and_the_reference_model_is_attack_nones(tmp_path, monkeypatch):
    spec = {"name": "p", "dataset": {"name": "synthetic", "train_size": 300, "test_size": 100},
            "model": "small_cnn", "train": {"epochs": 1}, "seeds": [0],
            "attacks": [{"name": "lc", "steps": 2}, {"name": "none"}],
            "defenses": [{"name": "none"}, {"name": "finetune", "clean_size": 20, "epochs": 1}]}
    trials = expand(parse_spec(spec))
    lc_trials = [t for t in trials if t.attack.name == "lc"]
    none_trial = next(t for t in trials if t.attack.name == "none")
    calls = []
    real = ATTACKS.get("lc").prepare
    monkeypatch.setattr(ATTACKS.get("lc"), "prepare", lambda self, *a: calls.append(1) or real(self, *a))
    store = Store(tmp_path)
    rows = [execute(t, store).row for t in lc_trials]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert len(calls) == 1 and store.exists("products", lc_trials[0].model_key)
    assert [r["attack_cached"] for r in rows] == [False, True]
    # the clean model LC attacked is attack none's model: that trial finds it built
    assert store.exists("models", none_trial.model_key)
    assert execute(none_trial, store).row["attack_cached"] is True
