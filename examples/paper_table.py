"""Rebuild a paper-style robustness table from a sweep's Parquet rows alone (pandas, no project code).

    python examples/paper_table.py results/quickstart            # CA and ASR, mean ± std over seeds
    python examples/paper_table.py results/quickstart --param defense.clean_size

Rows are attacks, columns defenses (each with CA and ASR), cells in %, an "Average" row over attacks, as
the I-BAU / ABL tables print them. With ``--param``, the defense columns are split by that swept
hyperparameter. The schema of the rows is documented in docs/results.md.
"""
import argparse

import pandas as pd

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("results", help="a sweep's results directory (it holds trials/)")
p.add_argument("--param", default=None, help="a hyperparameter column to split the defense columns by")
args = p.parse_args()

df = pd.read_parquet(f"{args.results}/trials")
df = df[df.status == "ok"]  # failed trials are rows too, with their error; leave them out
column = df.defense.astype(str)
if args.param:
    short = args.param.split(".", 1)[-1]
    column = column.where(df[args.param].isna(), column + f"({short}=" + df[args.param].astype(str) + ")")
df = df.assign(column=column)

stats = df.groupby(["attack", "column"])[["clean_acc", "asr"]].agg(["mean", "std"]) * 100
cells = pd.DataFrame({
    (col, name): stats.xs(col, level="column").apply(
        lambda r, m=metric: f"{r[(m, 'mean')]:.1f} ± {0 if pd.isna(r[(m, 'std')]) else r[(m, 'std')]:.1f}", axis=1)
    for col in stats.index.get_level_values("column").unique()
    for metric, name in (("clean_acc", "CA"), ("asr", "ASR"))
})
average = stats.xs("mean", axis=1, level=1).groupby(level="column").mean()  # over attacks
for col, r in average.iterrows():
    cells.loc["Average", (col, "CA")] = f"{r.clean_acc:.1f}"
    cells.loc["Average", (col, "ASR")] = f"{r.asr:.1f}"
print(cells.fillna("–").to_string())
