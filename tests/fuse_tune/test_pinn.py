"""PINN workloads (convection, reaction, wave; Rathore et al. 2024): the loss is the paper's, the exact solution
zeroes it, the points are fixed, and the trainer runs them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fuse_tune.cli import main as cli_main
from fuse_tune.train import TrainConfig, train
from fuse_tune.workloads import L2RE, WORKLOADS, build_supervised
from fuse_tune.workloads.pinn import (
    BOUNDARY,
    DERIVATIVES,
    INITIAL,
    PDE,
    RESIDUAL,
    SOLUTION,
    VELOCITY,
    Convection,
    ExactSolution,
    PinnModel,
    Reaction,
    Wave,
    loss_terms,
    mlp,
    pinn_problem,
)

#: torch.func.jvp scripts a decomposition on first use (torch's own deprecation warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

NAMES = ("pinn-convection", "pinn-reaction", "pinn-wave")
#: small point sets for fast checks (the paper's: 10,000 residual points on a 257 x 101 grid)
SMALL = {"n_residual": 400, "n_x": 33, "n_t": 21, "n_validation": 128}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pdes() -> list[PDE]:
    return [Convection(40.0), Reaction(5.0), Wave(5.0)]


def rows(inputs: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = inputs[inputs[:, 2] == kind]
    return chosen[:, 0], chosen[:, 1]


def l2re(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return L2RE.finish(L2RE.fn(model(data[0]), data[1]))


def test_registered_listed_and_declared_options(tmp_path, capsys) -> None:
    for name in NAMES:
        workload = WORKLOADS[name]
        assert workload.kind == "supervised" and "Rathore" in workload.description
        defaults = workload.defaults
        assert defaults["width"] == 50 and defaults["depth"] == 3 and defaults["n_residual"] == 10_000
        assert defaults["n_x"] == 257 and defaults["n_t"] == 101 and defaults["derivatives"] == "autograd"
    assert WORKLOADS["pinn-convection"].defaults["beta"] == 40.0
    assert WORKLOADS["pinn-reaction"].defaults["rho"] == 5.0
    assert WORKLOADS["pinn-wave"].defaults["beta"] == 5.0
    with pytest.raises(ValueError, match="derivatives: expected one of"):
        WORKLOADS["pinn-wave"].check_options({"derivatives": "finite-differences"})
    assert cli_main(["list", "--studies", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in NAMES)


@pytest.mark.parametrize("derivatives", DERIVATIVES)
@pytest.mark.parametrize("pde", pdes(), ids=repr)
def test_exact_solution_zeroes_every_term_and_the_l2re(pde: PDE, derivatives: str) -> None:
    problem = pinn_problem(pde, n_residual=2000, n_validation=512, dtype=torch.float64, net=ExactSolution(pde),
                           derivatives=derivatives)
    inputs, targets = problem.train
    assert torch.equal(targets, torch.zeros_like(targets))
    with torch.no_grad():
        outputs = problem.model(inputs)
    assert outputs.abs().max() < 1e-11  # rounding only (wave's u_tt, 4 u_xx are ~ (10 pi)^2)
    terms = loss_terms(problem.model, problem.train)
    assert set(terms) == {"loss_residual", "loss_initial", "loss_boundary"}
    assert all(value < 1e-22 for value in terms.values()), terms
    assert l2re(problem.model, problem.validation) == 0.0
    assert l2re(problem.model, problem.test) == 0.0


class Polynomial(nn.Module):
    """u = x + t, or u = x^2 + t^2 with ``square``."""

    def __init__(self, square: bool) -> None:
        super().__init__()
        self.square = square

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        return (xt.square().sum(1) if self.square else xt.sum(1)).unsqueeze(-1)


@pytest.mark.parametrize("pde", pdes(), ids=repr)
def test_a_wrong_function_gives_the_expected_terms(pde: PDE) -> None:
    wave = isinstance(pde, Wave)
    problem = pinn_problem(pde, **SMALL, dtype=torch.float64, net=Polynomial(square=wave))
    inputs = problem.train[0]
    x, t = torch.linspace(*pde.x_range, 33, dtype=torch.float64), torch.linspace(0, 1, 21, dtype=torch.float64)
    rx, rt = rows(inputs, RESIDUAL)
    if isinstance(pde, Convection):  # u = x + t: u_t + beta u_x = 1 + beta
        residual = torch.full_like(rx, 1 + pde.beta)
    elif isinstance(pde, Reaction):  # u_t - rho u (1 - u) = 1 - rho (x + t)(1 - x - t)
        residual = 1 - pde.rho * (rx + rt) * (1 - rx - rt)
    else:  # u = x^2 + t^2: u_tt - 4 u_xx = 2 - 8
        residual = torch.full_like(rx, -6.0)
    initial = ((x.square() if wave else x) - pde.initial(x)).square().mean()  # u_t(x, 0) = 2 t = 0 for wave
    boundary = t.pow(4).mean() + (1 + t.square()).square().mean() if wave else (2 * math.pi) ** 2
    expected = {"loss_residual": float(residual.square().mean()), "loss_initial": float(initial),
                "loss_boundary": float(boundary)}
    terms = loss_terms(problem.model, problem.train)
    for name, value in expected.items():
        assert terms[name] == pytest.approx(value, rel=1e-12), name
    assert all(value > 0.1 for value in terms.values())
    assert l2re(problem.model, problem.test) > 0.1


def paper_loss(pde: PDE, net: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The paper's loss_res + loss_bc + loss_ic, written out with plain autograd on ``net``."""
    x, t = (c.clone().requires_grad_(True) for c in rows(inputs, RESIDUAL))
    u = net(torch.stack((x, t), 1))[:, 0]
    u_x, u_t = torch.autograd.grad(u.sum(), (x, t), create_graph=True)
    if isinstance(pde, Convection):
        residual = u_t + pde.beta * u_x
    elif isinstance(pde, Reaction):
        residual = u_t - pde.rho * u * (1 - u)
    else:
        u_xx = torch.autograd.grad(u_x.sum(), x, create_graph=True)[0]
        u_tt = torch.autograd.grad(u_t.sum(), t, create_graph=True)[0]
        residual = u_tt - 4 * u_xx
    ix, it = (c.clone().requires_grad_(True) for c in rows(inputs, INITIAL))
    ui = net(torch.stack((ix, it), 1))[:, 0]
    loss_ic = (ui - pde.initial(ix)).square().mean()
    bx, bt = rows(inputs, BOUNDARY)
    if isinstance(pde, Wave):
        velocity = torch.autograd.grad(ui.sum(), it, create_graph=True)[0]
        loss_ic = loss_ic + velocity.square().mean()
        lower, upper = net(torch.stack((bx, bt), 1))[:, 0].chunk(2)
        loss_bc = lower.square().mean() + upper.square().mean()
    else:
        lower = net(torch.stack((bx, bt), 1))[:, 0]
        upper = net(torch.stack((bx + 2 * math.pi, bt), 1))[:, 0]
        loss_bc = (upper - lower).square().mean()
    return residual.square().mean() + loss_bc + loss_ic


