"""The kernel really learns: on the quickstart's data and settings a BadNets model reaches the ASR the
README promises, and a clean model does not respond to the trigger. (About 2-3 minutes on 2 cores.)"""
import pytest
import torch

from sweep.spec import expand, parse_spec
from sweep.store import Store
from attacks import ATTACKS
from kernel.metrics import evaluate
from kernel.models import create_model
from sweep.trial import execute, load_data

SPEC = {"name": "q", "dataset": {"name": "synthetic", "train_size": 5000, "test_size": 1000},
        "model": "small_cnn", "train": {"epochs": 20, "batch_size": 256, "lr": 0.05}, "seeds": [0],
        "attacks": [{"name": "badnets", "poison_rate": 0.1, "target": 0}], "defenses": [{"name": "none"}]}


@pytest.mark.slow
def test_badnets_on_quickstart_settings_reaches_90_percent_asr(tmp_path):
    torch.set_num_threads(2)
    (trial,) = expand(parse_spec(SPEC))
    row = execute(trial, Store(tmp_path)).row
    assert row["status"] == "ok", row["error"]
    assert row["asr"] >= 0.90, row
    assert row["clean_acc"] >= 0.60, row  # 10 shape classes: chance is 0.10
    # the same trigger on a model trained without poison is not a backdoor
    clean = dict(SPEC, attacks=[{"name": "none"}])
    (ref,) = expand(parse_spec(clean))
    ref_row = execute(ref, Store(tmp_path)).row
    assert abs(ref_row["clean_acc"] - row["clean_acc"]) <= 0.05, (ref_row, row)
    ds = load_data(ref, None, False, Store(tmp_path))
    model = create_model("small_cnn", 10, 3, ds.info.mean, ds.info.std)
    model.load_state_dict(Store(tmp_path).load("models", ref.model_key)[0])
    badnets = ATTACKS.get("badnets")(ATTACKS.get("badnets").Params(), ds.info, 0)
    clean_asr = evaluate(model, ds.test.x, ds.test.y, badnets.triggered_test(ds.test))["asr"]
    assert clean_asr < 0.3, clean_asr  # the trigger alone does not move a clean model to the target
