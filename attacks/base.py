"""What an attack is, in the engine's terms.

An attack (data poisoning) says
1. which training samples it poisons (``select``), their new images (``apply_trigger``) and labels
   (``attack_label``): together :meth:`Attack.poison`;
2. how to stamp a test input (``apply_trigger``) and what label it then wants (``attack_label``):
   :meth:`Attack.triggered_test`, from which ASR and RA are computed.
Attacks work on float images in [0, 1] and do no I/O: a file a parameter names (a trigger image) is
read by the engine and handed over in ``files``.

Attacks with expensive by-products (TrojanNN's optimised trigger, label-consistent's adversarial images,
input-aware's generators) compute them in :meth:`Attack.prepare` from the clean training set and an
:class:`AttackContext` (which lends a clean reference model, trained once and shared with attack ``none``),
and return tensors. The engine caches those per (dataset, model, training settings, attack parameters,
seed) and hands them to :meth:`Attack.load` in every trial that needs them, so they are computed once.
A *training-controlled* attack (``trains_model``, e.g. input-aware) trains its backdoored model itself, in
``prepare``; the model's weights are the products under ``model.``.

Parameters are a pydantic model per attack (``Params``), with the literature's defaults; the sweep spec
is validated against it, so an unknown or ill-typed parameter is refused before any trial runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kernel.data import DatasetInfo, Split
from kernel.metrics import TriggeredSet
from kernel.train import TrainConfig, to_float, to_uint8


class AttackParams(BaseModel):
    """Parameters common to no attack: subclasses add theirs. Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PoisonParams(AttackParams):
    poison_rate: float = Field(0.1, gt=0, le=1, description="fraction of the training set poisoned")
    target: Union[int, Literal["all"]] = Field(
        0, description="target class (all-to-one), or 'all' for all-to-all: y -> (y + 1) mod K")

    @field_validator("target")
    @classmethod
    def _target_is_a_class(cls, v, info: ValidationInfo):
        k = (info.context or {}).get("num_classes")
        if isinstance(v, int) and k is not None and not 0 <= v < k:
            raise ValueError(f"target {v} is not a class of this dataset (0..{k - 1})")
        return v


class CleanLabelParams(PoisonParams):
    """Clean-label attacks (SIG, LC, ...) poison only target-class images and keep their labels."""

    rate_of: Literal["train", "target_class"] = Field(
        "train", description="poison_rate is a fraction of the whole training set (BackdoorBench) or of "
                             "the target class")

    @field_validator("target")
    @classmethod
    def _not_all_to_all(cls, v):
        if v == "all":
            raise ValueError("a clean-label attack poisons target-class images without changing their labels, "
                             "so all-to-all ('all') has no meaning; give one target class")
        return v

    @model_validator(mode="after")
    def _rate_fits_the_target_class(self, info: ValidationInfo):
        k = (info.context or {}).get("num_classes")
        if k and self.rate_of == "train" and self.poison_rate > 1 / k + 1e-9:
            raise ValueError(f"poison_rate {self.poison_rate} of the training set exceeds the share of one class "
                             f"(1/{k}); a clean-label attack poisons only target-class images. Use rate_of: "
                             "target_class to give a fraction of the target class")
        return self


@dataclass
class Poisoned:
    """The training set as the attacker hands it over, and which positions were poisoned."""

    train: Split
    indices: torch.Tensor  # int64 positions into train
    # Positions whose image the attack altered *without* making them backdoor samples, labels kept
    # (WaNet's noise-mode "cross" samples). Not in ``indices`` (they carry no backdoor), but not clean
    # data either: a defender's clean set should not be drawn from them.
    noise_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def weights(module: "torch.nn.Module", prefix: str = "model") -> dict[str, torch.Tensor]:
    """``module``'s state as products, its keys under ``prefix.`` (CPU, contiguous: what the store saves).
    A training-controlled attack returns its backdoored model this way: the engine loads the ``model.``
    entries into the trial's model."""
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


@dataclass
class AttackContext:
    """What the engine lends :meth:`Attack.prepare`."""

    train_cfg: TrainConfig  # the sweep's training settings (for attacks that train something)
    device: torch.device
    new_model: Callable[[], "torch.nn.Module"]  # a fresh, untrained model of the sweep's architecture
    # A model of the sweep's architecture trained with the sweep's settings on the *clean* training set:
    # the backdoored model of attack ``none`` for this seed, from the same cache, so it is trained once.
    # In eval mode, fp32, its parameters frozen: attacks differentiate w.r.t. images or triggers only.
    reference_model: Callable[[], "torch.nn.Module"]
    history: list = field(default_factory=list)  # per-epoch records of what prepare trained (curves)
    evaluate: Optional[Callable[["torch.nn.Module"], dict]] = None  # CA of a model, for those curves

    def curve(self, model: "torch.nn.Module") -> dict:
        """``model``'s curve metrics (CA/ASR/RA on the engine's curve sample), or none when the engine
        lends no evaluator (direct calls, tests)."""
        return self.evaluate(model) if self.evaluate is not None else {}


