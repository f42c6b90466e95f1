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
subset. Each pipeline runs one untimed warm-up epoch (lazy init, worker start-up, allocator); then the
``--epochs`` timed epochs of the three pipelines are interleaved, so that load from other processes on a
shared machine hits them alike. The table reports the mean (and min) seconds per timed epoch, images/s
and ms/image, then ``kernel speed-up <model>: X.XX×`` (mean vs mean) against the *faster* of the two
torchvision baselines, and, on a CPU where the kernel trains in bf16 (native bf16), the same ratio
with the kernel forced to fp32 like the baselines: the share of the speed-up that is the input pipeline
alone. Models are the project's (``create_model``: channels_last, Normalize inside) in
both pipelines, so only the input pipeline and the loop differ.

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
``--max-batches`` caps the batches timed per epoch; on CPU it defaults to 10 for every model except
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
from kernel.train import TrainConfig, fit, mixed_precision  # noqa: E402

KERNEL = "kernel (uint8 tensor, augment in torch)"
KERNEL_FP32 = "kernel, fp32 forced (no autocast)"
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


class KernelPipeline:
    """(a): kernel.train.fit, one epoch per call (fit's own per-epoch clock, which ends with a sync)."""

    def __init__(self, name: str, x: torch.Tensor, y: torch.Tensor, args, device, precision: str = "auto"):
        torch.manual_seed(0)
        self.model, self.x, self.y, self.device = create_model(name, 10), x, y, device
        self.cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=LR, schedule="constant",
                               precision=precision, **OPT)

    def epoch(self, seed: int) -> float:
        return fit(self.model, self.x, self.y, self.cfg, seed=seed, device=self.device)[0]["seconds"]


class LoaderPipeline:
    """(b): DataLoader + per-image torchvision transforms + the textbook training loop."""

    def __init__(self, name: str, dataset, args, device, max_batches: int | None):
        from torch.utils.data import DataLoader

        torch.manual_seed(0)
        self.model = create_model(name, 10).to(device)  # channels_last, as the kernel gets it
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, **OPT)
        self.loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                 persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")
        self.device, self.max_batches = device, max_batches

    def epoch(self, seed: int) -> float:  # noqa: ARG002 - the DataLoader shuffles with the global RNG
        model, opt, dev = self.model, self.opt, self.device
        model.train()
        sync(dev)
        t0 = time.perf_counter()
        for i, (xb, yb) in enumerate(self.loader):
            if self.max_batches is not None and i >= self.max_batches:
                break
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(dev)
        return time.perf_counter() - t0


def time_pipelines(pipes: dict, epochs: int) -> dict[str, list[float]]:
    """One untimed warm-up epoch each, then timed epochs *interleaved* (in a rotating order), so that
    load from other processes on a shared machine falls on all pipelines alike."""
    for pipe in pipes.values():
        pipe.epoch(0)
    times = {label: [] for label in pipes}
    labels = list(pipes)
    for r in range(epochs):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            times[label].append(pipes[label].epoch(1 + r))
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
                   help="batches timed per epoch (default on CPU: all for small_cnn, 10 for other models)")
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
                cap = 10
            n_img = len(idx) if cap is None else min(len(idx), cap * args.batch_size)
            print(f"timing {name} on {n_img} images/epoch ...", flush=True)
            sub = torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))[:n_img]  # all classes
            load0 = os.getloadavg()[0]
            pipes = {KERNEL: KernelPipeline(name, x[sub], y[sub], args, device)}
            if device.type == "cpu" and mixed_precision(device) is not None:  # the baselines run fp32 on CPU
                pipes[KERNEL_FP32] = KernelPipeline(name, x[sub], y[sub], args, device, precision="fp32")
            times = time_pipelines({
                **pipes,
                "torchvision ImageFolder (JPEG from disk)": LoaderPipeline(name, by_disk, args, device, cap),
                "torchvision PIL in memory": LoaderPipeline(name, in_memory, args, device, cap),
            }, args.epochs)
            print(f"  1-min load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (this machine has "
                  f"{os.cpu_count()} cores; other processes' load slows every pipeline)", flush=True)
            mean = {pipe: sum(ts) / len(ts) for pipe, ts in times.items()}
            for pipe, ts in times.items():
                rows.append((name, pipe, mean[pipe], min(ts), n_img / mean[pipe], 1000 * mean[pipe] / n_img))
            baseline = min(v for pipe, v in mean.items() if not pipe.startswith("kernel"))
            speedups.append((name, baseline / mean[KERNEL], baseline / mean[KERNEL_FP32] if KERNEL_FP32 in mean else None))

    print(f"\n{'model':<16} {'pipeline':<42} {'s/epoch':>8} {'(min)':>7} {'img/s':>7} {'ms/img':>7}")
    for name, pipe, s, smin, ips, ms in rows:
        print(f"{name:<16} {pipe:<42} {s:8.2f} {smin:7.2f} {ips:7.0f} {ms:7.2f}")
    print()
    for name, sp, sp32 in speedups:
        extra = f"; fp32 forced: {sp32:.2f}×" if sp32 is not None else ""
        print(f"kernel speed-up {name}: {sp:.2f}× (vs the faster torchvision pipeline{extra})")


if __name__ == "__main__":
    main()
