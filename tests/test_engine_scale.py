"""The engine's parts that keep a 10,000-trial sweep linear and its driver memory flat."""
import json
import time

import pytest
from mlflow.tracking import MlflowClient

from sweep.runner import _Feed, _Sink
from sweep.spec import expand, parse_spec
from sweep.testing import trivial_body
from sweep.tracking import BackgroundTracker, default_uri


def spec(n):
    return parse_spec({"name": "scale", "dataset": {"name": "synthetic", "train_size": 100, "test_size": 100},
                       "model": "small_cnn", "seeds": list(range(n)), "attacks": [{"name": "none"}],
                       "defenses": [{"name": "none"}]})


def test_feed_hands_out_every_trial_once_in_order_and_keeps_no_copy():
    trials = expand(spec(5))
    ids = [t.trial_id for t in trials]
    feed = _Feed(trials)
    got = []
    while (c := feed.suggest(f"t{len(got)}")) != "FINISHED":
        got.append(json.loads(c["trial"])["trial_id"])
    assert got == ids
    assert trials == []  # consumed in place: the driver held each trial once
    assert feed.suggest("again") == "FINISHED"


def test_tune_creates_trials_from_the_feed_in_linear_time():
    """Tune's grid expansion of the trial list is quadratic (10 s for 300 trials on the dev VM); the
    feed is not. 3,000 trials through Tune's own SearchGenerator take well under a second per 1,000."""
    from ray.tune.search import SearchGenerator

    n = 3000
    gen = SearchGenerator(_Feed(expand(spec(n))))
    gen.add_configurations({"scale": {"run": lambda config: None, "num_samples": n, "config": {}}})
    t0 = time.perf_counter()
    made = 0
    while gen.next_trial() is not None:
        made += 1
    assert made == n
    assert time.perf_counter() - t0 < 15  # ~3 s here; the grid took minutes at this size


class _Writer:
    def __init__(self):
        self.rows = []

    def add(self, row):
        self.rows.append(row)
        return True

    def close(self):
        pass


class _Tracker:
    def __init__(self):
        self.logged = []

    def log_many(self, items):
        self.logged += [(row["trial_id"], curves, set(artifacts)) for row, curves, artifacts in items]


def test_sink_records_the_row_and_strips_the_payload_tune_would_keep():
    """Tune keeps every trial's last result to the end: the rows, curves and images must not stay in it."""
    import numpy as np

    (trial,) = expand(spec(1))
    row = trivial_body(trial, None).row
    result = {"row_json": json.dumps(row), "curves_json": json.dumps({"train": [{"epoch": 0, "loss": 1.0}]}),
              "artifacts": {"trigger": np.zeros((3, 4, 4), np.float32)}, "training_iteration": 1}
    sink = _Sink(_Writer(), _Tracker(), total=1, show=False)
    sink.on_trial_result(0, [], None, result)
    assert set(result) == {"training_iteration"}
    assert sink.writer.rows[0]["trial_id"] == trial.trial_id
    assert sink.tracker.logged == [(trial.trial_id, {"train": [{"epoch": 0, "loss": 1.0}]}, {"trigger"})]
    assert sink.finished == 1 and sink.failed == 0


def test_background_tracker_logs_every_row_from_its_own_process(tmp_path):
    uri = default_uri(tmp_path)
    t = BackgroundTracker(uri, "bg", tmp_path, {"name": "bg"})
    t.wait_ready()
    rows = [trivial_body(tr, None).row for tr in expand(spec(3))]
    for r in rows:
        t.log(r, {}, {})
    t.close()
    assert t._proc.returncode == 0
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("bg")
    runs = c.search_runs([exp.experiment_id], "tags.`bdsweep.role` = 'trial'")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(r["trial_id"] for r in rows)
    assert {r.info.status for r in runs} == {"FINISHED"}
    (parent,) = c.search_runs([exp.experiment_id], "tags.`bdsweep.role` = 'sweep'")
    assert parent.info.status == "FINISHED"


def test_background_tracker_bad_uri_is_an_error_before_any_trial(tmp_path):
    t = BackgroundTracker("nosuchscheme://x", "bad", tmp_path)
    with pytest.raises(RuntimeError, match="MLflow tracking could not start"):
        t.wait_ready()


def test_background_tracker_stops_when_the_driver_goes(tmp_path):
    """A killed driver closes the pipe; the MLflow process must exit, not linger."""
    t = BackgroundTracker(default_uri(tmp_path), "gone", tmp_path)
    t.wait_ready()
    t._proc.stdin.close()  # what the kernel does to a SIGKILLed driver's end
    assert t._proc.wait(timeout=30) == 1


