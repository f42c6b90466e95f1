"""MLflow logging (in a child process of the driver: BackgroundTracker): one experiment per sweep,
one parent run for the sweep, one child run per trial (params, final metrics, per-epoch curves as metric steps, tags to filter by).

Parquet is the source of truth; MLflow follows it. On start, the tracker lists the children already
logged (by their ``trial_id`` tag) and deletes unfinished ones left by a crash, so a resumed sweep logs
every trial exactly once; :meth:`Tracker.backfill` logs rows that reached Parquet but not MLflow.
Tracking URI: ``sqlite:///DIR/mlflow.db`` by default (one machine), a tracking server's URL on a cluster.
"""
from __future__ import annotations

import math
import os
import pickle
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no migration chatter on first use
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # clusters are often offline; never phone home
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one "View run" line per trial otherwise

ROLE = "bdsweep.role"
PARAM_PREFIXES = ("attack.", "defense.")
METRICS = ("clean_acc", "asr", "robust_acc", "attack_clean_acc", "attack_asr", "attack_robust_acc",
           "attack_seconds", "defense_seconds", "search_objective")
TAGS = ("trial_id", "model_key", "attack", "defense", "defense_key", "dataset", "model", "seed", "status", "host",
        "device", "search")


def _sqlite_wal(conn, _record):
    """WAL journaling: each MLflow call commits several times; with fsync per commit a run costs ~120 ms
    on disk, with WAL ~20 ms. The mode is stored in the database file, so the UI server gets it too."""
    if isinstance(conn, sqlite3.Connection):
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()


def _mlflow_client(uri: str):
    """MLflow is imported here, in the process that logs (the driver only starts that process)."""
    import sqlalchemy
    from mlflow.tracking import MlflowClient

    if not sqlalchemy.event.contains(sqlalchemy.engine.Engine, "connect", _sqlite_wal):
        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "connect", _sqlite_wal)
    return MlflowClient(tracking_uri=uri)


def default_uri(results_dir: str | Path) -> str:
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def defense_outputs() -> dict[str, dict[str, str]]:
    """Each defense's own result columns (name -> kind), from the registry."""
    from defenses import DEFENSES

    return {name: DEFENSES.get(name).outputs for name in DEFENSES.names()}


