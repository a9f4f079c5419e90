"""Switchover criteria for FUSE-PV (paper Sec. II-C, Algorithm 4).

A criterion decides *when* the optimizer leaves the Adam phase for the L-BFGS phase. It is a small
object with its own ``state_dict``; the optimizer feeds it and asks it, and it never touches
parameters.

Protocol (what :class:`fuse_optim.FusePV` calls):

* ``observe_step(loss, grad_sq_norm)`` after every Adam step. ``loss`` is the closure's loss and
  ``grad_sq_norm`` is ``||g_k||^2`` (both 0-dim tensors on the parameters' device, or ``None``
  when not needed). Implementations accumulate on the device and read values back to the host at
  most once per window, so the Adam phase stays free of per-step host synchronisation.
* ``end_epoch()`` once at the end of every epoch (the training loop calls
  :meth:`FusePV.end_epoch`, which forwards here). Epoch-granular criteria decide here.
* ``ready(step, epoch)`` before every step: ``True`` means switch now. ``step`` counts completed
  optimizer steps and ``epoch`` completed epochs.
* ``reason`` names what fired, e.g. ``"grad_norm(mean ||g||^2=8.1e-04 <= zeta=1e-03)"``.

Criteria can be built from the plain dicts that study files use::

    {"criterion": "epoch", "epoch": 5}         # switch after 5 completed epochs
    {"criterion": "step", "step": 200}         # switch after 200 steps; step 0 = L-BFGS from the start
    {"criterion": "grad_norm", "zeta": 1e-3}   # Eq. 3 over the last epoch (or "window": W steps)
    {"criterion": "loss_change", "sigma": 1e-4}  # Eq. 4 on epoch-mean loss (or "window": W steps)
    {"criterion": "plateau"}                   # progress <= 0.1 x Adam's best progress (no threshold to scale)
    {"criterion": "auto"}                      # the first of probe and plateau, at their defaults
    {"criterion": "probe"}                     # switch when a short L-BFGS trial beats Adam's pace (ratio 1)
    {"criterion": "absolute_rules"}            # opifex's absolute thresholds after 1,000 steps (a baseline)
    {"criterion": "any", "of": [..., ...]}     # first of several
    {"criterion": "all", "of": [..., ...]}     # all of several
    {"criterion": "never"}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "SwitchCriterion",
    "EpochCriterion",
    "StepCriterion",
    "GradNormCriterion",
    "LossChangeCriterion",
    "PlateauCriterion",
    "ProbeCriterion",
    "AbsoluteRulesCriterion",
    "AnyOf",
    "AllOf",
    "Never",
    "make_criterion",
    "AUTO",
    "probe_criterion",
    "CRITERIA",
    "SwitchState",
    "SwitchedOptimizer",
]


class SwitchCriterion:
    """Base class: never fires. Subclasses override the hooks they need."""

    name = "criterion"
    #: whether the optimizer must compute ``||g||^2`` each Adam step for this criterion
    needs_grad_norm = False
    #: whether the criterion reads the closure's loss
    needs_loss = False
    #: whether the criterion decides on a trial of the L-BFGS phase that the optimizer runs for it
    #: (:class:`ProbeCriterion`; only :class:`fuse_optim.FusePV` runs one)
    needs_probe = False

    def observe_step(self, loss: torch.Tensor | None, grad_sq_norm: torch.Tensor | None) -> None:
        """Record one Adam step's loss and squared gradient norm (device tensors, no sync)."""

    def end_epoch(self) -> None:
        """Called once at the end of every epoch by the training loop (via the optimizer)."""

    def ready(self, step: int, epoch: int) -> bool:
        """True when the optimizer should switch to L-BFGS before taking step ``step``."""
        return False

    @property
    def reason(self) -> str:
        return self.name

    def config(self) -> dict[str, Any]:
        """The plain dict this criterion is built from (inverse of :func:`make_criterion`)."""
        return {"criterion": self.name}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "criterion")
        return f"{type(self).__name__}({args})"


def _check_nonnegative_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{argument} must be an integer >= 0, got {value!r}")
    return value


