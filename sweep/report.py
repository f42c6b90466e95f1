"""Paper-style tables from a results directory: attack rows × defense columns, mean ± std over seeds.

A variant is labelled by its name and the parameters that vary across the sweep for that name, e.g.
``badnets(poison_rate=0.05)`` or ``finetune(clean_size=100)``; parameters at one value are left out.
"""
from __future__ import annotations

import pandas as pd

METRIC_NAMES = {"clean_acc": "CA", "asr": "ASR", "robust_acc": "RA"}


def variant_labels(df: pd.DataFrame, kind: str) -> pd.Series:
    """Label each row's attack (kind='attack') or defense variant by the parameters that vary."""
    labels = pd.Series(df[kind].astype(str), index=df.index)
    for name, group in df.groupby(kind):
        cols = [c for c in df.columns if c.startswith(kind + ".") and group[c].nunique(dropna=True) > 1]
        if cols:
            lab = group[cols].apply(
                lambda r: f"{name}(" + ", ".join(f"{c.split('.', 1)[1]}={r[c]}" for c in cols) + ")", axis=1)
            labels.loc[group.index] = lab
    return labels


def _fmt(mean: float, std: float) -> str:
    if pd.isna(mean):
        return "–"
    return f"{100 * mean:.1f}" if pd.isna(std) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def summary(df: pd.DataFrame, metrics=("clean_acc", "asr")) -> pd.DataFrame:
    """Mean and std over seeds per (attack variant, defense variant) of successful trials."""
    # Rows and columns in a stable order: the 'none' reference first, then by name and parameters.
    ok = df[df.status == "ok"].copy()
    ok = ok.assign(_a=ok.attack != "none", _d=ok.defense != "none").sort_values(
        ["_a", "attack", "_d", "defense", *sorted(c for c in ok.columns if c.startswith(("attack.", "defense.")))],
        kind="stable").drop(columns=["_a", "_d"])
    ok["attack_variant"] = variant_labels(ok, "attack")
    ok["defense_variant"] = variant_labels(ok, "defense")
    g = ok.groupby(["attack_variant", "defense_variant"], sort=False)[list(metrics)]
    out = g.agg(["mean", "std", "count"])
    return out


def table(df: pd.DataFrame, metrics=("clean_acc", "asr")) -> pd.DataFrame:
    """The paper-style table: index attack variants (+ 'Average'), columns (defense, metric), cells in %."""
    s = summary(df, metrics)
    cells = {}
    for (att, dfn), r in s.iterrows():
        for m in metrics:
            cells.setdefault((dfn, METRIC_NAMES[m]), {})[att] = _fmt(r[(m, "mean")], r[(m, "std")])
    t = pd.DataFrame(cells)
    means = s.xs("mean", axis=1, level=1)
    avg = means.groupby(level="defense_variant", sort=False).mean()  # over attack variants
    for dfn, r in avg.iterrows():
        for m in metrics:
            t.loc["Average", (dfn, METRIC_NAMES[m])] = _fmt(r[m], float("nan"))
    t.index.name = "attack"
    return t.fillna("–")


def to_markdown(t: pd.DataFrame) -> str:
    head = ["attack"] + [f"{d} {m}" for d, m in t.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, r in t.iterrows():
        lines.append("| " + " | ".join([str(idx), *map(str, r.values)]) + " |")
    return "\n".join(lines)
