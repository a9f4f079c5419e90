"""Fuse (paper Algorithm 3) on 4-D Rosenbrock: accepted step sizes and the final loss.

Both updates of Algorithm 3 start from the same x_k; this run shows the L-BFGS line search's
accepted step t of every step (x^L = x_k + t d) and f after 40 steps, for strong Wolfe and Armijo,
with theta falling linearly from 1 to 0 over the 40 steps and with theta = 0.5 throughout (float64,
start (-1.5, 2, -1.5, 2), Adam lr 1e-2).

    python -m benchmarks.bench_fuse_rosenbrock [--steps 40]
"""

from __future__ import annotations

import argparse

import torch

from fuse_optim import Fuse
from fuse_optim.test_functions import get_test_function


def run(line_search: str, steps: int, theta: dict | float) -> tuple[list[float | None], float]:
    function = get_test_function("rosenbrock")
    x = torch.tensor([-1.5, 2.0, -1.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = Fuse([x], lr=1e-2, theta=theta, line_search=line_search)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = function(x)
        loss.backward()
        return loss

    accepted = []
    for _ in range(steps):
        opt.step(closure)
        accepted.append(opt.last_step_info.step_size)
    with torch.no_grad():
        return accepted, float(function(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    schedules = {"linear 1->0": {"schedule": "linear", "steps": args.steps}, "constant 0.5": 0.5}
    for name, theta in schedules.items():
        for line_search in ("strong_wolfe", "armijo"):
            accepted, final = run(line_search, args.steps, theta)
            shown = " ".join("-" if t is None else f"{t:.3g}" for t in accepted)
            print(f"theta {name}, {line_search}: final f = {final:.6e}\n  accepted t per step: {shown}")


if __name__ == "__main__":
    main()
