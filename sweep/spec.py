"""Sweep specs: YAML -> validated spec -> the list of trials.

A list value in an attack or defense entry expands into a grid (for a parameter whose value is itself a
list, such as ``position: [27, 27]``, a grid is a list of lists). Trials = seeds × attack variants ×
defense variants. Everything is checked here, before any trial starts or anything is written; all
problems are reported at once, each naming its field (``attacks[0].poison_rate: ...``).

A trial's identity is a content hash of its resolved config (defaults filled in), so the same trial
asked for twice, by two specs or two runs, is the same trial.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from attacks import ATTACKS
from defenses import DEFENSES
from defenses.base import clean_count
from kernel.data import DATASETS, dataset_info
from kernel.models import MODELS, default_train
from kernel.train import TrainConfig


class SpecError(ValueError):
    """An invalid spec; ``problems`` lists ``(field, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{f}: {m}" for f, m in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    name: str
    root: Optional[str] = Field(None, description="data folder (relative to the working directory)")
    train_size: Optional[int] = Field(None, ge=1)
    test_size: Optional[int] = Field(None, ge=1)
    download: bool = True
    # The defender's clean set: drawn from training images the attacker left clean ('train', the default),
    # or from the test split as I-BAU and AWM do ('test': ``clean_pool`` test images, a class-stratified
    # draw fixed for the sweep, are the defender's; CA/ASR are measured on the rest).
    clean_from: typing.Literal["train", "test"] = "train"
    clean_pool: Optional[int] = Field(None, ge=1, description="test images set aside for the defender when "
                                                              "clean_from is 'test' (default: half the test split)")

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; known: {', '.join(DATASETS.names())}")
        return v


class TrainSpec(_Strict):
    """Training settings of backdoored models; anything left out comes from the model's defaults."""

    epochs: Optional[int] = Field(None, ge=1)
    batch_size: Optional[int] = Field(None, ge=1)
    lr: Optional[float] = Field(None, gt=0)
    momentum: Optional[float] = Field(None, ge=0, lt=1)
    weight_decay: Optional[float] = Field(None, ge=0)
    nesterov: Optional[bool] = None
    schedule: Optional[typing.Literal["onecycle", "cosine", "constant"]] = None
    warmup: Optional[float] = Field(None, gt=0, lt=1)
    augment: Optional[bool] = None
    crop_pad: Optional[int] = Field(None, ge=0)
    label_smoothing: Optional[float] = Field(None, ge=0, lt=1)
    dropout: Optional[typing.Union[typing.Annotated[float, Field(ge=0, lt=1)], typing.Literal["architecture"]]] = Field(
        None, description="dropout rate while training the backdoored model (default: the model's registered "
        "recipe; 'architecture': the layers' own rates, e.g. vgg_small's 0.3/0.4/0.4)")
    precision: Optional[typing.Literal["auto", "fp32", "bf16"]] = Field(
        None, description="autocast dtype; 'auto' = bf16 where the GPU or CPU computes it natively")


class NormalizeStats(_Strict):
    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @field_validator("std")
    @classmethod
    def _positive(cls, v):
        if any(s <= 0 for s in v):
            raise ValueError("every std must be positive")
        return v


Normalization = Union[typing.Literal["dataset", "none"], NormalizeStats]


class CheckpointSpec(_Strict):
    """A trained backdoored model in place of training one (``attacks[i].checkpoint``)."""

    path: str
    # True when the model was trained on this attack's poisoning of the spec's dataset: then defenses
    # that train on the poisoned set (ABL) may run on this attack too.
    poisoned_data: bool = False


class Resources(_Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)


class SearchDist(_Strict):
    """One searched parameter: exactly one of ``uniform``, ``loguniform`` or ``int`` (a ``[low, high]`` range,
    both bounds included) or ``choice`` (a list of values)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    int_range: Optional[tuple[int, int]] = Field(None, alias="int")
    choice: Optional[list[Any]] = None

    @model_validator(mode="before")
    @classmethod
    def _a_mapping(cls, v):
        if not isinstance(v, dict):
            raise ValueError("a search range is a mapping: {uniform: [low, high]}, {loguniform: [low, high]}, "
                             "{int: [low, high]} or {choice: [...]}")
        return {k: x for k, x in v.items() if x is not None}

    @model_validator(mode="after")
    def _one_valid_range(self):
        given = [k for k in ("uniform", "loguniform", "int_range", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, loguniform, int (a [low, high] range) or choice (a list)")
        kind = self.kind
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice: an empty list gives no values to search")
            if len({json.dumps(c, sort_keys=True) for c in self.choice}) != len(self.choice):
                raise ValueError(f"choice: {self.choice} lists a value twice")
            return self
        low, high = self.bounds
        if not low < high:
            raise ValueError(f"{kind}: low must be below high (got [{low}, {high}])")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform: low must be > 0 (got {low})")
        return self

    @model_serializer(mode="wrap")
    def _given_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}

    @property
    def kind(self) -> str:
        """'uniform', 'loguniform', 'int' or 'choice'."""
        for k in ("uniform", "loguniform", "int_range", "choice"):
            if getattr(self, k) is not None:
                return "int" if k == "int_range" else k
        raise ValueError("empty search range")

    @property
    def bounds(self) -> tuple:
        return {"uniform": self.uniform, "loguniform": self.loguniform, "int": self.int_range}[self.kind]

    def values_to_check(self) -> list:
        """The values validated before a trial runs: both bounds of a range, every choice."""
        return list(self.choice) if self.kind == "choice" else list(self.bounds)


class SearchObjective(_Strict):
    """What a search optimises, on the result columns. ``max_ca_drop`` (percentage points of CA lost to the
    defense) makes it a constrained search: a trial over it scores 1 + (excess points) / 100 worse than any
    trial within it (a penalty every searcher understands)."""

    metric: typing.Literal["asr", "clean_acc", "robust_acc", "der"] = "asr"
    mode: Optional[typing.Literal["min", "max"]] = Field(None, description="default: min for asr, max otherwise")
    max_ca_drop: Optional[float] = Field(None, ge=0, description="most CA points the defense may lose")

    @model_validator(mode="after")
    def _default_mode(self):
        if self.mode is None:
            self.mode = "min" if self.metric == "asr" else "max"
        return self


class ASHASpec(_Strict):
    """Tune's ASHA scheduler, on the running objective a defense reports each round or epoch (ctx.log)."""

    grace_period: int = Field(1, ge=1, description="reports a trial makes before it may be stopped")
    reduction_factor: float = Field(2, gt=1, description="each rung keeps the best 1/reduction_factor")
    max_t: Optional[int] = Field(None, ge=1, description="stop every trial after this many reports (default: never)")

    @model_validator(mode="after")
    def _grace_below_max(self):
        if self.max_t is not None and self.max_t < self.grace_period:
            raise ValueError(f"max_t ({self.max_t}) must be at least grace_period ({self.grace_period})")
        return self


class SearchScheduler(_Strict):
    asha: ASHASpec

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"asha": {}} if v == "asha" else v


