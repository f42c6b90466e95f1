"""Figures of a sweep's results (matplotlib, Agg backend: no display needed on a cluster head node).

- :func:`metric_vs_param`: ASR and CA against one swept hyperparameter (clean-set size down to
  ``one_shot``, γ, turning epoch, isolation rate, poison rate, ...), one line per (attack, defense)
  variant, mean over seeds with a ± std band.
- :func:`tradeoff`: CA against ASR per defense, with the backdoored models before any defense: the
  points toward the top left are the defenses that remove the backdoor and keep the model.
- :func:`image_grid`: recovered triggers / perturbations, one panel per trial, labelled.
- :func:`search_objective`: a search's objective over its trials in the order they finished, with the
  best so far; :func:`parallel_coordinates`: every trial of a search as a line across its parameters,
  coloured by objective (what region of the space the good trials share).

Each returns a ``matplotlib.figure.Figure``; the caller saves or embeds it.
"""
from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")  # headless: reports are made on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sweep.report import METRIC_NAMES, ordered, value_key, variant_labels  # noqa: E402


def swept_params(df: pd.DataFrame) -> list[str]:
    """Hyperparameter columns (attack.* / defense.*) that a plot against them shows as a line: among the
    successful rows, at least one line of :func:`metric_vs_param` (an attack variant and a defense
    variant, their other parameters fixed) ran at two or more of its values. So a parameter two defenses
    share at different defaults (I-BAU's lr 1e-3, AWM's 1e-2) gets no plot, nor one that changes only
    together with another between configurations listed one by one (AWM's rounds 10 and 20 going with
    clean_target label and teacher): every line of such a plot would be a single point."""
    ok = df[df.status == "ok"]
    out = []
    for c in df.columns:
        if not c.startswith(("attack.", "defense.")):
            continue
        rows = ok[ok[c].notna()]
        # cheap test first: the value must vary within one attack or defense at all
        if (rows.groupby(c.split(".", 1)[0])[c].nunique() > 1).any() and \
                (rows.groupby(_lines(rows, c))[c].nunique() > 1).any():
            out.append(c)
    return out


def _lines(rows: pd.DataFrame, param: str) -> pd.Series:
    """Each row's line in a plot against ``param``: its attack and defense variants labelled without it."""
    rest = rows.drop(columns=[param])
    return variant_labels(rest, "attack") + " / " + variant_labels(rest, "defense")


