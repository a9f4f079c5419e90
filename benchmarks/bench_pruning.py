"""Does pruning pay? One study run twice, with its pruner and with none, the same sampled trials.

The study's sampler must be history-independent (``random`` or ``grid`` with a fixed seed), so
both runs evaluate the same configurations in the same order; it runs in one worker process.
Epochs are counted from the reports each trial made (one per epoch and seed).

Run: ``.venv/bin/python -m benchmarks.bench_pruning studies/criterion_ablation.yaml``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from fuse_tune.optuna_backend import run_study
from fuse_tune.trial import load_spec


def run(spec, storage: str, threads: int) -> dict:
    start = time.perf_counter()
    summary = run_study(spec, storage=storage, tracking_uri=None, threads=threads, progress=False)
    seconds = time.perf_counter() - start
    trials = summary.study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    complete = [t for t in finished if t.state.name == "COMPLETE"]
    maximize = summary.study.directions[0].name == "MAXIMIZE"
    best = (max if maximize else min)(t.value for t in complete)
    return {"epochs": sum(len(t.intermediate_values) for t in finished), "best": best, "seconds": seconds,
            "complete": len(complete), "pruned": len(finished) - len(complete),
            "params": [t.params for t in sorted(finished, key=lambda t: t.number)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    spec = load_spec(args.study)
    if spec.sampler["name"] not in ("random", "grid"):
        raise SystemExit("bench_pruning needs a history-independent sampler (random or grid)")
    with tempfile.TemporaryDirectory() as tmp:
        # Workers read the study file, so the unpruned variant is a file of its own.
        document = yaml.safe_load(Path(args.study).read_text())
        document["pruner"] = {"name": "none"}
        unpruned_path = Path(tmp) / "unpruned.yaml"
        unpruned_path.write_text(yaml.safe_dump(document))
        unpruned_spec = load_spec(unpruned_path)
        pruned = run(spec, f"journal:{Path(tmp) / 'pruned.log'}", args.threads)
        unpruned = run(unpruned_spec, f"journal:{Path(tmp) / 'unpruned.log'}", args.threads)
    same = pruned["params"] == unpruned["params"]
    print(f"study {spec.name}: {spec.trials} trials, sampler {spec.sampler}, pruner {spec.pruner}; "
          f"same trials in both runs: {same}")
    print("| run | epochs trained | best " + spec.objective.metric + " | complete / pruned | wall time |")
    print("|---|---|---|---|---|")
    for name, r in (("unpruned", unpruned), (f"pruned ({spec.pruner['name']})", pruned)):
        print(f"| {name} | {r['epochs']} | {r['best']:.4f} | {r['complete']} / {r['pruned']} | {r['seconds']:.0f} s |")
    print(f"epochs ratio pruned/unpruned: {pruned['epochs'] / unpruned['epochs']:.3f}; best difference "
          f"(pruned - unpruned): {pruned['best'] - unpruned['best']:+.4f}")


if __name__ == "__main__":
    main()
