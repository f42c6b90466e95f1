"""Spec expansion and every refusal: a message naming the field, exit code 2, nothing written."""
import copy
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sweep.cli import main
from sweep.spec import SpecError, expand, parse_spec

BASE = {
    "name": "t",
    "dataset": {"name": "synthetic", "train_size": 1000, "test_size": 200},
    "model": "small_cnn",
    "train": {"epochs": 1},
    "seeds": [0, 1],
    "attacks": [{"name": "badnets", "poison_rate": [0.05, 0.1], "target": 0}, {"name": "blend", "poison_rate": 0.1}],
    "defenses": [{"name": "none"}, {"name": "finetune", "clean_size": [100, 500]}],
}


def spec(**changes):
    s = copy.deepcopy(BASE)
    for path, value in changes.items():
        node, keys = s, path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return s


DELETE = object()


def test_expansion_counts_and_ids():
    trials = expand(parse_spec(spec()))
    assert len(trials) == 2 * 3 * 3  # seeds × attack variants × defense variants
    assert len({t.trial_id for t in trials}) == 18
    assert len({t.model_key for t in trials}) == 6  # one backdoored model per (attack variant, seed)
    again = expand(parse_spec(spec()))
    assert [t.trial_id for t in trials] == [t.trial_id for t in again]


def test_interleaved_order_starts_every_model_first():
    trials = expand(parse_spec(spec()))
    assert len({t.model_key for t in trials[:6]}) == 6


def test_defaults_are_resolved_into_the_identity():
    t1 = expand(parse_spec(spec(attacks=[{"name": "badnets"}])))
    t2 = expand(parse_spec(spec(attacks=[{"name": "badnets", "poison_rate": 0.1, "patch_size": 3}])))
    assert {t.trial_id for t in t1} == {t.trial_id for t in t2}
    assert t1[0].attack.params["poison_rate"] == 0.1 and t1[0].attack.params["target"] == 0
    assert t1[0].train["batch_size"] > 0  # model defaults fill what train leaves out


def test_list_typed_parameter_grid():
    one = expand(parse_spec(spec(attacks=[{"name": "badnets", "position": [27, 27]}])))
    two = expand(parse_spec(spec(attacks=[{"name": "badnets", "position": [[27, 27], [0, 0]]}])))
    assert len({t.model_key for t in one}) == 2 and len({t.model_key for t in two}) == 4


def test_one_shot_and_fraction_clean_sizes():
    trials = expand(parse_spec(spec(defenses__1__clean_size=["one_shot", 0.05, 100])))
    assert {t.defense.params.get("clean_size") for t in trials} == {None, "one_shot", 0.05, 100}


REFUSALS = [
    (dict(attacks__0__name="nosuch"), "attacks[0].name", "unknown attack"),
    (dict(defenses__1__name="nosuch"), "defenses[1].name", "unknown defense"),
    (dict(dataset__name="nosuch"), "dataset.name", "unknown dataset"),
    (dict(model="nosuch"), "model", "unknown model"),
    (dict(attacks__0__bogus=1), "attacks[0].bogus", "extra"),
    (dict(defenses__1__bogus=1), "defenses[1].bogus", "extra"),
    (dict(attacks__0__poison_rate=0), "attacks[0].poison_rate", "greater than 0"),
    (dict(attacks__0__poison_rate=1.5), "attacks[0].poison_rate", "less than or equal to 1"),
    (dict(attacks__1__target=10), "attacks[1].target", "not a class"),
    (dict(defenses__1__clean_size=950), "defenses[1].clean_size", "clean pool"),
    (dict(defenses__1__clean_size=1.5), "defenses[1].clean_size", ""),
    (dict(model=DELETE), "model", "missing"),
    (dict(dataset__name=DELETE), "dataset.name", "missing"),
    (dict(attacks=DELETE), "attacks", "missing"),
    (dict(seeds="zero"), "seeds", "list"),
    (dict(train__epochs="many"), "train.epochs", "integer"),
    (dict(dataset__train_size=10**7), "dataset.train_size", "exceeds"),
    (dict(resources={"cpu": 0}), "resources.cpu", "greater than 0"),
    (dict(attacks__0__poison_rate=[]), "attacks[0]", "empty list"),
    (dict(bogus=1), "bogus", "extra"),
    (dict(attacks__0__patch_size=4, attacks__0__position=[30, 30]), "attacks[0]", "does not fit"),
    (dict(attacks__1__image="/no/such/kitty.png"), "attacks[1].image", "file not found"),
]


