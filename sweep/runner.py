"""Run a sweep's trials on Ray Tune; write every result to Parquet and MLflow from the driver.

Ray Tune schedules (resources per trial, fractional GPUs, concurrency, retries on lost nodes); a trial
is one call of :func:`_trainable`, which runs :func:`sweep.trial.execute` and reports its row. A
callback on the driver is the single writer of Parquet and MLflow. Tune's automatic per-trial loggers
are off: the rows are the record, and those loggers cost time and driver memory per trial.

Re-running a spec runs only the trials whose ``trial_id`` is not yet in the results; ``resume`` re-runs
the spec saved in the results directory, which finishes a sweep whose driver died.

A spec with a ``search:`` section runs its grid first, then the search (sweep/search.py) on each of its
backdoored models in turn: one Tune run each, Tune's searcher behind :class:`SearchFeed`, ASHA when asked.
"""
from __future__ import annotations

import heapq
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Optional

# Before Ray is imported (workers inherit these at ray.init): no per-trial CSV/JSON/TensorBoard loggers,
# the old (silent at verbose=0) console reporter, and no chdir of trials into their Tune folders.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

import yaml  # noqa: E402
from ray.tune import Callback  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from sweep import search as search_mod  # noqa: E402
from sweep.results import ResultsWriter, finished_trials, load, schema_for  # noqa: E402
from sweep.spec import SearchSpec, SpecError, SweepSpec, Trial, content_hash, expand  # noqa: E402
from sweep.tracking import BackgroundTracker, default_uri  # noqa: E402


@dataclass
class Summary:
    trials: int  # in the spec
    skipped: int  # already in the results
    ran: int
    failed: int
    seconds: float
    left: int = 0  # no row from this run, a later run takes them: the time limit, or the run was stopped
    stopped: int = 0  # of ``left``: taken by this run but with no row when it was stopped (Ctrl-C)


def _trainable(config, *, ctx: dict):
    """One trial inside a Ray worker. ``ctx`` (one object, fetched once per trial): store_root, data_root,
    download, threads, body (what runs the trial, default sweep.trial.execute), and search (None, or the
    search's spec as a dict: the trial reports its defense's running objective, and its row is marked)."""
    import ray
    import torch
    from ray import tune

    from sweep.store import Store
    from sweep.trial import execute

    if torch.get_num_threads() != ctx["threads"]:
        torch.set_num_threads(ctx["threads"])
    use_gpu = torch.cuda.is_available() and bool(ray.get_gpu_ids())
    trial = Trial.from_dict(json.loads(config["trial"]))
    store = Store(ctx["store_root"], ctx["store_lock"])

    def report_build(rec: dict) -> None:  # an epoch of a model build: the driver's progress line and ETA
        tune.report({"build_json": json.dumps(rec)})

    def run():
        # A searched trial reports nothing but its objective: ASHA counts every report as a step.
        return (ctx["body"] or execute)(trial, store, root=ctx["data_root"], download=ctx["download"],
                                        device=torch.device("cuda" if use_gpu else "cpu"),
                                        progress=None if ctx.get("search") else report_build)

    extra = {}
    if ctx.get("search"):
        search = SearchSpec.model_validate(ctx["search"])
        with search_mod.reporting(search.objective.model_dump(), trial, store):
            out = run()
        search_mod.mark(out.row, search)
        value = out.row["search_objective"]
        extra["objective"] = float("nan") if value is None else value  # Tune's metric: in every result
    else:
        out = run()
    arts = {k: v.detach().float().cpu().numpy() for k, v in out.artifacts.items()}
    tune.report({"row_json": json.dumps(out.row), "curves_json": json.dumps(out.curves), "artifacts": arts, **extra})


