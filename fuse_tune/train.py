"""The epoch loop: closures on one minibatch per step, honest timing and cost accounting.

One step draws one minibatch and hands the optimizer a closure over *that* minibatch, so every
closure call of a step (L-BFGS line-search trials included) sees the same samples. After each
epoch the trainer evaluates (excluded from the wall time) and emits an :class:`EpochMetrics`.

Paired seeding: ``seed`` fixes the initial weights (through the workload builder) and the data
order (a private ``torch.Generator``), so every optimizer sees the same start and the same batches
for the same seed. Costs: every closure call is a gradient evaluation; ``samples`` adds the batch
size of each call (the batch size may change at the switch, paper Remark 2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from fuse_tune.optimizers import build_optimizer, optimizer_phase
from fuse_tune.workloads import build_function, build_supervised, get_workload

__all__ = ["TrainConfig", "EpochMetrics", "TrainResult", "Trainer", "train", "resolve_device", "TRAINER_KEYS"]


@dataclass
class TrainConfig:
    """Settings of one training run (everything except the optimizer's own arguments).

    Attributes:
        workload: a registered workload name (``fuse-tune list``).
        optimizer: a registered optimizer name.
        optimizer_args: keyword arguments of the optimizer.
        workload_options: options of the workload (e.g. ``l2``, ``hidden_sizes``, ``noise``).
        epochs: epochs to run.
        batch_size: minibatch size before the switch (samples).
        batch_size_after_switch: minibatch size once the optimizer is in its second phase
            (``None``: unchanged).
        steps_per_epoch: steps that make an "epoch" on a test function (no data set there).
        seed: initial weights and data order.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda[:i]"``.
        threads: torch CPU threads (``None``: leave torch's default).
        data_dir: the data folder for torchvision data sets (not needed for digits).
        download: let torchvision download missing data sets.
        eval_batch_size: samples per forward pass during evaluation.
        target_loss: when set, the wall time and gradient evaluations at which the full training
            loss first fell to this value are reported.
    """

    workload: str = "digits-logreg"
    optimizer: str = "fuse_pv"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    workload_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    batch_size_after_switch: int | None = None
    steps_per_epoch: int = 50
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    data_dir: str | None = None
    download: bool = False
    eval_batch_size: int = 4096
    target_loss: float | None = None

    def validate(self) -> None:
        _positive_int(self.epochs, "epochs")
        _positive_int(self.batch_size, "batch_size")
        if self.batch_size_after_switch is not None:
            _positive_int(self.batch_size_after_switch, "batch_size_after_switch")
        _positive_int(self.steps_per_epoch, "steps_per_epoch")
        _positive_int(self.eval_batch_size, "eval_batch_size")
        if self.threads is not None:
            _positive_int(self.threads, "threads")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        resolve_device(self.device)
        get_workload(self.workload)


#: TrainConfig fields that ``--set key=value`` may change
TRAINER_KEYS = tuple(f.name for f in fields(TrainConfig)
                     if f.name not in ("workload", "optimizer", "optimizer_args", "workload_options"))


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:index]', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use 'auto' or 'cpu'")
    return resolved


@dataclass
class EpochMetrics:
    """What one epoch measured. Cumulative counts and times run from the start of training.

    ``train_loss`` is the full training objective at the end of the epoch (for test functions:
    f(x)); ``batch_loss`` the mean minibatch loss over the epoch's steps; ``grad_sq_norm`` the mean
    of ``||g(x_k; B_k)||^2`` over the epoch's steps (paper Eq. 3's quantity); ``wall_time`` the
    seconds spent training (evaluation excluded); ``phase`` the optimizer's phase at the last step
    of the epoch (an epoch-criterion switch decided at the end of epoch e shows from epoch e + 1).
    """

    epoch: int
    train_loss: float
    batch_loss: float
    test_loss: float | None
    test_accuracy: float | None
    grad_sq_norm: float
    phase: str
    switch_epoch: int | None
    switch_step: int | None
    switch_reason: str | None
    wall_time: float
    grad_evals: int
    closure_calls: int
    samples: int
    steps: int
    batch_size: int
    gap: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    config: TrainConfig
    history: list[EpochMetrics]
    time_to_target: float | None = None
    grad_evals_to_target: int | None = None
    stopped_early: bool = False

    @property
    def final(self) -> EpochMetrics:
        return self.history[-1]


class _Counter:
    """Counts closure calls, gradient evaluations and samples, and records the first ||g||^2 of a step."""

    def __init__(self) -> None:
        self.closure_calls = 0
        self.samples = 0

    def wrap(self, closure: Callable[[], torch.Tensor], batch_size: int, record: Callable[[torch.Tensor], None]):
        first = [True]

        def counted() -> torch.Tensor:
            loss = closure()
            self.closure_calls += 1
            self.samples += batch_size
            if first[0]:
                first[0] = False
                record(loss)
            return loss

        return counted


def _grad_sq_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.stack([g.detach().pow(2).sum() for g in grads]).sum()


class Trainer:
    """One training run, an epoch at a time, with exact checkpoints.

    ``state_dict()`` holds the model, the optimizer (phase, Adam moments, L-BFGS memory, criterion
    state), the data-order and noise generators, the counters and the history, so that a trainer
    restored with ``load_state_dict()`` continues exactly as the original would have (Ray Tune
    restores, Population Based Training clones).
    """

    def __init__(self, config: TrainConfig) -> None:
        config.validate()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.config = config
        self.device = resolve_device(config.device)
        self.kind = get_workload(config.workload).kind
        self.function = None
        if self.kind == "function":
            options = dict(config.workload_options)
            unknown = sorted(set(options) - {"dim", "noise", "start"})
            if unknown:
                raise ValueError(f"workload {config.workload!r} got unknown option(s) {unknown}; accepted: "
                                 "['dim', 'noise', 'start']")
            self.function = build_function(config.workload, seed=config.seed, device=self.device, **options)
            self.model: torch.nn.Module = self.function.module
            self.data = None
            self.loss_fn = None
            self.n_train = 0
        else:
            instance = build_supervised(config.workload, data_dir=config.data_dir, download=config.download,
                                        seed=config.seed, device=self.device, **config.workload_options)
            self.model, self.data, self.loss_fn = instance.model, instance.data, instance.loss_fn
            self.n_train = int(self.data.train_x.shape[0])
            for name in ("batch_size", "batch_size_after_switch"):
                size = getattr(config, name)
                if size is not None and size > self.n_train:
                    raise ValueError(f"{name}={size} is larger than the training set ({self.n_train} samples)")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config.optimizer, self.params, optimizer_arguments(config))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.counter = _Counter()
        self.result = TrainResult(config, [])
        self.wall = 0.0
        self.steps = 0

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return len(self.result.history)

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs or self.result.stopped_early

    def run_epoch(self) -> EpochMetrics:
        """Train one epoch, evaluate (untimed), append and return its metrics."""
        losses: list[torch.Tensor] = []
        grad_sq: list[torch.Tensor] = []

        def record(loss: torch.Tensor) -> None:
            losses.append(loss.detach())
            grad_sq.append(_grad_sq_norm(self.params))

        _sync(self.device)
        start = time.perf_counter()
        if self.kind == "function":
            self._function_epoch(record)
        else:
            self._supervised_epoch(record)
        phase = optimizer_phase(self.optimizer, self.config.optimizer)  # the phase this epoch ended in
        batch_size = _batch_size(self.config, self.optimizer) if self.kind != "function" else 1
        self.optimizer.end_epoch()
        _sync(self.device)
        self.wall += time.perf_counter() - start
        switch_epoch, switch_step, reason = _switch_info(self.optimizer)
        if self.kind == "function":
            with torch.no_grad():
                value = float(self.model())
            train_loss, test_loss, accuracy, gap = value, None, None, value - self.function.f_star
        else:
            train_loss, test_loss, accuracy = _evaluate_supervised(self.model, self.data, self.loss_fn,
                                                                   self.config.eval_batch_size)
            gap = None
        metrics = EpochMetrics(
            epoch=self.epoch, train_loss=train_loss, batch_loss=float(torch.stack(losses).mean()),
            test_loss=test_loss, test_accuracy=accuracy, grad_sq_norm=float(torch.stack(grad_sq).mean()),
            phase=phase, switch_epoch=switch_epoch, switch_step=switch_step, switch_reason=reason,
            wall_time=self.wall, grad_evals=self.counter.closure_calls, closure_calls=self.counter.closure_calls,
            samples=self.counter.samples, steps=self.steps, batch_size=batch_size, gap=gap,
        )
        result = self.result
        result.history.append(metrics)
        target = self.config.target_loss
        if target is not None and result.time_to_target is None and metrics.train_loss <= target:
            result.time_to_target, result.grad_evals_to_target = metrics.wall_time, metrics.grad_evals
        if not math.isfinite(metrics.train_loss):
            result.stopped_early = True
        return metrics

    def _supervised_epoch(self, record: Callable[[torch.Tensor], None]) -> None:
        model, data, loss_fn, optimizer = self.model, self.data, self.loss_fn, self.optimizer
        model.train()
        perm = torch.randperm(self.n_train, generator=self.generator).to(self.device)
        cursor = 0
        while cursor < self.n_train:
            size = _batch_size(self.config, optimizer)
            idx = perm[cursor:cursor + size]
            cursor += size
            xb, yb = data.train_x[idx], data.train_y[idx]

            def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                optimizer.zero_grad(set_to_none=False)
                loss = loss_fn(model, xb, yb)
                loss.backward()
                return loss

            optimizer.step(self.counter.wrap(closure, int(idx.numel()), record))
            self.steps += 1

    def _function_epoch(self, record: Callable[[torch.Tensor], None]) -> None:
        module, optimizer, instance = self.model, self.optimizer, self.function

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=False)
            loss = module()
            loss.backward()
            instance.add_noise()
            return loss

        for _ in range(self.config.steps_per_epoch):
            optimizer.step(self.counter.wrap(closure, 1, record))
            self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: model, optimizer, generators, counters, history."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "closure_calls": self.counter.closure_calls,
            "samples": self.counter.samples,
            "wall": self.wall,
            "steps": self.steps,
            "history": [m.as_dict() for m in self.result.history],
            "time_to_target": self.result.time_to_target,
            "grad_evals_to_target": self.result.grad_evals_to_target,
            "stopped_early": self.result.stopped_early,
        }
        if self.function is not None:
            state["noise_generator"] = self.function.generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if self.function is not None:
            self.function.generator.set_state(state["noise_generator"])
        self.counter.closure_calls, self.counter.samples = state["closure_calls"], state["samples"]
        self.wall, self.steps = state["wall"], state["steps"]
        self.result.history[:] = [EpochMetrics(**m) for m in state["history"]]
        self.result.time_to_target = state["time_to_target"]
        self.result.grad_evals_to_target = state["grad_evals_to_target"]
        self.result.stopped_early = state["stopped_early"]


def train(config: TrainConfig, on_epoch: Callable[[EpochMetrics], bool | None] | None = None) -> TrainResult:
    """Run one training run; ``on_epoch(metrics)`` may return True to stop early (e.g. pruning).

    Exceptions raised by ``on_epoch`` propagate (Optuna's ``TrialPruned`` does).
    """
    trainer = Trainer(config)
    while not trainer.done:
        metrics = trainer.run_epoch()
        if trainer.result.stopped_early:
            break
        if on_epoch is not None and on_epoch(metrics):
            trainer.result.stopped_early = True
    return trainer.result


def optimizer_arguments(config: TrainConfig) -> dict[str, Any]:
    """The optimizer's arguments, with the trainer's defaults for a switch the config leaves out.

    ``fuse_pv`` and ``adam_sgd`` without a ``switch`` switch at the middle epoch
    (``{"criterion": "epoch", "epoch": epochs // 2}``): the paper's epoch criterion, which it
    found best (Fig. 5), placed where the run's budget allows both phases to work.
    """
    arguments = dict(config.optimizer_args)
    if config.optimizer in ("fuse_pv", "adam_sgd") and "switch" not in arguments:
        arguments["switch"] = {"criterion": "epoch", "epoch": max(1, config.epochs // 2)}
    return arguments


def _switch_info(optimizer: Any) -> tuple[int | None, int | None, str | None]:
    return (getattr(optimizer, "switched_at_epoch", None), getattr(optimizer, "switched_at_step", None),
            getattr(optimizer, "switch_reason", None))


def _in_second_phase(optimizer: Any) -> bool:
    return getattr(optimizer, "phase", "adam") not in ("adam",)


def _batch_size(config: TrainConfig, optimizer: Any) -> int:
    """The minibatch size of the optimizer's current phase (paper Remark 2: larger after the switch)."""
    if config.batch_size_after_switch is not None and _in_second_phase(optimizer):
        return config.batch_size_after_switch
    return config.batch_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _evaluate_supervised(model: torch.nn.Module, data: Any, loss_fn: Any, chunk: int) -> tuple[float, float, float]:
    """Full training objective, test loss (with the same penalty) and test accuracy."""
    model.eval()

    def mean_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        total, correct = 0.0, 0
        for i in range(0, x.shape[0], chunk):
            logits = model(x[i:i + chunk])
            total += float(loss_fn.data_loss(logits, y[i:i + chunk])) * logits.shape[0]
            correct += int((logits.argmax(1) == y[i:i + chunk]).sum())
        return total / x.shape[0], correct

    penalty = float(loss_fn.penalty(model))
    train_loss, _ = mean_loss(data.train_x, data.train_y)
    test_loss, correct = mean_loss(data.test_x, data.test_y)
    return train_loss + penalty, test_loss + penalty, correct / data.test_x.shape[0]



def config_from_mapping(values: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from a flat dict of its fields (unknown keys are a one-line ValueError)."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown trainer setting(s) {unknown}; accepted: {sorted(names)}")
    return TrainConfig(**values)