@pytest.mark.parametrize("changes,field,text", REFUSALS)
def test_refusals_name_the_field(changes, field, text):
    with pytest.raises(SpecError) as e:
        expand(parse_spec(spec(**changes)))
    fields = [f for f, _ in e.value.problems]
    assert field in fields, e.value.problems
    assert text.lower() in str(e.value).lower()


@pytest.mark.parametrize("changes,field,text", REFUSALS[:6])
def test_cli_refuses_with_exit_2_and_writes_nothing(tmp_path, changes, field, text):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec(**changes)))
    results = tmp_path / "results"
    r = CliRunner().invoke(main, ["run", str(p), "--results", str(results)])
    assert r.exit_code == 2, r.output
    assert field in r.output
    assert not results.exists()


@pytest.mark.parametrize("content", ["name: [unclosed", "- just\n- a list\n", ""])
def test_cli_refuses_non_yaml_or_non_mapping(tmp_path, content):
    p = tmp_path / "spec.yaml"
    p.write_text(content)
    r = CliRunner().invoke(main, ["run", str(p), "--results", str(tmp_path / "out")])
    assert r.exit_code == 2 and "spec" in r.output
    assert not (tmp_path / "out").exists()


def test_cli_missing_file(tmp_path):
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "no such file" in r.output


def test_cli_validate_counts(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec()))
    r = CliRunner().invoke(main, ["validate", str(p)])
    assert r.exit_code == 0 and "18 trials, 6 backdoored models" in r.output


def test_all_problems_reported_at_once():
    with pytest.raises(SpecError) as e:
        expand(parse_spec(spec(attacks__0__poison_rate=2, attacks__1__target=99)))
    fields = {f for f, _ in e.value.problems}
    assert {"attacks[0].poison_rate", "attacks[1].target"} <= fields


def test_cli_missing_data_root_is_one_clear_error(tmp_path):
    s = spec(dataset={"name": "cifar10", "root": str(tmp_path / "nowhere"), "train_size": 1000, "download": False})
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(s))
    r = CliRunner().invoke(main, ["run", str(p), "--results", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "dataset:" in r.output and "train/<class>" in r.output  # names the expected layout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("attack,left", [({"name": "badnets"}, 900), ({"name": "wanet"}, 700),
                                         ({"name": "cba", "mix_ratio": 2}, 700),
                                         ({"name": "input_aware"}, 800),
                                         ({"name": "sig", "rate_of": "target_class", "poison_rate": 0.5}, 950)])
def test_the_clean_pool_excludes_an_attacks_noise_mix_and_cross_samples(attack, left):
    """1,000 training images, 10% poisoned: the pool is what neither poisons nor noise samples touched."""
    base = {"name": "s", "dataset": {"name": "synthetic", "train_size": 1000, "test_size": 100},
            "model": "small_cnn", "attacks": [attack]}
    expand(parse_spec({**base, "defenses": [{"name": "finetune", "clean_size": left}]}))  # fits exactly
    with pytest.raises(SpecError, match=rf"defenses\[0\].clean_size.*clean pool \({left} images\)"):
        expand(parse_spec({**base, "defenses": [{"name": "finetune", "clean_size": left + 1}]}))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_spec_validates(path):
    """A committed spec that no longer validates (a renamed or removed parameter) fails here, not on a
    researcher's cluster. Expanding needs no data on disk, but it reads the files a spec names (trigger
    images, checkpoints): the specs that name ../shared/data are checked where it is there (as in CI)."""
    text = path.read_text()
    if "../shared/" in text and not (Path.cwd().parent / "shared/data").is_dir():
        pytest.skip("names files under ../shared/data, which is not beside the working directory")
    trials = expand(parse_spec(yaml.safe_load(text)))
    assert trials and len({t.trial_id for t in trials}) == len(trials)


