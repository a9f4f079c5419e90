"""Before the switch FusePV is torch.optim.Adam, step for step; ``eps_inside_sqrt`` is the paper's Eq. 2c."""

from __future__ import annotations

import math

import pytest
import torch

from fuse_optim import Fuse, FusePV

NEVER = {"criterion": "never"}

# (id, Adam keyword arguments); "groups" splits the parameters into groups with their own settings
CONFIGS = [
    ("defaults", {}),
    ("lr_1e-2", {"lr": 1e-2}),
    ("betas", {"lr": 3e-2, "betas": (0.5, 0.9)}),
    ("beta1_zero", {"lr": 1e-2, "betas": (0.0, 0.99)}),
    ("weight_decay", {"lr": 1e-2, "weight_decay": 0.1}),
    ("amsgrad", {"lr": 1e-2, "amsgrad": True}),
    ("amsgrad_weight_decay", {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-2}),
    ("eps_large", {"lr": 1e-2, "eps": 1e-3}),
    ("foreach_true", {"lr": 1e-2, "foreach": True}),
    ("foreach_false", {"lr": 1e-2, "foreach": False}),
    ("foreach_none", {"lr": 1e-2, "foreach": None}),
    ("fused", {"lr": 1e-2, "fused": True}),
    ("lr_zero", {"lr": 0.0}),
    ("groups", {"groups": [{"lr": 1e-1}, {"lr": 1e-3, "betas": (0.8, 0.95)}, {"lr": 1e-2, "weight_decay": 0.5}]}),
    ("groups_amsgrad_foreach_false", {"amsgrad": True, "foreach": False,
                                      "groups": [{"lr": 5e-2}, {"lr": 5e-3}, {"lr": 2e-2, "amsgrad": False}]}),
]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
            for shape in shapes]


def loss_fn(params: list[torch.Tensor], step: int) -> torch.Tensor:
    """A non-convex function of all parameters that changes with the step (like minibatches do)."""
    w, b, c = params
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(5, 4, generator=generator, dtype=torch.float64).to(w.dtype)
    hidden = torch.tanh(inputs @ w + b)
    return (hidden**2).sum() + (c**4).sum() - c.sum() * hidden.mean() + 0.1 * (w**2).sum()


def as_groups(params: list[torch.Tensor], config: dict) -> tuple[list, dict]:
    options = dict(config)
    groups = options.pop("groups", None)
    if groups is None:
        return params, options
    return [{"params": [p], **group} for p, group in zip(params, groups, strict=True)], options


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a, b, strict=True))