def run_sweep(spec: SweepSpec, results_dir: str | Path, *, address: str | None = None,
              mlflow_uri: str | None = None, storage: str | None = None, retry_failed: bool = False,
              max_concurrent: int | None = None, progress: bool = True, body=None,
              time_limit: float | None = None) -> Summary:
    """Run every trial of ``spec`` not yet in ``results_dir``, then what its search has left of its budget.
    The spec is fully validated first.

    ``time_limit`` (seconds from the call): start no trial expected to end after it (:class:`Gate`); the
    trials left are counted in ``Summary.left`` and a later run, with the same spec, takes them.

    ``body`` replaces :func:`sweep.trial.execute` as what a trial does (same signature, a picklable
    module-level function): benchmarks/sweep_overhead.py uses it to time the engine around a trivial body.
    """
    t_start = time.monotonic()
    trials = expand(spec)  # raises SpecError before anything is written
    groups = search_mod.groups(spec)
    results_dir = Path(results_dir).resolve()
    store_root = storage or str(results_dir / "store")
    done = finished_trials(results_dir, include_failed=not retry_failed)
    todo = [t for t in trials if done.isdisjoint(t.ids)]
    budgets = {}
    if groups:
        rows = search_mod.results_frame(results_dir)
        for g in groups:
            budgets[g.key] = max(0, spec.search.num_samples - search_mod.history(rows, g, retry_failed).used)
        del rows
    n_search = sum(budgets.values())
    if (todo or n_search) and body is None:
        _prepare_data(spec, (todo or [g.base for g in groups if budgets[g.key]])[0], results_dir, store_root)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))

    tracker = BackgroundTracker(mlflow_uri or default_uri(results_dir), spec.name, results_dir, spec.model_dump(mode="json"))
    past = load(results_dir).to_dict("records") if done else []
    if done:
        tracker.backfill(past)
    schema = schema_for(trials + search_mod.type_probes(spec, groups), results_dir)
    if groups:
        schema = _with_search_columns(schema)
    writer = ResultsWriter(results_dir, schema)
    n_trials, n_todo = len(trials), len(todo)
    n_spec = n_trials + len(groups) * (spec.search.num_samples if groups else 0)
    searched = [(g.key, g.search.defense_name) for g in groups for _ in range(budgets[g.key])]
    cap = max_concurrent or spec.max_concurrent
    # the rows of the pieces run before this one estimate this one from its first trial
    eta = EtaEstimator.for_trials(
        todo, trials, past, extra=searched, slots=cap,
        have_models=_models_in_store(store_root, {t.model_key for t in todo} | {k for k, _ in searched}),
        training_time=_training_time_defenses({t.defense.name for t in todo} | {d for _, d in searched}))
    del trials, searched, past  # from here on each trial is held once: in ``todo`` until Tune takes it, then by Tune
    sink = _Sink(writer, tracker, total=n_todo + n_search, show=progress, eta=eta, search=spec.search)
    gate = Gate(t_start + time_limit, eta, sink) if time_limit is not None else None
    status, ran_search = "FINISHED", 0
    try:
        if not todo and not n_search:
            tracker.wait_ready()
        if todo:
            _tune(spec, todo, results_dir, sink, address=address, store_root=store_root, max_concurrent=cap, body=body,
                  gate=gate)
        for g in groups:
            ran_search += _search(spec, g, results_dir, sink, address=address, store_root=store_root,
                                  max_concurrent=_search_concurrency(spec.search, spec.max_concurrent, max_concurrent),
                                  retry_failed=retry_failed, body=body, gate=gate)
    except BaseException:
        status = "KILLED"
        raise
    finally:
        sink.finish()
        tracker.close(status)
    if groups:
        search_mod.write_ranks(results_dir)
    limited = gate.left if gate is not None else 0
    taken = n_todo + ran_search - (gate.grid_left if gate is not None else 0)  # what this run meant to run
    ran = min(taken, sink.finished)  # what left a row: a run stopped part-way (Ctrl-C) leaves the rest
    return Summary(n_spec, n_spec - taken - limited, ran, sink.failed, time.monotonic() - t_start,
                   limited + taken - ran, taken - ran)


def _with_search_columns(schema):
    import pyarrow as pa

    extra = {"search": pa.string(), "search_objective": pa.float64(), "search_mode": pa.string(),
             "search_rank": pa.int64()}
    for name, typ in extra.items():
        if name not in schema.names:
            schema = schema.append(pa.field(name, typ))
    return schema


def _search_concurrency(search: SearchSpec, spec_cap: int | None, cli_cap: int | None) -> int:
    """The search's own max_concurrent, else the sweep's, else 4 (a model-based searcher learns nothing from
    trials it suggested all at once); ``--max-concurrent`` caps it."""
    n = search.max_concurrent or spec_cap or 4
    return min(n, cli_cap) if cli_cap else n


def _models_in_store(store_root: str, keys: set[str]) -> set[str]:
    """The backdoored models already built (a progress estimate's input: best effort)."""
    import pyarrow.fs as pafs

    from sweep.store import Store

    try:  # one listing (one request on an object store), not a look-up per model
        store = Store(store_root)
        infos = store.fs.get_file_info(pafs.FileSelector(f"{store.root}/models", allow_not_found=True))
        return keys & {Path(i.path).name[:-5] for i in infos if i.path.endswith(".json")}
    except Exception:  # noqa: BLE001 - an unreachable store is found by the trials, not here
        return set()


def _training_time_defenses(names: set[str]) -> set[str]:
    from defenses import DEFENSES

    return {n for n in names if n in DEFENSES and not DEFENSES.get(n).needs_backdoored_model}


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


def _init_ray(address):
    import ray

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


def _with_resources(spec: SweepSpec, store_root: str, body, search: dict | None = None):
    from ray import tune

    res = spec.resources
    return tune.with_resources(
        tune.with_parameters(_trainable, ctx={"store_root": store_root, "data_root": spec.dataset.root,
                                              "download": spec.dataset.download,
                                              "threads": max(1, int(res.cpu)), "body": body,
                                              "store_lock": os.environ.get("BDSWEEP_STORE_LOCK", "auto"),
                                              "search": search}),
        {"cpu": res.cpu, "gpu": res.gpu})


def _run_config(spec: SweepSpec, results_dir: Path, sink):
    from ray import tune

    return tune.RunConfig(
        name=spec.name, storage_path=str(results_dir / "ray"), callbacks=[sink, _quiet_console()],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=3),  # retried on a lost node / dead worker
        checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
    )


def _drop_empty_trial_dirs(tune_dir: Path) -> None:
    # Tune makes a folder per trial; ours stay empty (rows go to Parquet, no checkpoints): drop them.
    for d in tune_dir.iterdir() if tune_dir.is_dir() else ():
        if d.is_dir():
            try:
                d.rmdir()
            except OSError:  # not empty: something in it is worth keeping
                pass


