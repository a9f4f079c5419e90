"""Workloads over test functions: the point ``x`` is the one parameter of a module.

``FunctionModule(fn, start)`` holds ``x`` as an ``nn.Parameter`` initialised at ``start``;
``module()`` returns ``f(x)``. Any optimiser drives it like a network: ``loss = module();
loss.backward(); optimizer.step()``.

Gradient noise simulates a stochastic gradient on a deterministic function. After
``loss.backward()`` the trainer calls ``add_gradient_noise(module, scale, generator)``, which adds
``scale * xi`` with ``xi ~ N(0, I)`` (drawn from ``generator``) to every parameter's ``.grad``:
``g = grad f(x) + scale * xi``. ``scale`` is an absolute standard deviation in the units of the
gradient, the same for every coordinate. The loss value itself stays exact (a line search sees the
true ``f``). One noise draw per ``backward`` call, from a generator seeded per run, makes runs
repeatable and lets two optimisers see the same noise sequence for the same number of gradient
evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["FunctionModule", "add_gradient_noise"]


class FunctionModule(nn.Module):
    """``x`` as a parameter, ``forward() = fn(x)``.

    Args:
        fn: ``x (n,) -> scalar``.
        start: the initial point, ``n`` coordinates.
        dtype, device: of ``x`` (float64 by default: the test functions' minima are checked to 1e-12).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        start: Sequence[float],
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        point = torch.as_tensor(list(start), dtype=dtype, device=device)
        if point.ndim != 1 or point.numel() == 0 or not torch.isfinite(point).all():
            raise ValueError(f"start: expected a non-empty sequence of finite numbers, got {start!r}")
        self.fn = fn
        self.x = nn.Parameter(point)

    def forward(self) -> torch.Tensor:
        return self.fn(self.x)

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', self.fn)!s}, dim={self.x.numel()}"


def add_gradient_noise(module: nn.Module, scale: float, generator: torch.Generator | None) -> None:
    """Add ``scale * N(0, I)`` noise, drawn from ``generator``, to the ``.grad`` of ``module``'s parameters.

    Parameters without a gradient are skipped; ``scale = 0`` does nothing (and draws nothing). The
    noise is drawn on the generator's device and moved to the gradient's.
    """
    if (
        not (isinstance(scale, int | float) and not isinstance(scale, bool))
        or not math.isfinite(scale)
        or scale < 0
    ):
        raise ValueError(f"scale: expected a finite number >= 0, got {scale!r}")
    if scale == 0:
        return
    generator_device = generator.device if generator is not None else torch.device("cpu")
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.grad is None:
                continue
            noise = torch.randn(
                parameter.grad.shape, generator=generator, dtype=parameter.grad.dtype, device=generator_device
            )
            parameter.grad.add_(noise.to(parameter.grad.device), alpha=scale)
