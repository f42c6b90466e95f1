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
from pathlib import Path

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no migration chatter on first use
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # clusters are often offline; never phone home
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one "View run" line per trial otherwise

ROLE = "bdsweep.role"
PARAM_PREFIXES = ("attack.", "defense.")
METRICS = ("clean_acc", "asr", "robust_acc", "attack_clean_acc", "attack_asr", "attack_robust_acc",
           "attack_seconds", "defense_seconds")
TAGS = ("trial_id", "model_key", "attack", "defense", "dataset", "model", "seed", "status", "host", "device")


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

    def _children(self) -> set[str]:
        done, token = set(), None
        while True:
            page = self.client.search_runs([self.exp_id], f"tags.`{ROLE}` = 'trial'", max_results=5000, page_token=token)
            for r in page:
                if r.info.status in ("FINISHED", "FAILED"):
                    done.add(r.data.tags.get("trial_id"))
                else:  # a crash while logging it: start that run over
                    self.client.delete_run(r.info.run_id)
            token = page.token
            if not token:
                return done

    def log(self, row: dict, curves: dict | None = None, artifacts: dict | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if row["trial_id"] in self.logged:
            return
        tags = {k: str(row[k]) for k in TAGS if row.get(k) is not None}
        tags.update({ROLE: "trial", "mlflow.parentRunId": self.parent})
        outputs = self.outputs.get(row["defense"], {})  # defense-specific result columns
        numeric_outputs = [k for k, kind in outputs.items() if kind in ("float", "int")]
        tags.update({k: str(row[k]) for k in outputs if k not in numeric_outputs and row.get(k) is not None})
        name = f"{row['attack']}/{row['defense']}/seed{row['seed']}/{row['trial_id'][:6]}"
        run_id = self.client.create_run(self.exp_id, run_name=name, tags=tags).info.run_id
        now = int(time.time() * 1000)
        params = [Param(k, str(v)) for k, v in row.items() if k.startswith(PARAM_PREFIXES) and v is not None]
        params += [Param(k, str(row[k])) for k in ("dataset", "model", "seed")]
        metrics = [Metric(k, float(row[k]), now, 0) for k in METRICS if _finite(row.get(k))]
        metrics += [Metric(k, float(row[k]), now, 0) for k in numeric_outputs if _finite(row.get(k))]
        for phase, records in (curves or {}).items():
            for i, rec in enumerate(records):
                step = int(rec.get("epoch", rec.get("step", i)))
                metrics += [Metric(f"{phase}/{k}", float(v), now, step) for k, v in rec.items()
                            if k not in ("epoch", "step") and _finite(v)]
        extra_tags = [RunTag("error", str(row["error"])[:5000])] if row.get("error") else []
        chunks = max(math.ceil(len(metrics) / 1000), math.ceil(len(params) / 100), 1)  # MLflow's batch limits
        for i in range(chunks):
            self.client.log_batch(run_id, metrics=metrics[i * 1000:(i + 1) * 1000],
                                  params=params[i * 100:(i + 1) * 100], tags=extra_tags if i == 0 else [])
        for name, image in (artifacts or {}).items():
            self.client.log_image(run_id, _to_numpy_image(image), f"{name}.png")
        self.client.set_terminated(run_id, "FINISHED" if row["status"] == "ok" else "FAILED")
        self.logged.add(row["trial_id"])

    def backfill(self, rows) -> int:
        """Log rows present in Parquet but missing from MLflow (a crash between the two)."""
        n = 0
        for row in rows:
            if row["trial_id"] not in self.logged:
                self.log(row)
                n += 1
        return n

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent, status)


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
        self._put(("log", row, curves, artifacts))

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
            if kind == "log":
                tracker.log(*args)
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
    import torch
    from torchvision.utils import make_grid

    t = torch.as_tensor(t).detach().float().cpu()
    if t.dim() == 4:
        t = make_grid(t, nrow=min(8, len(t)), padding=1)
    t = (t - t.min()) / (t.max() - t.min() + 1e-12) if (t.min() < 0 or t.max() > 1) else t
    return (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()



if __name__ == "__main__":
    sys.exit(_serve())
