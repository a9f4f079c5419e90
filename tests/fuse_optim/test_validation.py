"""Bad arguments raise errors that name the argument; unsupported uses raise RuntimeError."""

from __future__ import annotations

import pytest
import torch

from fuse_optim import Fuse, FusePV

BAD_ARGUMENTS = [
    ({"lr": -1e-3}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": "0.1"}, "lr"),
    ({"betas": (1.0, 0.999)}, "betas"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"betas": (-0.1, 0.999)}, "betas"),
    ({"betas": (0.9,)}, "betas"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"amsgrad": "yes"}, "amsgrad"),
    ({"eps_inside_sqrt": 1}, "eps_inside_sqrt"),
    ({"eps_inside_sqrt": True, "amsgrad": True}, "eps_inside_sqrt"),
    ({"eps_inside_sqrt": True, "fused": True}, "eps_inside_sqrt"),
    ({"history_size": 0}, "history_size"),
    ({"history_size": 1.5}, "history_size"),
    ({"history_size": True}, "history_size"),
    ({"line_search": "wolfe"}, "line_search"),
    ({"line_search": "Armijo"}, "line_search"),
    ({"lbfgs_lr": 0.0}, "lbfgs_lr"),
    ({"lbfgs_lr": -1.0}, "lbfgs_lr"),
    ({"lbfgs_lr": float("inf")}, "lbfgs_lr"),
    ({"c1": 0.0}, "c1"),
    ({"c1": 1.0}, "c1"),
    ({"c1": 0.5, "c2": 0.4}, "c2"),
    ({"c1": 0.5, "c2": 0.5}, "c2"),
    ({"c2": 1.0}, "c2"),
    ({"max_evaluations": 0}, "max_evaluations"),
    ({"max_evaluations": 2.5}, "max_evaluations"),
    ({"max_evaluations": True}, "max_evaluations"),
    ({"shrink": 0.0}, "shrink"),
    ({"shrink": 1.0}, "shrink"),
    ({"curvature": "none"}, "curvature"),
    ({"curvature_eps": -1e-8}, "curvature_eps"),
    ({"initial_inverse_hessian": "identity"}, "initial_inverse_hessian"),
    ({"tolerance_grad": -1e-10}, "tolerance_grad"),
    ({"tolerance_change": -1.0}, "tolerance_change"),
]


def param() -> torch.Tensor:
    return torch.zeros(3, requires_grad=True)


@pytest.mark.parametrize("optimizer_class", [FusePV, Fuse])
@pytest.mark.parametrize(("options", "named"), BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (_, n) in
                                                                  enumerate(BAD_ARGUMENTS)])
def test_bad_hyperparameter_names_the_argument(optimizer_class, options: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named) as error:
        optimizer_class([param()], **options)
    assert "\n" not in str(error.value)  # one line


@pytest.mark.parametrize("optimizer_class", [FusePV, Fuse])
def test_good_edge_values_are_accepted(optimizer_class) -> None:
    optimizer_class([param()], lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, history_size=1,
                    line_search=None, c1=1e-9, c2=0.999999, max_evaluations=1, shrink=0.999, curvature="damp",
                    curvature_eps=0.0, initial_inverse_hessian="adam", tolerance_grad=0.0, tolerance_change=0.0)


@pytest.mark.parametrize(("switch", "named"), [
    ({"criterion": "epochs"}, "criterion"),
    ({"criterion": "epoch"}, "epoch"),
    ({"criterion": "step", "step": -1}, "step"),
    ({"criterion": "grad_norm", "zeta": 0}, "zeta"),
    ({"criterion": "grad_norm", "zeta": 1e-3, "windo": 5}, "windo"),
    ({"criterion": "loss_change", "sigma": 1e-3, "relative": 1}, "relative"),
    ({"criterion": "any", "of": "step"}, "of"),
    (42, "switch"),
])
def test_bad_switch(switch, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        FusePV([param()], switch=switch)


@pytest.mark.parametrize(("theta", "named"), [
    (1.5, "theta"),
    (-0.5, "theta"),
    ("cosine", "theta"),
    ({"schedule": "linear"}, "steps"),
    ({"schedule": "linear", "steps": -5}, "steps"),
    ({"schedule": "sawtooth"}, "schedule"),
])
def test_bad_theta(theta, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Fuse([param()], theta=theta)


def test_param_groups_must_share_lbfgs_settings() -> None:
    a, b = param(), param()
    with pytest.raises(ValueError, match="history_size"):
        FusePV([{"params": [a], "history_size": 5}, {"params": [b], "history_size": 10}])
    with pytest.raises(ValueError, match="line_search"):
        Fuse([{"params": [a]}, {"params": [b], "line_search": "fixed"}])
    opt = FusePV([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-1, "betas": (0.5, 0.9)}])
    with pytest.raises(ValueError, match="c1"):
        opt.add_param_group({"params": [param()], "c1": 0.3})
    opt.add_param_group({"params": [param()], "lr": 0.5, "weight_decay": 0.1})  # Adam settings may differ
    assert len(opt.param_groups) == 3


def embedding_problem(optimizer_class, **options):
    embedding = torch.nn.Embedding(5, 2, sparse=True)
    opt = optimizer_class(embedding.parameters(), **options)

    def closure():
        opt.zero_grad()
        loss = embedding(torch.tensor([0, 3])).pow(2).sum()
        loss.backward()
        return loss

    return opt, closure


@pytest.mark.parametrize(("optimizer_class", "options"), [
    (FusePV, {"switch": "never"}),
    (FusePV, {"switch": {"criterion": "step", "step": 0}}),
    (Fuse, {"theta": 1.0}),
    (Fuse, {"theta": 0.5}),
])
def test_sparse_gradients_raise_runtime_error(optimizer_class, options: dict) -> None:
    opt, closure = embedding_problem(optimizer_class, **options)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(closure)


def test_lbfgs_phase_needs_a_closure() -> None:
    x = param()
    opt = FusePV([x], switch={"criterion": "step", "step": 1})
    (x**2).sum().backward()
    opt.step()  # the Adam step accepts precomputed gradients
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_step_without_closure_raises_before_anything_moves_when_the_criterion_reads_the_loss() -> None:
    """``loss.backward(); opt.step()`` with the default (loss-change) criterion: one line, nothing changed."""
    x = torch.ones(3, requires_grad=True)
    opt = FusePV([x])
    (x**2).sum().backward()
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="'loss_change' switch criterion reads it"):
        opt.step()
    assert torch.equal(x.detach(), before) and opt.step_count == 0 and "step" not in opt.state[x]
    FusePV([x], switch={"criterion": "epoch", "epoch": 3}).step()  # a criterion that needs no loss: Adam's way
    assert not torch.equal(x.detach(), before)
