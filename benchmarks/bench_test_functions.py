"""FusePV against Adam (lr 0.001, the paper's setting) on the paper's four 2-D test functions.

Each function starts from its default point (``fuse_optim.test_functions``), no gradient
noise, float64. FusePV runs ``epochs`` x ``steps_per_epoch`` steps with the trainer's defaults
(Adam lr 0.001, switch at the middle epoch, Armijo L-BFGS phase) and, separately, with
``line_search="strong_wolfe"`` (the deterministic choice); Adam then gets exactly as many
gradient evaluations (closure calls) as the FusePV run used.

Run: ``.venv/bin/python -m benchmarks.bench_test_functions``

``--superlinear`` prints a second table instead, and ``--all`` prints both (the first table first). It asks: how
many gradient evaluations does FusePV need after its switch to go from ``f - f* <= 1e-3`` to ``f - f* <= 1e-8``,
against Adam's? Same four functions, default starts, no gradient noise, float64, driven by the trainer
(``fuse_tune.train.Trainer``, ``steps_per_epoch`` 50). Every closure call is one gradient evaluation; the value
``f(x)`` of every evaluated point (L-BFGS line-search trials included) is recorded with the running count.

* ``n3`` / ``n8``: the first evaluation count (1-based) at which the best ``f - f*`` so far is ``<= 1e-3`` /
  ``<= 1e-8``; "evals 1e-3 -> 1e-8" is ``n8 - n3``. When FusePV reaches 1e-3 while still in its Adam phase the
  count from ``max(n3, switch)`` to ``n8`` (its L-BFGS phase only) is given too.
* FusePV: Adam lr 1e-3 (the paper's) and 1e-2 (studies/test_functions.yaml), ``switch={criterion: step,
  step: 100}`` (100 Adam steps = 100 evaluations), L-BFGS line search strong Wolfe and Armijo (the default, first
  trial step 0.1); budget 2,000 evaluations. Adam: lr 1e-3 and 1e-2, budget 20,000 evaluations.
* "final gap": ``f - f*`` at the last evaluation within the budget.
* A run that never reaches ``f - f* <= 1e-3`` stopped at a local minimum (Rastrigin, Ackley): the note gives its
  value and, when the run has converged (its last 50 evaluations improve its best value by at most 1e-10), the
  same counts against its own limit ``f_limit`` (its best value): ``gap_local = f - f_limit`` over the
  evaluations before ``f_limit`` is first attained.
* "per decade": for runs that reach 1e-8, the evaluations between reaching 1e-3, 1e-4, ..., 1e-8.
* Every closure call counts. Each L-BFGS step starts with an evaluation at ``x_k``, the point its previous line
  search accepted and (usually) already evaluated, so an L-BFGS step costs at least 2 evaluations here.

Run: ``.venv/bin/python -m benchmarks.bench_test_functions --superlinear``
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fuse_optim.test_functions import get_test_function
from fuse_tune.train import TrainConfig, Trainer, train

FUNCTIONS = ("rosenbrock", "rastrigin", "ackley", "himmelblau")


def compare(workload: str, epochs: int = 4, steps_per_epoch: int = 50, **fuse_args) -> dict[str, float]:
    """Final f - f* of FusePV and of Adam(lr 1e-3) at FusePV's gradient-evaluation count."""
    fuse = train(TrainConfig(workload=workload, optimizer="fuse_pv", optimizer_args=dict(fuse_args), epochs=epochs,
                             steps_per_epoch=steps_per_epoch, threads=1))
    evaluations = fuse.final.grad_evals
    adam = train(TrainConfig(workload=workload, optimizer="adam", optimizer_args={"lr": 1e-3}, epochs=1,
                             steps_per_epoch=evaluations, threads=1))
    assert adam.final.grad_evals == evaluations
    return {"evaluations": evaluations, "fuse_pv_gap": fuse.final.gap, "adam_gap": adam.final.gap,
            "switch_step": fuse.final.switch_step}


COARSE, FINE = 1e-3, 1e-8
#: a run has converged when its last CONVERGED_WINDOW evaluations improve its best value by at most CONVERGED_TOL
CONVERGED_WINDOW, CONVERGED_TOL = 50, 1e-10
SWITCH_STEP = 100
FUSE_BUDGET, ADAM_BUDGET = 2_000, 20_000


@dataclass
class Trace:
    """One run, evaluation by evaluation: ``values[k - 1]`` is f at the k-th gradient evaluation."""

    values: list[float]
    f_star: float
    switch_eval: int | None  # evaluations made before the first L-BFGS-phase evaluation (None: never switched)
    switch_step: int | None

    @property
    def gaps(self) -> list[float]:
        return [v - self.f_star for v in self.values]


