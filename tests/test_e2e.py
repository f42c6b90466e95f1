"""End to end through the real CLI, a local Ray, Parquet and MLflow (small data, 1-2 epochs)."""
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from sweep.cli import main

SPEC = {
    "name": "e2e",
    "dataset": {"name": "synthetic", "train_size": 600, "test_size": 200},
    "model": "small_cnn",
    "train": {"epochs": 2},
    "seeds": [0, 1],
    "attacks": [{"name": "badnets", "poison_rate": [0.05, 0.1]}, {"name": "blend"}],
    "defenses": [{"name": "none"}, {"name": "finetune", "clean_size": 50, "epochs": 1},
                 {"name": "finetune", "clean_size": "one_shot", "epochs": 2, "lr": 1.0e+38}],  # overflows
}


def trial_runs(results):
    c = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = c.get_experiment_by_name("e2e")
    runs = c.search_runs([exp.experiment_id], "tags.`bdsweep.role` = 'trial'", max_results=1000)
    parents = c.search_runs([exp.experiment_id], "tags.`bdsweep.role` = 'sweep'")
    return runs, parents


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    spec = d / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    r = CliRunner().invoke(main, ["run", str(spec), "--results", str(d / "res"), "--quiet"])
    assert r.exit_code == 0, r.output
    return d, r.output


def test_one_row_and_one_run_per_trial(swept):
    d, out = swept
    df = pd.read_parquet(d / "res" / "trials")
    assert len(df) == 2 * 3 * 3 == df.trial_id.nunique()
    needed = {"sweep", "trial_id", "dataset", "model", "attack", "defense", "seed", "status", "error", "clean_acc",
              "asr", "robust_acc", "attack_clean_acc", "attack_asr", "attack_seconds", "defense_seconds",
              "attack.poison_rate", "attack.alpha", "defense.clean_size", "defense.lr"}
    assert needed <= set(df.columns)
    # defense_key: one per defense configuration, the same across attacks and seeds
    per_cfg = df.groupby(["defense", "defense.clean_size", "defense.lr"], dropna=False).defense_key.nunique()
    assert per_cfg.eq(1).all() and df.defense_key.nunique() == len(per_cfg) > 1
    runs, parents = trial_runs(d / "res")
    assert len(runs) == len(df) and len(parents) == 1
    assert {r.data.tags["trial_id"] for r in runs} == set(df.trial_id)
    key = dict(zip(df.trial_id, df.defense_key))  # MLflow can filter runs by defense configuration
    assert all(r.data.tags["defense_key"] == key[r.data.tags["trial_id"]] for r in runs)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs)
    ok = [r for r in runs if r.info.status == "FINISHED"]
    assert ok and all("clean_acc" in r.data.metrics and "attack.poison_rate" in r.data.params or
                      r.data.tags["attack"] == "blend" for r in ok)


def test_backdoored_models_trained_once_and_reused(swept):
    d, _ = swept
    df = pd.read_parquet(d / "res" / "trials")
    assert df.model_key.nunique() == 6
    assert len(list((d / "res" / "store" / "models").glob("*.json"))) == 6
    built = df[df.attack_cached == False]  # noqa: E712
    assert len(built) == 6 and built.model_key.nunique() == 6
    # every trial of a model reports that model's figures before the defense
    assert (df.groupby("model_key").attack_asr.nunique() == 1).all()


def test_diverging_trial_is_a_failed_row_and_the_sweep_goes_on(swept):
    d, _ = swept
    df = pd.read_parquet(d / "res" / "trials")
    failed = df[df.status == "failed"]
    assert len(failed) == 6 and (failed["defense.lr"] == 1e38).all()
    assert failed.error.str.contains("TrainingDiverged").all()
    assert (df[df["defense.lr"] != 1e38].status == "ok").all()
    runs, _ = trial_runs(d / "res")
    assert sum(r.info.status == "FAILED" for r in runs) == 6


def test_report_prints_the_table(swept):
    d, out = swept
    assert "| attack |" in out
    r = CliRunner().invoke(main, ["report", str(d / "res")])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].startswith("| attack | none CA | none ASR |")
    assert any(line.startswith("| badnets(poison_rate=0.05) |") for line in lines)
    assert any(line.startswith("| Average |") for line in lines)
    assert "6 failed trial(s)" in r.output


def test_rerun_is_incremental(swept):
    d, _ = swept
    spec = yaml.safe_load((d / "spec.yaml").read_text())
    spec["seeds"] = [0, 1, 2]
    spec["defenses"] = spec["defenses"][:2]  # drop the diverging defense; its rows stay
    (d / "spec2.yaml").write_text(yaml.safe_dump(spec))
    r = CliRunner().invoke(main, ["run", str(d / "spec2.yaml"), "--results", str(d / "res"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "12 already done, 6 ran" in r.output
    df = pd.read_parquet(d / "res" / "trials")
    assert len(df) == 18 + 6 == df.trial_id.nunique()
    runs, parents = trial_runs(d / "res")
    assert len(runs) == 24 and len(parents) == 1
    assert len(list((d / "res" / "trials").glob("*.parquet"))) == 1