def test_a_piece_of_a_spec_has_the_whole_specs_trial_ids():
    from sweep.spec import narrow

    whole = parse_spec(spec())
    ids = {t.trial_id for t in expand(whole)}
    piece = expand(narrow(whole, seeds=[1], attacks=["blend"], defenses=["finetune"]))
    assert len(piece) == 2 and {t.trial_id for t in piece} <= ids
    assert {(t.seed, t.attack.name, t.defense.name) for t in piece} == {(1, "blend", "finetune")}
    with pytest.raises(SpecError) as e:
        narrow(whole, seeds=[7], defenses=["ibau"])
    assert [f for f, _ in e.value.problems] == ["--seed", "--defense"]


def test_a_piece_can_pick_one_of_two_entries_of_a_name():
    from sweep.spec import narrow

    raw = spec()
    raw["attacks"] = [{"name": "badnets"}, {"name": "blend"}, {"name": "badnets", "patch_size": 4, "target": 8}]
    whole = parse_spec(raw)
    second = expand(narrow(whole, attacks=["badnets#2"], defenses=["none"]))
    assert {(t.attack.params["patch_size"], t.attack.params["target"]) for t in second} == {(4, 8)}
    assert {t.trial_id for t in second} <= {t.trial_id for t in expand(whole)}
    both = expand(narrow(whole, attacks=["badnets"], defenses=["none"]))
    assert {t.attack.params["target"] for t in both} == {0, 8}
    for bad in ("badnets#3", "badnets#0", "badnets#x", "blend#2"):
        with pytest.raises(SpecError) as e:
            narrow(whole, attacks=[bad])
        assert e.value.problems[0][0] == "--attack" and "#1" in e.value.problems[0][1]


def test_cli_runs_a_piece_and_refuses_an_unknown_one(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec()))
    r = CliRunner().invoke(main, ["run", str(p), "--results", str(tmp_path / "out"), "--seed", "5"])
    assert r.exit_code == 2 and "--seed" in r.output and not (tmp_path / "out").exists()


def test_cli_validate_with_results_says_what_is_left(tmp_path):
    """A spec run in pieces: validate --results counts what is done and what a run would still run and build."""
    from sweep.results import ResultsWriter, schema_for
    from sweep.store import Store
    from sweep.trial import base_row

    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec()))
    trials = expand(parse_spec(spec()))
    res = tmp_path / "res"
    w = ResultsWriter(res, schema_for(trials, res))
    for t, status in zip(trials[:3], ("ok", "ok", "failed")):
        w.add({**base_row(t), "status": status})
    w.close()
    Store(res / "store").save("models", trials[0].model_key, {}, {"metrics": {}})  # one model built
    r = CliRunner().invoke(main, ["validate", str(p), "--results", str(res)])
    assert r.exit_code == 0, r.output
    left = trials[3:]
    keys = {t.model_key for t in left}  # (the spec has no training-time defense: every trial needs its model)
    per = ", ".join(f"{d} {n}" for d, n in Counter(t.defense.name for t in left).most_common())
    assert f"2 ok, 1 failed (run again with --retry-failed), 0 stopped; {len(left)} to run ({per})" in r.output
    assert f"models they need: {int(trials[0].model_key in keys)} in the store, " \
           f"{len(keys) - int(trials[0].model_key in keys)} to build" in r.output
    r = CliRunner().invoke(main, ["validate", str(p), "--results", str(tmp_path / "empty")])
    assert r.exit_code == 0 and f"0 ok, 0 failed, 0 stopped; {len(trials)} to run" in r.output


