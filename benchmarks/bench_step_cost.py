"""Per-step cost of FusePV against its peers, measured side by side in one run.

1. Adam phase: FusePV (criterion ``never``) vs ``torch.optim.Adam`` with the *same* kernel flags
   (default, ``foreach=False``, ``foreach=True``, ``fused=True``), at 1M parameters (a 1000 x 1000
   layer) and at 10k (a 100 x 100 layer); gradients are precomputed, so only ``step()`` is timed
   (medians, each pair interleaved). Plus FusePV default vs Adam default (and vs
   ``Adam(fused=True)``, torch's fastest CPU kernel), and the ``grad_norm`` criterion's cost with
   ``foreach=True``.
2. L-BFGS direction by representation: push one pair and compute one direction (which settles
   the new pair's Gram column on the compact path), two-loop vs compact, m=10, d=1M.
3. One L-BFGS iteration, closure time excluded: FusePV (``line_search="fixed"``) vs
   ``torch.optim.LBFGS(max_iter=1, line_search_fn=None)``, m=10, d=1M, memory full. The closure
   is a quadratic whose time is measured inside it and subtracted.

The CPU model matters (the same commit measured 0.98x and 1.6x on two CPUs of one machine kind),
so it is printed first. Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_step_cost``
(``--representation two_loop|compact`` forces the L-BFGS direction's form).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from fuse_optim import FusePV
from fuse_optim.lbfgs import REPRESENTATIONS, LBFGSMemory

from .common import interleaved_times

#: the Adam kernel settings compared, as keyword arguments of both optimizers
ADAM_FLAGS: dict[str, dict[str, bool]] = {
    "default": {},
    "foreach=False": {"foreach": False},
    "foreach=True": {"foreach": True},
    "fused=True": {"fused": True},
}
#: untimed steps first: the allocator settles (the first steps of a fresh optimizer page-fault its
#: temporaries; measured 11.7 ms for the first pair's default step vs 2.4-2.5 ms once settled)
ADAM_WARMUP = 20


def cpu_description() -> str:
    """``lscpu``'s model name and whether the CPU has AVX-512 (``avx512f``); /proc/cpuinfo as fallback."""
    model, flags = "unknown CPU", ""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        model = fields.get("Model name", model).strip()
        flags = fields.get("Flags", "")
        family = fields.get("CPU family", "").strip()
        if family:
            model += f" (family {family}, model {fields.get('Model', '?').strip()})"
    except (OSError, subprocess.SubprocessError):
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                fields = dict(line.split(":", 1) for line in cpuinfo if ":" in line)
            model, flags = fields.get("model name\t", model).strip(), fields.get("flags\t\t", "")
        except OSError:
            pass
    return f"{model}, avx512f: {'yes' if 'avx512f' in flags.split() else 'no'}"