def first_reaching(gaps: Sequence[float], threshold: float) -> int | None:
    """The first evaluation count (1-based) at which the best gap so far is ``<= threshold``; None if never."""
    best = math.inf
    for count, gap in enumerate(gaps, start=1):
        best = min(best, gap)
        if best <= threshold:
            return count
    return None


def evaluations_between(gaps: Sequence[float], coarse: float = COARSE,
                        fine: float = FINE) -> tuple[int | None, int | None, int | None]:
    """``(n_coarse, n_fine, n_fine - n_coarse)``, with None for a threshold never reached."""
    n_coarse, n_fine = first_reaching(gaps, coarse), first_reaching(gaps, fine)
    needed = n_fine - n_coarse if n_coarse is not None and n_fine is not None else None
    return n_coarse, n_fine, needed


def per_decade(gaps: Sequence[float], coarse: float = COARSE, fine: float = FINE) -> list[int] | None:
    """Evaluations spent on each decade from ``coarse`` down to ``fine`` (None unless ``fine`` is reached)."""
    decades = round(math.log10(coarse / fine))
    counts = [first_reaching(gaps, coarse / 10**k) for k in range(decades + 1)]
    if any(c is None for c in counts):
        return None
    return [b - a for a, b in zip(counts, counts[1:], strict=False)]


def local_limit(values: Sequence[float], window: int = CONVERGED_WINDOW,
                tolerance: float = CONVERGED_TOL) -> tuple[float, int, bool]:
    """``(f_limit, first evaluation count attaining it, converged)`` of a run: f_limit is its best value;
    converged when the last ``window`` evaluations improve the best value of the ones before by at most
    ``tolerance``."""
    f_limit = min(values)
    attained = values.index(f_limit) + 1
    converged = len(values) > window and min(values[:-window]) - f_limit <= tolerance
    return f_limit, attained, converged


def record(workload: str, optimizer: str, optimizer_args: dict[str, Any], budget: int,
           steps_per_epoch: int = 50) -> Trace:
    """Run the trainer until ``budget`` gradient evaluations and record f at each (the overshoot of the last
    step is dropped)."""
    config = TrainConfig(workload=workload, optimizer=optimizer, optimizer_args=dict(optimizer_args),
                         epochs=math.ceil(budget / steps_per_epoch), steps_per_epoch=steps_per_epoch,
                         device="cpu", threads=1)
    trainer = Trainer(config)
    values: list[float] = []
    phases: list[str] = []
    wrap = trainer.counter.wrap

    def recording_wrap(closure, batch_size, on_first):
        def recorded():
            loss = closure()
            values.append(float(loss.detach()))
            phases.append(getattr(trainer.optimizer, "phase", "adam"))
            return loss

        return wrap(recorded, batch_size, on_first)

    trainer.counter.wrap = recording_wrap
    while not trainer.done and len(values) < budget:
        trainer.run_epoch()
    values, phases = values[:budget], phases[:budget]
    switch_eval = next((k for k, phase in enumerate(phases) if phase != "adam"), None)
    f_star = get_test_function(workload).f_star  # the workload's function has the workload's name
    return Trace(values, f_star, switch_eval, getattr(trainer.optimizer, "switched_at_step", None))


def _count(n: int | None, budget: int) -> str:
    return f"{n:,}" if n is not None else f"not reached in {budget:,}"


