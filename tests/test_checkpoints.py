"""Bring your own backdoored model: checkpoints read with weights_only in every usual layout, refused with
a named field when they do not fit, the released I-BAU models and triggers, the papers' test-split clean
set, and such trials through the engine."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from kernel.checkpoint import CheckpointError, fit_state, load_checkpoint, read_state
from kernel.models import create_model
from sweep.cli import main
from sweep.spec import SpecError, expand, parse_spec
from sweep.store import Store
from sweep.trial import execute, split_test
from toys import INFO, make, toy_split

pytestmark = pytest.mark.usefixtures("one_thread")

RELEASE = Path(__file__).resolve().parents[2] / "shared/data/ibau-cifar10"
needs_release = pytest.mark.skipif(not (RELEASE / "badnets_8_02_ckpt.pth").is_file(),
                                   reason="the I-BAU release is not in ../shared/data/ibau-cifar10")


def _authors_vgg_state(seed=0) -> dict:
    """A state dict keyed as the I-BAU authors' VGG('small_VGG16') saves it (features.*, classifier.*)."""
    torch.manual_seed(seed)
    net = create_model("vgg_small", 10, 3, 0.0, 1.0).net
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_vgg_small_has_the_authors_layer_names():
    keys = list(_authors_vgg_state())
    convs = [k for k in keys if k.endswith(".weight") and k.startswith("features.")]
    assert convs[:3] == ["features.0.weight", "features.1.weight", "features.3.weight"]  # conv, BN, conv
    assert {"features.19.bias", "features.20.running_var", "classifier.weight", "classifier.bias"} <= set(keys)
    m = create_model("vgg_small", 10)
    assert m.fc is m.net.classifier  # the name defenses use


@pytest.mark.parametrize("layout", ["plain", "net", "state_dict", "module", "nested", "ours"])
def test_every_usual_layout_loads(tmp_path, layout):
    state = _authors_vgg_state(seed=1)
    obj = {"plain": state, "net": {"net": state, "acc": 84.5, "epoch": 48}, "state_dict": {"state_dict": state},
           "module": {"module." + k: v for k, v in state.items()},
           "nested": {"model": {"state_dict": state}}}.get(layout)
    if layout == "ours":  # a model of this project, normalisation buffers included
        m = create_model("vgg_small", 10, 3, 0.0, 1.0)
        m.net.load_state_dict(state)
        obj = m.state_dict()
    path = tmp_path / "m.pth"
    torch.save(obj, path)
    model = load_checkpoint(create_model("vgg_small", 10, 3, 0.0, 1.0), path)
    for k, v in state.items():
        assert torch.equal(model.state_dict()["net." + k], v), k


def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"net": _authors_vgg_state(), "hook": Path("/tmp")}, path)  # an object: a global to call
    with pytest.raises(CheckpointError, match="more than tensors"):
        read_state(path)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        read_state(tmp_path / "junk.pth")
    torch.save({"acc": 1.0, "epoch": 3}, tmp_path / "nostate.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state(tmp_path / "nostate.pth")


def test_a_mismatch_names_missing_and_unexpected_keys_and_the_first_shape():
    model = create_model("vgg_small", 10, 3, 0.0, 1.0)
    torch.manual_seed(0)
    small = create_model("small_cnn", 10).net.state_dict()
    with pytest.raises(CheckpointError) as e:
        fit_state(model, small)
    msg = str(e.value)
    assert "missing keys [features.0.weight" in msg and "unexpected keys [features.0.0.weight" in msg
    wrong = _authors_vgg_state()
    wrong["classifier.weight"] = torch.zeros(43, 2048)
    with pytest.raises(CheckpointError, match=r"first shape that differs: net.classifier.weight is \[43, 2048\]"):
        fit_state(model, wrong)


def test_a_normalisation_the_file_carries_must_agree_with_the_spec():
    ours = create_model("vgg_small", 10, 3, 0.5, 0.25).state_dict()
    with pytest.raises(CheckpointError, match="normalize"):
        fit_state(create_model("vgg_small", 10, 3, 0.0, 1.0), ours)


# -- the spec ------------------------------------------------------------------------------------------

def _spec(tmp_path, ckpt_state=None, **changes) -> dict:
    ckpt = tmp_path / "model.pth"
    if not ckpt.exists():
        torch.manual_seed(0)
        torch.save({"net": ckpt_state or create_model("small_cnn", 10).net.state_dict()}, ckpt)
    s = {"name": "byo", "dataset": {"name": "synthetic", "train_size": 400, "test_size": 200},
         "model": {"name": "small_cnn", "normalize": "none"}, "seeds": [0, 1],
         "attacks": [{"name": "badnets", "checkpoint": str(ckpt)}],
         "defenses": [{"name": "none"}, {"name": "finetune", "clean_size": 50, "epochs": 1}]}
    s.update(copy.deepcopy(changes))
    return s


def test_a_checkpoint_spec_expands_and_its_key_is_the_file(tmp_path):
    trials = expand(parse_spec(_spec(tmp_path)))
    assert len(trials) == 4 and all(t.checkpoint and len(t.checkpoint["sha256"]) == 64 for t in trials)
    assert trials[0].normalize == {"mean": [0.0] * 3, "std": [1.0] * 3}
    same = expand(parse_spec(_spec(tmp_path, train={"epochs": 7})))  # training settings make no checkpoint
    assert [t.trial_id for t in same] == [t.trial_id for t in trials]
    torch.save({"net": create_model("small_cnn", 10).net.state_dict()}, tmp_path / "model.pth")  # new weights
    assert {t.model_key for t in expand(parse_spec(_spec(tmp_path)))}.isdisjoint({t.model_key for t in trials})


def test_validate_counts_checkpoint_files_apart_from_models_to_train(tmp_path):
    s = _spec(tmp_path)
    s["attacks"].append({"name": "blend"})  # trained by the engine
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(s))
    r = CliRunner().invoke(main, ["validate", str(p)])
    assert r.exit_code == 0, r.output
    assert "8 trials, 4 backdoored models (2 to train, 1 checkpoint file(s) read and measured once per seed)" \
        in r.output