def _tune(spec: SweepSpec, todo: list[Trial], results_dir: Path, sink, *, address, store_root, max_concurrent,
          body=None, gate: "Gate | None" = None):
    from ray import tune

    _init_ray(address)
    trainable = _with_resources(spec, store_root, body)
    sink.tracker.wait_ready()  # a bad tracking URI fails here, after Ray has started beside it
    # Tune keeps every trial it has run until fit() returns, and its scheduler scans them all at every
    # step: memory and time per trial would grow with the sweep. So a long sweep runs as consecutive
    # Tune runs of at most ``chunk`` trials each (the cost: a new pair of actors and a short tail with
    # free slots between chunks, a few seconds each).
    chunk = int(os.environ.get("BDSWEEP_TUNE_CHUNK", 2000))
    while todo:
        if gate is not None and gate.closed():  # past the time limit: no chunk to start
            for t in todo:
                gate.refuse(t.model_key, cost_key(t.defense.as_dict()))
            todo.clear()
            break
        part = todo[:chunk]  # in spec order (models interleaved: see expand)
        del todo[:chunk]  # held once: by ``todo`` until a chunk takes it, then by that chunk's feed
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=_Feed(part, gate), num_samples=len(part),
                                        max_concurrent_trials=max_concurrent, reuse_actors=True,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=_run_config(spec, results_dir, sink),
        )
        tuner.fit()
        del tuner
        _drop_empty_trial_dirs(results_dir / "ray" / spec.name)


def _search(spec: SweepSpec, group, results_dir: Path, sink, *, address, store_root, max_concurrent,
            retry_failed: bool, body=None, gate: "Gate | None" = None) -> int:
    """Run what is left of one group's search budget (its finished trials told to the searcher first);
    returns the number of trials run."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    sink.writer.flush()  # the grid's and earlier groups' rows: what this group's history is read from
    hist = search_mod.history(search_mod.results_frame(results_dir), group, retry_failed)
    left = spec.search.num_samples - hist.used
    if left <= 0:
        return 0
    if gate is not None and gate.closed():  # past the time limit: the group waits for a later run
        gate.search_left += left
        sink.drop_queued(group.key, group.search.defense_name, left)
        return 0
    _init_ray(address)
    sink.tracker.wait_ready()
    feed = SearchFeed(group, make_searcher(spec.search, hist.points), hist.known, left, gate=gate)
    tuner = tune.Tuner(
        _with_resources(spec, store_root, body, search=spec.search.model_dump(mode="json")),
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(feed, max_concurrent=max_concurrent),
                                    scheduler=search_mod.scheduler(spec.search), num_samples=left,
                                    reuse_actors=True, trial_dirname_creator=lambda t: t.trial_id),
        run_config=_run_config(spec, results_dir, sink),
    )
    tuner.fit()
    del tuner
    _drop_empty_trial_dirs(results_dir / "ray" / spec.name)
    sink.drop_queued(group.key, group.search.defense_name, left - feed.given)  # a space exhausted early
    if feed.gated:  # the time limit ended the group: what it had left waits for the next run
        gate.search_left += left - feed.given
    return feed.given


def tune_space(search: SearchSpec) -> dict:
    """The search space as Tune's domains (``int`` bounds both included)."""
    from ray import tune

    out = {}
    for p, d in search.space.items():
        kind = d.kind
        if kind == "choice":
            out[p] = tune.choice(list(d.choice))
        elif kind == "int":
            out[p] = tune.randint(d.bounds[0], d.bounds[1] + 1)  # Tune's upper bound is exclusive
        elif kind == "loguniform":
            out[p] = tune.loguniform(*d.bounds)
        else:
            out[p] = tune.uniform(*d.bounds)
    return out


