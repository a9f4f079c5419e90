"""Per-step cost of FusePV against its peers, measured side by side in one run.

1. Adam phase: FusePV (criterion never / grad_norm) vs ``torch.optim.Adam(foreach=True)`` on a
   model with 1M parameters; gradients are precomputed, so only ``step()`` is timed.
2. One L-BFGS iteration, closure time excluded: FusePV (``line_search="fixed"``) vs
   ``torch.optim.LBFGS(max_iter=1, line_search_fn=None)``, m=10, d=1M, memory full. The closure
   is a quadratic whose time is measured inside it and subtracted.

Run: ``.venv/bin/python -m benchmarks.bench_step_cost``
"""

from __future__ import annotations

import argparse
import time

import torch

from fuse_optim import FusePV

from .common import environment, interleaved_times


def make_model_params(n: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """A 1000 x 1000 linear layer plus bias: 1,001,000 parameters (two tensors, like a real layer)."""
    g = torch.Generator().manual_seed(seed)
    side = int(n**0.5)
    weight = torch.nn.Parameter(torch.randn(side, side, generator=g))
    return [weight, torch.nn.Parameter(torch.randn(side, generator=g))]


def adam_phase(repeats: int) -> dict[str, float]:
    params = {name: make_model_params(1_000_000) for name in ("adam", "fuse_pv", "fuse_pv_grad_norm")}
    for group in params.values():
        for p in group:
            p.grad = torch.randn_like(p) * 1e-3
    optimizers = {
        "adam": torch.optim.Adam(params["adam"], lr=1e-3, foreach=True),
        "fuse_pv": FusePV(params["fuse_pv"], lr=1e-3, foreach=True, switch={"criterion": "never"}),
        "fuse_pv_grad_norm": FusePV(params["fuse_pv_grad_norm"], lr=1e-3, foreach=True,
                                    switch={"criterion": "grad_norm", "zeta": 1e-12}),
    }
    return interleaved_times({name: opt.step for name, opt in optimizers.items()}, repeats)


class TimedQuadratic:
    """f(x) = 0.5 sum(a x^2) with the gradient written straight into .grad; its own time is summed."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer_holder: list) -> None:
        self.params = params
        self.curv = [torch.rand_like(p) + 0.5 for p in params]
        self.seconds = 0.0

    def __call__(self) -> torch.Tensor:
        start = time.perf_counter()
        loss = torch.zeros(())
        for p, a in zip(self.params, self.curv, strict=True):
            p.grad = a * p
            loss = loss + 0.5 * (p.grad * p).sum()
        self.seconds += time.perf_counter() - start
        return loss


def lbfgs_iteration(repeats: int, history_size: int = 10) -> dict[str, float]:
    params = {name: make_model_params(1_000_000) for name in ("torch_lbfgs", "fuse_pv")}
    optimizers = {
        "torch_lbfgs": torch.optim.LBFGS(params["torch_lbfgs"], lr=0.1, max_iter=1, history_size=history_size,
                                         tolerance_grad=0, tolerance_change=0),
        "fuse_pv": FusePV(params["fuse_pv"], switch={"criterion": "step", "step": 0}, line_search="fixed",
                          lbfgs_lr=0.1, history_size=history_size, tolerance_grad=0),
    }
    closures = {name: TimedQuadratic(params[name], []) for name in optimizers}
    for name, opt in optimizers.items():  # fill the memory
        for _ in range(history_size + 2):
            opt.step(closures[name])
    totals = {name: 0.0 for name in optimizers}
    closure_totals = {name: 0.0 for name in optimizers}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            closures[name].seconds = 0.0
            start = time.perf_counter()
            opt.step(closures[name])
            totals[name] += time.perf_counter() - start
            closure_totals[name] += closures[name].seconds
    return {name: (totals[name] - closure_totals[name]) / repeats for name in optimizers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"# {environment()}")
    adam = adam_phase(args.repeats)
    print("Adam phase, d=1,001,000, median step time")
    for name, seconds in adam.items():
        print(f"  {name:20s} {seconds * 1e3:8.3f} ms   ratio vs adam {seconds / adam['adam']:.3f}")
    lbfgs = lbfgs_iteration(args.repeats)
    print("L-BFGS iteration, m=10, d=1,001,000, mean time with closure time excluded")
    for name, seconds in lbfgs.items():
        print(f"  {name:20s} {seconds * 1e3:8.3f} ms   ratio vs torch_lbfgs {seconds / lbfgs['torch_lbfgs']:.3f}")


if __name__ == "__main__":
    main()
