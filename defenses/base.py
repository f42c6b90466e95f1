"""What a defense is, in the engine's terms.

A defense receives the backdoored model and a :class:`DefenseContext` (the defender's clean set, the
sweep's training settings, a factory for fresh models, a seed and device) and returns the purified
model. It does no I/O: curves go through ``ctx.log`` and images (recovered triggers) into
``ctx.artifacts``; the engine writes them to MLflow.

The defender's clean set is drawn by the engine (:func:`draw_clean_set`) from training images the
attacker did not touch; ``clean_size`` is a count, a fraction of the training set, or ``one_shot``
(one image per class).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from torch import nn

from kernel.data import DatasetInfo, Split, stratified_indices
from kernel.train import TrainConfig

CleanSize = Union[Literal["one_shot"], PositiveInt, float]


class DefenseParams(BaseModel):
    """A defense's parameters. A parameter added after trials of the defense were recorded declares the
    value they ran with, ``Field(..., json_schema_extra={"legacy": value})``, so that their rows still count
    for the trials at that value (``sweep.spec.legacy_ids``) instead of being run again."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CleanSetParams(DefenseParams):
    clean_size: CleanSize = Field(
        0.05, description="defender's clean images: a count, a fraction of the training set, or 'one_shot'")

    @field_validator("clean_size")
    @classmethod
    def _fraction_in_range(cls, v):
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError("a fraction must be in (0, 1); a count is a whole number")
        return v


def clean_count(clean_size: CleanSize, n_train: int, num_classes: int) -> int:
    if clean_size == "one_shot":
        return num_classes
    if isinstance(clean_size, float):
        return max(1, round(clean_size * n_train))
    return int(clean_size)


def draw_clean_set(train: Split, poisoned: torch.Tensor, clean_size: CleanSize, seed: int,
                   num_classes: int) -> Split:
    """A class-stratified, seeded draw from the training images the attacker did not poison."""
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[poisoned] = False
    pool = keep.nonzero().flatten()
    n = clean_count(clean_size, len(train), num_classes)
    if n > len(pool):
        raise ValueError(f"clean_size {clean_size} asks for {n} images but the clean pool has {len(pool)}")
    return train.subset(pool[stratified_indices(train.y[pool], n, seed)])


@dataclass
class DefenseContext:
    info: DatasetInfo
    train_cfg: TrainConfig  # the sweep's training settings (for defenses that retrain)
    seed: int
    device: torch.device
    clean: Optional[Split] = None  # the defender's clean set, when the defense uses one
    poisoned_train: Optional[Split] = None  # the attacker's training set, for training-time defenses
    new_model: Optional[Callable[[], nn.Module]] = None  # a fresh, untrained model of the sweep's architecture
    evaluate: Optional[Callable[[nn.Module], dict]] = None  # CA/ASR/RA of a model, for curves
    history: list = field(default_factory=list)  # per-step records, logged as MLflow metric steps
    artifacts: dict = field(default_factory=dict)  # name -> image tensor (C, H, W) or (N, C, H, W)
    # Values of the defense's declared ``outputs`` columns (see Defense.outputs), copied into the row.
    outputs: dict = field(default_factory=dict)
    # Scores a set of training indices the defense flags as poisoned against the engine's ground truth,
    # -> {'precision': .., 'recall': ..}. The defense sees only the scores, never which samples were
    # poisoned, so the truth cannot leak into what it does.
    score_isolation: Optional[Callable[[torch.Tensor], dict]] = None

    def log(self, step: int, **metrics: float) -> None:
        self.history.append({"step": step, **metrics})

    def curve(self, model: nn.Module) -> dict:
        """``model``'s curve metrics (CA/ASR/RA on the engine's curve sample), or none when the engine
        lends no evaluator (direct calls, tests)."""
        return self.evaluate(model) if self.evaluate is not None else {}


class Defense:
    name: ClassVar[str]
    Params: ClassVar[type[DefenseParams]] = DefenseParams
    needs_backdoored_model: ClassVar[bool] = True  # False for defenses that train from the poisoned data
    # Reads ``ctx.poisoned_train`` (the attacker's training set): refused for a backdoored model given as a
    # checkpoint unless the spec says the model was trained on this attack's poisoning of the dataset.
    uses_poisoned_data: ClassVar[bool] = False
    # Extra result columns this defense reports through ``ctx.outputs``: name -> 'float' | 'int' | 'str' |
    # 'bool'. They become typed Parquet columns (null for other defenses' rows) and MLflow metrics/params.
    outputs: ClassVar[dict[str, str]] = {}

    def __init__(self, params: DefenseParams):
        self.params = params

    @classmethod
    def uses_clean_set(cls) -> bool:
        return issubclass(cls.Params, CleanSetParams)

    @classmethod
    def work(cls, params: DefenseParams, n_clean: Optional[int]) -> Optional[float]:
        """How much computing a run with ``params`` does on ``n_clean`` clean images (None only for a defense
        without a clean set), in any unit that is the same across this defense's variants (images through the
        network, say); None when it cannot be told.
        The ETA scales the time of one variant seen to another never seen by it (I-BAU on 5,000 images
        does 50 times the work of I-BAU on 100 a round). Only its ratios matter."""
        return None

    def apply(self, model: Optional[nn.Module], ctx: DefenseContext) -> nn.Module:
        raise NotImplementedError
