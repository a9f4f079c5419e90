"""Step-length policies for the L-BFGS phase: strong Wolfe, Armijo backtracking, fixed.

Each policy is an object called with a one-dimensional view of the problem along the search
direction ``d`` from ``x_k``::

    evaluate(t) -> (f(x_k + t d), g(x_k + t d), g(x_k + t d)^T d)

(on the *same* minibatch as ``f(x_k)``, so that the accepted point also gives the curvature pair
``y_k = g(x_{k+1}) - g(x_k)`` at no extra cost) and returns a :class:`LineSearchResult`. Policies
with ``needs_directional_derivative = False`` (Armijo, fixed) get NaN for the third value, which
saves a pass over the parameters per trial. Failures
are named by the constants below, which tests assert on; a failed search returns the best point it
saw that decreased ``f`` (``t = 0`` if none).

Inequalities (Nocedal & Wright, Numerical Optimization, 2nd ed., Eq. 3.7), with
``phi(t) = f(x_k + t d)``:

* sufficient decrease (Armijo): ``phi(t) <= phi(0) + c1 t phi'(0) + r``
* strong curvature: ``|phi'(t)| <= c2 |phi'(0)|``, with ``0 < c1 < c2 < 1``.

``r = loss_resolution`` (default 0) is how precisely ``phi(0)`` is known: the caller passes a few
ulps of ``|f(x_k)|`` in the parameters' dtype. Near an optimum, where the decrease
``c1 t |phi'(0)|`` falls below the rounding of ``f`` (float32 reaches it early), a step that leaves
``f`` level within ``r`` is accepted rather than reported as a failed search: the approximate Armijo
condition of Hager & Zhang (2005, "A new conjugate gradient method with guaranteed descent and an
efficient line search", Eq. 4.1's ``f(x_k + t d) <= f(x_k) + eps |f(x_k)|``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "LineSearchResult",
    "StrongWolfe",
    "Armijo",
    "FixedStep",
    "MAX_EVALUATIONS",
    "NO_DECREASE",
    "INTERVAL_TOO_SMALL",
    "make_line_search",
    "LINE_SEARCHES",
]

#: the evaluation budget ran out before an acceptable step was found
MAX_EVALUATIONS = "max_evaluations"
#: not one trial step decreased the loss enough (Armijo backtracking exhausted)
NO_DECREASE = "no_sufficient_decrease"
#: the bracketing interval shrank below the relative tolerance
INTERVAL_TOO_SMALL = "interval_too_small"

Evaluate = Callable[[float], tuple[float, torch.Tensor, float]]


@dataclass
class LineSearchResult:
    """Outcome of one line search.

    ``step`` is the accepted t (0 when nothing decreased f), ``loss``/``grad``/``gtd`` are the
    values at ``x_k + step * d`` (``grad`` is ``None`` when ``step == 0``), ``evaluations`` counts
    closure calls, and ``failure`` is ``None`` on success or one of the named reasons.
    """

    step: float
    loss: float
    grad: torch.Tensor | None
    gtd: float
    evaluations: int
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _cubic_minimizer(t1: float, f1: float, g1: float, t2: float, f2: float, g2: float,
                     low: float, high: float) -> float:
    """Minimiser of the cubic interpolating (t1, f1, g1) and (t2, f2, g2), clamped to [low, high].

    Nocedal & Wright Eq. 3.59; falls back to bisection when the cubic has no real minimiser.
    """
    d1 = g1 + g2 - 3 * (f1 - f2) / (t1 - t2)
    radicand = d1 * d1 - g1 * g2
    if radicand >= 0 and _finite(radicand):
        d2 = math.sqrt(radicand)
        if t1 > t2:
            d2 = -d2
        denominator = g2 - g1 + 2 * d2
        if denominator != 0:
            t = t2 - (t2 - t1) * (g2 + d2 - d1) / denominator
            if _finite(t):
                return min(max(t, low), high)
    return (low + high) / 2


@dataclass
class StrongWolfe:
    """Strong Wolfe line search (Nocedal & Wright Algorithms 3.5 and 3.6, cubic interpolation).

    The first trial is the caller's ``initial_step`` (1 for a quasi-Newton direction: the classical
    choice for deterministic problems). Steps that produce a non-finite loss are treated as
    ``f = +inf`` and bracketed away. ``tolerance_change`` is relative: the search stops when the
    bracket is shorter than ``tolerance_change * max(1, t)``.
    """

    c1: float = 1e-4
    c2: float = 0.9
    max_evaluations: int = 25
    tolerance_change: float = 1e-9
    name = "strong_wolfe"
    #: whether ``evaluate`` must return the directional derivative g(x + t d)^T d (one more pass over d)
    needs_directional_derivative = True

    def __post_init__(self) -> None:
        if not 0 < self.c1 < self.c2 < 1:
            raise ValueError(f"c1 and c2 must satisfy 0 < c1 < c2 < 1, got c1={self.c1}, c2={self.c2}")
        _check_evaluations(self.max_evaluations)

    def __call__(self, evaluate: Evaluate, loss0: float, gtd0: float, initial_step: float, *,
                 loss_resolution: float = 0.0) -> LineSearchResult:
        c1, c2 = self.c1, self.c2
        ceiling = loss0 + loss_resolution  # phi(0) plus its rounding: the Armijo line starts here
        evaluations = 0
        best = LineSearchResult(0.0, loss0, None, gtd0, 0, NO_DECREASE)

        def probe(t: float) -> LineSearchResult:
            nonlocal evaluations, best
            loss, grad, gtd = evaluate(t)
            evaluations += 1
            if not (_finite(loss) and _finite(gtd)):
                loss, gtd = math.inf, math.nan
            result = LineSearchResult(t, loss, grad, gtd, evaluations)
            if loss <= ceiling + c1 * t * gtd0 and loss < best.loss:
                best = LineSearchResult(t, loss, grad, gtd, evaluations)
            return result

        def success(point: LineSearchResult) -> LineSearchResult:
            point.evaluations, point.failure = evaluations, None
            return point

        def give_up(reason: str) -> LineSearchResult:
            best.evaluations, best.failure = evaluations, reason
            return best

        previous = LineSearchResult(0.0, loss0, None, gtd0, 0)
        t = initial_step
        low: LineSearchResult | None = None
        high: LineSearchResult | None = None
        # Bracketing phase (Algorithm 3.5).
        while evaluations < self.max_evaluations:
            point = probe(t)
            if point.loss > ceiling + c1 * t * gtd0 or (previous.step > 0 and point.loss >= previous.loss):
                low, high = previous, point
                break
            if abs(point.gtd) <= -c2 * gtd0:
                return success(point)
            if point.gtd >= 0:
                low, high = point, previous
                break
            lower, upper = t + 0.01 * (t - previous.step), 10 * t
            t_next = _cubic_minimizer(previous.step, previous.loss, previous.gtd, t, point.loss, point.gtd,
                                      lower, upper) if previous.step > 0 else upper
            previous, t = point, t_next
        if low is None or high is None:
            return give_up(MAX_EVALUATIONS)
        # Zoom phase (Algorithm 3.6): low always satisfies sufficient decrease and has the lowest f.
        while evaluations < self.max_evaluations:
            width = abs(high.step - low.step)
            if width <= self.tolerance_change * max(1.0, abs(low.step), abs(high.step)):
                return give_up(INTERVAL_TOO_SMALL)
            a, b = sorted((low.step, high.step))
            margin = 0.1 * width
            if _finite(high.loss) and _finite(high.gtd):
                t = _cubic_minimizer(low.step, low.loss, low.gtd, high.step, high.loss, high.gtd,
                                     a + margin, b - margin)
            else:
                t = (a + b) / 2
            point = probe(t)
            if point.loss > ceiling + c1 * t * gtd0 or point.loss >= low.loss:
                high = point
            else:
                if abs(point.gtd) <= -c2 * gtd0:
                    return success(point)
                if point.gtd * (high.step - low.step) >= 0:
                    high = low
                low = point
        return give_up(MAX_EVALUATIONS)


@dataclass
class Armijo:
    """Backtracking line search on the sufficient-decrease condition only.

    Trials ``t = initial_step * shrink**i`` for ``i = 0, 1, ...`` until
    ``f(x_k + t d) <= f(x_k) + c1 t g_k^T d``. On minibatches the first trial is capped (the
    caller passes ``min(1, cap)``): a full quasi-Newton step fitted to one small batch overfits it
    (logistic regression with L2 on digits, batch 64, 5 seeds: Armijo from t = 1 ends 0.0348 from
    f*, from 0.1 0.0237; BENCHMARKS.md, "Minibatch second phase"), while backtracking from a capped
    step is stable and usually costs one evaluation.
    """

    c1: float = 1e-4
    shrink: float = 0.5
    max_evaluations: int = 10
    name = "armijo"
    needs_directional_derivative = False

    def __post_init__(self) -> None:
        if not 0 < self.c1 < 1:
            raise ValueError(f"c1 must be in (0, 1), got {self.c1!r}")
        if not 0 < self.shrink < 1:
            raise ValueError(f"shrink must be in (0, 1), got {self.shrink!r}")
        _check_evaluations(self.max_evaluations)

    def __call__(self, evaluate: Evaluate, loss0: float, gtd0: float, initial_step: float, *,
                 loss_resolution: float = 0.0) -> LineSearchResult:
        t = initial_step
        for evaluations in range(1, self.max_evaluations + 1):
            loss, grad, gtd = evaluate(t)
            if _finite(loss) and loss <= loss0 + loss_resolution + self.c1 * t * gtd0:
                return LineSearchResult(t, loss, grad, gtd, evaluations)
            t *= self.shrink
        return LineSearchResult(0.0, loss0, None, gtd0, self.max_evaluations, NO_DECREASE)


@dataclass
class FixedStep:
    """No search: always ``t = initial_step`` (one evaluation, for the curvature pair).

    A non-finite loss at the trial point is reported as ``NO_DECREASE`` so that the optimizer
    restores the parameters.
    """

    name = "fixed"
    needs_directional_derivative = False

    def __call__(self, evaluate: Evaluate, loss0: float, gtd0: float, initial_step: float, *,
                 loss_resolution: float = 0.0) -> LineSearchResult:
        loss, grad, gtd = evaluate(initial_step)
        if not _finite(loss):
            return LineSearchResult(0.0, loss0, None, gtd0, 1, NO_DECREASE)
        return LineSearchResult(initial_step, loss, grad, gtd, 1)


def _check_evaluations(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_evaluations must be an integer >= 1, got {value!r}")


LINE_SEARCHES = {"strong_wolfe": StrongWolfe, "armijo": Armijo, "fixed": FixedStep}


def make_line_search(spec: str | object | None, **options: object) -> StrongWolfe | Armijo | FixedStep:
    """A policy from its name (``"strong_wolfe"``, ``"armijo"``, ``"fixed"`` or ``None`` for fixed)."""
    if spec is None:
        spec = "fixed"
    if isinstance(spec, str):
        if spec not in LINE_SEARCHES:
            raise ValueError(f"line_search must be one of {sorted(LINE_SEARCHES)} or None, got {spec!r}")
        try:
            return LINE_SEARCHES[spec](**options)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ValueError(f"line_search {spec!r}: {exc}") from None
    if callable(spec):
        return spec  # type: ignore[return-value]
    raise ValueError(f"line_search must be a name, a line-search object or None, got {spec!r}")