class SearchSpec(_Strict):
    """``search:``: Tune searches a defense's parameters, per attack variant and seed (see docs/search.md)."""

    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="default: DEFENSE_search")
    defense: Union[str, dict[str, Any]] = Field(description="a defense name, or {name: ..., fixed parameters}")
    space: dict[str, SearchDist] = Field(min_length=1)
    objective: SearchObjective = SearchObjective()
    num_samples: int = Field(ge=1, description="trials per attack variant and seed")
    max_concurrent: Optional[int] = Field(None, ge=1, description="default: the sweep's max_concurrent, else 4")
    searcher: typing.Literal["optuna", "hyperopt", "random"] = "optuna"
    seed: int = 0
    scheduler: Optional[SearchScheduler] = None

    @field_validator("defense")
    @classmethod
    def _named(cls, v):
        if isinstance(v, dict) and not isinstance(v.get("name"), str):
            raise ValueError("a mapping with a name: {name: ibau, batch_size: 64}")
        return v

    @property
    def defense_name(self) -> str:
        return self.defense if isinstance(self.defense, str) else self.defense["name"]

    @property
    def fixed(self) -> dict:
        """The defense's parameters the search holds fixed (the rest of the defaults stand)."""
        return {} if isinstance(self.defense, str) else {k: v for k, v in self.defense.items() if k != "name"}

    @property
    def label(self) -> str:
        return self.name or f"{self.defense_name}_search"


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    dataset: DatasetSpec
    model: str
    # Input normalisation inside the model: the dataset's mean/std ('dataset'), none (raw [0, 1] inputs,
    # as the I-BAU authors' models were trained), or given statistics. ``model: {name:, normalize:}``
    # is the same as ``model:`` and ``normalize:``.
    normalize: Normalization = "dataset"
    train: TrainSpec = TrainSpec()
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    attacks: list[dict[str, Any]] = Field(min_length=1)
    defenses: list[dict[str, Any]] = Field(min_length=1)
    resources: Resources = Resources()
    max_concurrent: Optional[int] = Field(None, ge=1)
    search: Optional[SearchSpec] = None  # a Tune search over one defense's parameters (sweep/search.py)

    @model_validator(mode="before")
    @classmethod
    def _model_mapping(cls, v):
        if isinstance(v, dict) and isinstance(v.get("model"), dict):
            m = dict(v["model"])
            extra = set(m) - {"name", "normalize"}
            if extra or "name" not in m:
                raise ValueError("model: a name, or a mapping {name: ..., normalize: dataset | none | "
                                 "{mean: [...], std: [...]}}" + (f"; unknown keys {sorted(extra)}" if extra else ""))
            if "normalize" in m and "normalize" in v:
                raise ValueError("normalize: given both in model and at the top level")
            v = {**v, "model": m["name"], **({"normalize": m["normalize"]} if "normalize" in m else {})}
        return v

    @field_validator("seeds", mode="before")
    @classmethod
    def _one_seed(cls, v):
        return [v] if isinstance(v, int) else v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v):
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; known: {', '.join(MODELS.names())}")
        return v


