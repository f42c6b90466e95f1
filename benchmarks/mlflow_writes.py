"""CPU per MLflow run: the tracker's bulk SQL inserts against MLflow's own client calls, same rows.

Each trial row gets a 20-epoch curve (60 metric points), as a trained trial logs; rows go in batches of
256, as the driver sends them after each Parquet flush. Run (from the project root)::

    .venv/bin/python benchmarks/mlflow_writes.py --runs 1000
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep.spec import expand, parse_spec  # noqa: E402
from sweep.testing import trivial_body  # noqa: E402
from sweep.tracking import Tracker, default_uri  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--client-runs", type=int, default=200, help="runs timed through the client (slower)")
    args = p.parse_args()
    spec = parse_spec({"name": "m", "dataset": {"name": "synthetic", "train_size": 100, "test_size": 100},
                       "model": "small_cnn", "seeds": list(range(args.runs)), "attacks": [{"name": "none"}],
                       "defenses": [{"name": "none"}]})
    rows = [trivial_body(t, None).row for t in expand(spec)]
    curves = {"train": [{"epoch": e, "loss": 1.0 / (e + 1), "lr": 0.1} for e in range(20)]}
    for how, n in (("bulk SQL", args.runs), ("client", min(args.client_runs, args.runs))):
        with tempfile.TemporaryDirectory() as d:
            t = Tracker(default_uri(d), "m", d)
            if how == "client":
                t._sql = None  # MLflow's client: create_run, log_batch, set_terminated per run
            c0, w0 = time.process_time(), time.perf_counter()
            for i in range(0, n, 256):
                t.log_many([(r, curves, {}) for r in rows[i:min(i + 256, n)]])
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            print(f"{how:<9} {n} runs: {1000 * cpu / n:.2f} ms CPU/run, {1000 * wall / n:.2f} ms wall/run")


if __name__ == "__main__":
    main()
