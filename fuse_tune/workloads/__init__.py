"""Named workloads: what to minimise, independent of the optimiser that minimises it.

A ``Workload`` is data: a test function (``kind="function"``) or a data set plus a model
(``kind="supervised"``), with default options. Two builders turn one into something to train:

- ``build_function(workload, seed=...)`` returns a ``FunctionInstance``: a ``FunctionModule`` whose
  parameter ``x`` starts at the test function's default start (the same for every optimiser and
  seed), its ``f_star``, the gradient-noise scale and a noise generator seeded with ``seed``.
- ``build_supervised(workload, data_dir=..., seed=...)`` returns a ``SupervisedInstance``: the model,
  the data (``DataBundle``) and the loss function.

Paired seeding: a supervised model's initial weights are drawn from a private RNG seeded with
``seed`` alone (the global torch RNG is neither read nor advanced), on the CPU in float32 and then
moved to ``device``/``dtype``. The same seed therefore gives bit-identical initial weights whichever
optimiser is run next, so optimisers can be compared seed by seed.

Loss: mean cross-entropy over the batch plus an L2 penalty on the weights,
``loss = (1/N) sum_i CE(model(x_i), y_i) + (l2 / 2) sum_{W} ||W||^2``, where the sum runs over
weight matrices and convolution kernels (parameters with two or more dimensions), not over biases or
BatchNorm scales. With ``l2 = 1e-3`` on all 1,797 digits this is the objective whose minimum
``f* = 0.261865`` the project's references quote. Logistic-regression workloads default to
``l2 = 1e-3`` (strongly convex, so ``f*`` is well defined); the others to ``l2 = 0``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fuse_optim.test_functions import TEST_FUNCTIONS, get_test_function
from fuse_tune.workloads.datasets import DATASETS, DataBundle, DatasetNotFound, load_dataset
from fuse_tune.workloads.functions import FunctionModule, add_gradient_noise
from fuse_tune.workloads.models import MODELS, build_model, model_options

__all__ = [
    "WORKLOADS",
    "CrossEntropyWithL2",
    "DataBundle",
    "DatasetNotFound",
    "FunctionInstance",
    "FunctionModule",
    "SupervisedInstance",
    "Workload",
    "add_gradient_noise",
    "build_function",
    "build_supervised",
    "get_workload",
    "load_dataset",
]


@dataclass(frozen=True)
class Workload:
    """A named problem.

    Attributes:
        name: registry key, ``"<dataset>-<model>"`` or the test function's name.
        kind: ``"function"`` (a test function) or ``"supervised"`` (a data set and a model).
        description: one line for listings.
        dataset: a ``DATASETS`` key (supervised only).
        model: a ``MODELS`` key (supervised only).
        function: a ``TEST_FUNCTIONS`` key (function only).
        options: default options (read-only); supervised: ``l2`` and the model's options; function:
            ``dim`` and ``noise``.
    """

    name: str
    kind: Literal["function", "supervised"]
    description: str
    dataset: str | None = None
    model: str | None = None
    function: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind == "supervised":
            if self.dataset not in DATASETS or self.model not in MODELS or self.function is not None:
                raise ValueError(
                    f"{self.name}: a supervised workload needs a known dataset and model, no function"
                )
        elif self.kind == "function":
            if self.function not in TEST_FUNCTIONS or self.dataset is not None or self.model is not None:
                raise ValueError(
                    f"{self.name}: a function workload needs a known function, no dataset or model"
                )
        else:
            raise ValueError(f"kind: expected 'function' or 'supervised', got {self.kind!r}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def __reduce__(self) -> tuple[Any, ...]:
        # a mappingproxy does not pickle; rebuild from a plain dict (for Ray, multiprocessing, deepcopy)
        fields = (self.name, self.kind, self.description, self.dataset, self.model, self.function)
        return (Workload, (*fields, dict(self.options)))

    def accepted_options(self) -> dict[str, Any]:
        """Every option ``build_*`` accepts for this workload, with its default."""
        if self.kind == "function":
            return {"dim": 2, "noise": 0.0, **self.options}
        return {"l2": 0.0, **model_options(self.model), **self.options}


def _function_workload(name: str, description: str, dim: int = 2) -> Workload:
    return Workload(
        name=name, kind="function", description=description, function=name, options={"dim": dim, "noise": 0.0}
    )


def _supervised_workload(dataset: str, model: str, short: str, description: str, **options: Any) -> Workload:
    defaults = {"l2": 1e-3 if model == "logreg" else 0.0, **model_options(model), **options}
    return Workload(
        name=f"{dataset}-{short}",
        kind="supervised",
        description=description,
        dataset=dataset,
        model=model,
        options=defaults,
    )


WORKLOADS: dict[str, Workload] = {
    workload.name: workload
    for workload in (
        _function_workload("rosenbrock", "2-D Rosenbrock from (-1.5, 2.0) (paper Fig. 1)"),
        _function_workload("rastrigin", "2-D Rastrigin from (-2.0, 3.5) (paper Fig. 2)"),
        _function_workload("ackley", "2-D Ackley from (-2.0, 3.5) (paper Fig. 3)"),
        _function_workload("himmelblau", "2-D Himmelblau from (0, 0), four global minima (paper Fig. 4)"),
        _function_workload("quadratic", "2-D convex quadratic, condition number 10, from (1, 1)"),
        _supervised_workload(
            "digits", "logreg", "logreg", "logistic regression + L2 on scikit-learn digits (offline)"
        ),
        _supervised_workload("digits", "mlp", "mlp", "MLP 64-64 on scikit-learn digits (offline)"),
        _supervised_workload("digits", "cnn2", "cnn", "2-layer CNN on scikit-learn digits (offline)"),
        _supervised_workload(
            "mnist", "logreg", "logreg", "logistic regression + L2 on MNIST (paper Table II)"
        ),
        _supervised_workload(
            "mnist-test-split",
            "logreg",
            "logreg",
            "logistic regression + L2 on an 8,000/2,000 split of the MNIST test set (offline MNIST stand-in)",
        ),
        _supervised_workload("fashionmnist", "mlp", "mlp", "MLP 64-64 on FashionMNIST (paper Table II)"),
        _supervised_workload("kmnist", "mlp", "mlp", "MLP 64-64 on KMNIST (paper Table II)"),
        _supervised_workload("usps", "cnn2", "cnn", "2-layer CNN on USPS (paper Table II)"),
        _supervised_workload(
            "cifar10", "densenet5", "densenet", "5-layer DenseNet on CIFAR-10 (paper Table II)"
        ),
    )
}


def get_workload(name: str) -> Workload:
    """The registered workload called ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return WORKLOADS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"name: unknown workload {name!r}; accepted: {', '.join(sorted(WORKLOADS))}"
        ) from None


