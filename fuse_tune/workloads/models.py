"""The paper's model families, each built from an input shape ``(C, H, W)`` and a number of classes.

All models map a batch ``(N, C, H, W)`` to logits ``(N, num_classes)``. The paper names the
families (logistic regression, MLP, a 2-layer CNN, a 5-layer DenseNet) but not their sizes; the sizes
here are ours and are options:

- ``logreg``: flatten, one linear layer (``C*H*W*K + K`` parameters).
- ``mlp``: flatten, ``Linear -> ReLU`` per hidden size (default ``(64, 64)``, the size the project's
  digits references use), then a linear output layer.
- ``cnn2``: two ``3x3`` convolutions (16 and 32 channels, padding 1) each followed by ReLU and
  ``2x2`` max pooling, then one linear layer, the CNN of the project's USPS reference runs.
- ``densenet5``: a DenseNet-style network with five weight layers: a ``3x3`` stem convolution to
  ``2k`` channels, one dense block of three ``BN -> ReLU -> 3x3 conv`` layers of growth rate ``k``
  (default 12), each concatenating its ``k`` new feature maps to its input (``2k -> 5k`` channels),
  then ``BN -> ReLU ->`` global average pooling and a linear classifier.

``build_model(name, input_shape, num_classes, **options)`` dispatches by name and rejects unknown
names and options with one-line ``ValueError``s.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODELS",
    "build_model",
    "cnn2",
    "densenet5",
    "logistic_regression",
    "mlp",
    "model_options",
    "parameter_count",
]


def _check_shape(input_shape: Sequence[int], num_classes: int) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(
            f"input_shape: expected (channels, height, width) of positive ints, got {input_shape!r}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    return shape  # type: ignore[return-value]


def _positive_ints(name: str, values: Sequence[int], allow_empty: bool) -> tuple[int, ...]:
    try:
        result = tuple(values)
    except TypeError:
        result = None
    if (
        result is None
        or (not result and not allow_empty)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in result)
    ):
        raise ValueError(f"{name}: expected a sequence of positive ints, got {values!r}")
    return result


def logistic_regression(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: ``logits = W vec(x) + b``."""
    channels, height, width = _check_shape(input_shape, num_classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, num_classes))


def mlp(input_shape: Sequence[int], num_classes: int, *, hidden_sizes: Sequence[int] = (64, 64)) -> nn.Module:
    """A multi-layer perceptron with ReLU activations: ``vec(x) -> hidden_sizes... -> num_classes``."""
    channels, height, width = _check_shape(input_shape, num_classes)
    sizes = _positive_ints("hidden_sizes", hidden_sizes, allow_empty=True)
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = channels * height * width
    for size in sizes:
        layers += [nn.Linear(width_in, size), nn.ReLU()]
        width_in = size
    layers.append(nn.Linear(width_in, num_classes))
    return nn.Sequential(*layers)


def cnn2(input_shape: Sequence[int], num_classes: int, *, channels: Sequence[int] = (16, 32)) -> nn.Module:
    """Two ``conv 3x3 -> ReLU -> max pool 2x2`` stages, then one linear layer.

    Spatial size after the two poolings: ``floor(floor(H/2)/2) x floor(floor(W/2)/2)`` (e.g. 7x7 for
    28x28, 4x4 for 16x16, 2x2 for 8x8); inputs need ``H, W >= 4``.
    """
    in_channels, height, width = _check_shape(input_shape, num_classes)
    first, second = _channel_pair(channels)
    if height < 4 or width < 4:
        raise ValueError(f"input_shape: cnn2 needs height and width >= 4, got {tuple(input_shape)!r}")
    flat = second * (height // 2 // 2) * (width // 2 // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, first, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(first, second, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, num_classes),
    )


def _channel_pair(channels: Sequence[int]) -> tuple[int, int]:
    values = _positive_ints("channels", channels, allow_empty=False)
    if len(values) != 2:
        raise ValueError(f"channels: expected two positive ints (one per conv layer), got {channels!r}")
    return values[0], values[1]


class _DenseLayer(nn.Module):
    """``BN -> ReLU -> conv 3x3`` producing ``growth_rate`` maps, concatenated to the input."""

    def __init__(self, in_channels: int, growth_rate: int, batch_norm: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels) if batch_norm else nn.Identity()
        self.conv = nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=not batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(torch.relu(self.norm(x)))], dim=1)


class DenseNet5(nn.Module):
    """Five weight layers: stem conv, a dense block of three conv layers, a linear classifier."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, growth_rate: int, batch_norm: bool
    ) -> None:
        super().__init__()
        in_channels = input_shape[0]
        stem_channels = 2 * growth_rate
        self.stem = nn.Conv2d(in_channels, stem_channels, kernel_size=3, padding=1, bias=not batch_norm)
        self.block = nn.Sequential(
            *[_DenseLayer(stem_channels + i * growth_rate, growth_rate, batch_norm) for i in range(3)]
        )
        out_channels = stem_channels + 3 * growth_rate
        self.norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.classifier = nn.Linear(out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.norm(self.block(self.stem(x))))
        return self.classifier(features.mean(dim=(2, 3)))


def densenet5(
    input_shape: Sequence[int], num_classes: int, *, growth_rate: int = 12, batch_norm: bool = True
) -> nn.Module:
    """A small DenseNet (Huang et al., 2017) with five weight layers; see the module docstring.

    ``batch_norm=False`` drops the BatchNorm layers (convolutions then get biases), which makes the
    loss of a batch independent of the module's train/eval mode.
    """
    _check_shape(input_shape, num_classes)
    if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
        raise ValueError(f"growth_rate: expected a positive int, got {growth_rate!r}")
    if not isinstance(batch_norm, bool):
        raise ValueError(f"batch_norm: expected True or False, got {batch_norm!r}")
    return DenseNet5(tuple(input_shape), num_classes, growth_rate, batch_norm)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": logistic_regression,
    "mlp": mlp,
    "cnn2": cnn2,
    "densenet5": densenet5,
}


def model_options(name: str) -> dict[str, Any]:
    """The keyword options of model ``name`` with their defaults."""
    builder = _builder(name)
    return {
        parameter.name: parameter.default
        for parameter in inspect.signature(builder).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"name: unknown model {name!r}; accepted: {', '.join(sorted(MODELS))}") from None


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **options: Any) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` and ``num_classes`` classes.

    Weights follow torch's default initialisation from the global RNG: seed it (or fork it) first.
    """
    builder = _builder(name)
    accepted = model_options(name)
    for option in options:
        if option not in accepted:
            listed = ", ".join(sorted(accepted)) or "none"
            raise ValueError(f"{option}: not an option of model {name!r}; accepted: {listed}")
    return builder(input_shape, num_classes, **options)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad)
