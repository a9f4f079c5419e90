"""The two forms of the L-BFGS direction at small dimensions and long histories: which ``auto`` should take.

For each dimension ``d`` and history size ``m``: a memory of each form (``two_loop``, ``compact``) filled with
``m`` pairs, then, interleaved, a new pair pushed and one direction computed (the steady state of an L-BFGS
iteration: the compact form pays its Gram column there); the minimum over ``--repeats`` of each, and their
ratio. ``fuse_optim.lbfgs.LBFGSMemory.COMPACT_MIN_HISTORY`` rests on this table (a PINN's 3 x 50 tanh MLP has
d = 7,851 and the recipe's m = 100).
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_lbfgs_forms [--repeats 30]``
"""

from __future__ import annotations

import argparse
import time

import torch

from fuse_optim.lbfgs import LBFGSMemory

from .bench_step_cost import cpu_description


def _filled(form: str, d: int, m: int, generator: torch.Generator) -> LBFGSMemory:
    memory = LBFGSMemory(m, d, dtype=torch.float32, device=torch.device("cpu"), representation=form)
    for _ in range(m + 1):
        s = torch.randn(d, generator=generator)
        memory.push(s, s + 0.1 * torch.randn(d, generator=generator))
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dimensions", type=int, nargs="*", default=[2_000, 7_851, 30_000, 65_000])
    parser.add_argument("--histories", type=int, nargs="*", default=[10, 20, 50, 100])
    args = parser.parse_args()
    print(f"# CPU: {cpu_description()}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, float32; push + direction, min of "
          f"{args.repeats}")
    print("\n| d | m | two-loop ms | compact ms | compact / two-loop |\n|---|---|---|---|---|")
    for d in args.dimensions:
        for m in args.histories:
            generator = torch.Generator().manual_seed(0)
            memories = {form: _filled(form, d, m, generator) for form in ("two_loop", "compact")}
            grad = torch.randn(d, generator=generator)
            best = dict.fromkeys(memories, float("inf"))
            for _ in range(args.repeats):
                s = torch.randn(d, generator=generator)
                y = s + 0.1 * torch.randn(d, generator=generator)
                for form, memory in memories.items():
                    start = time.perf_counter()
                    memory.push(s, y)
                    memory.direction(grad)
                    best[form] = min(best[form], time.perf_counter() - start)
            print(f"| {d:,} | {m} | {best['two_loop'] * 1e3:.2f} | {best['compact'] * 1e3:.2f} | "
                  f"{best['compact'] / best['two_loop']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