def make_model_params(n: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """A sqrt(n) x sqrt(n) linear layer plus bias (two tensors, like a real layer): 1,001,000 for n=1M."""
    g = torch.Generator().manual_seed(seed)
    side = int(round(n**0.5))
    weight = torch.nn.Parameter(torch.randn(side, side, generator=g))
    return [weight, torch.nn.Parameter(torch.randn(side, generator=g))]


def _with_grads(n: int) -> list[torch.nn.Parameter]:
    params = make_model_params(n)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def adam_phase(n: int, repeats: int) -> tuple[dict[str, dict[str, float]], int]:
    """Median step times of FusePV and torch.optim.Adam per flag setting: ``{flags: {who: seconds}}``.

    Each setting's pair is interleaved in a call of its own, so each candidate's neighbour is its
    peer (the single-tensor and foreach kernels allocate temporaries, and which candidate pays the
    page faults after another one's frees depends on the order).
    """
    results: dict[str, dict[str, float]] = {}
    count = sum(p.numel() for p in make_model_params(n))
    for label, flags in ADAM_FLAGS.items():
        fuse = FusePV(_with_grads(n), lr=1e-3, switch={"criterion": "never"}, **flags)
        adam = torch.optim.Adam(_with_grads(n), lr=1e-3, **flags)
        candidates = {"fuse_pv": fuse.step, "adam": adam.step}
        if not flags:  # FusePV's default against torch's fastest CPU kernel too, in the same interleaving
            candidates["adam_fused"] = torch.optim.Adam(_with_grads(n), lr=1e-3, fused=True).step
        results[label] = interleaved_times(candidates, repeats, warmup=ADAM_WARMUP)
    grad_norm = FusePV(_with_grads(n), lr=1e-3, foreach=True, switch={"criterion": "grad_norm", "zeta": 1e-12})
    adam = torch.optim.Adam(_with_grads(n), lr=1e-3, foreach=True)
    results["foreach=True, grad_norm criterion"] = interleaved_times(
        {"fuse_pv": grad_norm.step, "adam": adam.step}, repeats, warmup=ADAM_WARMUP)
    return results, count


def print_adam_phase(n: int, repeats: int) -> None:
    results, count = adam_phase(n, repeats)
    print(f"\nAdam phase, d={count:,}, median step time (FusePV and torch.optim.Adam with the same flags)")
    print(f"  {'flags':36s} {'fuse_pv ms':>10s} {'adam ms':>10s} {'ratio':>7s}")
    for label, times in results.items():
        print(f"  {label:36s} {times['fuse_pv'] * 1e3:10.3f} {times['adam'] * 1e3:10.3f} "
              f"{times['fuse_pv'] / times['adam']:7.3f}")
    default = results["default"]
    print(f"  FusePV default vs torch.optim.Adam default: {default['fuse_pv'] / default['adam']:.3f}; "
          f"vs torch.optim.Adam(fused=True) in the same interleaving ({default['adam_fused'] * 1e3:.3f} ms): "
          f"{default['fuse_pv'] / default['adam_fused']:.3f}")


class TimedQuadratic:
    """f(x) = 0.5 sum(a x^2) with the gradient written straight into .grad; its own time is summed."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
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


def direction_cost(repeats: int, dimension: int = 1_001_000, history_size: int = 10) -> dict[str, float]:
    """Median seconds of ``push`` + ``direction`` per form, interleaved, memory full (float32)."""
    generator = torch.Generator().manual_seed(0)
    curvature = torch.rand(dimension, generator=generator) + 0.5
    memories = {form: LBFGSMemory(history_size, dimension, dtype=torch.float32, device=torch.device("cpu"),
                                  representation=form) for form in ("two_loop", "compact")}
    steps = [torch.randn(dimension, generator=generator) for _ in range(4)]
    grads = [torch.randn(dimension, generator=generator) for _ in range(4)]
    samples: dict[str, list[float]] = {form: [] for form in memories}
    for i in range(history_size + 5 + repeats):
        for form, memory in memories.items():
            row = memory.free_row()
            s = torch.mul(steps[i % 4], 1.0 + 1e-3 * i, out=memory.s[row])
            y = torch.mul(s, curvature, out=memory.y[row])
            start = time.perf_counter()
            memory.push(s, y)
            memory.direction(grads[i % 4])
            if i >= history_size + 5:
                samples[form].append(time.perf_counter() - start)
    return {form: statistics.median(values) for form, values in samples.items()}


def lbfgs_iteration(repeats: int, history_size: int = 10) -> tuple[dict[str, float], str]:
    params = {name: make_model_params(1_000_000) for name in ("torch_lbfgs", "fuse_pv")}
    fuse_pv = FusePV(params["fuse_pv"], switch={"criterion": "step", "step": 0}, line_search="fixed",
                     lbfgs_lr=0.1, history_size=history_size, tolerance_grad=0)
    optimizers: dict[str, torch.optim.Optimizer] = {
        "torch_lbfgs": torch.optim.LBFGS(params["torch_lbfgs"], lr=0.1, max_iter=1, history_size=history_size,
                                         tolerance_grad=0, tolerance_change=0),
        "fuse_pv": fuse_pv,
    }
    closures = {name: TimedQuadratic(params[name]) for name in optimizers}
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
    form = fuse_pv._memory.form if fuse_pv._memory is not None else "none"
    return {name: (totals[name] - closure_totals[name]) / repeats for name in optimizers}, form


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--representation", choices=REPRESENTATIONS, default="auto",
                        help="the L-BFGS direction's form in the iteration benchmark (default: auto)")
    parser.add_argument("--skip-adam", action="store_true", help="only the L-BFGS measurements")
    args = parser.parse_args()
    print(f"# CPU: {cpu_description()}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, device cpu")
    if not args.skip_adam:
        for n in (1_000_000, 10_000):
            print_adam_phase(n, args.repeats)
    directions = direction_cost(args.repeats)
    print("\nL-BFGS push + direction, m=10, d=1,001,000, float32, median")
    for form, seconds in directions.items():
        print(f"  {form:20s} {seconds * 1e3:8.3f} ms   ratio vs two_loop {seconds / directions['two_loop']:.3f}")
    LBFGSMemory.representation = args.representation
    lbfgs, form = lbfgs_iteration(args.repeats)
    print(f"\nL-BFGS iteration, m=10, d=1,001,000, mean time with closure time excluded "
          f"(representation {args.representation}: {form})")
    for name, seconds in lbfgs.items():
        print(f"  {name:20s} {seconds * 1e3:8.3f} ms   ratio vs torch_lbfgs {seconds / lbfgs['torch_lbfgs']:.3f}")


if __name__ == "__main__":
    main()
