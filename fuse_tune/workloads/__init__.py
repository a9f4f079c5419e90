"""Workloads: what to minimise, independent of the optimiser that minimises it.

Every workload, built-in or the user's own, is a :class:`~fuse_tune.workloads.interface.Workload`: a builder
with declared options (:mod:`fuse_tune.workloads.interface` has the interface and its contract). The built-in
ones are registered in ``WORKLOADS`` through that same interface; a user's is named by its import reference
``package.module:builder`` (:func:`get_workload`). Two entry points turn one into something to train:

- ``build_function(workload, seed=...)`` returns a ``FunctionInstance``: a ``FunctionModule`` whose
  parameter ``x`` starts at the test function's default start (the same for every optimiser and
  seed), its ``f_star``, the gradient-noise scale and a noise generator seeded with ``seed``.
- ``build_supervised(workload, data_dir=..., seed=...)`` returns a ``SupervisedInstance``: the model and the
  builder's ``Problem`` (loss, penalty, metric, train / validation / test data).

Paired seeding: the builder runs with the global torch RNG seeded with ``seed`` alone (inside ``fork_rng``:
the caller's RNG is neither read nor advanced); models are built on the CPU in float32 and then moved to
``device``/``dtype``. The same seed therefore gives bit-identical initial weights whichever optimiser is run
next, so optimisers can be compared seed by seed.

Built-in supervised workloads: data from ``fuse_tune.workloads.datasets`` (train / validation / test),
accuracy as the metric, and
loss: mean cross-entropy over the batch plus an L2 penalty on the weights,
``loss = (1/N) sum_i CE(model(x_i), y_i) + (l2 / 2) sum_{W} ||W||^2``, where the sum runs over
weight matrices and convolution kernels (parameters with two or more dimensions), not over biases or
BatchNorm scales. With ``l2 = 1e-3`` on all 1,797 digits this is the objective whose minimum
``f* = 0.261865`` the project's references quote. Logistic-regression workloads default to
``l2 = 1e-3`` (strongly convex, so ``f*`` is well defined); the others to ``l2 = 0``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fuse_optim.test_functions import get_test_function
from fuse_tune.errors import UserError, first_line
from fuse_tune.workloads.datasets import DataBundle, DatasetNotFound, load_dataset
from fuse_tune.workloads.functions import FunctionModule, add_gradient_noise
from fuse_tune.workloads.interface import (
    ACCURACY,
    L2RE,
    MAE,
    MSE,
    Data,
    Metric,
    Option,
    Problem,
    Workload,
    WorkloadError,
    check_problem,
    check_runs,
    from_builder,
    import_builder,
    is_reference,
)
from fuse_tune.workloads.models import build_model, model_options
from fuse_tune.workloads.pinn import pinn_workloads

__all__ = [
    "ACCURACY",
    "L2RE",
    "MAE",
    "MSE",
    "WORKLOADS",
    "Data",
    "Metric",
    "Option",
    "Problem",
    "WorkloadError",
    "call_builder",
    "register_workload",
    "registered_workload",
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
class _BuiltinSupervised:
    """The builder of a built-in supervised workload: a data set of ``DATASETS`` and a model of ``MODELS``,
    cross-entropy plus the L2 penalty, accuracy. A value (not a closure) so that workloads hash and pickle."""

    dataset: str
    model: str

    def __call__(self, *, seed: int = 0, data_dir: str | os.PathLike[str] | None = None, download: bool = False,
                 l2: float = 0.0, **model_kwargs: Any) -> Problem:
        criterion = CrossEntropyWithL2(l2)
        data = load_dataset(self.dataset, data_dir, download=download)
        model = build_model(self.model, data.input_shape, data.num_classes, **model_kwargs)
        return Problem(model=model, loss=criterion.data_loss, penalty=criterion.penalty, metric=ACCURACY,
                       train=(data.train_x, data.train_y), validation=(data.val_x, data.val_y),
                       test=(data.test_x, data.test_y))

    def check(self, options: Mapping[str, Any], data_dir: str | os.PathLike[str] | None) -> None:
        """Build the model the options describe on the data's shape (when the data is present): cheap checks
        of every option value before a study starts."""
        merged = dict(options)
        CrossEntropyWithL2(merged.pop("l2", 0.0))
        try:
            data = load_dataset(self.dataset, data_dir)
        except DatasetNotFound:
            return  # checked when a trial runs; a study over absent data fails then with a clear line
        build_model(self.model, data.input_shape, data.num_classes, **merged)


@dataclass(frozen=True)
class _BuiltinFunction:
    """The builder of a test-function workload (:func:`build_function`)."""

    function: str

    def __call__(self, *, seed: int = 0, dim: int = 2, noise: float = 0.0, start: tuple[float, ...] | None = None,
                 **kwargs: Any) -> FunctionInstance:
        return build_function(self.function, seed=seed, dim=dim, noise=noise, start=start, **kwargs)


def _function_workload(name: str, description: str, dim: int = 2) -> Workload:
    options = (Option("dim", int, dim), Option("noise", float, 0.0), Option("start", tuple, None, optional=True))
    return Workload(name=name, kind="function", description=description, build=_BuiltinFunction(name),
                    options=options, function=name)


def _supervised_workload(dataset: str, model: str, short: str, description: str) -> Workload:
    defaults = {"l2": 1e-3 if model == "logreg" else 0.0, **model_options(model)}
    options = tuple(Option(key, tuple if isinstance(value, list | tuple) else type(value), value)
                    for key, value in defaults.items())
    return Workload(name=f"{dataset}-{short}", kind="supervised", description=description,
                    build=_BuiltinSupervised(dataset, model), options=options,
                    dataset=dataset, model=model)


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
        *pinn_workloads(),
    )
}


#: users' workloads imported so far, by (reference, search path); and those registered in this process
_IMPORTED: dict[tuple[str, tuple[str, ...]], Workload] = {}
_REGISTERED: dict[str, Workload] = {}


def register_workload(name: str, builder: Callable[..., Problem]) -> Workload:
    """Make ``builder`` known under ``name`` in this process (the Python API's callables); returns its Workload."""
    if name in WORKLOADS:
        raise ValueError(f"name: {name!r} is a built-in workload; choose another name")
    _REGISTERED[name] = from_builder(builder, name)
    return _REGISTERED[name]


def registered_workload(name: str) -> Workload | None:
    """The workload registered in this process under ``name`` (:func:`register_workload`), else ``None``."""
    return _REGISTERED.get(name)


def get_workload(name: str, search_path: Sequence[str | os.PathLike[str]] = ()) -> Workload:
    """A built-in workload by name, one registered in this process, or a user's builder by its import
    reference ``package.module:builder`` (the module found on ``search_path`` first, then on ``sys.path``).

    Raises ``ValueError`` for an unknown name and :class:`WorkloadError` (one line) for a reference that does
    not import or a builder whose signature declares no usable options."""
    if isinstance(name, str) and name in WORKLOADS:
        return WORKLOADS[name]
    if isinstance(name, str) and name in _REGISTERED:
        return _REGISTERED[name]
    if isinstance(name, str) and is_reference(name):
        key = (name, tuple(str(p) for p in search_path))
        if key not in _IMPORTED:
            _IMPORTED[key] = from_builder(import_builder(name, search_path), name)
        return _IMPORTED[key]
    raise ValueError(f"name: unknown workload {name!r}; accepted: {', '.join(sorted(WORKLOADS))}, or "
                     f"'package.module:builder' for your own")


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
        problem: what the builder returned, its in-memory splits moved to the device (floating tensors cast to
            ``dtype``); Dataset splits are left as they are (the trainer moves each batch).
        workload: what was built.
        options: the resolved options (defaults merged with the caller's).
        seed: the seed the initial weights come from.
    """

    model: nn.Module
    problem: Problem
    workload: Workload
    options: Mapping[str, Any]
    seed: int

    def loss_fn(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The minibatch training objective ``loss(model(x), y) + penalty(model)``."""
        return self.problem.objective(model, inputs, targets)


def _to_device(data: Data | None, device: torch.device | str, dtype: torch.dtype) -> Data | None:
    if not isinstance(data, tuple):
        return data
    return tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else None) for t in data)  # type: ignore[return-value]