def same_kernel(options: dict) -> dict:
    """torch.optim.Adam options that select the kernel FusePV runs with ``options``: FusePV's default
    (neither foreach nor fused given) is torch's fused kernel, torch.optim.Adam's is not."""
    if options.get("foreach") is None and options.get("fused") is None:
        return {**options, "foreach": None, "fused": True}
    return options


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("fuse_options", "adam_options"), [
    ({"foreach": False}, {}),  # FusePV(foreach=False) is torch.optim.Adam's CPU default, bit for bit
    ({}, {"fused": True}),  # FusePV's default is torch's fused kernel, bit for bit
    ({"foreach": True}, {"foreach": True}),
])
def test_same_kernel_is_bit_identical_to_torch_adam(fuse_options: dict, adam_options: dict,
                                                    dtype: torch.dtype) -> None:
    reference_params, fuse_params = make_params(dtype), make_params(dtype)
    reference = torch.optim.Adam(reference_params, lr=1e-2, weight_decay=1e-2, **adam_options)
    fuse_pv = FusePV(fuse_params, lr=1e-2, weight_decay=1e-2, switch=NEVER, **fuse_options)
    for step in range(15):
        for opt, params in ((reference, reference_params), (fuse_pv, fuse_params)):
            opt.zero_grad()
            loss_fn(params, step).backward()
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(reference_params, fuse_params, strict=True)), f"step {step}"


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-6)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize(("config_id", "config"), CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("switch", [NEVER, {"criterion": "grad_norm", "zeta": 1e-30, "window": 3}],
                         ids=["never", "grad_norm_never_fires"])
def test_equals_torch_adam_step_for_step(config_id: str, config: dict, dtype: torch.dtype, tolerance: float,
                                         switch: dict) -> None:
    reference_params, fuse_params = make_params(dtype), make_params(dtype)
    reference_groups, options = as_groups(reference_params, config)
    fuse_groups, _ = as_groups(fuse_params, config)
    reference = torch.optim.Adam(reference_groups, **same_kernel(options))
    fuse_pv = FusePV(fuse_groups, switch=switch, **options)
    for step in range(20):
        for opt, params in ((reference, reference_params), (fuse_pv, fuse_params)):
            def closure(opt=opt, params=params):
                opt.zero_grad()
                loss = loss_fn(params, step)
                loss.backward()
                return loss
            opt.step(closure)
        assert max_abs_diff(reference_params, fuse_params) <= tolerance, f"step {step}"
        assert fuse_pv.phase == "adam" and fuse_pv.last_step_info.phase == "adam"
    if config_id != "lr_zero":
        assert max_abs_diff(reference_params, make_params(dtype)) > 1e-3  # the parameters did move
    # the per-parameter state is torch's: same keys, same values
    for p_ref, p_fuse in zip(reference_params, fuse_params, strict=True):
        state_ref, state_fuse = reference.state[p_ref], fuse_pv.state[p_fuse]
        assert set(state_ref) == set(state_fuse)
        for key in state_ref:
            torch.testing.assert_close(state_fuse[key], state_ref[key], rtol=0, atol=tolerance)


def test_closure_none_with_precomputed_gradients() -> None:
    reference_params, fuse_params = make_params(torch.float64), make_params(torch.float64)
    reference = torch.optim.Adam(reference_params, lr=1e-2, weight_decay=1e-3)
    fuse_pv = FusePV(fuse_params, lr=1e-2, weight_decay=1e-3, switch=NEVER)
    for step in range(20):
        for opt, params in ((reference, reference_params), (fuse_pv, fuse_params)):
            opt.zero_grad()
            loss_fn(params, step).backward()
            assert opt.step() is None
        assert max_abs_diff(reference_params, fuse_params) <= 1e-12
    info = fuse_pv.last_step_info
    assert info.closure_calls == 0 and info.loss is None and fuse_pv.closure_calls == 0


def test_parameters_without_grad_are_left_alone() -> None:
    reference_params, fuse_params = make_params(torch.float64), make_params(torch.float64)
    reference = torch.optim.Adam(reference_params, lr=1e-2)
    fuse_pv = FusePV(fuse_params, lr=1e-2, switch=NEVER)
    for step in range(5):
        for opt, params in ((reference, reference_params), (fuse_pv, fuse_params)):
            opt.zero_grad(set_to_none=True)
            loss_fn(params, step).backward()
            params[2].grad = None  # one tensor has no gradient this step
            opt.step()
    assert max_abs_diff(reference_params, fuse_params) <= 1e-12
    assert len(fuse_pv.state[fuse_params[2]]) == 0  # lazy state, as torch's


def test_lr_scheduler_drives_the_adam_phase() -> None:
    reference_params, fuse_params = make_params(torch.float64), make_params(torch.float64)
    reference = torch.optim.Adam(reference_params, lr=1e-1)
    fuse_pv = FusePV(fuse_params, lr=1e-1, switch=NEVER)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (reference, fuse_pv)]
    for step in range(12):
        for opt, params in ((reference, reference_params), (fuse_pv, fuse_params)):
            opt.zero_grad()
            loss_fn(params, step).backward()
            opt.step()
        for scheduler in schedulers:
            scheduler.step()
        assert max_abs_diff(reference_params, fuse_params) <= 1e-12
    assert fuse_pv.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


