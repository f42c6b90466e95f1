"""Datasets as uint8 tensors, registered by name.

Every dataset loads into a :class:`Dataset`: two :class:`Split` s whose images are a ``uint8`` tensor
``(N, C, H, W)`` and whose labels are an ``int64`` tensor ``(N,)``. Holding raw bytes (not floats, not
PIL images) is what lets the training kernel move a whole split to the device once and do all
augmentation there in batches; it is also 4x smaller than float32.

Loaders take ``root`` holding either the dataset's usual published layout or an image-folder layout
``root/train/<class>/*`` + ``root/test/<class>/*`` (class folders sorted = label order).
``train_size`` / ``test_size`` take a deterministic class-stratified subset.

    >>> ds = load_dataset("cifar10", root="data/cifar10", train_size=5000)
    >>> info = dataset_info("gtsrb")  # no I/O: what a sweep spec is validated against

The ``synthetic`` dataset needs no files at all; it is the default of the quickstart.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F

from kernel.registry import Registry


@dataclass
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: torch.Tensor) -> "Split":
        return Split(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class DatasetInfo:
    """What the sweep engine needs to validate a spec without loading any data."""

    name: str
    num_classes: int
    shape: tuple[int, int, int]  # (C, H, W)
    train_len: int  # size of the full published training split
    test_len: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str  # human description of the expected on-disk layout, used in error messages
    classes: tuple[str, ...] = field(default=())


@dataclass
class Dataset:
    info: DatasetInfo
    train: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return self.info.num_classes


class DataError(ValueError):
    """Missing or malformed data; the message names the expected layout."""


@dataclass
class Files:
    """A split as image paths + labels, not yet decoded: subsets are chosen here, before decoding,
    so asking for 1,000 of 50,000 JPEGs decodes 1,000."""

    paths: list[str]  # str, not Path: building 100,000 Path objects alone costs a noticeable 0.3 s
    y: torch.Tensor  # int64 (N,)


Raw = Union[Split, Files]
# A published-layout reader: (root, download) -> {"train": Raw, "test": Raw, optionally "classes":
# names found on disk}, raising DataError.
Reader = Callable[[Union[Path, None], bool], dict]


@dataclass(frozen=True)
class DatasetEntry:
    """The value registered in DATASETS: static facts plus the reader of the published layout."""

    info: DatasetInfo
    read: Reader
    needs_root: bool = True  # False only for generated data (synthetic)
    marker: str | None = None  # a file that marks the published layout even if train/ + test/ exist


DATASETS: Registry = Registry("dataset")


# --------------------------------------------------------------------------------------------------
# Stratified subsets


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a class-stratified subset of exactly ``n`` of ``labels``.

    Class quotas are ``n * count / N`` rounded down, the leftover going one each to the classes
    with the largest remainders (ties: smaller label first), so proportions are as exact as
    integers allow. Within a class the pick is a prefix of a seeded permutation that depends only
    on (seed, labels), so a larger ``n`` gives (per class) a superset of a smaller one.
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    N = int(labels.numel())
    if not 1 <= n <= N:
        raise ValueError(f"stratified subset of n={n} needs 1 <= n <= {N} (the number of labels)")
    _, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    quota = n * counts // N  # exact integer arithmetic: no float rounding surprises
    leftover = n - int(quota.sum())
    rem = n * counts % N
    # Order classes by remainder descending, then class index ascending (stable sort on -rem).
    order = torch.sort(-rem, stable=True).indices
    quota[order[:leftover]] += 1  # rem > 0 for these, so quota stays <= count
    # One random key per sample, grouped by class: a seeded permutation within every class.
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(N, generator=g)
    grouped = perm[torch.sort(inv[perm], stable=True).indices]  # class-major, random within class
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(N) - starts[inv[grouped]]  # position of each sample within its class
    chosen = grouped[rank < quota[inv[grouped]]]
    return torch.sort(chosen).values


# --------------------------------------------------------------------------------------------------
# Image folders and decoding

_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_FOLDER_LAYOUT = (
    "or the image-folder layout <root>/train/<class>/*.{{jpg,png,...}} + <root>/test/<class>/* "
    "with {k} class folders in each (sorted alphabetically = label order; images of another size "
    "are resized to {h}x{w})"
)


def _fail(info: DatasetInfo, root, problem: str) -> DataError:
    return DataError(f"dataset {info.name!r} at root={str(root)!r}: {problem}. Expected {info.layout}.")


def _subdirs(p: Path) -> list[Path]:
    return sorted((d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _images_in(p: Path) -> list[str]:
    # Sorted, so the subset is the same whatever order the filesystem lists files in.
    names = sorted(f for f in os.listdir(p) if os.path.splitext(f)[1].lower() in _IMAGE_EXTS and f[0] != ".")
    return [os.path.join(p, f) for f in names]


def _is_image_folder(root: Path, entry: DatasetEntry) -> bool:
    if entry.marker and (root / entry.marker).exists():
        return False  # e.g. tiny-imagenet ships its own train/ + test/ that are not class folders
    return all((root / s).is_dir() and _subdirs(root / s) for s in ("train", "test"))


def _read_image_folder(root: Path, info: DatasetInfo) -> tuple[dict, tuple[str, ...]]:
    splits, names = {}, None
    for split in ("train", "test"):
        dirs = _subdirs(root / split)
        these = tuple(d.name for d in dirs)
        if len(dirs) != info.num_classes:
            raise _fail(info, root, f"{split}/ has {len(dirs)} class folders, expected {info.num_classes}")
        if names is not None and these != names:
            raise _fail(info, root, "train/ and test/ have different class folder names")
        names = these
        paths, ys = [], []
        for label, d in enumerate(dirs):
            files = _images_in(d)
            if not files:
                raise _fail(info, root, f"class folder {split}/{d.name} holds no images")
            paths += files
            ys += [label] * len(files)
        splits[split] = Files(paths, torch.tensor(ys, dtype=torch.int64))
    return splits, names


def _decode(paths: list[str], info: DatasetInfo, root) -> torch.Tensor:
    """Decode image files into uint8 (N, C, H, W), converting mode and resizing to info.shape."""
    from PIL import Image

    c, h, w = info.shape
    out = np.empty((len(paths), h, w, c), dtype=np.uint8)

    def one(i: int) -> None:
        try:
            with Image.open(paths[i]) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                out[i] = np.asarray(im).reshape(h, w, c)
        except Exception as e:  # PIL raises several types for truncated / non-image files
            raise _fail(info, root, f"cannot read image {paths[i]} ({type(e).__name__}: {e})") from e

    # PIL releases the GIL while decoding, so threads give a real speed-up with no process overhead.
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        list(pool.map(one, range(len(paths)), chunksize=256))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def read_image(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """One image file as float (C, H, W) in [0, 1] at ``shape`` (e.g. a blend trigger); the engine calls
    this for attack parameters that name a file, so attacks themselves do no I/O."""
    if not Path(path).is_file():
        raise DataError(f"image file not found: {path}")
    info = DatasetInfo("image", 0, tuple(shape), 1, 0, (), (), f"an image file at {path}")
    return _decode([str(path)], info, path)[0].float() / 255


def read_array(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """A float array saved with numpy (``.npy``, e.g. I-BAU's L0 trigger mask) as (C, H, W) at ``shape``;
    an (H, W) or (1, H, W) array is broadcast over the channels. Pickled objects are refused."""
    if not Path(path).is_file():
        raise DataError(f"array file not found: {path}")
    try:
        a = torch.from_numpy(np.load(path, allow_pickle=False)).float()
    except ValueError as e:
        raise DataError(f"cannot read {path} as a plain numpy array ({e})") from None
    if a.dim() == 2:
        a = a[None]
    if a.dim() != 3 or a.shape[1:] != tuple(shape[1:]) or a.shape[0] not in (1, shape[0]):
        raise DataError(f"{path} has shape {list(a.shape)}; expected {list(shape)} (or one channel of it)")
    return a.expand(shape).clone()


def read_file(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """A file an attack parameter names, as float (C, H, W): a ``.npy`` array or an image."""
    return read_array(path, shape) if str(path).endswith(".npy") else read_image(path, shape)


def _take(raw: Raw, n: int | None, seed: int, info: DatasetInfo, root) -> Split:
    """Subset (if n is given) and, for file lists, decode only the chosen files."""
    idx = None if n is None else stratified_indices(raw.y, n, seed)
    if isinstance(raw, Split):
        return raw if idx is None else raw.subset(idx)
    paths = raw.paths if idx is None else [raw.paths[i] for i in idx.tolist()]
    y = raw.y if idx is None else raw.y[idx]
    return Split(_decode(paths, info, root), y)


# --------------------------------------------------------------------------------------------------
# Public API


def dataset_info(name: str) -> DatasetInfo:
    """Static facts of a registered dataset; loads nothing, touches no files."""
    return DATASETS.get(name).info


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> Dataset:
    """Load a registered dataset from ``root`` (image-folder layout first, else the published one).

    ``train_size`` / ``test_size`` take a class-stratified subset drawn with ``seed``; the engine
    passes a fixed seed so that every trial of a sweep sees the same data.
    """
    entry: DatasetEntry = DATASETS.get(name)
    info = entry.info
    if not entry.needs_root:
        raw = entry.read(None, download)
    else:
        if root is None:
            raise _fail(info, root, "no root directory was given")
        root = Path(root).expanduser()
        if root.is_dir() and _is_image_folder(root, entry):
            raw, classes = _read_image_folder(root, info)
            info = replace(info, classes=classes)
        elif not root.is_dir() and not download:
            raise _fail(info, root, "the root directory does not exist")
        elif not entry.marker and (root / "train").is_dir() != (root / "test").is_dir():
            # Half an image folder: say so, rather than go looking for (or downloading) the published files.
            have, lack = ("train", "test") if (root / "train").is_dir() else ("test", "train")
            raise _fail(info, root, f"found {have}/ but no {lack}/ folder")
        else:
            raw = entry.read(root, download)
            info = replace(info, classes=raw.get("classes", info.classes))
    train = _take(raw["train"], train_size, seed, info, root)
    test = _take(raw["test"], test_size, seed, info, root)
    return Dataset(info, train, test)


def _register(info: DatasetInfo, read: Reader, **kw) -> None:
    DATASETS.register(info.name)(DatasetEntry(info, read, **kw))


def _torchvision(info: DatasetInfo, root: Path, download: bool, make: Callable):
    """Build a torchvision dataset, turning its failures (missing files, no network) into DataError."""
    try:
        return make(root, download)
    except DataError:
        raise
    except Exception as e:
        if download:
            raise _fail(info, root, f"the data is not on disk and the download failed ({type(e).__name__}: "
                                    f"{e}); place the files on disk instead") from e
        raise _fail(info, root, f"data not found ({e})") from e


# --------------------------------------------------------------------------------------------------
# Published layouts


def _info(name, k, shape, n_train, n_test, mean, std, published, classes=()) -> DatasetInfo:
    layout = f"the published layout {published}, " + _FOLDER_LAYOUT.format(k=k, h=shape[1], w=shape[2])
    return DatasetInfo(name, k, shape, n_train, n_test, tuple(mean), tuple(std), layout, tuple(classes))


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _read_cifar10(root: Path, download: bool) -> dict:
    import torchvision.datasets as tvd

    info = DATASETS.get("cifar10").info
    out = {}
    for split in ("train", "test"):
        ds = _torchvision(info, root, download, lambda r, d: tvd.CIFAR10(r, train=split == "train", download=d))
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> NCHW
        out[split] = Split(x, torch.tensor(ds.targets, dtype=torch.int64))
    return out


_register(_info("cifar10", 10, (3, 32, 32), 50000, 10000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (the python pickle "
                "batches that torchvision.datasets.CIFAR10 downloads)", CIFAR10_CLASSES), _read_cifar10)


def _read_mnist(root: Path, download: bool) -> dict:
    import torchvision.datasets as tvd

    info = DATASETS.get("mnist").info
    out = {}
    for split in ("train", "test"):
        ds = _torchvision(info, root, download, lambda r, d: tvd.MNIST(r, train=split == "train", download=d))
        out[split] = Split(ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64))
    return out


_register(_info("mnist", 10, (1, 28, 28), 60000, 10000, (0.1307,), (0.3081,),
                "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (the IDX files that "
                "torchvision.datasets.MNIST downloads)", [str(i) for i in range(10)]), _read_mnist)


def _read_gtsrb(root: Path, download: bool) -> dict:
    import torchvision.datasets as tvd

    info = DATASETS.get("gtsrb").info
    out = {}
    for split in ("train", "test"):
        ds = _torchvision(info, root, download, lambda r, d: tvd.GTSRB(r, split=split, download=d))
        # torchvision lists (path, label) pairs without decoding; take them (sorted, as everywhere) so
        # that subsets decode lazily.
        paths, ys = zip(*sorted(ds._samples))
        out[split] = Files(list(paths), torch.tensor(ys, dtype=torch.int64))
    return out


_register(_info("gtsrb", 43, (3, 32, 32), 26640, 12630, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669),
                "<root>/gtsrb/GTSRB/Training/<00000..00042>/*.ppm + <root>/gtsrb/GTSRB/Final_Test/Images/*.ppm "
                "+ <root>/gtsrb/GT-final_test.csv (as torchvision.datasets.GTSRB downloads them; images are "
                "resized to 32x32)", [f"{i:05d}" for i in range(43)]), _read_gtsrb)

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _read_tiny_imagenet(root: Path, download: bool) -> dict:
    info = DATASETS.get("tiny_imagenet").info
    try:
        wnids = sorted((root / "wnids.txt").read_text().split())  # sorted, as an image folder would be
        label = {w: i for i, w in enumerate(wnids)}
        if len(wnids) != info.num_classes:
            raise ValueError(f"wnids.txt lists {len(wnids)} classes")
        paths, ys = [], []
        for w in wnids:
            files = _images_in(root / "train" / w / "images")
            if not files:
                raise ValueError(f"train/{w}/images holds no images")
            paths += files
            ys += [label[w]] * len(files)
        train = Files(paths, torch.tensor(ys, dtype=torch.int64))
        rows = sorted(line.split("\t")[:2] for line in (root / "val" / "val_annotations.txt").read_text().splitlines()
                      if line.strip())
        test = Files([str(root / "val" / "images" / f) for f, _ in rows], torch.tensor([label[w] for _, w in rows]))
    except (OSError, ValueError, KeyError) as e:
        raise _fail(info, root, f"cannot read the published layout ({type(e).__name__}: {e}); no automatic "
                                f"download, get {TINY_URL} and unzip it as root") from e
    return {"train": train, "test": test, "classes": tuple(wnids)}


_register(_info("tiny_imagenet", 200, (3, 64, 64), 100000, 10000, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
                f"<root>/wnids.txt + <root>/train/<wnid>/images/*.JPEG + <root>/val/images/*.JPEG + "
                f"<root>/val/val_annotations.txt (unzipped {TINY_URL}; the 10,000 val images are the test split)"),
          _read_tiny_imagenet, marker="wnids.txt")


# --------------------------------------------------------------------------------------------------
# Synthetic: the embedded default, generated procedurally (no files, no network)

SYNTHETIC_CLASSES = ("disk", "square", "diamond", "ring", "hbar", "vbar", "plus", "cross", "triangle", "frame")
_SYNTH_SEED = 1234  # fixed: every run and every trial sees the very same images


def _shape_mask(k: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Mask of class k's shape in coordinates (u, v) scaled so the shape spans about [-1, 1]."""
    au, av = u.abs(), v.abs()
    box = torch.maximum(au, av)
    if k == 0:
        return u * u + v * v <= 1
    if k == 1:
        return box <= 0.8
    if k == 2:
        return au + av <= 1.1
    if k == 3:
        r = (u * u + v * v).sqrt()
        return (r <= 1) & (r >= 0.55)
    if k == 4:
        return (au <= 1) & (av <= 0.35)
    if k == 5:
        return (au <= 0.35) & (av <= 1)
    if k == 6:
        return ((au <= 1) & (av <= 0.28)) | ((au <= 0.28) & (av <= 1))
    if k == 7:
        return ((au - av).abs() <= 0.35) & (box <= 1)
    if k == 8:  # upward triangle: apex at v = -1, base at v = 0.8
        return (v <= 0.8) & (au <= (v + 1) * 0.6)
    return (box <= 0.95) & (box >= 0.6)  # hollow square


def _synthetic_split(n: int, g: torch.Generator, size: int = 32, chunk: int = 500) -> Split:
    # Every random number is drawn up front from g, so the images depend only on (g's seed, n).
    y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]  # exactly balanced, random order
    bg = torch.rand(n, 3, 4, 4, generator=g) * 0.7 + 0.1  # coarse 4x4 colour grid per image
    r = torch.rand(n, generator=g) * 6 + 4  # shape radius 4..10 px
    cx, cy = torch.rand(2, n, generator=g) * (size - 2 * r) + r  # centre where the shape mostly fits
    rx, ry = (torch.rand(2, n, generator=g) * 0.4 + 0.8) * r  # per-axis stretch 0.8..1.2
    angle = (torch.rand(n, generator=g) * 2 - 1) * (math.pi / 12)  # rotation +-15 degrees
    # Colour offset from the background under the shape: random direction, L1 size 0.25..0.9, so
    # some shapes are faint (not trivially separable), none invisible by construction.
    delta = torch.rand(n, 3, generator=g) * 2 - 1
    delta = delta / delta.abs().sum(1, keepdim=True) * (torch.rand(n, 1, generator=g) * 0.65 + 0.25)
    noise_seed = int(torch.randint(2**62, (1,), generator=g))
    # Smooth upsampling 4 -> size as a matrix: rows are convex weights, so the background stays in
    # [0.1, 0.8] and is never pure white (a white corner patch must remain a trigger-only cue).
    up = F.interpolate(torch.eye(4)[None], size=size, mode="linear", align_corners=False)[0].T  # (size, 4)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    x = torch.empty(n, 3, size, size, dtype=torch.uint8)
    gn = torch.Generator().manual_seed(noise_seed)
    # Render in chunks and in place: at this size allocating fresh 100 MB tensors (page faults)
    # costs more than the arithmetic itself.
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        img = up @ bg[s:e] @ up.T  # (m, 3, size, size)
        du, dv = grid[None, None, :] - cx[s:e, None, None], grid[None, :, None] - cy[s:e, None, None]
        cos, sin = angle[s:e, None, None].cos(), angle[s:e, None, None].sin()
        u, v = (cos * du + sin * dv) / rx[s:e, None, None], (cos * dv - sin * du) / ry[s:e, None, None]
        mask = torch.empty(e - s, size, size, dtype=torch.bool)
        for k in range(10):
            sel = y[s:e] == k
            mask[sel] = _shape_mask(k, u[sel], v[sel])
        # Shape colour: the background under the shape plus the offset, reflected where it would
        # leave [0.05, 0.9] (so shapes are never pure white either).
        m = mask[:, None].float()
        under = (img * m).sum((2, 3)) / m.sum((2, 3)).clamp(min=1)
        c = under + delta[s:e]
        c = torch.where((c > 0.9) | (c < 0.05), under - delta[s:e], c).clamp(0.05, 0.9)
        img.mul_(1 - m).add_(m * c[:, :, None, None])
        img.add_(torch.randn(img.shape, generator=gn), alpha=0.07)  # pixel noise
        x[s:e] = img.clamp_(0, 1).mul_(255).round_()
    return Split(x, y.to(torch.int64))


def _read_synthetic(root, download: bool) -> dict:
    g = torch.Generator().manual_seed(_SYNTH_SEED)
    info = DATASETS.get("synthetic").info
    # One intra-op thread: the chunks are too small to gain from more, and on a busy 2-core box
    # OpenMP threads waiting on each other made generation up to 60x slower (0.35 s -> 24 s, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"train": _synthetic_split(info.train_len, g), "test": _synthetic_split(info.test_len, g)}
    finally:
        torch.set_num_threads(threads)


_register(DatasetInfo("synthetic", 10, (3, 32, 32), 10000, 2000, (0.4516, 0.4513, 0.4517), (0.1761, 0.1760, 0.1758),
                      "nothing: generated procedurally in memory (root is ignored)", SYNTHETIC_CLASSES),
          _read_synthetic, needs_root=False)
