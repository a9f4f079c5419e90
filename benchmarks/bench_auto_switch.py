"""Automatic switch rules against the searched switch (issue 15): one training run against a search's many.

For each workload, FUSE-PV with that workload's settings from its fair comparison (``results/<name>/results.md``:
lr, history size, line search; everything but the switch) is trained with each switch rule:

- ``tuned``: the best ``switch.step`` a 30-trial Optuna TPE study finds on the tuning seeds (seeds 0 and 1; seed 0
  for the PINN problems, as in their comparisons), selected on the validation metric (the final training loss on a
  test function); its cost is trials x tuning seeds runs;
- ``auto``: ``{"criterion": "auto"}``, the first of ``probe`` and ``plateau`` at their defaults;
- ``plateau``: ``{"criterion": "plateau"}`` with its default ratio 0.1 (:class:`fuse_optim.switch.PlateauCriterion`,
  no threshold in the loss's units);
- ``probe``: ``{"criterion": "probe"}``, ratio 1 (:class:`fuse_optim.switch.ProbeCriterion`: a 5-step trial of the
  L-BFGS phase, kept when it gains more loss per evaluation than Adam's pace);
- ``absolute_rules``: opifex's absolute thresholds with their published defaults
  (:class:`fuse_optim.switch.AbsoluteRulesCriterion`);
- ``never``: Adam throughout; ``middle``: the epoch criterion at ``epochs // 2``;

then every rule is rerun on the same fresh seeds (100 .. 100 + seeds - 1; the same initial weights and batch
order for every rule of a seed), where the test metric is reported (the final loss on a test function). The
table gives per rule the mean and median final metric over the seeds, the paired difference against ``tuned``
(mean, std, t), the share of the gap between ``never`` and ``tuned`` that the rule closes (mean over seeds), the
gradient evaluations and the switch epochs.
Finished runs are kept in ``--cache`` (a JSON line each) and reused: an interrupted run resumes, and a rule added
later trains only its own runs (delete a rule's lines after changing its code).
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_auto_switch [--workloads digits-logreg ...]
[--seeds 5] [--jobs 2] [--data-dir DIR] [--extra-rules plateau@0.3 ...]``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from .bench_step_cost import cpu_description


@dataclass(frozen=True)
class Setup:
    """One workload's FUSE-PV settings (all but the switch), its epochs and the measure compared."""

    epochs: int
    fixed: dict[str, Any]
    metric: str  # "accuracy" (maximized), "l2re" (minimized) or "loss" (a test function's final f)
    trainer: dict[str, Any] = field(default_factory=dict)
    needs_data: bool = False
    #: seeds the study's trials train on (None: the command's ``--tuning-seeds``)
    tuning_seeds: tuple[int, ...] | None = None


_PINN = {"full_batch": True, "steps_per_epoch": 100, "grad_eval_budget": 3000, "epochs_cap": 300}