@pytest.mark.parametrize("pde", pdes(), ids=repr)
def test_full_batch_loss_is_the_papers_sum_of_three_means(pde: PDE) -> None:
    torch.manual_seed(0)
    problem = pinn_problem(pde, **SMALL, width=16, dtype=torch.float64)
    problem.model.double()
    inputs, targets = problem.train
    expected = paper_loss(pde, problem.model.net, inputs)
    expected_grad = torch.autograd.grad(expected, list(problem.model.parameters()))
    for derivatives in DERIVATIVES:
        problem.model.derivatives = derivatives
        value = problem.objective(problem.model, inputs, targets)
        assert value.item() == pytest.approx(expected.item(), rel=1e-12), derivatives
        grad = torch.autograd.grad(value, list(problem.model.parameters()))
        for got, want in zip(grad, expected_grad, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the trainer's chunked evaluation (size-weighted mean of chunk means) and the logged terms agree with it
    with torch.no_grad():
        chunks = sum(problem.loss(problem.model(x), y) * len(y)
                     for x, y in zip(inputs.split(97), targets.split(97), strict=True))
    assert float(chunks / len(targets)) == pytest.approx(expected.item(), rel=1e-12)
    assert sum(loss_terms(problem.model, problem.train).values()) == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_points_depend_on_the_options_not_on_the_seed(name: str) -> None:
    first, again, other = (build_supervised(name, seed=seed, **SMALL) for seed in (0, 0, 1))
    for split in ("train", "validation", "test"):
        for a, b, c in zip(getattr(first.problem, split), getattr(again.problem, split),
                           getattr(other.problem, split), strict=True):
            assert torch.equal(a, b) and torch.equal(a, c), split
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), again.model.parameters(), strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(first.model.parameters(), other.model.parameters(),
                                                    strict=True))
    moved = build_supervised(name, seed=0, **SMALL, point_seed=1)
    assert not torch.equal(moved.problem.train[0], first.problem.train[0])