@dataclass(frozen=True)
class Variant:
    """One attack or defense with every parameter resolved (defaults filled in)."""

    name: str
    params: dict  # JSON-able, defaults included

    def as_dict(self) -> dict:
        return {"name": self.name, "params": self.params}


@dataclass(frozen=True)
class Trial:
    sweep: str
    trial_id: str  # content hash of everything below
    model_key: str  # content hash of what determines the backdoored model
    dataset: dict
    model: str
    train: dict
    seed: int
    attack: Variant
    defense: Variant
    normalize: Optional[dict] = None  # {'mean': [...], 'std': [...]}; None: the dataset's statistics
    checkpoint: Optional[dict] = None  # {'path', 'sha256', 'poisoned_data'}: a model read, not trained
    # the ids the same trial had before some of its defense's parameters existed (legacy_ids): a row under
    # one of them is this trial's, so a re-run skips it
    aliases: tuple = ()

    @property
    def ids(self) -> tuple[str, ...]:
        """Every id a row of this trial can have: its own, then its aliases."""
        return (self.trial_id, *self.aliases)

    def as_dict(self) -> dict:
        d = {"sweep": self.sweep, "trial_id": self.trial_id, "model_key": self.model_key,
             "dataset": self.dataset, "model": self.model, "train": self.train, "seed": self.seed,
             "attack": self.attack.as_dict(), "defense": self.defense.as_dict()}
        return {**d, **{k: getattr(self, k) for k in ("normalize", "checkpoint") if getattr(self, k) is not None}}

    @classmethod
    def from_dict(cls, d: dict) -> "Trial":
        return cls(**{**d, "attack": Variant(**d["attack"]), "defense": Variant(**d["defense"])})


def trial_id(model_key: str, dv: Variant) -> str:
    """A trial's id: the content hash of its backdoored model and its resolved defense."""
    return content_hash({"model_key": model_key, "defense": dv.as_dict()})


def legacy_ids(model_key: str, dv: Variant) -> tuple[str, ...]:
    """The ids a trial of ``dv`` on ``model_key`` had before some of its defense's parameters existed.

    A parameter added to a defense after trials were recorded declares the value those trials ran with
    (``json_schema_extra={'legacy': value}``, the value that does what the code did before it). A trial at
    that value is the trial an older row recorded under an id hashed without it, so a re-run after an
    upgrade skips it instead of running it again and writing a second row. Every subset of such
    parameters is dropped in turn (rows from between two additions lack only the later one)."""
    if dv.name not in DEFENSES:
        return ()
    fields = DEFENSES.get(dv.name).Params.model_fields
    at = [k for k, f in fields.items() if isinstance(f.json_schema_extra, dict) and "legacy" in f.json_schema_extra
          and k in dv.params and dv.params[k] == f.json_schema_extra["legacy"]]
    out = []
    for r in range(1, len(at) + 1):
        for drop in itertools.combinations(at, r):
            params = {k: v for k, v in dv.params.items() if k not in drop}
            out.append(trial_id(model_key, Variant(dv.name, params)))
    return tuple(out)