def test_default_specs_keep_their_trial_ids(tmp_path):
    """normalize, clean_from and checkpoint enter a trial's identity only when used."""
    base = {"name": "t", "dataset": {"name": "synthetic", "train_size": 400}, "model": "small_cnn",
            "attacks": [{"name": "badnets"}], "defenses": [{"name": "none"}]}
    t = expand(parse_spec(base))[0]
    assert t.as_dict().keys() == {"sweep", "trial_id", "model_key", "dataset", "model", "train", "seed",
                                  "attack", "defense"}
    assert "clean_from" not in t.dataset
    explicit = expand(parse_spec({**base, "model": {"name": "small_cnn", "normalize": "dataset"},
                                  "dataset": {**base["dataset"], "clean_from": "train"}}))[0]
    assert explicit.trial_id == t.trial_id


@pytest.mark.parametrize("change,field,text", [
    ({"model": {"name": "vgg_small", "normalize": "none"}}, "attacks[0].checkpoint", "missing keys"),
    ({"model": "small_cnn"}, "attacks[0].checkpoint", None),  # fits: no problem (control)
    ({"defenses": [{"name": "abl"}]}, "defenses[0]", "poisoned_data: true"),
    ({"attacks": [{"name": "trojannn", "checkpoint": "X"}]}, "attacks[0].checkpoint", "computes its trigger"),
    ({"attacks": [{"name": "badnets", "checkpoint": "/nonexistent.pth"}]}, "attacks[0].checkpoint", "not found"),
    ({"attacks": [{"name": "badnets", "checkpoint": {"path": "X", "bogus": 1}}]}, "attacks[0].checkpoint.bogus",
     "Extra inputs"),
    ({"dataset": {"name": "synthetic", "test_size": 200, "clean_from": "test", "clean_pool": 200}},
     "dataset.clean_pool", "leaves none"),
    ({"dataset": {"name": "synthetic", "test_size": 200, "clean_from": "test", "clean_pool": 40}},
     "defenses[1].clean_size", "clean_pool of test images"),
])
def test_refusals_name_the_field(tmp_path, change, field, text):
    s = _spec(tmp_path, **change)
    real = str(tmp_path / "model.pth")  # "X" stands for the checkpoint _spec wrote
    for a in s["attacks"]:
        c = a.get("checkpoint")
        a["checkpoint"] = real if c == "X" else ({**c, "path": real} if isinstance(c, dict) else c)
    if text is None:
        expand(parse_spec(s))
        return
    with pytest.raises(SpecError) as e:
        expand(parse_spec(s))
    assert field in [f for f, _ in e.value.problems], e.value.problems
    assert text in str(e.value)