def test_a_sweep_in_several_tune_runs_runs_every_trial_once(tmp_path, monkeypatch):
    """Chunks of 3: 7 trials in three Tune runs, one row and one MLflow run each, no Tune folders left."""
    import pandas as pd

    from sweep.runner import run_sweep

    monkeypatch.setenv("BDSWEEP_TUNE_CHUNK", "3")
    s = run_sweep(spec(7), tmp_path / "res", progress=False, body=trivial_body)
    assert (s.trials, s.ran, s.failed) == (7, 7, 0)
    df = pd.read_parquet(tmp_path / "res" / "trials")
    assert sorted(df.seed) == list(range(7)) and df.trial_id.is_unique
    c = MlflowClient(default_uri(tmp_path / "res"))
    exp = c.get_experiment_by_name("scale")
    assert len(c.search_runs([exp.experiment_id], "tags.`bdsweep.role` = 'trial'")) == 7
    assert not [d for d in (tmp_path / "res" / "ray" / "scale").iterdir() if d.is_dir()]


def _read_back(client, exp_id):
    """Every trial run as MLflow's public client reads it: what the UI and users see."""
    out = {}
    for r in client.search_runs([exp_id], "tags.`bdsweep.role` = 'trial'", max_results=1000):
        history = {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)]
                   for k in r.data.metrics}
        tags = {k: v for k, v in r.data.tags.items() if k != "mlflow.parentRunId"}
        out[r.data.tags["trial_id"]] = (r.info.run_name, r.info.status, r.info.end_time - r.info.start_time,
                                        r.data.params, r.data.metrics, history, tags,
                                        r.data.tags["mlflow.parentRunId"] == client.search_runs(
                                            [exp_id], "tags.`bdsweep.role` = 'sweep'")[0].info.run_id)
    return out


def test_bulk_sql_runs_read_back_the_same_as_the_clients_calls(tmp_path):
    """The one-transaction SQL writer and MLflow's own client calls leave runs that MLflow's public
    client cannot tell apart: name, status, duration, params, final metrics, curves as steps, tags,
    parent; searchable by metric; and a failed trial's error."""
    from sweep.tracking import Tracker

    rows = [trivial_body(tr, None).row for tr in expand(spec(3))]
    rows[1].update(status="failed", error="RuntimeError: boom", clean_acc=None, asr=None, robust_acc=None)
    rows[2].update(attack_seconds=12.5, defense_seconds=3.0, asr=0.25)
    curves = {"train": [{"epoch": e, "loss": 2.0 - e, "lr": 0.1} for e in range(3)]}
    seen = {}
    for how in ("client", "sql"):
        t = Tracker(default_uri(tmp_path / how), "bulk", tmp_path / how)
        assert t._sql is not None  # this MLflow's schema is known: the bulk path is used
        if how == "client":
            t._sql = None
        t.log_many([(r, curves, {}) for r in rows])
        t.log_many([(rows[0], curves, {})])  # already logged: skipped, not duplicated
        t.close()
        c = MlflowClient(default_uri(tmp_path / how))
        exp_id = c.get_experiment_by_name("bulk").experiment_id
        seen[how] = _read_back(c, exp_id)
        assert len(c.search_runs([exp_id], "metrics.asr < 0.3")) == 1
    assert seen["sql"] == seen["client"]
    run = seen["sql"][rows[2]["trial_id"]]
    assert run[1] == "FINISHED" and run[2] == 15500 and run[4]["asr"] == 0.25 and run[7]
    assert run[5]["train/loss"] == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert seen["sql"][rows[1]["trial_id"]][1] == "FAILED"
    assert seen["sql"][rows[1]["trial_id"]][6]["error"] == "RuntimeError: boom"
    want = {k: str(v) for k, v in rows[2].items() if k.startswith(("attack.", "defense.")) and v is not None}
    assert run[3] == {**want, "dataset": "synthetic", "model": "small_cnn", "seed": str(rows[2]["seed"])}


def test_bulk_sql_writer_is_used_only_for_a_schema_it_knows(monkeypatch, tmp_path):
    """An MLflow whose tables lack a column the writer fills falls back to the client's calls."""
    from mlflow.store.tracking.dbmodels import models

    from sweep.tracking import Tracker, _SqlRuns

    t = Tracker(default_uri(tmp_path), "schema", tmp_path)
    assert isinstance(t._sql, _SqlRuns)
    monkeypatch.setattr(models.SqlLatestMetric, "__table__", models.SqlParam.__table__)  # no is_nan column
    assert _SqlRuns.for_client(t.client, t.exp_id) is None
