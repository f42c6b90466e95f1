"""The attack suite (trojan_sq, trojan_wm, sig, wanet, lf, multi_target): deterministic triggers in [0, 1],
exact poison counts, clean-label and all-to-all labels, multi-target pairs, WaNet noise samples, and spec
refusals that name the field. Fast: toy tensors only, no training."""
import copy

import pytest
import torch

from attacks import ATTACKS
from kernel.data import Split
from sweep.spec import SpecError, expand, parse_spec
from toys import GRAY, INFO, make, toy_split

torch.set_num_threads(1)

CTX = {"num_classes": 10, "shape": (3, 32, 32)}
NEW = ["trojan_sq", "trojan_wm", "sig", "wanet", "lf", "multi_target"]
DIRTY = ["trojan_sq", "trojan_wm", "wanet", "lf"]  # single-target dirty-label attacks


def changed(a: Split, b: Split):
    """(positions whose image changed, positions whose label changed)."""
    img = (a.x != b.x).flatten(1).any(1).nonzero().flatten()
    lab = (a.y != b.y).nonzero().flatten()
    return img, lab


def test_registered():
    assert set(NEW) <= set(ATTACKS.names())


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("info", [INFO, GRAY])
def test_trigger_deterministic_and_in_range(name, info):
    x = torch.rand(8, *info.shape)
    out = make(name, info=info).apply_trigger(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x), "the trigger changes the image"
    assert torch.equal(make(name, info=info, seed=7).apply_trigger(x), out), "trigger fixed by params, not trial seed"
    # extreme inputs stay in range too
    for v in (0.0, 1.0):
        e = make(name, info=info).apply_trigger(torch.full((2, *info.shape), v))
        assert e.min() >= 0 and e.max() <= 1


@pytest.mark.parametrize("name,params", [("trojan_sq", {"pattern_seed": 1}), ("trojan_sq", {"color": [1, 0, 0]}),
                                         ("trojan_wm", {"scale": 0.5}), ("wanet", {"pattern_seed": 1}),
                                         ("wanet", {"s": 1.0}), ("lf", {"pattern_seed": 1}), ("lf", {"cutoff": 5}),
                                         ("sig", {"frequency": 3}),
                                         ("multi_target", {"pattern_seed": 3, "pairs": [
                                             {"position": "top_left", "target": 1, "pattern": "random"}]})])
def test_trigger_depends_on_its_parameters(name, params):
    x = torch.rand(4, 3, 32, 32)
    assert not torch.equal(make(name, **params).apply_trigger(x), make(name).apply_trigger(x))


@pytest.mark.parametrize("name", DIRTY + ["multi_target"])
@pytest.mark.parametrize("rate", [0.01, 0.1])
def test_poison_changes_exactly_the_requested_samples(name, rate):
    train = toy_split(1000)
    a = make(name, poison_rate=rate)
    p = a.poison(train)
    k = round(rate * len(train))
    assert len(p.indices) == k == len(set(p.indices.tolist()))
    img, lab = changed(train, p.train)
    assert torch.equal(lab, p.indices), "exactly the poisoned samples are relabelled"
    noise = p.noise_indices
    assert torch.equal(img, torch.cat([p.indices, noise]).sort().values), "only poisoned (and noise) images change"
    assert torch.equal(train.y, torch.arange(1000) % 10), "the original split is untouched"
    again = make(name, poison_rate=rate).poison(train)
    assert torch.equal(again.indices, p.indices) and torch.equal(again.train.x, p.train.x)
    assert not torch.equal(make(name, poison_rate=rate, seed=3).poison(train).indices, p.indices)


@pytest.mark.parametrize("name", ["trojan_sq", "trojan_wm"])
def test_trojan_defaults_target_2(name):
    train = toy_split(1000)
    p = make(name).poison(train)
    assert (p.train.y[p.indices] == 2).all() and (train.y[p.indices] != 2).all()
    t = make(name).triggered_test(train)
    assert (t.y_attack == 2).all() and (t.y_true != 2).all() and len(t.y_true) == 900


@pytest.mark.parametrize("name", DIRTY)
def test_all_to_all(name):
    train = toy_split(1000)
    a = make(name, poison_rate=0.2, target="all")
    p = a.poison(train)
    assert len(p.indices) == 200
    assert torch.equal(p.train.y[p.indices], (train.y[p.indices] + 1) % 10)
    t = a.triggered_test(train)
    assert len(t.y_true) == len(train) and torch.equal(t.y_attack, (t.y_true + 1) % 10)


# -- SIG: clean label ------------------------------------------------------------------------------

@pytest.mark.parametrize("rate,rate_of,expected", [(0.05, "train", 50), (0.1, "train", 100),
                                                   (0.5, "target_class", 50), (1.0, "target_class", 100)])
