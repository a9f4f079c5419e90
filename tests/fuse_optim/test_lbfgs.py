"""The L-BFGS phase against references: a textbook L-BFGS written here, the dense BFGS recursion,
torch.optim.LBFGS and scipy's L-BFGS-B on test functions with known minima."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from fuse_optim import Fuse, FusePV, LBFGSMemory
from fuse_optim.line_search import Armijo, StrongWolfe
from fuse_optim.test_functions import TEST_FUNCTIONS

from .problems import spd_matrix, step_iterates

LBFGS_FROM_START = {"criterion": "step", "step": 0}


# --------------------------------------------------------------------------- textbook references
def two_loop(grad: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]],
             scale: torch.Tensor | None = None) -> torch.Tensor:
    """d = -H g by Nocedal & Wright Algorithm 7.4, with H0 = gamma D, gamma = s'y / y'Dy (newest pair)."""
    q = -grad.clone()
    alphas = []
    for s, y in reversed(pairs):  # newest to oldest
        alpha = torch.dot(s, q) / torch.dot(s, y)
        q = q - alpha * y
        alphas.append(alpha)
    diagonal = torch.ones_like(grad) if scale is None else scale
    if pairs:
        s, y = pairs[-1]
        q = q * diagonal * (torch.dot(s, y) / torch.dot(y, diagonal * y))
    else:
        q = q * diagonal
    for (s, y), alpha in zip(pairs, reversed(alphas), strict=True):  # oldest to newest
        beta = torch.dot(y, q) / torch.dot(s, y)
        q = q + (alpha - beta) * s
    return q


def dense_bfgs_direction(grad: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                         scale: torch.Tensor | None = None) -> torch.Tensor:
    """-H g with H_{i+1} = (I - rho s y')H_i(I - rho y s') + rho s s' from H_0 = gamma D (dense matrices)."""
    dim = grad.numel()
    diagonal = torch.ones(dim, dtype=grad.dtype) if scale is None else scale
    s_new, y_new = pairs[-1]
    gamma = torch.dot(s_new, y_new) / torch.dot(y_new, diagonal * y_new)
    h = gamma * torch.diag(diagonal)
    eye = torch.eye(dim, dtype=grad.dtype)
    for s, y in pairs:  # oldest to newest
        rho = 1.0 / torch.dot(s, y)
        v = eye - rho * torch.outer(y, s)
        h = v.T @ h @ v + rho * torch.outer(s, s)
    return -(h @ grad)