def test_abl_runs_on_a_checkpoint_the_user_says_was_trained_on_the_poisoned_set(tmp_path):
    s = _spec(tmp_path, defenses=[{"name": "abl"}])
    s["attacks"][0]["checkpoint"] = {"path": s["attacks"][0]["checkpoint"], "poisoned_data": True}
    assert len(expand(parse_spec(s))) == 2


def test_cli_refuses_a_mismatched_checkpoint_with_exit_2_and_writes_nothing(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(_spec(tmp_path, model={"name": "vgg_small", "normalize": "none"})))
    results = tmp_path / "results"
    r = CliRunner().invoke(main, ["run", str(p), "--results", str(results)])
    assert r.exit_code == 2, r.output
    assert "attacks[0].checkpoint" in r.output and "unexpected keys" in r.output and "missing keys" in r.output
    assert not results.exists()


# -- the papers' clean-set protocol ---------------------------------------------------------------------

def test_the_test_split_protocol_sets_a_fixed_stratified_pool_apart():
    from kernel.data import load_dataset

    ds = load_dataset("synthetic", train_size=200, test_size=400)
    rest, pool = split_test(ds, {"clean_from": "test", "clean_pool": 100})
    assert len(pool) == 100 and len(rest.test) == 300
    assert torch.bincount(pool.y, minlength=10).tolist() == [10] * 10  # stratified
    both = torch.cat([pool.x.flatten(1), rest.test.x.flatten(1)])
    assert len(torch.unique(both, dim=0)) == 400  # disjoint, and together the whole test split
    again = split_test(ds, {"clean_from": "test", "clean_pool": 100})[1]
    assert torch.equal(again.x, pool.x)  # the same for every trial and seed
    assert split_test(ds, {})[1] is None and split_test(ds, {})[0] is ds


def test_a_checkpoint_trial_through_the_engine(tmp_path):
    """The model is read, not trained; attack_* and CA are measured on the held-out test images only; the
    defender's clean set comes from the test pool; the rows say so."""
    from kernel.data import load_dataset
    from kernel.metrics import evaluate

    torch.manual_seed(3)
    net = create_model("small_cnn", 10, 3, 0.0, 1.0)
    s = _spec(tmp_path, ckpt_state=net.net.state_dict(),
              dataset={"name": "synthetic", "train_size": 400, "test_size": 200, "clean_from": "test",
                       "clean_pool": 100})
    trials = expand(parse_spec(s))
    rows = [execute(t, Store(tmp_path / "store")).row for t in trials]
    assert [r["status"] for r in rows] == ["ok"] * 4, [r["error"] for r in rows]
    assert {r["clean_from"] for r in rows} == {"test"} and rows[0]["checkpoint"].endswith("model.pth")
    assert rows[0]["attack_seconds"] == 0 or rows[0]["attack_seconds"] < 5  # nothing trained
    ds = load_dataset("synthetic", train_size=400, test_size=200)
    rest, _ = split_test(ds, trials[0].dataset)
    attack = make("badnets", info=ds.info)
    want = evaluate(net.eval(), rest.test.x, rest.test.y, attack.triggered_test(rest.test))
    none = next(r for r in rows if r["defense"] == "none" and r["seed"] == 0)
    assert none["attack_clean_acc"] == pytest.approx(want["clean_acc"])
    assert none["clean_acc"] == pytest.approx(want["clean_acc"]) and none["asr"] == pytest.approx(want["asr"])
    store = Store(tmp_path / "store")
    record = store.load_record("models", trials[0].model_key)
    assert record["checkpoint"]["path"].endswith("model.pth") and record["history"] == []


# -- the released triggers -----------------------------------------------------------------------------

def test_image_triggers_add_and_clip_as_the_authors_patching(tmp_path):
    x = toy_split(8).x.float() / 255
    pattern = torch.zeros(3, 32, 32)
    pattern[:, 20:30, 20:30] = 0.6
    mask = (pattern > 0).float()
    for name in ("trojan_sq", "trojan_wm", "l2_inv"):
        a = make(name, image="unused.png")
        a.files = {"image": pattern}
        assert torch.equal(a.apply_trigger(x), (x + pattern).clamp(0, 1)), name
    cls = __import__("attacks").ATTACKS.get("l0_inv")
    a = cls(cls.Params(image="i.png", mask="m.npy"), INFO, 0, files={"image": pattern, "mask": mask})
    out = a.apply_trigger(x)
    assert torch.equal(out, (x * (1 - mask) + pattern).clamp(0, 1))
    assert torch.equal(out[:, :, :20], x[:, :, :20])  # off the mask the image is untouched


