"""Searches: Ray Tune's search algorithms (and optionally ASHA early stopping) over one defense's parameters.

A spec's ``search:`` section (:class:`sweep.spec.SearchSpec`) names a defense, a space over some of its
parameters, an objective on the result columns, a trial budget and concurrency. The search runs once per
backdoored model of the spec (each attack variant × seed: a *group*), ``num_samples`` trials each. Each
searched configuration is an ordinary trial (its row has the parameters in the ``defense.<p>`` columns and
a content-hash ``trial_id``), plus the columns ``search`` (the search's name), ``search_objective``,
``search_mode`` and ``search_rank`` (1 = best of its group; written when the run ends).

What is where:

- :func:`check_search`: the space validated before any trial starts (called by ``parse_spec``): each bound
  and choice goes through the defense's own ``Params`` and the spec's cross-field checks (the clean pool),
  by expanding a probe spec with one defense entry per bound; problems name ``search.*`` fields.
- :func:`objective_value`: the objective of a row (or of a defense's per-round record): the metric, with
  a penalty of 1 + excess/100 past ``max_ca_drop`` points of CA, so that every trial within the
  constraint ranks above every trial past it.
- :func:`reporting`: while a searched trial runs, every ``ctx.log`` record of the defense that carries
  CA and ASR is reported to Tune as the running objective (defenses are unchanged: ``DefenseContext.log``
  is wrapped for the trial's duration in its worker). ASHA stops trials on those reports; the driver
  records a stopped trial as a row with ``status`` ``stopped`` and the metrics of its last report.
- ``sweep.runner.SearchFeed``: the Tune searcher (in the runner, with the searchers it wraps: this module
  does not import Ray, so that validating a spec does not either). It wraps Tune's own (``OptunaSearch``
  with TPE by default, ``HyperOptSearch``, or random draws from Tune's domains), turns each suggestion into
  the trial it resolves to, and never runs a trial twice: a suggestion whose trial is already in the
  results (or in flight) is answered from the results, and the searcher asked again.
- Resume: the finished trials of a group (its rows) are fed back to the searcher before it suggests
  anything (``add_evaluated_point`` for Optuna, replayed ``points_to_evaluate`` for HyperOpt), and the
  group runs only ``num_samples`` minus its finished trials.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from sweep.spec import SearchSpec, SpecError, SweepSpec, Trial, Variant, expand, file_params, legacy_ids, trial_id

INSTALL = "pip install -e '.[search]'"
_PACKAGES = {"optuna": "optuna", "hyperopt": "hyperopt", "random": None}


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------------------------------
# Validation


def _entry(search: SearchSpec, values: dict) -> dict:
    return {"name": search.defense_name, **search.fixed, **values}


def _probes(search: SearchSpec) -> list[dict]:
    """Defense entries that together hold every bound and choice of the space: one parameter at one of its
    values (the rest at their fixed values or defaults), then all parameters at their first values and all at
    their last."""
    out = []
    for p, dist in search.space.items():
        out += [{p: v} for v in dist.values_to_check()]
    if len(search.space) > 1:
        out.append({p: d.values_to_check()[0] for p, d in search.space.items()})
        out.append({p: d.values_to_check()[-1] for p, d in search.space.items()})
    return out


_DEFENSE_LOC = re.compile(r"^defenses\[(\d+)\](?:\.([A-Za-z0-9_]+))?")


def check_search(spec: SweepSpec) -> None:
    """Raise SpecError naming ``search.*`` fields when the search cannot run as given."""
    from defenses import DEFENSES

    s = spec.search
    problems: list[tuple[str, str]] = []
    name = s.defense_name
    if name not in DEFENSES:
        raise SpecError([("search.defense", f"unknown defense {name!r}; known: {', '.join(DEFENSES.names())}")])
    cls = DEFENSES.get(name)
    fields = cls.Params.model_fields
    for p in s.space:
        if p not in fields:
            problems.append((f"search.space.{p}", f"not a parameter of {name}; its parameters: {', '.join(fields) or 'none'}"))
        elif p in s.fixed:
            problems.append((f"search.space.{p}", "also fixed in search.defense; a parameter is searched or fixed"))
    for p, v in s.fixed.items():
        if isinstance(v, list) and p in fields and not _list_typed(fields[p]):
            problems.append((f"search.defense.{p}", "a search holds its other parameters at one value each "
                                                    "(a grid of them goes in defenses:)"))
    pkg = _PACKAGES[s.searcher]
    if pkg and not _has_module(pkg):
        problems.append(("search.searcher", f"searcher {s.searcher} needs the optional package {pkg}, which is not "
                                            f"installed: {INSTALL} (or pip install {pkg})"))
    needs_before = s.objective.metric == "der" or s.objective.max_ca_drop is not None
    if needs_before and not cls.needs_backdoored_model and not any(
            e.get("name") in DEFENSES and DEFENSES.get(e["name"]).needs_backdoored_model for e in spec.defenses):
        problems.append(("search.objective", f"{name} trains its own model, so its rows have no backdoored model's CA "
                                             "and ASR to compare with (DER, max_ca_drop) unless the sweep builds one: "
                                             "add {name: none} to defenses"))
    if problems:
        raise SpecError(problems)

    probes = _probes(s)
    probe = spec.model_copy(update={"defenses": [_entry(s, v) for v in probes], "search": None, "seeds": spec.seeds[:1]})
    try:
        expand(probe)
    except SpecError as e:
        for field, msg in e.problems:
            m = _DEFENSE_LOC.match(field)
            if not m:
                continue  # the attacks', the dataset's: the spec's own expansion reports those
            values, param = probes[int(m.group(1))], m.group(2)
            if param in values:
                problems.append((f"search.space.{param}", f"{msg} (at {values[param]!r})"))
            elif param in s.fixed:
                problems.append((f"search.defense.{param}", msg))
            else:
                problems.append(("search.space" if param else "search.defense",
                                 f"{msg} (with {', '.join(f'{k}={v!r}' for k, v in values.items())})"))
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))


def _list_typed(field) -> bool:
    from sweep.spec import _is_list_typed

    return _is_list_typed(field.annotation)


# --------------------------------------------------------------------------------------------------
# Groups: one search per backdoored model (attack variant × seed)


@dataclasses.dataclass
class Group:
    """The search on one backdoored model: ``base`` is the trial of the defense at its fixed/default values."""

    search: SearchSpec
    base: Trial
    context: dict  # for the defense's Params: num_classes, shape

    @property
    def key(self) -> str:
        return self.base.model_key

    def trial(self, sampled: dict) -> Trial:
        """The trial a configuration resolves to (defaults filled in, id a content hash as in ``expand``);
        ValueError when the defense's Params refuse it."""
        from defenses import DEFENSES

        cls = DEFENSES.get(self.search.defense_name)
        params = cls.Params.model_validate({**self.search.fixed, **sampled}, context=self.context).model_dump(mode="json")
        for fname, path in file_params(cls, params):
            params[fname] = str(Path(path).expanduser().resolve())
        v = Variant(self.search.defense_name, params)
        # its own aliases, not the base trial's (another defense variant's)
        return dataclasses.replace(self.base, defense=v, trial_id=trial_id(self.key, v),
                                   aliases=legacy_ids(self.key, v))


