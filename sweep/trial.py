"""One trial: poison the data -> backdoored model (trained once, from the store) -> defense -> metrics.

``execute`` never raises: an exception (or a diverged loss) becomes a ``status='failed'`` row with the
error, so one bad trial cannot stop a sweep of thousands.
"""
from __future__ import annotations

import platform
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable
from datetime import datetime, timezone

import torch

from attacks import ATTACKS
from attacks.base import AttackContext
from defenses import DEFENSES
from defenses.base import DefenseContext, draw_clean_set
from kernel.checkpoint import load_checkpoint
from kernel.data import (Dataset, DatasetInfo, Split, dataset_info, load_dataset, read_file,
                         stratified_indices)
from kernel.metrics import evaluate
from kernel.models import create_model
from kernel.train import TrainConfig, fit, set_dropout
from sweep.spec import Trial, Variant, content_hash, file_params
from sweep.store import Store

CURVE_SAMPLES = 1000  # test images used for per-epoch curves: enough for a curve, cheap enough per epoch
_DATA_MEMO: dict[str, Dataset] = {}  # per worker process: actors are reused, so is their data
PROTOCOL = ("clean_from", "clean_pool")  # dataset keys that say where the defender's clean set comes from


def split_test(ds: Dataset, dataset: dict) -> tuple[Dataset, Split | None]:
    """(the data to measure on, the defender's test pool or None). With ``clean_from: test`` a fixed
    class-stratified draw of ``clean_pool`` test images is the defender's (the same for every seed and
    trial, as I-BAU's first 5,000 test images are) and CA/ASR are measured on the other test images."""
    if dataset.get("clean_from") != "test":
        return ds, None
    pool = stratified_indices(ds.test.y, dataset["clean_pool"], 0)
    rest = torch.ones(len(ds.test), dtype=torch.bool)
    rest[pool] = False
    return Dataset(ds.info, ds.train, ds.test.subset(rest.nonzero().flatten())), ds.test.subset(pool)


@dataclass
class Outcome:
    row: dict
    curves: dict = field(default_factory=dict)  # name -> list of per-step records
    artifacts: dict = field(default_factory=dict)  # name -> image tensor


def load_data(trial: Trial, root: str | None, download: bool, store: Store) -> Dataset:
    """The trial's dataset, decoded once per store and held once per worker."""
    d = {k: v for k, v in trial.dataset.items() if k not in PROTOCOL}  # the same images either way
    key = content_hash({**d, "root": root})
    if key in _DATA_MEMO:
        return _DATA_MEMO[key]

    def build():
        ds = load_dataset(d["name"], root=root, train_size=d["train_size"], test_size=d["test_size"],
                          seed=0, download=download)
        return ({"train_x": ds.train.x, "train_y": ds.train.y, "test_x": ds.test.x, "test_y": ds.test.y},
                {"dataset": d, "root": root})

    t, _, _ = store.get_or_build("datasets", key, build)
    ds = Dataset(dataset_info(d["name"]), Split(t["train_x"], t["train_y"]), Split(t["test_x"], t["test_y"]))
    _DATA_MEMO.clear()  # one dataset per worker at a time keeps memory flat across long sweeps
    _DATA_MEMO[key] = ds
    return ds


def _load_files(cls, params: dict, info: DatasetInfo) -> dict:
    """Read the files an attack's parameters name (e.g. a blend trigger image): attacks do no I/O."""
    return {name: read_file(path, info.shape) for name, path in file_params(cls, params)}


def base_row(trial: Trial) -> dict:
    row = {"sweep": trial.sweep, "trial_id": trial.trial_id, "model_key": trial.model_key,
           "dataset": trial.dataset["name"], "model": trial.model, "attack": trial.attack.name,
           "defense": trial.defense.name, "defense_key": content_hash(trial.defense.as_dict()),
           "seed": trial.seed, "status": "running", "error": None,
           "clean_acc": None, "asr": None, "robust_acc": None, "attack_clean_acc": None, "attack_asr": None,
           "attack_robust_acc": None, "attack_seconds": None, "defense_seconds": None, "attack_cached": None,
           "started_at": datetime.now(timezone.utc).isoformat(), "finished_at": None,
           "host": platform.node(), "device": None, "clean_from": trial.dataset.get("clean_from", "train"),
           "checkpoint": (trial.checkpoint or {}).get("path")}
    row.update({f"attack.{k}": v for k, v in trial.attack.params.items()})
    row.update({f"defense.{k}": v for k, v in trial.defense.params.items()})
    return row