def make_searcher(search: SearchSpec, points: list[tuple[Optional[dict], Optional[float]]]) -> Searcher:
    """Tune's searcher for ``search``, told the (configuration, objective) pairs already evaluated (objective
    None: the trial failed). Seeded by the search's seed plus the number of points, so that a resumed search
    does not replay the random start of the first run."""
    mode, space = search.objective.mode, tune_space(search)
    points = [(c, v) for c, v in points if c is not None]
    seed = search.seed + len(points)
    if search.searcher == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study on the progress line

        inner = OptunaSearch(OptunaSearch.convert_search_space(space), metric="objective", mode=mode, seed=seed)
        for cfg, value in points:
            inner.add_evaluated_point(cfg, 0.0 if value is None else value, error=value is None)
        return inner
    if search.searcher == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        inner = HyperOptSearch(HyperOptSearch.convert_search_space(space), metric="objective", mode=mode,
                               points_to_evaluate=[dict(c) for c, _ in points] or None, random_state_seed=seed,
                               n_initial_points=min(20, max(1, search.num_samples // 4)))
        for i, (_, value) in enumerate(points):  # HyperOpt has no add_evaluated_point: the points replayed
            inner.suggest(f"replay-{i}")
            inner.on_trial_complete(f"replay-{i}", None if value is None else {"objective": value}, error=value is None)
        return inner
    return RandomSearch(space, mode, seed)


class RandomSearch(Searcher):
    """Independent draws from Tune's domains of the space, seeded (``searcher: random``)."""

    def __init__(self, space: dict, mode: str, seed: int):
        import numpy as np

        super().__init__(metric="objective", mode=mode)
        self.space, self.rng = space, np.random.RandomState(seed)

    def suggest(self, trial_id):
        return {p: d.sample(random_state=self.rng) for p, d in self.space.items()}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


class SearchFeed(Searcher):
    """Tune's searcher for one group of a search: asks ``inner`` (a Tune searcher over the space) for
    configurations and hands Tune each as the trial it resolves to (``{"trial": <json>, "search": <name>}``),
    at most ``budget`` of them.

    A configuration whose trial is already in the results (``known``: trial id -> objective) is not run
    again: its objective is told to ``inner`` and ``inner`` asked again; so is one that resolves to a trial
    in flight (told as an error), or that the defense's Params refuse. After ``max_retries`` such answers in
    a row the space is taken as exhausted and the group ends. ``on_trial_result`` passes the running
    objective on (Optuna records it as the trial's intermediate values)."""

    def __init__(self, group, inner: Searcher, known: dict, budget: int, max_retries: int = 100,
                 gate: "Gate | None" = None):
        super().__init__(metric="objective", mode=group.search.objective.mode)
        self.group, self.inner, self.known = group, inner, dict(known)
        self.budget, self.max_retries, self.gate = budget, max_retries, gate
        self.given = self.skipped = 0
        self.gated = False  # the time limit ended this group
        self.live: dict[str, tuple[str, str]] = {}  # Tune's trial id -> (inner's trial id, our trial id)

    def suggest(self, trial_id):
        if self.given >= self.budget or self.gated:
            return Searcher.FINISHED
        if self.gate is not None and not self.gate.fits(self.group.key, self.group.search.defense_name):
            self.gated = True
            return Searcher.FINISHED
        in_flight = {tid for _, tid in self.live.values()}
        for attempt in range(self.max_retries):
            iid = f"{trial_id}~{attempt}"
            cfg = self.inner.suggest(iid)
            if cfg is None or cfg == Searcher.FINISHED:
                return cfg
            try:
                trial = self.group.trial(cfg)
            except ValueError:
                self.inner.on_trial_complete(iid, None, error=True)
                continue
            tid = trial.trial_id
            if tid in self.known or tid in in_flight:
                value = self.known.get(tid)
                self.inner.on_trial_complete(iid, None if value is None else {"objective": value}, error=value is None)
                self.skipped += 1
                continue
            self.live[trial_id] = (iid, tid)
            self.given += 1
            return {"trial": json.dumps(trial.as_dict()), "search": self.group.search.label}
        return Searcher.FINISHED

    def on_trial_result(self, trial_id, result):
        if trial_id in self.live and _finite(result.get("objective")):
            self.inner.on_trial_result(self.live[trial_id][0], result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id not in self.live:
            return
        iid, tid = self.live.pop(trial_id)
        value = (result or {}).get("objective")
        value = float(value) if _finite(value) and not error else None
        self.known[tid] = value
        self.inner.on_trial_complete(iid, None if value is None else {**result, "objective": value},
                                     error=value is None)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _quiet_console():
    """Tune's console reporter with nothing to say: given one, Tune adds none of its own, which would
    print a line per finished trial. The sweep prints its own progress line."""
    from ray.tune.progress_reporter import TrialProgressCallback

    class Quiet(TrialProgressCallback):
        def on_trial_result(self, *a, **k): ...
        def on_trial_complete(self, *a, **k): ...
        def on_trial_error(self, *a, **k): ...

    return Quiet()


class Gate:
    """The time limit of a run: a trial is started only while it is expected to end before ``deadline``
    (monotonic seconds), by the progress line's estimate for its kind (:class:`EtaEstimator`; a trial with no
    estimate yet is started while the deadline is ahead). A refused trial is not run and not counted as
    queued; each trial is asked about once, so a long one refused near the end does not hold back a short
    one after it. Trials running at the deadline are not stopped. Tune asks for a trial when it queues one,
    which with this engine's searchers is when a slot frees or, with no ``max_concurrent``, one trial ahead
    (Tune keeps one pending trial for a custom searcher): the estimate is that much early."""

    def __init__(self, deadline: float, eta: "EtaEstimator", sink: "_Sink | None" = None, clock=time.monotonic):
        self.deadline, self.eta, self.sink, self.clock = deadline, eta, sink, clock
        self.grid_left = 0  # grid trials left for a later run
        self.search_left = 0  # searched trials: what the groups the limit ended had left of their budgets

    @property
    def left(self) -> int:
        return self.grid_left + self.search_left

    def closed(self) -> bool:
        return self.clock() >= self.deadline

    def fits(self, model_key: str, defense) -> bool:
        """Whether a trial of this kind, started now, is expected to end in time."""
        now = self.clock()
        if now >= self.deadline:
            return False
        est = self.eta.estimate(model_key, defense, now)
        return est is None or now + est <= self.deadline

    def admits(self, model_key: str, defense) -> bool:
        """``fits`` for a grid trial; one that does not is left to a later run."""
        if self.fits(model_key, defense):
            return True
        self.refuse(model_key, defense)
        return False

    def refuse(self, model_key: str, defense) -> None:
        """A grid trial left to a later run: counted, and off the ETA's queue."""
        self.grid_left += 1
        if self.sink is not None:
            self.sink.drop_queued(model_key, defense, 1)


class _Feed(Searcher):
    """Hands Tune the sweep's trials one at a time, each config just its own trial.

    Not ``tune.grid_search`` over the trial list: Tune's grid expansion deep-copies the whole unresolved
    space, list included, once per variant, which is quadratic in the trial count (10 s of copying for
    300 trials, hours for 10,000). A trial leaves this list when Tune takes it, so the driver holds each
    trial once, in Tune's own record of it.
    """

    def __init__(self, trials: list[Trial], gate: "Gate | None" = None):
        super().__init__()
        self._left = trials
        self._left.reverse()  # in place, and popped from the end: spec order, and no second list
        self.gate = gate

    def suggest(self, trial_id):
        # As a JSON string: Tune deep-copies, flattens and formats every config into a name, and one
        # string is cheap for all three where the nested trial dict is not.
        while self._left:
            t = self._left.pop()
            if self.gate is None or self.gate.admits(t.model_key, cost_key(t.defense.as_dict())):
                return {"trial": json.dumps(t.as_dict())}
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass  # nothing to learn: every trial is run exactly once

    def get_state(self) -> dict:  # Tune's experiment checkpoints
        return {"left": self._left}

    def set_state(self, state: dict) -> None:
        self._left = state["left"]


class _Sink(Callback):
    """Tune callback on the driver: the single writer of Parquet (first) and MLflow (after), and the
    progress line (its ETA from :class:`EtaEstimator`)."""

    def __init__(self, writer: ResultsWriter, tracker: BackgroundTracker, total: int, show: bool,
                 eta: "EtaEstimator | None" = None, search: Optional[SearchSpec] = None):
        super().__init__()
        self.writer, self.tracker, self.total, self.show, self.search = writer, tracker, total, show, search
        self.eta = eta or EtaEstimator([])
        self.pending: dict[str, tuple] = {}  # trial_id -> (row, curves, artifacts) until the row is on disk
        self.finished = self.failed = self.stopped = 0
        self.running: set[str] = set()
        self.steps: dict[str, list] = {}  # searched trials in flight: their reported per-round records
        self.recorded: set[str] = set()  # Tune trials in flight whose row is recorded
        self.building: dict[str, dict] = {}  # Tune trials in flight building a model: their last epoch record
        self.t0, self.last_print = time.monotonic(), 0.0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # Popped, not read: Tune keeps every trial's last result until the sweep ends, and rows, curves
        # and trigger images held 10,000 times over would make driver memory grow with the trial count.
        # (Tune lets callbacks modify the result in place.)
        tid = getattr(trial, "trial_id", None)
        if "build_json" in result:  # an epoch of a model this trial builds
            rec = json.loads(result.pop("build_json"))
            self.eta.build_progress(tid, rec, time.monotonic())
            self.building[tid] = rec
            self._progress()
            return
        if "step_json" in result:  # a searched trial's running objective (sweep.search.reporting)
            self.steps.setdefault(tid, []).append(json.loads(result.pop("step_json")))
            return
        row = json.loads(result.pop("row_json"))
        self.recorded.add(tid)
        self.steps.pop(tid, None)
        self._record(row, json.loads(result.pop("curves_json", None) or "{}"), result.pop("artifacts", None) or {},
                     tid)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        try:
            t = json.loads(trial.config["trial"])
            self.eta.start(trial.trial_id, t["model_key"], cost_key(t["defense"]), time.monotonic())
        except (KeyError, TypeError, ValueError):
            pass

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.building.pop(trial.trial_id, None)
        if trial.trial_id in self.recorded:
            self.recorded.discard(trial.trial_id)
            return
        if "search" in (trial.config or {}) and self.search is not None:
            # stopped by the scheduler: no row came from the worker; the driver writes it
            t = Trial.from_dict(json.loads(trial.config["trial"]))
            records = self.steps.pop(trial.trial_id, [])
            row = search_mod.stopped_row(t, self.search, records, dict(trial.last_result or {}))
            self._record(row, {"defense": [r["record"] for r in records]} if records else {}, {}, trial.trial_id)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.building.pop(trial.trial_id, None)
        self.steps.pop(trial.trial_id, None)  # it starts over
        self.eta.abandon(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        # The worker died (not the trial's code, whose exceptions are rows): record it and go on.
        self.running.discard(trial.trial_id)
        self.building.pop(trial.trial_id, None)
        self.steps.pop(trial.trial_id, None)
        t = Trial.from_dict(json.loads(trial.config["trial"]))
        from sweep.trial import base_row

        row = base_row(t)
        row.update(status="failed", error=f"worker error: {getattr(trial, 'error_msg', None) or 'unknown'}")
        if "search" in trial.config and self.search is not None:
            row.update(search=self.search.label, search_mode=self.search.objective.mode)
        self._record(row, {}, {}, trial.trial_id)

    def on_step_end(self, iteration, trials, **info):
        self._progress()  # counts kept by the hooks above: scanning ``trials`` every step is quadratic

    def drop_queued(self, model_key: str, defense, n: int) -> None:
        """Trials counted in the total that will not run (a search whose space ran out of new trials)."""
        if n > 0:
            self.total -= n
            self.eta.drop(model_key, defense, n)

    def _record(self, row, curves, artifacts, tune_id=None):
        self.building.pop(tune_id, None)
        self.finished += 1
        self.failed += row["status"] == "failed"
        self.stopped += row["status"] == "stopped"
        self.eta.finish(tune_id if tune_id is not None else row["trial_id"], row, time.monotonic())
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
        eta = self.eta.eta(now)
        stopped = f", {self.stopped} stopped early" if self.stopped else ""
        running = f"{len(self.running)} running"
        if self.building:  # the build furthest behind: what holds the sweep up
            b = min(self.building.values(), key=lambda r: r["epoch"] / max(1, r["epochs"]))
            more = f" and {len(self.building) - 1} more" if len(self.building) > 1 else ""
            running += f" (building {b['model_key'][:8]}: epoch {b['epoch']}/{b['epochs']}{more})"
        line = (f"[sweep] {self.finished}/{self.total} done, {running}, {self.failed} failed"
                f"{stopped}, elapsed {format_seconds(el)}, eta {'?' if eta is None else format_seconds(eta)}")
        print(("\r" + line) if sys.stderr.isatty() else line, end="" if sys.stderr.isatty() else "\n",
              file=sys.stderr, flush=True)

    def finish(self):
        self.writer.close()
        self._log_flushed()
        self._progress(force=True)
        if self.show and sys.stderr.isatty():
            print(file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# The progress line's ETA


def format_seconds(s: float) -> str:
    """45s, 12m05s, 3h07m, 2d04h: a day-long sweep's times at a glance."""
    s = max(0, int(round(s)))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def cost_key(defense: dict) -> tuple[str, str]:
    """What the ETA knows a defense's cost by: its name and a hash of its resolved parameters (a variant
    of the spec: ``Variant.as_dict()``, as a trial's config holds it; the rows' ``defense_key``)."""
    return defense["name"], content_hash(defense)


def defense_work(name: str, params: dict, dataset: dict) -> Optional[float]:
    """What a run of defense ``name`` with ``params`` on ``dataset`` (a trial's) computes (``Defense.work``), for
    scaling one variant's seen time to another's; None when the defense does not say or the parameters do
    not validate."""
    from defenses import DEFENSES
    from defenses.base import clean_count
    from kernel.data import dataset_info

    if name not in DEFENSES:
        return None
    cls = DEFENSES.get(name)
    try:
        p = cls.Params(**params)
        info = dataset_info(dataset["name"])
    except (ValueError, TypeError, KeyError):
        return None
    cs = getattr(p, "clean_size", None)
    n = None if cs is None else clean_count(
        cs, dataset.get("clean_pool") or dataset.get("train_size") or info.train_len, info.num_classes)
    return cls.work(p, n)


def _row_params(row: dict) -> dict:
    """A row's defense parameters, from its ``defense.*`` columns (other defenses' columns are null)."""
    out = {}
    for k, v in row.items():
        if k.startswith("defense.") and v is not None and not (isinstance(v, float) and math.isnan(v)):
            # Parquet widens an int column holding nulls to float: 500.0 is the count 500 (a clean_size
            # fraction is never whole; a float field takes the int as it is)
            out[k[len("defense."):]] = int(v) if isinstance(v, float) and v.is_integer() else v
    return out


def _pair(defense) -> tuple:
    """A defense as the ETA keys it: ``(name, variant)``; a bare name has no variant (None)."""
    return tuple(defense) if isinstance(defense, (tuple, list)) else (defense, None)


def _mean(xs) -> Optional[float]:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _iso_seconds(a, b) -> Optional[float]:
    try:
        return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()
    except (TypeError, ValueError):
        return None


@dataclass
class _Figures:
    """Finished trials' times: defense seconds per name and per (name, variant), build seconds per model,
    and the engine's overhead around each trial (its wall time less its defense and any build)."""

    by_name: dict = field(default_factory=dict)  # name -> [seconds]
    by_variant: dict = field(default_factory=dict)  # (name, variant) -> [seconds]
    builds: dict = field(default_factory=dict)  # model_key -> seconds
    overheads: list = field(default_factory=list)

    def add(self, row: dict, defense: tuple) -> None:
        """An ``ok`` row of ``defense`` = (name, variant or None)."""
        ds, bs = row.get("defense_seconds"), row.get("attack_seconds")
        if _finite(ds):
            self.by_name.setdefault(defense[0], []).append(float(ds))
            if defense[1] is not None:
                self.by_variant.setdefault(defense, []).append(float(ds))
        if _finite(bs) and row.get("model_key") is not None:
            self.builds[row["model_key"]] = float(bs)
        wall = _iso_seconds(row.get("started_at"), row.get("finished_at"))
        if wall is not None and _finite(ds):
            built = float(bs) if _finite(bs) and row.get("attack_cached") is False else 0.0
            self.overheads.append(max(0.0, wall - float(ds) - built))


@dataclass
class EtaEstimator:
    """How long the rest of a sweep will take, estimated per kind of trial. Pure: fed the queue, then
    trial starts and finished rows with the time (monotonic seconds) they happened at.

    A trial costs its defense's time (the mean ``defense_seconds`` of finished rows of that defense),
    plus the engine's overhead around it (data, evaluation: a row's wall time less its defense and any
    model it built), plus, when it is the first trial to need a backdoored model that is neither in the
    store nor built earlier in this run (trials sharing a ``model_key`` build it once), the model's build
    time (the mean ``attack_seconds`` over the models seen). A training-time defense (ABL: no backdoored
    model) never builds one; its defense time is its whole training. Fallbacks, for kinds with no finished
    trial yet: a defense never seen takes the mean of its kind (training-time or post-training), then of
    all defenses (``none``'s rows, which cost nothing, left out), and never less than its longest-running
    trial has run so far; a training-time defense with none of its kind finished takes a model build's time (it
    trains a model too); a build with no model seen takes the mean training-time defense. With no figure at
    all, the ETA is unknown (None).

    Running trials count by what they have left (their estimate less the time they have run, never below
    zero); the queue is then laid, builders first, on the free slots in turn (the number of slots: the
    most trials seen running at once, at most ``slots`` when given): the ETA is when the last slot frees.
    So while the last long trials run, the ETA falls with their time, instead of growing with the mean
    of the short trials that finished before them.

    A defense is named by its name or by a ``(name, variant)`` pair (:func:`cost_key`: the name and a hash
    of its resolved parameters). A variant's own figures come first: I-BAU with 5,000 clean images costs
    40 times I-BAU with 100, and a time limit that took the mean of both would start the long one too late.
    A variant never seen is scaled from its name's variants that were, by what each computes
    (``works``: ``Defense.work``, e.g. rounds x clean images for I-BAU; the spec's variants, filled in by
    :meth:`for_trials`), where its defense says. Then the name's mean, then the fallbacks above. :meth:`learn` adds the rows an earlier run left in the
    same results directory (another piece of the sweep): they stand behind this run's own figures of the same
    variant, build or name, so the first hour of a piece is estimated from the pieces before it.
    """

    queued: Iterable[tuple[str, "str | tuple"]]  # (model_key, defense) of every trial still to run
    have_models: Iterable[str] = ()  # model keys in the store already
    training_time: Iterable[str] = ()  # defense names that build no backdoored model
    slots: Optional[int] = None  # max_concurrent, when set
    peak: int = 0
    running: dict = field(default_factory=dict)  # id -> (start, model_key, (name, variant), builds)
    own: _Figures = field(default_factory=_Figures)  # this run's finished trials
    past: _Figures = field(default_factory=_Figures)  # earlier runs' (learn), consulted after
    build_proj: dict = field(default_factory=dict)  # id of a running builder -> its build's projected seconds
    works: dict = field(default_factory=dict)  # (name, variant) -> its Defense.work, where the defense says

    def __post_init__(self):
        self.queued = Counter((k, _pair(d)) for k, d in self.queued)
        self.have_models, self.training_time = set(self.have_models), set(self.training_time)
        self.claimed: set[str] = set()  # models a running trial builds
        self.took: dict = {}  # id of a running trial -> the queue entry its start took it from

    @classmethod
    def for_trials(cls, todo: list[Trial], trials: list[Trial], rows: list[dict], *, have_models: Iterable[str],
                   training_time: Iterable[str], slots: Optional[int] = None, extra=()) -> "EtaEstimator":
        """The estimate of a run of ``todo`` (the part of ``trials``, the spec's, still to run; and ``extra``
        queue entries: a search's, by defense name) from the ``rows`` its results directory holds; ``trials``
        name the variant of rows written before ``defense_key`` existed."""
        keys = {t.trial_id: cost_key(t.defense.as_dict()) for t in trials}  # each trial's hash, once
        keys.update({a: keys[t.trial_id] for t in trials for a in t.aliases})  # its rows from older versions
        works = {}
        for t in trials:
            if keys[t.trial_id] not in works:
                works[keys[t.trial_id]] = defense_work(t.defense.name, t.defense.params, t.dataset)
        queue = [(t.model_key, keys[t.trial_id]) for t in todo]
        dataset = trials[0].dataset if trials else None
        for r in rows:  # variants the spec no longer holds: by their rows' parameters, on the spec's dataset
            if r.get("status") != "ok" or r.get("trial_id") in keys or dataset is None:
                continue
            params = _row_params(r)
            # a row from before ``defense_key``: its parameters name its variant
            key = (r.get("defense"), r.get("defense_key") or "row:" + content_hash(params))
            keys[r.get("trial_id")] = key
            if key not in works:
                works[key] = defense_work(key[0], params, dataset)
        eta = cls(queue + list(extra),
                  have_models=have_models, training_time=training_time, slots=slots,
                  works={k: w for k, w in works.items() if w})
        if rows:
            eta.learn(rows, keys)
        return eta

    def learn(self, rows: Iterable[dict], keys: Optional[dict] = None) -> None:
        """Figures from rows an earlier run finished. A row's variant is its ``defense_key`` column, else
        ``keys`` (trial_id -> (name, variant): rows written before that column existed, whose trials the spec
        still holds); a row with neither counts for its defense's name only."""
        keys = keys or {}
        for r in rows:
            if r.get("status") != "ok":
                continue
            key = keys.get(r.get("trial_id")) or (r.get("defense"), r.get("defense_key") or None)
            self.past.add(r, key)

    # events ---------------------------------------------------------------------------------------
    def _builds(self, model_key: str, defense) -> bool:
        return (_pair(defense)[0] not in self.training_time and model_key not in self.have_models
                and model_key not in self.claimed)

    def start(self, tid: str, model_key: str, defense, now: float) -> None:
        defense = _pair(defense)
        # off the queue: its own variant's entry, else its name's (a search's trials are queued by name)
        for entry in ((model_key, defense), (model_key, (defense[0], None))):
            if self.queued[entry] > 0:
                self.queued[entry] -= 1
                self.took[tid] = entry
                break
        builds = self._builds(model_key, defense)
        if builds:
            self.claimed.add(model_key)
        self.running[tid] = (now, model_key, defense, builds)
        self.peak = max(self.peak, len(self.running))

    def build_progress(self, tid: str, rec: dict, now: float) -> None:
        """A running trial reported an epoch of the model it builds: ``rec`` = {model_key, epoch (1-based),
        epochs, seconds since the build began}. Its build is projected at its pace so far (seconds x
        epochs / epoch): the ETA of a sweep's first hour, before any model has finished, comes from it."""
        info = self.running.get(tid)
        if info is None or rec.get("model_key") != info[1] or not rec.get("epoch") or not rec.get("epochs"):
            return  # a build for another key (an attack's clean reference model): not this trial's own
        if not info[3]:  # it builds after all (the store said otherwise when it started)
            self.running[tid] = (*info[:3], True)
            self.claimed.add(info[1])
        self.build_proj[tid] = float(rec["seconds"]) * rec["epochs"] / rec["epoch"]

    def abandon(self, tid: str) -> None:
        """A trial that will start again (Tune retries it): back to the queue."""
        self.build_proj.pop(tid, None)
        info = self.running.pop(tid, None)
        if info is not None:
            self.queued[self.took.pop(tid, (info[1], info[2]))] += 1
            if info[3]:
                self.claimed.discard(info[1])

    def drop(self, model_key: str, defense, n: int) -> None:
        defense = _pair(defense)
        self.queued[(model_key, defense)] = max(0, self.queued[(model_key, defense)] - n)

    def finish(self, tid: str, row: dict, now: float) -> None:
        self.build_proj.pop(tid, None)
        self.took.pop(tid, None)
        info = self.running.pop(tid, None)
        key, name = row.get("model_key"), row.get("defense")
        if info is None:  # ended without a start we saw: off the queue, whichever variant of its name
            pair = next((q for q, n in self.queued.items() if n > 0 and q[0] == key and q[1][0] == name),
                        (key, (name, None)))
            if self.queued[pair] > 0:
                self.queued[pair] -= 1
            defense = pair[1]
        else:
            defense = info[2]
        if info is not None and info[3]:
            self.claimed.discard(info[1])
        if row.get("attack_cached") is not None or (info is not None and info[3] and row.get("status") == "ok"):
            self.have_models.add(key)  # the model exists now
        if row.get("status") != "ok":
            return  # a failed or stopped trial's times say little about a whole one's
        self.own.add(row, defense)

    # estimates ------------------------------------------------------------------------------------
    def defense_time(self, defense, now: Optional[float] = None) -> Optional[float]:
        defense = _pair(defense)
        name = defense[0]
        for figures in (self.own.by_variant.get(defense), self.past.by_variant.get(defense)):
            own = _mean(figures or ())
            if own is not None:
                return own
        scaled = self._scaled(defense)
        if scaled is not None:
            return scaled
        for figures in (self.own.by_name.get(name), self.past.by_name.get(name)):
            own = _mean(figures or ())
            if own is not None:
                return own
        if name == "none":  # measures the model as it is: nothing to estimate from other defenses
            return 0.0
        # No trial of this defense has finished: the kind's mean, never from ``none``'s rows (a defense
        # that does nothing says nothing of what one costs), and, for a queued trial (``now`` given), never
        # less than the longest-running trial of this defense has run so far.
        # (A builder's time so far is mostly its build: it says nothing of the defense.)
        running = max((now - st for st, _, d, b in self.running.values() if d == defense and not b),
                      default=0.0) if now is not None else 0.0
        tt = name in self.training_time
        seen = {d: xs for d, xs in self._by_name().items() if d != "none"}
        est = _mean(x for d, xs in seen.items() if (d in self.training_time) == tt for x in xs)
        if est is None and tt:
            est = self.build_time()
        if est is None:
            est = _mean(x for xs in seen.values() for x in xs)
        if est is None:
            return running or None
        return max(est, running)

    def _scaled(self, defense: tuple) -> Optional[float]:
        """A variant never seen, from the variants of its name that were, by their ``works``: between two seen
        works, the line through them; beyond the seen ones, in proportion to the nearest (this run's figures of
        a variant before the past's)."""
        w = self.works.get(defense)
        if w is None:
            return None
        seen = {}
        for figures in (self.past, self.own):  # this run's own figure of a variant replaces the past's
            for v, xs in figures.by_variant.items():
                if v[0] == defense[0] and self.works.get(v) and xs:
                    seen[self.works[v]] = _mean(xs)
        if not seen:
            return None
        below = max((x for x in seen if x <= w), default=None)
        above = min((x for x in seen if x >= w), default=None)
        if below is None or above is None or below == above:
            near = below if above is None else above
            return seen[near] * w / near
        return seen[below] + (seen[above] - seen[below]) * (w - below) / (above - below)

    def build_time(self) -> Optional[float]:
        """A model build: the mean of the builds finished, else of the running builds' projections, else of
        earlier runs' builds."""
        for b in (_mean(self.own.builds.values()), _mean(self.build_proj.values()), _mean(self.past.builds.values())):
            if b is not None:
                return b
        return _mean(x for d, xs in self._by_name().items() if d in self.training_time for x in xs)

    def _by_name(self) -> dict:
        """Each defense name's figures: this run's where it has any, else the past's."""
        return {**self.past.by_name, **self.own.by_name}

    def trial_time(self, defense, builds: bool, now: Optional[float] = None,
                   build: Optional[float] = None) -> Optional[float]:
        """``build``: this trial's own projected build (a running builder), in place of the mean."""
        d = self.defense_time(defense, now)
        if d is None:
            return None
        t = d + (_mean(self.own.overheads) or _mean(self.past.overheads) or 0.0)
        if builds:
            b = build if build is not None else self.build_time()
            if b is None:
                return None
            t += b
        return t

    def estimate(self, model_key: str, defense, now: float) -> Optional[float]:
        """Seconds a queued trial is expected to take if it starts now (its build included when no model
        for its key is in the store or being built); None when unknown."""
        return self.trial_time(defense, self._builds(model_key, defense), now)

    def eta(self, now: float) -> Optional[float]:
        """Seconds until the last queued or running trial is expected to end; None when unknown."""
        loads = []
        for tid, (start, _, defense, builds) in self.running.items():
            # what it has left: by finished trials, else (an unseen defense) at least what it has run
            own = self.build_proj.get(tid)
            t = self.trial_time(defense, builds, build=own)
            if t is None:
                t = self.trial_time(defense, builds, now, build=own)
            if t is None:
                return None
            loads.append(max(0.0, t - (now - start)))
        first, rest = [], []
        claimed = set(self.claimed)
        for (key, defense), n in self.queued.items():
            if n <= 0:
                continue
            builds = defense[0] not in self.training_time and key not in self.have_models and key not in claimed
            if builds:
                claimed.add(key)
                t = self.trial_time(defense, True, now)
                if t is None:
                    return None
                first.append(t)
                n -= 1
            if n:
                t = self.trial_time(defense, False, now)
                if t is None:
                    return None
                rest.append((t, n))
        slots = max(self.peak, 1)
        if self.slots:
            slots = min(slots, self.slots)
        slots = max(slots, len(loads))
        heap = loads + [0.0] * (slots - len(loads))
        heapq.heapify(heap)
        for t in first:
            heapq.heappush(heap, heapq.heappop(heap) + t)
        for t, n in rest:
            for _ in range(n):
                heapq.heappush(heap, heapq.heappop(heap) + t)
        return max(heap) if heap else 0.0
