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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    precision: Optional[typing.Literal["auto", "fp32", "bf16"]] = Field(
        None, description="autocast dtype; 'auto' = bf16 where the GPU or CPU computes it natively")


class Resources(_Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    dataset: DatasetSpec
    model: str
    train: TrainSpec = TrainSpec()
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    attacks: list[dict[str, Any]] = Field(min_length=1)
    defenses: list[dict[str, Any]] = Field(min_length=1)
    resources: Resources = Resources()
    max_concurrent: Optional[int] = Field(None, ge=1)

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

    def as_dict(self) -> dict:
        return {"sweep": self.sweep, "trial_id": self.trial_id, "model_key": self.model_key,
                "dataset": self.dataset, "model": self.model, "train": self.train, "seed": self.seed,
                "attack": self.attack.as_dict(), "defense": self.defense.as_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Trial":
        return cls(**{**d, "attack": Variant(**d["attack"]), "defense": Variant(**d["defense"])})


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
    ctx = {"num_classes": info.num_classes, "shape": info.shape}
    attacks = _variants(spec.attacks, ATTACKS, "attacks", ctx, problems)
    defenses = _variants(spec.defenses, DEFENSES, "defenses", ctx, problems)
    # cross-field: every defender's clean set must fit in the pool the attacker left clean
    for ai, avs in enumerate(attacks):
        for av in avs:
            pool = n_train - _altered(av, n_train, info.num_classes)
            for di, dvs in enumerate(defenses):
                for dv in dvs:
                    cs = dv.params.get("clean_size")
                    if cs is not None and clean_count(cs, n_train, info.num_classes) > pool:
                        problems.append((f"defenses[{di}].clean_size",
                                         f"{cs} is larger than the clean pool ({pool} images) left by attacks[{ai}] {av.params}"))
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))

    dataset = ds.model_dump(exclude={"root", "download"})  # where the data lies is not what it is
    train = resolve_train(spec)
    groups: dict[str, list[Trial]] = {}
    for seed in spec.seeds:
        for av in itertools.chain.from_iterable(attacks):
            model_key = content_hash({"dataset": dataset, "model": spec.model, "train": train,
                                      "attack": av.as_dict(), "seed": seed})
            for dv in itertools.chain.from_iterable(defenses):
                tid = content_hash({"model_key": model_key, "defense": dv.as_dict()})
                groups.setdefault(model_key, []).append(
                    Trial(spec.name, tid, model_key, dataset, spec.model, train, seed, av, dv))
    ordered = [t for wave in itertools.zip_longest(*groups.values()) for t in wave if t is not None]
    return list({t.trial_id: t for t in ordered}.values())


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
    return spec
