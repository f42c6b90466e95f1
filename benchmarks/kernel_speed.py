"""Training speed of the project's kernel versus a plain torchvision input pipeline, on the same machine.

What it measures, per model (kernel.models names):

(a) kernel       ``kernel.train.fit`` on a uint8 tensor (N, 3, 32, 32) held in memory; uint8 -> float,
                 random crop (pad 4) and horizontal flip are batched tensor ops on the training device.
(b) torchvision  the usual way: ``transforms.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(),
                 ToTensor()])`` per image in ``DataLoader(batch_size, shuffle=True, num_workers=W)`` and a
                 standard ``zero_grad / forward / cross_entropy / backward / step`` loop, two data sources:
                 - ``ImageFolder``: torchvision.datasets.ImageFolder over the extracted JPEGs, decoding
                   every image from disk every epoch (what ImageFolder does);
                 - ``PIL in memory``: the same images decoded once to PIL images held in a list (the
                   stronger baseline: no decoding in the loop).

Both pipelines train the same architecture from the same initialisation with the same optimiser
(SGD, momentum 0.9, Nesterov, weight decay 5e-4) and batch size, on the same class-stratified training
subset. Each pipeline runs one untimed warm-up epoch (lazy init, worker start-up, allocator) and then
``--epochs`` timed epochs; the table reports the mean seconds per timed epoch, images/s and ms/image,
then ``kernel speed-up <model>: X.XX×`` against the *faster* of the two torchvision baselines.

DataLoader workers: ``--workers`` defaults to the number of CPU cores on CPU (2 here; the common
advice, and ``num_workers=0`` would put decoding and augmentation on the training thread instead of beside
it) and to 4 on CUDA (with pin_memory). Workers persist across epochs (``persistent_workers=True``), which
favours the baseline: worker start-up is not paid every epoch.

Run (from the project root)::

    .venv/bin/python benchmarks/kernel_speed.py
    .venv/bin/python benchmarks/kernel_speed.py --models small_cnn --train-size 10000 --epochs 3
    .venv/bin/python benchmarks/kernel_speed.py --data /tmp/cifar10 --device cuda --batch-size 512

``--data`` is the CIFAR-10 image folder (``train/<class>/*.jpg``) or its .tar.gz archive, extracted to a
temporary directory (default: ../shared/data/cifar10-jpeg.tar.gz relative to the project root).
``--max-batches`` caps the batches timed per epoch; on CPU it defaults to 20 for every model except
small_cnn (a PreAct-ResNet18 epoch takes minutes on 2 cores), which is why ms/image is reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from kernel.models import create_model  # noqa: E402
from kernel.train import TrainConfig, fit  # noqa: E402

OPT = dict(momentum=0.9, weight_decay=5e-4, nesterov=True)  # kernel.train.TrainConfig's defaults
LR = 0.01


def find_image_folder(path: Path, tmp: str) -> Path:
    """The directory holding ``train/``: ``path`` itself, or the archive ``path`` extracted under ``tmp``."""
    if path.is_file():
        print(f"extracting {path} to {tmp} ...", flush=True)
        with tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")
        path = Path(tmp)
    for cand in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
        if (cand / "train").is_dir():
            return cand
    raise SystemExit(f"no train/<class>/ folder under {path}")


def stratified_indices(targets: list[int], n: int) -> list[int]:
    """The first n/K images of each class in ImageFolder's (sorted) order: deterministic and balanced."""
    k = max(targets) + 1
    per, seen, out = n // k, [0] * k, []
    for i, t in enumerate(targets):
        if seen[t] < per:
            seen[t] += 1
            out.append(i)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_kernel(name: str, x: torch.Tensor, y: torch.Tensor, args, device) -> list[float]:
    """Seconds of each timed epoch of kernel.train.fit (its own per-epoch clock, which ends with a sync)."""
    torch.manual_seed(0)
    model = create_model(name, 10)
    cfg = TrainConfig(epochs=1 + args.epochs, batch_size=args.batch_size, lr=LR, schedule="constant", **OPT)
    history = fit(model, x, y, cfg, seed=0, device=device)
    return [h["seconds"] for h in history[1:]]  # epoch 0 is the warm-up


def time_torchvision(name: str, dataset, args, device, max_batches: int | None) -> list[float]:
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = create_model(name, 10).to(device)
    if device.type == "cuda":  # what the kernel does on GPU too, so only the input pipeline differs
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=LR, **OPT)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")
    times = []
    for epoch in range(1 + args.epochs):
        model.train()
        sync(device)
        t0 = time.perf_counter()
        for i, (xb, yb) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        if epoch:
            times.append(time.perf_counter() - t0)
    return times


class PILList(torch.utils.data.Dataset):
    """Already-decoded PIL images with labels; applies the transform per item like ImageFolder."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["small_cnn", "preact_resnet18"])
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs, after one warm-up epoch")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-batches", type=int, default=None,
                   help="batches timed per epoch (default on CPU: all for small_cnn, 20 for other models)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: #cores on CPU, 4 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers is None:
        args.workers = 4 if device.type == "cuda" else (os.cpu_count() or 1)

    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as tmp:
        root = find_image_folder(args.data, tmp)
        tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor()])
        folder = datasets.ImageFolder(str(root / "train"), transform=tf)
        idx = stratified_indices(folder.targets, args.train_size)
        by_disk = torch.utils.data.Subset(folder, idx)
        # Decode the subset once: PIL images for the in-memory baseline, and a uint8 tensor for the kernel.
        pil = [Image.open(folder.samples[i][0]).convert("RGB") for i in idx]
        for im in pil:
            im.load()
        labels = [folder.targets[i] for i in idx]
        in_memory = PILList(pil, labels, tf)
        x = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor(labels)

        print(f"device={device} torch threads={torch.get_num_threads()} DataLoader workers={args.workers} "
              f"train images={len(idx)} batch={args.batch_size} timed epochs={args.epochs} (+1 warm-up)")
        rows, speedups = [], []
        for name in args.models:
            cap = args.max_batches
            if cap is None and device.type == "cpu" and name != "small_cnn":
                cap = 20
            n_img = len(idx) if cap is None else min(len(idx), cap * args.batch_size)
            print(f"timing {name} on {n_img} images/epoch ...", flush=True)
            sub = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))[:n_img]  # all classes
            k = time_kernel(name, x[sub], y[sub], args, device)
            results = {"kernel (uint8 on device)": k,
                       "torchvision ImageFolder (JPEG from disk)": time_torchvision(name, by_disk, args, device, cap),
                       "torchvision PIL in memory": time_torchvision(name, in_memory, args, device, cap)}
            for pipe, ts in results.items():
                s = sum(ts) / len(ts)
                rows.append((name, pipe, s, n_img / s, 1000 * s / n_img))
            mean = {pipe: sum(ts) / len(ts) for pipe, ts in results.items()}
            baseline = min(s for pipe, s in mean.items() if pipe.startswith("torchvision"))
            speedups.append((name, baseline / mean["kernel (uint8 on device)"]))

    print(f"\n{'model':<16} {'pipeline':<42} {'s/epoch':>8} {'img/s':>8} {'ms/img':>8}")
    for name, pipe, s, ips, ms in rows:
        print(f"{name:<16} {pipe:<42} {s:8.2f} {ips:8.0f} {ms:8.2f}")
    print()
    for name, sp in speedups:
        print(f"kernel speed-up {name}: {sp:.2f}× (vs the faster torchvision pipeline)")


if __name__ == "__main__":
    main()