def metric_vs_param(df: pd.DataFrame, param: str, metrics=("asr", "clean_acc")) -> plt.Figure:
    """One panel per metric; x: the values of ``param`` (evenly spaced, in order), y: mean ± std over seeds."""
    kind = param.split(".", 1)[0]
    ok = ordered(df[(df.status == "ok") & df[param].notna()])
    line = _lines(ok, param)  # the variants *other than* this parameter
    values = sorted(ok[param].unique(), key=value_key)
    pos = {v: i for i, v in enumerate(values)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for name, g in ok.assign(_line=line).groupby("_line", sort=False):
            s = g.groupby(param)[m].agg(["mean", "std"]).reindex([v for v in values if v in set(g[param])])
            x = np.array([pos[v] for v in s.index])
            mean, std = 100 * s["mean"].to_numpy(float), 100 * s["std"].fillna(0).to_numpy(float)
            ax.plot(x, mean, marker="o", label=name)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(param)
        ax.set_ylabel(f"{METRIC_NAMES[m]} (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{', '.join(METRIC_NAMES[m] for m in metrics)} vs {param} ({kind}; mean ± std over seeds)")
    fig.tight_layout()
    return fig


def tradeoff(df: pd.DataFrame, max_variants: int = 10) -> plt.Figure:
    """CA (y) against ASR (x): one marker per (attack variant, defense variant), colour per defense
    variant (per defense when there are more than ``max_variants`` variants, which a legend could not
    tell apart); grey crosses are the backdoored models before the defense."""
    ok = ordered(df[df.status == "ok"])
    ok = ok.assign(_a=variant_labels(ok, "attack"), _d=variant_labels(ok, "defense"))
    colour_by = "_d" if ok["_d"].nunique() <= max_variants else "defense"
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    before = ok.dropna(subset=["attack_asr"]).groupby("_a")[["attack_asr", "attack_clean_acc"]].mean()
    ax.scatter(100 * before.attack_asr, 100 * before.attack_clean_acc, marker="x", color="grey",
               label="before defense")
    for name, g in ok.groupby(colour_by, sort=False):
        pts = g.groupby(["_a", "_d"], sort=False)[["asr", "clean_acc"]].mean()
        ax.scatter(100 * pts.asr, 100 * pts.clean_acc, label=textwrap.fill(name, 60), alpha=0.8)
    ax.set_xlabel("ASR (%)  (lower is better)")
    ax.set_ylabel("CA (%)  (higher is better)")
    ax.set_xlim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Clean accuracy vs attack success, per defense")
    fig.tight_layout()
    return fig


def image_grid(images: list[tuple[str, np.ndarray]], cols: int = 6) -> plt.Figure:
    """Labelled panels of HWC images (uint8 or float in [0, 1])."""
    n = max(1, len(images))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    # variant labels run long (every parameter that varies): wrap each line to the panel's width, and
    # give the panels room for the tallest title
    titles = ["\n".join(textwrap.fill(line, 34) for line in label.split("\n")) for label, _ in images]
    title_lines = max((t.count("\n") + 1 for t in titles), default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, (2.1 + 0.11 * title_lines) * rows), squeeze=False,
                             layout="constrained")  # unlike tight_layout, keeps the suptitle clear of the titles
    for ax in axes.flat:
        ax.axis("off")
    for ax, title, (_, img) in zip(axes.flat, titles, images):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=6)
    fig.suptitle("Recovered triggers / perturbations")
    return fig


def _groups(rows: pd.DataFrame, labels: pd.Series):
    """A search's trials per backdoored model, labelled 'attack variant, seed N', in finishing order."""
    rows = rows.assign(_label=labels.astype(str) + ", seed " + rows.seed.astype(str))
    for label, g in rows.groupby("_label", sort=False):
        yield label, g.sort_values("finished_at", kind="stable")


def _mode(rows: pd.DataFrame) -> str:
    return str(rows.search_mode.dropna().iloc[0]) if rows.search_mode.notna().any() else "min"


