"""Paper-style tables from a results directory: attack rows × defense columns, mean ± std over seeds.

A variant is labelled by its name and the parameters that vary across the sweep for that name and that it
sets away from the method's registered default, e.g. ``ibau(clean_size=5000, lr=0.0003)`` beside
``ibau(clean_size=5000)``: a table that holds a method's defaults and a few departures from them names only
the departures. The papers' axes, poison rate and clean-set size, are named on every variant where they vary
(``badnets(poison_rate=0.1)`` beside ``badnets(poison_rate=0.05)``). Parameters at one value across the
sweep are left out.

DER (defense effectiveness rating, BackdoorBench's definition with its sign error fixed) is computed per
trial from the row's own before/after figures: (max(0, ΔASR) − max(0, ΔCA) + 1) / 2 with Δ = before −
after; 1 is a perfect defense, 0.5 one that changes nothing.

A search's trials (rows with a ``search`` name, sweep/search.py) enter the tables as one column per search:
its best finished trial on each backdoored model (``ibau (ibau_tpe best)``); the report adds, per search,
the best configuration per attack, the objective over the trials, and a parallel-coordinates plot.
"""
from __future__ import annotations

import json
import math

import pandas as pd

from attacks import ATTACKS
from defenses import DEFENSES
from kernel.metrics import der

METRIC_NAMES = {"clean_acc": "CA", "ca_change": "ΔCA", "asr": "ASR", "robust_acc": "RA", "der": "DER"}
# a report file's tables; ΔCA (after − before, points) because CA levels differ between models (the JPEG
# copy of CIFAR-10 costs a model trained on the lossless files ~8 points) where the drop is what compares
REPORT_METRICS = ("clean_acc", "ca_change", "asr", "robust_acc", "der")
# the axes of the papers' tables: named on every variant when they vary, default or not
AXES = ("attack.poison_rate", "defense.clean_size")


def with_der(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the per-trial figures that need the model's before-defense ones (null where a row lacks
    them): ``der``, and ``ca_change``, the defense's CA change (after − before, a fraction like CA)."""
    cols = ["attack_asr", "asr", "attack_clean_acc", "clean_acc"]
    ok = df[cols].notna().all(axis=1)
    vals = [der(*map(float, r)) if k else None for k, r in zip(ok, df[cols].itertuples(index=False))]
    change = pd.to_numeric(df.clean_acc, errors="coerce") - pd.to_numeric(df.attack_clean_acc, errors="coerce")
    return df.assign(der=pd.array(vals, dtype="Float64"), ca_change=change.astype("Float64"))


def _missing(v) -> bool:
    """A null cell (None, NaN, pd.NA); unlike pd.isna, also safe on a list-valued default."""
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def value_key(v):
    """Order a parameter's values numerically where they are numbers (rows hold some as JSON text), 'one_shot'
    (one image per class) first, other text after the numbers, nulls last."""
    if _missing(v):
        return (3, 0.0, "")
    if v == "one_shot":
        return (0, 0.0, "")
    try:
        return (1, float(v), "")
    except (TypeError, ValueError):
        return (2, 0.0, str(v))


def ordered(df: pd.DataFrame, kinds=("attack", "defense")) -> pd.DataFrame:
    """Rows in the tables' order: the 'none' references first, then by name and parameters (clean_size
    one-shot, 100, 500, 5000, not as text). ``kinds=('defense',)``: by the defense alone."""
    cols = []
    for kind in kinds:
        cols += [f"_{kind}", kind, *sorted(c for c in df.columns if c.startswith(kind + "."))]
    flags = {f"_{kind}": df[kind] != "none" for kind in kinds}
    key = lambda col: col if col.name in flags or col.name in kinds else col.map(value_key)  # noqa: E731
    return df.assign(**flags).sort_values(cols, kind="stable", key=key).drop(columns=list(flags))


