"""Cost of one full-batch PINN loss and gradient, by the way derivatives with respect to the inputs are taken.

For each of ``pinn-convection`` (``u_x``, ``u_t``), ``pinn-reaction`` (``u``, ``u_t``) and ``pinn-wave`` (``u_xx``,
``u_tt``, and ``u_t`` at the initial points), built with the paper's points (10,000 residual, 257 initial, 101
boundary) and network (tanh MLP, 3 hidden layers of 50), one evaluation is ``zero_grad``, the training objective
on the whole training split and ``backward``: what one closure call of a full-batch optimizer costs. Compared:

- ``autograd``: ``torch.autograd.grad`` of the batch's sum with ``create_graph`` (one more pass per second
  derivative);
- ``vmap``: ``torch.func.vmap`` of ``jacrev`` (first derivatives) and ``hessian`` (second) of the per-point network;
- ``jvp``: forward mode, ``torch.func.jvp`` along the unit directions (nested for second derivatives), both
  directions in one pass over the points stacked twice.

Medians of ``--repeats`` calls, the candidates interleaved; the CPU model is printed first (it matters).
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_pinn_eval [--repeats 20] [--device cuda]``
"""

from __future__ import annotations

import argparse

import torch

from fuse_tune.workloads.pinn import BUILDERS, DERIVATIVES

from .bench_step_cost import cpu_description
from .common import interleaved_times


def evaluation(pde: str, derivatives: str, *, n_residual: int, width: int, device: torch.device):
    """A function running one full-batch loss + gradient of ``pde`` with ``derivatives``, and the training size."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        problem = BUILDERS[pde](n_residual=n_residual, width=width, derivatives=derivatives)
    model = problem.model.to(device)
    inputs, targets = (t.to(device) for t in problem.train)

    def run() -> None:
        model.zero_grad(set_to_none=False)
        problem.objective(model, inputs, targets).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run, int(inputs.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--n-residual", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pde", choices=sorted(BUILDERS), nargs="*", default=sorted(BUILDERS))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"# CPU: {cpu_description()}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, device {where}")
    print(f"\nOne full-batch loss + gradient, tanh MLP 3 x {args.width}, float32, median of {args.repeats}")
    print(f"  {'workload':18s} {'points':>7s} " + " ".join(f"{mode + ' ms':>12s}" for mode in DERIVATIVES)
          + "   fastest")
    for pde in args.pde:
        candidates, size = {}, 0
        for mode in DERIVATIVES:
            candidates[mode], size = evaluation(pde, mode, n_residual=args.n_residual, width=args.width,
                                                device=device)
        times = interleaved_times(candidates, args.repeats, warmup=3)
        fastest = min(times, key=times.__getitem__)
        print(f"  pinn-{pde:13s} {size:7d} " + " ".join(f"{times[mode] * 1e3:12.2f}" for mode in DERIVATIVES)
              + f"   {fastest} (x{max(times.values()) / times[fastest]:.2f} vs slowest)")


if __name__ == "__main__":
    main()