def test_cli_validate_with_results_says_how_long_the_rest_should_take(tmp_path):
    """Seed 0 done (builds of 100 s; finetune with 100 clean images 30 s, three rows; with 500 images 70 s,
    one row, the two others failed). Seed 1 left: 3 models, 3 finetune trials of each size, 3 none. One at
    a time: 3 x 100 + 3 x 30 + 3 x 70 = 600 s, each variant by its own figure (the name's mean, 40 s, would
    say 540 s). With nothing finished, no estimate."""
    from sweep.results import ResultsWriter, schema_for
    from sweep.trial import base_row

    trials = expand(parse_spec(spec()))
    res = tmp_path / "res"
    w = ResultsWriter(res, schema_for(trials, res))
    big = 0
    for t in trials:
        if t.seed != 0:
            continue
        status, secs = "ok", 0.0
        if t.defense.name == "finetune" and t.defense.params["clean_size"] == 100:
            secs = 30.0
        elif t.defense.name == "finetune":
            status, secs, big = ("ok" if big == 0 else "failed"), 70.0, big + 1
        w.add({**base_row(t), "status": status, "defense_seconds": secs, "attack_seconds": 100.0,
               "attack_cached": t.defense.name != "none"})
    w.close()
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec()))
    r = CliRunner().invoke(main, ["validate", str(p), "--results", str(res)])
    assert r.exit_code == 0, r.output
    assert "expected time, one at a time, by the rows here: 10m00s" in r.output, r.output
    r = CliRunner().invoke(main, ["validate", str(p), "--results", str(tmp_path / "empty")])
    assert "expected time, one at a time, by the rows here: unknown (no finished trial to go by)" in r.output


def test_cli_validate_by_model_gives_each_models_piece_and_time(tmp_path):
    """--by-model: a line per backdoored model with trials left, the flags that run it as a piece, whether
    its model is in the store and how long it should take (a build only where it is not): seed 0 done
    (builds 100 s, finetune 30 s at 100 images, 70 s at 500); seed 1's Blended model in the store (30 + 70 s,
    first), its two BadNets models of the poison-rate grid to build (100 + 30 + 70 s each)."""
    from sweep.results import ResultsWriter, schema_for
    from sweep.store import Store
    from sweep.trial import base_row

    trials = expand(parse_spec(spec()))
    res = tmp_path / "res"
    w = ResultsWriter(res, schema_for(trials, res))
    for t in trials:
        if t.seed == 0:
            secs = {"none": 0.0, "finetune": 30.0 if t.defense.params.get("clean_size") == 100 else 70.0}[t.defense.name]
            w.add({**base_row(t), "status": "ok", "defense_seconds": secs, "attack_seconds": 100.0,
                   "attack_cached": t.defense.name != "none"})
    w.close()
    blend1 = next(t.model_key for t in trials if t.seed == 1 and t.attack.name == "blend")
    Store(res / "store").save("models", blend1, {}, {"metrics": {}})
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec()))
    r = CliRunner().invoke(main, ["validate", str(p), "--results", str(res), "--by-model"])
    assert r.exit_code == 0, r.output
    lines = r.output.split("left by backdoored model")[1].splitlines()[1:]
    assert lines == [
        "    --seed 1 --attack blend: in the store; 3 to run (finetune 2, none 1), 100s",
        "    --seed 1 --attack badnets (poison_rate 0.05): 3 to run (finetune 2, none 1), 3m20s",
        "    --seed 1 --attack badnets (poison_rate 0.1): 3 to run (finetune 2, none 1), 3m20s",
    ], r.output
    r = CliRunner().invoke(main, ["validate", str(p), "--by-model"])
    assert r.exit_code == 2 and "--results" in r.output