def groups(spec: SweepSpec) -> list[Group]:
    """The search's groups in the spec's order (seeds, then attack variants)."""
    from kernel.data import dataset_info

    s = spec.search
    if s is None:
        return []
    info = dataset_info(spec.dataset.name)
    base = expand(spec.model_copy(update={"defenses": [_entry(s, {})], "search": None}))  # one per model
    ctx = {"num_classes": info.num_classes, "shape": info.shape}
    return [Group(s, t, ctx) for t in base]


def type_probes(spec: SweepSpec, gs: Optional[list[Group]] = None) -> list[Trial]:
    """Trials at the bounds of the space: what the ``defense.<p>`` columns' types are fixed from."""
    gs = groups(spec) if gs is None else gs
    if not gs:
        return []
    out = [gs[0].base]
    for values in _probes(spec.search):
        try:
            out.append(gs[0].trial(values))
        except ValueError:
            pass
    return out


# --------------------------------------------------------------------------------------------------
# The objective


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def objective_value(objective: dict, m: dict) -> Optional[float]:
    """The objective of a row or of a per-round record ``m`` (clean_acc, asr, robust_acc and the backdoored
    model's attack_clean_acc, attack_asr); None when it cannot be computed (a failed trial). ``objective``:
    a :class:`sweep.spec.SearchObjective` as a dict."""
    from kernel.metrics import der

    metric, mode, cap = objective["metric"], objective["mode"], objective.get("max_ca_drop")
    if metric == "der":
        vals = [m.get(k) for k in ("attack_asr", "asr", "attack_clean_acc", "clean_acc")]
        value = der(*map(float, vals)) if all(_finite(v) for v in vals) else None
    else:
        value = m.get(metric)
    if not _finite(value):
        return None
    value = float(value)
    ca, before = m.get("clean_acc"), m.get("attack_clean_acc")
    if cap is not None and _finite(ca) and _finite(before):
        excess = 100 * (before - ca) - cap
        if excess > 0:
            penalty = 1 + excess / 100
            value = value + penalty if mode == "min" else value - penalty
    return value


