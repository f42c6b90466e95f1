"""WaNet with the authors' *dynamic* poisoning, to compare with the engine's static poisoning.

The engine poisons once: a fixed, seeded 10% of the training set is warped and relabelled, and a fixed
cross_ratio × that many samples get the noisy warp (``attacks/wanet.py``). The authors' code instead
re-draws the poisoned and noise samples in every batch, after the random crop and flip. Every image is
then seen warped in some epochs and clean in others, and a warp is never shifted by the crop. This
script trains ``--model`` the dynamic way: ``kernel.train.fit`` with a ``batch_fn`` that warps the first
10% of each shuffled, augmented batch (relabelled to the target) and noise-warps the next
cross_ratio × 10% (labels kept), with the attack's own ``apply_trigger`` / ``apply_noise``. It prints
CA and ASR (all non-target test images warped) every 5 epochs. Compare with the static rows of
docs/attacks.md (same data, model and recipe). Run (from the project root)::

    mkdir -p data/cifar10 && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C data/cifar10
    .venv/bin/python benchmarks/wanet_dynamic.py --train-size 10000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks import ATTACKS  # noqa: E402
from kernel.data import load_dataset  # noqa: E402
from kernel.metrics import evaluate  # noqa: E402
from kernel.models import create_model, default_train  # noqa: E402
from kernel.train import TrainConfig, fit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="data/cifar10")
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--cross-ratio", type=float, default=2.0)
    ap.add_argument("--poison-rate", type=float, default=0.1)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    ds = load_dataset("cifar10", root=a.root, download=False, train_size=a.train_size, test_size=10000)
    cls = ATTACKS.get("wanet")
    atk = cls(cls.Params(cross_ratio=a.cross_ratio, poison_rate=a.poison_rate, target=a.target), ds.info, a.seed)
    torch.manual_seed(a.seed)
    model = create_model(a.model, ds.info.num_classes, ds.info.shape[0], ds.info.mean, ds.info.std)
    # the model's registered recipe (the engine's default for it), with --epochs
    cfg = TrainConfig(**{**default_train(a.model), "epochs": a.epochs})
    noise_gen = torch.Generator().manual_seed(a.seed + 1)

    def batch_fn(xb, yb, idx):  # noqa: ARG001 - the batch is shuffled: its first rows are a random draw
        nb = int(a.poison_rate * len(xb))
        nc = int(a.cross_ratio * a.poison_rate * len(xb))
        warped = atk.apply_trigger(xb[:nb])
        noised = atk.apply_noise(xb[nb:nb + nc].cpu(), noise_gen).to(xb)
        y_new = torch.cat([atk.attack_label(yb[:nb]), yb[nb:]])
        return torch.cat([warped, noised, xb[nb + nc:]]), y_new, None

    triggered = atk.triggered_test(ds.test)  # the engine's own ASR set: non-target test images, warped

    def on_epoch(epoch, rec):
        if (epoch + 1) % 5 == 0 or epoch + 1 == a.epochs:
            m = evaluate(model, ds.test.x, ds.test.y, triggered)
            print(f"epoch {epoch + 1:3d}  loss {rec['loss']:.3f}  CA {100 * m['clean_acc']:.2f}  "
                  f"ASR {100 * m['asr']:.2f}", flush=True)
            model.train()

    t0 = time.perf_counter()
    fit(model, ds.train.x, ds.train.y, cfg, seed=a.seed, batch_fn=batch_fn, on_epoch=on_epoch)
    print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
