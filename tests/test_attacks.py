"""Triggers and poisoning: exact counts, labels, determinism, valid range."""
import pytest
import torch

from attacks import ATTACKS
from toys import INFO, make, toy_split



def test_registry_names():
    assert {"none", "badnets", "blend"} <= set(ATTACKS.names())


@pytest.mark.parametrize("name", ["badnets", "blend"])
@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_poison_exact_count_and_labels_all_to_one(name, rate):
    train = toy_split(1000)
    a = make(name, poison_rate=rate, target=3)
    p = a.poison(train)
    k = round(rate * len(train))
    assert len(p.indices) == k == len(set(p.indices.tolist()))
    assert (train.y[p.indices] != 3).all(), "all-to-one poisons only samples whose label changes"
    assert (p.train.y[p.indices] == 3).all()
    untouched = torch.ones(len(train), dtype=torch.bool)
    untouched[p.indices] = False
    assert torch.equal(p.train.y[untouched], train.y[untouched])
    assert torch.equal(p.train.x[untouched], train.x[untouched])
    assert not torch.equal(p.train.x[p.indices], train.x[p.indices])
    # the original split is not modified in place
    assert torch.equal(train.y, torch.arange(1000) % 10)


def test_all_to_all_labels():
    train = toy_split(1000)
    a = make("badnets", poison_rate=0.2, target="all")
    p = a.poison(train)
    assert torch.equal(p.train.y[p.indices], (train.y[p.indices] + 1) % 10)
    t = a.triggered_test(train)
    assert len(t.y_true) == len(train)  # no input already has its attack label
    assert torch.equal(t.y_attack, (t.y_true + 1) % 10)


def test_triggered_test_excludes_target_class():
    test = toy_split(200)
    t = make("badnets", target=8).triggered_test(test)
    assert (t.y_true != 8).all() and (t.y_attack == 8).all()
    assert len(t.y_true) == 180


@pytest.mark.parametrize("name", ["badnets", "blend"])
def test_deterministic_for_a_seed(name):
    train = toy_split(1000)
    p1, p2 = make(name, seed=5).poison(train), make(name, seed=5).poison(train)
    assert torch.equal(p1.indices, p2.indices) and torch.equal(p1.train.x, p2.train.x)
    p3 = make(name, seed=6).poison(train)
    assert not torch.equal(p1.indices, p3.indices)


@pytest.mark.parametrize("name,params", [("badnets", {}), ("badnets", {"pattern": "white"}),
                                         ("badnets", {"pattern": "checkerboard"}), ("badnets", {"patch_size": 5}),
                                         ("badnets", {"pattern": "random"}), ("blend", {"alpha": 1.0})])
def test_trigger_keeps_valid_range(name, params):
    x = torch.rand(16, 3, 32, 32)
    out = make(name, **params).apply_trigger(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(make(name, **params).apply_trigger(x), out)


def test_badnets_patch_position_and_size():
    x = torch.zeros(2, 3, 32, 32)
    out = make("badnets", patch_size=4, position=[27, 27], pattern="white").apply_trigger(x)
    assert out[:, :, 27:31, 27:31].eq(1).all()
    assert out.sum() == 2 * 3 * 16
    br = make("badnets", pattern="white").apply_trigger(x)
    assert br[:, :, 29:, 29:].eq(1).all() and br.sum() == 2 * 3 * 9


def test_badnets_default_is_abls_grid_trigger():
    """ABL/NAD's gridTrigger: img[31][31]=255, img[31][30]=0, img[31][29]=255, img[30][31]=0, img[30][30]=255,
    img[30][29]=0, img[29][31]=255, img[29][30]=0, img[29][29]=0 (row, col), all channels; nothing else."""
    x = torch.full((2, 3, 32, 32), 0.5)
    out = make("badnets").apply_trigger(x)
    want = {(31, 31): 1, (31, 30): 0, (31, 29): 1, (30, 31): 0, (30, 30): 1, (30, 29): 0,
            (29, 31): 1, (29, 30): 0, (29, 29): 0}
    for (r, c), v in want.items():
        assert out[:, :, r, c].eq(v).all(), (r, c)
    out[:, :, 29:, 29:] = 0.5
    assert torch.equal(out, x)
    big = make("badnets", patch_size=5).apply_trigger(x)[0, 0, 27:, 27:]
    assert torch.equal(big[-3:, -3:], torch.tensor([[0., 0., 1.], [0., 1., 0.], [1., 0., 1.]]))


def test_badnets_patch_must_fit():
    with pytest.raises(ValueError, match="does not fit"):
        make("badnets", patch_size=4, position=[30, 30])


def test_blend_formula_and_noise_is_fixed_across_trial_seeds():
    x = torch.rand(4, 3, 32, 32)
    a, b = make("blend", alpha=0.2, seed=0), make("blend", alpha=0.2, seed=9)
    assert torch.allclose(a.apply_trigger(x), 0.8 * x + 0.2 * a.pattern)
    assert torch.equal(a.pattern, b.pattern), "the trigger is fixed by pattern_seed, not the trial seed"


def test_params_validation():
    cls = ATTACKS.get("badnets")
    ctx = {"context": {"num_classes": 10}}
    for bad in ({"poison_rate": 0}, {"poison_rate": 1.5}, {"target": 10}, {"target": "some"}, {"size": 3}):
        with pytest.raises(Exception):
            cls.Params.model_validate(bad, **ctx)
    assert cls.Params.model_validate({"target": "all"}, **ctx).target == "all"


def test_too_many_poisons_is_an_error():
    with pytest.raises(ValueError, match="eligible"):
        make("badnets", poison_rate=0.95).poison(toy_split(1000))


def test_none_attack_has_no_trigger():
    train = toy_split(1000)
    a = make("none")
    p = a.poison(train)
    assert len(p.indices) == 0 and a.triggered_test(train) is None


def test_blend_with_an_image_file(tmp_path):
    from PIL import Image

    from kernel.data import read_image

    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "t.png")
    img = read_image(str(tmp_path / "t.png"), (3, 32, 32))
    assert img.shape == (3, 32, 32) and img[0].eq(1).all() and img[1:].eq(0).all()
    cls = ATTACKS.get("blend")
    a = cls(cls.Params(image=str(tmp_path / "t.png"), alpha=0.5), INFO, 0, files={"image": img})
    out = a.apply_trigger(torch.zeros(1, 3, 32, 32))
    assert torch.allclose(out[0, 0], torch.full((32, 32), 0.5)) and out[0, 1:].eq(0).all()


def test_engine_reads_the_files_an_attack_names(tmp_path):
    from PIL import Image

    from sweep.trial import _load_files

    Image.new("RGB", (32, 32), (0, 255, 0)).save(tmp_path / "g.png")
    files = _load_files(ATTACKS.get("blend"), {"image": str(tmp_path / "g.png"), "alpha": 0.2}, INFO)
    assert set(files) == {"image"} and files["image"][1].eq(1).all()
    assert _load_files(ATTACKS.get("blend"), {"image": None}, INFO) == {}