# --------------------------------------------------------------------------------------------------
# Inside a trial: the defense's per-round records reported to Tune


@contextmanager
def reporting(objective: dict, trial: Trial, store) -> Iterator[None]:
    """For the duration of one trial in a Tune worker: every ``DefenseContext.log`` record that carries the
    curve's CA and ASR is also reported to Tune as ``{"objective": ..., "step_json": ...}``, the objective
    against the backdoored model's stored figures. One trial runs in a worker process at a time, so the
    class attribute is the trial's own while it runs; it is restored after, whatever happens (a trial ASHA
    stops leaves through ``tune.report``, as SystemExit)."""
    from ray import tune

    from defenses.base import DefenseContext

    original = DefenseContext.log
    before: dict = {}

    def log(self, step, **metrics):
        original(self, step, **metrics)
        if not ("clean_acc" in metrics and "asr" in metrics):
            return
        if "loaded" not in before:
            record = store.load_record("models", trial.model_key) if store is not None else None
            before.update(loaded=True, **((record or {}).get("metrics") or {}))
        m = {**metrics, "attack_clean_acc": before.get("clean_acc"), "attack_asr": before.get("asr")}
        value = objective_value(objective, m)
        if value is not None:
            rec = {"step": step, **{k: float(v) for k, v in metrics.items() if _finite(v)}}
            tune.report({"objective": value, "step_json": json.dumps(
                {"record": rec, "before": {k: before[k] for k in ("clean_acc", "asr", "robust_acc") if k in before}})})

    DefenseContext.log = log
    try:
        yield
    finally:
        DefenseContext.log = original


# --------------------------------------------------------------------------------------------------
# Driver side: what the results already hold, the searchers, the feed


def _results_frame(results_dir):
    from sweep.results import _dedupe, _read_all

    table = _read_all(Path(results_dir))
    return None if table is None else _dedupe(table.to_pandas())


def _from_column(dist, v):
    """A value read back from a ``defense.<p>`` column as the search space holds it (or None)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    kind = dist.kind
    try:
        if kind == "choice":
            for c in dist.choice:
                if c == v or json.dumps(c) == v or str(c) == str(v):
                    return c
            for c in dist.choice:  # a number read back from a column of another type (100 as 100.0)
                try:
                    if _finite(c) and float(c) == float(v):
                        return c
                except (TypeError, ValueError):
                    pass
            return None
        if kind == "int":
            return int(round(float(v)))
        return float(v)
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class History:
    """What the results hold for one group: its own rows' configurations and objectives (fed back to the
    searcher; they use the budget) and the objective of every finished trial on its model (a suggestion
    that resolves to one of those is answered from here, not run)."""

    points: list[tuple[dict, Optional[float]]]
    known: dict[str, Optional[float]]

    @property
    def used(self) -> int:
        return len(self.points)


def results_frame(results_dir):
    """Every row of the results (one per trial), or None: what :func:`history` reads."""
    return _results_frame(results_dir)


def history(results, group: Group, retry_failed: bool = False) -> History:
    """``results``: a results directory, or its rows as read by :func:`results_frame` (None: no rows)."""
    df = _results_frame(results) if isinstance(results, (str, Path)) else results
    if df is None:
        return History([], {})
    s = group.search
    obj = s.objective.model_dump()
    rows = df[df.model_key == group.key]
    if retry_failed:
        rows = rows[rows.status != "failed"]
    points, known = [], {}
    for r in rows.to_dict("records"):
        mine = "search" in r and r["search"] == s.label
        value = r.get("search_objective") if mine else None
        if not _finite(value):
            value = objective_value(obj, r) if r["status"] == "ok" else None
        if r["defense"] == s.defense_name:
            known[r["trial_id"]] = value
        if mine:
            cfg = {p: _from_column(d, r.get(f"defense.{p}")) for p, d in s.space.items()}
            if all(v is not None for v in cfg.values()):
                points.append((cfg, value))
            else:  # a row the space cannot hold (an older space): it used budget, the searcher learns nothing
                points.append((None, value))
    return History(points, known)


def scheduler(search: SearchSpec):
    """Tune's ASHA on the running objective (``training_iteration``: one per report), or None."""
    if search.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    a = search.scheduler.asha
    return ASHAScheduler(metric="objective", mode=search.objective.mode, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor, max_t=a.max_t or 10**6)