class Tracker:
    def __init__(self, uri: str, sweep: str, results_dir: str | Path, spec: dict | None = None,
                 outputs: dict[str, dict[str, str]] | None = None):
        self.outputs = outputs if outputs is not None else defense_outputs()
        self.client = _mlflow_client(uri)
        exp = self.client.get_experiment_by_name(sweep)
        if exp is None:
            # Artifacts beside the results (a file store); a tracking server's own artifact root otherwise.
            loc = (Path(results_dir).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
            self.exp_id = self.client.create_experiment(sweep, artifact_location=loc)
        else:
            self.exp_id = exp.experiment_id
        parents = self.client.search_runs([self.exp_id], f"tags.`{ROLE}` = 'sweep'", max_results=1)
        if parents:
            self.parent = parents[0].info.run_id
            self.client.update_run(self.parent, status="RUNNING")
        else:
            self.parent = self.client.create_run(self.exp_id, run_name=sweep, tags={ROLE: "sweep"}).info.run_id
            if spec is not None:
                self.client.log_dict(self.parent, spec, "spec.json")
        self.logged = self._children()
        self._sql = _SqlRuns.for_client(self.client, self.exp_id)

    def _children(self) -> set[str]:
        done, token = set(), None
        while True:
            page = self.client.search_runs([self.exp_id], f"tags.`{ROLE}` = 'trial'", max_results=5000, page_token=token)
            for r in page:
                if r.info.status in ("FINISHED", "FAILED", "KILLED"):  # KILLED: stopped early by a search
                    done.add(r.data.tags.get("trial_id"))
                else:  # a crash while logging it: start that run over
                    self.client.delete_run(r.info.run_id)
            token = page.token
            if not token:
                return done

    def log(self, row: dict, curves: dict | None = None, artifacts: dict | None = None) -> None:
        self.log_many([(row, curves, artifacts)])

    def log_many(self, items) -> None:
        """Log ``(row, curves, artifacts)`` triples, skipping trials already logged.

        On a SQL store (SQLite by default, or a database URI) every run of the batch is inserted in one
        transaction: 0.4 ms of CPU a run instead of 10-25 ms through three client calls
        (benchmarks/mlflow_writes.py). A tracking server (HTTP) has no batch call for runs, so there
        each run takes the client's calls.
        """
        items = [it for it in items if it[0]["trial_id"] not in self.logged]
        if not items:
            return
        runs = [self._run_content(row, curves) for row, curves, _ in items]
        if self._sql is not None:
            run_ids = self._sql.insert(runs)
        else:
            run_ids = [self._log_with_client(run) for run in runs]
        for run_id, (row, _, artifacts) in zip(run_ids, items):
            for name, image in (artifacts or {}).items():  # a file next to the run's others: no SQL
                self.client.log_image(run_id, _to_numpy_image(image), f"{name}.png")
            self.logged.add(row["trial_id"])

    def _run_content(self, row: dict, curves: dict | None) -> "_Run":
        """What one trial's run holds: its name, tags, params, metrics (curves as steps) and status."""
        tags = {k: str(row[k]) for k in TAGS if row.get(k) is not None}
        tags.update({ROLE: "trial", "mlflow.parentRunId": self.parent})
        outputs = self.outputs.get(row["defense"], {})  # defense-specific result columns
        numeric_outputs = [k for k, kind in outputs.items() if kind in ("float", "int")]
        tags.update({k: str(row[k]) for k in outputs if k not in numeric_outputs and row.get(k) is not None})
        if row.get("error"):
            tags["error"] = str(row["error"])[:5000]
        now = int(time.time() * 1000)
        seconds = sum(row.get(k) or 0.0 for k in ("attack_seconds", "defense_seconds") if _finite(row.get(k)))
        params = {k: str(v) for k, v in row.items() if k.startswith(PARAM_PREFIXES) and v is not None}
        params.update({k: str(row[k]) for k in ("dataset", "model", "seed")})
        metrics = [(k, float(row[k]), 0) for k in (*METRICS, *numeric_outputs) if _finite(row.get(k))]
        for phase, records in (curves or {}).items():
            for i, rec in enumerate(records):
                step = int(rec.get("epoch", rec.get("step", i)))
                metrics += [(f"{phase}/{k}", float(v), step) for k, v in rec.items()
                            if k not in ("epoch", "step") and _finite(v)]
        return _Run(name=f"{row['attack']}/{row['defense']}/seed{row['seed']}/{row['trial_id'][:6]}",
                    tags=tags, params=params, metrics=metrics,
                    status={"ok": "FINISHED", "stopped": "KILLED"}.get(row["status"], "FAILED"),
                    start_ms=now - int(1000 * seconds), end_ms=now)

    def _log_with_client(self, run: "_Run") -> str:
        from mlflow.entities import Metric, Param

        run_id = self.client.create_run(self.exp_id, start_time=run.start_ms, run_name=run.name,
                                        tags=run.tags).info.run_id
        params = [Param(k, v) for k, v in run.params.items()]
        metrics = [Metric(k, v, run.end_ms, step) for k, v, step in run.metrics]
        chunks = max(math.ceil(len(metrics) / 1000), math.ceil(len(params) / 100), 1)  # MLflow's batch limits
        for i in range(chunks):
            self.client.log_batch(run_id, metrics=metrics[i * 1000:(i + 1) * 1000],
                                  params=params[i * 100:(i + 1) * 100])
        self.client.set_terminated(run_id, run.status, end_time=run.end_ms)
        return run_id

    def backfill(self, rows) -> int:
        """Log rows present in Parquet but missing from MLflow (a crash between the two)."""
        missing = [(row, None, None) for row in rows if row["trial_id"] not in self.logged]
        for i in range(0, len(missing), 1000):  # one transaction per thousand on a SQL store
            self.log_many(missing[i:i + 1000])
        return len(missing)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent, status)


@dataclass
class _Run:
    name: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: list[tuple[str, float, int]]  # (key, value, step)
    status: str  # FINISHED, FAILED or KILLED (stopped early by a search's scheduler)
    start_ms: int
    end_ms: int


