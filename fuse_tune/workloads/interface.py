"""The workload interface: how any model, built-in or the user's own, is handed to fuse_tune.

A *workload builder* is a function that returns a :class:`Problem`::

    import fuse_tune

    def build(*, data_dir: str | None = None, hidden: int = 32, dropout: float = 0.0) -> fuse_tune.Problem:
        # the docstring's first line is the description `fuse-tune list` shows
        ...
        return fuse_tune.Problem(model=model, loss=torch.nn.MSELoss(), metric=fuse_tune.MSE,
                                 train=(x_train, y_train), validation=(x_val, y_val), test=(x_test, y_test))

Its keyword parameters with defaults are the workload's **options** (name, type from the annotation or else
from the default, default): study files' ``fixed``/``search`` entries and ``--set`` are checked against them
and routed to them. A few parameter names are not options but *context*, passed when the builder declares
them: ``seed`` (the run's seed), ``data_dir`` (``--data-dir``/``data_dir:``) and ``download``.

Paired seeding: the trainer calls the builder with the global torch RNG seeded with ``seed`` (inside
``torch.random.fork_rng``, so the caller's RNG is untouched): a model whose layers draw their initial
weights from torch's RNG therefore starts from the same weights for every optimizer on the same seed, with
no work on the user's side. Data splits should not depend on the seed.

Data (``train``, ``validation``, ``test``): either a pair of tensors ``(inputs, targets)`` held in memory
(the fast path: minibatches are tensor slices), or any map-style ``torch.utils.data.Dataset`` whose items are
``(input, target)`` pairs, read through a ``DataLoader`` (workers, pinned memory on CUDA). Either way the
trainer draws the epoch's order from its own seeded generator, so seed ``s`` gives every method the same
batches, and every closure call of a step sees the same minibatch.

The training objective of a minibatch ``B`` is ``loss(model(x_B), y_B) + penalty(model)``; ``loss`` must be a
mean over the batch (torch's ``reduction="mean"``), so that the full objective is the size-weighted mean of
chunk losses. The :class:`Metric` (accuracy, mean squared error, ...) is a batch mean too, averaged over a
split the same way; a workload without one is tuned on its validation loss.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from fuse_tune.errors import UserError, first_line

__all__ = [
    "ACCURACY",
    "L2RE",
    "MAE",
    "MSE",
    "CONTEXT_PARAMETERS",
    "Data",
    "Metric",
    "Option",
    "Problem",
    "Workload",
    "WorkloadError",
    "import_builder",
    "options_of",
]

#: a data split: in-memory ``(inputs, targets)`` tensors, or a map-style Dataset of ``(input, target)`` items
Data = tuple[torch.Tensor, torch.Tensor] | Dataset
#: builder parameters that are passed by the trainer, not options: the seed, the data folder, download
CONTEXT_PARAMETERS = ("seed", "data_dir", "download")


class WorkloadError(UserError):
    """A workload reference that does not import, or a builder that breaks the interface (one line, exit 2)."""


# ------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class Metric:
    """A quality measure of a model's outputs, averaged over a split.

    Attributes:
        name: an identifier; logged as ``val_<name>`` and ``test_<name>``, and a study's objective may be
            ``val_<name>``.
        fn: ``(outputs, targets) -> scalar``, the mean over the batch (weighted by batch size across batches); or,
            with ``finish``, ``(outputs, targets) -> 1-D tensor of sums`` over the batch, added up over batches.
        direction: ``"maximize"`` or ``"minimize"``.
        finish: ``sums -> value`` for a metric that is not a mean of per-sample values: the relative L2 error
            ``||u - u*|| / ||u*||`` is ``sqrt(sum (u - u*)^2 / sum u*^2)`` of two sums (:data:`L2RE`).
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    direction: Literal["maximize", "minimize"]
    finish: Callable[[torch.Tensor], float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Metric.name: expected an identifier such as 'accuracy' or 'r2', got {self.name!r}")
        if self.direction not in ("maximize", "minimize"):
            raise ValueError(f"Metric.direction: expected 'maximize' or 'minimize', got {self.direction!r}")
        if not callable(self.fn):
            raise ValueError(f"Metric.fn: expected a function (outputs, targets) -> scalar, got {self.fn!r}")


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose largest output is the target class."""
    return (outputs.argmax(dim=-1) == targets).to(torch.float64).mean()


def _mean_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.reshape(targets.shape) - targets).pow(2).to(torch.float64).mean()


def _mean_absolute_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.reshape(targets.shape) - targets).abs().to(torch.float64).mean()


#: classification accuracy (argmax of the outputs against integer labels); maximize
ACCURACY = Metric("accuracy", _accuracy, "maximize")
#: mean squared error of outputs reshaped to the targets' shape; minimize
MSE = Metric("mse", _mean_squared_error, "minimize")
#: mean absolute error; minimize
MAE = Metric("mae", _mean_absolute_error, "minimize")


def _squared_error_sums(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    error = outputs.reshape(targets.shape).to(torch.float64) - targets.to(torch.float64)
    return torch.stack((error.pow(2).sum(), targets.to(torch.float64).pow(2).sum()))


def _relative_l2(sums: torch.Tensor) -> float:
    return float(torch.sqrt(sums[0] / sums[1]))


#: relative L2 error over a whole split, ``||u - u*||_2 / ||u*||_2`` (the PINN literature's L2RE); minimize
L2RE = Metric("l2re", _squared_error_sums, "minimize", finish=_relative_l2)


# ------------------------------------------------------------------ what a builder returns


@dataclass(eq=False)
class Problem:
    """What a workload builder returns.

    Attributes:
        model: the network, on the CPU in float32 (the trainer moves it to the run's device).
        loss: ``(outputs, targets) -> scalar``, a mean over the batch (e.g. ``nn.CrossEntropyLoss()``).
        train, validation: the training data and the held-out data the tuner selects on (:data:`Data`).
        test: data for the final report (``fuse-tune compare``'s reruns, ``fuse-tune train``); never selected on.
        metric: reported on validation and test, and the default objective (``val_<name>``); ``None``: the
            validation loss is the objective.
        penalty: ``model -> scalar`` added to every minibatch loss and to the reported losses (e.g. an L2 term).
        diagnostics: ``(model, train split) -> {name: value}``, evaluated after each epoch (untimed, without
            autograd unless it asks for it) and logged beside the metrics (a PINN's separate loss terms).
    """

    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train: Data
    validation: Data
    test: Data | None = None
    metric: Metric | None = None
    penalty: Callable[[nn.Module], torch.Tensor | float] | None = None
    diagnostics: Callable[[nn.Module, Data], Mapping[str, float]] | None = None

    def objective(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``loss(model(inputs), targets) + penalty(model)``: the minibatch training objective."""
        value = self.loss(model(inputs), targets)
        return value + self.penalty(model) if self.penalty is not None else value


def split_size(data: Data) -> int:
    """Samples in a split."""
    return int(data[0].shape[0]) if isinstance(data, tuple) else len(data)


# ------------------------------------------------------------------ options


@dataclass(frozen=True)
class Option:
    """One declared option of a workload.

    Attributes:
        name: the keyword.
        type: what a value must be: ``int``, ``float`` (ints accepted), ``bool``, ``str``, ``list``/``tuple``
            (lists and tuples accepted, passed as a tuple), a ``Literal`` of choices, or ``None`` for any value.
        default: the value when the study does not set it.
        choices: the accepted values of a ``Literal`` option.
        optional: ``None`` is accepted too (``int | None``).
    """

    name: str
    type: type | None
    default: Any
    choices: tuple[Any, ...] = ()
    optional: bool = False

    def check(self, value: Any, workload_name: str) -> Any:
        """``value`` when it is of this option's type (sequences as tuples); one-line ``ValueError`` otherwise."""
        if value is None and (self.optional or self.default is None):
            return value
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{self.name}: expected one of {list(self.choices)} (an option of workload "
                                 f"{workload_name!r}), got {value!r}")
            return value
        expected = self.type
        ok = (expected is None
              or (expected is bool and isinstance(value, bool))
              or (expected is int and isinstance(value, int) and not isinstance(value, bool))
              or (expected is float and isinstance(value, int | float) and not isinstance(value, bool))
              or (expected is str and isinstance(value, str))
              or (expected in (list, tuple) and isinstance(value, list | tuple)))
        if not ok:
            kind = "a list" if expected in (list, tuple) else expected.__name__
            raise ValueError(f"{self.name}: expected {kind} (an option of workload {workload_name!r}), got {value!r}")
        if expected in (list, tuple):
            return tuple(value)
        if expected is float:
            return float(value)
        return value


def _option_type(annotation: Any, default: Any) -> tuple[type | None, tuple[Any, ...], bool]:
    """(type, choices, optional) of an annotation; the default's type when there is no usable annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        annotation = members[0] if len(members) == 1 else inspect.Parameter.empty
        origin = typing.get_origin(annotation)
    if origin is Literal:
        return None, typing.get_args(annotation), optional
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        return tuple, (), optional
    if annotation in (int, float, bool, str):
        return annotation, (), optional
    if annotation is inspect.Parameter.empty or annotation is Any:
        if isinstance(default, bool | int | float | str):
            return type(default), (), optional
        if isinstance(default, list | tuple):
            return tuple, (), optional
    return None, (), optional


def options_of(builder: Callable[..., Any], name: str) -> tuple[Option, ...]:
    """The options a builder declares: its parameters with defaults, less :data:`CONTEXT_PARAMETERS`.

    Raises ``WorkloadError`` for a parameter that is neither context nor has a default (nothing could fill it).
    """
    try:
        signature = inspect.signature(builder)
        hints = typing.get_type_hints(builder)
    except (TypeError, ValueError, NameError) as exc:
        raise WorkloadError(f"workload {name!r}: cannot read the builder's signature ({exc})") from None
    options = []
    for parameter in signature.parameters.values():
        if parameter.name in CONTEXT_PARAMETERS or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        if parameter.default is inspect.Parameter.empty:
            raise WorkloadError(f"workload {name!r}: the builder's parameter {parameter.name!r} has no default; "
                                f"give every option a default (context parameters: {', '.join(CONTEXT_PARAMETERS)})")
        kind, choices, optional = _option_type(hints.get(parameter.name, inspect.Parameter.empty), parameter.default)
        options.append(Option(parameter.name, kind, parameter.default, choices, optional))
    return tuple(options)


def _context_of(builder: Callable[..., Any]) -> frozenset[str]:
    parameters = inspect.signature(builder).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return frozenset(CONTEXT_PARAMETERS)
    return frozenset(name for name in CONTEXT_PARAMETERS if name in parameters)


# ------------------------------------------------------------------ the workload


@dataclass(frozen=True)
class Workload:
    """A named builder with its declared options.

    Attributes:
        name: the registry key (``digits-cnn``) or the reference it was imported from (``pkg.module:build``).
        kind: ``"supervised"`` (the builder returns a :class:`Problem`) or ``"function"`` (a test function).
        description: one line for listings (the builder's docstring by default).
        build: the builder.
        options: the declared options (:func:`options_of`).
        dataset, model, function: what a built-in workload is made of (``None`` for users' workloads).
    """

    name: str
    kind: Literal["function", "supervised"]
    description: str
    build: Callable[..., Any] = field(repr=False)
    options: tuple[Option, ...] = ()
    dataset: str | None = None
    model: str | None = None
    function: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("function", "supervised"):
            raise ValueError(f"kind: expected 'function' or 'supervised', got {self.kind!r}")

    @property
    def defaults(self) -> dict[str, Any]:
        """Every option with its default."""
        return {option.name: option.default for option in self.options}

    def check_options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``values``, each checked against its declared type; ``ValueError`` naming the
        option for an unknown one or a value of the wrong type."""
        declared = {option.name: option for option in self.options}
        for name in values:
            if name not in declared:
                listed = ", ".join(sorted(declared)) or "none"
                raise ValueError(f"{name}: not an option of workload {self.name!r}; accepted: {listed}")
        return {name: option.check(values[name], self.name) if name in values else option.default
                for name, option in declared.items()}

    def call(self, options: Mapping[str, Any], *, seed: int, data_dir: str | None = None,
             download: bool = False) -> Any:
        """``build(**options, **context)`` with the context parameters the builder declares."""
        context = {"seed": seed, "data_dir": data_dir, "download": download}
        wanted = _context_of(self.build)
        return self.build(**options, **{key: value for key, value in context.items() if key in wanted})


def from_builder(builder: Callable[..., Any], name: str) -> Workload:
    """The :class:`Workload` of a user's builder function: options from its signature, the description from
    its docstring's first line."""
    if not callable(builder) or isinstance(builder, type):
        raise WorkloadError(f"workload {name!r}: expected a builder function, got {type(builder).__name__}")
    doc = (inspect.getdoc(builder) or "").strip().splitlines()
    return Workload(name=name, kind="supervised", description=doc[0] if doc else f"user workload {name}",
                    build=builder, options=options_of(builder, name))


# ------------------------------------------------------------------ import


def is_reference(name: str) -> bool:
    """Whether ``name`` is an import reference ``package.module:builder`` rather than a registered name."""
    return isinstance(name, str) and ":" in name


def import_builder(reference: str, search_path: Sequence[str | Path] = ()) -> Callable[..., Any]:
    """The object ``package.module:attribute`` names, importing the module with ``search_path`` first on
    ``sys.path`` (e.g. the study file's folder). One-line ``WorkloadError`` for each way this fails."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute or not all(part.isidentifier() for part in module_name.split(".")) \
            or not all(part.isidentifier() for part in attribute.split(".")):
        raise WorkloadError(f"workload: expected 'package.module:builder' or a registered name, got {reference!r}")
    for folder in reversed([str(Path(p).resolve()) for p in search_path]):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) and (module_name + ".").startswith(exc.name + "."):
            where = ", ".join(str(p) for p in search_path) or "the current folder"
            raise WorkloadError(f"workload {reference!r}: no module named {exc.name!r} (looked on sys.path and in "
                                f"{where})") from None
        raise WorkloadError(f"workload {reference!r}: importing {module_name} failed: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise WorkloadError(f"workload {reference!r}: importing {module_name} failed: "
                            f"{type(exc).__name__}: {first_line(exc)}") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise WorkloadError(f"workload {reference!r}: module {module_name} has no {attribute!r}")
        target = getattr(target, part)
    return target


# ------------------------------------------------------------------ checking what a builder returned


def check_problem(problem: Any, name: str) -> Problem:
    """``problem`` when it is a well-formed :class:`Problem`; a one-line ``WorkloadError`` naming the field."""
    if not isinstance(problem, Problem):
        raise WorkloadError(f"workload {name!r}: the builder returned {type(problem).__name__}, expected a "
                            f"fuse_tune.Problem(model=..., loss=..., train=..., validation=...)")
    if not isinstance(problem.model, nn.Module):
        raise WorkloadError(f"workload {name!r}: Problem.model: expected a torch.nn.Module, got "
                            f"{type(problem.model).__name__}")
    if not any(p.requires_grad for p in problem.model.parameters()):
        raise WorkloadError(f"workload {name!r}: Problem.model has no trainable parameters")
    if not callable(problem.loss):
        raise WorkloadError(f"workload {name!r}: Problem.loss: expected a function (outputs, targets) -> scalar, "
                            f"got {type(problem.loss).__name__}")
    if problem.penalty is not None and not callable(problem.penalty):
        raise WorkloadError(f"workload {name!r}: Problem.penalty: expected a function model -> scalar or None")
    if problem.metric is not None and not isinstance(problem.metric, Metric):
        raise WorkloadError(f"workload {name!r}: Problem.metric: expected a fuse_tune.Metric or None, got "
                            f"{type(problem.metric).__name__}")
    for split in ("train", "validation", "test"):
        data = getattr(problem, split)
        if data is None and split == "test":
            continue
        _check_data(data, f"workload {name!r}: Problem.{split}")
    return problem


def _check_data(data: Any, where: str) -> None:
    if isinstance(data, tuple):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise WorkloadError(f"{where}: expected (inputs, targets) tensors or a torch.utils.data.Dataset")
        if data[0].shape[0] != data[1].shape[0]:
            raise WorkloadError(f"{where}: inputs hold {data[0].shape[0]} samples, targets {data[1].shape[0]}")
        if data[0].shape[0] == 0:
            raise WorkloadError(f"{where}: is empty")
        return
    if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        raise WorkloadError(f"{where}: expected (inputs, targets) tensors or a map-style torch.utils.data.Dataset "
                            f"with __len__, got {type(data).__name__}")
    if len(data) == 0:
        raise WorkloadError(f"{where}: is empty")


def check_loss_value(value: Any, name: str) -> None:
    """A minibatch objective must be a real scalar tensor (one line naming the workload otherwise)."""
    if not isinstance(value, torch.Tensor):
        raise WorkloadError(f"workload {name!r}: the loss returned {type(value).__name__}, expected a scalar tensor")
    if value.numel() != 1:
        raise WorkloadError(f"workload {name!r}: the loss returned a tensor of shape {tuple(value.shape)}, expected "
                            f"a scalar (a mean over the batch: reduction='mean')")
    if not value.requires_grad:
        raise WorkloadError(f"workload {name!r}: the loss does not depend on the model's parameters "
                            f"(no gradient flows back to them)")


def first_batch(data: Data, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` samples of a split as one ``(inputs, targets)`` batch (a Dataset's through its collate)."""
    if isinstance(data, tuple):
        return data[0][:size], data[1][:size]
    from torch.utils.data import default_collate

    inputs, targets = default_collate([data[i] for i in range(min(size, len(data)))])
    return inputs, targets


def check_runs(problem: Problem, name: str) -> None:
    """Evaluate the training objective (with its gradient) and the metric on the first two training samples: a
    model or loss that raises, a loss that is not a scalar or does not reach the parameters, or a metric that
    fails is one line naming the workload before any training starts."""
    inputs, targets = first_batch(problem.train, 2)
    device = next(iter(problem.model.parameters())).device
    inputs, targets = _to(inputs, device), _to(targets, device)
    buffers = {name: buffer.detach().clone() for name, buffer in problem.model.named_buffers()}
    try:
        outputs = problem.model(inputs)
        value = problem.loss(outputs, targets)
        if problem.penalty is not None:
            value = value + problem.penalty(problem.model)
    except Exception as exc:
        raise WorkloadError(f"workload {name!r}: the model or the loss raised {type(exc).__name__} on a batch of "
                            f"the training data: {first_line(exc)}") from None
    finally:
        with torch.no_grad():  # the probe must not move BatchNorm's running statistics
            for buffer_name, buffer in problem.model.named_buffers():
                if buffer_name in buffers:
                    buffer.copy_(buffers[buffer_name])
    check_loss_value(value, name)
    if problem.metric is not None:
        try:
            score = problem.metric.fn(outputs.detach(), targets)
            float(problem.metric.finish(score) if problem.metric.finish is not None else score)
        except Exception as exc:
            raise WorkloadError(f"workload {name!r}: the metric {problem.metric.name!r} raised "
                                f"{type(exc).__name__}: {first_line(exc)} (a scalar batch mean, or sums for finish)"
                                ) from None


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value
