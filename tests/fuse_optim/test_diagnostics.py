"""Per-step diagnostics (``last_step_info``) report what actually happened in the step."""

from __future__ import annotations

import pytest
import torch

from fuse_optim import Fuse, FusePV, StepInfo

TARGET = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
SCALES = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)


def fn(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (SCALES * (x - TARGET) ** 2).sum() + 0.1 * ((x - TARGET) ** 4).sum()


def gradient(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    fn(x).backward()
    return x.grad


def test_adam_phase_info(make_closure) -> None:
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = FusePV([x], lr=0.1, switch={"criterion": "step", "step": 100}, track_grad_norm=True)
    closure = make_closure(opt, [x], fn)
    for _ in range(3):
        x_k = x.detach().clone()
        loss = opt.step(closure)
        info = opt.last_step_info
        assert isinstance(info, StepInfo)
        assert info.phase == "adam" and info.step_size is None and info.theta is None and info.failure is None
        assert info.closure_calls == 1 and opt.closure_calls == make_closure.calls
        assert float(info.loss) == pytest.approx(fn(x_k).item(), rel=1e-15) == loss.item()
        assert float(info.grad_norm) == pytest.approx(gradient(x_k).norm().item(), rel=1e-12)
        assert (info.pairs_accepted, info.pairs_skipped, info.recoveries) == (0, 0, 0)
    as_dict = info.as_dict()
    assert isinstance(as_dict["loss"], float) and isinstance(as_dict["grad_norm"], float)
    assert set(as_dict) >= {"phase", "loss", "grad_norm", "step_size", "closure_calls", "pairs_accepted",
                            "pairs_skipped", "recoveries"}


@pytest.mark.parametrize("policy", ["strong_wolfe", "armijo", "fixed"])
def test_lbfgs_phase_info(make_closure, policy: str) -> None:
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = FusePV([x], switch={"criterion": "step", "step": 0}, line_search=policy, lbfgs_lr=1.0)
    closure = make_closure(opt, [x], fn)
    for k in range(8):
        x_k = x.detach().clone()
        grad_k = gradient(x_k)
        before, accepted_before = make_closure.calls, opt.pairs_accepted
        opt.step(closure)
        info = opt.last_step_info
        assert info.phase == "lbfgs" and info.failure is None and info.recoveries == 0
        assert info.loss == fn(x_k).item()
        assert info.grad_norm == pytest.approx(grad_k.norm().item(), rel=1e-12)
        assert info.closure_calls == make_closure.calls - before >= 2
        if policy == "fixed":
            assert info.closure_calls == 2
        assert info.pairs_accepted == opt.pairs_accepted == accepted_before + 1
        assert info.pairs_skipped == 0
        if k == 0:
            # empty memory: d = -g, and the first trial step is lbfgs_lr * min(1, 1 / ||g||_1)
            torch.testing.assert_close(x.detach(), x_k - info.step_size * grad_k, rtol=0, atol=1e-15)
            if policy == "fixed":
                assert info.step_size == pytest.approx(min(1.0, 1.0 / grad_k.abs().sum().item()))
        else:
            assert info.step_size > 0
    assert opt.closure_calls == make_closure.calls
    assert opt.step_count == 8


def test_skipped_pairs_are_counted(make_closure) -> None:
    # a linear function has no curvature: every pair is skipped (y = 0)
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = FusePV([x], switch={"criterion": "step", "step": 0}, line_search="fixed")
    closure = make_closure(opt, [x], lambda v: (TARGET * v).sum())
    for k in range(3):
        opt.step(closure)
        assert (opt.last_step_info.pairs_accepted, opt.last_step_info.pairs_skipped) == (0, k + 1)


def test_converged_step_is_reported(make_closure) -> None:
    x = TARGET.clone().requires_grad_()
    x.data[0] += 1.0
    opt = FusePV([x], switch={"criterion": "step", "step": 0}, line_search="strong_wolfe")
    closure = make_closure(opt, [x], fn)
    for _ in range(60):
        opt.step(closure)
        if opt.last_step_info.failure == "converged":
            break
    info = opt.last_step_info
    assert info.failure == "converged" and info.step_size == 0.0 and info.closure_calls == 1
    assert torch.allclose(x.detach(), TARGET, atol=1e-9)


def test_fuse_step_info(make_closure) -> None:
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    fuse = Fuse([x], lr=0.1, theta={"schedule": "step", "boundaries": [1, 2], "values": [1.0, 0.4, 0.0]},
                line_search="armijo", lbfgs_lr=1.0)
    closure = make_closure(fuse, [x], fn)
    expected = [(1.0, "adam", 1), (0.4, "blend", 3), (0.0, "lbfgs", 2)]
    for theta, phase, calls in expected:
        before = make_closure.calls
        fuse.step(closure)
        info = fuse.last_step_info
        assert info.theta == theta and fuse.phase == phase
        assert info.closure_calls == make_closure.calls - before == calls
    assert fuse.closure_calls == make_closure.calls == 6