def search_objective(rows: pd.DataFrame, labels: pd.Series, name: str) -> plt.Figure:
    """The objective of each trial of search ``name`` in the order they finished (circles: finished; x:
    stopped early by ASHA, at their last report), with the best finished trial so far as a line."""
    mode = _mode(rows)
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    worst_ok = []
    for i, (label, g) in enumerate(_groups(rows, labels)):
        colour = f"C{i % 10}"
        x = np.arange(1, len(g) + 1)
        y = g.search_objective.to_numpy(float, na_value=np.nan)
        ok = (g.status == "ok").to_numpy()
        ax.scatter(x[ok], y[ok], color=colour, s=22, label=textwrap.fill(label, 50))
        stopped = (g.status == "stopped").to_numpy()
        if stopped.any():
            ax.scatter(x[stopped], y[stopped], color=colour, marker="x", s=22, alpha=0.7)
        best = pd.Series(np.where(ok, y, np.nan))
        best = best.cummin() if mode == "min" else best.cummax()
        ax.step(x, best.to_numpy(), where="post", color=colour, alpha=0.8)
        worst_ok += list(y[ok & np.isfinite(y)])
    bound = 1.0 if mode == "min" else 0.0
    if worst_ok and (max(worst_ok) > bound if mode == "min" else min(worst_ok) < bound):
        ax.axhline(bound, color="grey", ls=":", lw=1)
        ax.text(1, bound, " beyond: over the CA-drop limit (penalised)", fontsize=7, va="bottom", color="grey")
    ax.set_xlabel("trial (in the order they finished)")
    ax.set_ylabel(f"objective ({'lower' if mode == 'min' else 'higher'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"Search {name}: objective per trial (x: stopped early), line: best so far")
    fig.tight_layout()
    return fig


def _axis(values: pd.Series, dist=None):
    """(positions in [0, 1], tick labels for the two ends, or for each category) of one parameter's values;
    ``dist``: its range in the search space (the axis spans it), or None (the values' own range)."""
    kind = dist.kind if dist is not None else None
    num = pd.to_numeric(values, errors="coerce")
    if kind != "choice" and num.notna().all():
        v = num.to_numpy(float)
        lo, hi = (float(b) for b in dist.bounds) if dist is not None else (v.min(), v.max())
        log = kind == "loguniform" or (kind is None and lo > 0 and hi / lo >= 100)
        t, (tlo, thi) = (np.log10(v), np.log10([lo, hi])) if log else (v, (lo, hi))
        pos = (t - tlo) / (thi - tlo) if thi > tlo else np.full(len(t), 0.5)
        return pos, [(0.0, f"{lo:.3g}"), (1.0, f"{hi:.3g}")]
    cats = sorted(values.astype(str).unique(), key=value_key)
    if kind == "choice" and set(cats) <= {str(c) for c in dist.choice}:
        cats = [str(c) for c in dist.choice]  # every choice on the axis, in the spec's order
    idx = {c: i for i, c in enumerate(cats)}
    pos = np.array([idx[c] / max(1, len(cats) - 1) for c in values.astype(str)])
    return pos, [(i / max(1, len(cats) - 1), c) for i, c in enumerate(cats)]


def parallel_coordinates(rows: pd.DataFrame, params: list[str], labels: pd.Series, name: str,
                         space: dict | None = None, max_panels: int = 6) -> plt.Figure:
    """Every trial of search ``name`` as a line across its parameters and its objective (each axis scaled
    to the range searched; log scale for loguniform ones), coloured by objective rank (dark: best); the
    best trial in red. One panel per backdoored model (attack variant and seed)."""
    mode = _mode(rows)
    rows = rows[rows.search_objective.notna()]
    groups = list(_groups(rows, labels.loc[rows.index]))[:max_panels] if len(rows) else []
    n = max(1, len(groups))
    axes_names = [*params, "objective"]
    fig, axes = plt.subplots(n, 1, figsize=(1.6 * len(axes_names) + 2.5, 3.4 * n), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (label, g) in zip(axes[:, 0], groups):
        cols = []
        for p in params:
            cols.append(_axis(g[f"defense.{p}"], space.get(p) if space else None))
        obj = g.search_objective.to_numpy(float)
        order = pd.Series(obj).rank(ascending=(mode == "min"), method="first").to_numpy()
        lo, hi = np.nanmin(obj), np.nanmax(obj)
        cols.append(((obj - lo) / (hi - lo) if hi > lo else np.full(len(obj), 0.5),
                     [(0.0, f"{lo:.3g}"), (1.0, f"{hi:.3g}")]))
        x = np.arange(len(axes_names))
        ys = np.stack([c[0] for c in cols], axis=1)
        best = int(np.nanargmin(order))
        for i in np.argsort(-order):  # worst first, best drawn on top
            stopped = g.status.iloc[i] != "ok"
            ax.plot(x, ys[i], color=cmap((order[i] - 1) / max(1, len(order) - 1)), alpha=0.35 if stopped else 0.8,
                    lw=0.8, ls=":" if stopped else "-")
        ax.plot(x, ys[best], color="red", lw=2.2)
        for xi, (_, ticks) in zip(x, cols):
            ax.axvline(xi, color="black", lw=0.6)
            for y, text in ticks:
                ax.text(xi + 0.03, y, text, fontsize=7, va="center")
        ax.set_xticks(x, axes_names)
        ax.set_yticks([])
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlim(-0.15, len(axes_names) - 0.6)
        ax.set_title(f"{label}: {len(g)} trials (red: the best; dotted: stopped early)", fontsize=9)
    fig.suptitle(f"Search {name}: parameters of every trial, coloured by objective (dark: best)")
    fig.tight_layout()
    return fig
