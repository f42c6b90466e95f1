"""Full-data training recipes: clean CA against wall-clock minutes, one model per run.

Trains ``--model`` on all 50,000 CIFAR-10 training images through ``kernel.train.fit`` (the engine's one
loop, so what is measured is what a sweep trains) with the TrainConfig fields given on the command line,
and evaluates clean accuracy on the 10,000 test images after every ``--eval-every`` epochs (evaluation
time is excluded from the training minutes and reported apart). Each run appends one JSON line to
``--out``: the recipe, the per-epoch records, the final CA and the training seconds. The table in
docs/benchmarks.md ("Full-data recipes") is built from those lines.

    .venv/bin/python benchmarks/recipe.py --model vgg_small --epochs 14 --lr 0.1 --batch-size 512
    .venv/bin/python benchmarks/recipe.py --model wrn16_1 --recipe        # the model's registered recipe
    .venv/bin/python benchmarks/recipe.py --model vgg_small --batch-size 512 --time-steps 8   # speed only

``--data`` is the CIFAR-10 image folder or its .tar.gz (default ../shared/data/cifar10-jpeg.tar.gz,
extracted once to data/cifar10). Decoded tensors are cached in ``--cache`` (data/cifar10_full.pt).
Run on an otherwise idle machine: two OpenMP jobs on two cores stall each other.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernel.data import load_dataset  # noqa: E402
from kernel.metrics import accuracy  # noqa: E402
from kernel.models import create_model, default_train  # noqa: E402
from kernel.train import TrainConfig, fit, predict  # noqa: E402


def cifar10(data: Path, cache: Path):
    if cache.exists():
        return torch.load(cache, weights_only=True)
    root = ROOT / "data" / "cifar10"
    if data.is_file() and not (root / "train").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(data) as tar:
            tar.extractall(root, filter="data")
    elif data.is_dir():
        root = data
    ds = load_dataset("cifar10", root=root)
    out = {"xtr": ds.train.x, "ytr": ds.train.y, "xte": ds.test.x, "yte": ds.test.y}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def time_steps(a, cfg: TrainConfig) -> None:
    """Seconds per 50,000-image epoch of ``cfg`` (batch size, dropout, precision) from timed steps of the
    kernel's own loop on random uint8 data: what a recipe's epoch count costs, without training it."""
    torch.manual_seed(a.seed)
    model = create_model(a.model, 10)
    if a.compile:
        model = torch.compile(model)
    n = cfg.batch_size * (a.time_steps + 3)
    x, y = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,))
    marks = []

    def batch_fn(xb, yb, idx):  # called once per step, before its forward: a clock
        marks.append(time.perf_counter())
        return xb, yb, None

    fit(model, x, y, dataclasses.replace(cfg, epochs=1), seed=a.seed, batch_fn=batch_fn)
    per_step = (marks[-1] - marks[2]) / (len(marks) - 3)  # steps 3..last-1 (the last one's end is not marked)
    print(f"{a.model} batch {cfg.batch_size} dropout {cfg.dropout} compile {a.compile} "
          f"threads {torch.get_num_threads()}: {1000 * per_step:.0f} ms/step, "
          f"{per_step / cfg.batch_size * 50000:.1f} s per 50k-image epoch")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg_small")
    p.add_argument("--recipe", action="store_true", help="start from the model's registered defaults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="0: only at the end")
    p.add_argument("--train-size", type=int, default=0, help="0: all 50,000")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
    p.add_argument("--cache", type=Path, default=ROOT / "data" / "cifar10_full.pt")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "recipes.jsonl")
    p.add_argument("--note", default="")
    p.add_argument("--time-steps", type=int, default=0,
                   help="only time this many training steps (after 3 untimed) on random data and print the "
                        "seconds a 50,000-image epoch would take; no training, nothing appended")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (with --time-steps)")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, f in fields.items():
        kind = {"bool": lambda s: s.lower() in ("1", "true", "yes"), "int": int, "float": float,
                "float | None": float}.get(str(f.type), str)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    a = p.parse_args()

    base = default_train(a.model) if a.recipe else {}
    over = {k: getattr(a, k) for k in fields if getattr(a, k) is not None}
    cfg = TrainConfig(**{**base, **over})
    if a.time_steps:
        return time_steps(a, cfg)
    d = cifar10(a.data, a.cache)
    xtr, ytr = d["xtr"], d["ytr"]
    if a.train_size:
        xtr, ytr = xtr[: a.train_size], ytr[: a.train_size]
    torch.manual_seed(a.seed)
    model = create_model(a.model, 10)
    eval_s = [0.0]

    def on_epoch(epoch, rec):
        last = epoch == cfg.epochs - 1
        if last or (a.eval_every and (epoch + 1) % a.eval_every == 0):
            t = time.perf_counter()
            rec["test_acc"] = 100 * accuracy(predict(model, d["xte"]), d["yte"])
            eval_s[0] += time.perf_counter() - t
            model.train()
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)

    t0 = time.perf_counter()
    hist = fit(model, xtr, ytr, cfg, seed=a.seed, on_epoch=on_epoch)
    wall = time.perf_counter() - t0 - eval_s[0]
    row = {"model": a.model, "seed": a.seed, "train_size": len(ytr), "config": cfg.as_dict(),
           "clean_acc": hist[-1]["test_acc"], "train_seconds": round(wall, 1),
           "minutes": round(wall / 60, 2), "threads": torch.get_num_threads(), "note": a.note,
           "torch": torch.__version__, "history": hist, "date": time.strftime("%Y-%m-%d %H:%M")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{a.model}: CA {row['clean_acc']:.2f}% in {row['minutes']:.1f} min ({cfg})")


if __name__ == "__main__":
    main()