def test_the_released_files_are_the_default_and_a_missing_one_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("BDSWEEP_IBAU_TRIGGERS", str(tmp_path))
    s = {"name": "t", "dataset": {"name": "synthetic"}, "model": "small_cnn",
         "attacks": [{"name": "l0_inv"}, {"name": "l2_inv"}], "defenses": [{"name": "none"}]}
    with pytest.raises(SpecError) as e:
        expand(parse_spec(s))
    assert {"attacks[0].image", "attacks[0].mask", "attacks[1].image"} <= {f for f, _ in e.value.problems}
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "l2_inv.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "l0_inv.png")
    np.save(tmp_path / "mask.npy", np.zeros((3, 32, 32), np.float32))
    t = expand(parse_spec(s))
    assert t[0].attack.params["mask"] == str(tmp_path / "mask.npy")
    assert t[1].attack.params["image"] == str(tmp_path / "l2_inv.png")


@needs_release
def test_the_released_models_load_and_carry_their_backdoors():
    """The I-BAU authors' five CIFAR-10 models in our vgg_small with raw [0, 1] inputs, their own triggers
    read from the release: each is a working classifier whose trigger sends most inputs to its target."""
    from kernel.data import read_array, read_image
    from kernel.train import predict

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g) * 0.8  # inputs off the target decide nothing on their own
    trig = RELEASE / "triggers"
    files = {"badnets": {}, "trojan_sq": {"image": read_image(str(trig / "trojan_sq.png"), (3, 32, 32))},
             "trojan_wm": {"image": read_image(str(trig / "trojan_wm.png"), (3, 32, 32))},
             "l2_inv": {"image": read_image(str(trig / "l2_inv.png"), (3, 32, 32))},
             "l0_inv": {"image": read_image(str(trig / "l0_inv.png"), (3, 32, 32)),
                        "mask": read_array(str(trig / "mask.npy"), (3, 32, 32))}}
    params = {"badnets": dict(patch_size=4, position=[27, 27], pattern="white", target=8),
              "trojan_sq": dict(target=2, image="x"), "trojan_wm": dict(target=2, image="x"), "l2_inv": {},
              "l0_inv": {}}
    ckpts = {"badnets": "badnets_8_02", "trojan_sq": "trojan_sq_2_02", "trojan_wm": "trojan_wm_2_02",
             "l0_inv": "l0_inv_0_02", "l2_inv": "l2_inv_0_02"}
    from attacks import ATTACKS

    for name, stem in ckpts.items():
        model = load_checkpoint(create_model("vgg_small", 10, 3, 0.0, 1.0), RELEASE / f"{stem}_ckpt.pth")
        cls = ATTACKS.get(name)
        attack = cls(cls.Params(**params[name]), INFO, 0, files=files[name])
        target = attack.params.target
        hit = (predict(model, attack.apply_trigger(x)) == target).float().mean().item()
        assert hit > 0.9, (name, hit)


def test_the_trained_dropout_rate_holds_for_the_defense_and_a_checkpoint_keeps_its_own(tmp_path, monkeypatch):
    """A model the engine trained without dropout (the full-data recipe's ``dropout: 0``) reaches the
    defense with its dropout off, so a fine-tuning defense does not switch it on; a user's checkpoint keeps
    the architecture's rates (its authors trained with them)."""
    from defenses import DEFENSES

    seen = []
    cls = DEFENSES.get("finetune")
    apply = cls.apply

    def spy(self, model, ctx):
        seen.append(sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}))
        return apply(self, model, ctx)

    monkeypatch.setattr(cls, "apply", spy)
    base = {"name": "drop", "dataset": {"name": "synthetic", "train_size": 200, "test_size": 100},
            "seeds": [0], "train": {"epochs": 1, "batch_size": 64, "dropout": 0.0},
            "defenses": [{"name": "finetune", "clean_size": 50, "epochs": 1}]}
    trained = {**base, "model": "vgg_small", "attacks": [{"name": "badnets"}]}
    ckpt = tmp_path / "authors.pth"
    torch.save({"net": _authors_vgg_state()}, ckpt)
    theirs = {**base, "model": {"name": "vgg_small", "normalize": "none"},
              "attacks": [{"name": "badnets", "checkpoint": str(ckpt)}]}
    for spec in (trained, theirs):
        rows = [execute(t, Store(tmp_path / "store")).row for t in expand(parse_spec(spec))]
        assert [r["status"] for r in rows] == ["ok"], [r["error"] for r in rows]
    assert seen == [[0.0], [0.3, 0.4]]
