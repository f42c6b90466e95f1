"""The two attacks of ABL's table added last: ``fc`` (feature-collision clean-label backdoor, products made
against the reference model) and ``cba`` (composite backdoor: A-half + B-half -> target, same-class mixes
keep their labels). Toy tensors, an untrained toy model, and one short engine run each."""
import json

import pytest
import torch

from attacks.cba import half_mix
from attacks.fc import greedy_pairs
from attacks.lba import classifier_input
from kernel.models import create_model
from kernel.train import TrainConfig, to_float
from sweep.spec import SpecError, expand, parse_spec
from sweep.store import Store
from sweep.trial import execute
from toys import ctx_with, make, toy_model, toy_split

torch.set_num_threads(1)


# -- fc ---------------------------------------------------------------------------------------------

def test_greedy_pairs_takes_the_closest_pairs_first_each_once():
    d = torch.tensor([[0.0, 1.0, 9.0], [0.5, 2.0, 9.0], [9.0, 9.0, 9.0]])
    assert greedy_pairs(d).tolist() == [0, 1, 2]  # row 1 would like column 0 but row 0 got it first


def test_fc_collides_features_within_epsilon_keeps_labels_and_poisons_the_target_class_only():
    train, model = toy_split(400), toy_model()
    a = make("fc", poison_rate=0.05, target=3, steps=10, batch_size=8)
    with pytest.raises(RuntimeError, match="prepare"):
        a.poison(train)  # no collided images yet
    ctx = ctx_with(model)
    products = a.prepare(train, ctx)
    again = make("fc", poison_rate=0.05, target=3, steps=10, batch_size=8).prepare(train, ctx_with(model))
    assert all(torch.equal(products[k], again[k]) for k in products)  # deterministic for a seed
    assert products["images"].dtype == torch.uint8 and len(products["indices"]) == 20  # 5% of 400
    assert (train.y[products["sources"]] != 3).all() and len(products["sources"].unique()) == 20
    assert all(h["distance_end"] < h["distance_start"] for h in ctx.history)  # the features moved closer
    assert all(h["trigger_shift"] > 0 for h in ctx.history)  # the trigger's own footprint, for comparison
    a.load(products)
    p = a.poison(train)
    assert torch.equal(p.train.y, train.y) and len(p.noise_indices) == 0  # clean label
    assert (train.y[p.indices] == 3).all() and len(p.indices) == 20
    changed = (p.train.x != train.x).flatten(1).any(1).nonzero().flatten()
    assert set(changed.tolist()) <= set(p.indices.tolist())
    diff = (p.train.x.int() - train.x.int()).abs()
    assert diff.max() <= 16 + 1  # 16/255, plus rounding; no trigger on the poisons by default
    # each poison's features are closer to its triggered source's than the clean image's were
    x0, xp = to_float(train.x[p.indices]), to_float(p.train.x[p.indices])
    with torch.no_grad():
        goal = classifier_input(model, a.apply_trigger(to_float(train.x[products["sources"]])))
        assert ((classifier_input(model, xp) - goal).pow(2).sum(1)
                < (classifier_input(model, x0) - goal).pow(2).sum(1)).all()
    # products made for another seed's selection are refused, not silently misapplied
    other = make("fc", seed=1, poison_rate=0.05, target=3, steps=10, batch_size=8)
    other.load(products)
    with pytest.raises(RuntimeError, match="other samples"):
        other.poison(train)


def test_fc_visible_poison_trigger_stays_in_the_ball_outside_the_patch_and_the_test_trigger_is_pasted():
    train, a = toy_split(400), make("fc", poison_rate=0.05, target=3, steps=3, poison_trigger=1.0,
                                 patch_size=4, position=[2, 5], pattern="white")
    a.load(a.prepare(train, ctx_with(toy_model())))
    p = a.poison(train)
    region = torch.zeros(3, 32, 32, dtype=torch.bool)
    region[:, 2:6, 5:9] = True
    diff = (p.train.x[p.indices].int() - train.x[p.indices].int()).abs()
    assert diff[:, ~region].max() <= 17 and (p.train.x[p.indices][:, region] == 255).all()
    t = a.triggered_test(train)
    assert len(t.y_true) == 360 and (t.y_attack == 3).all() and (t.y_true != 3).all()
    assert (t.x[:, region] == 1).all() and torch.equal(t.x[:, ~region], to_float(train.x[train.y != 3])[:, ~region])
    assert 0 <= t.x.min() and t.x.max() <= 1


