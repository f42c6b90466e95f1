"""Content-addressed store for expensive products: decoded datasets and backdoored models.

A product is a dict of tensors (``torch.save``; always loaded with ``weights_only=True``, so a store
cannot smuggle code) plus a JSON record of what it is and how it was made (metrics, seconds, curves).
The record is written last and is the product's commit mark: a product without one does not exist.

``get_or_build`` builds a product at most once per key: the first caller takes a file lock and builds;
everyone else asking for the same key at the same moment waits on the lock and then loads.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock

Product = tuple[dict[str, torch.Tensor], dict]


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _paths(self, kind: str, key: str) -> tuple[Path, Path, Path]:
        d = self.root / kind
        return d / f"{key}.pt", d / f"{key}.json", d / f"{key}.lock"

    def exists(self, kind: str, key: str) -> bool:
        return self._paths(kind, key)[1].exists()

    def load(self, kind: str, key: str) -> Product:
        tensors_path, record_path, _ = self._paths(kind, key)
        record = json.loads(record_path.read_text())
        return torch.load(tensors_path, map_location="cpu", weights_only=True), record

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor], record: dict) -> None:
        tensors_path, record_path, _ = self._paths(kind, key)
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic(tensors_path, lambda f: torch.save(tensors, f))
        _atomic(record_path, lambda f: f.write(json.dumps(record).encode()))

    def get_or_build(self, kind: str, key: str, build: Callable[[], Product]) -> tuple[dict, dict, bool]:
        """(tensors, record, built_here)."""
        if self.exists(kind, key):
            return (*self.load(kind, key), False)
        lock_path = self._paths(kind, key)[2]
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path)):
            if self.exists(kind, key):  # built by someone else while we waited
                return (*self.load(kind, key), False)
            tensors, record = build()
            self.save(kind, key, tensors, record)
            return tensors, record, True


def _atomic(path: Path, write: Callable) -> None:
    """Write to a temporary file beside ``path`` and rename it over: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