def content_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _is_list_typed(annotation) -> bool:
    """Whether a parameter's own values are lists/tuples (then a grid is a list of lists)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    return any(_is_list_typed(a) for a in args) if origin is Union else False


def _grid(entry: dict, params_cls: type[BaseModel]) -> list[dict]:
    keys, choices = [], []
    for k, v in entry.items():
        field = params_cls.model_fields.get(k)
        listy = field is not None and _is_list_typed(field.annotation)
        is_grid = isinstance(v, list) and (not listy or (v and all(isinstance(e, list) for e in v)))
        if is_grid and not v:
            raise ValueError(f"{k}: an empty list gives no values to sweep")
        keys.append(k)
        choices.append(v if is_grid else [v])
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def file_params(cls, params: dict):
    """(name, path) of the parameters that name a file (declared with json_schema_extra={'file': ...})."""
    for name, f in cls.Params.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if extra.get("file") and params.get(name):
            yield name, params[name]


def _variants(entries: list[dict], registry, section: str, context: dict, problems: list) -> list[list[Variant]]:
    out = []
    for i, entry in enumerate(entries):
        where = f"{section}[{i}]"
        entry = dict(entry)
        name = entry.pop("name", None)
        if name is None:
            problems.append((f"{where}.name", "missing field"))
            out.append([])
            continue
        if name not in registry:
            problems.append((f"{where}.name", f"unknown {registry.kind} {name!r}; known: {', '.join(registry.names())}"))
            out.append([])
            continue
        cls = registry.get(name)
        try:
            grid = _grid(entry, cls.Params)
        except ValueError as e:
            problems.append((where, str(e)))
            out.append([])
            continue
        variants, seen = [], set()
        for combo in grid:
            try:
                p = cls.Params.model_validate(combo, context=context)
            except ValidationError as e:
                for err in e.errors():
                    msg = err["msg"].removeprefix("Value error, ")
                    problems.append((f"{where}.{_loc(err['loc'])}" if err["loc"] else where, msg))
                continue
            params = p.model_dump(mode="json")
            for fname, path in file_params(cls, params):
                if not Path(path).expanduser().is_file():
                    problems.append((f"{where}.{fname}", f"file not found: {path}"))
                params[fname] = str(Path(path).expanduser().resolve())  # workers do not share our cwd
            v = Variant(name, params)
            key = content_hash(v.as_dict())
            if key not in seen:
                seen.add(key)
                variants.append(v)
        out.append(variants)
    return out


def resolve_train(spec: SweepSpec) -> dict:
    given = spec.train.model_dump(exclude_none=True)
    if given.get("dropout") == "architecture":
        given["dropout"] = None  # TrainConfig's None: leave the layers' rates alone
    return TrainConfig(**{**default_train(spec.model), **given}).as_dict()


def expand(spec: SweepSpec) -> list[Trial]:
    """Validate every attack/defense variant and every cross-field constraint, then list the trials.

    The order interleaves backdoored models: the first trial of every model comes before the second
    trial of any, so concurrent workers build different models at the start instead of waiting on one.
    """
    problems: list[tuple[str, str]] = []
    info = dataset_info(spec.dataset.name)
    ds = spec.dataset
    if ds.train_size and ds.train_size > info.train_len:
        problems.append(("dataset.train_size", f"{ds.train_size} exceeds the {info.train_len} training images of {info.name}"))
    if ds.test_size and ds.test_size > info.test_len:
        problems.append(("dataset.test_size", f"{ds.test_size} exceeds the {info.test_len} test images of {info.name}"))
    n_train = ds.train_size or info.train_len
    n_test = ds.test_size or info.test_len
    test_pool = clean_pool_size(ds.clean_from, ds.clean_pool, n_test)
    if ds.clean_from == "train" and ds.clean_pool is not None:
        problems.append(("dataset.clean_pool", "only used with clean_from: test (the defender's test images)"))
    if test_pool is not None and test_pool >= n_test:
        problems.append(("dataset.clean_pool", f"{test_pool} leaves none of the {n_test} test images to measure on"))
    ctx = {"num_classes": info.num_classes, "shape": info.shape}
    normalize = _normalization(spec.normalize, info, problems)
    entries = [dict(e) for e in spec.attacks]
    checkpoints = [_checkpoint(e.pop("checkpoint", None), f"attacks[{i}]", spec, info, normalize, problems)
                   for i, e in enumerate(entries)]
    attacks = _variants(entries, ATTACKS, "attacks", ctx, problems)
    defenses = _variants(spec.defenses, DEFENSES, "defenses", ctx, problems)
    for ai, avs in enumerate(attacks):
        for av in avs:
            if checkpoints[ai] is not None:
                _checkpoint_fits_attack(av, checkpoints[ai], ai, defenses, problems)
            # cross-field: every defender's clean set must fit in the pool the attacker left clean (or in
            # the test images set aside for the defender)
            pool = test_pool if test_pool is not None else n_train - _altered(av, n_train, info.num_classes)
            for di, dvs in enumerate(defenses):
                for dv in dvs:
                    cs = dv.params.get("clean_size")
                    if cs is not None and clean_count(cs, test_pool or n_train, info.num_classes) > pool:
                        where = "the clean_pool of test images" if test_pool is not None else f"attacks[{ai}] {av.params}"
                        problems.append((f"defenses[{di}].clean_size",
                                         f"{cs} is larger than the clean pool ({pool} images) left by {where}"))
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))

    # Where the data lies is not what it is; the clean-set protocol is part of it only when it is not the
    # default, so the trials of specs written before it keep their ids.
    dataset = ds.model_dump(exclude={"root", "download", "clean_from", "clean_pool"})
    if test_pool is not None:
        dataset.update(clean_from="test", clean_pool=test_pool)
    train = resolve_train(spec)
    groups: dict[str, list[Trial]] = {}
    for seed in spec.seeds:
        for ai, avs in enumerate(attacks):
            ckpt = checkpoints[ai]
            for av in avs:
                what = {"dataset": dataset, "model": spec.model, "train": train, "attack": av.as_dict(), "seed": seed}
                if normalize is not None:
                    what["normalize"] = normalize
                if ckpt is not None:  # the file's content is the model; training settings made none of it
                    what.pop("train")
                    what["checkpoint"] = ckpt["sha256"]
                model_key = content_hash(what)
                for dv in itertools.chain.from_iterable(defenses):
                    groups.setdefault(model_key, []).append(
                        Trial(spec.name, trial_id(model_key, dv), model_key, dataset, spec.model, train, seed, av, dv, normalize, ckpt,
                              legacy_ids(model_key, dv)))
    ordered = [t for wave in itertools.zip_longest(*groups.values()) for t in wave if t is not None]
    return list({t.trial_id: t for t in ordered}.values())


def clean_pool_size(clean_from: str, clean_pool: int | None, n_test: int) -> int | None:
    """Test images set aside for the defender (None: the clean set comes from the training split)."""
    if clean_from != "test":
        return None
    return clean_pool if clean_pool is not None else n_test // 2


def _normalization(norm, info, problems: list) -> dict | None:
    """The spec's ``normalize`` as {'mean', 'std'} for create_model; None for the dataset's statistics."""
    if norm == "dataset":
        return None
    if norm == "none":
        return {"mean": [0.0] * info.shape[0], "std": [1.0] * info.shape[0]}
    for k in ("mean", "std"):
        if len(getattr(norm, k)) not in (1, info.shape[0]):
            problems.append((f"normalize.{k}", f"{len(getattr(norm, k))} values for {info.shape[0]} channels"))
    return norm.model_dump()


def _checkpoint(raw, where: str, spec: SweepSpec, info, normalize: dict | None, problems: list) -> dict | None:
    """Validate ``attacks[i].checkpoint``: readable with weights_only, and fitting the spec's model."""
    if raw is None:
        return None
    from kernel.checkpoint import CheckpointError, file_digest, fit_state, read_state
    from kernel.models import create_model

    try:
        c = CheckpointSpec.model_validate({"path": raw} if isinstance(raw, str) else raw)
    except ValidationError as e:
        for err in e.errors():
            problems.append((f"{where}.checkpoint{('.' + _loc(err['loc'])) if err['loc'] else ''}",
                             err["msg"].removeprefix("Value error, ")))
        return None
    path = Path(c.path).expanduser().resolve()  # absolute: workers do not share our cwd
    try:
        norm = normalize or {"mean": info.mean, "std": info.std}
        fit_state(create_model(spec.model, info.num_classes, info.shape[0], **norm), read_state(path))
    except CheckpointError as e:
        problems.append((f"{where}.checkpoint", str(e)))
        return None
    return {"path": str(path), "sha256": file_digest(path), "poisoned_data": c.poisoned_data}


