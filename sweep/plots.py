"""Figures of a sweep's results (matplotlib, Agg backend: no display needed on a cluster head node).

- :func:`metric_vs_param`: ASR and CA against one swept hyperparameter (clean-set size down to
  ``one_shot``, γ, turning epoch, isolation rate, poison rate, ...), one line per (attack, defense)
  variant, mean over seeds with a ± std band.
- :func:`tradeoff`: CA against ASR per defense, with the backdoored models before any defense: the
  points toward the top left are the defenses that remove the backdoor and keep the model.
- :func:`image_grid`: recovered triggers / perturbations, one panel per trial, labelled.

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

from sweep.report import METRIC_NAMES, ordered, variant_labels  # noqa: E402


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


def _sort_key(v):
    """Order swept values numerically where they are numbers; 'one_shot' (one image per class) first."""
    if v == "one_shot":
        return (0, 0.0, "")
    try:
        return (1, float(v), "")
    except (TypeError, ValueError):
        return (2, 0.0, str(v))


def metric_vs_param(df: pd.DataFrame, param: str, metrics=("asr", "clean_acc")) -> plt.Figure:
    """One panel per metric; x: the values of ``param`` (evenly spaced, in order), y: mean ± std over seeds."""
    kind = param.split(".", 1)[0]
    ok = ordered(df[(df.status == "ok") & df[param].notna()])
    line = _lines(ok, param)  # the variants *other than* this parameter
    values = sorted(ok[param].unique(), key=_sort_key)
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