# --------------------------------------------------------------------------------------------------
# Rows


def stopped_row(trial: Trial, search: SearchSpec, records: list[dict], result: dict) -> dict:
    """The row of a trial the scheduler stopped: the metrics of its last report (the curve's test sample).
    ``records``: its reports' ``step_json`` ({"record": the ctx.log record, "before": the backdoored
    model's stored figures})."""
    from datetime import datetime, timedelta, timezone

    from sweep.trial import base_row

    row = base_row(trial)
    last = records[-1]["record"] if records else {}
    now = datetime.now(timezone.utc)
    row.update(status="stopped", finished_at=now.isoformat(),
               error=f"stopped by ASHA after {len(records)} report(s); CA/ASR/RA are those of the last report "
                     "(the curve's test sample), not of the full test set",
               **{k: last[k] for k in ("clean_acc", "asr", "robust_acc") if k in last},
               **{f"attack_{k}": v for k, v in (records[-1]["before"] if records else {}).items()})
    if _finite(result.get("time_total_s")):
        row["started_at"] = (now - timedelta(seconds=float(result["time_total_s"]))).isoformat()
    row.update(search=search.label, search_mode=search.objective.mode,
               search_objective=result.get("objective") if _finite(result.get("objective")) else None)
    return row


def mark(row: dict, search: SearchSpec) -> dict:
    """A searched trial's row: its search and objective columns."""
    row.update(search=search.label, search_mode=search.objective.mode,
               search_objective=objective_value(search.objective.model_dump(), row) if row.get("status") == "ok" else None)
    return row


def ranks(df):
    """``search_rank`` of every row: 1 = the best objective of its (search, model_key) group in its mode,
    among its finished trials; null for rows of no search, failed trials and trials stopped early (their
    figures are a curve sample's at the step they were stopped, not the test set's)."""
    import pandas as pd

    out = pd.Series(pd.NA, index=df.index, dtype="Int64")
    if "search" not in df.columns:
        return out
    has = df.search.notna() & df.search_objective.notna() & (df.status == "ok")
    for _, g in df[has].groupby(["search", "model_key"]):
        asc = (g.search_mode.fillna("min") == "min").iloc[0]
        out.loc[g.index] = g.search_objective.rank(method="first", ascending=bool(asc)).astype("Int64")
    return out


def write_ranks(results_dir) -> None:
    """Rewrite the results with every row's ``search_rank`` (one compacted part, replaced atomically)."""
    import pyarrow.parquet as pq

    from sweep.results import _parts, compact

    if not any("search_rank" in pq.read_schema(p).names for p in _parts(Path(results_dir))):
        return

    def rank(df):
        df["search_rank"] = ranks(df).astype("float64")  # NaN -> null in the int64 column
        return df

    compact(results_dir, edit=rank)


def describe(search: SearchSpec) -> str:
    o = search.objective
    what = f"{o.mode} {o.metric}" + (f" with CA drop <= {o.max_ca_drop:g} points" if o.max_ca_drop is not None else "")
    sched = " + ASHA" if search.scheduler else ""
    return (f"search {search.label}: {search.defense_name} over {', '.join(search.space)}; {what}; "
            f"{search.searcher}{sched}, {search.num_samples} trials per attack variant and seed")


def spec_of(results_dir) -> Optional[SweepSpec]:
    """The spec saved with the results (for its search's space and objective), or None."""
    import yaml

    from sweep.spec import parse_spec

    p = Path(results_dir) / "spec.yaml"
    if not p.is_file():
        return None
    try:
        return parse_spec(yaml.safe_load(p.read_text()))
    except Exception:  # noqa: BLE001 - an old or foreign spec (or no searcher installed): the report infers
        return None


