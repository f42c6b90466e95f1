"""The ``sweep`` command: run, resume, validate, import, report, ui, list."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from sweep.spec import SpecError, expand, load_spec, narrow


def _load_or_exit(spec_path: str):
    """Parse and fully expand a spec; on any problem print every field at fault and exit 2."""
    try:
        spec = load_spec(spec_path)
        return spec, expand(spec)
    except SpecError as e:
        click.echo(f"invalid spec {spec_path}:", err=True)
        for field, msg in e.problems:
            click.echo(f"  {field}: {msg}", err=True)
        sys.exit(2)


def _duration(v):
    """'90m', '2h30m', '1.5h', '45s', '3600' (seconds) -> seconds; None -> None."""
    if v is None:
        return None
    import pandas as pd

    try:
        text = re.sub(r"(\d)d", r"\1D", str(v).strip())  # days: pandas wants 'D'
        seconds = float(text) if text.replace(".", "", 1).isdigit() else pd.Timedelta(text).total_seconds()
    except ValueError:
        raise click.BadParameter(f"{v!r} is not a duration (for example 90m, 2h30m, 3600)")
    if seconds <= 0:
        raise click.BadParameter(f"{v!r} is not a positive duration")
    return seconds


_time_limit_option = click.option(
    "--time-limit", default=None, callback=lambda ctx, param, v: _duration(v), metavar="DURATION",
    help="start no trial expected to end later than this from now (90m, 2h30m, 3600): a piece that fits a "
         "session or a reservation; the next run takes the rest")


@click.group()
def main():
    """Backdoor-robustness sweeps: attacks × defenses × hyperparameters × seeds on Ray Tune."""


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--results", "results_dir", required=True, type=click.Path(file_okay=False), help="results directory")
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray)")
@click.option("--mlflow-uri", default=None, help="MLflow tracking URI (default: sqlite:///RESULTS/mlflow.db)")
@click.option("--storage", default=None, help="where cached datasets and backdoored models live (default: RESULTS/store)")
@click.option("--retry-failed", is_flag=True, help="run again the trials recorded as failed")
@click.option("--max-concurrent", type=int, default=None, help="at most this many trials at once")
@click.option("--quiet", is_flag=True, help="no progress line")
@click.option("--seed", "seeds", type=int, multiple=True, help="run only this seed of the spec (repeatable)")
@click.option("--attack", "attacks", multiple=True, help="run only this attack of the spec, by name; NAME#K: the K-th of that name (repeatable)")
@click.option("--defense", "defenses", multiple=True, help="run only this defense of the spec, by name; NAME#K: the K-th of that name (repeatable)")
@_time_limit_option
def run(spec_path, results_dir, address, mlflow_uri, storage, retry_failed, max_concurrent, quiet, seeds, attacks,
        defenses, time_limit):
    """Run the trials of SPEC that are not yet in RESULTS (with --seed/--attack/--defense: a piece of it;
    the rest runs later into the same RESULTS)."""
    spec, trials = _load_or_exit(spec_path)
    if seeds or attacks or defenses:
        try:
            spec = narrow(spec, seeds, attacks, defenses)
        except SpecError as e:
            for field, msg in e.problems:
                click.echo(f"  {field}: {msg}", err=True)
            sys.exit(2)
    _run(spec, results_dir, address, mlflow_uri, storage, retry_failed, max_concurrent, quiet, time_limit)


@main.command()
@click.argument("results_dir", metavar="RESULTS", type=click.Path(exists=True, file_okay=False))
@click.option("--address", default=None)
@click.option("--mlflow-uri", default=None)
@click.option("--storage", default=None)
@click.option("--quiet", is_flag=True)
@_time_limit_option
def resume(results_dir, address, mlflow_uri, storage, quiet, time_limit):
    """Finish the sweep in RESULTS (its spec.yaml) after its driver died: runs only missing trials."""
    spec, _ = _load_or_exit(str(Path(results_dir) / "spec.yaml"))
    _run(spec, results_dir, address, mlflow_uri, storage, False, None, quiet, time_limit)


def _run(spec, results_dir, address, mlflow_uri, storage, retry_failed, max_concurrent, quiet, time_limit=None):
    from sweep.report import search_summary, table, to_markdown
    from sweep.results import load
    from sweep.runner import run_sweep

    try:
        s = run_sweep(spec, results_dir, address=address, mlflow_uri=mlflow_uri, storage=storage,
                      retry_failed=retry_failed, max_concurrent=max_concurrent, progress=not quiet,
                      time_limit=time_limit)
    except SpecError as e:  # data that is missing or malformed, found before any trial started
        for field, msg in e.problems:
            click.echo(f"{field}: {msg}", err=True)
        sys.exit(2)
    why = [w for n, w in ((s.left - s.stopped, "time limit"), (s.stopped, "stopped")) if n]
    left = f", {s.left} left for the next run ({' and '.join(why)})" if s.left else ""
    click.echo(f"sweep {spec.name}: {s.trials} trials, {s.skipped} already done, {s.ran} ran "
               f"({s.failed} failed){left} in {s.seconds:.0f}s -> {results_dir}")
    df = load(results_dir)
    click.echo(to_markdown(table(df)))
    for text in search_summary(df, spec.search):  # a search's best configuration per attack
        click.echo("\n" + text)


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--results", "results_dir", default=None, type=click.Path(file_okay=False),
              help="also say what of SPEC this results directory holds and what is left to run")
@click.option("--storage", default=None, help="the model store to look in (default: RESULTS/store)")
@click.option("--by-model", is_flag=True,
              help="with --results: what is left of each backdoored model, its expected time, and the "
                   "--seed/--attack flags that run it as a piece")
def validate(spec_path, results_dir, storage, by_model):
    """Check SPEC and print how many trials and backdoored models it asks for (with --results: how many
    are done, and what a `sweep run` would still run and build)."""
    spec, trials = _load_or_exit(spec_path)
    keys = {t.model_key for t in trials}
    _describe(spec, trials, keys)
    if by_model and results_dir is None:
        click.echo("--by-model: give --results, the directory whose rows say what is left", err=True)
        sys.exit(2)
    if results_dir is not None:
        _left(trials, results_dir, storage, spec.max_concurrent, spec if by_model else None)


def _describe(spec, trials, keys) -> None:
    if spec.search is not None:
        from sweep.search import describe, groups

        gs = groups(spec)
        keys |= {g.key for g in gs}
        click.echo(f"{spec.name}: {len(trials)} grid trials, {len(gs)} × {spec.search.num_samples} searched trials, "
                   f"{len(keys)} backdoored models")
        click.echo(f"  {describe(spec.search)}")
        return
    ckpt = {t.model_key for t in trials if t.checkpoint is not None}
    files = {t.checkpoint["path"] for t in trials if t.checkpoint is not None}
    where = (f" ({len(keys) - len(ckpt)} to train, {len(files)} checkpoint file(s) read and measured once per "
             f"seed)") if ckpt else ""
    click.echo(f"{spec.name}: {len(trials)} trials, {len(keys)} backdoored models{where}")


def _left(trials, results_dir, storage, slots=None, by_model=None) -> None:
    """What of ``trials`` RESULTS holds, and what a run would still do, per defense (grid trials), with the
    time it should take by the rows RESULTS holds (the progress line's estimate: sweep.runner.EtaEstimator);
    given ``by_model`` (the spec), the same per backdoored model."""
    from collections import Counter

    from sweep.results import load
    from sweep.runner import EtaEstimator, _models_in_store, _training_time_defenses, format_seconds

    try:
        rows = load(results_dir)
    except FileNotFoundError:
        rows = None
    status = {} if rows is None else dict(zip(rows.trial_id, rows.status))
    mine = [next((status[i] for i in t.ids if i in status), None) for t in trials]
    todo = [t for t, st in zip(trials, mine) if st is None]
    training_time = _training_time_defenses({t.defense.name for t in todo})
    need = {t.model_key for t in todo if t.defense.name not in training_time}
    have = _models_in_store(storage or str(Path(results_dir) / "store"), need)
    per = Counter(t.defense.name for t in todo)
    failed = mine.count("failed")
    click.echo(f"  in {results_dir}: {mine.count('ok')} ok, {failed} failed"
               + (" (run again with --retry-failed)" if failed else "")
               + f", {mine.count('stopped')} stopped; {len(todo)} to run"
               + (f" ({', '.join(f'{d} {n}' for d, n in per.most_common())})" if per else "")
               + f"; models they need: {len(have)} in the store, {len(need - have)} to build")
    if not todo:
        return
    records = [] if rows is None else rows.to_dict("records")

    def expected(part):
        eta = EtaEstimator.for_trials(part, trials, records, have_models=have, training_time=training_time,
                                      slots=slots)
        eta.peak = slots or 1
        return eta.eta(0.0)

    secs = expected(todo)
    at = f"{slots} at a time" if slots and slots > 1 else "one at a time"
    click.echo(f"  expected time, {at}, by the rows here: "
               + ("unknown (no finished trial to go by)" if secs is None else format_seconds(secs)))
    if by_model is not None:
        _left_by_model(by_model, todo, have, expected)


def _left_by_model(spec, todo, have, expected) -> None:
    """One line per backdoored model with trials left: the flags that run it as a piece of the sweep
    (``--seed S --attack NAME#K``), whether its model is in the store, what is left and how long it should
    take. Models in the store first (a piece that finishes them needs no build, and a new machine's empty
    store would cost their builds again), then the shortest."""
    from collections import Counter

    from sweep.runner import format_seconds
    from sweep.spec import expand, narrow

    names = [e.get("name") for e in spec.attacks]
    label = {}  # model_key -> (seed, the --attack value that picks its spec entry, and which of its grid)
    for i, name in enumerate(names):
        flag = name if names.count(name) == 1 else f"{name}#{names[:i + 1].count(name)}"
        entry = expand(narrow(spec, attacks=[flag]))
        # an entry with a grid (poison_rate: [0.05, 0.1]) is one piece of several models: name each one's values
        grid = [k for k in entry[0].attack.params if len({repr(t.attack.params.get(k)) for t in entry}) > 1]
        for t in entry:
            which = ", ".join(f"{k} {t.attack.params[k]}" for k in grid)
            label.setdefault(t.model_key, (t.seed, flag + (f" ({which})" if which else "")))
    groups: dict[str, list] = {}
    for t in todo:
        groups.setdefault(t.model_key, []).append(t)
    lines = []
    for key, part in groups.items():
        seed, flag = label[key]
        secs = expected(part)
        per = ", ".join(f"{d} {n}" for d, n in Counter(t.defense.name for t in part).most_common())
        lines.append((key not in have, float("inf") if secs is None else secs,
                      f"    --seed {seed} --attack {flag}:{' in the store;' if key in have else ''} "
                      f"{len(part)} to run ({per}), {'unknown' if secs is None else format_seconds(secs)}"))
    click.echo("  left by backdoored model (the flags that run it as a piece; models in the store first):")
    for *_, line in sorted(lines):
        click.echo(line)


@main.command()
@click.argument("results_dir", metavar="RESULTS", type=click.Path(exists=True, file_okay=False))
@click.option("--metric", "metrics", multiple=True, default=None,
              type=click.Choice(["clean_acc", "ca_change", "asr", "robust_acc", "der"]),
              help="metrics to tabulate (default: CA and ASR printed; CA, ΔCA, ASR, RA and DER in files)")
@click.option("--format", "fmt", type=click.Choice(["md", "html", "csv"]), default=None,
              help="write a report file with tables and plots instead of printing the table")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="report file (default: RESULTS/report/report.FORMAT; figures beside it for md/csv)")
@click.option("--mlflow-uri", default=None, help="where the trials' trigger images are (default: RESULTS' store)")
@click.option("--published", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV of published figures to set beside ours (columns: attack, defense, optional attack.P / "
                   "defense.P selectors, ca_before, asr_before, ca, asr in %, source, setting)")
def report(results_dir, metrics, fmt, out, mlflow_uri, published):
    """The attack × defense tables (mean ± std over seeds, in %): printed, or as an md/html/csv report."""
    from sweep.report import (REPORT_METRICS, frame_markdown, published_table, read_published, table, to_markdown,
                              write_report)
    from sweep.results import load

    ref = None
    if published:
        try:
            ref = read_published(published)
        except ValueError as e:
            click.echo(f"--published: {e}", err=True)
            sys.exit(2)
    if fmt:
        path = write_report(results_dir, fmt, out, mlflow_uri, metrics or REPORT_METRICS,
                            published=published)
        click.echo(f"report written to {path}")
        return
    from sweep.report import search_summary
    from sweep.search import spec_of

    df = load(results_dir)
    click.echo(to_markdown(table(df, metrics or ("clean_acc", "asr"))))
    if ref is not None:
        click.echo("\nPublished figures beside ours (%, before → after):\n\n" + frame_markdown(published_table(df, ref)))
    saved = spec_of(results_dir)
    for text in search_summary(df, saved.search if saved is not None else None):
        click.echo("\n" + text)
    failed = int((df.status == "failed").sum())
    if failed:
        click.echo(f"\n{failed} failed trial(s); see the 'error' column of the results.")


@main.command(name="import")
@click.argument("sources", metavar="ROWS...", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--results", "results_dir", required=True, type=click.Path(file_okay=False), help="results directory")
def import_(sources, results_dir):
    """Add trial rows (a committed trials.parquet, another results directory) to RESULTS, so that a
    `sweep run` there skips the trials they hold: how a spec run in pieces goes on on a new machine."""
    from sweep.results import import_rows

    try:
        n, new = import_rows(results_dir, list(sources))
    except ValueError as e:
        click.echo(f"nothing imported: {e}", err=True)
        sys.exit(2)
    click.echo(f"{n} rows read, {new} trials new to {results_dir}")


@main.command()
@click.argument("results_dir", metavar="RESULTS", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to bind (localhost unless told otherwise)")
@click.option("--port", default=5000, show_default=True)
def ui(results_dir, host, port):
    """Start the MLflow UI on the sweep's tracking store."""
    import subprocess

    from sweep.tracking import default_uri

    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", default_uri(results_dir),
           "--host", host, "--port", str(port), "--workers", "1"]  # one viewer needs one worker, not four
    click.echo(f"MLflow UI at http://{host}:{port}  ({' '.join(cmd[2:])})")
    sys.exit(subprocess.call(cmd))


@main.command(name="list")
def list_():
    """List the registered datasets, models, attacks and defenses."""
    from attacks import ATTACKS
    from defenses import DEFENSES
    from kernel.data import DATASETS
    from kernel.models import MODELS

    for reg in (DATASETS, MODELS, ATTACKS, DEFENSES):
        click.echo(f"{reg.kind}s: {', '.join(reg.names())}")


if __name__ == "__main__":
    main()