class _SqlRuns:
    """Finished runs inserted straight into a SQL tracking store, a whole batch in one transaction.

    MLflow's client makes a run in three calls (create, log_batch, terminate), each its own transaction
    of a dozen statements through the ORM: 10-25 ms of CPU a run on SQLite, more than a trivial Ray Tune
    trial costs. A sweep only ever writes runs that are already finished, so it can write each one's rows
    (runs, tags, params, metrics, latest_metrics) as plain multi-row INSERTs into the tables of MLflow's
    own SQLAlchemy models, on the engine of MLflow's own store (whose migrations made them). Those models
    are MLflow's internal schema: if this MLflow's differ from what this code knows, ``for_client``
    returns None and the client's calls are used; tests read the inserted runs back through MLflow's
    public client and UI. Atomic, too: a crash leaves a batch either wholly logged or absent.
    """

    def __init__(self, store, experiment):
        from mlflow.store.tracking.dbmodels import models

        self._store, self._m = store, models
        self._exp_id = int(experiment.experiment_id)
        self._artifact_root = experiment.artifact_location

    @classmethod
    def for_client(cls, client, exp_id: str) -> "_SqlRuns | None":
        try:
            from mlflow.store.tracking.dbmodels import models
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = client._tracking_client.store
            if not isinstance(store, SqlAlchemyStore):
                return None  # a tracking server: its REST API, through the client
            known = {"runs": {"run_uuid", "name", "status", "start_time", "end_time", "lifecycle_stage",
                              "artifact_uri", "experiment_id", "user_id", "source_type"},
                     "tags": {"key", "value", "run_uuid"}, "params": {"key", "value", "run_uuid"},
                     "metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
                     "latest_metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"}}
            tables = {t.__tablename__: t.__table__ for t in (models.SqlRun, models.SqlTag, models.SqlParam,
                                                              models.SqlMetric, models.SqlLatestMetric)}
            for name, cols in known.items():
                table = tables[name]
                have = set(table.columns.keys())
                required = {c.name for c in table.columns if not c.nullable and c.default is None
                            and c.server_default is None and not c.primary_key}
                if not cols <= have or not required <= cols:
                    return None  # an MLflow whose schema this code does not know
            return cls(store, client.get_experiment(exp_id))
        except (ImportError, AttributeError, KeyError):
            return None

    def insert(self, runs: list[_Run]) -> list[str]:
        import uuid

        from mlflow.utils.uri import append_to_uri_path
        from sqlalchemy import insert

        m = self._m
        run_rows, tags, params, metrics, latest = [], [], [], [], []
        ids = [uuid.uuid4().hex for _ in runs]
        for run_id, run in zip(ids, runs):
            run_rows.append(dict(
                run_uuid=run_id, name=run.name, experiment_id=self._exp_id, user_id="unknown",
                status=run.status, start_time=run.start_ms, end_time=run.end_ms, deleted_time=None,
                lifecycle_stage="active", source_type="UNKNOWN", source_name="", entry_point_name="",
                source_version="", artifact_uri=append_to_uri_path(self._artifact_root, run_id, "artifacts")))
            tags += [dict(run_uuid=run_id, key=k, value=v) for k, v in {"mlflow.runName": run.name, **run.tags}.items()]
            params += [dict(run_uuid=run_id, key=k, value=v) for k, v in run.params.items()]
            last: dict[str, dict] = {}
            for key, value, step in run.metrics:
                rec = dict(run_uuid=run_id, key=key, value=value, timestamp=run.end_ms, step=step, is_nan=False)
                metrics.append(rec)
                if key not in last or (step, value) > (last[key]["step"], last[key]["value"]):
                    last[key] = rec  # MLflow's rule: the latest is the highest (step, timestamp, value)
            latest += last.values()
        try:  # MLflow >= 3.x marks sessions that write; earlier ones take no argument
            transaction = self._store.ManagedSessionMaker(read_only=False)
        except TypeError:
            transaction = self._store.ManagedSessionMaker()
        with transaction as session:  # one transaction, committed on exit
            for model, recs in ((m.SqlRun, run_rows), (m.SqlTag, tags), (m.SqlParam, params),
                                (m.SqlMetric, metrics), (m.SqlLatestMetric, latest)):
                if recs:
                    session.execute(insert(model.__table__), recs)
        return ids


