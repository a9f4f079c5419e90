"""state_dict round trips: a loaded optimizer steps exactly like the one it was saved from."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from fuse_optim import Fuse, FusePV

GENERATOR = torch.Generator().manual_seed(0)
INPUTS = torch.randn(96, 5, generator=GENERATOR, dtype=torch.float64)
TARGETS = torch.randint(0, 3, (96,), generator=GENERATOR)


def make_params() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [(0.1 * torch.randn(5, 3, generator=generator, dtype=torch.float64)).requires_grad_(),
            torch.zeros(3, dtype=torch.float64, requires_grad=True)]


def minibatch_closure(opt: torch.optim.Optimizer, params: list[torch.Tensor], step: int):
    """Softmax regression with L2 on the minibatch of 16 samples drawn for ``step``."""
    index = torch.randperm(96, generator=torch.Generator().manual_seed(100 + step))[:16]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        weights, bias = params
        logits = INPUTS[index] @ weights + bias
        loss = torch.nn.functional.cross_entropy(logits, TARGETS[index]) + 1e-2 * (weights**2).sum()
        loss.backward()
        return loss

    return closure


def step_both(pairs, start: int, count: int, epoch_every: int = 6) -> float:
    """Step every (optimizer, params) in lockstep on the same minibatches; return the largest difference."""
    worst = 0.0
    for step in range(start, start + count):
        for opt, params in pairs:
            opt.step(minibatch_closure(opt, params, step))
            if (step + 1) % epoch_every == 0:
                opt.end_epoch()
        (_, reference), *others = pairs
        for _, params in others:
            worst = max(worst, max((a - b).abs().max().item() for a, b in zip(reference, params, strict=True)))
    return worst


FACTORIES = {
    "adam_phase": lambda p: FusePV(p, lr=1e-2, switch={"criterion": "never"}),
    "adam_amsgrad_groups": lambda p: FusePV([{"params": p[:1], "lr": 1e-2}, {"params": p[1:], "lr": 1e-3}],
                                            amsgrad=True, switch={"criterion": "never"}),
    "across_step_switch": lambda p: FusePV(p, lr=1e-2, switch={"criterion": "step", "step": 10}),
    "across_epoch_switch": lambda p: FusePV(p, lr=1e-2, switch={"criterion": "epoch", "epoch": 2}),
    "across_grad_norm_window": lambda p: FusePV(p, lr=1e-2, switch={"criterion": "grad_norm", "zeta": 0.245,
                                                                     "window": 4}),
    "across_loss_change": lambda p: FusePV(p, lr=5e-2, switch={"criterion": "loss_change", "sigma": 0.005}),
    "lbfgs_armijo": lambda p: FusePV(p, lr=1e-2, switch={"criterion": "step", "step": 3}, history_size=4),
    "lbfgs_strong_wolfe": lambda p: FusePV(p, switch={"criterion": "step", "step": 0}, line_search="strong_wolfe",
                                           history_size=3),
    "lbfgs_fixed_damped": lambda p: FusePV(p, switch={"criterion": "step", "step": 2}, line_search="fixed",
                                           curvature="damp", history_size=3),
    "lbfgs_adam_scaled": lambda p: FusePV(p, lr=1e-2, switch={"criterion": "step", "step": 5},
                                          initial_inverse_hessian="adam"),
    "fuse_linear": lambda p: Fuse(p, lr=1e-2, theta={"schedule": "linear", "steps": 20}),
    "fuse_constant_blend": lambda p: Fuse(p, lr=1e-2, theta=0.5, line_search="strong_wolfe"),
    "fuse_lbfgs_only": lambda p: Fuse(p, theta=0.0),
}


LOCKSTEP_CASES = [(name, save_at) for name in sorted(FACTORIES) for save_at in (7, 13)] + [
    ("adam_phase", 0), ("lbfgs_strong_wolfe", 0), ("fuse_linear", 0)]  # saved before any step


@pytest.mark.parametrize(("name", "save_at"), LOCKSTEP_CASES)
def test_lockstep_after_load(name: str, save_at: int) -> None:
    factory = FACTORIES[name]
    source_params = make_params()
    source = factory(source_params)
    step_both([(source, source_params)], 0, save_at)
    loaded_params = [p.detach().clone().requires_grad_() for p in source_params]
    loaded = factory(loaded_params)
    loaded.load_state_dict(source.state_dict())
    assert loaded.phase == source.phase and loaded.step_count == source.step_count == save_at
    assert step_both([(source, source_params), (loaded, loaded_params)], save_at, 18) == 0.0
    assert source.step_count == save_at + 18
    if name.startswith("across") and save_at < 10:
        assert source.phase == "lbfgs" and source.switched_at_step > save_at  # the switch happened after loading
        assert loaded.switched_at_step == source.switched_at_step
        assert loaded.switch_reason == source.switch_reason
    assert loaded.closure_calls == source.closure_calls and loaded.pairs_accepted == source.pairs_accepted


@pytest.mark.parametrize("name", ["adam_phase", "across_grad_norm_window", "lbfgs_armijo", "lbfgs_adam_scaled",
                                  "fuse_linear"])
def test_round_trip_through_torch_save(name: str) -> None:
    factory = FACTORIES[name]
    source_params = make_params()
    source = factory(source_params)
    step_both([(source, source_params)], 0, 9)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # the default, weights_only=True, must be able to read it
    loaded_params = [p.detach().clone().requires_grad_() for p in source_params]
    loaded = factory(loaded_params)
    loaded.load_state_dict(state)
    assert step_both([(source, source_params), (loaded, loaded_params)], 9, 20) == 0.0


def tensors_in(optimizer) -> list[torch.Tensor]:
    found = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    memory = optimizer._memory
    if memory is not None:
        found += [memory.s, memory.y, memory.rho]
    return found + [t for t in (optimizer._adam_scale, optimizer._last_good) if t is not None]


@pytest.mark.parametrize("name", ["lbfgs_adam_scaled", "fuse_linear", "adam_phase"])
def test_loaded_optimizer_shares_no_tensors_with_the_source(name: str) -> None:
    factory = FACTORIES[name]
    source_params = make_params()
    source = factory(source_params)
    step_both([(source, source_params)], 0, 9)
    saved = io.BytesIO()
    torch.save(source.state_dict(), saved)
    loaded_params = [p.detach().clone().requires_grad_() for p in source_params]
    loaded = factory(loaded_params)
    loaded.load_state_dict(source.state_dict())
    pointers = {t.untyped_storage().data_ptr() for t in tensors_in(source) if t.numel()}
    assert not pointers & {t.untyped_storage().data_ptr() for t in tensors_in(loaded) if t.numel()}
    # behaviourally: stepping the source on its own leaves the loaded optimizer where it was
    step_both([(source, source_params)], 9, 5)
    saved.seek(0)
    reference_params = [p.detach().clone().requires_grad_() for p in loaded_params]
    reference = factory(reference_params)
    reference.load_state_dict(torch.load(saved))
    assert step_both([(loaded, loaded_params), (reference, reference_params)], 9, 10) == 0.0


def test_state_dict_is_a_snapshot() -> None:
    params = make_params()
    opt = FACTORIES["lbfgs_armijo"](params)
    step_both([(opt, params)], 0, 8)
    state = opt.state_dict()
    frozen = copy.deepcopy(state)
    step_both([(opt, params)], 8, 3)
    for key in ("memory", "last_good"):
        value, expected = state["state"][0]["fuse"][key], frozen["state"][0]["fuse"][key]
        if isinstance(value, dict):
            for name in ("s", "y", "rho"):
                assert torch.equal(value[name], expected[name])
        else:
            assert torch.equal(value, expected)
    assert state["state"][0]["fuse"]["step"] == 8


def test_global_state_contents() -> None:
    params = make_params()
    opt = FACTORIES["lbfgs_armijo"](params)
    step_both([(opt, params)], 0, 8)
    state = opt.state_dict()
    # the global state rides in the first parameter's state: tools that keep only "state" and
    # "param_groups" (torch.distributed.checkpoint) keep it too
    assert set(state) == {"state", "param_groups"}
    fuse = state["state"][0]["fuse"]
    assert fuse["format"] == 2
    assert (fuse["phase"], fuse["step"], fuse["epoch"], fuse["switched_at_step"]) == ("lbfgs", 8, 1, 3)
    assert fuse["closure_calls"] == opt.closure_calls and fuse["recoveries"] == opt.recoveries
    assert fuse["criterion_config"] == {"criterion": "step", "step": 3}
    group = state["param_groups"][0]
    assert (group["history_size"], group["line_search"], group["lbfgs_lr"]) == (4, "armijo", 0.1)


def test_load_refuses_mismatched_state_before_changing_anything() -> None:
    params = make_params()
    opt = FACTORIES["lbfgs_armijo"](params)
    step_both([(opt, params)], 0, 6)
    target = FusePV(make_params(), switch={"criterion": "step", "step": 4})
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="switch"):
        target.load_state_dict(opt.state_dict())
    longer = [torch.zeros(5, 3, dtype=torch.float64, requires_grad=True),
              torch.zeros(4, dtype=torch.float64, requires_grad=True)]
    with pytest.raises(ValueError, match="memory over 18 parameters, this optimizer has 19"):
        FACTORIES["lbfgs_armijo"](longer).load_state_dict(opt.state_dict())
    assert target.state_dict()["param_groups"] == before["param_groups"] and target.phase == "adam"
    # as with any torch optimizer, the saved hyperparameters replace the constructor's
    other_params = [p.detach().clone().requires_grad_() for p in params]
    other = FusePV(other_params, switch={"criterion": "step", "step": 3}, history_size=5, line_search="fixed")
    other.load_state_dict(opt.state_dict())
    assert (other.param_groups[0]["history_size"], other.param_groups[0]["line_search"]) == (4, "armijo")
    assert step_both([(opt, params), (other, other_params)], 6, 10) == 0.0


def test_lr_scheduler_state_and_optimizer_state_together() -> None:
    pairs = []
    for _ in range(2):
        params = make_params()
        opt = FusePV(params, lr=1e-1, switch={"criterion": "never"})
        pairs.append((opt, params, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)))
    (source, source_params, source_scheduler), (loaded, loaded_params, loaded_scheduler) = pairs
    for step in range(5):
        source.step(minibatch_closure(source, source_params, step))
        source_scheduler.step()
    loaded.load_state_dict(source.state_dict())
    loaded_scheduler.load_state_dict(source_scheduler.state_dict())
    for p, q in zip(loaded_params, source_params, strict=True):
        p.data.copy_(q.data)
    for step in range(5, 15):
        for opt, params, scheduler in pairs:
            opt.step(minibatch_closure(opt, params, step))
            scheduler.step()
    assert all(torch.equal(p, q) for p, q in zip(loaded_params, source_params, strict=True))
    assert loaded.param_groups[0]["lr"] == source.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**15)


def test_relative_gradient_tolerance_survives_load(quadratic_problem) -> None:
    """tolerance_grad is relative to the gradient at the first L-BFGS step: that reference must round-trip."""
    a, b = quadratic_problem["A"], quadratic_problem["b"]

    def make(x):
        return FusePV([x], switch={"criterion": "step", "step": 0}, line_search="strong_wolfe", tolerance_grad=1e-3)

    def closure_for(opt, x):
        def closure():
            opt.zero_grad()
            loss = 0.5 * x @ a @ x - b @ x
            loss.backward()
            return loss
        return closure

    x = quadratic_problem["x0"].clone().requires_grad_()
    source = make(x)
    for _ in range(18):  # the gradient is by now far smaller than at the first step
        source.step(closure_for(source, x))
    assert source.last_step_info.grad_norm < 1e-2 * source.state_dict()["state"][0]["fuse"]["grad_reference"]
    loaded_x = x.detach().clone().requires_grad_()
    loaded = make(loaded_x)
    loaded.load_state_dict(source.state_dict())
    failures = []
    for _ in range(30):
        for opt, params in ((source, x), (loaded, loaded_x)):
            opt.step(closure_for(opt, params))
        failures.append(source.last_step_info.failure)
        assert torch.equal(x, loaded_x) and loaded.last_step_info.failure == failures[-1]
    assert "converged" in failures  # the relative stopping test was reached, identically in both
