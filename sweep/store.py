"""Content-addressed store for expensive products: decoded datasets and backdoored models.

A product is a dict of tensors (``torch.save``; always loaded with ``weights_only=True``, so a store
cannot smuggle code) plus a JSON record of what it is and how it was made (metrics, seconds, curves).
The record is written last and is the product's commit mark: a product without one does not exist.

Where it lives: a local or NFS directory, or any URI pyarrow's filesystems understand (``s3://bucket/
prefix``, ``gs://bucket/prefix``, ``hdfs://...``), so every node of a cluster reaches the same products.
Local files are written to a temporary name and renamed; object stores make an object visible whole when
its upload completes, so readers never see half a product either way.

``get_or_build`` builds a product at most once per key, even when many trials ask at the same moment: the
first caller takes the key's lock and builds, the others wait and then load. The lock is a file lock in
a local directory and, for object stores (which have no locks), a lease held in a small named Ray actor
that every trial of the cluster reaches; a lease whose holder stops renewing it (a lost node) expires, so
one dead builder cannot block the others for good.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.fs as pafs
import torch
from filelock import FileLock

Product = tuple[dict[str, torch.Tensor], dict]

LEASE_SECONDS = 120.0  # a builder renews its lease every LEASE_SECONDS / 4; a silent one loses it


def is_uri(root: str | Path) -> bool:
    return "://" in str(root) and not str(root).startswith("file://")


class Store:
    """``lock``: how concurrent builders of one key are kept to one. ``auto``: a file lock for a local
    directory, a Ray lease for a URI. ``lease`` forces Ray leases for a directory too: for NFS mounts whose
    file locks are not to be trusted across machines (set ``BDSWEEP_STORE_LOCK=lease`` for ``sweep run``)."""

    def __init__(self, root: str | Path, lock: str = "auto"):
        if lock not in ("auto", "file", "lease"):
            raise ValueError(f"store lock must be auto, file or lease, not {lock!r}")
        self.uri = str(root)
        if is_uri(root):
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            self.local = False
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(str(root).removeprefix("file://")).resolve())
            self.local = True
        self.lease = lock == "lease" or (lock == "auto" and not self.local)

    def _path(self, kind: str, key: str, ext: str) -> str:
        return f"{self.root}/{kind}/{key}.{ext}"

    def exists(self, kind: str, key: str) -> bool:
        return self.fs.get_file_info(self._path(kind, key, "json")).type == pafs.FileType.File

    def load(self, kind: str, key: str) -> Product:
        with self.fs.open_input_stream(self._path(kind, key, "json")) as f:
            record = json.loads(f.read())
        with self.fs.open_input_stream(self._path(kind, key, "pt")) as f:
            tensors = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        return tensors, record

    def load_record(self, kind: str, key: str) -> dict | None:
        """The record alone (cheap: no tensors), or None when the product does not exist."""
        if not self.exists(kind, key):
            return None
        with self.fs.open_input_stream(self._path(kind, key, "json")) as f:
            return json.loads(f.read())

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor], record: dict) -> None:
        buf = io.BytesIO()
        torch.save(tensors, buf)
        self._write(self._path(kind, key, "pt"), buf.getvalue())
        self._write(self._path(kind, key, "json"), json.dumps(record).encode())  # the commit mark, last

    def _write(self, path: str, data: bytes) -> None:
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    @contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        if not self.lease:
            path = Path(self._path(kind, key, "lock"))
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path)):
                yield
        else:
            with _lease(f"{self.root if self.local else self.uri}/{kind}/{key}"):
                yield

    def get_or_build(self, kind: str, key: str, build: Callable[[], Product]) -> tuple[dict, dict, bool]:
        """(tensors, record, built_here)."""
        if self.exists(kind, key):
            return (*self.load(kind, key), False)
        with self.lock(kind, key):
            if self.exists(kind, key):  # built by someone else while we waited
                return (*self.load(kind, key), False)
            tensors, record = build()
            self.save(kind, key, tensors, record)
            return tensors, record, True


# --------------------------------------------------------------------------------------------------
# Leases for object stores: a named Ray actor when Ray is running, a process-local lock otherwise.

_LOCAL_LOCKS: dict[str, threading.Lock] = {}


class _Leases:
    """Ray actor: key -> (holder, expiry). ``acquire`` is try-acquire; the caller polls."""

    def __init__(self):
        self.held: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, holder: str, seconds: float) -> bool:
        now = time.time()
        h = self.held.get(key)
        if h is None or h[1] < now or h[0] == holder:
            self.held[key] = (holder, now + seconds)
            return True
        return False

    def release(self, key: str, holder: str) -> None:
        if self.held.get(key, ("",))[0] == holder:
            del self.held[key]


def _lease_actor():
    import ray

    if not ray.is_initialized():
        return None
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cls = ray.remote(num_cpus=0, max_concurrency=64)(_Leases)
    # Outside any placement group: created from inside a Tune trial, the actor would otherwise join that
    # trial's placement group and die with it when the trial ends, under the trials still waiting on it.
    return cls.options(name="bdsweep-store-leases", namespace="bdsweep", get_if_exists=True,
                       lifetime="detached",
                       scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)).remote()


@contextmanager
def _lease(key: str, poll: float = 1.0) -> Iterator[None]:
    import uuid

    actor = _lease_actor()
    if actor is None:  # one process: a plain lock is enough
        with _LOCAL_LOCKS.setdefault(key, threading.Lock()):
            yield
        return
    import ray

    holder = uuid.uuid4().hex
    while not ray.get(actor.acquire.remote(key, holder, LEASE_SECONDS)):
        time.sleep(poll)
    stop = threading.Event()

    def renew():
        while not stop.wait(LEASE_SECONDS / 4):
            ray.get(actor.acquire.remote(key, holder, LEASE_SECONDS))

    t = threading.Thread(target=renew, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        ray.get(actor.release.remote(key, holder))