# --------------------------------------------------------------------------- the paper's Eq. 2c
def textbook_eq2c(params: list[torch.Tensor], steps: int, lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float = 0.0) -> list[torch.Tensor]:
    """m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; x -= lr sqrt(1 - b2^k) / (1 - b1^k) m / sqrt(v + a)."""
    beta1, beta2 = betas
    xs = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(x) for x in xs]
    vs = [torch.zeros_like(x) for x in xs]
    for k in range(1, steps + 1):
        leaves = [x.clone().requires_grad_() for x in xs]
        grads = torch.autograd.grad(loss_fn(leaves, k - 1), leaves)
        for x, m, v, g in zip(xs, ms, vs, grads, strict=True):
            g = g + weight_decay * x
            m.copy_(beta1 * m + (1 - beta1) * g)
            v.copy_(beta2 * v + (1 - beta2) * g * g)
            x.sub_(lr * math.sqrt(1 - beta2**k) / (1 - beta1**k) * m / torch.sqrt(v + eps))
    return xs


@pytest.mark.parametrize(("lr", "betas", "eps", "weight_decay"), [
    (1e-2, (0.9, 0.999), 1e-8, 0.0),
    (5e-2, (0.5, 0.9), 1e-2, 0.0),  # a large eps: inside vs outside the root differ a lot
    (1e-2, (0.9, 0.99), 1e-4, 0.1),
])
def test_eps_inside_sqrt_matches_paper_eq_2c(lr: float, betas: tuple[float, float], eps: float,
                                            weight_decay: float) -> None:
    params = make_params(torch.float64)
    fuse_pv = FusePV(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, eps_inside_sqrt=True,
                     switch=NEVER)
    expected = textbook_eq2c(make_params(torch.float64), 20, lr, betas, eps, weight_decay)
    for step in range(20):
        fuse_pv.zero_grad()
        loss_fn(params, step).backward()
        fuse_pv.step()
    assert max_abs_diff(params, expected) <= 1e-12
    # and it differs from torch's m / (sqrt(v) + eps) when eps is large
    if eps >= 1e-2:
        torch_adam = make_params(torch.float64)
        adam = torch.optim.Adam(torch_adam, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for step in range(20):
            adam.zero_grad()
            loss_fn(torch_adam, step).backward()
            adam.step()
        assert max_abs_diff(params, torch_adam) > 1e-6


def test_fuse_theta_one_eps_inside_sqrt_matches_eq_2c() -> None:
    params = make_params(torch.float64)
    fuse = Fuse(params, lr=1e-2, eps=1e-3, eps_inside_sqrt=True, theta=1.0)
    expected = textbook_eq2c(make_params(torch.float64), 10, 1e-2, (0.9, 0.999), 1e-3)
    for step in range(10):
        fuse.zero_grad()
        loss_fn(params, step).backward()
        fuse.step()
    assert max_abs_diff(params, expected) <= 1e-12


def test_track_grad_norm_reports_the_gradient_norm() -> None:
    params = make_params(torch.float64)
    fuse_pv = FusePV(params, lr=1e-2, switch=NEVER, track_grad_norm=True)
    for step in range(3):
        fuse_pv.zero_grad()
        loss = loss_fn(params, step)
        loss.backward()
        expected = torch.sqrt(sum((p.grad**2).sum() for p in params)).item()
        fuse_pv.step()
        info = fuse_pv.last_step_info
        assert float(info.grad_norm) == pytest.approx(expected, rel=1e-12)
    # without the flag (and a criterion that does not need it) nothing is computed
    untracked = FusePV(make_params(torch.float64), switch=NEVER)
    untracked.zero_grad()
    loss_fn(untracked.param_groups[0]["params"], 0).backward()
    untracked.step()
    assert untracked.last_step_info.grad_norm is None
