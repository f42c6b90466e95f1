"""Run a sweep's trials on Ray Tune; write every result to Parquet and MLflow from the driver.

Ray Tune schedules (resources per trial, fractional GPUs, concurrency, retries on lost nodes); a trial
is one call of :func:`_trainable`, which runs :func:`sweep.trial.execute` and reports its row. A
callback on the driver is the single writer of Parquet and MLflow. Tune's automatic per-trial loggers
are off: the rows are the record, and those loggers cost time and driver memory per trial.

Re-running a spec runs only the trials whose ``trial_id`` is not yet in the results; ``resume`` re-runs
the spec saved in the results directory, which finishes a sweep whose driver died.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Before Ray is imported (workers inherit these at ray.init): no per-trial CSV/JSON/TensorBoard loggers,
# the old (silent at verbose=0) console reporter, and no chdir of trials into their Tune folders.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

import yaml  # noqa: E402
from ray.tune import Callback  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from sweep.results import ResultsWriter, finished_trials, load, schema_for  # noqa: E402
from sweep.spec import SpecError, SweepSpec, Trial, expand  # noqa: E402
from sweep.tracking import BackgroundTracker, default_uri  # noqa: E402


@dataclass
class Summary:
    trials: int  # in the spec
    skipped: int  # already in the results
    ran: int
    failed: int
    seconds: float


def _trainable(config, *, ctx: dict):
    """One trial inside a Ray worker. ``ctx`` (one object, fetched once per trial): store_root, data_root,
    download, threads, and body (what runs the trial, default sweep.trial.execute)."""
    import ray
    import torch
    from ray import tune

    from sweep.store import Store
    from sweep.trial import execute

    if torch.get_num_threads() != ctx["threads"]:
        torch.set_num_threads(ctx["threads"])
    use_gpu = torch.cuda.is_available() and bool(ray.get_gpu_ids())
    trial = Trial.from_dict(json.loads(config["trial"]))
    out = (ctx["body"] or execute)(trial, Store(ctx["store_root"], ctx["store_lock"]), root=ctx["data_root"],
                                   download=ctx["download"],
                                   device=torch.device("cuda" if use_gpu else "cpu"))
    arts = {k: v.detach().float().cpu().numpy() for k, v in out.artifacts.items()}
    tune.report({"row_json": json.dumps(out.row), "curves_json": json.dumps(out.curves), "artifacts": arts})


def run_sweep(spec: SweepSpec, results_dir: str | Path, *, address: str | None = None,
              mlflow_uri: str | None = None, storage: str | None = None, retry_failed: bool = False,
              max_concurrent: int | None = None, progress: bool = True, body=None) -> Summary:
    """Run every trial of ``spec`` not yet in ``results_dir``. The spec is fully validated first.

    ``body`` replaces :func:`sweep.trial.execute` as what a trial does (same signature, a picklable
    module-level function): benchmarks/sweep_overhead.py uses it to time the engine around a trivial body.
    """
    t_start = time.monotonic()
    trials = expand(spec)  # raises SpecError before anything is written
    results_dir = Path(results_dir).resolve()
    store_root = storage or str(results_dir / "store")
    done = finished_trials(results_dir, include_failed=not retry_failed)
    todo = [t for t in trials if t.trial_id not in done]
    if todo and body is None:
        _prepare_data(spec, todo[0], results_dir, store_root)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))

    tracker = BackgroundTracker(mlflow_uri or default_uri(results_dir), spec.name, results_dir, spec.model_dump(mode="json"))
    if done:
        tracker.backfill(load(results_dir).to_dict("records"))
    writer = ResultsWriter(results_dir, schema_for(trials, results_dir))
    n_trials, n_todo = len(trials), len(todo)
    del trials  # from here on each trial is held once: in ``todo`` until Tune takes it, then by Tune
    sink = _Sink(writer, tracker, total=n_todo, show=progress)
    status = "FINISHED"
    try:
        if not todo:
            tracker.wait_ready()
        else:
            _tune(spec, todo, results_dir, sink, address=address, store_root=store_root,
                  max_concurrent=max_concurrent or spec.max_concurrent, body=body)
    except BaseException:
        status = "KILLED"
        raise
    finally:
        sink.finish()
        tracker.close(status)
    return Summary(n_trials, n_trials - n_todo, n_todo, sink.failed, time.monotonic() - t_start)


def _prepare_data(spec: SweepSpec, trial: Trial, results_dir: Path, store_root: str) -> None:
    """Decode the dataset once, on the driver, into the store: missing or malformed data is one clear
    error before any trial starts (not one failed row per trial), and workers load cached tensors."""
    from kernel.data import DataError
    from sweep import trial as trial_mod
    from sweep.store import Store

    existed = results_dir.exists()
    try:
        trial_mod.load_data(trial, spec.dataset.root, spec.dataset.download, Store(store_root))
    except DataError as e:
        if not existed:
            shutil.rmtree(results_dir, ignore_errors=True)
        raise SpecError([("dataset", str(e))]) from None
    finally:
        trial_mod._DATA_MEMO.clear()  # the driver does not train: free the tensors


def _tune(spec: SweepSpec, todo: list[Trial], results_dir: Path, sink, *, address, store_root, max_concurrent,
          body=None):
    import ray
    from ray import tune

    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # failures are rows, not tracebacks on stderr
    if not ray.is_initialized():
        if address:
            if address != "auto":
                # Ray >= 2.52 clusters use token auth by default; "auto" finds the token, an explicit
                # address needs this (set RAY_AUTH_MODE=disabled for a cluster started without auth).
                os.environ.setdefault("RAY_AUTH_MODE", "token")
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    res = spec.resources
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, ctx={"store_root": store_root, "data_root": spec.dataset.root,
                                              "download": spec.dataset.download,
                                              "threads": max(1, int(res.cpu)), "body": body,
                                              "store_lock": os.environ.get("BDSWEEP_STORE_LOCK", "auto")}),
        {"cpu": res.cpu, "gpu": res.gpu})
    sink.tracker.wait_ready()  # a bad tracking URI fails here, after Ray has started beside it
    # Tune keeps every trial it has run until fit() returns, and its scheduler scans them all at every
    # step: memory and time per trial would grow with the sweep. So a long sweep runs as consecutive
    # Tune runs of at most ``chunk`` trials each (the cost: a new pair of actors and a short tail with
    # free slots between chunks, a few seconds each).
    chunk = int(os.environ.get("BDSWEEP_TUNE_CHUNK", 2000))
    tune_dir = results_dir / "ray" / spec.name
    while todo:
        part = todo[:chunk]  # in spec order (models interleaved: see expand)
        del todo[:chunk]  # held once: by ``todo`` until a chunk takes it, then by that chunk's feed
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=_Feed(part), num_samples=len(part),
                                        max_concurrent_trials=max_concurrent, reuse_actors=True,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(results_dir / "ray"), callbacks=[sink, _quiet_console()],
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=3),  # retried on a lost node / dead worker
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
            ),
        )
        tuner.fit()
        del tuner
        # Tune makes a folder per trial; ours stay empty (rows go to Parquet, no checkpoints): drop them.
        for d in tune_dir.iterdir() if tune_dir.is_dir() else ():
            if d.is_dir():
                try:
                    d.rmdir()
                except OSError:  # not empty: something in it is worth keeping
                    pass


def _quiet_console():
    """Tune's console reporter with nothing to say: given one, Tune adds none of its own, which would
    print a line per finished trial. The sweep prints its own progress line."""
    from ray.tune.progress_reporter import TrialProgressCallback

    class Quiet(TrialProgressCallback):
        def on_trial_result(self, *a, **k): ...
        def on_trial_complete(self, *a, **k): ...
        def on_trial_error(self, *a, **k): ...

    return Quiet()


class _Feed(Searcher):
    """Hands Tune the sweep's trials one at a time, each config just its own trial.

    Not ``tune.grid_search`` over the trial list: Tune's grid expansion deep-copies the whole unresolved
    space, list included, once per variant, which is quadratic in the trial count (10 s of copying for
    300 trials, hours for 10,000). A trial leaves this list when Tune takes it, so the driver holds each
    trial once, in Tune's own record of it.
    """

    def __init__(self, trials: list[Trial]):
        super().__init__()
        self._left = trials
        self._left.reverse()  # in place, and popped from the end: spec order, and no second list

    def suggest(self, trial_id):
        # As a JSON string: Tune deep-copies, flattens and formats every config into a name, and one
        # string is cheap for all three where the nested trial dict is not.
        return {"trial": json.dumps(self._left.pop().as_dict())} if self._left else Searcher.FINISHED

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass  # nothing to learn: every trial is run exactly once

    def get_state(self) -> dict:  # Tune's experiment checkpoints
        return {"left": self._left}

    def set_state(self, state: dict) -> None:
        self._left = state["left"]


class _Sink(Callback):
    """Tune callback on the driver: the single writer of Parquet (first) and MLflow (after)."""

    def __init__(self, writer: ResultsWriter, tracker: BackgroundTracker, total: int, show: bool):
        super().__init__()
        self.writer, self.tracker, self.total, self.show = writer, tracker, total, show
        self.pending: dict[str, tuple] = {}  # trial_id -> (row, curves, artifacts) until the row is on disk
        self.finished = self.failed = 0
        self.running: set[str] = set()
        self.t0, self.last_print = time.monotonic(), 0.0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # Popped, not read: Tune keeps every trial's last result until the sweep ends, and rows, curves
        # and trigger images held 10,000 times over would make driver memory grow with the trial count.
        # (Tune lets callbacks modify the result in place.)
        row = json.loads(result.pop("row_json"))
        self._record(row, json.loads(result.pop("curves_json", None) or "{}"), result.pop("artifacts", None) or {})

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        # The worker died (not the trial's code, whose exceptions are rows): record it and go on.
        self.running.discard(trial.trial_id)
        t = Trial.from_dict(json.loads(trial.config["trial"]))
        from sweep.trial import base_row

        row = base_row(t)
        row.update(status="failed", error=f"worker error: {getattr(trial, 'error_msg', None) or 'unknown'}")
        self._record(row, {}, {})

    def on_step_end(self, iteration, trials, **info):
        self._progress()  # counts kept by the hooks above: scanning ``trials`` every step is quadratic

    def _record(self, row, curves, artifacts):
        self.finished += 1
        self.failed += row["status"] != "ok"
        self.pending[row["trial_id"]] = (row, curves, artifacts)
        if self.writer.add(row):
            self._log_flushed()
        self._progress()

    def _log_flushed(self):
        if self.pending:  # the rows just written to Parquet, as one batch (one MLflow transaction)
            self.tracker.log_many(list(self.pending.values()))
        self.pending.clear()

    def _progress(self, force: bool = False):
        now = time.monotonic()
        if not self.show or (not force and now - self.last_print < (1 if sys.stderr.isatty() else 30)):
            return
        self.last_print = now
        el = now - self.t0
        eta = f"{el / self.finished * (self.total - self.finished):,.0f}s" if self.finished else "?"
        line = (f"[sweep] {self.finished}/{self.total} done, {len(self.running)} running, {self.failed} failed, "
                f"elapsed {el:,.0f}s, eta {eta}")
        print(("\r" + line) if sys.stderr.isatty() else line, end="" if sys.stderr.isatty() else "\n",
              file=sys.stderr, flush=True)

    def finish(self):
        self.writer.close()
        self._log_flushed()
        self._progress(force=True)
        if self.show and sys.stderr.isatty():
            print(file=sys.stderr)