def test_sig_is_clean_label(rate, rate_of, expected):
    train = toy_split(1000)  # 100 images per class
    a = make("sig", poison_rate=rate, rate_of=rate_of, target=4)
    assert a.clean_label
    p = a.poison(train)
    assert len(p.indices) == expected
    img, lab = changed(train, p.train)
    assert len(lab) == 0, "no label changes"
    assert torch.equal(img, p.indices)
    assert (train.y[p.indices] == 4).all(), "only target-class images are poisoned"
    t = a.triggered_test(train)
    assert (t.y_true != 4).all() and (t.y_attack == 4).all() and len(t.y_true) == 900


def test_sig_signal_formula():
    a = make("sig", delta=20, frequency=6)
    out = a.apply_trigger(torch.full((1, 3, 32, 32), 0.5))
    j = torch.arange(32, dtype=torch.float64)
    expect = 0.5 + 20 / 255 * torch.sin(2 * torch.pi * j * 6 / 32)
    assert torch.allclose(out[0, 1, 7], expect.float(), atol=1e-6)
    assert torch.equal(out[0, :, 0], out[0, :, 31]), "the same signal on every row and channel"


def test_sig_too_many_poisons_is_an_error():
    train = toy_split(1000)
    y = train.y.clone()
    y[(train.y == 0).nonzero().flatten()[:50]] = 1  # the target class keeps 50 of its 100 images
    with pytest.raises(ValueError, match="only 50 are eligible"):
        make("sig", poison_rate=0.1).poison(Split(train.x, y))


# -- WaNet: noise mode ------------------------------------------------------------------------------

@pytest.mark.parametrize("rate,cross", [(0.1, 2.0), (0.05, 1.0), (0.1, 0.0), (0.03, 2.5)])
def test_wanet_noise_samples_keep_labels_and_counts_are_exact(rate, cross):
    train = toy_split(1000)
    p = make("wanet", poison_rate=rate, cross_ratio=cross).poison(train)
    k = round(rate * len(train))
    assert len(p.indices) == k and len(p.noise_indices) == round(cross * k)
    assert len(set(p.indices.tolist()) & set(p.noise_indices.tolist())) == 0
    assert torch.equal(p.train.y[p.noise_indices], train.y[p.noise_indices]), "noise samples keep their labels"
    assert (p.train.y[p.indices] == 0).all()
    img, lab = changed(train, p.train)
    assert torch.equal(lab, p.indices)
    assert len(img) == k + round(cross * k)


def test_wanet_warp_is_smooth_and_noise_differs_from_trigger():
    a = make("wanet")
    assert a.grid.shape == (1, 32, 32, 2)
    x = torch.rand(3, 3, 32, 32)
    identity = torch.nn.functional.grid_sample(x, a.identity_grid.expand(3, -1, -1, -1), align_corners=True)
    assert torch.allclose(identity, x, atol=1e-5), "the identity grid reproduces the image"
    noised = a.apply_noise(x, torch.Generator().manual_seed(0))
    assert not torch.allclose(noised, a.apply_trigger(x))
    assert noised.min() >= 0 and noised.max() <= 1


# -- multi-target ----------------------------------------------------------------------------------

def test_multi_target_labels_per_pair():
    train = toy_split(1000)
    pairs = [{"position": "top_left", "target": 5}, {"position": "bottom_right", "target": 7, "pattern": "checkerboard"},
             {"position": [10, 10], "target": 5, "pattern": "black"}]
    a = make("multi_target", poison_rate=0.1, pairs=pairs)
    assert a.counts(1000) == [34, 33, 33]
    p = a.poison(train)
    assert len(p.indices) == 100
    # assign each poisoned sample to the pair whose patch it carries
    seen = {0: 0, 1: 0, 2: 0}
    for i in p.indices.tolist():
        xi = p.train.x[i:i + 1].float() / 255
        hits = [j for j in range(3) if torch.equal(a.apply_pair(xi, j), xi)]
        assert len(hits) == 1, (i, hits)
        j = hits[0]
        seen[j] += 1
        assert p.train.y[i] == a.targets[j] and train.y[i] != a.targets[j]
    assert seen == {0: 34, 1: 33, 2: 33}
    t = a.triggered_test(train)
    assert len(t.y_true) == 900 + 900 + 900
    assert torch.equal(t.y_attack, torch.tensor([5] * 900 + [7] * 900 + [5] * 900))
    assert (t.y_true != t.y_attack).all()


def test_multi_target_default_pairs():
    a = make("multi_target")
    assert a.targets == [0, 1, 2, 3]
    assert a.corners == [(1, 1), (1, 28), (28, 1), (28, 28)]
    flat = [q.flatten() for q in a.patches]
    assert all(not torch.equal(flat[i], flat[j]) for i in range(4) for j in range(i)), "contents differ"
    # training's horizontal flip carries each patch, mirrored, onto the opposite corner of its row:
    # it must not become the patch that lives there
    for i, j in [(0, 1), (2, 3)]:
        assert not torch.equal(a.patches[i].flip(-1), a.patches[j]) and not torch.equal(a.patches[j].flip(-1), a.patches[i])
    assert [p.pattern for p in a.params.pairs] == ["random", "checkerboard", "grid", "random"]
    t = a.triggered_test(toy_split(200))
    assert len(t.y_true) == 4 * 180