def _resolve(workload: Workload | str, kind: str) -> Workload:
    resolved = get_workload(workload) if isinstance(workload, str) else workload
    if not isinstance(resolved, Workload):
        raise ValueError(f"workload: expected a Workload or a registered name, got {workload!r}")
    if resolved.kind != kind:
        builder = "build_function" if resolved.kind == "function" else "build_supervised"
        raise ValueError(
            f"workload: {resolved.name!r} is a {resolved.kind} workload; build it with {builder}"
        )
    return resolved


def _merge_options(workload: Workload, options: Mapping[str, Any]) -> dict[str, Any]:
    accepted = workload.accepted_options()
    for option in options:
        if option not in accepted:
            listed = ", ".join(sorted(accepted))
            raise ValueError(f"{option}: not an option of workload {workload.name!r}; accepted: {listed}")
    return {**accepted, **options}


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------------------
# Supervised workloads


class CrossEntropyWithL2:
    """``loss(model, x, y) = mean CE(model(x), y) + (l2 / 2) sum_{p.ndim >= 2} ||p||^2``.

    ``data_loss`` and ``penalty`` are exposed separately so that a full-data loss can be evaluated in
    chunks: ``sum_chunks(n_chunk * data_loss) / N + penalty``.
    """

    def __init__(self, l2: float = 0.0) -> None:
        self.l2 = _non_negative("l2", l2)

    def data_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def penalty(self, model: nn.Module) -> torch.Tensor | float:
        if self.l2 == 0.0:
            return 0.0
        squares = [p.pow(2).sum() for p in model.parameters() if p.ndim >= 2]
        return 0.5 * self.l2 * torch.stack(squares).sum() if squares else 0.0

    def __call__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.data_loss(model(inputs), targets) + self.penalty(model)

    def __repr__(self) -> str:
        return f"CrossEntropyWithL2(l2={self.l2:g})"