def _checkpoint_fits_attack(av: Variant, ckpt: dict, ai: int, defenses: list, problems: list) -> None:
    """A checkpoint replaces training only: its attack must describe the trigger by its parameters alone,
    and defenses that train on the poisoned set need the user's word that it is the model's data."""
    cls = ATTACKS.get(av.name)
    if cls.has_products:
        problems.append((f"attacks[{ai}].checkpoint", f"{av.name} computes its trigger against a model the engine "
                         "trains (or trains the model itself); a checkpoint goes with an attack whose trigger "
                         "its parameters fix"))
    if ckpt["poisoned_data"]:
        return
    for di, dvs in enumerate(defenses):
        for dv in dvs:
            if DEFENSES.get(dv.name).uses_poisoned_data:
                problems.append((f"defenses[{di}]", f"{dv.name} trains on the poisoned training set, which "
                                 f"attacks[{ai}] (a checkpoint) does not have; if the model was trained on this "
                                 f"attack's poisoning of the dataset, set attacks[{ai}].checkpoint.poisoned_data: true"))


def _altered(av: Variant, n_train: int, num_classes: int) -> int:
    """Training images the attack alters (poisons and its noise/mix/cross samples): not clean. A rate of
    the target class is counted on a balanced class (the labels are not loaded yet); the trial's own
    clean-set draw has the exact count."""
    if "poison_rate" not in av.params:
        return 0
    cls = ATTACKS.get(av.name)
    per = n_train / num_classes if av.params.get("rate_of") == "target_class" else n_train
    n = round(av.params["poison_rate"] * per)
    return n + cls.num_extra(cls.Params.model_validate(av.params), n)


