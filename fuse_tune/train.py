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
from fuse_tune.workloads.interface import Data, Metric, Problem, check_loss_value, first_batch, split_size

__all__ = ["TrainConfig", "EpochMetrics", "TrainResult", "Trainer", "train", "resolve_device", "TRAINER_KEYS",
           "target_values"]


@dataclass
class TrainConfig:
    """Settings of one training run (everything except the optimizer's own arguments).

    Attributes:
        workload: a registered workload name (``fuse-tune list``) or a user's builder, ``package.module:builder``.
        workload_path: folders the builder's module is imported from first (e.g. the study file's folder).
        optimizer: a registered optimizer name.
        optimizer_args: keyword arguments of the optimizer.
        workload_options: options of the workload (e.g. ``l2``, ``hidden_sizes``, ``noise``).
        epochs: epochs to run.
        batch_size: minibatch size before the switch (samples).
        batch_size_after_switch: minibatch size once the optimizer is in its second phase
            (``None``: unchanged).
        steps_per_epoch: steps that make an "epoch" on a test function (no data set there), and with
            ``full_batch``.
        steps_per_epoch_after_switch: steps that make an epoch once the optimizer is in its second phase
            (``None``: unchanged). One step of ``torch.optim.LBFGS(max_iter=20)`` is up to 25 evaluations where an
            Adam step is one: 5 steps after the switch keep an epoch near 100 evaluations for 100 Adam steps before.
        grad_eval_budget: stop once this many closure calls (gradient evaluations) were made, mid-epoch if need be
            (the last epoch is then shorter): methods compared at equal evaluations, not equal steps
            (``torch.optim.LBFGS`` with ``max_iter=20`` makes up to 25 calls a step). ``None``: epochs only.
        full_batch: every step evaluates the whole training split (a deterministic objective: a PINN's fixed
            collocation points); an "epoch" is then ``steps_per_epoch`` steps, and ``batch_size`` is not used.
        seed: initial weights and data order.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda[:i]"``.
        threads: torch CPU threads (``None``: leave torch's default).
        data_dir: the data folder for torchvision data sets (not needed for digits).
        download: let torchvision download missing data sets.
        eval_batch_size: samples per forward pass during evaluation.
        target_loss: when set, the wall time and gradient evaluations at which the full training
            loss first fell to this value are reported.
        metric_targets: measures to time, ``{"test_l2re": [0.1, 0.01]}``: for each target, the epoch, gradient
            evaluations and training wall time at which the measure (evaluated after each epoch, so to within an
            epoch) first reached it, at or below for a minimized measure, at or above for a maximized one
            (``TrainResult.reached``, keyed ``"test_l2re<=0.1"``).
        evaluate_test: evaluate the test split after each epoch too (a study's trials select on the
            validation split and leave the test split alone: ``False``).
        num_workers: DataLoader worker processes for workloads whose data is a ``Dataset`` (0: in process).
    """

    workload: str = "digits-logreg"
    optimizer: str = "fuse_pv"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    workload_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    batch_size_after_switch: int | None = None
    steps_per_epoch: int = 50
    steps_per_epoch_after_switch: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    data_dir: str | None = None
    download: bool = False
    eval_batch_size: int = 4096
    target_loss: float | None = None
    metric_targets: dict[str, Any] = field(default_factory=dict)
    evaluate_test: bool = True
    num_workers: int = 0
    full_batch: bool = False
    grad_eval_budget: int | None = None
    workload_path: tuple[str, ...] = ()

    def validate(self) -> None:
        _positive_int(self.epochs, "epochs")
        _positive_int(self.batch_size, "batch_size")
        if self.batch_size_after_switch is not None:
            _positive_int(self.batch_size_after_switch, "batch_size_after_switch")
        _positive_int(self.steps_per_epoch, "steps_per_epoch")
        if self.steps_per_epoch_after_switch is not None:
            _positive_int(self.steps_per_epoch_after_switch, "steps_per_epoch_after_switch")
        _positive_int(self.eval_batch_size, "eval_batch_size")
        if self.threads is not None:
            _positive_int(self.threads, "threads")
        if self.grad_eval_budget is not None:
            _positive_int(self.grad_eval_budget, "grad_eval_budget")
        target_values(self.metric_targets)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.full_batch, bool):
            raise ValueError(f"full_batch must be true or false, got {self.full_batch!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        resolve_device(self.device)
        get_workload(self.workload, self.workload_path)


#: TrainConfig fields that ``--set key=value`` may change
TRAINER_KEYS = tuple(f.name for f in fields(TrainConfig)
                     if f.name not in ("workload", "optimizer", "optimizer_args", "workload_options", "workload_path"))


def target_values(targets: Any) -> dict[str, list[float]]:
    """``metric_targets`` as ``{measure: [targets]}``; a one-line ``ValueError`` naming the field otherwise."""
    if not isinstance(targets, Mapping):
        raise ValueError(f"metric_targets must map a measure to a target or a list of them, got {targets!r}")
    out: dict[str, list[float]] = {}
    for measure, values in targets.items():
        values = values if isinstance(values, list | tuple) else [values]
        if not values or any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                             for v in values):
            raise ValueError(f"metric_targets.{measure} must be a finite number or a list of them, got {values!r}")
        out[str(measure)] = [float(v) for v in values]
    return out


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
    f(x)); ``val_loss`` and ``test_loss`` the same objective (loss plus penalty) on the validation and
    test splits (``None`` on test functions, and ``test_loss`` when the test split is not evaluated);
    ``scores`` the workload's metric on those splits, keyed ``val_<metric>`` and ``test_<metric>``
    (``{"val_accuracy": ..., "test_accuracy": ...}``); ``batch_loss`` the mean minibatch loss over the
    epoch's steps; ``grad_sq_norm`` the mean
    of ``||g(x_k; B_k)||^2`` over the epoch's steps (paper Eq. 3's quantity); ``wall_time`` the
    seconds spent training (evaluation excluded); ``phase`` the optimizer's phase at the last step
    of the epoch (an epoch-criterion switch decided at the end of epoch e shows from epoch e + 1).
    """

    epoch: int
    train_loss: float
    batch_loss: float
    val_loss: float | None
    test_loss: float | None
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
    scores: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def value(self, key: str) -> float | None:
        """A field (``train_loss``) or a score (``val_accuracy``) by name; ``None`` when not measured."""
        if key in self.scores:
            return self.scores[key]
        return getattr(self, key) if key in _EPOCH_FIELDS and key != "scores" else None


_EPOCH_FIELDS = frozenset(f.name for f in fields(EpochMetrics))


@dataclass
class TrainResult:
    config: TrainConfig
    history: list[EpochMetrics]
    time_to_target: float | None = None
    grad_evals_to_target: int | None = None
    stopped_early: bool = False
    #: ``"<measure><=<target>"`` (or ``>=``) -> ``{"epoch", "grad_evals", "wall_time"}`` when it was first reached
    reached: dict[str, dict[str, float]] = field(default_factory=dict)
    #: every key ``reached`` may get (the config's ``metric_targets``), reached or not
    targets: list[str] = field(default_factory=list)

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
        self.kind = get_workload(config.workload, config.workload_path).kind
        self.function = None
        if self.kind == "function":
            options = dict(config.workload_options)
            unknown = sorted(set(options) - {"dim", "noise", "start"})
            if unknown:
                raise ValueError(f"workload {config.workload!r} got unknown option(s) {unknown}; accepted: "
                                 "['dim', 'noise', 'start']")
            self.function = build_function(config.workload, seed=config.seed, device=self.device, **options)
            self.model: torch.nn.Module = self.function.module
            self.problem: Problem | None = None
            self.n_train = 0
        else:
            instance = build_supervised(config.workload, data_dir=config.data_dir, download=config.download,
                                        seed=config.seed, device=self.device, search_path=config.workload_path,
                                        **config.workload_options)
            self.model, self.problem = instance.model, instance.problem
            self.workload_name = instance.workload.name
            self.n_train = split_size(self.problem.train)
            self._whole_train: tuple[torch.Tensor, torch.Tensor] | None = None
            for name in ("batch_size", "batch_size_after_switch") if not config.full_batch else ():
                size = getattr(config, name)
                if size is not None and size > self.n_train:
                    raise ValueError(f"{name}={size} is larger than the training set ({self.n_train} samples)")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config.optimizer, self.params, optimizer_arguments(config))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.counter = _Counter()
        self.result = TrainResult(config, [])
        self.result.targets = list(self._targets())
        self.wall = 0.0
        self.steps = 0
        self._loss_checked = False

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return len(self.result.history)

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs or self.result.stopped_early or self._budget_spent()

    def _budget_spent(self) -> bool:
        budget = self.config.grad_eval_budget
        return budget is not None and self.counter.closure_calls >= budget

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
        batch_size = (1 if self.kind == "function" else self.n_train if self.config.full_batch
                      else _batch_size(self.config, self.optimizer))
        self.optimizer.end_epoch()
        _sync(self.device)
        self.wall += time.perf_counter() - start
        switch_epoch, switch_step, reason = _switch_info(self.optimizer)
        if self.kind == "function":
            with torch.no_grad():
                value = float(self.model())
            train_loss, val_loss, test_loss, scores = value, None, None, {}
            gap = value - self.function.f_star
        else:
            train_loss, val_loss, test_loss, scores = self._evaluate()
            gap = None
        scores.update(_switch_statistics(self.optimizer))
        metrics = EpochMetrics(
            epoch=self.epoch, train_loss=train_loss, batch_loss=float(torch.stack(losses).mean()),
            val_loss=val_loss, test_loss=test_loss, grad_sq_norm=float(torch.stack(grad_sq).mean()),
            phase=phase, switch_epoch=switch_epoch, switch_step=switch_step, switch_reason=reason,
            wall_time=self.wall, grad_evals=self.counter.closure_calls, closure_calls=self.counter.closure_calls,
            samples=self.counter.samples, steps=self.steps, batch_size=batch_size, gap=gap, scores=scores,
        )
        result = self.result
        result.history.append(metrics)
        target = self.config.target_loss
        if target is not None and result.time_to_target is None and metrics.train_loss <= target:
            result.time_to_target, result.grad_evals_to_target = metrics.wall_time, metrics.grad_evals
        self._record_targets(metrics)
        if not math.isfinite(metrics.train_loss):
            result.stopped_early = True
        return metrics

    def _targets(self) -> dict[str, tuple[str, float, bool]]:
        """``metric_targets`` as ``{"test_l2re<=0.1": (measure, target, maximize)}``."""
        return {f"{measure}{'>=' if maximize else '<='}{target:g}": (measure, target, maximize)
                for measure, targets in target_values(self.config.metric_targets).items()
                for maximize in (self._direction(measure) == "maximize",) for target in targets}

    def _record_targets(self, metrics: EpochMetrics) -> None:
        """First epoch at which each of ``metric_targets`` was reached (TrainResult.reached)."""
        for key, (measure, target, maximize) in self._targets().items():
            value = metrics.value(measure)
            if key in self.result.reached or value is None or not math.isfinite(value):
                continue
            if value >= target if maximize else value <= target:
                self.result.reached[key] = {"epoch": metrics.epoch, "grad_evals": metrics.grad_evals,
                                            "wall_time": metrics.wall_time}

    def _direction(self, measure: str) -> str:
        """The workload metric's direction for ``val_<metric>``/``test_<metric>``; minimize for losses."""
        metric = self.problem.metric if self.problem is not None else None
        if metric is not None and measure.split("_", 1)[-1] == metric.name:
            return metric.direction
        return "minimize"

    def _supervised_epoch(self, record: Callable[[torch.Tensor], None]) -> None:
        """One pass over the training split in a seeded order; the batch size is the current phase's.

        In-memory tensors are sliced directly. A Dataset is read through a DataLoader over the same index
        order; when the batch size changes mid-epoch (the switch) the loader is rebuilt from the next unread
        index, so no batch of the old size is drawn after the switch, however far the workers read ahead."""
        if self.config.full_batch:
            self._full_batch_epoch(record)
            return
        perm = torch.randperm(self.n_train, generator=self.generator)
        self.model.train()
        cursor = 0
        train = self.problem.train
        while cursor < self.n_train and not self._budget_spent():
            size = _batch_size(self.config, self.optimizer)
            if isinstance(train, tuple):
                idx = perm[cursor:cursor + size].to(self.device)
                self._step(train[0][idx], train[1][idx], record)
                cursor += int(idx.numel())
                continue
            for inputs, targets in _loader(train, perm[cursor:], size, self.config.num_workers, self.device):
                self._step(_move(inputs, self.device), _move(targets, self.device), record)
                cursor += len(targets)
                if _batch_size(self.config, self.optimizer) != size or self._budget_spent():
                    break

    def _full_batch_epoch(self, record: Callable[[torch.Tensor], None]) -> None:
        """``steps_per_epoch`` steps, each on the whole training split (a Dataset is collated once, on the device)."""
        if self._whole_train is None:
            train = self.problem.train
            if isinstance(train, tuple):
                self._whole_train = train
            else:
                inputs, targets = first_batch(train, len(train))
                self._whole_train = (_move(inputs, self.device), _move(targets, self.device))
        self.model.train()
        steps = 0
        while steps < _steps_per_epoch(self.config, self.optimizer) and not self._budget_spent():
            self._step(*self._whole_train, record)
            steps += 1

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor, record: Callable[[torch.Tensor], None]) -> None:
        """One optimizer step whose closure evaluates the objective on this minibatch (every call the same)."""
        model, problem, optimizer = self.model, self.problem, self.optimizer

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=False)
            loss = problem.objective(model, inputs, targets)
            if not self._loss_checked:
                check_loss_value(loss, self.workload_name)
                self._loss_checked = True
            loss.backward()
            return loss

        optimizer.step(self.counter.wrap(closure, int(targets.shape[0]), record))
        self.steps += 1

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float, float | None, dict[str, float]]:
        """Training objective, validation and test objective, and the metric on validation and test (untimed)."""
        problem, chunk = self.problem, self.config.eval_batch_size
        self.model.eval()
        penalty = float(problem.penalty(self.model)) if problem.penalty is not None else 0.0
        train_loss, _ = _mean_loss_and_metric(self.model, problem.train, problem.loss, None, chunk, self.device)
        val_loss, val_score = _mean_loss_and_metric(self.model, problem.validation, problem.loss, problem.metric,
                                                    chunk, self.device)
        scores: dict[str, float] = {}
        test_loss = None
        if problem.metric is not None:
            scores[f"val_{problem.metric.name}"] = val_score
        if self.config.evaluate_test and problem.test is not None:
            test_loss, test_score = _mean_loss_and_metric(self.model, problem.test, problem.loss, problem.metric,
                                                          chunk, self.device)
            test_loss += penalty
            if problem.metric is not None:
                scores[f"test_{problem.metric.name}"] = test_score
        if problem.diagnostics is not None:
            measured = problem.diagnostics(self.model, problem.train)
            scores.update({str(key): float(value) for key, value in measured.items()})
        return train_loss + penalty, val_loss + penalty, test_loss, scores

    def _function_epoch(self, record: Callable[[torch.Tensor], None]) -> None:
        module, optimizer, instance = self.model, self.optimizer, self.function

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=False)
            loss = module()
            loss.backward()
            instance.add_noise()
            return loss

        steps = 0
        while steps < _steps_per_epoch(self.config, optimizer) and not self._budget_spent():
            optimizer.step(self.counter.wrap(closure, 1, record))
            self.steps += 1
            steps += 1

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
            "reached": dict(self.result.reached),
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
        self.result.reached = dict(state.get("reached", {}))
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

    ``fuse_pv``, ``adam_sgd`` and ``adam_lbfgs`` without a ``switch`` switch at the middle epoch
    (``{"criterion": "epoch", "epoch": epochs // 2}``): the paper's epoch criterion, which it
    found best (Fig. 5), placed where the run's budget allows both phases to work. ``fuse_pv`` and
    ``fuse`` get ``deterministic_closure`` when the objective is the same at every step
    (:func:`_deterministic_objective`), unless the settings say otherwise.
    """
    arguments = dict(config.optimizer_args)
    if config.optimizer in ("fuse_pv", "adam_sgd", "adam_lbfgs") and "switch" not in arguments:
        arguments["switch"] = {"criterion": "epoch", "epoch": max(1, config.epochs // 2)}
    if config.optimizer in ("fuse_pv", "fuse") and "deterministic_closure" not in arguments:
        arguments["deterministic_closure"] = _deterministic_objective(config)
    return arguments


def _deterministic_objective(config: TrainConfig) -> bool:
    """Whether every closure call evaluates the same function: a full-batch run, or a test function without
    gradient noise. Then FusePV's and Fuse's L-BFGS phase reuse the evaluation of the point their line search
    accepted (``deterministic_closure``): one closure call per iteration fewer."""
    if config.full_batch:
        return True
    workload = get_workload(config.workload, config.workload_path)
    return workload.kind == "function" and float(config.workload_options.get("noise", workload.defaults.get(
        "noise", 0.0)) or 0.0) == 0.0


#: the per-epoch score holding a switch criterion's own statistic, for criteria that have one (``plateau``: its
#: progress ratio; ``probe``: its last gain ratio), so that when and on what value it decided is in the records;
#: the parts of an ``any``/``all`` criterion (``auto``) have one each, ``switch_statistic.<part>``
SWITCH_STATISTIC = "switch_statistic"


def _switch_statistics(optimizer: Any) -> dict[str, float]:
    criterion = getattr(optimizer, "criterion", None)
    parts = getattr(criterion, "criteria", None)
    named = ([(f"{SWITCH_STATISTIC}.{part.name}", part) for part in parts] if parts is not None
             else [(SWITCH_STATISTIC, criterion)])
    values = {key: getattr(part, "statistic", None) for key, part in named}
    return {key: float(value) for key, value in values.items() if value is not None and math.isfinite(value)}


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


def _steps_per_epoch(config: TrainConfig, optimizer: Any) -> int:
    """The steps that make an epoch (full batch, test functions) in the optimizer's current phase."""
    if config.steps_per_epoch_after_switch is not None and _in_second_phase(optimizer):
        return config.steps_per_epoch_after_switch
    return config.steps_per_epoch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loader(data: Data, order: torch.Tensor, batch_size: int, num_workers: int, device: torch.device) -> Any:
    """A DataLoader over ``data`` reading ``order`` in batches of ``batch_size`` (pinned memory on CUDA)."""
    from torch.utils.data import DataLoader

    batches = [chunk.tolist() for chunk in order.split(batch_size)]
    return DataLoader(data, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=False)


def _move(batch: Any, device: torch.device) -> Any:
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def _batches(data: Data, chunk: int, device: torch.device) -> Any:
    """``(inputs, targets)`` chunks of a split, in order: tensor slices or DataLoader batches."""
    if isinstance(data, tuple):
        inputs, targets = data
        for start in range(0, inputs.shape[0], chunk):
            yield inputs[start:start + chunk], targets[start:start + chunk]
        return
    order = torch.arange(len(data))
    for inputs, targets in _loader(data, order, chunk, 0, device):
        yield _move(inputs, device), _move(targets, device)


@torch.no_grad()
def _mean_loss_and_metric(model: torch.nn.Module, data: Data, loss: Callable[..., torch.Tensor],
                          metric: Metric | None, chunk: int, device: torch.device) -> tuple[float, float]:
    """``(sum_c n_c loss_c / N, sum_c n_c metric_c / N)`` over chunks ``c`` of ``n_c`` samples (both batch means); a
    metric with ``finish`` is ``finish(sum_c sums_c)`` instead."""
    total_loss, total_metric, count = 0.0, 0.0, 0
    sums: torch.Tensor | None = None
    for inputs, targets in _batches(data, chunk, device):
        outputs = model(inputs)
        n = int(targets.shape[0])
        total_loss += float(loss(outputs, targets)) * n
        if metric is not None and metric.finish is not None:
            batch_sums = metric.fn(outputs, targets).detach().to("cpu", torch.float64)
            sums = batch_sums if sums is None else sums + batch_sums
        elif metric is not None:
            total_metric += float(metric.fn(outputs, targets)) * n
        count += n
    if metric is None:
        return total_loss / count, math.nan
    return total_loss / count, (float(metric.finish(sums)) if metric.finish is not None else total_metric / count)


def config_from_mapping(values: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from a flat dict of its fields (unknown keys are a one-line ValueError)."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown trainer setting(s) {unknown}; accepted: {sorted(names)}")
    return TrainConfig(**values)