def textbook_lbfgs(fn, x0: torch.Tensor, steps: int, history_size: int, lbfgs_lr: float, line_search=None,
                   curvature_eps: float = 1e-8) -> list[torch.Tensor]:
    """Plain L-BFGS: two-loop direction, step t0 = lr (times min(1, 1/||d||_1) while the memory is empty),
    either taken as is or handed to ``line_search``; the pair (t d, g(x + t d) - g(x)) is kept when
    s'y > curvature_eps ||s|| ||y||, oldest pair dropped beyond ``history_size``."""

    def value_and_grad(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        x = x.detach().clone().requires_grad_()
        value = fn(x)
        (grad,) = torch.autograd.grad(value, x)
        return value.item(), grad

    x = x0.clone()
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    iterates = []
    for _ in range(steps):
        loss, grad = value_and_grad(x)
        direction = two_loop(grad, pairs)
        t0 = lbfgs_lr if pairs else lbfgs_lr * min(1.0, 1.0 / float(direction.abs().sum()))
        if line_search is None:
            step = t0
            _, grad_new = value_and_grad(x + step * direction)
        else:
            def evaluate(t: float, x=x, direction=direction) -> tuple[float, torch.Tensor, float]:
                value, g = value_and_grad(x + t * direction)
                return value, g, float(torch.dot(g, direction))

            result = line_search(evaluate, loss, float(torch.dot(grad, direction)), t0)
            assert result.ok, result.failure
            step, grad_new = result.step, result.grad
        s, y = step * direction, grad_new - grad
        if torch.dot(s, y) > curvature_eps * s.norm() * y.norm():
            pairs = (pairs + [(s, y)])[-history_size:]
        x = x + step * direction
        iterates.append(x.clone())
    return iterates


def fuse_pv_iterates(fn, x0: torch.Tensor, steps: int, **options) -> tuple[list[torch.Tensor], FusePV]:
    x = x0.clone().requires_grad_()
    options.setdefault("tolerance_grad", 0.0)
    options.setdefault("switch", LBFGS_FROM_START)
    opt = FusePV([x], **options)
    return step_iterates(opt, x, steps, fn), opt


# --------------------------------------------------------------------------- memory vs dense BFGS
def random_pairs(count: int, dim: int, seed: int, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs (s, A_i s) with SPD A_i, so every pair has s'y > 0 and is accepted."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(count):
        s = torch.randn(dim, generator=generator, dtype=dtype)
        pairs.append((s, spd_matrix(dim, 10.0, seed=seed * 100 + i, dtype=dtype) @ s))
    return pairs


@pytest.mark.parametrize("with_scale", [False, True], ids=["scalar_H0", "diagonal_H0"])
@pytest.mark.parametrize("pushed", [1, 3, 5, 9, 13])
def test_direction_equals_dense_bfgs_recursion(pushed: int, with_scale: bool) -> None:
    dim, history_size = 6, 5
    pairs = random_pairs(pushed, dim, seed=pushed)
    generator = torch.Generator().manual_seed(42)
    scale = torch.rand(dim, generator=generator, dtype=torch.float64) + 0.1 if with_scale else None
    grad = torch.randn(dim, generator=generator, dtype=torch.float64)
    memory = LBFGSMemory(history_size, dim, dtype=torch.float64, device=torch.device("cpu"))
    for s, y in pairs:
        assert memory.push(s, y, scale)
    kept = pairs[-history_size:]  # ring buffer: only the newest history_size pairs remain
    assert memory.count == len(kept)
    assert memory.accepted == pushed and memory.skipped == 0
    direction = memory.direction(grad, scale)
    torch.testing.assert_close(direction, dense_bfgs_direction(grad, kept, scale), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(direction, two_loop(grad, kept, scale), rtol=1e-12, atol=1e-12)
    # the direction is a descent direction (H is positive definite when every s'y > 0)
    assert torch.dot(direction, grad) < 0
    # the newest pair satisfies the secant equation H y = s
    s, y = kept[-1]
    torch.testing.assert_close(-memory.direction(y, scale), s, rtol=1e-10, atol=1e-10)


def test_empty_memory_gives_steepest_descent() -> None:
    memory = LBFGSMemory(3, 4, dtype=torch.float64, device=torch.device("cpu"))
    grad = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    assert torch.equal(memory.direction(grad), -grad)
    scale = torch.tensor([2.0, 1.0, 0.5, 4.0], dtype=torch.float64)
    assert torch.equal(memory.direction(grad, scale), -scale * grad)


def test_wrap_around_keeps_the_newest_pairs_and_reset_forgets() -> None:
    memory = LBFGSMemory(3, 4, dtype=torch.float64, device=torch.device("cpu"))
    pairs = random_pairs(8, 4, seed=3)
    grad = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    for i, (s, y) in enumerate(pairs):
        assert memory.push(s, y)
        assert memory.count == min(i + 1, 3)
        kept = pairs[max(0, i + 1 - 3):i + 1]
        torch.testing.assert_close(memory.direction(grad), dense_bfgs_direction(grad, kept), rtol=1e-12, atol=1e-12)
    # a skipped pair (negative curvature) leaves the stored pairs untouched, oldest included
    s, y = pairs[0]
    assert not memory.push(s, -y)
    assert memory.count == 3 and memory.skipped == 1
    torch.testing.assert_close(memory.direction(grad), dense_bfgs_direction(grad, pairs[-3:]), rtol=1e-12, atol=1e-12)
    memory.reset()
    assert memory.count == 0 and memory.accepted == 8
    assert torch.equal(memory.direction(grad), -grad)
    # after a reset the memory fills again from scratch
    assert memory.push(*pairs[0])
    torch.testing.assert_close(memory.direction(grad), dense_bfgs_direction(grad, pairs[:1]), rtol=1e-12, atol=1e-12)


def test_low_curvature_pairs_are_skipped_scale_invariantly() -> None:
    memory = LBFGSMemory(4, 3, dtype=torch.float64, device=torch.device("cpu"), curvature_eps=1e-2)
    s = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    # cos(s, y) = 0.005 < 1e-2: skipped at every scale of f and x
    y = torch.tensor([0.005, 1.0, 0.0], dtype=torch.float64)
    for factor in (1e-6, 1.0, 1e6):
        assert not memory.push(s * factor, y / factor)
    assert not memory.push(s, -y)  # negative curvature
    assert not memory.push(torch.zeros(3, dtype=torch.float64), y)  # no step
    assert not memory.push(s, torch.full((3,), float("nan"), dtype=torch.float64))
    assert memory.skipped == 6 and memory.count == 0
    # cos(s, y) = 0.0196 > 1e-2: accepted at every scale
    assert memory.push(s * 1e-6, torch.tensor([0.02, 1.0, 0.0], dtype=torch.float64) * 1e6)
    assert memory.count == 1


def test_powell_damping_restores_curvature() -> None:
    memory = LBFGSMemory(4, 3, dtype=torch.float64, device=torch.device("cpu"), curvature="damp")
    s = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    y = torch.tensor([-1.0, 0.1, 3.0], dtype=torch.float64)  # s'y < 0
    assert memory.push(s, y)
    assert memory.damped == 1 and memory.count == 1
    grad = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    gamma0 = float(s.norm() / y.norm())  # B0 = I / gamma0 for the first pair
    # Powell's rule: y_damped = theta y + (1 - theta) B0 s with theta chosen so that s'y_damped = 0.2 s'B0 s
    b0_s = s / gamma0
    theta = 0.8 * float(s @ b0_s) / float(s @ b0_s - s @ y)
    y_damped = theta * y + (1 - theta) * b0_s
    assert float(s @ y_damped) == pytest.approx(0.2 * float(s @ b0_s), rel=1e-12)
    # the memory then behaves exactly as if (s, y_damped) had been pushed
    torch.testing.assert_close(memory.direction(grad), dense_bfgs_direction(grad, [(s, y_damped)]),
                               rtol=1e-12, atol=1e-12)


def test_memory_state_dict_round_trip() -> None:
    memory = LBFGSMemory(3, 5, dtype=torch.float64, device=torch.device("cpu"))
    for s, y in random_pairs(4, 5, seed=8):
        memory.push(s, y)
    copy = LBFGSMemory(3, 5, dtype=torch.float64, device=torch.device("cpu"))
    copy.load_state_dict(memory.state_dict())
    grad = torch.arange(5, dtype=torch.float64)
    assert torch.equal(copy.direction(grad), memory.direction(grad))
    assert (copy.count, copy.gamma, copy.accepted) == (memory.count, memory.gamma, 4)
    assert copy.s.data_ptr() != memory.s.data_ptr()
    with pytest.raises(ValueError, match="history_size"):
        LBFGSMemory(4, 5, dtype=torch.float64, device=torch.device("cpu")).load_state_dict(memory.state_dict())


# --------------------------------------------------------------------------- FusePV vs textbook L-BFGS
def test_fixed_step_iterates_equal_textbook_lbfgs(quadratic_problem) -> None:
    a, b = quadratic_problem["A"], quadratic_problem["b"]

    def fn(x):
        return 0.5 * x @ a @ x - b @ x

    x0 = quadratic_problem["x0"]
    # history 3 < 60 steps in 8-D: the ring buffer wraps many times
    expected = textbook_lbfgs(fn, x0, 60, history_size=3, lbfgs_lr=1.0)
    got, opt = fuse_pv_iterates(fn, x0, 60, history_size=3, line_search="fixed", lbfgs_lr=1.0)
    for k, (x_ref, x_got) in enumerate(zip(expected, got, strict=True)):
        assert (x_ref - x_got).abs().max().item() <= 1e-12, f"iterate {k}"
    assert opt.pairs_accepted == 60 and opt.pairs_skipped == 0
    assert opt.closure_calls == 120  # x_k and x_k + t d on every step
    assert (got[-1] - quadratic_problem["x_star"]).norm() < 1e-5  # and it converges


@pytest.mark.parametrize("policy", ["strong_wolfe", "armijo"])
def test_line_search_iterates_equal_textbook_lbfgs(policy: str) -> None:
    test_function = TEST_FUNCTIONS["rosenbrock"]
    x0 = torch.tensor(test_function.default_start(2), dtype=torch.float64)
    if policy == "strong_wolfe":
        search, options = StrongWolfe(c1=1e-4, c2=0.9, max_evaluations=25, tolerance_change=1e-12), {}
    else:
        search, options = Armijo(c1=1e-4, shrink=0.5, max_evaluations=30), {"max_evaluations": 30, "lbfgs_lr": 1.0}
    steps = 25
    expected = textbook_lbfgs(test_function.fn, x0, steps, history_size=5, lbfgs_lr=1.0, line_search=search)
    got, _ = fuse_pv_iterates(test_function.fn, x0, steps, history_size=5, line_search=policy, **options)
    # Rosenbrock's valley amplifies rounding differences of the two implementations a little
    for k, (x_ref, x_got) in enumerate(zip(expected, got, strict=True)):
        assert (x_ref - x_got).abs().max().item() <= 1e-10, f"iterate {k}"
    assert (got[-1] - x0).abs().max() > 1.0  # it moved: the comparison is not vacuous


def test_adam_initial_inverse_hessian_uses_adams_second_moment() -> None:
    """H0 = D = diag(1 / (sqrt(v_hat) + eps)) from Adam's bias-corrected second moment at the switch."""
    test_function = TEST_FUNCTIONS["rosenbrock"]
    x0 = torch.tensor(test_function.default_start(4), dtype=torch.float64)
    x_adam = x0.clone().requires_grad_()
    adam = torch.optim.Adam([x_adam], lr=1e-2)
    for _ in range(5):
        adam.zero_grad()
        test_function.fn(x_adam).backward()
        adam.step()
    v_hat = adam.state[x_adam]["exp_avg_sq"] / (1 - 0.999**5)
    scale = 1.0 / (v_hat.sqrt() + 1e-8)
    grad = torch.autograd.grad(test_function.fn(x_adam), x_adam)[0]
    direction = -scale * grad
    step = 0.1 * min(1.0, 1.0 / direction.abs().sum().item())
    expected = x_adam.detach() + step * direction

    iterates, _ = fuse_pv_iterates(test_function.fn, x0, 6, lr=1e-2, switch={"criterion": "step", "step": 5},
                                   line_search="fixed", initial_inverse_hessian="adam")
    torch.testing.assert_close(iterates[4], x_adam.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(iterates[5], expected, rtol=0, atol=1e-14)
    # and it is not the plain scalar choice (the test can tell the two apart)
    assert (scale.max() / scale.min()).item() > 2.0


# --------------------------------------------------------------------------- convergence vs other solvers
def run_to_convergence(fn, x0: torch.Tensor, max_steps: int = 500, **options) -> tuple[torch.Tensor, FusePV]:
    x = x0.clone().requires_grad_()
    opt = FusePV([x], switch=LBFGS_FROM_START, line_search="strong_wolfe", **options)

    def closure():
        opt.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss

    for _ in range(max_steps):
        opt.step(closure)
        if opt.last_step_info.failure == "converged":
            break
    return x.detach(), opt


def scipy_minimum(fn, x0: np.ndarray) -> float:
    def value_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        x = torch.tensor(w, requires_grad=True)
        value = fn(x)
        value.backward()
        return value.item(), x.grad.numpy()

    # scipy's BLAS threads spin between calls and starve torch's threads on a 2-core machine
    with threadpool_limits(1, user_api="blas"):
        result = minimize(value_and_grad, x0, jac=True, method="L-BFGS-B",
                          options={"maxiter": 10_000, "gtol": 1e-12, "ftol": 1e-16})
    return float(result.fun)


def digits_logistic(digits, l2: float = 1e-2):
    """Multinomial logistic regression with an L2 penalty on the weights (650 parameters)."""
    inputs, targets = digits

    def fn(w: torch.Tensor) -> torch.Tensor:
        weights = w[:640].view(64, 10)
        return torch.nn.functional.cross_entropy(inputs @ weights + w[640:], targets) + 0.5 * l2 * (weights**2).sum()

    return fn


@pytest.mark.parametrize(("name", "dim", "tolerance", "max_steps"), [
    ("rosenbrock", 2, 1e-12, 100),
    ("rosenbrock", 10, 1e-10, 200),
    ("quadratic", 10, 1e-12, 60),
    ("himmelblau", 2, 1e-12, 50),
    ("digits_logistic_l2", 650, 1e-9, 300),
])
def test_reaches_scipy_optimum(name: str, dim: int, tolerance: float, max_steps: int, digits) -> None:
    if name == "digits_logistic_l2":
        fn, x0 = digits_logistic(digits), np.zeros(dim)
    else:
        test_function = TEST_FUNCTIONS[name]
        fn, x0 = test_function.fn, np.array(test_function.default_start(dim), dtype=np.float64)
    f_star = scipy_minimum(fn, x0)
    if name != "digits_logistic_l2":  # the reference agrees with the table's known minimum
        assert abs(f_star - TEST_FUNCTIONS[name].f_star) <= tolerance
    x = torch.tensor(x0).requires_grad_()
    opt = FusePV([x], switch=LBFGS_FROM_START, line_search="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss

    for _ in range(max_steps):
        opt.step(closure)
        with torch.no_grad():
            gap = fn(x).item() - f_star
        if gap <= tolerance:
            break
    assert gap <= tolerance, f"f - f* = {gap:.3g} after {max_steps} steps"
    assert opt.recoveries == 0 and opt.line_search_failures == 0
    assert opt.last_step_info.phase == "lbfgs" and opt.pairs_accepted > 0


@pytest.mark.parametrize("name", ["rosenbrock", "quadratic"])
def test_same_minimiser_as_torch_lbfgs(name: str) -> None:
    test_function = TEST_FUNCTIONS[name]
    x0 = torch.tensor(test_function.default_start(2), dtype=torch.float64)
    x_fuse, _ = run_to_convergence(test_function.fn, x0, history_size=10)
    x_torch = x0.clone().requires_grad_()
    reference = torch.optim.LBFGS([x_torch], lr=1, history_size=10, max_iter=500, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-16)

    def closure():
        reference.zero_grad()
        loss = test_function.fn(x_torch)
        loss.backward()
        return loss

    reference.step(closure)
    minimiser = torch.tensor(test_function.minimizers(2)[0], dtype=torch.float64)
    assert (x_fuse - x_torch.detach()).abs().max() < 1e-6
    assert (x_fuse - minimiser).abs().max() < 1e-6


# --------------------------------------------------------------------------- groups, dtypes, devices
def split_problem(quadratic_problem):
    a, b = quadratic_problem["A"], quadratic_problem["b"]

    def fn(*parts: torch.Tensor) -> torch.Tensor:
        x = torch.cat([p.reshape(-1) for p in parts])
        return 0.5 * x @ a @ x - b @ x + 0.1 * (x**4).sum()

    return fn


@pytest.mark.parametrize("policy", ["strong_wolfe", "armijo", "fixed"])
def test_several_param_groups_equal_one_flat_vector(policy: str, quadratic_problem) -> None:
    fn = split_problem(quadratic_problem)
    x0 = quadratic_problem["x0"]
    flat = x0.clone().requires_grad_()
    parts = [x0[:3].clone().requires_grad_(), x0[3:7].clone().view(2, 2).requires_grad_(),
             x0[7:].clone().requires_grad_()]
    # groups differ in Adam settings the L-BFGS phase does not use (betas, eps; lr scales the step,
    # so it is the same here) and share the L-BFGS ones
    opt_flat = FusePV([flat], switch=LBFGS_FROM_START, line_search=policy, history_size=4)
    opt_groups = FusePV([{"params": parts[:2], "eps": 1e-3}, {"params": parts[2:], "betas": (0.5, 0.6)}],
                        switch=LBFGS_FROM_START, line_search=policy, history_size=4)
    for _ in range(15):
        for opt, params in ((opt_flat, [flat]), (opt_groups, parts)):
            def closure(opt=opt, params=params):
                opt.zero_grad()
                loss = fn(*params)
                loss.backward()
                return loss
            opt.step(closure)
        joined = torch.cat([p.detach().reshape(-1) for p in parts])
        assert (joined - flat.detach()).abs().max().item() <= 1e-12
    assert opt_groups.pairs_accepted == opt_flat.pairs_accepted > 0


def iterations_to_converge(quadratic_problem, dtype: torch.dtype, policy: str) -> tuple[int, FusePV, torch.Tensor]:
    a, b = quadratic_problem["A"].to(dtype), quadratic_problem["b"].to(dtype)
    x = quadratic_problem["x0"].to(dtype).clone().requires_grad_()
    # a relative gradient tolerance float32 can resolve (the default 1e-10 is below its precision)
    opt = FusePV([x], switch={"criterion": "step", "step": 0}, line_search=policy, lbfgs_lr=1.0,
                 tolerance_grad=1e-5)

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ a @ x - b @ x
        loss.backward()
        return loss

    for iteration in range(60):
        opt.step(closure)
        if opt.last_step_info.failure == "converged":
            return iteration, opt, x
    return 60, opt, x


@pytest.mark.parametrize("policy", ["strong_wolfe", "armijo"])
def test_float32_lbfgs_phase_converges(quadratic_problem, policy: str) -> None:
    """Near the optimum float32 cannot resolve the loss decrease: that is not a failed search. The float32
    run converges with no failure or recovery, in about the iterations float64 needs."""
    iterations64, _, _ = iterations_to_converge(quadratic_problem, torch.float64, policy)
    iterations, opt, x = iterations_to_converge(quadratic_problem, torch.float32, policy)
    assert opt.last_step_info.failure == "converged" and opt.recoveries == 0 and opt.line_search_failures == 0
    assert iterations <= iterations64 + 3, (iterations, iterations64)
    assert x.dtype == torch.float32 and opt._memory.s.dtype == torch.float32
    torch.testing.assert_close(x.detach(), quadratic_problem["x_star"].float(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("switch", [LBFGS_FROM_START, {"criterion": "epoch", "epoch": 5}])
def test_mixed_dtypes_are_refused_at_construction(switch: dict) -> None:
    """Refused before a whole Adam phase is spent, whatever the criterion (but ``never``)."""
    params = [torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)]
    with pytest.raises(ValueError, match="params: .*one dtype"):
        FusePV(params, switch=switch)
    with pytest.raises(ValueError, match="params: .*complex"):
        FusePV([torch.zeros(2, dtype=torch.complex64, requires_grad=True)], switch=switch)
    opt = FusePV(params[:1], switch=switch)
    with pytest.raises(ValueError, match="params: .*one dtype"):
        opt.add_param_group({"params": params[1:]})
    assert len(opt.param_groups) == 1
    FusePV(params, switch={"criterion": "never"})  # Adam alone takes them, as torch.optim.Adam does


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", [
    lambda x: FusePV([x], lr=1e-2, switch={"criterion": "step", "step": 0}, line_search="strong_wolfe"),
    lambda x: FusePV([x], lr=1e-2, switch={"criterion": "step", "step": 5}, line_search="armijo"),
    lambda x: Fuse([x], lr=1e-2, theta=0.5, line_search="strong_wolfe"),
], ids=["lbfgs", "adam_then_lbfgs", "fuse_blend"])
def test_cuda_matches_cpu(make) -> None:
    test_function = TEST_FUNCTIONS["rosenbrock"]
    results = {}
    for device in ("cpu", "cuda"):
        x = torch.tensor(test_function.default_start(4), dtype=torch.float64, device=device, requires_grad=True)
        opt = make(x)

        def closure(opt=opt, x=x):
            opt.zero_grad()
            loss = test_function.fn(x)
            loss.backward()
            return loss

        for _ in range(15):
            opt.step(closure)
        assert torch.isfinite(x).all() and opt.pairs_accepted > 0
        results[device] = x.detach().cpu()
    torch.testing.assert_close(results["cuda"], results["cpu"], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_compact_representation_equals_the_two_loop_recursion(dtype, tolerance) -> None:
    """Large problems use the compact form (Byrd, Nocedal & Schnabel); it must give the two-loop direction."""
    from fuse_optim.lbfgs import LBFGSMemory

    generator = torch.Generator().manual_seed(3)
    d = LBFGSMemory.COMPACT_MIN_DIMENSION
    memory = LBFGSMemory(4, d, dtype=dtype, device=torch.device("cpu"))
    assert memory._use_compact()
    curvature = torch.rand(d, generator=generator, dtype=dtype) + 0.5
    for _ in range(7):  # wraps around the ring buffer
        s = torch.randn(d, generator=generator, dtype=dtype)
        assert memory.push(s, curvature * s)
    grad = torch.randn(d, generator=generator, dtype=dtype)
    compact = memory.direction(grad)
    two_loop = memory._direction_host_scalars(grad, None)
    assert float((compact - two_loop).norm() / two_loop.norm()) < tolerance
    restored = LBFGSMemory(4, d, dtype=dtype, device=torch.device("cpu"))
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.direction(grad), memory.direction(grad))


def test_state_dict_lockstep_on_the_compact_path() -> None:
    """A Gram column still pending at save time is settled identically by the loaded optimizer."""
    generator = torch.Generator().manual_seed(0)
    d = 70_000
    curvature = torch.rand(d, generator=generator, dtype=torch.float64) + 0.5

    def closure_for(opt, x):
        def closure():
            opt.zero_grad()
            loss = 0.5 * (curvature * x * x).sum() + torch.sin(x).sum()
            loss.backward()
            return loss
        return closure

    x1 = torch.randn(d, generator=generator, dtype=torch.float64).requires_grad_()
    o1 = FusePV([x1], switch={"criterion": "step", "step": 0})
    for _ in range(15):
        o1.step(closure_for(o1, x1))
    assert o1._memory._use_compact() and o1._memory._gram_pending is not None
    x2 = x1.detach().clone().requires_grad_()
    o2 = FusePV([x2], switch={"criterion": "step", "step": 0})
    o2.load_state_dict(o1.state_dict())
    for _ in range(10):
        o1.step(closure_for(o1, x1))
        o2.step(closure_for(o2, x2))
        assert torch.equal(x1.detach(), x2.detach())
