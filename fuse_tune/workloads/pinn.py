"""Physics-informed neural networks (PINNs): convection, reaction and wave, as in Rathore et al. (ICML 2024).

The setup of "Challenges in Training PINNs: A Loss Landscape Perspective" (Rathore, Lei, Frangella, Lu, Udell,
ICML 2024; code: github.com/pratikrathore8/opt_for_pinns), each PDE on ``t in [0, 1]``:

- **convection** (``pinn-convection``), ``x in [0, 2 pi]``: ``u_t + beta u_x = 0``, ``u(x, 0) = sin x``, periodic
  boundary ``u(0, t) = u(2 pi, t)``; exact solution ``u = sin(x - beta t)``; ``beta = 40`` (the paper's hardest).
- **reaction** (``pinn-reaction``), ``x in [0, 2 pi]``: ``u_t - rho u (1 - u) = 0``,
  ``u(x, 0) = h(x) = exp(-(x - pi)^2 / (2 (pi / 4)^2))``, periodic boundary; exact solution
  ``u = h e^{rho t} / (h e^{rho t} + 1 - h)``; ``rho = 5``.
- **wave** (``pinn-wave``), ``x in [0, 1]``: ``u_tt - 4 u_xx = 0``, ``u(x, 0) = sin(pi x) + 0.5 sin(beta pi x)``,
  ``u_t(x, 0) = 0``, Dirichlet boundary ``u(0, t) = u(1, t) = 0``; exact solution
  ``u = sin(pi x) cos(2 pi t) + 0.5 sin(beta pi x) cos(2 beta pi t)``; ``beta = 5`` (an integer, so that the
  exact solution meets the boundary condition).

Network: ``(x, t) -> u``, a tanh MLP with ``depth`` hidden layers of ``width`` units (the paper: 3 hidden layers,
its ``num_layers=4``, of 50 to 400 units), Xavier-normal weights and zero biases, raw ``(x, t)`` as inputs.

Points, from a ``n_x`` by ``n_t`` grid (``x = linspace(x0, x1, n_x)``, ``t = linspace(0, 1, n_t)``, the paper's
257 by 101): ``n_residual`` residual points (10,000) drawn without replacement from the interior grid
``x[1:-1] x t[1:]`` (255 by 100 points); ``n_x`` initial points ``(x, 0)`` (257); ``n_t`` boundary times (101)
at each end of ``x``. The paper draws the residual points with the run's seed; here they come from a fixed
generator (``point_seed``), so the same options give the same points for every seed and only the initial
weights change with the seed.

Loss (the paper's, ``loss = loss_res + loss_ic + loss_bc``, each a mean of squares over its own points):

- ``loss_res``: mean over the residual points of the squared PDE residual;
- ``loss_ic``: mean over the initial points of ``(u(x, 0) - u0(x))^2``; for wave plus the mean of ``u_t(x, 0)^2``;
- ``loss_bc``: periodic: the mean over the boundary times of ``(u(x1, t) - u(x0, t))^2``; wave: the mean of
  ``u(x0, t)^2`` plus the mean of ``u(x1, t)^2``.

Metric: the relative L2 error ``||u - u*|| / ||u*||`` (:data:`~fuse_tune.workloads.interface.L2RE`) against the exact
solution. The test split is the paper's test set (its ``test/l2re``, the error it reports): the coarse grid of
``(n_x - 1) / 2 + 1`` by ``n_t`` points (129 by 101), stacked as the paper stacks it: the interior ``127 x 100``
points, the ``129`` initial points and the ``101`` points on each boundary (the two corners at ``t = 0`` are in
both, 13,031 rows). The validation split, which the tuner selects on, is ``n_validation`` points drawn uniformly
from the domain with another fixed generator: never the test grid.

How this fits the :class:`~fuse_tune.workloads.interface.Problem` interface (a loss of the model's outputs):
every split is one tensor of rows ``(x, t, kind, weight)``, and :class:`PinnModel` maps a row to the quantity
whose square is its share of the loss:

======================  ====================================================  ===========================
kind                    output                                                target
======================  ====================================================  ===========================
``SOLUTION`` (0)        ``u(x, t)`` (validation and test rows)                ``u*(x, t)``
``RESIDUAL`` (1)        ``sqrt(w) * r(x, t)``, ``r`` the PDE residual         0
``INITIAL`` (2)         ``sqrt(w) * (u(x, 0) - u0(x))``                       0
``BOUNDARY`` (3)        periodic: ``sqrt(w) * (u(x1, t) - u(x0, t))`` (row    0
                        at ``x0``); wave: ``sqrt(w) * u(x, t)``
``VELOCITY`` (4)        ``sqrt(w) * u_t(x, 0)`` (wave's second initial term)  0
======================  ====================================================  ===========================

and the loss is the mean squared error of outputs against targets. The weight ``w = N / n_g`` of a training row
is the training split's size ``N`` over the size ``n_g`` of the row's group (residual, initial, velocity, each
boundary), so that the mean over the whole split is exactly the paper's sum of per-term means, a minibatch's loss
is an unbiased estimate of it, and the trainer's chunked evaluation (a size-weighted mean of chunk means) gives
it too; on validation and test rows the loss is the mean squared error against the exact solution.
``Problem.diagnostics`` logs the three terms (``loss_residual``, ``loss_initial``, ``loss_boundary``) after each
epoch; they add up to the training loss.

Derivatives with respect to ``(x, t)`` are taken in one of three ways (``derivatives``; the same values up to
rounding): ``"autograd"``, ``torch.autograd.grad`` of the batch's sum (one backward pass gives ``u_x`` and
``u_t`` of every row, one more per second derivative); ``"vmap"``, ``torch.func.vmap`` of ``jacrev``/``hessian``
of the per-point network; ``"jvp"``, forward mode (``torch.func.jvp`` along ``e_x``/``e_t``, nested for second
derivatives, both directions in one pass over the rows stacked twice). ``benchmarks/bench_pinn_eval.py`` times
one full-batch loss and gradient of each; the default is the one measured fastest on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import nn
from torch.func import hessian, jacrev, jvp, vmap

from fuse_tune.workloads.interface import L2RE, Data, Problem, Workload, options_of

__all__ = [
    "BOUNDARY",
    "DERIVATIVES",
    "INITIAL",
    "RESIDUAL",
    "SOLUTION",
    "VELOCITY",
    "PDE",
    "Convection",
    "ExactSolution",
    "PinnModel",
    "Points",
    "Reaction",
    "Wave",
    "build_convection",
    "build_reaction",
    "build_wave",
    "loss_terms",
    "make_points",
    "mlp",
    "pinn_problem",
    "pinn_workloads",
]

#: row kinds (the third column of every split)
SOLUTION, RESIDUAL, INITIAL, BOUNDARY, VELOCITY = 0, 1, 2, 3, 4
#: the ways derivatives with respect to the inputs are taken
DERIVATIVES = ("autograd", "vmap", "jvp")
Derivatives = Literal["autograd", "vmap", "jvp"]
#: the loss terms of :func:`loss_terms` and the row kinds each sums over (the paper's loss_res, loss_ic, loss_bc)
TERMS: dict[str, tuple[int, ...]] = {
    "loss_residual": (RESIDUAL,),
    "loss_initial": (INITIAL, VELOCITY),
    "loss_boundary": (BOUNDARY,),
}
#: rows per model call in :func:`loss_terms`
_CHUNK = 16384


# ------------------------------------------------------------------ the PDEs


class PDE:
    """A PDE on ``[x0, x1] x [t0, t1]`` with its initial and boundary conditions and its exact solution.

    Attributes:
        name: ``convection``, ``reaction`` or ``wave``.
        x_range, t_range: the domain.
        periodic: periodic boundary ``u(x0, t) = u(x1, t)``; otherwise homogeneous Dirichlet ``u = 0`` at both ends.
        needs: what the residual needs, among ``u``, ``u_x``, ``u_t``, ``u_xx``, ``u_tt``.
        initial_velocity: the initial condition includes ``u_t(x, 0) = 0`` (a second-order-in-time PDE).
    """

    name: str = ""
    x_range: tuple[float, float] = (0.0, 2 * math.pi)
    t_range: tuple[float, float] = (0.0, 1.0)
    periodic: bool = True
    needs: frozenset[str] = frozenset()
    initial_velocity: bool = False

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        """``u0(x) = u(x, t0)``."""
        raise NotImplementedError

    def exact(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact solution ``u*(x, t)``."""
        raise NotImplementedError

    def residual(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The PDE residual from ``u`` and its derivatives (the keys in :attr:`needs`)."""
        raise NotImplementedError

    @property
    def coefficient(self) -> tuple[str, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        name, value = self.coefficient
        return f"{type(self).__name__}({name}={value:g})"


class Convection(PDE):
    """``u_t + beta u_x = 0`` on ``[0, 2 pi] x [0, 1]``, ``u(x, 0) = sin x``, periodic; ``u = sin(x - beta t)``."""

    name = "convection"
    needs = frozenset({"u_x", "u_t"})

    def __init__(self, beta: float = 40.0) -> None:
        self.beta = float(beta)

    @property
    def coefficient(self) -> tuple[str, float]:
        return "beta", self.beta

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)

    def exact(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(x - self.beta * t)

    def residual(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return d["u_t"] + self.beta * d["u_x"]


class Reaction(PDE):
    """``u_t - rho u (1 - u) = 0`` on ``[0, 2 pi] x [0, 1]``, Gaussian ``u(x, 0) = h(x)``, periodic; logistic exact
    solution ``u = h e^{rho t} / (h e^{rho t} + 1 - h)``."""

    name = "reaction"
    needs = frozenset({"u", "u_t"})

    def __init__(self, rho: float = 5.0) -> None:
        self.rho = float(rho)

    @property
    def coefficient(self) -> tuple[str, float]:
        return "rho", self.rho

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(-0.5 * torch.square((x - math.pi) / (math.pi / 4)))

    def exact(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.initial(x)
        growth = h * torch.exp(self.rho * t)
        return growth / (growth + 1 - h)

    def residual(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        u = d["u"]
        return d["u_t"] - self.rho * u * (1 - u)


class Wave(PDE):
    """``u_tt - 4 u_xx = 0`` on ``[0, 1] x [0, 1]``, ``u(x, 0) = sin(pi x) + 0.5 sin(beta pi x)``, ``u_t(x, 0) = 0``,
    ``u(0, t) = u(1, t) = 0``; ``u = sin(pi x) cos(2 pi t) + 0.5 sin(beta pi x) cos(2 beta pi t)``."""

    name = "wave"
    x_range = (0.0, 1.0)
    periodic = False
    needs = frozenset({"u_xx", "u_tt"})
    initial_velocity = True
    #: the squared wave speed (the paper's c = 2)
    speed_squared = 4.0

    def __init__(self, beta: float = 5.0) -> None:
        self.beta = float(beta)

    @property
    def coefficient(self) -> tuple[str, float]:
        return "beta", self.beta

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(math.pi * x) + 0.5 * torch.sin(self.beta * math.pi * x)

    def exact(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (torch.sin(math.pi * x) * torch.cos(2 * math.pi * t)
                + 0.5 * torch.sin(self.beta * math.pi * x) * torch.cos(2 * self.beta * math.pi * t))

    def residual(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return d["u_tt"] - self.speed_squared * d["u_xx"]


# ------------------------------------------------------------------ the model


def mlp(width: int = 50, depth: int = 3) -> nn.Sequential:
    """``(x, t) -> u``: ``depth`` tanh hidden layers of ``width`` units; Xavier-normal weights, zero biases (the
    paper's initialisation), drawn from torch's global RNG (paired seeding)."""
    layers: list[nn.Module] = []
    fan_in = 2
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.Tanh()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 1))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class ExactSolution(nn.Module):
    """The PDE's exact solution as a network ``(n, 2) -> (n, 1)`` (checks: its loss is zero, its L2RE too)."""

    def __init__(self, pde: PDE) -> None:
        super().__init__()
        self.pde = pde

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        return self.pde.exact(xt[:, 0], xt[:, 1]).unsqueeze(-1)


class PinnModel(nn.Module):
    """Rows ``(x, t, kind, weight)`` to the quantity whose square is each row's share of the loss (module docstring).

    ``net`` maps ``(n, 2)`` points ``(x, t)`` to ``(n, 1)`` values ``u``; :attr:`net` is what is trained. Derivatives
    with respect to the inputs are taken with ``derivatives`` (``"autograd"``, ``"vmap"`` or ``"jvp"``), with a graph
    for the parameters' gradient when grad mode is on (every parameter then gets a gradient, zero where the batch
    does not depend on it); under ``torch.no_grad`` (the trainer's evaluation) the derivatives are still computed,
    and the outputs come back detached.
    """

    def __init__(self, pde: PDE, net: nn.Module, derivatives: Derivatives = "autograd") -> None:
        super().__init__()
        if derivatives not in DERIVATIVES:
            raise ValueError(f"derivatives: expected one of {list(DERIVATIVES)}, got {derivatives!r}")
        self.pde = pde
        self.net = net
        self.derivatives = derivatives

    def extra_repr(self) -> str:
        return f"pde={self.pde!r}, derivatives={self.derivatives!r}"

    def u(self, xt: torch.Tensor) -> torch.Tensor:
        """``u`` at points ``(n, 2)``, shape ``(n,)``."""
        return self.net(xt).reshape(-1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        build = torch.is_grad_enabled()
        xt, kind, weight = points[:, :2], points[:, 2], points[:, 3]
        values, rows = [], []
        for code in (SOLUTION, RESIDUAL, INITIAL, BOUNDARY, VELOCITY):
            index = (kind == code).nonzero().reshape(-1)
            if index.numel() == 0:
                continue
            value = self._kind(code, xt.index_select(0, index), build)
            if code != SOLUTION:
                value = value * weight.index_select(0, index).sqrt()
            values.append(value)
            rows.append(index)
        if len(values) == 1 and rows[0].numel() == points.shape[0]:
            out = values[0]  # one kind (validation and test): rows are in order
        else:
            out = torch.cat(values).new_zeros(points.shape[0]).index_put((torch.cat(rows),), torch.cat(values))
        if not build:
            return out.detach()
        params = [p for p in self.parameters() if p.requires_grad]
        if params:  # every parameter gets a gradient, zero where the batch does not depend on it (the output bias
            # on residual rows of convection or wave), as a minibatch gradient should be, rather than None
            out = out + 0.0 * torch.stack([p.sum() for p in params]).sum()
        return out

    def _kind(self, code: int, xt: torch.Tensor, build: bool) -> torch.Tensor:
        pde = self.pde
        if code == SOLUTION:
            return self.u(xt)
        if code == RESIDUAL:
            return pde.residual(self.derivatives_at(xt, pde.needs, build))
        if code == INITIAL:
            return self.u(xt) - pde.initial(xt[:, 0])
        if code == BOUNDARY:
            if not pde.periodic:
                return self.u(xt)
            shift = torch.tensor([pde.x_range[1] - pde.x_range[0], 0.0], dtype=xt.dtype, device=xt.device)
            both = self.u(torch.cat((xt + shift, xt)))
            return both[:xt.shape[0]] - both[xt.shape[0]:]
        if code == VELOCITY:
            return self.derivatives_at(xt, frozenset({"u_t"}), build)["u_t"]
        raise ValueError(f"points: unknown row kind {code}")

    def derivatives_at(self, xt: torch.Tensor, needs: frozenset[str], build: bool = True) -> dict[str, torch.Tensor]:
        """``u`` and its derivatives named in ``needs`` (``u_x``, ``u_t``, ``u_xx``, ``u_tt``) at points ``(n, 2)``;
        with a graph back to the parameters when ``build``."""
        if self.derivatives == "autograd":
            return self._by_autograd(xt, needs, build)
        if self.derivatives == "vmap":
            with torch.set_grad_enabled(build):  # torch.func's transforms differentiate under no_grad too
                return self._by_vmap(xt, needs)
        with torch.set_grad_enabled(build):  # forward mode needs no backward graph unless the loss is differentiated
            return self._by_jvp(xt, needs)

    def _by_autograd(self, xt: torch.Tensor, needs: frozenset[str], build: bool) -> dict[str, torch.Tensor]:
        with torch.enable_grad():  # derivatives w.r.t. the inputs even under torch.no_grad (evaluation)
            z = xt.detach().requires_grad_(True)
            u = self.u(z)
            out = {"u": u}
            second = [name for name in ("u_xx", "u_tt") if name in needs]
            if needs - {"u"}:
                g = torch.autograd.grad(u.sum(), z, create_graph=build or bool(second))[0]
                out["u_x"], out["u_t"] = g[:, 0], g[:, 1]
                for name in second:
                    column = 0 if name == "u_xx" else 1
                    out[name] = torch.autograd.grad(g[:, column].sum(), z, create_graph=build,
                                                    retain_graph=True)[0][:, column]
        return out

    def _scalar(self, point: torch.Tensor) -> torch.Tensor:
        return self.net(point.unsqueeze(0)).reshape(())

    def _by_vmap(self, xt: torch.Tensor, needs: frozenset[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if needs & {"u", "u_x", "u_t"}:
            def value_and_value(point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                u = self._scalar(point)
                return u, u

            g, u = vmap(jacrev(value_and_value, has_aux=True))(xt)
            out.update(u=u, u_x=g[:, 0], u_t=g[:, 1])
        if needs & {"u_xx", "u_tt"}:
            h = vmap(hessian(self._scalar))(xt)
            out.update(u_xx=h[:, 0, 0], u_tt=h[:, 1, 1])
        return out

    def _by_jvp(self, xt: torch.Tensor, needs: frozenset[str]) -> dict[str, torch.Tensor]:
        """Forward mode: one (nested for second derivatives) jvp along the needed unit directions, the rows stacked
        once per direction."""
        n = xt.shape[0]
        directions = [name for name in ("x", "t") if needs & {f"u_{name}", f"u_{name}{name}"}]
        if not directions:
            return {"u": self.u(xt)}
        z = xt.repeat(len(directions), 1) if len(directions) > 1 else xt
        tangent = torch.zeros_like(z)
        for i, name in enumerate(directions):
            tangent[i * n:(i + 1) * n, 0 if name == "x" else 1] = 1.0
        out: dict[str, torch.Tensor] = {}
        if needs & {"u_xx", "u_tt"}:
            def first(w: torch.Tensor) -> torch.Tensor:
                return jvp(self.u, (w,), (tangent,))[1]

            d1, d2 = jvp(first, (z,), (tangent,))
            for i, name in enumerate(directions):
                out[f"u_{name}{name}"] = d2[i * n:(i + 1) * n]
                out[f"u_{name}"] = d1[i * n:(i + 1) * n]
            if "u" in needs:
                out["u"] = self.u(xt)
            return out
        u, d1 = jvp(self.u, (z,), (tangent,))
        out["u"] = u[:n]
        for i, name in enumerate(directions):
            out[f"u_{name}"] = d1[i * n:(i + 1) * n]
        return out


# ------------------------------------------------------------------ points


class Points:
    """Rows ``(x, t, kind, weight)`` and their targets, assembled group by group (float64)."""

    def __init__(self) -> None:
        self.groups: list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]] = []

    def add(self, x: torch.Tensor, t: torch.Tensor, kind: int, target: torch.Tensor | None = None) -> None:
        x, t = x.reshape(-1).to(torch.float64), t.reshape(-1).to(torch.float64)
        self.groups.append((x, t, kind, torch.zeros_like(x) if target is None else target.reshape(-1)))

    def tensors(self, weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs (N, 4), targets (N,))``; ``weighted``: each row's weight is ``N`` over its group's size."""
        total = sum(group[0].numel() for group in self.groups)
        rows, targets = [], []
        for x, t, kind, target in self.groups:
            weight = total / x.numel() if weighted else 1.0
            rows.append(torch.stack((x, t, torch.full_like(x, kind), torch.full_like(x, weight)), dim=1))
            targets.append(target)
        return torch.cat(rows), torch.cat(targets)


def _grid(pde: PDE, n_x: int, n_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(*pde.x_range, n_x, dtype=torch.float64)
    t = torch.linspace(*pde.t_range, n_t, dtype=torch.float64)
    return x, t


def _interior(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The interior grid ``x[1:-1] x t[1:]``, time-major (the paper's ``meshgrid`` order)."""
    tt, xx = torch.meshgrid(t[1:], x[1:-1], indexing="ij")
    return xx.reshape(-1), tt.reshape(-1)


def make_points(pde: PDE, *, n_residual: int = 10_000, n_x: int = 257, n_t: int = 101, n_validation: int = 4096,
                point_seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The train, validation and test splits (float64 ``(inputs, targets)``) of the module docstring.

    The residual points are ``n_residual`` of the interior grid drawn without replacement by a generator seeded with
    ``point_seed``; the validation points are uniform in the domain, from a generator seeded with
    ``point_seed + 1``."""
    _check(n_x >= 3, f"n_x: expected an int >= 3, got {n_x!r}")
    _check(n_t >= 2, f"n_t: expected an int >= 2, got {n_t!r}")
    interior = (n_x - 2) * (n_t - 1)
    _check(1 <= n_residual <= interior,
           f"n_residual: expected 1 to {interior} (the {n_x - 2} x {n_t - 1} interior grid), got {n_residual!r}")
    _check(n_validation >= 1, f"n_validation: expected an int >= 1, got {n_validation!r}")
    x, t = _grid(pde, n_x, n_t)
    (x0, x1), t0 = pde.x_range, pde.t_range[0]
    generator = torch.Generator().manual_seed(point_seed)
    xi, ti = _interior(x, t)
    chosen = torch.randperm(interior, generator=generator)[:n_residual]
    train = Points()
    train.add(xi[chosen], ti[chosen], RESIDUAL)
    train.add(x, torch.full_like(x, t0), INITIAL)
    if pde.initial_velocity:
        train.add(x, torch.full_like(x, t0), VELOCITY)
    if pde.periodic:
        train.add(torch.full_like(t, x0), t, BOUNDARY)  # the pair (x0, t), (x1, t): the model adds x1 - x0
    else:
        train.add(torch.full_like(t, x0), t, BOUNDARY)
        train.add(torch.full_like(t, x1), t, BOUNDARY)

    generator = torch.Generator().manual_seed(point_seed + 1)
    uniform = torch.rand(n_validation, 2, generator=generator, dtype=torch.float64)
    vx = x0 + (x1 - x0) * uniform[:, 0]
    vt = t0 + (pde.t_range[1] - t0) * uniform[:, 1]
    validation = Points()
    validation.add(vx, vt, SOLUTION, pde.exact(vx, vt))

    cx, ct = _grid(pde, (n_x - 1) // 2 + 1, n_t)  # the paper's coarse test grid, stacked as it stacks it
    test = Points()
    for px, pt in (_interior(cx, ct), (cx, torch.full_like(cx, t0)), (torch.full_like(ct, x1), ct),
                   (torch.full_like(ct, x0), ct)):
        test.add(px, pt, SOLUTION, pde.exact(px, pt))
    return {"train": train.tensors(weighted=True), "validation": validation.tensors(weighted=False),
            "test": test.tensors(weighted=False)}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ------------------------------------------------------------------ loss terms and the problem


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean((outputs - targets)^2)`` over the batch: on training rows the paper's loss (its weighted rows), on
    solution rows the mean squared error against the exact solution."""
    return (outputs.reshape(targets.shape) - targets).square().mean()


@torch.no_grad()
def loss_terms(model: nn.Module, data: Data) -> dict[str, float]:
    """The paper's loss terms on training rows: ``{"loss_residual", "loss_initial", "loss_boundary"}`` (each term's
    rows' squared outputs summed, over the split's size; the three add up to the training loss)."""
    inputs, targets = data  # type: ignore[misc]
    sums = dict.fromkeys(TERMS, 0.0)
    for rows, target in zip(inputs.split(_CHUNK), targets.split(_CHUNK), strict=True):
        squares = (model(rows) - target).square()
        kind = rows[:, 2]
        for name, codes in TERMS.items():
            mask = torch.zeros_like(kind, dtype=torch.bool)
            for code in codes:
                mask |= kind == code
            sums[name] += float(squares[mask].sum())
    return {name: value / inputs.shape[0] for name, value in sums.items()}


def pinn_problem(pde: PDE, *, width: int = 50, depth: int = 3, n_residual: int = 10_000, n_x: int = 257,
                 n_t: int = 101, n_validation: int = 4096, point_seed: int = 0, derivatives: Derivatives = "autograd",
                 dtype: torch.dtype = torch.float32, net: nn.Module | None = None) -> Problem:
    """The :class:`Problem` of ``pde`` (module docstring); ``net`` replaces the MLP (e.g. :class:`ExactSolution`),
    ``dtype`` is that of the points and targets (the model stays as built)."""
    _check(width >= 1, f"width: expected an int >= 1, got {width!r}")
    _check(depth >= 1, f"depth: expected an int >= 1, got {depth!r}")
    splits = make_points(pde, n_residual=n_residual, n_x=n_x, n_t=n_t, n_validation=n_validation,
                         point_seed=point_seed)
    splits = {name: (inputs.to(dtype), targets.to(dtype)) for name, (inputs, targets) in splits.items()}
    model = PinnModel(pde, mlp(width, depth) if net is None else net, derivatives)
    return Problem(model=model, loss=squared_error, train=splits["train"], validation=splits["validation"],
                   test=splits["test"], metric=L2RE, diagnostics=loss_terms)


def build_convection(*, beta: float = 40.0, width: int = 50, depth: int = 3, n_residual: int = 10_000,
                     n_x: int = 257, n_t: int = 101, n_validation: int = 4096, point_seed: int = 0,
                     derivatives: Derivatives = "autograd") -> Problem:
    """PINN for convection u_t + beta u_x = 0, beta 40, L2RE on the paper's test grid (Rathore et al. 2024)

    Options: ``beta``; the tanh MLP's ``width`` and ``depth`` (hidden layers); ``n_residual`` residual points drawn
    from the ``(n_x - 2) x (n_t - 1)`` interior grid, ``n_x`` initial points, ``n_t`` periodic boundary pairs;
    ``n_validation`` uniform validation points; ``point_seed`` (the points' generator); ``derivatives``.
    """
    return pinn_problem(Convection(beta), width=width, depth=depth, n_residual=n_residual, n_x=n_x, n_t=n_t,
                        n_validation=n_validation, point_seed=point_seed, derivatives=derivatives)


def build_reaction(*, rho: float = 5.0, width: int = 50, depth: int = 3, n_residual: int = 10_000,
                   n_x: int = 257, n_t: int = 101, n_validation: int = 4096, point_seed: int = 0,
                   derivatives: Derivatives = "autograd") -> Problem:
    """PINN for reaction u_t - rho u (1 - u) = 0, rho 5, L2RE on the paper's test grid (Rathore et al. 2024)

    Options as :func:`build_convection`, with ``rho`` for ``beta``.
    """
    return pinn_problem(Reaction(rho), width=width, depth=depth, n_residual=n_residual, n_x=n_x, n_t=n_t,
                        n_validation=n_validation, point_seed=point_seed, derivatives=derivatives)


def build_wave(*, beta: float = 5.0, width: int = 50, depth: int = 3, n_residual: int = 10_000,
               n_x: int = 257, n_t: int = 101, n_validation: int = 4096, point_seed: int = 0,
               derivatives: Derivatives = "autograd") -> Problem:
    """PINN for wave u_tt - 4 u_xx = 0, beta 5, L2RE on the paper's test grid (Rathore et al. 2024)

    Options as :func:`build_convection` (``beta`` an integer: the exact solution then meets ``u(0, t) = u(1, t) =
    0``); ``n_x`` initial points carry both initial conditions (``u`` and ``u_t``), ``n_t`` points on each boundary.
    """
    return pinn_problem(Wave(beta), width=width, depth=depth, n_residual=n_residual, n_x=n_x, n_t=n_t,
                        n_validation=n_validation, point_seed=point_seed, derivatives=derivatives)


#: the builders by PDE name
BUILDERS: dict[str, Callable[..., Problem]] = {
    "convection": build_convection,
    "reaction": build_reaction,
    "wave": build_wave,
}


def pinn_workloads() -> tuple[Workload, ...]:
    """``pinn-convection``, ``pinn-reaction`` and ``pinn-wave`` as registry entries (``WORKLOADS``)."""
    descriptions = {
        "convection": "PINN, convection u_t + beta u_x = 0, beta 40, tanh MLP 3x50 (Rathore et al. 2024)",
        "reaction": "PINN, reaction u_t = rho u (1 - u), rho 5, tanh MLP 3x50 (Rathore et al. 2024)",
        "wave": "PINN, wave u_tt = 4 u_xx, beta 5, tanh MLP 3x50 (Rathore et al. 2024)",
    }
    return tuple(Workload(name=f"pinn-{pde}", kind="supervised", description=descriptions[pde], build=builder,
                          options=options_of(builder, f"pinn-{pde}"))
                 for pde, builder in BUILDERS.items())