@dataclass(frozen=True, eq=False)
class SupervisedInstance:
    """A built supervised workload.

    Attributes:
        model: initialised from ``seed`` only, on the requested device and dtype.
        data: the data set, inputs on the requested device and dtype.
        loss_fn: ``(model, x, y) -> scalar`` mean loss including the L2 penalty.
        workload: what was built.
        options: the resolved options (defaults merged with the caller's).
        seed: the seed the initial weights come from.
    """

    model: nn.Module
    data: DataBundle
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    workload: Workload
    options: Mapping[str, Any]
    seed: int


def build_supervised(
    workload: Workload | str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> SupervisedInstance:
    """Load the data, build the model with weights drawn from ``seed`` alone, and the loss.

    Args:
        workload: a supervised ``Workload`` or its registered name.
        data_dir: the data folder (see ``fuse_tune.workloads.datasets``); not needed for ``digits``.
        download: let torchvision fetch missing files (online only).
        seed: the initial weights' seed (paired seeding: same seed, same weights).
        device, dtype: where the model and the inputs live.
        **options: overrides of ``workload.options``: ``l2`` (>= 0) and the model's options.

    Raises:
        ValueError: an unknown workload or option, or a bad option value.
        DatasetNotFound: the data set's files are missing (one line naming the files and the folder).
    """
    resolved = _resolve(workload, "supervised")
    merged = _merge_options(resolved, options)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    loss_fn = CrossEntropyWithL2(merged["l2"])
    model_kwargs = {key: value for key, value in merged.items() if key != "l2"}

    data = load_dataset(resolved.dataset, data_dir, download=download)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(resolved.model, data.input_shape, data.num_classes, **model_kwargs)
    model = model.to(device=device, dtype=dtype)
    return SupervisedInstance(
        model=model,
        data=data.to(device=device, dtype=dtype),
        loss_fn=loss_fn,
        workload=resolved,
        options=merged,
        seed=seed,
    )


# ------------------------------------------------------------------------------------------------------------
# Function workloads


@dataclass(frozen=True, eq=False)
class FunctionInstance:
    """A built function workload.

    Attributes:
        module: ``FunctionModule``; ``module()`` is ``f(x)``.
        f_star: the global minimum value.
        noise: the gradient-noise scale (absolute standard deviation; 0 = exact gradients).
        fn: the test function ``x -> f(x)``.
        generator: seeded with ``seed``; pass it to ``add_gradient_noise`` after each backward.
        start: the initial point.
    """

    module: FunctionModule
    f_star: float
    noise: float
    fn: Callable[[torch.Tensor], torch.Tensor]
    generator: torch.Generator
    start: tuple[float, ...]

    def add_noise(self) -> None:
        """``add_gradient_noise(self.module, self.noise, self.generator)``."""
        add_gradient_noise(self.module, self.noise, self.generator)


def build_function(
    workload: Workload | str,
    *,
    seed: int,
    dim: int | None = None,
    noise: float | None = None,
    start: tuple[float, ...] | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    **options: Any,
) -> FunctionInstance:
    """Build a function workload: ``x`` at ``start`` (default: the function's default start).

    Args:
        workload: a function ``Workload`` or its registered name.
        seed: seeds the gradient-noise generator; the start point does not depend on it.
        dim: the dimension (default: the workload's, 2); Himmelblau accepts 2 only.
        noise: gradient-noise scale (default: the workload's, 0.0); see ``add_gradient_noise``.
        start: an explicit initial point of ``dim`` coordinates.
        dtype, device: of ``x`` (float64 by default).
        **options: none are accepted beyond the above; any raises a ``ValueError`` listing them.
    """
    resolved = _resolve(workload, "function")
    if options:
        option = next(iter(options))
        accepted = "dim, dtype, device, noise, start"
        raise ValueError(f"{option}: not an option of workload {resolved.name!r}; accepted: {accepted}")
    test_function = get_test_function(resolved.function)
    dim = test_function.check_dim(resolved.options.get("dim", 2) if dim is None else dim)
    noise = _non_negative("noise", resolved.options.get("noise", 0.0) if noise is None else noise)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if start is None:
        start = test_function.default_start(dim)
    elif len(start) != dim:
        raise ValueError(f"start: expected {dim} coordinates for dim={dim}, got {len(start)}")
    generator = torch.Generator(device=device).manual_seed(seed)
    return FunctionInstance(
        module=FunctionModule(test_function.fn, start, dtype=dtype, device=device),
        f_star=test_function.f_star,
        noise=noise,
        fn=test_function.fn,
        generator=generator,
        start=tuple(float(v) for v in start),
    )