#: settings of the tuned FUSE-PV of each fair comparison (results/<name>/results.md), its switch left out
SETUPS = {
    "digits-logreg": Setup(10, {"lr": 2.74e-4, "history_size": 9, "lbfgs_lr": 0.0324, "line_search": "armijo"},
                           "accuracy", {"batch_size": 64}),
    "digits-mlp": Setup(10, {"lr": 0.0289, "history_size": 12, "lbfgs_lr": 0.0502, "line_search": "armijo"},
                        "accuracy", {"batch_size": 64}),
    "digits-cnn": Setup(10, {"lr": 0.0137, "history_size": 17, "lbfgs_lr": 0.105, "line_search": "armijo"},
                        "accuracy", {"batch_size": 64}),
    "mnist-test-split-logreg": Setup(10, {"lr": 0.00581, "history_size": 11, "lbfgs_lr": 0.0186,
                                          "line_search": "armijo"}, "accuracy", {"batch_size": 64}, True),
    "usps-cnn": Setup(5, {"lr": 0.0225, "history_size": 17, "lbfgs_lr": 0.978, "line_search": "armijo"},
                      "accuracy", {"batch_size": 64}, True),
    # the PINN problems as in their fair comparisons (studies/compare/pinn_*.yaml): 3,000 gradient evaluations,
    # 100 full-batch steps an epoch (30 epochs of Adam; the cap only bounds L-BFGS's shorter epochs), tuning seed 0
    "pinn-reaction": Setup(30, {"lr": 7.31e-3, "history_size": 64, "lbfgs_lr": 1.0, "line_search": "strong_wolfe"},
                           "l2re", {**_PINN, "workload_options": {"n_residual": 2000}}, tuning_seeds=(0,)),
    "pinn-convection": Setup(30, {"lr": 1.06e-4, "history_size": 35, "lbfgs_lr": 1.0,
                                  "line_search": "strong_wolfe"},
                             "l2re", {**_PINN, "workload_options": {"n_residual": 2000}}, tuning_seeds=(0,)),
    "pinn-wave": Setup(30, {"lr": 1.15e-3, "history_size": 27, "lbfgs_lr": 1.0, "line_search": "strong_wolfe"},
                       "l2re", {**_PINN, "workload_options": {"n_residual": 1000}}, tuning_seeds=(0,)),
    "rosenbrock": Setup(10, {"lr": 0.01, "history_size": 10, "line_search": "strong_wolfe"}, "loss",
                        {"steps_per_epoch": 50}),
    "rastrigin": Setup(10, {"lr": 0.01, "history_size": 10, "line_search": "strong_wolfe"}, "loss",
                       {"steps_per_epoch": 50}),
}
RULES = ("tuned", "auto", "plateau", "probe", "absolute_rules", "never", "middle")


def _rules(extra: list[str]) -> tuple[str, ...]:
    """The default rules, with ``extra`` ones (``plateau@0.3``, ``probe@2``, ``probe|plateau``) after the automatic
    ones."""
    return RULES[:4] + tuple(rule for rule in extra if rule not in RULES) + RULES[4:]


