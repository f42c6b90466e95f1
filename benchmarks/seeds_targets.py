"""Issue 27's targets against the seeds specs' rows: which are met, on how many seeds, by which setting.

Reads committed trial rows (a ``trials.parquet`` or a results directory's ``trials``), averages each
(attack variant, defense variant) over its seeds, and checks every defense variant against the target of its
method and clean-set size (any variant counts: I-BAU at outer lr 3e-4 with 5,000 images is checked against
the 5,000-image target as the defaults are). Prints one markdown table; a cell on fewer than two seeds says
so, because the targets are means of two.

    .venv/bin/python benchmarks/seeds_targets.py                      # the committed rows under docs/
    .venv/bin/python benchmarks/seeds_targets.py results/seeds/trials results/seeds_abl/trials

The targets (issue 27): I-BAU with 5,000 clean images ASR <= 10% at CA drop <= 3 points, and ASR <= 20%
with 100 (BadNets, Blended, Trojan-SQ, Trojan-WM); AWM with 500 ASR <= 10% at CA drop <= 3, one-shot
ASR <= 20%; ABL ASR <= 10% with CA within 5 points of the clean model (``--clean``: the architecture's clean
recipe, docs/benchmarks.md); BAERASE ASR cut by >= 90% (relative) at CA drop <= 3.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sweep.report import frame_markdown, variant_labels  # noqa: E402
from sweep.results import import_rows, load  # noqa: E402

ROWS = ["docs/seeds_cifar10/trials.parquet", "docs/seeds_abl_cifar10/trials.parquet",
        "docs/abl_defaults_seeds_cifar10/trials.parquet", "docs/baerase_defaults_seeds_cifar10/trials.parquet"]
IBAU_ATTACKS = {"badnets", "blend", "trojan_sq", "trojan_wm"}  # the attacks the issue names for I-BAU


@dataclass
class Target:
    defense: str
    clean_size: object  # the clean-set size the target is for (None: any)
    text: str
    asr_max: float | None = None  # %
    drop_max: float | None = None  # CA points below the backdoored model
    cut_min: float | None = None  # relative ASR reduction, %
    below_clean: float | None = None  # CA points below the clean model
    attacks: set | None = None

    def applies(self, row) -> bool:
        if row.defense != self.defense or (self.attacks and row.attack not in self.attacks):
            return False
        return self.clean_size is None or str(row.clean_size) == str(self.clean_size)

    def check(self, r, clean: dict) -> bool | None:
        ok = True
        if self.asr_max is not None:
            ok &= r.asr <= self.asr_max
        if self.drop_max is not None:
            ok &= -r.dca <= self.drop_max
        if self.cut_min is not None:
            ok &= r.cut >= self.cut_min
        if self.below_clean is not None:
            if r.model not in clean:
                return None
            ok &= r.ca >= clean[r.model] - self.below_clean
        return bool(ok)


TARGETS = [
    Target("ibau", 5000, "ASR ≤ 10, drop ≤ 3", asr_max=10, drop_max=3, attacks=IBAU_ATTACKS),
    Target("ibau", 100, "ASR ≤ 20", asr_max=20, attacks=IBAU_ATTACKS),
    Target("awm", 500, "ASR ≤ 10, drop ≤ 3", asr_max=10, drop_max=3),
    Target("awm", "one_shot", "ASR ≤ 20", asr_max=20),
    Target("abl", None, "ASR ≤ 10, CA ≥ clean − 5", asr_max=10, below_clean=5),
    Target("baerase", None, "ASR cut ≥ 90%, drop ≤ 3", cut_min=90, drop_max=3),
]


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per (model, attack variant, defense variant), in % and CA points."""
    ok = df[df.status == "ok"].copy()
    ok["attack_variant"] = variant_labels(ok, "attack")
    ok["defense_variant"] = variant_labels(ok, "defense")
    ok["cut"] = (ok.attack_asr - ok.asr) / ok.attack_asr * 100  # before ASR goes to %: both are fractions
    ok["ca"] = ok.clean_acc * 100
    ok["asr"] = ok.asr * 100
    ok["dca"] = (ok.clean_acc - ok.attack_clean_acc) * 100
    ok["clean_size"] = ok["defense.clean_size"] if "defense.clean_size" in ok else None
    keys = ["model", "attack", "attack_variant", "defense", "defense_variant"]
    g = ok.groupby(keys, sort=False)
    out = g[["ca", "asr", "dca", "cut"]].mean()
    out["seeds"] = g.seed.apply(lambda s: ",".join(str(int(v)) for v in sorted(s.unique())))
    out["clean_size"] = g.clean_size.first()
    return out.reset_index()


def table(summary: pd.DataFrame, clean: dict) -> pd.DataFrame:
    rows = []
    for t in TARGETS:
        for r in summary.itertuples():
            if not t.applies(r):
                continue
            met = t.check(r, clean)
            verdict = "?" if met is None else ("met" if met else "missed")
            if met is not None and len(r.seeds.split(",")) < 2:
                verdict += " (1 seed)"
            size = "" if t.clean_size is None else f" {t.clean_size}"
            rows.append({"target": f"{t.defense}{size}: {t.text}",
                         "attack": r.attack_variant, "defense": r.defense_variant, "seeds": r.seeds,
                         "CA": f"{r.ca:.2f}", "ΔCA": f"{r.dca:+.1f}", "ASR": f"{r.asr:.1f}",
                         "ASR cut %": f"{r.cut:.1f}", "verdict": verdict})
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rows", nargs="*", default=ROWS, help="trials.parquet files or trials folders")
    p.add_argument("--clean", action="append", default=["vgg_small=83.85", "wrn16_1=85.54"], metavar="MODEL=CA",
                   help="clean CA (%%) of an architecture's recipe, for ABL's target (docs/benchmarks.md)")
    args = p.parse_args(argv)
    clean = {k: float(v) for k, v in (c.split("=", 1) for c in args.clean)}
    with tempfile.TemporaryDirectory() as tmp:
        # the engine's own merge: one row per trial (the defaults specs share their reference rows), one type
        # per column across files written by different versions
        import_rows(tmp, [r for r in args.rows if Path(r).exists()])
        df = load(tmp)
    out = table(summarise(df), clean)
    print(frame_markdown(out) if len(out) else "no rows any target applies to")
    counts = out.verdict.str.split(" ").str[0].value_counts() if len(out) else {}
    print(f"\n{len(out)} checks: " + ", ".join(f"{v} {k}" for k, v in dict(counts).items()))


if __name__ == "__main__":
    main()