def test_fc_collides_what_the_classifier_reads_max_pooled_on_small_cnn():
    # small_cnn's head max-pools: the features its linear layer reads are the spatial max, not the mean.
    # By default the poisons collide there (HTBA's fc7); feature_mean collides the mean instead.
    train, model = toy_split(400), toy_model()
    x = to_float(train.x[:4])
    with torch.no_grad():
        f = model.forward_features(x).flatten(2)
        assert torch.allclose(make("fc").features(model, x), f.amax(2))
        assert torch.allclose(make("fc", features="feature_mean").features(model, x), f.mean(2))
        assert torch.allclose(model.fc(make("fc").features(model, x)), model(x), atol=1e-5)


def test_fc_finetune_victim_trains_a_new_final_layer_on_frozen_features():
    train, model = toy_split(400), toy_model()
    a = make("fc", poison_rate=0.05, target=3, steps=2, victim="finetune", finetune_epochs=2)
    assert a.trains_model and not make("fc").trains_model
    ctx = ctx_with(model)
    products = a.prepare(train, ctx)
    victim = create_model("small_cnn", 10)
    victim.load_state_dict({k[6:]: v for k, v in products.items() if k.startswith("model.")})
    ref = model.state_dict()
    for k, v in victim.state_dict().items():
        if k.startswith("net.fc."):
            assert not torch.allclose(v, ref[k]), k  # the final layer is new (re-drawn, then trained)
        else:
            assert torch.equal(v, ref[k]), k  # everything else, BatchNorm statistics included, untouched
    assert [h["finetune_epoch"] for h in ctx.history if "finetune_epoch" in h] == [0, 1]
    again = make("fc", poison_rate=0.05, target=3, steps=2, victim="finetune", finetune_epochs=2)
    assert all(torch.equal(products[k], v) for k, v in again.prepare(train, ctx_with(model)).items())  # seeded
    a.load(products)
    assert len(a.poison(train).indices) == 20  # the poisoned set is still there for training-time defenses


def test_fc_counts_poisons_per_rate_of():
    y = toy_split(400).y
    assert len(make("fc", poison_rate=0.5, rate_of="target_class").select(y)) == 20  # half of 40
    assert len(make("fc", poison_rate=0.1).select(y)) == 40  # 10% of 400: the whole target class


def test_fc_rgb_trigger_is_fixed_by_its_pattern_seed():
    a, b, c = make("fc"), make("fc", seed=5), make("fc", pattern_seed=1)
    assert torch.equal(a.patch, b.patch) and not torch.equal(a.patch, c.patch)
    assert a.patch.shape == (3, 4, 4) and 0 <= a.patch.min() and a.patch.max() <= 1


# -- cba --------------------------------------------------------------------------------------------

def test_half_mix_is_made_of_two_halves_of_its_inputs():
    a, b = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    for orientation in ("vertical", "horizontal"):
        for _ in range(10):
            m = half_mix(a, b, g, jitter=3, shake=True, orientation=orientation)[0]
            side = m[0].mean(0 if orientation == "vertical" else 1)  # per column / per row
            assert set(side.unique().tolist()) == {0.0, 1.0}
            switches = (side[1:] != side[:-1]).nonzero().flatten()
            assert len(switches) == 1 and 16 - 3 <= int(switches[0]) + 1 <= 16 + 3  # one split near the middle
    # centred windows, no jitter: the left half shows the middle of the left image
    x = torch.arange(32.0).expand(1, 3, 32, 32)
    m = half_mix(x, x + 100, torch.Generator().manual_seed(3), jitter=0, shake=False, orientation="vertical")[0]
    row = m[0, 0]
    first, second = row[:16], row[16:]
    assert torch.equal(first % 100, torch.arange(8.0, 24.0)) and torch.equal(second % 100, torch.arange(8.0, 24.0))
    assert (first < 100).all() != (second < 100).all()


def test_half_mix_batches_both_orientations_on_non_square_images():
    # random orientation on 20x28 images: each output is split once, by columns or by rows, and the pixels
    # come from its own pair only (the batched gather must not mix up pairs or the transposed layout)
    n, g = 64, torch.Generator().manual_seed(1)
    a = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 20, 28)
    m = half_mix(a, a + 1000, g, jitter=2, shake=True, orientation="random")
    kinds = set()
    for i in range(n):
        assert set(m[i].unique().tolist()) == {float(i), float(i + 1000)}
        cols, rows = m[i, 0].mean(0), m[i, 0].mean(1)
        by_cols = set(cols.unique().tolist()) == {float(i), float(i + 1000)}
        kinds.add(by_cols)
        side = cols if by_cols else rows
        assert (side[1:] != side[:-1]).sum() == 1  # one split line
    assert kinds == {True, False}