def _switch(rule: str, epochs: int) -> dict[str, Any]:
    """The switch dict of an automatic or reference rule (``tuned`` is the study's and is not built here):
    ``name@r`` sets the criterion's ratio, ``a|b`` switches at the first of two."""
    if "|" in rule:
        return {"criterion": "any", "of": [_switch(part, epochs) for part in rule.split("|")]}
    if "@" in rule:
        name, ratio = rule.split("@")
        return {"criterion": name, "ratio": float(ratio)}
    return {
        "auto": {"criterion": "auto"}, "plateau": {"criterion": "plateau"}, "probe": {"criterion": "probe"},
        "absolute_rules": {"criterion": "absolute_rules"}, "never": {"criterion": "never"},
        "middle": {"criterion": "epoch", "epoch": epochs // 2},
    }[rule]


def _config(workload: str, switch: dict[str, Any], seed: int, evaluate_test: bool, data_dir: str | None):
    from fuse_tune.train import TrainConfig

    setup = SETUPS[workload]
    trainer = dict(setup.trainer)
    options = trainer.pop("workload_options", {})
    epochs = trainer.pop("epochs_cap", setup.epochs)
    return TrainConfig(workload=workload, optimizer="fuse_pv", optimizer_args={**setup.fixed, "switch": switch},
                       workload_options=options, epochs=epochs, seed=seed, threads=1, device="cpu",
                       evaluate_test=evaluate_test, data_dir=data_dir, **trainer)


def _run(workload: str, switch: dict[str, Any], seed: int, split: str, data_dir: str | None) -> dict[str, Any]:
    """One training run; its final measure on ``split`` (``val``/``test``), evaluations, steps and switch."""
    from fuse_tune.train import train

    setup = SETUPS[workload]
    result = train(_config(workload, switch, seed, split == "test", data_dir))
    final = result.final
    value = final.train_loss if setup.metric == "loss" else final.scores[f"{split}_{setup.metric}"]
    return {"value": float(value), "grad_evals": final.grad_evals, "steps": final.steps,
            "switch_epoch": final.switch_epoch, "switch_step": final.switch_step}


class RunCache:
    """Finished runs on disk (one JSON line each), so that an interrupted benchmark, or one rerun with another
    rule added, trains only what it has not trained yet. A run is keyed by everything that decides it."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.runs: dict[str, dict[str, Any]] = {}
        if path and os.path.exists(path):
            with open(path) as lines:
                for line in lines:
                    if line.strip():
                        entry = json.loads(line)
                        self.runs[entry["key"]] = entry["run"]

    @staticmethod
    def key(workload: str, switch: dict[str, Any], seed: int, split: str) -> str:
        setup = SETUPS[workload]
        return json.dumps([workload, setup.epochs, setup.fixed, setup.trainer, switch, seed, split], sort_keys=True)

    def submit(self, pool: concurrent.futures.Executor, workload: str, switch: dict[str, Any], seed: int,
               split: str, data_dir: str | None) -> concurrent.futures.Future:
        key = self.key(workload, switch, seed, split)
        if key in self.runs:
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(self.runs[key])
            return done
        future = pool.submit(_run, workload, switch, seed, split, data_dir)
        future.add_done_callback(lambda f: self._store(key, f))
        return future

    def _store(self, key: str, future: concurrent.futures.Future) -> None:
        if future.exception() is not None:
            return
        self.runs[key] = future.result()
        if self.path:
            with open(self.path, "a") as out:
                out.write(json.dumps({"key": key, "run": self.runs[key]}) + "\n")


def paired(values: list[float], reference: list[float]) -> str:
    """``mean (std, t)`` of the seed-paired differences ``values - reference``; ``t = mean / (std / sqrt(n))``."""
    diff = [a - b for a, b in zip(values, reference, strict=True)]
    std = statistics.stdev(diff) if len(diff) > 1 else math.nan
    t = statistics.fmean(diff) / (std / math.sqrt(len(diff))) if std and std > 0 else math.nan
    return f"{statistics.fmean(diff):+.3g} ({std:.2g}, {t:.2f})"


def _better(metric: str) -> int:
    return 1 if metric == "accuracy" else -1


@dataclass
class Study:
    """The searched switch: a TPE study over the switch step, each trial the mean over the tuning seeds."""

    best_step: int
    best_value: float
    trials: int
    runs: int
    values: list[tuple[int, float]]
    #: gradient evaluations of all the study's runs
    evaluations: int = 0


def tune_switch(workload: str, tuning_seeds: list[int], trials: int, jobs: int, cache: RunCache,
                pool: concurrent.futures.Executor, data_dir: str | None) -> Study:
    """A ``trials``-trial Optuna TPE study (seed 0, 10 random start-up trials) of ``switch.step`` in
    ``1 .. total steps - 1`` on the validation measure, ``jobs`` trials at a time. Steps, not epochs: the
    space a study can search is finer than the epoch grid, and the switch is found to the step."""
    import optuna

    setup = SETUPS[workload]
    never = cache.submit(pool, workload, {"criterion": "never"}, tuning_seeds[0], "val", data_dir).result()
    total = never["steps"]
    sign = _better(setup.metric)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if sign > 0 else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=10))
    values: list[tuple[int, float]] = []
    evaluations = 0
    while len(values) < trials:
        asked = [study.ask() for _ in range(min(jobs, trials - len(values)))]
        steps = [trial.suggest_int("step", 1, total - 1) for trial in asked]
        futures = [[cache.submit(pool, workload, {"criterion": "step", "step": step}, s, "val", data_dir)
                    for s in tuning_seeds] for step in steps]
        for trial, step, runs in zip(asked, steps, futures, strict=True):
            value = statistics.fmean(f.result()["value"] for f in runs)
            evaluations += sum(f.result()["grad_evals"] for f in runs)
            study.tell(trial, value)
            values.append((step, value))
    best = study.best_trial
    return Study(best.params["step"], best.value, trials, trials * len(tuning_seeds), values, evaluations)


def measure(workload: str, seeds: list[int], tuning_seeds: list[int], pool: concurrent.futures.Executor,
            data_dir: str | None, rules: tuple[str, ...] = RULES, trials: int = 30, jobs: int = 2,
            cache: RunCache | None = None) -> list[str]:
    setup = SETUPS[workload]
    cache = cache or RunCache(None)
    tuning_seeds = list(setup.tuning_seeds or tuning_seeds)
    study = tune_switch(workload, tuning_seeds, trials, jobs, cache, pool, data_dir)
    switches = {rule: _switch(rule, setup.epochs) for rule in rules if rule != "tuned"}
    switches["tuned"] = {"criterion": "step", "step": study.best_step}
    runs = {(rule, s): cache.submit(pool, workload, switches[rule], s, "test", data_dir) for rule in rules
            for s in seeds}
    out = {rule: [runs[(rule, s)].result() for s in seeds] for rule in rules}
    values = {rule: [r["value"] for r in out[rule]] for rule in rules}
    label = "final f" if setup.metric == "loss" else f"test {setup.metric}"
    steps_per_epoch = out["never"][0]["grad_evals"] // setup.epochs
    tried = ", ".join(f"{step}: {value:.4g}" for step, value in sorted(study.values))
    lines = [f"\n### {workload}: {setup.epochs} epochs of {steps_per_epoch} steps; tuned switch = step "
             f"{study.best_step} (epoch {study.best_step / steps_per_epoch:.2f}), from a {study.trials}-trial TPE "
             f"study of switch.step on tuning seeds {tuning_seeds} ({study.runs} runs, {study.evaluations:,} "
             f"gradient evaluations)\n",
             f"| rule | runs to find the switch | {label} mean | median | minus tuned: mean (std, t) | minus never: "
             f"mean (std, t) | gap closed | gradient evaluations | switch epochs |", "|---" * 9 + "|"]
    gap = statistics.fmean(values["tuned"]) - statistics.fmean(values["never"])
    for rule in rules:
        closed = ((statistics.fmean(values[rule]) - statistics.fmean(values["never"])) / gap
                  if gap != 0 else math.nan)
        cost = study.runs if rule == "tuned" else 0
        epochs = ",".join("-" if r["switch_epoch"] is None else str(r["switch_epoch"]) for r in out[rule])
        lines.append(f"| {rule} | {cost} + 1 | {statistics.fmean(values[rule]):.4g} | "
                     f"{statistics.median(values[rule]):.4g} | {paired(values[rule], values['tuned'])} | "
                     f"{paired(values[rule], values['never'])} | {closed:.0%} | "
                     f"{statistics.fmean(r['grad_evals'] for r in out[rule]):.0f} | {epochs} |")
    lines.append(f"\nstudy trials (switch step: validation measure): {tried}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="*", choices=sorted(SETUPS),
                        default=["digits-logreg", "digits-mlp", "rosenbrock", "rastrigin"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tuning-seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--data-dir", help="folder with USPS/ and MNIST/raw/ (the mnist and usps workloads)")
    parser.add_argument("--extra-rules", nargs="*", default=[],
                        help="more rules: plateau@0.3 (another ratio), probe|plateau (the first of both)")
    parser.add_argument("--trials", type=int, default=30, help="trials of the study that searches the switch")
    parser.add_argument("--cache", default=".bench_auto_switch.jsonl",
                        help="finished runs, reused when the benchmark is run again ('' keeps none)")
    args = parser.parse_args()
    for workload in args.workloads:
        if SETUPS[workload].needs_data and not args.data_dir:
            parser.error(f"--data-dir: {workload} reads its data from a folder; give --data-dir")
    print(f"# CPU: {cpu_description()}")
    print(f"# rerun seeds {list(range(100, 100 + args.seeds))}, {args.jobs} runs at once, 1 torch thread each")
    seeds = list(range(100, 100 + args.seeds))
    context = multiprocessing.get_context("spawn")
    cache = RunCache(args.cache or None)
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        for workload in args.workloads:
            began = time.perf_counter()
            print("\n".join(measure(workload, seeds, args.tuning_seeds, pool, args.data_dir, _rules(args.extra_rules),
                                     args.trials, args.jobs, cache)), flush=True)
            print(f"\n({workload}: {time.perf_counter() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
