"""2-D Rosenbrock from (-1.5, 2), float64: closure calls to reach f < 1e-10.

FusePV with the switch at step 0 (L-BFGS from the first step), ``line_search="strong_wolfe"``,
m = 10, one ``step()`` per loop, against ``torch.optim.LBFGS`` (strong Wolfe, m = 10,
``max_iter=1``, ``max_eval=25``) driven the same way, and torch's default ``max_eval`` (which
takes no step at all when ``max_iter=1``: ``max_eval`` defaults to ``max_iter * 5 // 4 = 1``, the
closure's first call uses it up, and the strong-Wolfe search is left ``max_ls = 0`` evaluations;
measured here, f stays at its starting value 12.5, see BENCHMARKS.md, "L-BFGS from the first step on
2-D Rosenbrock").

Run: ``.venv/bin/python -m benchmarks.bench_rosenbrock``
"""

from __future__ import annotations

import torch

from fuse_optim import FusePV
from fuse_optim.test_functions import rosenbrock


def calls_to_target(make_optimizer, target: float = 1e-10, limit: int = 2000) -> tuple[int, float]:
    x = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([x])
    calls = [0]

    def closure():
        calls[0] += 1
        optimizer.zero_grad()
        loss = rosenbrock(x)
        loss.backward()
        return loss

    for _ in range(limit):
        optimizer.step(closure)
        value = float(rosenbrock(x.detach()))
        if value < target or calls[0] >= limit:
            break
    return calls[0], value


def main() -> None:
    candidates = {
        "FusePV(switch step 0, strong_wolfe, m=10)": lambda p: FusePV(
            p, switch={"criterion": "step", "step": 0}, line_search="strong_wolfe"),
        "torch.optim.LBFGS(strong_wolfe, m=10, max_iter=1, max_eval=25)": lambda p: torch.optim.LBFGS(
            p, history_size=10, max_iter=1, max_eval=25, line_search_fn="strong_wolfe", tolerance_grad=0,
            tolerance_change=0),
        "torch.optim.LBFGS(strong_wolfe, m=10, max_iter=1, default max_eval)": lambda p: torch.optim.LBFGS(
            p, history_size=10, max_iter=1, line_search_fn="strong_wolfe"),
    }
    print("| optimizer | closure calls | final f |\n|---|---|---|")
    for name, make in candidates.items():
        calls, value = calls_to_target(make, limit=400)
        print(f"| {name} | {calls}{' (limit)' if value >= 1e-10 else ''} | {value:.3e} |")


if __name__ == "__main__":
    main()