def test_the_papers_point_sets() -> None:
    problem = pinn_problem(Convection(), dtype=torch.float64)
    inputs = problem.train[0]
    counts = {kind: int((inputs[:, 2] == kind).sum()) for kind in (RESIDUAL, INITIAL, BOUNDARY, VELOCITY)}
    assert counts == {RESIDUAL: 10_000, INITIAL: 257, BOUNDARY: 101, VELOCITY: 0}
    n = inputs.shape[0]
    for kind, size in ((RESIDUAL, 10_000), (INITIAL, 257), (BOUNDARY, 101)):
        assert torch.allclose(inputs[inputs[:, 2] == kind, 3], torch.tensor(n / size, dtype=torch.float64))
    # residual points: distinct points of the interior 255 x 100 grid
    x, t = rows(inputs, RESIDUAL)
    grid_x, grid_t = torch.linspace(0, 2 * math.pi, 257, dtype=torch.float64), torch.linspace(0, 1, 101,
                                                                                              dtype=torch.float64)
    i = torch.searchsorted(grid_x, x.contiguous()).clamp(max=256)
    j = torch.searchsorted(grid_t, t.contiguous()).clamp(max=100)
    assert torch.allclose(grid_x[i], x, atol=1e-12) and torch.allclose(grid_t[j], t, atol=1e-12)
    assert 1 <= int(i.min()) and int(i.max()) <= 255 and int(j.min()) >= 1
    assert len(set(zip(i.tolist(), j.tolist(), strict=True))) == 10_000
    # test: the paper's coarse grid, 127 x 100 interior + 129 initial + 101 on each boundary
    test_inputs = problem.test[0]
    assert test_inputs.shape == (127 * 100 + 129 + 2 * 101, 4) and bool((test_inputs[:, 2] == SOLUTION).all())
    validation = problem.validation[0]
    assert validation.shape == (4096, 4)
    assert float(torch.cdist(validation[:, :2], test_inputs[:, :2]).min()) > 0  # never the test grid
    wave = pinn_problem(Wave(), dtype=torch.float64).train[0]
    assert {kind: int((wave[:, 2] == kind).sum()) for kind in (RESIDUAL, INITIAL, BOUNDARY, VELOCITY)} == {
        RESIDUAL: 10_000, INITIAL: 257, BOUNDARY: 202, VELOCITY: 257}
    with pytest.raises(ValueError, match="n_residual: expected 1 to 5000"):
        pinn_problem(Convection(), n_residual=5001, n_x=52, n_t=101)


def test_pinn_model_maps_solution_rows_to_u() -> None:
    torch.manual_seed(0)
    net = mlp(8, 2)
    model = PinnModel(Reaction(), net)
    points = torch.tensor([[1.0, 0.5, SOLUTION, 1.0], [2.0, 0.0, INITIAL, 4.0]])
    out = model(points)
    u = net(points[:, :2])[:, 0]
    torch.testing.assert_close(out, torch.stack((u[0], 2 * (u[1] - Reaction().initial(points[1, :1])[0]))))
    with pytest.raises(ValueError, match="derivatives"):
        PinnModel(Reaction(), net, "finite-differences")  # type: ignore[arg-type]
    # a batch of residual rows alone does not depend on the output bias: its gradient is zero, not None
    convection = PinnModel(Convection(), net)
    convection(torch.tensor([[1.0, 0.5, RESIDUAL, 2.0], [3.0, 0.25, RESIDUAL, 2.0]])).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters()) and float(net[-1].bias.grad) == 0.0
    assert float(net[0].weight.grad.abs().sum()) > 0


def test_adam_full_batch_steps_lower_the_loss_and_log_l2re_and_terms() -> None:
    options = {"n_residual": 300, "width": 16, "n_validation": 256}
    n_train = 300 + 257 + 101
    initial = build_supervised("pinn-reaction", seed=0, **options)
    with torch.no_grad():
        start = float(initial.loss_fn(initial.model, *initial.problem.train))
    config = TrainConfig(workload="pinn-reaction", optimizer="adam", epochs=3, batch_size=n_train, device="cpu",
                         workload_options=options, optimizer_args={"lr": 1e-3})
    result = train(config)
    losses = [m.train_loss for m in result.history]
    assert start > losses[0] > losses[1] > losses[2]
    assert result.final.steps == 3
    for metrics in result.history:
        scores = metrics.scores
        assert {"val_l2re", "test_l2re", "loss_residual", "loss_initial", "loss_boundary"} <= set(scores)
        assert 0 < scores["val_l2re"] < 10 and 0 < scores["test_l2re"] < 10
        parts = scores["loss_residual"] + scores["loss_initial"] + scores["loss_boundary"]
        assert parts == pytest.approx(metrics.train_loss, rel=1e-5)
    # minibatches mix the kinds: each is an unbiased estimate of the full loss
    minibatch = train(TrainConfig(workload="pinn-wave", optimizer="adam", epochs=1, batch_size=128, device="cpu",
                                  workload_options=options))
    assert minibatch.final.steps == math.ceil((300 + 2 * 257 + 2 * 101) / 128)
    assert math.isfinite(minibatch.final.train_loss)
