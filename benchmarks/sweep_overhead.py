"""Engine overhead per trial: N trials of a trivial body through the whole engine against bare Ray Tune.

(a) engine: a spec of N trials (attack none × defense none × N seeds) -> expand -> Ray Tune (actor reuse,
    automatic loggers off) -> the driver's single writer -> Parquet + MLflow (SQLite), exactly as
    `sweep run` does, with :func:`sweep.testing.trivial_body` in place of the trial's training.
(b) bare: the same body as a Tune function trainable over a grid of N seeds, with actor reuse and the
    automatic per-trial loggers off (the fastest plain Tune set-up), results discarded. Its configs
    are one int each: a grid over the full trial dicts would make Tune's grid expansion (which
    deep-copies the whole space once per variant) quadratic, and flatter the engine.

Each runs in its own Python process, so each reports its own driver peak RSS. The last line is
``engine/bare ratio: X``. Run (from the project root)::

    .venv/bin/python benchmarks/sweep_overhead.py --trials 1000
    .venv/bin/python benchmarks/sweep_overhead.py --trials 10000 --only engine   # driver memory at 10k
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _bare_body(config, template):
    from ray import tune

    from sweep.spec import Trial
    from sweep.testing import trivial_body

    trial = Trial.from_dict({**template, "seed": config["seed"], "trial_id": str(config["seed"])})
    out = trivial_body(trial, None)
    tune.report({"row_json": json.dumps(out.row)})


def _spec(n: int) -> dict:
    return {"name": f"overhead{n}", "dataset": {"name": "synthetic", "train_size": 100, "test_size": 100},
            "model": "small_cnn", "seeds": list(range(n)), "attacks": [{"name": "none"}],
            "defenses": [{"name": "none"}], "resources": {"cpu": 1}}


def run_engine(n: int, tmp: str) -> dict:
    from sweep.runner import run_sweep
    from sweep.spec import parse_spec
    from sweep.testing import trivial_body

    spec = parse_spec(_spec(n))
    t0 = time.perf_counter()
    s = run_sweep(spec, Path(tmp) / "res", progress=False, body=trivial_body)
    seconds = time.perf_counter() - t0
    import pandas as pd

    rows = len(pd.read_parquet(Path(tmp) / "res" / "trials"))
    assert s.ran == n and rows == n, (s, rows)
    return {"seconds": seconds, "rows": rows}


def run_bare(n: int, tmp: str) -> dict:
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import logging

    import ray
    from ray import tune

    from sweep.spec import expand, parse_spec

    t0 = time.perf_counter()
    template = expand(parse_spec(_spec(1)))[0].as_dict()
    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_bare_body, template=template), {"cpu": 1}),
        param_space={"seed": tune.grid_search(list(range(n)))},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(Path(tmp) / "ray"), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
    )
    grid = tuner.fit()
    seconds = time.perf_counter() - t0
    assert len(grid) == n
    return {"seconds": seconds, "rows": len(grid)}


def child(which: str, n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        r = (run_engine if which == "engine" else run_bare)(n, tmp)
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--only", choices=["engine", "bare"], default=None)
    p.add_argument("--child", choices=["engine", "bare"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.trials)
    results = {}
    for which in [args.only] if args.only else ["engine", "bare"]:
        out = subprocess.run([sys.executable, __file__, "--child", which, "--trials", str(args.trials)],
                             capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{which} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[which] = json.loads(line[7:])
        r = results[which]
        print(f"{which:<7} {args.trials} trials: {r['seconds']:.1f} s ({1000 * r['seconds'] / args.trials:.1f} ms/trial), "
              f"driver peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    if len(results) == 2:
        print(f"engine/bare ratio: {results['engine']['seconds'] / results['bare']['seconds']:.2f}")


if __name__ == "__main__":
    main()
