"""The content-addressed store builds a product once, even when asked concurrently."""
import multiprocessing as mp
import time
from pathlib import Path

import torch

from sweep.store import Store


def _slow_build(root, key, log):
    def build():
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(1.0)  # long enough that the other process asks while this one builds
        return {"w": torch.arange(4.0)}, {"note": "x"}

    t, rec, built = Store(root).get_or_build("models", key, build)
    assert torch.equal(t["w"], torch.arange(4.0)) and rec["note"] == "x"


def test_concurrent_requests_build_once(tmp_path):
    log = tmp_path / "log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_slow_build, args=(str(tmp_path / "s"), "k1", str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert log.read_text().count("built") == 1


def test_roundtrip_and_weights_only(tmp_path, monkeypatch):
    s = Store(tmp_path)
    calls = []
    t, rec, built = s.get_or_build("models", "abc", lambda: (calls.append(1) or {"a": torch.ones(2)}, {"m": 1}))
    assert built and rec == {"m": 1}
    seen = {}
    real_load = torch.load

    def spy(*a, **kw):
        seen.update(kw)
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    t2, rec2, built2 = s.get_or_build("models", "abc", lambda: calls.append(2))
    assert not built2 and calls == [1] and torch.equal(t2["a"], torch.ones(2))
    assert seen.get("weights_only") is True


def test_no_record_means_no_product(tmp_path):
    s = Store(tmp_path)
    (Path(tmp_path) / "models").mkdir()
    (Path(tmp_path) / "models" / "half.pt").write_bytes(b"garbage")  # a crash before the record
    assert not s.exists("models", "half")
    _, _, built = s.get_or_build("models", "half", lambda: ({"a": torch.zeros(1)}, {}))
    assert built


def test_object_store_uri_roundtrip():
    # pyarrow's in-memory mock filesystem stands in for s3:// / gs:// (same code path: FileSystem.from_uri)
    s = Store("mock:///bucket/prefix")
    assert not s.local and not s.exists("models", "k")
    t, rec, built = s.get_or_build("models", "k", lambda: ({"w": torch.arange(3.0)}, {"acc": 0.9}))
    assert built
    t2, rec2, built2 = s.get_or_build("models", "k", lambda: (_ for _ in ()).throw(AssertionError("rebuilt")))
    assert not built2 and torch.equal(t2["w"], torch.arange(3.0)) and rec2 == {"acc": 0.9}
    assert s.load_record("models", "k") == {"acc": 0.9} and s.load_record("models", "nope") is None


def test_lease_expires_when_its_holder_goes_silent():
    from sweep.store import _Leases

    leases = _Leases()
    assert leases.acquire("k", "a", 0.2)
    assert not leases.acquire("k", "b", 0.2)  # held
    assert leases.acquire("k", "a", 0.2)  # the holder renews
    time.sleep(0.3)
    assert leases.acquire("k", "b", 0.2)  # a silent holder (a lost node) loses it
    leases.release("k", "a")  # not the holder: no effect
    assert not leases.acquire("k", "c", 0.2)
    leases.release("k", "b")
    assert leases.acquire("k", "c", 0.2)


def test_ray_leases_serialise_builders_across_workers(tmp_path):
    import ray

    from sweep.store import _lease

    @ray.remote(num_cpus=0)
    def hold(log):
        with _lease("s3://bucket/models/k", poll=0.05):
            with open(log, "a") as f:
                f.write(f"in {time.time()}\n")
            time.sleep(0.5)
            with open(log, "a") as f:
                f.write(f"out {time.time()}\n")

    log = str(tmp_path / "log")
    if ray.is_initialized():  # an earlier test's local Ray
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        ray.get([hold.remote(log) for _ in range(3)])
    finally:
        ray.shutdown()
    events = [line.split()[0] for line in Path(log).read_text().splitlines()]
    assert events == ["in", "out"] * 3  # never two holders at once