def test_cba_labels_counts_and_negative_mixes():
    train = toy_split(400)
    a = make("cba", poison_rate=0.05, mix_ratio=2)
    p = a.poison(train)
    q = make("cba", poison_rate=0.05, mix_ratio=2).poison(train)
    assert torch.equal(p.train.x, q.train.x) and torch.equal(p.noise_indices, q.noise_indices)  # seeded
    assert not torch.equal(make("cba", seed=1, poison_rate=0.05, mix_ratio=2).poison(train).train.x, p.train.x)
    assert len(p.indices) == 20 and len(p.noise_indices) == 40
    assert not set(p.indices.tolist()) & set(p.noise_indices.tolist())
    assert (p.train.y[p.indices] == 0).all() and (train.y[p.indices] != 0).all()  # composites -> target
    assert torch.equal(p.train.y[p.noise_indices], train.y[p.noise_indices])  # negatives keep their labels
    touched = torch.cat([p.indices, p.noise_indices])
    rest = torch.ones(400, dtype=torch.bool)
    rest[touched] = False
    assert torch.equal(p.train.x[rest], train.x[rest]) and torch.equal(p.train.y[rest], train.y[rest])
    assert (p.train.x[touched] != train.x[touched]).flatten(1).any(1).all()
    assert p.train.x.dtype == torch.uint8


