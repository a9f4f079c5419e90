"""Optimizer paths over 2-D test functions, as plain lists for the dashboards (which never import torch).

:func:`landscape` evaluates a test function on a grid around its start and minima; :func:`optimizer_path`
runs one optimizer from the function's default start and records ``x`` after every step;
:func:`landscape_with_paths` does both for a set of optimizers (by default Adam, torch's L-BFGS and FUSE-PV
switching after 100 steps). Everything returned is made of ``float``, ``int``, ``str``, lists and dicts, so
it can be handed to :func:`dashboards.plots.plot_landscape` or written to JSON.

Gradients are exact (no noise): these pictures show where each method goes, not how it copes with noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fuse_optim.test_functions import get_test_function
from fuse_tune.optimizers import build_optimizer, optimizer_phase
from fuse_tune.workloads.functions import FunctionModule

__all__ = ["DEFAULT_PATHS", "landscape", "optimizer_path", "landscape_with_paths", "TWO_D_FUNCTIONS"]

#: test functions drawn as landscapes (all are defined in 2-D)
TWO_D_FUNCTIONS = ("rosenbrock", "rastrigin", "ackley", "himmelblau", "quadratic")

#: (label, optimizer, optimizer arguments) drawn when the caller names none
DEFAULT_PATHS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("adam", "adam", {"lr": 0.01}),
    ("lbfgs", "lbfgs", {"lr": 1.0}),
    ("fuse_pv[switch.criterion=step,switch.step=100]", "fuse_pv",
     {"lr": 0.01, "switch": {"criterion": "step", "step": 100}, "line_search": "strong_wolfe"}),
)


def _bounds(points: Sequence[Sequence[float]], margin: float = 0.3) -> tuple[tuple[float, float], tuple[float, float]]:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    width = max(max(xs) - min(xs), 2.0)
    height = max(max(ys) - min(ys), 2.0)
    return ((min(xs) - margin * width, max(xs) + margin * width),
            (min(ys) - margin * height, max(ys) + margin * height))


def landscape(function: str, *, bounds: tuple[tuple[float, float], tuple[float, float]] | None = None,
              resolution: int = 120) -> dict[str, Any]:
    """``f`` on a ``resolution`` x ``resolution`` grid: ``{"function", "x", "y", "z", "f_star", "start",
    "minimizers", "bounds"}``; ``z[i][j] = f(x[j], y[i])`` (row i is one y value, as ``contour`` wants).

    The default bounds frame the start point and the minima with a margin of 30 % of their spread (at least 2 wide).
    """
    test_function = get_test_function(function)
    start = list(test_function.default_start(2))
    minimizers = [list(p) for p in test_function.minimizers(2)]
    if bounds is None:
        bounds = _bounds([start, *minimizers])
    (x_low, x_high), (y_low, y_high) = bounds
    xs = torch.linspace(x_low, x_high, resolution, dtype=torch.float64)
    ys = torch.linspace(y_low, y_high, resolution, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    with torch.no_grad():
        z = test_function(torch.stack([grid_x, grid_y], dim=-1))
    return {"function": function, "x": xs.tolist(), "y": ys.tolist(), "z": z.tolist(),
            "f_star": float(test_function.f_star), "start": start, "minimizers": minimizers,
            "bounds": [list(bounds[0]), list(bounds[1])]}


def optimizer_path(function: str, optimizer: str, optimizer_args: Mapping[str, Any] | None = None, *,
                   steps: int = 300, steps_per_epoch: int = 50, start: Sequence[float] | None = None,
                   label: str | None = None) -> dict[str, Any]:
    """Run ``optimizer`` on the 2-D ``function`` for ``steps`` steps from its default start.

    Returns ``{"label", "optimizer", "points": [[x, y], ...] (steps + 1 points, the start first),
    "values": [f, ...] (f at each point), "switch_step": int | None}``. ``end_epoch`` is called every
    ``steps_per_epoch`` steps, as the trainer does, so epoch-based switch criteria work. A run whose
    iterate becomes non-finite stops there (the points so far are returned).
    """
    test_function = get_test_function(function)
    module = FunctionModule(test_function.fn, list(start) if start is not None else test_function.default_start(2))
    opt = build_optimizer(optimizer, list(module.parameters()), dict(optimizer_args or {}))

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = module()
        loss.backward()
        return loss

    points = [module.x.detach().tolist()]
    with torch.no_grad():
        values = [float(module())]
    switch_step = None
    for step in range(1, steps + 1):
        opt.step(closure)
        if step % steps_per_epoch == 0:
            opt.end_epoch()
        point = module.x.detach().tolist()
        with torch.no_grad():
            value = float(module())
        if not all(math.isfinite(c) for c in point) or not math.isfinite(value):
            break
        points.append(point)
        values.append(value)
        if switch_step is None and optimizer_phase(opt, optimizer) not in ("adam", optimizer):
            switch_step = getattr(opt, "switched_at_step", None)
            switch_step = step if switch_step is None else int(switch_step)
    return {"label": label or optimizer, "optimizer": optimizer, "points": points, "values": values,
            "switch_step": switch_step}


def landscape_with_paths(function: str, paths: Sequence[tuple[str, str, Mapping[str, Any]]] = DEFAULT_PATHS, *,
                         steps: int = 300, resolution: int = 120) -> dict[str, Any]:
    """:func:`landscape` plus ``"paths"``: one :func:`optimizer_path` per ``(label, optimizer, args)``."""
    runs = [optimizer_path(function, optimizer, args, steps=steps, label=label) for label, optimizer, args in paths]
    test_function = get_test_function(function)
    anchors = [list(test_function.default_start(2)), *[list(p) for p in test_function.minimizers(2)]]
    (x_low, x_high), (y_low, y_high) = _bounds(anchors)
    # Frame the paths too, but not a path that flies off: at most three times the start-and-minima frame.
    reach_x, reach_y = x_high - x_low, y_high - y_low
    points = [p for run in runs for p in run["points"]
              if x_low - reach_x <= p[0] <= x_high + reach_x and y_low - reach_y <= p[1] <= y_high + reach_y]
    bounds = _bounds(anchors + points, margin=0.08)
    bounds = ((min(bounds[0][0], x_low), max(bounds[0][1], x_high)),
              (min(bounds[1][0], y_low), max(bounds[1][1], y_high)))
    result = landscape(function, bounds=bounds, resolution=resolution)
    result["paths"] = runs
    return result