def narrow(spec: SweepSpec, seeds=(), attacks=(), defenses=()) -> SweepSpec:
    """A piece of ``spec``: only the given seeds, attacks and defenses (by name; empty: all). ``NAME#K``
    picks the K-th entry of that name (1-based), for a spec that lists a method twice (two BadNets
    triggers). A trial's id does not depend on what else its spec lists, so the piece's rows count for the
    whole spec: a long sweep can be run piece by piece into one results directory (``sweep run
    --seed/--attack/--defense``)."""
    problems = []
    if unknown := [v for v in seeds if v not in spec.seeds]:
        problems += [("--seed", f"{v!r} is not in the spec's seeds ({', '.join(map(str, spec.seeds))})") for v in unknown]
    update = {}
    if seeds:
        update["seeds"] = [s for s in spec.seeds if s in seeds]
    for flag, given, entries, field in (("--attack", attacks, spec.attacks, "attacks"),
                                        ("--defense", defenses, spec.defenses, "defenses")):
        if not given:
            continue
        names = [e.get("name") for e in entries]
        keep = set()
        for v in given:
            name, _, k = str(v).partition("#")
            at = [i for i, n in enumerate(names) if n == name]
            if not at:
                problems.append((flag, f"{v!r} is not in the spec's {field} ({', '.join(dict.fromkeys(names))})"))
            elif not k:
                keep.update(at)
            elif not k.isdigit() or not 1 <= int(k) <= len(at):
                problems.append((flag, f"{v!r}: the spec lists {len(at)} {name!r} entr{'y' if len(at) == 1 else 'ies'}; "
                                       f"write {name}#1{f' to {name}#{len(at)}' if len(at) > 1 else ''}"))
            else:
                keep.add(at[int(k) - 1])
        update[field] = [e for i, e in enumerate(entries) if i in keep]
    if problems:
        raise SpecError(problems)
    if defenses and spec.search is not None and spec.search.defense_name not in {d.get("name") for d in update["defenses"]}:
        update["search"] = None
    return spec.model_copy(update=update)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a YAML spec; raises SpecError naming the field of each problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError([("spec", f"no such file: {path}")]) from None
    except yaml.YAMLError as e:
        raise SpecError([("spec", f"{path} is not valid YAML: {e}")]) from None
    if not isinstance(raw, dict):
        raise SpecError([("spec", f"{path} must hold a YAML mapping (name:, dataset:, model:, attacks:, defenses:)")])
    return parse_spec(raw)


def parse_spec(raw: dict) -> SweepSpec:
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError([(_loc(err["loc"]) or "spec", "missing required field" if err["type"] == "missing"
                          else err["msg"].removeprefix("Value error, ")) for err in e.errors()]) from None
    if spec.dataset.root:
        # Absolute, because Ray workers do not share the driver's working directory.
        spec.dataset.root = str(Path(spec.dataset.root).expanduser().resolve())
    if spec.search is not None:
        from sweep.search import check_search  # the space against the defense's parameters and the data

        check_search(spec)
    return spec