def variant_labels(df: pd.DataFrame, kind: str) -> pd.Series:
    """Label each row's attack (kind='attack') or defense variant by the parameters that vary within its
    method's rows and that the row sets away from the method's default (all that vary where the method or
    the parameter is not registered: rows of an older version, or of a removed method)."""
    labels = pd.Series(df[kind].astype(str), index=df.index)
    for name, group in df.groupby(kind):
        # null counts as a value: a parameter left at its default (null, e.g. ABL's turning_epoch: the
        # sweep's epochs) in one variant and set in another still tells the two apart
        cols = [c for c in df.columns if c.startswith(kind + ".") and group[c].nunique(dropna=False) > 1]
        if not cols:
            continue
        defaults = _defaults(kind, name)
        # a null where the method has a default is a row from before the parameter existed (the rows keep
        # what each version resolved), which ran as its default does: the same variant, the same label
        shown = {c: [c in AXES or not (c in defaults and (_plain(v) is None or _same(v, defaults[c])))
                     for v in group[c]] for c in cols}
        # two rows that differ in some varying parameter (a null and the default aside) have one of them
        # away from its default there, so labels stay distinct: the row at the default omits it
        labels.loc[group.index] = [
            name + ("(" + ", ".join(parts) + ")" if parts else "")
            for parts in ([f"{c.split('.', 1)[1]}={_value(group[c].iloc[i])}" for c in cols if shown[c][i]]
                          for i in range(len(group)))]
    return labels


def _defaults(kind: str, name: str) -> dict:
    """``{'<kind>.<param>': default}`` of a registered method's parameters (empty for an unknown one)."""
    registry = ATTACKS if kind == "attack" else DEFENSES
    if name not in registry:
        return {}
    return {f"{kind}.{k}": f.get_default(call_default_factory=True)
            for k, f in registry.get(name).Params.model_fields.items() if not f.is_required()}


def _plain(v):
    """A cell or a default as plain JSON-like data: rows hold JSON text where a column mixes types."""
    if _missing(v):
        return None
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):  # a numpy scalar
        return v.item()
    return v


def _same(cell, default) -> bool:
    a, b = _plain(cell), _plain(default)
    if isinstance(a, bool) or isinstance(b, bool):  # True is not 1 here
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _value(v) -> str:
    if pd.isna(v):
        return "default"
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _fmt(mean: float, std: float, scale: float = 100, digits: int = 1, signed: bool = False) -> str:
    if pd.isna(mean):
        return "–"
    m = f"{scale * mean:+.{digits}f}".replace("-", "−") if signed else f"{scale * mean:.{digits}f}"
    return m if pd.isna(std) else f"{m} ± {scale * std:.{digits}f}"


def _fmt_metric(m: str, mean: float, std: float) -> str:
    if m == "der":
        return _fmt(mean, std, 1, 3)
    return _fmt(mean, std, signed=m == "ca_change")  # ΔCA signed: −4.9 is a loss of 4.9 points


def summary(df: pd.DataFrame, metrics=("clean_acc", "asr")) -> pd.DataFrame:
    """Mean and std over seeds per (attack variant, defense variant) of successful trials (of a search: the
    best trial of each backdoored model)."""
    ok = ordered(searches_as_best(df[df.status == "ok"]))
    if {"der", "ca_change"} & set(metrics) - set(ok.columns):
        ok = with_der(ok)
    ok["attack_variant"] = variant_labels(ok, "attack")
    ok["defense_variant"] = variant_labels(ok, "defense")
    g = ok.groupby(["attack_variant", "defense_variant"], sort=False)[list(metrics)]
    out = g.agg(["mean", "std", "count"])
    # the tables' columns in the defenses' order, not in the order the attacks first show them
    out.attrs["defense_order"] = list(dict.fromkeys(ordered(ok, ("defense",)).defense_variant))
    return out


def table(df: pd.DataFrame, metrics=("clean_acc", "asr")) -> pd.DataFrame:
    """The paper-style table: index attack variants (+ 'Average'), columns (defense, metric), cells in %."""
    s = summary(df, metrics)
    cells = {}
    for (att, dfn), r in s.iterrows():
        for m in metrics:
            cells.setdefault((dfn, METRIC_NAMES[m]), {})[att] = _fmt_metric(m, r[(m, "mean")], r[(m, "std")])
    t = pd.DataFrame(cells)
    t = t[[(d, METRIC_NAMES[m]) for d in s.attrs["defense_order"] for m in metrics]]
    means = s.xs("mean", axis=1, level=1)
    avg = means.groupby(level="defense_variant", sort=False).mean()  # over attack variants
    for dfn, r in avg.iterrows():
        for m in metrics:
            t.loc["Average", (dfn, METRIC_NAMES[m])] = _fmt_metric(m, r[m], float("nan"))
    t.index.name = "attack"
    return t.fillna("–")