class BackgroundTracker:
    """A :class:`Tracker` in a process of its own (``python -m sweep.tracking``), fed pickled rows on
    its stdin.

    MLflow costs ~20 ms of Python per run (SQLAlchemy, three calls per trial); on the driver's thread that
    time stalls Tune's event loop. Here the driver only pickles the row; the process is the single MLflow
    writer. If the driver dies, stdin closes and the process stops: rows it never got are in Parquet, and
    ``sweep resume`` backfills them. The experiment and parent run are set up while Ray starts;
    :meth:`wait_ready` raises a bad tracking URI as an error before any trial runs. A plain subprocess,
    not ``multiprocessing``: its spawn re-imports the caller's main script, which breaks scripts that call
    ``run_sweep`` without a ``__main__`` guard.
    """

    def __init__(self, uri: str, sweep: str, results_dir: str | Path, spec: dict | None = None):
        self._proc = subprocess.Popen([sys.executable, "-m", "sweep.tracking"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, cwd=str(Path(__file__).resolve().parents[1]))
        self._ready = self._dead = False
        # The registry is read here: the MLflow process then imports neither torch nor the defenses.
        self._put((uri, sweep, str(results_dir), spec, defense_outputs()))

    def __getstate__(self):
        # Tune pickles its callbacks (and so this) into its experiment state; a process does not pickle,
        # and a restored copy could not reach it anyway.
        return {}

    def wait_ready(self) -> None:
        if self._ready:
            return
        msg = self._proc.stdout.readline().decode().strip() or "the MLflow process exited while starting"
        if msg != "ready":
            self._proc.wait()
            raise RuntimeError(f"MLflow tracking could not start: {msg}")
        self._ready = True

    def log(self, row: dict, curves: dict | None = None, artifacts: dict | None = None) -> None:
        self.log_many([(row, curves, artifacts)])

    def log_many(self, items) -> None:
        """``(row, curves, artifacts)`` triples, written together (one transaction on a SQL store)."""
        self._put(("log_many", list(items)))

    def backfill(self, rows) -> None:
        self._put(("backfill", list(rows)))

    def _put(self, msg) -> None:
        if self._dead:
            return
        try:
            pickle.dump(msg, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):  # it died: the sweep goes on, Parquet has every row
            self._dead = True
            print("[sweep] the MLflow process stopped; rows go on to Parquet, and `sweep resume` logs them "
                  "to MLflow", file=sys.stderr)

    def close(self, status: str = "FINISHED") -> None:
        """Wait until every row sent has been logged, then mark the parent run ``status``."""
        self._put(("close", status))
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        if self._proc.wait() != 0 and self._ready:
            print("[sweep] MLflow logging failed for some trials (see above); Parquet has every row, and "
                  "`sweep resume` logs what MLflow is missing", file=sys.stderr)


def _serve() -> int:
    """The MLflow process: one Tracker; messages from stdin in order until "close" or the driver is gone."""
    stdin, out = sys.stdin.buffer, sys.stdout
    try:
        tracker = Tracker(*pickle.load(stdin))
    except Exception as e:  # noqa: BLE001 - handed to the driver, which raises it
        print(f"{type(e).__name__}: {e}".replace("\n", " "), file=out, flush=True)
        return 1
    print("ready", file=out, flush=True)
    # Lowest CPU priority: on a machine that also runs trials, the trials come first and MLflow catches
    # up in the gaps (close() waits for it). On a cluster the tracking server does the heavy part anyway.
    os.nice(19)
    failed = 0
    while True:
        try:
            kind, *args = pickle.load(stdin)
        except EOFError:  # the driver died: stop; `sweep resume` backfills from Parquet
            return 1
        try:
            if kind == "log_many":
                tracker.log_many(*args)
            elif kind == "backfill":
                tracker.backfill(*args)
            else:
                tracker.close(*args)
                out.flush()
                sys.stderr.flush()
                # Every write is committed; skip the interpreter's teardown of MLflow/SQLAlchemy (seconds).
                os._exit(1 if failed else 0)
        except Exception as e:  # noqa: BLE001 - one bad row must not stop the others from being logged
            failed += 1
            print(f"[sweep] MLflow: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _to_numpy_image(t):
    """(C, H, W) or (N, C, H, W) float in [0, 1] -> an HWC uint8 array (a grid for N images)."""
    import numpy as np
    import torch
    from torchvision.utils import make_grid

    if not torch.is_tensor(t):
        # Arrays from a Ray result are read-only views of its object store; copy so torch may own them.
        t = torch.from_numpy(np.array(t, dtype=np.float32))
    t = t.detach().float().cpu()
    if t.dim() == 4:
        t = make_grid(t, nrow=min(8, len(t)), padding=1)
    t = (t - t.min()) / (t.max() - t.min() + 1e-12) if (t.min() < 0 or t.max() > 1) else t
    return (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()



if __name__ == "__main__":
    sys.exit(_serve())
