"""Faults at cluster scale, on real Ray: a worker node lost mid-sweep; the driver SIGKILLed mid-sweep."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from sweep.runner import run_sweep
from sweep.spec import parse_spec


def _rows(results: Path) -> pd.DataFrame:
    return pd.read_parquet(results / "trials")


def test_worker_node_lost_mid_sweep_every_trial_finishes_once(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from sweep.testing import sleepy_body

    if ray.is_initialized():  # an earlier test's local Ray
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    spec = parse_spec({"name": "nodeloss", "dataset": {"name": "synthetic", "train_size": 100, "test_size": 100},
                       "model": "small_cnn", "seeds": list(range(12)), "attacks": [{"name": "none"}],
                       "defenses": [{"name": "none"}]})
    results = tmp_path / "res"
    done = {}
    t = threading.Thread(target=lambda: done.update(s=run_sweep(spec, results, progress=False, body=sleepy_body)))
    try:
        t.start()
        deadline = time.time() + 120
        # remove the worker while trials run on it (3 at once: 1 on the head, 2 on the worker)
        while time.time() < deadline and ray.available_resources().get("CPU", 0) > 0:
            time.sleep(0.1)
        time.sleep(0.5)
        cluster.remove_node(worker)
        t.join(300)
        assert not t.is_alive()
    finally:
        ray.shutdown()
        cluster.shutdown()
    df = _rows(results)
    assert len(df) == 12 == df.trial_id.nunique()
    assert (df.status == "ok").all(), df[["seed", "status", "error"]]
    assert done["s"].ran == 12


def test_two_trials_on_two_nodes_build_their_shared_model_once(tmp_path, monkeypatch):
    """Two trials that need the same backdoored model start at once on two nodes: one trains it, the other
    waits on the store's Ray lease and loads it."""
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("BDSWEEP_STORE_LOCK", "lease")  # the lock a cluster's shared store uses
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    spec = parse_spec({"name": "once", "dataset": {"name": "synthetic", "train_size": 2000, "test_size": 200},
                       "model": "small_cnn", "train": {"epochs": 8}, "attacks": [{"name": "badnets"}],
                       "defenses": [{"name": "none"}, {"name": "finetune", "clean_size": 50, "epochs": 1}]})
    try:
        s = run_sweep(spec, tmp_path / "res", progress=False)
        ray.get_actor("bdsweep-store-leases", namespace="bdsweep")  # the builds went through leases
    finally:
        ray.shutdown()
        cluster.shutdown()
    df = _rows(tmp_path / "res")
    assert s.ran == 2 and (df.status == "ok").all(), df[["defense", "status", "error"]]
    assert df.model_key.nunique() == 1
    assert sorted(df.attack_cached) == [False, True]  # built by one trial, loaded by the other
    builder, waiter = df[~df.attack_cached.astype(bool)].iloc[0], df[df.attack_cached.astype(bool)].iloc[0]
    build_end = pd.Timestamp(builder.started_at) + pd.Timedelta(seconds=builder.attack_seconds)
    assert pd.Timestamp(waiter.started_at) < build_end  # it asked while the model was being trained


SPEC = {
    "name": "killed",
    "dataset": {"name": "synthetic", "train_size": 600, "test_size": 200},
    "model": "small_cnn",
    "train": {"epochs": 2},
    "seeds": [0, 1, 2],
    "attacks": [{"name": "badnets"}, {"name": "blend"}],
    "defenses": [{"name": "none"}, {"name": "finetune", "clean_size": [50, 100], "epochs": 1}],
}


def test_driver_sigkill_then_resume_gives_one_row_and_one_run_per_trial(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    results = tmp_path / "res"
    env = {**os.environ, "BDSWEEP_FLUSH_SECONDS": "1"}  # flush rows often, so some are on disk at the kill
    driver = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(tmp_path / "spec.yaml"),
                               "--results", str(results), "--quiet"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and not list((results / "trials").glob("part-*.parquet")):
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    before = len(_rows(results))
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    assert 0 < before < 18  # killed mid-sweep
    time.sleep(2)  # the orphaned local Ray notices its driver is gone

    r = subprocess.run([sys.executable, "-m", "sweep.cli", "resume", str(results), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = _rows(results)
    assert len(df) == 18 == df.trial_id.nunique() and (df.status == "ok").all()
    c = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = c.get_experiment_by_name("killed")
    runs = c.search_runs([exp.experiment_id], "tags.`bdsweep.role` = 'trial'", max_results=1000)
    assert len(runs) == 18 and {x.data.tags["trial_id"] for x in runs} == set(df.trial_id)
    assert all(x.info.status == "FINISHED" for x in runs)



STOPPED = {"name": "stopped", "dataset": {"name": "synthetic", "train_size": 100, "test_size": 100},
           "model": "small_cnn", "seeds": [0, 1, 2, 3, 4, 5], "attacks": [{"name": "none"}],
           "defenses": [{"name": "none"}], "max_concurrent": 1}
DRIVER = """
import json, sys
from sweep.runner import run_sweep
from sweep.spec import parse_spec
from sweep.testing import sleepy_body
s = run_sweep(parse_spec(json.loads(sys.argv[2])), sys.argv[1], progress=False, body=sleepy_body)
print("SUMMARY", s.trials, s.skipped, s.ran, s.left, s.stopped, flush=True)
"""


def test_a_run_stopped_with_ctrl_c_counts_only_its_rows_and_the_next_run_takes_the_rest(tmp_path):
    """Ctrl-C (SIGINT) part-way: Tune stops the trial in flight, which leaves no row; the summary counts as
    run only the trials with a row and says how many are left (it used to count every trial taken as run),
    and the same run again takes exactly those."""
    import json

    from sweep.testing import sleepy_body

    results = tmp_path / "res"
    env = {**os.environ, "BDSWEEP_FLUSH_SECONDS": "0"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(results), json.dumps(STOPPED)], env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and not list((results / "trials").glob("part-*.parquet")):
        assert driver.poll() is None, driver.stdout.read()[-3000:]
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=120)
    summary = [line.split()[1:] for line in out.splitlines() if line.startswith("SUMMARY")]
    assert summary, out[-3000:]
    trials, skipped, ran, left, stopped = map(int, summary[0])
    rows = len(_rows(results))
    assert trials == 6 and skipped == 0 and 1 <= ran == rows < 6, (summary, rows)
    assert left == stopped == 6 - rows
    again = run_sweep(parse_spec(STOPPED), results, progress=False, body=sleepy_body)
    assert (again.skipped, again.ran, again.left) == (rows, 6 - rows, 0)
    df = _rows(results)
    assert len(df) == 6 and df.trial_id.is_unique
