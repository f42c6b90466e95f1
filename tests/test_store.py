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