def halves(x: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which images of ``pool`` show their centred half-window (cols 8..23) on the left / the right of x."""
    win = pool[:, :, :, 8:24]
    return ((win == x[:, :, :16]).flatten(1).all(1).nonzero().flatten(),
            (win == x[:, :, 16:]).flatten(1).all(1).nonzero().flatten())


def test_cba_composites_are_an_a_half_and_a_b_half_and_negatives_two_halves_of_their_class():
    train = toy_split(400)
    p = make("cba", poison_rate=0.05, mix_ratio=1, orientation="vertical", jitter=0, shake=False).poison(train)
    for i in p.indices.tolist():
        (la, ra), (lb, rb) = halves(p.train.x[i], train.x[train.y == 1]), halves(p.train.x[i], train.x[train.y == 2])
        assert (len(la) and len(rb)) or (len(lb) and len(ra)), i  # A | B or B | A
    for i in p.noise_indices.tolist():
        same = train.x[train.y == train.y[i]]
        left, right = halves(p.train.x[i], same)
        assert len(left) and len(right) and torch.equal(p.train.y[i], train.y[i])
        assert i in (train.y == train.y[i]).nonzero().flatten()[torch.cat([left, right])]  # one half is its own


def test_cba_negatives_of_the_source_classes_only():
    train = toy_split(400)
    s = make("cba", poison_rate=0.05, mix_ratio=2, negatives="source_classes").poison(train)
    assert set(train.y[s.noise_indices].unique().tolist()) <= {1, 2}
    with pytest.raises(ValueError, match="mix_ratio"):
        make("cba", poison_rate=0.1, mix_ratio=3, negatives="source_classes").poison(train)  # 80 A/B images


def test_cba_dynamic_remixes_every_batch_composites_negatives_and_clean_rest():
    train = toy_split(400)
    a = make("cba", poison_rate=0.1, mix_ratio=2, poisoning="dynamic", orientation="vertical", jitter=0,
             shake=False)
    assert a.trains_model and a.has_products and not make("cba").trains_model and not make("cba").has_products
    mixer = a.batch_mixer(train, TrainConfig(augment=False), torch.device("cpu"))
    xb, yb = to_float(train.x[:100]), train.y[:100]
    x, y = mixer(xb, yb, torch.arange(100))[:2]
    assert (y[:10] == 0).all()  # 10 composites, relabelled to the target
    assert torch.equal(y[30:], yb[30:]) and torch.equal(x[30:], xb[30:])  # the rest left clean
    img = (x * 255).round().to(torch.uint8)
    for i in range(10):  # an A half and a B half, from anywhere in the training set
        (la, ra), (lb, rb) = halves(img[i], train.x[train.y == 1]), halves(img[i], train.x[train.y == 2])
        assert (len(la) and len(rb)) or (len(lb) and len(ra)), i
    for i in range(10, 30):  # 20 negatives: two halves of images of the class they keep as label
        left, right = halves(img[i], train.x[train.y == y[i]])
        assert len(left) and len(right), i
    x2 = mixer(xb, yb, torch.arange(100))[0]
    assert not torch.equal(x2[:30], x[:30])  # fresh mixes in the next batch
    # seeded: a new mixer of the same attack makes the same first batch
    assert torch.equal(a.batch_mixer(train, TrainConfig(augment=False), torch.device("cpu"))(xb, yb, None)[0], x)
    s = make("cba", poisoning="dynamic", negatives="source_classes", mix_ratio=3)
    y3 = s.batch_mixer(train, TrainConfig(augment=False), torch.device("cpu"))(xb, yb, None)[1]
    assert set(y3[10:40].tolist()) <= {1, 2}


def test_cba_triggered_test_mixes_class_a_with_class_b_towards_the_target():
    test = toy_split(200, seed=2)
    a = make("cba", class_a=4, class_b=7, target=2)
    t = a.triggered_test(test)
    assert len(t.y_true) == 20 and (t.y_true == 4).all() and (t.y_attack == 2).all()
    assert 0 <= t.x.min() and t.x.max() <= 1 and t.x.shape == (20, 3, 32, 32)
    assert torch.equal(t.x, a.triggered_test(test).x)  # seeded pairing and mixing
    plain = make("cba", class_a=4, class_b=7, target=2, orientation="vertical", jitter=0, shake=False)
    for img in (plain.triggered_test(test).x * 255).round().to(torch.uint8):
        (la, ra), (lb, rb) = halves(img, test.x[test.y == 4]), halves(img, test.x[test.y == 7])
        assert (len(la) and len(rb)) or (len(lb) and len(ra))  # an A half and a B half
    with pytest.raises(NotImplementedError):
        a.apply_trigger(t.x)


# -- spec refusals, naming the field ----------------------------------------------------------------

REFUSALS = [
    ({"name": "fc", "target": "all"}, "attacks[0].target", "clean-label"),
    ({"name": "fc", "poison_rate": 0.2}, "attacks[0]", "rate_of"),
    ({"name": "fc", "epsilon": 2}, "attacks[0].epsilon", "less than or equal to 1"),
    ({"name": "fc", "steps": -1}, "attacks[0].steps", "greater than or equal to 0"),
    ({"name": "fc", "patch_size": 40}, "attacks[0]", "does not fit"),
    ({"name": "fc", "pattern": "kitty"}, "attacks[0].pattern", "rgb"),
    ({"name": "cba", "target": "all"}, "attacks[0].target", "one target class"),
    ({"name": "cba", "class_a": 0}, "attacks[0].class_a", "target"),
    ({"name": "cba", "class_b": 1}, "attacks[0].class_b", "equals class_a"),
    ({"name": "cba", "class_b": 10}, "attacks[0].class_b", "not a class"),
    ({"name": "cba", "mix_ratio": 10}, "attacks[0]", "mix_ratio"),
    ({"name": "cba", "negatives": "some"}, "attacks[0].negatives", "all_classes"),
    ({"name": "cba", "poisoning": "online"}, "attacks[0].poisoning", "dynamic"),
]


@pytest.mark.parametrize("entry,field,text", REFUSALS)
def test_spec_refuses_bad_params_naming_the_field(entry, field, text):
    spec = {"name": "s", "dataset": {"name": "synthetic", "train_size": 1000, "test_size": 200},
            "model": "small_cnn", "attacks": [entry], "defenses": [{"name": "none"}]}
    with pytest.raises(SpecError) as e:
        expand(parse_spec(spec))
    assert field in [f for f, _ in e.value.problems], e.value.problems
    assert text.lower() in str(e.value).lower(), str(e.value)


# -- through the engine -------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", [{"name": "fc", "steps": 3}, {"name": "cba"}, {"name": "cba", "poisoning": "dynamic"},
                                    {"name": "fc", "steps": 2, "victim": "finetune", "finetune_epochs": 1}])
def test_engine_runs_the_attack(tmp_path, attack):
    spec = {"name": "e", "dataset": {"name": "synthetic", "train_size": 300, "test_size": 100},
            "model": "small_cnn", "train": {"epochs": 1}, "seeds": [0], "attacks": [attack],
            "defenses": [{"name": "none"}]}
    (trial,) = expand(parse_spec(spec))
    row = execute(trial, Store(tmp_path)).row
    assert row["status"] == "ok", row["error"]
    assert row["asr"] is not None and row["clean_acc"] is not None


def test_engine_takes_the_dynamic_cba_model_from_prepare_and_reuses_it(tmp_path):
    spec = {"name": "e", "dataset": {"name": "synthetic", "train_size": 300, "test_size": 100},
            "model": "small_cnn", "train": {"epochs": 2}, "seeds": [0],
            "attacks": [{"name": "cba", "poisoning": "dynamic"}],
            "defenses": [{"name": "none"}, {"name": "finetune", "clean_size": 30, "epochs": 1}]}
    store = Store(tmp_path)
    first, second = (execute(t, store).row for t in expand(parse_spec(spec)))
    assert first["status"] == second["status"] == "ok", (first["error"], second["error"])
    assert first["attack_cached"] is False and second["attack_cached"] is True  # trained once, in prepare
    (products,) = (tmp_path / "products").glob("*.json")
    record = json.loads(products.read_text())
    assert len(record["history"]) == 2 and first["attack_seconds"] == pytest.approx(record["seconds"])
