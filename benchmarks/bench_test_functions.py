"""FusePV against Adam (lr 0.001, the paper's setting) on the paper's four 2-D test functions.

Each function starts from its default point (``fuse_optim.testing.functions``), no gradient
noise, float64. FusePV runs ``epochs`` x ``steps_per_epoch`` steps with the trainer's defaults
(Adam lr 0.001, switch at the middle epoch, Armijo L-BFGS phase) and, separately, with
``line_search="strong_wolfe"`` (the deterministic choice); Adam then gets exactly as many
gradient evaluations (closure calls) as the FusePV run used.

Run: ``.venv/bin/python -m benchmarks.bench_test_functions``
"""

from __future__ import annotations

import argparse

from fuse_tune.train import TrainConfig, train

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    args = parser.parse_args()
    print("| function | FusePV settings | gradient evaluations | FusePV f - f* | Adam(lr 1e-3) f - f* |")
    print("|---|---|---|---|---|")
    for workload in FUNCTIONS:
        settings = (("defaults (armijo)", {}), ("line_search=strong_wolfe", {"line_search": "strong_wolfe"}))
        for label, fuse_args in settings:
            r = compare(workload, args.epochs, args.steps_per_epoch, **fuse_args)
            print(f"| {workload} | {label}, switch at step {r['switch_step']} | {r['evaluations']} "
                  f"| {r['fuse_pv_gap']:.3e} | {r['adam_gap']:.3e} |")


if __name__ == "__main__":
    main()
