"""sweep run --time-limit: a run that fits a session or a reservation starts no trial expected to end after
the limit, and the next run takes what it left, each trial once."""
import json

import pandas as pd
import pytest
from click.testing import CliRunner

from sweep.cli import _duration, main
from sweep.runner import EtaEstimator, Gate, _Feed, run_sweep
from sweep.spec import expand, parse_spec
from sweep.testing import trivial_body


class Clock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


class Sink:
    def __init__(self):
        self.dropped = []

    def drop_queued(self, key, defense, n):
        self.dropped.append((key, defense, n))


def _eta():
    """Figures seen: a build takes 100 s, finetune 10 s, abl (training-time) 300 s; model m0 is built."""
    eta = EtaEstimator([("m0", "finetune"), ("m1", "finetune"), ("m0", "abl")], have_models={"m0"},
                       training_time={"abl"})
    eta.own.by_name = {"finetune": [10.0], "abl": [300.0]}
    eta.own.builds = {"m0": 100.0}
    return eta


def test_the_gate_admits_a_trial_only_if_it_is_expected_to_end_in_time():
    clock, sink = Clock(), Sink()
    gate = Gate(150.0, _eta(), sink, clock=clock)
    assert gate.admits("m0", "finetune")  # 10 s, model built
    assert gate.admits("m1", "finetune")  # 100 s build + 10 s
    assert not gate.admits("m0", "abl")  # 300 s: past the limit
    clock.t = 45.0
    assert not gate.admits("m1", "finetune")  # 45 + 110 > 150
    assert gate.admits("m0", "finetune")
    clock.t = 150.0
    assert gate.closed() and not gate.admits("m0", "finetune")
    assert (gate.left, gate.grid_left) == (3, 3)
    assert sink.dropped == [("m0", "abl", 1), ("m1", "finetune", 1), ("m0", "finetune", 1)]  # off the ETA
    assert not gate.fits("m0", "finetune") and gate.left == 3  # a search counts its own


def test_a_trial_with_no_estimate_yet_starts_while_the_deadline_is_ahead():
    gate = Gate(10.0, EtaEstimator([("m0", "ibau")]), clock=Clock(9.0))
    assert gate.admits("m0", "ibau")


def test_the_feed_skips_what_does_not_fit_and_hands_out_what_does():
    trials = expand(parse_spec({
        "name": "gate", "dataset": {"name": "synthetic", "train_size": 100, "test_size": 100},
        "model": "small_cnn", "attacks": [{"name": "badnets"}],
        "defenses": [{"name": "abl"}, {"name": "finetune"}]}))
    key = trials[0].model_key
    eta = _eta()
    eta.own.by_name = {"finetune": [10.0], "abl": [300.0]}
    eta.have_models = {key}
    gate = Gate(100.0, eta, clock=Clock())
    feed = _Feed(list(trials), gate)
    got = json.loads(feed.suggest("t0")["trial"])
    assert got["defense"]["name"] == "finetune"  # abl (300 s) skipped, not waited on
    assert feed.suggest("t1") == "FINISHED" and gate.left == 1


@pytest.mark.parametrize("text,seconds", [("90m", 5400), ("2h30m", 9000), ("1.5h", 5400), ("3600", 3600),
                                          ("45s", 45), ("1d", 86400)])
def test_durations(text, seconds):
    assert _duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0"])
def test_a_bad_duration_is_refused_naming_the_option(tmp_path, text):
    r = CliRunner().invoke(main, ["run", "spec.yaml", "--results", str(tmp_path), "--time-limit", text])
    assert r.exit_code == 2 and "--time-limit" in r.output, r.output


def test_a_run_past_its_limit_leaves_every_trial_to_the_next_run_and_that_run_takes_each_once(tmp_path):
    spec = parse_spec({"name": "limit", "dataset": {"name": "synthetic", "train_size": 100, "test_size": 100},
                       "model": "small_cnn", "seeds": [0, 1, 2], "attacks": [{"name": "none"}],
                       "defenses": [{"name": "none"}, {"name": "finetune"}]})
    first = run_sweep(spec, tmp_path / "res", progress=False, body=trivial_body, time_limit=1e-6)
    assert (first.trials, first.ran, first.left, first.skipped) == (6, 0, 6, 0)
    assert not (tmp_path / "res" / "trials").exists() or pd.read_parquet(tmp_path / "res" / "trials").empty
    second = run_sweep(spec, tmp_path / "res", progress=False, body=trivial_body)
    assert (second.ran, second.left, second.skipped) == (6, 0, 0)
    df = pd.read_parquet(tmp_path / "res" / "trials")
    assert len(df) == 6 and df.trial_id.is_unique


def test_a_piece_is_gated_from_its_first_trial_by_the_rows_of_the_pieces_before_it(tmp_path):
    """Seed 0 ran earlier: its finetune at 5 epochs took 1,000 s, at 1 epoch 1 s (the rows say so). The
    seed-1 piece with a 100 s limit starts the short variant and leaves the long one, before any trial of
    its own has finished: the estimate is the variant's (the name's mean, 500 s, would leave both), and it
    exists from the start (no estimate at all would start the long one)."""
    from sweep.results import load
    from sweep.spec import narrow

    spec = parse_spec({"name": "pieces", "dataset": {"name": "synthetic", "train_size": 100, "test_size": 100},
                       "model": "small_cnn", "seeds": [0, 1], "attacks": [{"name": "none"}],
                       "defenses": [{"name": "finetune", "epochs": [5, 1]}]})
    res = tmp_path / "res"
    run_sweep(narrow(spec, seeds=[0]), res, progress=False, body=trivial_body)
    df = load(res)
    df["defense_seconds"] = [1000.0 if e == 5 else 1.0 for e in df["defense.epochs"]]
    df["attack_seconds"], df["attack_cached"] = 0.0, True
    import shutil
    shutil.rmtree(res / "trials")
    (res / "trials").mkdir()
    df.to_parquet(res / "trials" / "part-0.parquet")
    second = run_sweep(narrow(spec, seeds=[1]), res, progress=False, body=trivial_body, time_limit=100.0)
    assert (second.ran, second.left) == (1, 1)
    ran = load(res).query("seed == 1")
    assert list(ran["defense.epochs"]) == [1]
    assert ran.defense_key.notna().all() and ran.defense_key.nunique() == 1
