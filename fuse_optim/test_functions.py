"""Test functions with known global minima, as differentiable torch functions.

``fuse_optim.test_functions`` is public and, like the rest of ``fuse_optim``, needs torch only: try
an optimizer on a function here without installing the tuning layer. ``fuse_optim``'s own tests use
these functions, and ``fuse_tune.workloads`` wraps them as the function workloads
(``rosenbrock``, ``rastrigin``, ``ackley``, ``himmelblau``, ``quadratic``) that studies name; they
live in the optimizer package because ``fuse_optim`` never imports ``fuse_tune``.

```python
import torch
from fuse_optim import FusePV
from fuse_optim.test_functions import get_test_function

rosenbrock = get_test_function("rosenbrock")
x = torch.tensor(rosenbrock.default_start(2), dtype=torch.float64, requires_grad=True)
opt = FusePV([x], switch={"criterion": "step", "step": 0}, line_search="strong_wolfe")
```

Every function takes a tensor ``x`` of shape ``(..., n)`` (a 1-D point is the common case; leading
batch dimensions are kept, which is handy for drawing landscapes) and returns a tensor of shape
``(...)``. All of them are dimensionless: the value is the objective, ``x`` the coordinates.

The four non-convex functions are the ones the FUSE paper draws (Figs. 1-4: 2-D Rosenbrock,
Rastrigin, Ackley and Himmelblau); their definitions follow the usual catalogue of optimisation test
functions (Wikipedia, "Test functions for optimization"). ``quadratic`` is a convex helper.

Starting points (the paper uses one shared start per function for all optimisers but does not
print it; the choices below are ours):

- Rosenbrock ``(-1.5, 2.0)``: on the far side of the curved valley, the start the project's
  reference measurements use. In n-D the pattern repeats: ``(-1.5, 2.0, -1.5, 2.0, ...)``.
- Rastrigin and Ackley ``(-2.0, 3.5)``: the start of the widely copied torch-optimizer
  visualisations for Rastrigin, several basins away from the global minimum at the origin; used for
  Ackley too so the two origin-centred multimodal functions share a start. n-D repeats the pattern.
- Himmelblau ``(0.0, 0.0)``: the textbook start, between the four global minima (descent from it
  reaches ``(3, 2)``); not the local maximum near ``(-0.271, -0.923)``.
- quadratic ``(1.0, ..., 1.0)``.

Ackley has a cone-shaped kink at its minimiser (``f ~ 4 ||x|| / sqrt(n)`` near 0), so its gradient
does not exist there; the norm is computed with ``torch.linalg.vector_norm``, whose autograd returns
the zero subgradient at the origin, so ``grad f(0) = 0`` as for the smooth functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "TEST_FUNCTIONS",
    "TestFunction",
    "ackley",
    "get_test_function",
    "himmelblau",
    "quadratic",
    "rastrigin",
    "rosenbrock",
]


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """Rosenbrock's valley, n >= 2.

    ``f(x) = sum_{i=1}^{n-1} [100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2]``; global minimum ``f* = 0`` at
    ``x = (1, ..., 1)``. For n >= 4 there is also a local minimum near ``(-1, 1, ..., 1)``.
    """
    head, tail = x[..., :-1], x[..., 1:]
    return (100.0 * (tail - head**2) ** 2 + (1.0 - head) ** 2).sum(dim=-1)


def rastrigin(x: torch.Tensor, amplitude: float = 10.0) -> torch.Tensor:
    """Rastrigin's function, any n >= 1.

    ``f(x) = A n + sum_i [x_i^2 - A cos(2 pi x_i)]`` with ``A = amplitude`` (10); a regular grid of
    local minima near the integer points, global minimum ``f* = 0`` at the origin.
    """
    n = x.shape[-1]
    return amplitude * n + (x**2 - amplitude * torch.cos(2.0 * math.pi * x)).sum(dim=-1)


def ackley(x: torch.Tensor, a: float = 20.0, b: float = 0.2, c: float = 2.0 * math.pi) -> torch.Tensor:
    """Ackley's function, any n >= 1.

    ``f(x) = -a exp(-b sqrt(mean_i x_i^2)) - exp(mean_i cos(c x_i)) + a + e`` with ``a = 20``,
    ``b = 0.2``, ``c = 2 pi``; an almost flat, bumpy outer region and a deep funnel with global
    minimum ``f* = 0`` at the origin (a kink there: autograd gives the zero subgradient).
    """
    n = x.shape[-1]
    rms = torch.linalg.vector_norm(x, dim=-1) / math.sqrt(n)
    mean_cos = torch.cos(c * x).mean(dim=-1)
    return -a * torch.exp(-b * rms) - torch.exp(mean_cos) + a + math.e


def himmelblau(x: torch.Tensor) -> torch.Tensor:
    """Himmelblau's function, 2-D only.

    ``f(x, y) = (x^2 + y - 11)^2 + (x + y^2 - 7)^2``; four global minima with ``f* = 0`` (see
    ``HIMMELBLAU_MINIMIZERS``) and a local maximum near ``(-0.2708, -0.9230)``.
    """
    if x.shape[-1] != 2:
        raise ValueError(
            f"x: himmelblau is defined in 2 dimensions only, got a last dimension of {x.shape[-1]}"
        )
    u, v = x[..., 0], x[..., 1]
    return (u**2 + v - 11.0) ** 2 + (u + v**2 - 7.0) ** 2


def quadratic(x: torch.Tensor, condition_number: float = 10.0) -> torch.Tensor:
    """A convex, ill-conditioned quadratic bowl, any n >= 1.

    ``f(x) = 1/2 sum_i h_i x_i^2`` with curvatures ``h_i = condition_number^(i / (n - 1))``
    log-spaced from 1 to ``condition_number`` (``h = (1,)`` when n = 1); ``f* = 0`` at the origin.
    """
    n = x.shape[-1]
    exponents = torch.arange(n, dtype=x.dtype, device=x.device) / max(n - 1, 1)
    curvatures = condition_number**exponents
    return 0.5 * (curvatures * x**2).sum(dim=-1)


# Himmelblau's four global minimisers, refined by Newton's method in 40-digit arithmetic.
HIMMELBLAU_MINIMIZERS: tuple[tuple[float, float], ...] = (
    (3.0, 2.0),
    (-2.8051180869527449, 3.1313125182505730),
    (-3.7793102533777469, -3.2831859912861694),
    (3.5844283403304917, -1.8481265269644036),
)


def _repeat(pattern: tuple[float, ...], dim: int) -> tuple[float, ...]:
    """``pattern`` repeated and truncated to ``dim`` coordinates."""
    return tuple(pattern[i % len(pattern)] for i in range(dim))


@dataclass(frozen=True)
class TestFunction:
    """A test function with its known global minimum and a default starting point.

    Attributes:
        name: registry key.
        fn: ``x (..., n) -> f (...)``.
        dims: ``None`` when defined for any ``n >= min_dim``, else the one dimension it is defined in.
        f_star: the global minimum value.
        minimizers: ``dim -> list of points`` where ``f = f_star`` (all of them when finitely many).
        default_start: ``dim -> point`` every optimiser starts from unless told otherwise.
        min_dim: the smallest dimension accepted when ``dims`` is ``None``.
        description: one line for listings.
    """

    __test__ = False  # not a pytest test class, despite the name

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    dims: int | None
    f_star: float
    minimizers: Callable[[int], list[tuple[float, ...]]]
    default_start: Callable[[int], tuple[float, ...]]
    min_dim: int = 1
    description: str = ""

    def check_dim(self, dim: int | None) -> int:
        """``dim`` if the function is defined there (``None``: its fixed dimension, or 2), else ValueError."""
        if dim is None:
            return self.dims if self.dims is not None else max(2, self.min_dim)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"dim: expected an int, got {dim!r}")
        if self.dims is not None and dim != self.dims:
            raise ValueError(f"dim: {self.name} is defined for dim={self.dims} only, got {dim}")
        if dim < self.min_dim:
            raise ValueError(f"dim: {self.name} needs dim >= {self.min_dim}, got {dim}")
        return dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


TEST_FUNCTIONS: dict[str, TestFunction] = {
    test_function.name: test_function
    for test_function in (
        TestFunction(
            name="rosenbrock",
            fn=rosenbrock,
            dims=None,
            min_dim=2,
            f_star=0.0,
            minimizers=lambda dim: [(1.0,) * dim],
            default_start=lambda dim: _repeat((-1.5, 2.0), dim),
            description="curved narrow valley; minimum 0 at (1, ..., 1)",
        ),
        TestFunction(
            name="rastrigin",
            fn=rastrigin,
            dims=None,
            f_star=0.0,
            minimizers=lambda dim: [(0.0,) * dim],
            default_start=lambda dim: _repeat((-2.0, 3.5), dim),
            description="grid of local minima on a bowl; minimum 0 at the origin",
        ),
        TestFunction(
            name="ackley",
            fn=ackley,
            dims=None,
            f_star=0.0,
            minimizers=lambda dim: [(0.0,) * dim],
            default_start=lambda dim: _repeat((-2.0, 3.5), dim),
            description="flat bumpy plateau around a deep funnel; minimum 0 at the origin",
        ),
        TestFunction(
            name="himmelblau",
            fn=himmelblau,
            dims=2,
            min_dim=2,
            f_star=0.0,
            minimizers=lambda dim: list(HIMMELBLAU_MINIMIZERS),
            default_start=lambda dim: (0.0, 0.0),
            description="four global minima with value 0",
        ),
        TestFunction(
            name="quadratic",
            fn=quadratic,
            dims=None,
            f_star=0.0,
            minimizers=lambda dim: [(0.0,) * dim],
            default_start=lambda dim: (1.0,) * dim,
            description="convex bowl with condition number 10; minimum 0 at the origin",
        ),
    )
}


def get_test_function(name: str) -> TestFunction:
    """The registered test function called ``name``; ``ValueError`` listing the names otherwise."""
    try:
        return TEST_FUNCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"name: unknown test function {name!r}; accepted: {', '.join(sorted(TEST_FUNCTIONS))}"
        ) from None
