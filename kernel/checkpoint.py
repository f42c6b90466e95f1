"""Backdoored models from files: a researcher's own, a model zoo's, a paper's release.

:func:`read_state` reads a checkpoint with ``torch.load(weights_only=True)`` (so a file can only hold
tensors and plain containers, never code: anything else is refused) and unwraps the usual layouts: a
plain state dict, ``{'net': ...}`` (I-BAU, BackdoorBench), ``{'state_dict': ...}`` / ``{'model': ...}``
(Lightning, many repos), and ``module.`` prefixes left by ``DataParallel``. :func:`fit_state` matches it
to one of our models: a checkpoint of the bare architecture (the authors' ``features.0.weight``) is
taken as our ``net.``; the input normalisation is the spec's, not the file's, so a file that carries its
own (one of ours) must agree with it. Anything else that does not match is a :class:`CheckpointError`
naming the missing and unexpected keys and the first shape that differs.
"""
from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch
from torch import nn

WRAPPERS = ("net", "state_dict", "model", "model_state_dict")  # checked in this order
NORMALIZE = ("normalize.mean", "normalize.std")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def file_digest(path: str | Path) -> str:
    """sha256 of the file: a model's identity in the store, so an edited file is a new model."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside ``path`` (CPU tensors), unwrapped and without ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is mostly advice to load with weights_only=False, which is what we refuse to do;
        # the line after "WeightsUnpickler error:" says what it met.
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n", str(e) + "\n")
        detail = detail.group(1).strip() if detail else str(e).strip().splitlines()[0]
        if "Unsupported global" in detail:
            raise CheckpointError(f"{path} holds more than tensors and plain containers, refused (loading it "
                                  f"could run code): {detail}") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({detail})") from None
    except Exception as e:  # noqa: BLE001 - truncated or not a torch file at all
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    for _ in range(2):  # {'net': {...}} or {'state_dict': {...}}; at most two levels deep
        if isinstance(obj, dict) and not _is_state(obj):
            inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not _is_state(obj):
        kind = type(obj).__name__ if not isinstance(obj, dict) else f"a dict with keys {sorted(map(str, obj))[:8]}"
        raise CheckpointError(f"{path} holds {kind}, not a state dict (name -> tensor), nor one under "
                              f"{', '.join(repr(k) for k in WRAPPERS)}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _is_state(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def fit_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` keyed and checked for ``model`` (an ImageClassifier); raises CheckpointError on any
    mismatch. The returned dict loads with ``load_state_dict(strict=True)``."""
    own = model.state_dict()
    if not any(k.startswith("net.") for k in state):  # the bare architecture, as its authors saved it
        state = {("net." + k): v for k, v in state.items()}
    for k in NORMALIZE:
        if k in state and not torch.allclose(state[k].float().flatten(), own[k].flatten()):
            raise CheckpointError(
                f"the checkpoint normalises inputs with {k.split('.')[1]} {state[k].flatten().tolist()}, the "
                f"spec's model with {own[k].flatten().tolist()}; set the spec's model normalize to match")
    state = {**{k: own[k] for k in NORMALIZE}, **{k: v for k, v in state.items() if k not in NORMALIZE}}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = next(((k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                  if k in state and state[k].shape != own[k].shape), None)
    if missing or unexpected or shape:
        arch = getattr(model, "arch", type(model).__name__)
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shape:
            parts.append(f"first shape that differs: {shape[0]} is {list(shape[1])} in the file, "
                         f"{list(shape[2])} in {arch}")
        raise CheckpointError(f"the checkpoint does not fit model {arch}: " + "; ".join(parts))
    return {k: state[k].to(own[k].dtype) for k in own}


def _few(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(k.removeprefix("net.") for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Read ``path`` and load it into ``model`` (strict); returns ``model``."""
    model.load_state_dict(fit_state(model, read_state(path)))
    return model