def to_markdown(t: pd.DataFrame) -> str:
    head = ["attack"] + [f"{d} {m}" for d, m in t.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, r in t.iterrows():
        lines.append("| " + " | ".join([str(idx), *map(str, r.values)]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Published numbers beside ours

PUBLISHED_FIGURES = ("ca_before", "asr_before", "ca", "asr")  # a reference file's figures, in %


def read_published(path) -> pd.DataFrame:
    """A file of published figures to set beside a sweep's (CSV): one row per published cell, with columns
    ``attack`` and ``defense`` (registry names), any ``attack.P`` / ``defense.P`` columns that pick our rows
    by a parameter's value (an empty cell: any value), the figures ``ca_before``, ``asr_before``, ``ca``,
    ``asr`` in % (any may be empty), and ``source`` (where the figure is printed, and in what setting).
    Lines that start with ``#`` are comments. Raises ValueError naming what is missing or unknown."""
    import io
    from pathlib import Path

    text = "".join(line for line in Path(path).read_text().splitlines(keepends=True)
                   if not line.lstrip().startswith("#"))
    ref = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    missing = [c for c in ("attack", "defense", "source") if c not in ref.columns]
    unknown = [c for c in ref.columns if c not in ("attack", "defense", "source", "setting", *PUBLISHED_FIGURES)
               and not c.startswith(("attack.", "defense."))]
    if missing or unknown:
        raise ValueError(f"{path}: " + "; ".join(
            ([f"missing column(s) {', '.join(missing)}"] if missing else [])
            + ([f"unknown column(s) {', '.join(unknown)} (figures: {', '.join(PUBLISHED_FIGURES)}; "
                "selectors: attack.P, defense.P; text: source, setting)"] if unknown else [])))
    for c in PUBLISHED_FIGURES:
        if c in ref.columns:
            bad = [v for v in ref[c] if v.strip() and isinstance(_parse(v), str)]
            if bad:
                raise ValueError(f"{path}: column {c}: {bad[0]!r} is not a number (in %)")
    return ref


def published_table(df: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    """Each published row beside our figures for the same attack, defense and parameters: our mean over
    the matching successful trials (n: how many; seeds and any parameter the row leaves open pooled), the
    before-defense figures from the same rows, and the CA drop on each side (compare drops where the data
    differ, e.g. a JPEG copy of the test set)."""
    ok = df[df.status == "ok"]
    out = []
    for _, r in ref.iterrows():
        sel = (ok.attack.astype(str) == r["attack"]) & (ok.defense.astype(str) == r["defense"])
        picks = []
        for c in ref.columns:
            if c.startswith(("attack.", "defense.")) and r[c].strip():
                col = ok[c] if c in ok.columns else pd.Series(pd.NA, index=ok.index)
                sel &= col.map(_value) == _value(_parse(r[c]))
                picks.append(f"{c.split('.', 1)[1]}={r[c]}")
        rows = ok[sel]
        pub = {c: float(r[c]) if c in r and r[c].strip() else float("nan") for c in PUBLISHED_FIGURES}
        ours = {"ca_before": rows.attack_clean_acc.mean() * 100, "asr_before": rows.attack_asr.mean() * 100,
                "ca": rows.clean_acc.mean() * 100, "asr": rows.asr.mean() * 100} if len(rows) else \
            dict.fromkeys(PUBLISHED_FIGURES, float("nan"))
        rec = {"attack": r["attack"], "defense": r["defense"] + (f" ({', '.join(picks)})" if picks else "")}
        for side, figs in (("published", pub), ("ours", ours)):
            rec[f"{side} CA"] = _pair(figs["ca_before"], figs["ca"])
            rec[f"{side} ASR"] = _pair(figs["asr_before"], figs["asr"])
            rec[f"{side} ΔCA"] = _num(figs["ca"] - figs["ca_before"], signed=True)
        rec["n"] = len(rows)
        rec["source"] = r["source"] + (f"; {r['setting']}" if "setting" in r and r["setting"].strip() else "")
        out.append(rec)
    return pd.DataFrame(out)


def _parse(v: str):
    """A cell's text as the int or float it spells, else the text."""
    try:
        f = float(v)
        return int(f) if f.is_integer() else f
    except ValueError:
        return v


def _num(v: float, signed: bool = False) -> str:
    return "–" if pd.isna(v) else (f"{v:+.1f}" if signed else f"{v:.1f}")


def _pair(before: float, after: float) -> str:
    """'before → after' (either may be unknown)."""
    if pd.isna(before):
        return _num(after)
    return f"{_num(before)} → {_num(after)}"


# --------------------------------------------------------------------------------------------------
# Report files: tables + figures as Markdown, HTML or CSV


def _tidy(df: pd.DataFrame, metrics) -> pd.DataFrame:
    """The summary as a long table: attack_variant, defense_variant, metric, mean, std, n."""
    s = summary(df, metrics)
    rows = [(a, d, m, r[(m, "mean")], r[(m, "std")], r[(m, "count")]) for (a, d), r in s.iterrows() for m in metrics]
    return pd.DataFrame(rows, columns=["attack_variant", "defense_variant", "metric", "mean", "std", "n"])


def trigger_images(df: pd.DataFrame, uri: str, limit: int = 24) -> list[tuple[str, "object"]]:
    """Recovered triggers logged to MLflow by the sweep's trials: one per (attack, defense) variant."""
    import os
    import tempfile

    import numpy as np
    from mlflow.tracking import MlflowClient

    # one small PNG per variant: MLflow's per-download progress bar would print a line for each
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from PIL import Image

    ok = ordered(df[df.status == "ok"])
    if ok.empty:
        return []
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(str(ok.sweep.iloc[0]))
    if exp is None:
        return []
    runs, token = {}, None
    while True:
        page = client.search_runs([exp.experiment_id], "tags.`bdsweep.role` = 'trial'", max_results=5000, page_token=token)
        runs.update({r.data.tags.get("trial_id"): r.info.run_id for r in page})
        token = page.token
        if not token:
            break
    ok = ok.assign(_a=variant_labels(ok, "attack"), _d=variant_labels(ok, "defense"))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for (a, d), g in ok.groupby(["_a", "_d"], sort=False):
            # the first of the variant's trials whose run holds an image: rows imported from another
            # machine (sweep import) have runs here without their artifacts
            for run in (runs[t] for t in g.trial_id if t in runs):
                pngs = [art.path for art in client.list_artifacts(run) if art.path.endswith(".png")]
                if pngs:
                    break
            else:
                continue
            for path in pngs:
                local = client.download_artifacts(run, path, tmp)
                out.append((f"{a} / {d}\n{path[:-4]}", np.asarray(Image.open(local).convert("RGB"))))
            if len(out) >= limit:
                break
    return out[:limit]


def write_report(results_dir, fmt: str = "html", out=None, mlflow_uri: str | None = None,
                 metrics=REPORT_METRICS, log_to_mlflow: bool = True,
                 published=None):
    """Write the report of ``results_dir`` as ``fmt`` (md, html or csv); returns the main file's path.
    ``published``: a file of published figures (:func:`read_published`), tabulated beside ours.

    Tables: one attack × defense table per metric (mean ± std over seeds, an Average row). Figures: each
    swept hyperparameter against ASR and CA, the CA-vs-ASR trade-off, and the recovered triggers found
    in MLflow. HTML embeds the figures; md and csv write them as PNGs beside the main file. The main file
    is also attached to the sweep's parent MLflow run (``log_to_mlflow``).
    """
    import base64
    import io
    from pathlib import Path

    from sweep import plots
    from sweep.results import load
    from sweep.search import spec_of
    from sweep.tracking import default_uri

    if fmt not in ("md", "html", "csv"):
        raise ValueError(f"unknown report format {fmt!r} (md, html, csv)")
    results_dir = Path(results_dir)
    df = with_der(load(results_dir))
    uri = mlflow_uri or default_uri(results_dir)
    main = Path(out) if out else results_dir / "report" / f"report.{fmt}"
    main.parent.mkdir(parents=True, exist_ok=True)
    sweep_name = str(df.sweep.iloc[0]) if len(df) else "sweep"

    grid = df[~_is_searched(df)]  # a search's trials are plotted in its own figures
    figures = {f"vs_{p.replace('.', '_')}": plots.metric_vs_param(grid, p) for p in plots.swept_params(grid)}
    if (df.status == "ok").any():
        figures["tradeoff"] = plots.tradeoff(searches_as_variants(df))
    saved = spec_of(results_dir)
    search = saved.search if saved is not None else None
    for name in search_names(df):
        rows = df[df.search == name]
        space = search.space if search is not None and search.label == name else None
        labels = variant_labels(df, "attack").loc[rows.index]
        tag = name.replace(".", "_")
        figures[f"search_{tag}_objective"] = plots.search_objective(rows, labels, name)
        params = searched_params(rows, space)
        if params:
            figures[f"search_{tag}_parallel"] = plots.parallel_coordinates(rows, params, labels, name, space)
    local_store = uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).exists()
    images = trigger_images(df, uri) if (local_store or not uri.startswith("sqlite")) else []
    if images:
        figures["triggers"] = plots.image_grid(images)
    pngs = {}
    for name, fig in figures.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plots.plt.close(fig)
        pngs[name] = buf.getvalue()

    tables = {m: table(df, (m,)) for m in metrics}
    beside = published_table(df, read_published(published)) if published is not None else None
    beside_head = ("Published figures beside ours (%; before → after the defense; ours: the mean over the n "
                   "matching trials of this sweep)")
    search_parts = search_summary(df, search)
    n_ok, n_failed, n_stopped = (int((df.status == k).sum()) for k in ("ok", "failed", "stopped"))
    stopped = f", {n_stopped} stopped early by a search's scheduler" if n_stopped else ""
    head = (f"Sweep {sweep_name}: {n_ok} trials ok, {n_failed} failed{stopped}. Cells: mean ± std over seeds "
            "(%; ΔCA: the defense's CA change against its model's, in points; DER in [0, 1]).")
    if fmt == "csv":
        _tidy(df, metrics).to_csv(main, index=False)
        if beside is not None:
            beside.to_csv(main.parent / "published.csv", index=False)
    if fmt in ("md", "csv"):
        for name, data in pngs.items():
            (main.parent / f"{name}.png").write_bytes(data)
    if fmt == "md":
        parts = [f"# {sweep_name}", "", head, ""]
        for m, t in tables.items():
            parts += [f"## {METRIC_NAMES[m]}", "", to_markdown(t), ""]
        if beside is not None:
            parts += ["## Published numbers beside ours", "", beside_head + ":", "", frame_markdown(beside), ""]
        for text in search_parts:
            parts += ["## Search", "", text, ""]
        parts += [f"![{name}]({name}.png)\n" for name in pngs]
        main.write_text("\n".join(parts))
    if fmt == "html":
        import html

        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(sweep_name)}</title>",
                 "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
                 "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}</style>",
                 f"</head><body><h1>{html.escape(sweep_name)}</h1><p>{html.escape(head)}</p>"]
        for m, t in tables.items():
            flat = t.copy()
            flat.columns = [d for d, _ in t.columns]
            parts += [f"<h2>{METRIC_NAMES[m]}</h2>", flat.to_html(classes=f"metric-{m}", border=0)]
        if beside is not None:
            parts += ["<h2>Published numbers beside ours</h2>", f"<p>{html.escape(beside_head)}.</p>",
                      beside.to_html(classes="published", border=0, index=False)]
        for name in search_names(df):
            space = search.space if search is not None and search.label == name else None
            rows = df[df.search == name]
            parts += [f"<h2>Search {html.escape(name)}</h2>",
                      f"<p>{html.escape(_objective_text(rows, name, search))}. Best finished trial per attack and "
                      "seed (CA, ASR, ΔCA in %; trials: ok / stopped early / failed).</p>",
                      search_table(df, name, space).to_html(classes="search", border=0, index=False)]
        for name, data in pngs.items():
            parts.append(f"<h2>{html.escape(name)}</h2><img alt='{name}' src='data:image/png;base64,"
                         f"{base64.b64encode(data).decode()}'>")
        parts.append("</body></html>")
        main.write_text("\n".join(parts))
    if log_to_mlflow and (local_store or not uri.startswith("sqlite")):
        _attach_to_parent_run(uri, sweep_name, main)
    return main


def _attach_to_parent_run(uri: str, sweep_name: str, path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(sweep_name)
    if exp is None:
        return
    parents = client.search_runs([exp.experiment_id], "tags.`bdsweep.role` = 'sweep'", max_results=1)
    if parents:
        client.log_artifact(parents[0].info.run_id, str(path), "report")


# --------------------------------------------------------------------------------------------------
# Searches


def search_names(df: pd.DataFrame) -> list[str]:
    return sorted(df.search.dropna().unique()) if "search" in df.columns else []


def _is_searched(df: pd.DataFrame) -> pd.Series:
    return df.search.notna() if "search" in df.columns else pd.Series(False, index=df.index)


def searches_as_best(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each search's rows replaced by its best finished trial per backdoored model, shown as
    the defense variant ``<defense> (<search> best)`` (its parameters left out of the label: they differ
    per model; the search's own table lists them)."""
    searched = _is_searched(df)
    if not searched.any():
        return df
    best = best_trials(df[searched])
    if best.empty:
        return df[~searched]
    params = [c for c in best.columns if c.startswith("defense.")]
    best = best.assign(defense=best.defense + " (" + best.search.astype(str) + " best)")
    best[params] = pd.NA
    return pd.concat([df[~searched], best])


def best_trials(rows: pd.DataFrame) -> pd.DataFrame:
    """The rank-1 finished trial of every (search, backdoored model)."""
    from sweep.search import ranks

    ok = rows[(rows.status == "ok") & rows.search_objective.notna()]
    if ok.empty:
        return ok
    return ok[ranks(ok) == 1]


def searched_params(rows: pd.DataFrame, space: dict | None = None) -> list[str]:
    """The parameters a search varied: its space's (from the saved spec), else the ``defense.*`` columns
    that vary among its rows."""
    if space:
        return [p for p in space if f"defense.{p}" in rows.columns]
    return [c.split(".", 1)[1] for c in rows.columns
            if c.startswith("defense.") and rows[c].nunique(dropna=True) > 1]


def search_table(df: pd.DataFrame, name: str, space: dict | None = None) -> pd.DataFrame:
    """For search ``name``: one row per attack variant and seed, its best configuration and figures (%),
    the trials it ran (ok / stopped / failed)."""
    rows = df[_is_searched(df) & (df.search == name)]
    if rows.empty:
        return pd.DataFrame()
    labels = variant_labels(df, "attack")
    params = searched_params(rows, space)
    best = best_trials(rows)
    out = []
    for key, g in rows.groupby("model_key", sort=False):
        first = g.iloc[0]
        b = best[best.model_key == key]
        rec = {"attack": labels.loc[g.index[0]], "seed": int(first.seed),
               "trials": f"{int((g.status == 'ok').sum())} / {int((g.status == 'stopped').sum())} / "
                         f"{int((g.status == 'failed').sum())}"}
        if not b.empty:
            r = b.iloc[0]
            rec.update({"objective": f"{r.search_objective:.4g}", "CA": _fmt(r.clean_acc, float("nan")),
                        "ASR": _fmt(r.asr, float("nan")),
                        "ΔCA": _fmt(r.clean_acc - r.attack_clean_acc, float("nan"))
                        if pd.notna(r.attack_clean_acc) else "–"})
            rec.update({p: _param_text(r[f"defense.{p}"]) for p in params})
            rec["trial_id"] = r.trial_id
        out.append(rec)
    return pd.DataFrame(out).fillna("–")


def _param_text(v) -> str:
    if isinstance(v, float) and not pd.isna(v) and not v.is_integer():
        return f"{v:.4g}"
    return _value(v)


def _objective_text(rows: pd.DataFrame, name: str, search=None) -> str:
    mode = rows.search_mode.dropna().iloc[0] if rows.search_mode.notna().any() else "min"
    if search is not None and search.label == name:
        from sweep.search import describe

        return describe(search)
    return f"search {name}: {rows.defense.iloc[0]}, objective to {'minimise' if mode == 'min' else 'maximise'}"


def search_summary(df: pd.DataFrame, search=None) -> list[str]:
    """Markdown per search: what it optimised, and the best configuration per attack variant and seed."""
    out = []
    for name in search_names(df):
        rows = df[df.search == name]
        space = search.space if search is not None and search.label == name else None
        t = search_table(df, name, space)
        head = (f"{_objective_text(rows, name, search)}. Best finished trial per attack and seed "
                "(CA, ASR, ΔCA in %; trials: ok / stopped early / failed):")
        out.append(head + "\n\n" + frame_markdown(t))
    return out


def frame_markdown(t: pd.DataFrame) -> str:
    if t.empty:
        return "(no trials)"
    lines = ["| " + " | ".join(map(str, t.columns)) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in t.itertuples(index=False)]
    return "\n".join(lines)


def searches_as_variants(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every search's trials as one defense variant ``<defense> (<search>)`` (for the trade-off
    plot: one colour per search, every trial a point)."""
    searched = _is_searched(df)
    if not searched.any():
        return df
    rows = df[searched].copy()
    rows["defense"] = rows.defense + " (" + rows.search.astype(str) + ")"
    rows[[c for c in rows.columns if c.startswith("defense.")]] = pd.NA
    return pd.concat([df[~searched], rows])