def build_supervised(
    workload: Workload | str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    search_path: Sequence[str | os.PathLike[str]] = (),
    **options: Any,
) -> SupervisedInstance:
    """Call the workload's builder with the global torch RNG seeded with ``seed`` alone (paired seeding: same
    seed, same initial weights, whatever runs next; the caller's RNG state is restored after), check what it
    returned, and move the model and the in-memory data to ``device``/``dtype``.

    Args:
        workload: a supervised ``Workload``, a registered name or a ``package.module:builder`` reference.
        data_dir: the data folder (see ``fuse_tune.workloads.datasets``); not needed for ``digits``.
        download: let torchvision fetch missing files (online only).
        seed: the initial weights' seed.
        device, dtype: where the model and the inputs live.
        search_path: folders to import a reference's module from (e.g. the study file's folder).
        **options: overrides of the workload's declared options (:attr:`Workload.options`).

    Raises:
        ValueError: an unknown workload or option, or a bad option value.
        WorkloadError: a builder that fails or returns something other than a well-formed ``Problem``.
        DatasetNotFound: a built-in data set's files are missing (one line naming the files and the folder).
    """
    resolved = _resolve(workload if not isinstance(workload, str) else get_workload(workload, search_path),
                        "supervised")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    merged = resolved.check_options(options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        problem = call_builder(resolved, merged, seed=seed, data_dir=data_dir, download=download)
        check_runs(problem, resolved.name)  # inside fork_rng: a dropout layer's draws leave the caller's RNG alone
    model = problem.model.to(device=device, dtype=dtype)
    problem = dataclasses.replace(problem, model=model, train=_to_device(problem.train, device, dtype),
                                  validation=_to_device(problem.validation, device, dtype),
                                  test=_to_device(problem.test, device, dtype))
    return SupervisedInstance(model=model, problem=problem, workload=resolved, options=merged, seed=seed)


def call_builder(workload: Workload, options: Mapping[str, Any], *, seed: int,
                 data_dir: str | os.PathLike[str] | None = None, download: bool = False) -> Problem:
    """``workload``'s builder called with ``options`` and its context, its result checked (:func:`check_problem`).

    Errors that are the user's input pass through (bad option values: ``ValueError``; missing data); any other
    exception raised inside a user's builder becomes one line naming the workload."""
    try:
        problem = workload.call(options, seed=seed, data_dir=None if data_dir is None else str(data_dir),
                                download=download)
    except UserError:
        raise
    except Exception as exc:
        if workload.dataset is not None:  # a built-in's: a bad option value (ValueError) or a bug of ours
            raise
        text = first_line(exc)
        raise WorkloadError(f"workload {workload.name!r}: the builder raised {type(exc).__name__}"
                            f"{': ' + text if text else ''}") from exc
    return check_problem(problem, workload.name)


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
    dim = test_function.check_dim(resolved.defaults.get("dim", 2) if dim is None else dim)
    noise = _non_negative("noise", resolved.defaults.get("noise", 0.0) if noise is None else noise)
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
