"""benchmarks/seeds_targets.py: the issue's targets judged on trial rows (means over seeds, CA drops against
each row's own model, BAERASE's cut relative to the model's ASR, ABL's CA against the clean recipe)."""
import importlib.util
import sys
from pathlib import Path

import pandas as pd

spec = importlib.util.spec_from_file_location(
    "seeds_targets", Path(__file__).resolve().parents[1] / "benchmarks" / "seeds_targets.py")
st = sys.modules["seeds_targets"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(st)


def row(attack, defense, seed, ca, asr, model_ca=0.83, model_asr=0.99, clean_size=None, model="vgg_small"):
    return {"trial_id": f"{attack}-{defense}-{clean_size}-{seed}-{model}", "status": "ok", "model": model,
            "attack": attack, "defense": defense, "seed": seed, "clean_acc": ca, "asr": asr,
            "attack_clean_acc": model_ca, "attack_asr": model_asr, "defense.clean_size": clean_size}


def verdicts(rows, clean=None):
    out = st.table(st.summarise(pd.DataFrame(rows)), {"wrn16_1": 85.54} if clean is None else clean)
    return {(r.target.split(":")[0], r.attack, r.seeds): r.verdict for r in out.itertuples()}


def test_targets_are_judged_on_the_mean_of_the_seeds():
    v = verdicts([
        # I-BAU 5,000 on Blended: seed 0 drops 4 points, seed 1 drops 1.6: the mean (2.8) meets the target
        row("blend", "ibau", 0, 0.79, 0.06, clean_size=5000), row("blend", "ibau", 1, 0.814, 0.04, clean_size=5000),
        # the issue names four attacks for I-BAU: WaNet has no I-BAU target
        row("wanet", "ibau", 0, 0.82, 0.01, clean_size=5000),
        # AWM 500 on one seed: ASR met, CA drop 4 > 3
        row("badnets", "awm", 0, 0.79, 0.05, clean_size=500),
        # I-BAU 100: the ASR alone, 25% > 20
        row("trojan_sq", "ibau", 0, 0.70, 0.25, clean_size=100), row("trojan_sq", "ibau", 1, 0.70, 0.25, clean_size=100),
    ])
    assert v == {("ibau 5000", "blend", "0,1"): "met", ("awm 500", "badnets", "0"): "missed (1 seed)",
                 ("ibau 100", "trojan_sq", "0,1"): "missed"}


def test_baerase_cut_is_relative_and_abl_is_held_against_the_clean_recipe():
    rows = [row("blend", "baerase", 0, 0.82, 0.05, model_asr=1.0),    # cut 95%, drop 1: met
            row("sig", "baerase", 0, 0.82, 0.05, model_asr=0.40),     # cut 87.5%: missed
            row("badnets", "abl", 0, 0.80, 0.01, model="wrn16_1")]    # 80.0 < 85.54 - 5
    v = verdicts(rows)
    assert v[("baerase", "blend", "0")] == "met (1 seed)"
    assert v[("baerase", "sig", "0")] == "missed (1 seed)"
    assert v[("abl", "badnets", "0")] == "missed (1 seed)"
    assert verdicts(rows, {"wrn16_1": 84.0})[("abl", "badnets", "0")] == "met (1 seed)"
    assert verdicts(rows, {})[("abl", "badnets", "0")] == "?"                # no clean CA for the model