def superlinear_row(workload: str, label: str, trace: Trace, budget: int) -> str:
    gaps = trace.gaps
    n3, n8, needed = evaluations_between(gaps)
    notes = []
    switch = "-"
    if trace.switch_eval is not None:
        switch = f"{trace.switch_eval:,} (step {trace.switch_step})"
        if n3 is not None:
            if n3 <= trace.switch_eval:
                after = f"; {n8 - trace.switch_eval:,} evals from the switch to 1e-8" if n8 is not None else ""
                notes.append(f"1e-3 reached in the Adam phase (eval {n3:,}){after}")
            else:
                notes.append("1e-3 reached after the switch")
    decades = per_decade(gaps)
    if decades is not None:
        notes.append("per decade 1e-3..1e-8: " + "/".join(str(d) for d in decades))
    if n3 is None:
        f_limit, attained, converged = local_limit(trace.values)
        if not converged:
            notes.append(f"not converged: best f = {f_limit:.6g}, still improving in the last {CONVERGED_WINDOW} "
                         "evals")
        else:
            notes.append(f"local minimum at f = {f_limit:.6g} (attained at eval {attained:,})")
            before = [v - f_limit for v in trace.values[:attained - 1]]
            l3, l8, lneeded = evaluations_between(before)
            if l3 is None or l8 is None:
                reached = f"1e-3 at eval {l3:,}" if l3 is not None else "1e-3 not reached"
                closest = f"; best gap_local before it {min(before):.3g}" if before else ""
                notes.append(f"vs f_limit: {reached}; 1e-8 not reached before f_limit is attained at eval "
                             f"{attained:,}{closest}")
            else:
                local = f"vs f_limit: 1e-3 at eval {l3:,}, 1e-8 at eval {l8:,}, {lneeded:,} evals 1e-3 -> 1e-8"
                if trace.switch_eval is not None and l3 <= trace.switch_eval:
                    local += f" ({l8 - trace.switch_eval:,} from the switch)"
                local_decades = per_decade(before)
                if local_decades is not None:
                    local += ", per decade " + "/".join(str(d) for d in local_decades)
                notes.append(local)
    return (f"| {workload} | {label} | {switch} | {_count(n3, budget)} | {_count(n8, budget)} "
            f"| {'-' if needed is None else f'{needed:,}'} | {gaps[-1]:.3e} | {'; '.join(notes)} |")


def superlinear_table(functions: Sequence[str] = FUNCTIONS, switch_step: int = SWITCH_STEP,
                      fuse_budget: int = FUSE_BUDGET, adam_budget: int = ADAM_BUDGET) -> list[str]:
    lines = [
        f"Gradient evaluations from f - f* <= {COARSE:g} to <= {FINE:g} (FusePV switch={{criterion: step, step: "
        f"{switch_step}}}, budget {fuse_budget:,}; Adam budget {adam_budget:,}; final gap = f - f* at the last "
        "evaluation). Every closure call counts, so does the first evaluation of each L-BFGS step, at the point "
        "the previous line search accepted (usually already evaluated there): an L-BFGS step costs >= 2.",
        "",
        "| function | method (settings) | switch at eval | evals to 1e-3 | evals to 1e-8 | evals 1e-3 -> 1e-8 "
        "| final gap | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for workload in functions:
        runs = []
        for lr in (1e-3, 1e-2):
            for line_search in ("strong_wolfe", "armijo"):
                args = {"lr": lr, "switch": {"criterion": "step", "step": switch_step}, "line_search": line_search}
                runs.append((f"FusePV lr {lr:g}, {line_search}", "fuse_pv", args, fuse_budget))
        for lr in (1e-3, 1e-2):
            runs.append((f"Adam lr {lr:g}", "adam", {"lr": lr}, adam_budget))
        for label, optimizer, args, budget in runs:
            lines.append(superlinear_row(workload, label, record(workload, optimizer, args, budget), budget))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--superlinear", action="store_true",
                       help="print only the 1e-3 -> 1e-8 gradient-evaluation table")
    which.add_argument("--all", action="store_true", help="print both tables")
    parser.add_argument("--switch-step", type=int, default=SWITCH_STEP)
    parser.add_argument("--fuse-budget", type=int, default=FUSE_BUDGET)
    parser.add_argument("--adam-budget", type=int, default=ADAM_BUDGET)
    args = parser.parse_args()
    if not args.superlinear:
        first_table(args.epochs, args.steps_per_epoch)
    if args.superlinear or args.all:
        if args.all:
            print()
        start = time.perf_counter()
        for line in superlinear_table(switch_step=args.switch_step, fuse_budget=args.fuse_budget,
                                      adam_budget=args.adam_budget):
            print(line, flush=True)
        print(f"\n({time.perf_counter() - start:.1f} s)")


def first_table(epochs: int, steps_per_epoch: int) -> None:
    print("| function | FusePV settings | gradient evaluations | FusePV f - f* | Adam(lr 1e-3) f - f* |")
    print("|---|---|---|---|---|")
    for workload in FUNCTIONS:
        settings = (("defaults (armijo)", {}), ("line_search=strong_wolfe", {"line_search": "strong_wolfe"}))
        for label, fuse_args in settings:
            r = compare(workload, epochs, steps_per_epoch, **fuse_args)
            print(f"| {workload} | {label}, switch at step {r['switch_step']} | {r['evaluations']} "
                  f"| {r['fuse_pv_gap']:.3e} | {r['adam_gap']:.3e} |")


if __name__ == "__main__":
    main()