class Attack:
    name: ClassVar[str]
    Params: ClassVar[type[AttackParams]] = AttackParams
    clean_label: ClassVar[bool] = False  # poisons keep their true labels (SIG, LC, ...)
    has_products: ClassVar[bool] = False  # computes by-products in prepare(), cached by the engine
    trains_model: ClassVar[bool] = False  # training-controlled: prepare() also trains the backdoored model

    def __init__(self, params: AttackParams, info: DatasetInfo, seed: int, files: dict | None = None):
        self.params, self.info, self.seed, self.files = params, info, seed, files or {}
        self.num_classes = info.num_classes

    # -- the attack's own definition -------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (N, C, H, W) -> triggered images in [0, 1]."""
        raise NotImplementedError

    def attack_label(self, y: torch.Tensor) -> torch.Tensor:
        """The label the attacker wants for a triggered input of true label ``y``."""
        t = self.params.target
        return (y + 1) % self.num_classes if t == "all" else torch.full_like(y, t)

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        """Which training samples may be poisoned: dirty-label attacks take those whose label changes."""
        return self.attack_label(y) == y if self.clean_label else self.attack_label(y) != y

    def num_poison(self, n_train: int) -> int:
        return round(self.params.poison_rate * n_train)

    @classmethod
    def num_extra(cls, params: AttackParams, n_poison: int) -> int:
        """Images altered besides the poisons (``Poisoned.noise_indices``: WaNet's noise samples, CBA's
        negative mixes, input-aware's cross samples); none by default. The spec counts them out of the
        defender's clean pool (before any data or file is loaded: a classmethod)."""
        return 0

    def prepare(self, train: Split, ctx: AttackContext) -> dict[str, torch.Tensor]:
        """Compute the attack's by-products from the clean training set (``has_products`` attacks)."""
        raise NotImplementedError

    def load(self, products: dict[str, torch.Tensor]) -> None:
        """Take the by-products ``prepare`` returned (possibly in another process, from the cache)."""
        raise NotImplementedError

    # -- derived, shared by all attacks ----------------------------------------------------------
    def select(self, y: torch.Tensor) -> torch.Tensor:
        """Seeded choice of ``num_poison`` eligible positions (sorted)."""
        pool = self.eligible(y).nonzero().flatten()
        k = self.num_poison(len(y))
        if k > len(pool):
            raise ValueError(f"{self.name}: poison_rate {self.params.poison_rate} asks for {k} samples "
                             f"but only {len(pool)} are eligible")
        g = torch.Generator().manual_seed(self.seed)
        return pool[torch.randperm(len(pool), generator=g)[:k]].sort().values

    def draw_unpoisoned(self, n: int, poisoned: torch.Tensor, k: int,
                        what: str) -> tuple[torch.Tensor, torch.Generator]:
        """Seeded, sorted choice of ``k`` of the ``n`` positions not in ``poisoned`` (noise-mode or cross
        samples), and the generator it used, on a stream of its own: independent of :meth:`select`."""
        taken = torch.zeros(n, dtype=torch.bool)
        taken[poisoned] = True
        pool = (~taken).nonzero().flatten()
        if k > len(pool):
            raise ValueError(f"{self.name}: cross_ratio {self.params.cross_ratio} asks for {k} {what} but only "
                             f"{len(pool)} samples are left unpoisoned")
        g = torch.Generator().manual_seed(self.seed + 1_000_003)
        return pool[torch.randperm(len(pool), generator=g)[:k]].sort().values, g

    def poison(self, train: Split) -> Poisoned:
        idx = self.select(train.y)
        x, y = train.x.clone(), train.y.clone()
        if len(idx):
            x[idx] = to_uint8(self.apply_trigger(to_float(train.x[idx])))  # stored as an image would be
            if not self.clean_label:
                y[idx] = self.attack_label(train.y[idx])
        return Poisoned(Split(x, y), idx)

    def triggered_test(self, test: Split) -> TriggeredSet | None:
        y_attack = self.attack_label(test.y)
        keep = y_attack != test.y  # inputs already of the attack's label say nothing about the backdoor
        return TriggeredSet(self.apply_trigger(to_float(test.x[keep])), test.y[keep], y_attack[keep])


