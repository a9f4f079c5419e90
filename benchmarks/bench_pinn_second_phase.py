"""The L-BFGS phase on a PINN, from the same Adam point: where torch.optim.LBFGS and FusePV's phase stall.

Rathore et al. (ICML 2024) report that L-BFGS stalls on PINNs: the strong-Wolfe search returns a step of 0
while the gradient norm is still 1e-2 to 1e-3. This measures it, per seed, from one shared starting point:
``--adam-steps`` full-batch ``torch.optim.Adam`` steps (lr ``--adam-lr``) on the workload, then each second
phase for ``--budget`` closure calls (gradient evaluations) from a copy of that model:

- ``torch``: ``torch.optim.LBFGS(lr=1, history_size=100, max_iter=20, line_search_fn="strong_wolfe")``, the PINN
  recipe's second phase (DeepXDE, the paper's code), ``step()`` called until the budget is spent;
- ``fuse_pv-wolfe``: FusePV's L-BFGS phase (``switch`` at step 0, ``history_size=100``, ``lbfgs_lr=1``),
  strong-Wolfe search, ``deterministic_closure=True`` (the trainer's setting for a full-batch objective: the
  accepted point's loss and gradient are reused, one evaluation per iteration);
- ``fuse_pv-wolfe-reeval``: the same, ``deterministic_closure=False`` (x_k evaluated again at every step: two
  evaluations per iteration, what the issue measured);
- ``fuse_pv-armijo``: backtracking Armijo search instead, ``deterministic_closure=True``.

Reported per seed and phase: the final training loss, the test L2RE (the paper's grid), the gradient norm at
the end, the iterations (accepted steps), and the *stalled* steps: for torch, ``step()`` calls that moved the
loss by less than its ``tolerance_change`` (1e-9); for FusePV, steps whose line search failed (``failure`` set).
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_pinn_second_phase [--workload pinn-reaction]
[--seeds 0 1 2 3] [--adam-steps 1000] [--budget 2000] [--n-residual 2000]``
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fuse_optim import FusePV
from fuse_tune.workloads import L2RE, build_supervised

from .bench_step_cost import cpu_description

PHASES = ("torch", "fuse_pv-wolfe", "fuse_pv-wolfe-reeval", "fuse_pv-armijo")


@dataclass
class Outcome:
    loss: float
    l2re: float
    grad_norm: float
    iterations: int
    stalled: int
    evaluations: int
    seconds: float


def _closure(model: torch.nn.Module, objective: Callable, data: tuple[torch.Tensor, torch.Tensor],
             optimizer: torch.optim.Optimizer, counter: list[int]) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        counter[0] += 1
        optimizer.zero_grad(set_to_none=False)
        loss = objective(model, *data)
        loss.backward()
        return loss

    return closure


def _grad_norm(model: torch.nn.Module, objective: Callable, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.zero_grad(set_to_none=False)
    objective(model, *data).backward()
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))


def _l2re(model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(L2RE.finish(L2RE.fn(model(test[0]), test[1])))


def second_phase(name: str, start: torch.nn.Module, objective: Callable, train: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], budget: int) -> Outcome:
    """Run one second phase from a copy of ``start`` until ``budget`` closure calls were made."""
    model = copy.deepcopy(start)
    params = list(model.parameters())
    if name == "torch":
        optimizer = torch.optim.LBFGS(params, lr=1.0, history_size=100, max_iter=20, line_search_fn="strong_wolfe")
    else:
        optimizer = FusePV(params, switch={"criterion": "step", "step": 0}, history_size=100, lbfgs_lr=1.0,
                           line_search="armijo" if name.endswith("armijo") else "strong_wolfe",
                           deterministic_closure=not name.endswith("reeval"))
    counter = [0]
    closure = _closure(model, objective, train, optimizer, counter)
    iterations = stalled = 0
    previous = math.inf
    began = time.perf_counter()
    while counter[0] < budget:
        returned = optimizer.step(closure)
        loss = float(returned.detach()) if isinstance(returned, torch.Tensor) else float(returned)
        if name == "torch":
            state = optimizer.state[params[0]]
            iterations = int(state.get("n_iter", 0))
            stalled += abs(loss - previous) < 1e-9
            previous = loss
        else:
            info = optimizer.last_step_info
            iterations += info.failure is None
            stalled += info.failure is not None
    seconds = time.perf_counter() - began
    with torch.no_grad():
        final = float(objective(model, *train))
    return Outcome(final, _l2re(model, test), _grad_norm(model, objective, train), iterations, stalled, counter[0],
                   seconds)


def adam_start(workload: str, seed: int, steps: int, lr: float, n_residual: int):
    """The shared starting point: ``steps`` full-batch Adam steps from the seed's initial weights."""
    instance = build_supervised(workload, seed=seed, n_residual=n_residual)
    model, problem = instance.model, instance.problem
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        problem.objective(model, *problem.train).backward()
        optimizer.step()
    return model, problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="pinn-reaction")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--adam-steps", type=int, default=1000)
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--n-residual", type=int, default=2000)
    parser.add_argument("--phases", nargs="*", choices=PHASES, default=list(PHASES))
    args = parser.parse_args()
    print(f"# CPU: {cpu_description()}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; {args.workload}, {args.n_residual} "
          f"residual points; Adam {args.adam_steps} steps (lr {args.adam_lr}), then {args.budget} evaluations")
    print("\n| seed | Adam loss | second phase | loss | test L2RE | grad norm | iterations | stalled steps | "
          "evaluations | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        start, problem = adam_start(args.workload, seed, args.adam_steps, args.adam_lr, args.n_residual)
        with torch.no_grad():
            adam_loss = float(problem.objective(start, *problem.train))
        for name in args.phases:
            out = second_phase(name, start, problem.objective, problem.train, problem.test, args.budget)
            print(f"| {seed} | {adam_loss:.3g} | {name} | {out.loss:.3g} | {out.l2re:.3g} | {out.grad_norm:.2g} | "
                  f"{out.iterations} | {out.stalled} | {out.evaluations} | {out.seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
