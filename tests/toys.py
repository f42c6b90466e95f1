"""Toy data, models and attack constructors shared by the attack tests (imported as ``toys``)."""
from __future__ import annotations

import torch

from attacks import ATTACKS
from attacks.base import AttackContext
from kernel.data import DatasetInfo, Split
from kernel.models import create_model
from kernel.train import TrainConfig

# CIFAR-shaped and MNIST-shaped stand-ins; attacks read only the shape, the class count and mean/std
INFO = DatasetInfo("toy", 10, (3, 32, 32), 1000, 200, (0.5,) * 3, (0.25,) * 3, "toy")
GRAY = DatasetInfo("toy1", 10, (1, 28, 28), 1000, 200, (0.5,), (0.25,), "toy")


def make(name, seed=0, info=INFO, **params):
    """Attack ``name`` with ``params`` validated as a spec would (the class count and shape in context)."""
    cls = ATTACKS.get(name)
    ctx = {"num_classes": info.num_classes, "shape": info.shape}
    return cls(cls.Params.model_validate(params, context=ctx), info, seed)


def toy_split(n, seed=1, info=INFO):
    """``n`` uniform-noise uint8 images, labels cycling through the classes (n/10 of each)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *info.shape), generator=g, dtype=torch.uint8)
    return Split(x, torch.arange(n) % info.num_classes)


def toy_model(seed=0, info=INFO):
    """An untrained small_cnn in eval mode, seeded."""
    torch.manual_seed(seed)
    return create_model("small_cnn", info.num_classes, info.shape[0], info.mean, info.std).eval()


def ctx_with(model):
    """An AttackContext whose clean reference model is ``model``, frozen as the engine lends it."""
    return AttackContext(train_cfg=TrainConfig(epochs=1), device=torch.device("cpu"),
                         new_model=lambda: create_model("small_cnn", 10),
                         reference_model=lambda: model.eval().requires_grad_(False))


def defense_setup(seed=0, n=200):
    """For defense tests: the synthetic dataset's info, ``n`` uniform-noise images (labels cycling through
    the classes), a seeded untrained small_cnn and a CPU DefenseContext without a clean set."""
    from defenses.base import DefenseContext
    from kernel.data import dataset_info

    info = dataset_info("synthetic")
    g = torch.Generator().manual_seed(seed)
    split = Split((torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8), torch.arange(n) % 10)
    torch.manual_seed(seed)
    model = create_model("small_cnn", 10, 3, info.mean, info.std)
    return info, split, model, DefenseContext(info=info, train_cfg=TrainConfig(), seed=seed, device=torch.device("cpu"))


def backdoored_synthetic(train_size, epochs):
    """A small_cnn trained with BadNets (the default 3x3 patch, 10%, target 0) on the embedded synthetic data:
    the dataset, the poisoned set, the triggered test set and the model."""
    from attacks import ATTACKS
    from kernel.data import load_dataset
    from kernel.train import fit

    ds = load_dataset("synthetic", train_size=train_size, test_size=1000, seed=0)
    cls = ATTACKS.get("badnets")
    attack = cls(cls.Params(poison_rate=0.1, target=0), ds.info, 0)
    poisoned = attack.poison(ds.train)
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, 3, ds.info.mean, ds.info.std)
    fit(model, poisoned.train.x, poisoned.train.y, TrainConfig(epochs=epochs, batch_size=128, lr=0.05), seed=0,
        device=torch.device("cpu"))
    return ds, poisoned, attack.triggered_test(ds.test), model