class CleanLabelAttack(Attack):
    """Poisons target-class training images only, labels kept; ``poison_rate`` counts per ``rate_of``."""

    Params: ClassVar[type[AttackParams]] = CleanLabelParams
    clean_label = True
    _n_target: int | None = None  # size of the target class, known once select() has seen the labels

    def num_poison(self, n_train: int) -> int:
        if self.params.rate_of == "train":
            return super().num_poison(n_train)
        if self._n_target is None:
            raise RuntimeError(f"{self.name} with rate_of: target_class counts its poisons in select(), "
                               "from the labels")
        return round(self.params.poison_rate * self._n_target)

    def select(self, y: torch.Tensor) -> torch.Tensor:
        self._n_target = int(self.eligible(y).sum())
        return super().select(y)


def add_and_clip(x: torch.Tensor, pattern: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """I-BAU's ``patching`` for image triggers: ``clip(x * keep + pattern, 0, 1)`` (``keep`` = 1 − mask for
    L0-inv, none for the additive Trojan and L2-inv triggers)."""
    x = x if keep is None else x * keep.to(x)
    return (x + pattern.to(x)).clamp(0, 1)


def released_trigger(name: str) -> str | None:
    """The I-BAU authors' released trigger file ``name`` (``$BDSWEEP_IBAU_TRIGGERS``, else
    ``../shared/data/ibau-cifar10/triggers`` beside the project) when it is there, else None: the default
    of the attacks that read those files."""
    import os
    from pathlib import Path

    folder = os.environ.get("BDSWEEP_IBAU_TRIGGERS") or Path(__file__).resolve().parents[2] / "shared/data/ibau-cifar10/triggers"
    path = Path(folder) / name
    return str(path) if path.is_file() else None


class ReleasedTriggerParams(PoisonParams):
    """Parameters of an attack whose trigger is a file of the I-BAU release (l0_inv, l2_inv): a file field
    declared with ``json_schema_extra={'file': ..., 'release': NAME}`` and ``validate_default=True``
    defaults to that release's file NAME when it is on disk, and must be given otherwise."""

    target: Union[int, Literal["all"]] = Field(0, description="target class (I-BAU: 0), or 'all'")

    @field_validator("*", mode="before")
    @classmethod
    def _released_by_default(cls, v, info: ValidationInfo):
        extra = cls.model_fields[info.field_name].json_schema_extra
        release = extra.get("release") if isinstance(extra, dict) else None
        if v is not None or release is None:
            return v
        found = released_trigger(release)
        if found is None:
            raise ValueError(f"no file given, and the I-BAU release's triggers/{release} was not found (give "
                             "the file, or set BDSWEEP_IBAU_TRIGGERS to the release's triggers/ folder)")
        return found


def corner(position, size: int, h: int, w: int, margin: int = 0) -> tuple[int, int]:
    """Top-left (row, col) of a size×size patch at a named corner or an explicit [row, col]."""
    if not isinstance(position, str):
        r, c = position
    else:
        v, hpos = position.split("_")
        r = margin if v == "top" else h - size - margin
        c = margin if hpos == "left" else w - size - margin
    if not (0 <= r <= h - size and 0 <= c <= w - size):
        raise ValueError(f"a {size}x{size} patch at ({r}, {c}) does not fit a {h}x{w} image")
    return r, c


class PrecomputedPoisonsAttack(CleanLabelAttack):
    """A clean-label attack whose poisoned images are computed in ``prepare`` against a model (LC's
    adversarial images, FC's feature collisions): products ``indices`` (the seed's selection) and
    ``images`` (uint8). ``finish`` turns them into what the training set gets (e.g. stamps the trigger)."""

    has_products = True
    poison_images: torch.Tensor | None = None
    poison_indices: torch.Tensor | None = None

    def load(self, products: dict[str, torch.Tensor]) -> None:
        self.poison_indices, self.poison_images = products["indices"], products["images"]

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 precomputed images -> uint8 poisons as they enter the training set."""
        return images

    def poison(self, train: Split) -> Poisoned:
        if self.poison_images is None:
            raise RuntimeError(f"{self.name}: prepare()/load() must run before poison(): its poisoned images "
                               "are computed against a model")
        idx = self.select(train.y)
        if not torch.equal(idx, self.poison_indices):
            raise RuntimeError(f"{self.name}: the precomputed images were made for other samples than this "
                               "seed selects")
        x = train.x.clone()
        if len(idx):
            x[idx] = self.finish(self.poison_images)
        return Poisoned(Split(x, train.y.clone()), idx)
