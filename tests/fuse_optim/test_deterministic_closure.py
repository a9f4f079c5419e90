"""``deterministic_closure=True``: on a full-batch objective the L-BFGS phase reuses the loss and gradient its line
search computed at the accepted point instead of calling the closure there again (issue: one evaluation per
iteration, not two). The iterates must be bit for bit those of the default, with fewer closure calls."""

from __future__ import annotations

import copy

import pytest
import torch

from fuse_optim import Fuse, FusePV
from fuse_optim.test_functions import get_test_function


def _run(deterministic: bool, line_search: str, steps: int = 40, edit_at: int | None = None,
         optimizer: type = FusePV) -> tuple[torch.Tensor, int, list[float], list[float]]:
    fn = get_test_function("rosenbrock").fn
    x = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    options = {"switch": {"criterion": "step", "step": 0}} if optimizer is FusePV else {"theta": 0.0}
    opt = optimizer([x], lr=1e-3, line_search=line_search, deterministic_closure=deterministic, **options)
    calls = [0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        calls[0] += 1
        loss = fn(x)
        loss.backward()
        return loss

    iterates, returned, at_start = [], [], []
    for step in range(steps):
        if edit_at is not None and step == edit_at:
            with torch.no_grad():
                x.add_(1e-3)  # a user's edit between steps: the cached evaluation is no longer at x_k
        with torch.no_grad():
            at_start.append(float(fn(x)))
        returned.append(float(opt.step(closure)))
        iterates.append(x.detach().clone())
    return torch.stack(iterates), calls[0], returned, at_start


@pytest.mark.parametrize("line_search", ["strong_wolfe", "armijo"])
@pytest.mark.parametrize("optimizer", [FusePV, Fuse])
def test_same_iterates_with_one_evaluation_fewer_per_iteration(line_search: str, optimizer: type) -> None:
    reference, reference_calls, _, _ = _run(False, line_search, optimizer=optimizer)
    reused, reused_calls, returned, at_start = _run(True, line_search, optimizer=optimizer)
    assert torch.equal(reference, reused)
    assert reused_calls <= reference_calls - 30  # 40 iterations, nearly all with an accepted step
    assert returned == at_start  # step() still returns the loss at x_k, as torch.optim.LBFGS does


def test_an_edit_between_steps_is_evaluated_again() -> None:
    reference, reference_calls, _, _ = _run(False, "strong_wolfe", edit_at=10)
    reused, reused_calls, returned, at_start = _run(True, "strong_wolfe", edit_at=10)
    assert torch.equal(reference, reused) and returned == at_start
    untouched_calls = _run(True, "strong_wolfe")[1]
    assert reused_calls > untouched_calls - 5  # the step after the edit called the closure at the edited x_k


def test_the_default_evaluates_x_k_every_step() -> None:
    _, calls, _, _ = _run(False, "armijo", steps=10)
    assert calls >= 20  # x_k and at least one trial point per iteration


def test_a_loaded_state_dict_continues_exactly() -> None:
    """The cache is not state: a copy of the optimizer (or one loaded from its state dict) evaluates x_k once and
    then continues as the original does."""
    fn = get_test_function("rosenbrock").fn
    x = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = FusePV([x], lr=1e-3, switch={"criterion": "step", "step": 0}, line_search="strong_wolfe",
                 deterministic_closure=True)

    def closure_for(parameter: torch.Tensor, optimizer: FusePV):
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = fn(parameter)
            loss.backward()
            return loss
        return closure

    for _ in range(5):
        opt.step(closure_for(x, opt))
    y = x.detach().clone().requires_grad_(True)
    other = FusePV([y], lr=1e-3, switch={"criterion": "step", "step": 0}, line_search="strong_wolfe",
                   deterministic_closure=True)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(10):
        opt.step(closure_for(x, opt))
        other.step(closure_for(y, other))
    assert torch.equal(x, y)


def test_the_flag_is_checked() -> None:
    with pytest.raises(ValueError, match="deterministic_closure"):
        FusePV([torch.zeros(2, requires_grad=True)], deterministic_closure="yes")