def _check_positive_float(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{argument} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_window(value: Any, argument: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be None (one epoch) or an integer >= 1, got {value!r}")
    return value


class Never(SwitchCriterion):
    """Stay in the Adam phase forever (FUSE-PV degenerates to Adam)."""

    name = "never"


class StepCriterion(SwitchCriterion):
    """Switch after ``step`` completed optimizer steps (``step=0``: L-BFGS from the first step)."""

    name = "step"

    def __init__(self, step: int) -> None:
        self.step = _check_nonnegative_int(step, "step")

    def ready(self, step: int, epoch: int) -> bool:
        return step >= self.step

    @property
    def reason(self) -> str:
        return f"step(step >= {self.step})"

    def config(self) -> dict[str, Any]:
        return {"criterion": "step", "step": self.step}


class EpochCriterion(SwitchCriterion):
    """Switch after ``epoch`` completed epochs: the paper's simple iteration (epoch) criterion.

    Epochs are counted by :meth:`FusePV.end_epoch`; ``epoch=5`` runs epochs 0-4 with Adam and
    epoch 5 onward with L-BFGS.
    """

    name = "epoch"

    def __init__(self, epoch: int) -> None:
        self.epoch = _check_nonnegative_int(epoch, "epoch")

    def ready(self, step: int, epoch: int) -> bool:
        return epoch >= self.epoch

    @property
    def reason(self) -> str:
        return f"epoch(epoch >= {self.epoch})"

    def config(self) -> dict[str, Any]:
        return {"criterion": "epoch", "epoch": self.epoch}


class _WindowedMean:
    """Device-side running sum of a scalar stream, read back once per window or epoch."""

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, value: torch.Tensor) -> None:
        self.total = self.total + value.detach().to(torch.float64)
        self.count += 1

    def pop_mean(self) -> float | None:
        if self.count == 0:
            return None
        mean = float(self.total) / self.count
        self.total, self.count = 0.0, 0
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {"total": float(self.total), "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])


class _WindowedCriterion(SwitchCriterion):
    """A criterion deciding on the mean of one per-step quantity (the loss, or ``||g||^2``) over each epoch
    (``window=None``, in :meth:`end_epoch`) or each ``window`` steps (one host read-back per window); once it
    fired it stays fired. Subclasses say what they observe and decide in :meth:`_decide` on the mean, or (plateau,
    probe) keep a :class:`_TrendAccumulator` in ``_acc`` and decide in :meth:`_decide_on_mean` on the whole trend."""

    #: what :meth:`observe_step` accumulates: ``"loss"`` or ``"grad_sq_norm"``
    observes = "loss"

    def _init_window(self, window: int | None) -> None:
        self.window = _check_window(window, "window")
        self._acc = _WindowedMean()
        self.fired = False

    def observe_step(self, loss: torch.Tensor | None, grad_sq_norm: torch.Tensor | None) -> None:
        value = loss if self.observes == "loss" else grad_sq_norm
        if value is None:
            needed = "the closure's loss on" if self.observes == "loss" else "the squared gradient norm of"
            raise RuntimeError(f"{type(self).__name__} needs {needed} every step")
        self._acc.add(value)
        if self.window is not None and self._acc.count >= self.window:
            self._decide_on_mean()

    def end_epoch(self) -> None:
        if self.window is None:
            self._decide_on_mean()

    def _decide_on_mean(self) -> None:
        mean = self._acc.pop_mean()
        if mean is not None:
            self._decide(mean)

    def _decide(self, mean: float) -> None:
        raise NotImplementedError

    def ready(self, step: int, epoch: int) -> bool:
        return self.fired


class GradNormCriterion(_WindowedCriterion):
    """Gradient-norm criterion, paper Eq. 3: switch when ``(1/K) sum_k ||g(x_k)||^2 <= zeta``.

    The mean runs over the steps of the last completed epoch (``window=None``, decided in
    :meth:`end_epoch`) or over the last ``window`` steps (decided every ``window`` steps, one host
    read-back per window). ``g`` is the minibatch gradient the Adam step used.
    """

    name = "grad_norm"
    needs_grad_norm = True
    observes = "grad_sq_norm"

    def __init__(self, zeta: float, window: int | None = None) -> None:
        self.zeta = _check_positive_float(zeta, "zeta")
        self._init_window(window)
        self.last_mean: float | None = None

    def _decide(self, mean: float) -> None:
        self.last_mean = mean
        self.fired = self.fired or mean <= self.zeta

    @property
    def reason(self) -> str:
        shown = "nan" if self.last_mean is None else f"{self.last_mean:.3g}"
        return f"grad_norm(mean ||g||^2={shown} <= zeta={self.zeta:g})"

    def config(self) -> dict[str, Any]:
        return {"criterion": "grad_norm", "zeta": self.zeta, "window": self.window}

    def state_dict(self) -> dict[str, Any]:
        return {"acc": self._acc.state_dict(), "last_mean": self.last_mean, "fired": self.fired}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._acc.load_state_dict(state["acc"])
        self.last_mean, self.fired = state["last_mean"], bool(state["fired"])


class LossChangeCriterion(_WindowedCriterion):
    """Loss-change criterion, paper Eq. 4: switch when ``|f_k - f_{k-1}| <= sigma``.

    Minibatch losses are noisy, so ``f_k`` is a smoothed loss: the mean closure loss over the
    last completed epoch (``window=None``) or over the last ``window`` steps. With
    ``relative=True`` the test is ``|f_k - f_{k-1}| <= sigma * |f_{k-1}|`` (scale-free).
    """

    name = "loss_change"
    needs_loss = True

    def __init__(self, sigma: float, window: int | None = None, relative: bool = False) -> None:
        self.sigma = _check_positive_float(sigma, "sigma")
        if not isinstance(relative, bool):
            raise ValueError(f"relative must be True or False, got {relative!r}")
        self.relative = relative
        self._init_window(window)
        self.previous: float | None = None
        self.last_change: float | None = None

    def _decide(self, current: float) -> None:
        if self.previous is not None and math.isfinite(current):
            self.last_change = abs(current - self.previous)
            bound = self.sigma * abs(self.previous) if self.relative else self.sigma
            self.fired = self.fired or self.last_change <= bound
        self.previous = current

    @property
    def reason(self) -> str:
        shown = "nan" if self.last_change is None else f"{self.last_change:.3g}"
        kind = "relative " if self.relative else ""
        return f"loss_change(|f_k - f_k-1|={shown} <= {kind}sigma={self.sigma:g})"

    def config(self) -> dict[str, Any]:
        return {"criterion": "loss_change", "sigma": self.sigma, "window": self.window, "relative": self.relative}

    def state_dict(self) -> dict[str, Any]:
        return {
            "acc": self._acc.state_dict(),
            "previous": self.previous,
            "last_change": self.last_change,
            "fired": self.fired,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._acc.load_state_dict(state["acc"])
        self.previous, self.last_change = state["previous"], state["last_change"]
        self.fired = bool(state["fired"])


class PlateauCriterion(_WindowedCriterion):
    """Switch once Adam's progress has flattened relative to its own best: no scale-dependent threshold.

    With ``f_e`` the mean closure loss over the ``n_e`` Adam steps of epoch ``e`` (or of each ``window`` of steps),
    the progress of a period is ``delta_e = (f_{e-1} - f_e) / ((n_{e-1} + n_e) / 2)``, per Adam step between the
    two means (so steps that were not Adam's, e.g. a ``probe``'s, do not read as lost progress), and the best
    progress so far ``delta*_e = max_{j <= e} delta_j``. Each mean has the standard error ``s_e / sqrt(n_e)``,
    ``s_e^2`` the scatter of the period's losses about their least-squares line against the step (minibatch
    noise, not the trend), so ``delta_e`` has ``se_e = sqrt(s_{e-1}^2 / n_{e-1} + s_e^2 / n_e) / ((n_{e-1} + n_e)
    / 2)``. The criterion fires at the end of the first period ``e >= min_periods`` with

        ``(delta_e + 2 se_e) <= ratio * delta*_e``    (and ``delta*_e > 0``),

    i.e. when the smoothed loss now falls at most ``ratio`` times as fast as it fell in Adam's best period, even
    allowing two standard errors of noise: the fast, first-order part of the descent is over, and the L-BFGS phase
    (paper Alg. 4) takes the rest. On a full batch ``s_e`` is the loss's wiggle about a straight descent, small
    against ``delta_e``; on small minibatch epochs it keeps two noisy means from passing for a flat loss. The
    statistic ``(delta_e + 2 se_e) / delta*_e`` is dimensionless and invariant to ``f -> a f + b`` (``a > 0``), so
    one default ``ratio`` is meant to serve every model, unlike Eq. 3's ``zeta`` or Eq. 4's ``sigma``. A period in
    which the loss rose (``delta_e < 0``) counts as flat. ``min_periods`` (default 2) keeps the first period's
    decrease, which starts from the initial loss, from deciding alone.

    :attr:`statistic` is the last ``(delta_e + 2 se_e) / delta*_e`` (``None`` before two periods): trainers log
    it each epoch, and :attr:`reason` reports it at the switch.
    """

    name = "plateau"
    needs_loss = True

    def __init__(self, ratio: float = 0.1, window: int | None = None, min_periods: int = 2) -> None:
        self.ratio = _check_positive_float(ratio, "ratio")
        if self.ratio >= 1:
            raise ValueError(f"ratio must be a number in (0, 1), got {ratio!r}")
        if isinstance(min_periods, bool) or not isinstance(min_periods, int) or min_periods < 1:
            raise ValueError(f"min_periods must be an integer >= 1, got {min_periods!r}")
        self.min_periods = min_periods
        self._init_window(window)
        self._acc = _TrendAccumulator()  # the mean, and the scatter about the period's trend line
        self.previous: _Trend | None = None
        self.best_progress = 0.0
        self.periods = 0
        self.statistic: float | None = None

    def _decide_on_mean(self) -> None:
        trend = self._acc.pop()
        if trend is None or self.fired or not math.isfinite(trend.mean):
            return  # after firing the statistic stays the value it fired on
        previous, self.previous = self.previous, trend
        if previous is None:
            return
        self.periods += 1
        steps = 0.5 * (previous.count + trend.count)
        progress = (previous.mean - trend.mean) / steps
        error = math.sqrt(previous.mean_variance + trend.mean_variance) / steps
        self.best_progress = max(self.best_progress, progress)
        if self.best_progress > 0:
            self.statistic = (progress + PLATEAU_ERRORS * error) / self.best_progress
            if self.periods >= self.min_periods and self.statistic <= self.ratio:
                self.fired = True

    @property
    def reason(self) -> str:
        shown = "nan" if self.statistic is None else f"{self.statistic:.3g}"
        return f"plateau((progress + 2 s.e.) / best progress = {shown} <= ratio={self.ratio:g})"

    def config(self) -> dict[str, Any]:
        return {"criterion": "plateau", "ratio": self.ratio, "window": self.window, "min_periods": self.min_periods}

    def state_dict(self) -> dict[str, Any]:
        return {"acc": self._acc.state_dict(), "previous": None if self.previous is None else asdict(self.previous),
                "best_progress": self.best_progress,
                "periods": self.periods, "statistic": self.statistic, "fired": self.fired}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._acc.load_state_dict(state["acc"])
        self.previous = None if state["previous"] is None else _Trend(**state["previous"])
        self.best_progress = float(state["best_progress"])
        self.periods, self.statistic, self.fired = int(state["periods"]), state["statistic"], bool(state["fired"])


@dataclass(frozen=True)
class _Trend:
    """A period's losses summarised: ``count`` steps, their ``mean``, the least-squares ``slope`` against the step,
    the ``residual_variance`` about that line, and ``s_tt = sum (t - mean t)^2``."""

    count: int
    mean: float
    slope: float
    residual_variance: float
    s_tt: float = math.nan

    @property
    def slope_error(self) -> float:
        return math.sqrt(self.residual_variance / self.s_tt)

    @property
    def mean_variance(self) -> float:
        """The variance of :attr:`mean` (the residual variance over the count)."""
        return self.residual_variance / self.count


#: the plateau's progress is taken this many standard errors above its estimate: minibatch noise in two epoch means
#: must not pass for a flat loss
PLATEAU_ERRORS = 2.0

#: Adam's pace is taken this many standard errors above its least-squares estimate: a probe must beat what Adam
#: plausibly does, not a noisy slope that happened to come out flat
ADAM_PACE_ERRORS = 2.0


class _TrendAccumulator:
    """Device-side sums for the least-squares line through a scalar stream against its step index within a period
    (``sum f``, ``sum t f``, ``sum f^2``; ``t = 0 .. n-1`` is known on the host), read back once per period."""

    def __init__(self) -> None:
        self.count = 0
        self.sum_f: torch.Tensor | float = 0.0
        self.sum_tf: torch.Tensor | float = 0.0
        self.sum_ff: torch.Tensor | float = 0.0

    def add(self, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        self.sum_f = self.sum_f + value
        self.sum_tf = self.sum_tf + self.count * value
        self.sum_ff = self.sum_ff + value * value
        self.count += 1

    def pop(self) -> _Trend | None:
        """The period's mean, least-squares slope ``b = S_tf / S_tt`` and residual variance ``SSR / (n - 2)``
        (``SSR = S_ff - b S_tf``), with ``S_tf = sum t f - sum t sum f / n``, ``S_tt = sum t^2 - (sum t)^2 / n``,
        ``S_ff = sum f^2 - (sum f)^2 / n``; None for an empty period. The sums are reset."""
        n, sum_f, sum_tf, sum_ff = self.count, float(self.sum_f), float(self.sum_tf), float(self.sum_ff)
        self.count, self.sum_f, self.sum_tf, self.sum_ff = 0, 0.0, 0.0, 0.0
        if n == 0:
            return None
        if n < 3:
            return _Trend(n, sum_f / n, math.nan, 0.0)
        sum_t, sum_tt = n * (n - 1) / 2, (n - 1) * n * (2 * n - 1) / 6
        s_tt, s_tf, s_ff = sum_tt - sum_t**2 / n, sum_tf - sum_t * sum_f / n, sum_ff - sum_f**2 / n
        slope = s_tf / s_tt
        return _Trend(n, sum_f / n, slope, max(s_ff - slope * s_tf, 0.0) / (n - 2), s_tt)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sum_f": float(self.sum_f), "sum_tf": float(self.sum_tf),
                "sum_ff": float(self.sum_ff)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count, self.sum_f, self.sum_tf = int(state["count"]), float(state["sum_f"]), float(state["sum_tf"])
        self.sum_ff = float(state["sum_ff"])


def _next_probe(period: int, rho: float, ratio: float) -> int | float:
    """The period after which to probe again, after a probe lost at the end of ``period`` with ``rho < ratio``:
    ``ceil(period * ratio / rho)``, at least ``period + 1``; never again (``inf``) when the probe gained nothing
    (``rho <= 0``). Adam was ``ratio / rho`` times too fast for L-BFGS; if its pace falls like ``1 / t`` (as the
    loss decrease of first-order methods typically does), it has slowed by that factor after ``ratio / rho`` times
    the periods run so far, and not before."""
    if not rho > 0:
        return math.inf
    return max(period + 1, math.ceil(period * ratio / rho))


class ProbeCriterion(_WindowedCriterion):
    """Switch when a short trial of the L-BFGS phase gains more loss per gradient evaluation than Adam does.

    At the end of epoch (or ``window`` of Adam steps) ``min_periods`` (default 1), Adam's pace is measured from the
    least-squares line through that period's closure losses against the step: ``r = -b + 2 se(b)``, the loss Adam
    removes per step (one gradient evaluation), taken two standard errors above the fitted slope ``b`` so that a
    minibatch slope that came out flat by chance does not hand the switch to L-BFGS. Then :class:`fuse_optim.FusePV`
    runs a probe: from the current point ``x_0`` it takes ``probe_steps`` = ``k`` steps of its L-BFGS phase (fresh
    memory, its line search, each on the step's own closure, as after a real switch) and measures, at each iterate
    ``x_j`` (``j = 1..k-1``), the gain ``g_j = f_j(x_0) - f_j(x_j)`` on that step's closure ``f_j`` before it steps
    on it (a held-out minibatch: ``x_j`` was computed without it; on a full batch ``f_j = f``). With ``E_j`` the
    probe's gradient evaluations spent to reach ``x_j``, Adam's pace would have gained ``r E_j`` in their place, so
    the statistic

        ``rho = sum_j g_j / (r sum_j E_j)``

    is the probe's gain per evaluation over Adam's (dimensionless, invariant to ``f -> a f + b``, ``a > 0``).
    With ``rho >= ratio`` (default 1: L-BFGS is at least as fast as Adam right now) the probe is kept as the
    first ``k`` steps of the L-BFGS phase. Otherwise the optimizer returns to ``x_0`` with Adam's state as it
    was, and the probe's evaluations (and the steps Adam did not take meanwhile) are the price of asking. The next
    probe comes at the end of period ``ceil(p ratio / rho)`` (at least ``p + 1``; ``p``: the period of the lost
    probe; none after a probe that gained nothing): if Adam's pace falls like ``1 / t``, that is when it will have
    slowed to the pace L-BFGS showed, so a run in which Adam stays far ahead pays for few probes. With ``r <= 0``
    any gain gives ``rho = +inf`` (none gives ``-inf``). :attr:`statistic` is the last probe's
    ``rho`` (``None`` before one): trainers log it each epoch; :attr:`probes` counts the probes run.

    The optimizer undoes a lost probe's parameter moves only: buffers the closure's forward passes update
    (BatchNorm running statistics) and random numbers they draw (dropout) are the model's, and stay moved.

    This is the issue's "short trial of the L-BFGS direction measured on a held-out minibatch before committing":
    it asks whether L-BFGS pays *now*, from what this run measures, where Eq. 3 and Eq. 4 compare the run with
    thresholds in the loss's units.
    """

    name = "probe"
    needs_loss = True
    needs_probe = True

    def __init__(self, ratio: float = 1.0, probe_steps: int = 5, window: int | None = None,
                 min_periods: int = 1) -> None:
        self.ratio = _check_positive_float(ratio, "ratio")
        if isinstance(probe_steps, bool) or not isinstance(probe_steps, int) or probe_steps < 2:
            raise ValueError(f"probe_steps must be an integer >= 2, got {probe_steps!r}")
        if isinstance(min_periods, bool) or not isinstance(min_periods, int) or min_periods < 1:
            raise ValueError(f"min_periods must be an integer >= 1, got {min_periods!r}")
        self.probe_steps, self.min_periods = probe_steps, min_periods
        self._init_window(window)
        self._acc = _TrendAccumulator()  # the period's trend line: Adam's pace
        self.periods = 0
        #: Adam's loss decrease per step over the last period, when a probe is wanted (else None)
        self.pending_rate: float | None = None
        #: the period at whose end the next probe is asked for (see :func:`_next_probe`; ``inf``: none)
        self.next_probe: int | float = min_periods
        self.statistic: float | None = None
        self.probes = 0

    def _decide_on_mean(self) -> None:
        trend = self._acc.pop()
        if trend is None or trend.count < 3 or self.fired or not math.isfinite(trend.slope):
            return
        self.periods += 1
        if self.periods >= self.next_probe:
            self.pending_rate = -trend.slope + ADAM_PACE_ERRORS * trend.slope_error

    @property
    def wants_probe(self) -> bool:
        """Whether the optimizer should start a probe before its next step."""
        return self.pending_rate is not None and not self.fired

    def take_rate(self) -> float:
        """Adam's pace for the probe about to start (the request is consumed)."""
        rate, self.pending_rate = self.pending_rate, None
        if rate is None:
            raise RuntimeError("ProbeCriterion.take_rate() called with no probe wanted")
        return rate

    def judge(self, gain: float, weighted_evaluations: float, rate: float) -> bool:
        """Record ``rho = gain / (rate * weighted_evaluations)`` of a finished probe; True (and fired) when
        ``rho >= ratio``."""
        self.probes += 1
        if rate > 0 and weighted_evaluations > 0:
            rho = gain / (rate * weighted_evaluations)
        else:
            rho = math.inf if gain > 0 else -math.inf
        self.statistic = -math.inf if math.isnan(rho) else rho  # a probe that ended at a non-finite loss
        self.fired = self.statistic >= self.ratio
        if not self.fired:
            self.next_probe = _next_probe(self.periods, self.statistic, self.ratio)
        return self.fired

    @property
    def reason(self) -> str:
        shown = "nan" if self.statistic is None else f"{self.statistic:.3g}"
        return f"probe(L-BFGS gain per evaluation / Adam's = {shown} >= ratio={self.ratio:g}, probe {self.probes})"

    def config(self) -> dict[str, Any]:
        return {"criterion": "probe", "ratio": self.ratio, "probe_steps": self.probe_steps, "window": self.window,
                "min_periods": self.min_periods}

    def state_dict(self) -> dict[str, Any]:
        return {"trend": self._acc.state_dict(), "periods": self.periods, "pending_rate": self.pending_rate,
                "next_probe": self.next_probe, "statistic": self.statistic, "probes": self.probes, "fired": self.fired}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._acc.load_state_dict(state["trend"])
        self.periods, self.pending_rate = int(state["periods"]), state["pending_rate"]
        self.next_probe = float(state["next_probe"]) if math.isinf(state["next_probe"]) else int(state["next_probe"])
        self.statistic, self.probes, self.fired = state["statistic"], int(state["probes"]), bool(state["fired"])


class AbsoluteRulesCriterion(SwitchCriterion):
    """The absolute-threshold rules of a public JAX Adam-to-L-BFGS optimizer (avitai/opifex's ``HybridOptimizer``),
    as a baseline for threshold-free criteria: after at least ``min_steps`` Adam steps, switch when any of

    - the variance of the last ``window`` closure losses is below ``loss_variance`` (``1e-4``),
    - the gradient norm ``||g_k||`` (not squared) of the last step is below ``grad_norm`` (``1e-3``),
    - the relative improvement ``(f_{k-w} - f_k) / |f_{k-w}|`` over the last ``window`` steps is below
      ``improvement`` (``1e-4``)

    holds; ``window = 50``, ``min_steps = 1000``: their published defaults. Every threshold is absolute (in the
    loss's or the gradient's units), which is what :class:`PlateauCriterion` avoids. The rules are checked once
    per ``window`` steps (one host read-back per window), on the losses and squared norms of that window.
    """

    name = "absolute_rules"
    needs_loss = True
    needs_grad_norm = True

    def __init__(self, min_steps: int = 1000, window: int = 50, loss_variance: float = 1e-4,
                 grad_norm: float = 1e-3, improvement: float = 1e-4) -> None:
        self.min_steps = _check_nonnegative_int(min_steps, "min_steps")
        window = _check_window(window, "window")
        if window is None or window < 2:
            raise ValueError(f"window must be an integer >= 2, got {window!r}")
        self.window = window
        self.loss_variance = _check_positive_float(loss_variance, "loss_variance")
        self.grad_norm = _check_positive_float(grad_norm, "grad_norm")
        self.improvement = _check_positive_float(improvement, "improvement")
        self._losses: list[torch.Tensor] = []
        self._last_sq_norm: torch.Tensor | None = None
        self.steps = 0
        self.first_loss: float | None = None  # f_{k-w}: the last loss of the previous window
        self.statistics: dict[str, float] = {}
        self.fired_rule: str | None = None

    def observe_step(self, loss: torch.Tensor | None, grad_sq_norm: torch.Tensor | None) -> None:
        if loss is None or grad_sq_norm is None:
            raise RuntimeError("AbsoluteRulesCriterion needs the loss and the squared gradient norm of every step")
        self._losses.append(loss.detach().to(torch.float64))
        self._last_sq_norm = grad_sq_norm.detach()
        self.steps += 1
        if len(self._losses) >= self.window:
            self._decide()

    def _decide(self) -> None:
        losses = torch.stack(self._losses).tolist()  # one read-back per window
        self._losses = []
        sq_norm = float(self._last_sq_norm) if self._last_sq_norm is not None else math.inf
        mean = sum(losses) / len(losses)
        variance = sum((f - mean) ** 2 for f in losses) / (len(losses) - 1)
        previous = self.first_loss if self.first_loss is not None else losses[0]
        improvement = (previous - losses[-1]) / abs(previous) if previous != 0 else math.inf
        self.first_loss = losses[-1]
        self.statistics = {"loss_variance": variance, "grad_norm": math.sqrt(sq_norm), "improvement": improvement}
        if self.fired_rule is not None or self.steps < self.min_steps:
            return
        for rule, value in self.statistics.items():
            if value < getattr(self, rule):
                self.fired_rule = rule
                return

    @property
    def statistic(self) -> float | None:
        """The relative improvement of the last window (the rule most often deciding), ``None`` before one."""
        return self.statistics.get("improvement")

    def ready(self, step: int, epoch: int) -> bool:
        return self.fired_rule is not None

    @property
    def reason(self) -> str:
        if self.fired_rule is None:
            return "absolute_rules(not fired)"
        value = self.statistics[self.fired_rule]
        return f"absolute_rules({self.fired_rule}={value:.3g} < {getattr(self, self.fired_rule):g})"

    def config(self) -> dict[str, Any]:
        return {"criterion": "absolute_rules", "min_steps": self.min_steps, "window": self.window,
                "loss_variance": self.loss_variance, "grad_norm": self.grad_norm, "improvement": self.improvement}

    def state_dict(self) -> dict[str, Any]:
        return {"losses": [float(f) for f in self._losses],
                "last_sq_norm": None if self._last_sq_norm is None else float(self._last_sq_norm),
                "steps": self.steps, "first_loss": self.first_loss, "statistics": dict(self.statistics),
                "fired_rule": self.fired_rule}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._losses = [torch.tensor(f, dtype=torch.float64) for f in state["losses"]]
        sq = state["last_sq_norm"]
        self._last_sq_norm = None if sq is None else torch.tensor(sq, dtype=torch.float64)
        self.steps, self.first_loss = int(state["steps"]), state["first_loss"]
        self.statistics, self.fired_rule = dict(state["statistics"]), state["fired_rule"]


class _Combination(SwitchCriterion):
    def __init__(self, criteria: list[SwitchCriterion | Mapping[str, Any]]) -> None:
        if not isinstance(criteria, (list, tuple)) or not criteria:
            raise ValueError(f"'of' must be a non-empty list of criteria, got {criteria!r}")
        self.criteria = [make_criterion(c) for c in criteria]
        self.needs_grad_norm = any(c.needs_grad_norm for c in self.criteria)
        self.needs_loss = any(c.needs_loss for c in self.criteria)
        probes = [c for c in self.criteria if c.needs_probe]
        if len(probes) > 1 or any(isinstance(c, _Combination) for c in probes):
            raise ValueError(f"'of': at most one 'probe' criterion, not inside a nested 'any'/'all'; got {criteria!r}")
        self.needs_probe = bool(probes)

    def observe_step(self, loss: torch.Tensor | None, grad_sq_norm: torch.Tensor | None) -> None:
        for criterion in self.criteria:
            criterion.observe_step(loss, grad_sq_norm)

    def end_epoch(self) -> None:
        for criterion in self.criteria:
            criterion.end_epoch()

    def config(self) -> dict[str, Any]:
        return {"criterion": self.name, "of": [c.config() for c in self.criteria]}

    def state_dict(self) -> dict[str, Any]:
        return {"of": [c.state_dict() for c in self.criteria]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for criterion, sub in zip(self.criteria, state["of"], strict=True):
            criterion.load_state_dict(sub)


class AnyOf(_Combination):
    """Switch as soon as any of the given criteria is ready; ``reason`` names the first one."""

    name = "any"

    def ready(self, step: int, epoch: int) -> bool:
        self._fired_by = next((c for c in self.criteria if c.ready(step, epoch)), None)
        return self._fired_by is not None

    @property
    def reason(self) -> str:
        fired = getattr(self, "_fired_by", None)
        return f"any[{fired.reason}]" if fired is not None else "any"


class AllOf(_Combination):
    """Switch once all of the given criteria are ready at the same time."""

    name = "all"

    def ready(self, step: int, epoch: int) -> bool:
        return all(c.ready(step, epoch) for c in self.criteria)

    @property
    def reason(self) -> str:
        return "all[" + ", ".join(c.reason for c in self.criteria) + "]"


CRITERIA: dict[str, type[SwitchCriterion]] = {
    "epoch": EpochCriterion,
    "step": StepCriterion,
    "grad_norm": GradNormCriterion,
    "loss_change": LossChangeCriterion,
    "plateau": PlateauCriterion,
    "probe": ProbeCriterion,
    "absolute_rules": AbsoluteRulesCriterion,
    "any": AnyOf,
    "all": AllOf,
    "never": Never,
}


#: the keys each criterion with settings accepts (``any``/``all`` take ``of``; ``never`` none)
_ACCEPTED_KEYS: dict[str, set[str]] = {
    "epoch": {"epoch"},
    "step": {"step"},
    "grad_norm": {"zeta", "window"},
    "loss_change": {"sigma", "window", "relative"},
    "plateau": {"ratio", "window", "min_periods"},
    "probe": {"ratio", "probe_steps", "window", "min_periods"},
    "absolute_rules": {"min_steps", "window", "loss_variance", "grad_norm", "improvement"},
    "never": set(),
}
#: the key only one criterion takes -> that criterion: ``{"epoch": 5}`` means ``{"criterion": "epoch", "epoch": 5}``
_OWN_KEY = {key: kind for kind, keys in _ACCEPTED_KEYS.items() for key in keys
            if sum(key in other for other in _ACCEPTED_KEYS.values()) == 1}


#: the automatic switch, ``{"criterion": "auto"}``: the first of a won L-BFGS probe (Adam is slower than L-BFGS
#: now) and Adam's plateau (Adam's fast phase is over), each at its default; measured against the searched switch
#: in RESULTS.md ("Automatic switch rules")
AUTO: dict[str, Any] = {"criterion": "any", "of": [{"criterion": "probe"}, {"criterion": "plateau"}]}


def _implied_criterion(options: Mapping[str, Any]) -> str | None:
    """The criterion a dict without ``criterion`` names by its keys: exactly one criterion's own key, else None."""
    implied = {_OWN_KEY[key] for key in options if key in _OWN_KEY}
    return implied.pop() if len(implied) == 1 else None


def make_criterion(spec: SwitchCriterion | Mapping[str, Any] | str) -> SwitchCriterion:
    """Build a criterion from an instance (returned as is), a plain dict or a bare name.

    >>> make_criterion({"criterion": "grad_norm", "zeta": 1e-3})
    GradNormCriterion(zeta=0.001, window=None)
    >>> make_criterion({"epoch": 5})  # a key only one criterion takes names it
    EpochCriterion(epoch=5)
    """
    if isinstance(spec, SwitchCriterion):
        return spec
    if isinstance(spec, str):
        spec = {"criterion": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"switch must be a SwitchCriterion or a dict with a 'criterion' key, got {spec!r}")
    options = dict(spec)
    kind = options.pop("criterion", None)
    if kind is None:
        kind = _implied_criterion(options)
    if kind == "auto":
        if options:
            raise ValueError(f"switch criterion 'auto' takes no keys (it is {AUTO!r}), got {sorted(options)}")
        return make_criterion(AUTO)
    if kind not in CRITERIA:
        raise ValueError(f"switch criterion must be one of {sorted([*CRITERIA, 'auto'])}, got {kind!r} (name it with "
                         f"'criterion', or give the one key only a single criterion takes: {sorted(_OWN_KEY)})")
    cls = CRITERIA[kind]
    if cls in (AnyOf, AllOf):
        unknown = set(options) - {"of"}
        if unknown or "of" not in options:
            raise ValueError(f"switch criterion {kind!r} takes exactly the key 'of', got {sorted(options)}")
        return cls(options["of"])
    accepted = _ACCEPTED_KEYS[kind]
    required = {"epoch": {"epoch"}, "step": {"step"}, "grad_norm": {"zeta"}, "loss_change": {"sigma"}}.get(kind, set())
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(
            f"switch criterion {kind!r} got unknown key(s) {sorted(unknown)}; accepted: {sorted(accepted)}"
        )
    missing = required - set(options)
    if missing:
        raise ValueError(f"switch criterion {kind!r} needs key(s) {sorted(missing)}")
    return cls(**options)


def probe_criterion(criterion: SwitchCriterion) -> ProbeCriterion | None:
    """The :class:`ProbeCriterion` that decides for ``criterion``: itself, or one of its ``any``/``all`` parts."""
    if isinstance(criterion, ProbeCriterion):
        return criterion
    if isinstance(criterion, _Combination):
        return next((c for c in criterion.criteria if isinstance(c, ProbeCriterion)), None)
    return None


class SwitchState:
    """The one-way switch of an "Adam, then something else" optimizer: a criterion, and when and why it fired.

    Shared by :class:`fuse_optim.FusePV` (Adam, then L-BFGS) and ``fuse_tune``'s Adam-then-SGD baseline,
    which drive it the same way: :meth:`check` before every step, :meth:`end_epoch` at the end of every
    epoch; ``check`` returns True once, at the step or epoch the criterion fires, and the optimizer then
    changes phase. ``at_step`` and ``at_epoch`` count completed steps and epochs at that moment.
    """

    def __init__(self, criterion: SwitchCriterion | Mapping[str, Any] | str) -> None:
        self.criterion = make_criterion(criterion)
        self.at_step: int | None = None
        self.at_epoch: int | None = None
        self.reason: str | None = None

    @property
    def fired(self) -> bool:
        return self.at_step is not None

    def fire(self, step: int, epoch: int, reason: str) -> None:
        """Record the switch (also a manual one) at ``step`` completed steps and ``epoch`` completed epochs."""
        self.at_step, self.at_epoch, self.reason = step, epoch, reason

    def check(self, step: int, epoch: int) -> bool:
        """True when the criterion fires now (once); the switch is then recorded."""
        if self.fired or not self.criterion.ready(step, epoch):
            return False
        self.fire(step, epoch, self.criterion.reason)
        return True

    def end_epoch(self, step: int, epoch: int) -> bool:
        """Forward the end of an epoch to the criterion (before the switch only), then :meth:`check`."""
        if self.fired:
            return False
        self.criterion.end_epoch()
        return self.check(step, epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion.state_dict(), "switched_at_step": self.at_step,
                "switched_at_epoch": self.at_epoch, "switch_reason": self.reason}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.criterion.load_state_dict(state["criterion"])
        self.at_step, self.at_epoch = state["switched_at_step"], state["switched_at_epoch"]
        self.reason = state["switch_reason"]


class SwitchedOptimizer:
    """Mixin for an optimizer holding a :class:`SwitchState` in ``self._switch``: its public record of the
    switch, read-only (``None`` before the switch)."""

    _switch: SwitchState

    @property
    def switched_at_step(self) -> int | None:
        """Completed steps when the switch happened."""
        return self._switch.at_step

    @property
    def switched_at_epoch(self) -> int | None:
        """Completed epochs when the switch happened."""
        return self._switch.at_epoch

    @property
    def switch_reason(self) -> str | None:
        """What fired, e.g. ``"epoch(epoch >= 5)"``, or ``"manual"``."""
        return self._switch.reason