# -- validation through the spec ---------------------------------------------------------------------

SPEC = {"name": "t", "dataset": {"name": "synthetic", "train_size": 1000, "test_size": 200}, "model": "small_cnn",
        "train": {"epochs": 1}, "seeds": [0], "attacks": [{"name": "badnets"}], "defenses": [{"name": "none"}]}


def expand_attack(entry):
    s = copy.deepcopy(SPEC)
    s["attacks"] = [entry]
    return expand(parse_spec(s))


def test_every_attack_with_defaults_expands():
    for name in NEW:
        (t,) = expand_attack({"name": name})
        assert t.attack.name == name
        cls = ATTACKS.get(name)
        cls(cls.Params.model_validate(t.attack.params), INFO, 0)  # the resolved params round-trip


def test_every_registered_attack_is_documented_expands_and_is_in_the_cifar10_table_sweep():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "attacks.md").read_text()
    example = yaml.safe_load((root / "examples" / "attacks_cifar10.yaml").read_text())
    in_example = {a["name"] for a in example["attacks"]}
    # The I-BAU release's own triggers (their files are the default) are measured on the release's models
    release = yaml.safe_load((root / "examples" / "ibau_release_cifar10.yaml").read_text())
    in_release = {a["name"] for a in release["attacks"]}
    for name in ATTACKS.names():
        assert f"| `{name}` |" in doc, f"{name} has no row in docs/attacks.md"
        if name in ("l0_inv", "l2_inv"):
            assert name in in_release, f"{name} is missing from examples/ibau_release_cifar10.yaml"
        else:
            assert name in in_example, f"{name} is missing from examples/attacks_cifar10.yaml"
        (t,) = expand_attack({"name": name})
        cls = ATTACKS.get(name)
        cls(cls.Params.model_validate(t.attack.params), INFO, 0)


REFUSALS = [
    ({"name": "sig", "target": "all"}, "attacks[0].target", "clean-label"),
    ({"name": "sig", "poison_rate": 0.2}, "attacks[0]", "rate_of"),
    ({"name": "sig", "delta": 0}, "attacks[0].delta", "greater than 0"),
    ({"name": "sig", "rate_of": "class"}, "attacks[0].rate_of", "train"),
    ({"name": "trojan_sq", "target": 10}, "attacks[0].target", "not a class"),
    ({"name": "trojan_sq", "size": 40}, "attacks[0]", "does not fit"),
    ({"name": "trojan_sq", "color": [2, 0, 0]}, "attacks[0].color", "[0, 1]"),
    ({"name": "trojan_wm", "alpha": 1.5}, "attacks[0].alpha", "less than or equal to 1"),
    ({"name": "trojan_wm", "bogus": 1}, "attacks[0].bogus", "extra"),
    ({"name": "wanet", "k": 1}, "attacks[0].k", "greater than or equal to 2"),
    ({"name": "wanet", "poison_rate": 0.5}, "attacks[0]", "cross_ratio"),
    ({"name": "wanet", "s": -1}, "attacks[0].s", "greater than 0"),
    ({"name": "lf", "epsilon": 0}, "attacks[0].epsilon", "greater than 0"),
    ({"name": "lf", "cutoff": 0}, "attacks[0].cutoff", "greater than or equal to 1"),
    ({"name": "multi_target", "pairs": [{"position": "top_left", "target": 12}]}, "attacks[0].pairs", "not a class"),
    ({"name": "multi_target", "pairs": []}, "attacks[0].pairs", "at least 1"),
    ({"name": "multi_target", "pairs": [{"position": [0, 0], "target": 1}, {"position": [1, 1], "target": 2}]},
     "attacks[0]", "overlap"),
    ({"name": "multi_target", "pairs": [{"position": [30, 30], "target": 1}]}, "attacks[0]", "does not fit"),
    ({"name": "multi_target", "target": 1}, "attacks[0].target", "extra"),
]


@pytest.mark.parametrize("entry,field,text", REFUSALS)
def test_spec_refuses_bad_params_naming_the_field(entry, field, text):
    with pytest.raises(SpecError) as e:
        expand_attack(entry)
    fields = [f for f, _ in e.value.problems]
    assert field in fields, e.value.problems
    assert text.lower() in str(e.value).lower(), str(e.value)


def test_grid_over_multi_target_pairs_and_colour():
    one = expand_attack({"name": "multi_target", "pairs": [{"position": "top_left", "target": 1}]})
    two = expand_attack({"name": "multi_target", "pairs": [[{"position": "top_left", "target": 1}],
                                                           [{"position": "top_right", "target": 2}]]})
    assert len(one) == 1 and len(two) == 2
    assert len(expand_attack({"name": "trojan_sq", "color": [1, 0, 0]})) == 1
    assert len(expand_attack({"name": "sig", "delta": [20, 40]})) == 2