def execute(trial: Trial, store: Store, *, root: str | None = None, download: bool = True,
            device: torch.device | None = None, progress: Callable[[dict], None] | None = None) -> Outcome:
    """``progress``, when given, is called after every epoch of a model this trial trains for the store
    with ``{"model_key", "epoch" (1-based), "epochs", "seconds"}`` (seconds since that training began):
    an hour-long build is then not silent (the runner turns it into the progress line and the ETA)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Outcome(base_row(trial))
    row = out.row
    row["device"] = str(device)
    try:
        _run(trial, store, root, download, device, out, progress)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - any failure becomes a recorded row
        row["status"] = "failed"
        row["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
    row["finished_at"] = datetime.now(timezone.utc).isoformat()
    return out


def _with(product, **record):
    tensors, rec = product
    return tensors, {**rec, **record}


def _run(trial: Trial, store: Store, root, download, device, out: Outcome, progress=None) -> None:
    row, seed = out.row, trial.seed
    ds, test_pool = split_test(load_data(trial, root, download, store), trial.dataset)
    info = ds.info
    acls, dcls = ATTACKS.get(trial.attack.name), DEFENSES.get(trial.defense.name)
    attack = acls(acls.Params.model_validate(trial.attack.params), info, seed,
                  files=_load_files(acls, trial.attack.params, info))
    defense = dcls(dcls.Params.model_validate(trial.defense.params))
    cfg = TrainConfig(**trial.train)

    def new_model():
        torch.manual_seed(seed)  # same init for a seed, whatever ran before in this process
        norm = trial.normalize or {"mean": info.mean, "std": info.std}
        m = create_model(trial.model, info.num_classes, info.shape[0], **norm)
        if trial.checkpoint is None:  # the network as the recipe trains it: a defense's fine-tuning of a
            set_dropout(m, cfg.dropout)  # model trained without dropout must not switch it on
        return m

    def train_and_record(m, x, y, triggered, fit_it: bool = True, key: str = trial.model_key) -> tuple[dict, dict]:
        """Train ``m`` on (x, y) (unless ``fit_it`` is False: already trained), measure it: a store product."""
        t0 = time.perf_counter()

        def on_epoch(e, rec):
            rec.update(curve_metrics(m))
            if progress is not None:
                progress({"model_key": key, "epoch": e + 1, "epochs": cfg.epochs,
                          "seconds": time.perf_counter() - t0})

        hist = fit(m, x, y, cfg, seed=seed, device=device, on_epoch=on_epoch) if fit_it else []
        seconds = time.perf_counter() - t0
        metrics = evaluate(m, ds.test.x, ds.test.y, triggered, device)
        state = {k: v.detach().cpu() for k, v in m.state_dict().items()}
        return state, {"metrics": metrics, "seconds": seconds, "history": hist, "trial": trial.as_dict()}

    # Per-epoch curves use a class-stratified sample of the test set (published test sets are often
    # sorted by class: the first 1,000 images would all be one class).
    cidx = stratified_indices(ds.test.y, min(CURVE_SAMPLES, len(ds.test)), 0)
    curve_x, curve_y, curve_trig = ds.test.x[cidx], ds.test.y[cidx], None  # trigger set once poisoned

    def curve_metrics(m):
        was_training = m.training
        r = evaluate(m, curve_x, curve_y, curve_trig, device)
        m.train(was_training)
        return {k: v for k, v in r.items() if v is not None}

    if attack.has_products:
        def reference_model():
            """The clean model of this seed: attack ``none``'s backdoored model, from the same cache."""
            key = content_hash({"dataset": trial.dataset, "model": trial.model, "train": trial.train,
                                "attack": Variant("none", {}).as_dict(), "seed": seed})
            state, _, _ = store.get_or_build(
                "models", key,
                lambda: _with(train_and_record(new_model(), ds.train.x, ds.train.y, None, key=key), poisoned=0))
            m = new_model()
            m.load_state_dict(state)
            return m.to(device).eval().requires_grad_(False)  # attacks differentiate w.r.t. inputs only

        def prepare():
            actx = AttackContext(train_cfg=cfg, device=device, new_model=new_model,
                                 reference_model=reference_model, evaluate=curve_metrics)
            t0 = time.perf_counter()
            tensors = attack.prepare(ds.train, actx)
            return ({k: v.detach().cpu() for k, v in tensors.items()},
                    {"seconds": time.perf_counter() - t0, "history": actx.history, "trial": trial.as_dict()})

        products, products_record, _ = store.get_or_build("products", trial.model_key, prepare)
        attack.load(products)

    poisoned = attack.poison(ds.train)
    triggered = attack.triggered_test(ds.test)
    if triggered is not None and len(triggered.y_true):
        tidx = stratified_indices(triggered.y_true, min(CURVE_SAMPLES, len(triggered.y_true)), 0)
        curve_trig = type(triggered)(triggered.x[tidx], triggered.y_true[tidx], triggered.y_attack[tidx])

    model = None
    if defense.needs_backdoored_model:
        def build():
            m = new_model()
            if trial.checkpoint is not None:  # the user's model: read (weights only), measured, not trained
                load_checkpoint(m, trial.checkpoint["path"])
                state, record = train_and_record(m.to(device), None, None, triggered, fit_it=False)
                record["checkpoint"] = trial.checkpoint
            elif attack.trains_model:  # the attack trained it in prepare(): its weights are products
                m.load_state_dict({k[6:]: v for k, v in products.items() if k.startswith("model.")})
                state, record = train_and_record(m.to(device), None, None, triggered, fit_it=False)
                record.update(seconds=products_record["seconds"], history=products_record["history"])
            else:
                state, record = train_and_record(m, poisoned.train.x, poisoned.train.y, triggered)
            record["poisoned"] = None if trial.checkpoint is not None else len(poisoned.indices)
            return state, record

        state, record, built = store.get_or_build("models", trial.model_key, build)
        model = new_model()
        model.load_state_dict(state)
        model.to(device)
        m = record["metrics"]
        row.update(attack_clean_acc=m["clean_acc"], attack_asr=m["asr"], attack_robust_acc=m["robust_acc"],
                   attack_seconds=record["seconds"], attack_cached=not built)
        out.curves["train"] = record["history"]
    elif (record := store.load_record("models", trial.model_key)) is not None:
        # A training-time defense (ABL) builds no backdoored model and waits on none; when the sweep
        # already has the model for this attack, its figures are the row's before-defense columns.
        m = record["metrics"]
        row.update(attack_clean_acc=m["clean_acc"], attack_asr=m["asr"], attack_robust_acc=m["robust_acc"],
                   attack_seconds=record["seconds"], attack_cached=True)

    ctx = DefenseContext(info=info, train_cfg=cfg, seed=seed, device=device,
                         poisoned_train=poisoned.train, new_model=new_model, evaluate=curve_metrics)
    truth = torch.zeros(len(ds.train), dtype=torch.bool)
    truth[poisoned.indices] = True

    def score_isolation(flagged: torch.Tensor) -> dict:
        hits = int(truth[flagged.cpu()].sum())
        return {"precision": hits / max(1, len(flagged)), "recall": hits / max(1, int(truth.sum()))}

    ctx.score_isolation = score_isolation
    if dcls.uses_clean_set():
        if test_pool is not None:  # the papers' protocol: the defender holds test images
            ctx.clean = draw_clean_set(test_pool, torch.empty(0, dtype=torch.long), defense.params.clean_size,
                                       seed, info.num_classes)
        else:
            touched = torch.cat([poisoned.indices, poisoned.noise_indices])  # WaNet's noise samples too
            ctx.clean = draw_clean_set(ds.train, touched, defense.params.clean_size, seed, info.num_classes)
    t0 = time.perf_counter()
    model = defense.apply(model, ctx)
    row["defense_seconds"] = time.perf_counter() - t0
    row.update(evaluate(model, ds.test.x, ds.test.y, triggered, device))
    if ctx.history:
        out.curves["defense"] = ctx.history
    out.artifacts.update(ctx.artifacts)
    unknown = set(ctx.outputs) - set(dcls.outputs)
    if unknown:
        raise RuntimeError(f"defense {dcls.name} reported undeclared outputs {sorted(unknown)}")
    row.update(ctx.outputs)
