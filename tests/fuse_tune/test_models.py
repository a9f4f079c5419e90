"""Models: output shapes on every plausible input shape, parameter counts, option validation."""

from __future__ import annotations

import pytest
import torch

from fuse_tune.workloads.models import MODELS, build_model, model_options, parameter_count

SHAPES = [(1, 8, 8), (1, 16, 16), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_and_gradients(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=10)
    inputs = torch.rand(5, *shape)
    logits = model(inputs)
    assert logits.shape == (5, 10)
    logits.logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert 0 < parameter_count(model) < 300_000


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_counts_match_the_architectures(shape: tuple[int, int, int]) -> None:
    channels, height, width = shape
    pixels = channels * height * width
    assert parameter_count(build_model("logreg", shape, 10)) == pixels * 10 + 10
    assert parameter_count(build_model("mlp", shape, 10)) == (pixels * 64 + 64) + (64 * 64 + 64) + (
        64 * 10 + 10
    )
    conv = (channels * 16 * 9 + 16) + (16 * 32 * 9 + 32)
    assert (
        parameter_count(build_model("cnn2", shape, 10)) == conv + 32 * (height // 4) * (width // 4) * 10 + 10
    )
    growth = 12
    dense = sum((2 + i) * growth * growth * 9 + 2 * (2 + i) * growth for i in range(3))  # conv + BN per layer
    expected = channels * 2 * growth * 9 + dense + 2 * 5 * growth + 5 * growth * 10 + 10
    assert parameter_count(build_model("densenet5", shape, 10)) == expected


def test_options_change_the_architecture() -> None:
    assert parameter_count(build_model("mlp", (1, 8, 8), 10, hidden_sizes=())) == 64 * 10 + 10
    assert (
        parameter_count(build_model("mlp", (1, 8, 8), 10, hidden_sizes=(32,))) == 64 * 32 + 32 + 32 * 10 + 10
    )
    small = build_model("cnn2", (1, 16, 16), 10, channels=(4, 8))
    assert small(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    plain = build_model("densenet5", (3, 32, 32), 10, growth_rate=4, batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert plain(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_model_options_lists_keyword_defaults() -> None:
    assert model_options("logreg") == {}
    assert model_options("mlp") == {"hidden_sizes": (64, 64)}
    assert model_options("cnn2") == {"channels": (16, 32)}
    assert model_options("densenet5") == {"growth_rate": 12, "batch_norm": True}


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: build_model("resnet", (1, 8, 8), 10),
            "name: unknown model 'resnet'; accepted: cnn2, densenet5",
        ),
        (
            lambda: build_model("mlp", (1, 8, 8), 10, width=3),
            "width: not an option of model 'mlp'; accepted: hidden",
        ),
        (lambda: build_model("logreg", (1, 8, 8), 10, hidden_sizes=(3,)), "hidden_sizes: .*accepted: none"),
        (lambda: build_model("mlp", (1, 8, 8), 10, hidden_sizes=(0,)), "hidden_sizes: expected"),
        (lambda: build_model("cnn2", (1, 8, 8), 10, channels=(16,)), "channels: expected two"),
        (lambda: build_model("cnn2", (1, 3, 3), 10), "input_shape: cnn2 needs"),
        (lambda: build_model("logreg", (8, 8), 10), "input_shape: expected"),
        (lambda: build_model("logreg", (1, 8, 8), 1), "num_classes: expected"),
        (lambda: build_model("densenet5", (1, 8, 8), 10, growth_rate=0), "growth_rate: expected"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_default_sizes_are_modest() -> None:
    # USPS CNN as in the project's reference runs; DenseNet for CIFAR small enough for a CPU epoch
    assert parameter_count(build_model("cnn2", (1, 16, 16), 10)) == 9_930
    assert 10_000 < parameter_count(build_model("densenet5", (3, 32, 32), 10)) < 20_000
