"""kernel.models: every registered architecture builds for every supported input shape, normalises in
pixel space, and exposes the hooks defenses rely on. Shapes only, no training: runs in a few seconds."""
import pytest
import torch

from kernel.models import (MODELS, ImageClassifier, Normalize, create_model, default_train, model_names)
from kernel.train import TrainConfig

EXPECTED = {"preact_resnet18", "resnet18", "wrn16_1", "vgg_small", "small_cnn", "small_cnn_avg"}
# (num_classes, in_channels, size): CIFAR-10, GTSRB, MNIST, Tiny-ImageNet.
SHAPES = [(10, 3, 32), (43, 3, 32), (10, 1, 28), (200, 3, 64)]


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_all_architectures_registered():
    assert EXPECTED <= set(model_names())
    assert model_names() == sorted(model_names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("num_classes,channels,size", SHAPES)
def test_output_shape(name, num_classes, channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes, in_channels=channels)
    assert isinstance(model, ImageClassifier) and model.num_classes == num_classes
    with torch.no_grad():
        out = model.eval()(torch.rand(2, channels, size, size))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hooks_compose_to_forward_and_train_step(name):
    model = create_model(name, 10)
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.dim() == 4 and feats.shape[0] == 4
        torch.testing.assert_close(model.forward_head(feats), model(x))
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.out_features == 10
    # One training step in train mode: gradients reach the first layer.
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(4))
    loss.backward()
    first = next(p for p in model.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_input_gradient_in_pixel_space():
    # Attacks/defenses (I-BAU, trigger inversion) differentiate w.r.t. the [0, 1] image.
    model = create_model("small_cnn", 10).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_normalize_is_applied_with_given_stats():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    model = create_model("small_cnn", 10, mean=mean, std=std).eval()
    x = torch.rand(3, 3, 32, 32)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - m) / s))
    # Fixed buffers saved with the weights, never trained.
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("normalize") for n in names)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())


def test_normalize_defaults_and_broadcast():
    model = create_model("small_cnn", 10, in_channels=1, mean=0.1307, std=0.3081)
    assert model.normalize.mean.shape == (1, 1, 1, 1)
    torch.testing.assert_close(model.normalize(torch.full((1, 1, 2, 2), 0.1307)), torch.zeros(1, 1, 2, 2))
    default = create_model("small_cnn", 10).normalize  # 0.5 / 0.5: [0, 1] -> [-1, 1]
    torch.testing.assert_close(default(torch.tensor([0.0, 1.0]).view(1, 1, 2, 1).expand(1, 3, 2, 1)),
                               torch.tensor([-1.0, 1.0]).view(1, 1, 2, 1).expand(1, 3, 2, 1))
    with pytest.raises(ValueError, match="3 input channels"):
        create_model("small_cnn", 10, mean=(0.5, 0.5), std=0.5)
    assert isinstance(Normalize([0.5], [0.5]), torch.nn.Module)


def test_parameter_counts():
    counts = {name: n_params(create_model(name, 10)) for name in EXPECTED}
    assert counts["preact_resnet18"] == pytest.approx(11.17e6, rel=0.01)  # the field's 11,171,146
    assert counts["resnet18"] == pytest.approx(11.17e6, rel=0.01)
    assert counts["wrn16_1"] == pytest.approx(0.175e6, rel=0.02)
    assert counts["vgg_small"] == pytest.approx(0.308e6, rel=0.02)
    assert 20e3 < counts["small_cnn"] < 1e6
    # Only the classifier grows with the number of classes.
    assert n_params(create_model("preact_resnet18", 43)) - counts["preact_resnet18"] == 33 * (512 + 1)


def test_vgg_small_classifier_is_2048_at_32x32():
    model = create_model("vgg_small", 10).eval()
    assert (model.fc.in_features, model.fc.out_features) == (2048, 10)
    with torch.no_grad():
        assert model.forward_features(torch.rand(1, 3, 32, 32)).shape == (1, 128, 4, 4)


def test_small_cnn_heads_differ_only_in_the_pooling():
    # small_cnn_avg is the controlled comparison for small_cnn's max-pooled head: same layers, same weights
    # layout, same recipe; only the global pooling differs.
    mx, avg = create_model("small_cnn", 10).eval(), create_model("small_cnn_avg", 10).eval()
    avg.load_state_dict(mx.state_dict())
    assert default_train("small_cnn_avg") == default_train("small_cnn")
    f = torch.zeros(2, 128, 4, 4)
    f[:, :, 0, 0] = 8.0  # one hot spot per channel: the max sees 8, the mean 8 / 16
    with torch.no_grad():
        torch.testing.assert_close(mx.forward_head(f), mx.fc(torch.full((2, 128), 8.0)))
        torch.testing.assert_close(avg.forward_head(f), avg.fc(torch.full((2, 128), 0.5)))


def test_unknown_model_lists_known_names():
    with pytest.raises(KeyError) as err:
        create_model("resnet1000", 10)
    assert all(name in str(err.value) for name in EXPECTED)
    with pytest.raises(KeyError):
        default_train("resnet1000")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_default_train_is_a_valid_train_config(name):
    defaults = default_train(name)
    assert {"epochs", "batch_size", "lr"} <= set(defaults)
    TrainConfig(**defaults)  # unknown keys would raise TypeError
    defaults["epochs"] = -1  # callers get a copy
    assert default_train(name)["epochs"] > 0


def test_literature_defaults_for_standard_models():
    for name in ("preact_resnet18", "resnet18"):
        d = default_train(name)
        assert (d["lr"], d["momentum"], d["weight_decay"], d["schedule"], d["epochs"], d["batch_size"]) == (
            0.01, 0.9, 5e-4, "cosine", 100, 128)


def test_the_seed_models_have_their_short_full_data_recipes():
    # docs/benchmarks.md, "Full-data recipes": one-cycle at batch 256, no label smoothing (ABL reads
    # per-sample losses); vgg_small trains without its dropout, which its layers keep for later use.
    for name, epochs in (("vgg_small", 20), ("wrn16_1", 28)):
        d = default_train(name)
        assert (d["schedule"], d["batch_size"], d["epochs"], d["label_smoothing"]) == ("onecycle", 256, epochs, 0.0)
    assert default_train("vgg_small")["dropout"] == 0.0 and "dropout" not in default_train("wrn16_1")
    assert {m.p for m in create_model("vgg_small", 10).modules() if isinstance(m, torch.nn.Dropout)} == {0.3, 0.4}


def test_registry_is_the_model_registry():
    assert MODELS.kind == "model" and "small_cnn" in MODELS
