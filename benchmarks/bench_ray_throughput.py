"""Ray backend trial throughput: 2 concurrent trials against 1, on one local Ray with this machine's 2 cores.

Run: ``.venv/bin/python -m benchmarks.bench_ray_throughput`` (``--trials 24 --repeats 3``; ``--no-mlflow`` to leave
MLflow out; ``--tiny-epochs`` for 24 epochs of ~40 ms a trial, where per-epoch costs weigh as much as training;
``--study FILE`` for another study).

The same study (digits MLP 512-512, FUSE-PV, 5 epochs on 2 seeds: about 2-3 s a trial; random sampler with a
fixed seed, no pruning: every trial does the same work, and trial n draws the same configuration in both arms) runs
``--trials`` trials through :func:`fuse_tune.ray_backend.run_ray_study` with ``--n-jobs 1`` and with
``--n-jobs 2``; each trial asks for ``cpu: 1`` and uses one torch thread. One local Ray with 2 CPUs serves every
run and is not timed; a 2-trial warm-up experiment runs first (not counted); then the arms alternate (1, 2, 1, 2,
...) so drift in the machine's load hits both. Trial workers run at normal priority, as under ``fuse-tune``
(Ray's default, nice 15, starves them beside any other busy process). Two figures per arm, medians over the
repeats:

* trial throughput: trials / seconds from the first trial's start to the last trial's final report (times the
  trials report): how fast trials go through once the experiment runs, the target's figure (2 concurrent >=
  1.6x of 1);
* end to end: trials / wall seconds of the whole ``run_ray_study`` (the experiment's fixed start-up included:
  Tuner set-up, trial actors starting and importing torch, MLflow connections).

For scale, the machine's own ceiling is measured in every repeat too, without Ray: one trial's training (the
study's model, optimizer, epochs and seeds, one torch thread) in 1 process, and in 2 processes at once; ceiling =
2 x solo time / paired time. On a shared 2-vCPU machine it is under 2, and it moves with the other users' load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

STUDY = """\
name: bench_ray
workload: digits-mlp
optimizer: fuse_pv
epochs: 5
seeds: [0, 1]
fixed:
  batch_size: 64
  hidden_sizes: [512, 512]
  switch: {criterion: epoch, epoch: 3}
search:
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
  history_size: {type: int, low: 3, high: 10}
objective: {metric: val_accuracy}
budget: {trials: 8}
sampler: {name: random, seed: 0}
pruner: {name: none}
resources: {cpu: 1}
"""

# Same trial length, but 24 tiny epochs (about 40 ms of training each): the per-epoch costs (MLflow logging, a
# checkpoint, a round trip to the Tune driver) then weigh about as much as the training (--tiny-epochs).
TINY_EPOCHS_STUDY = (STUDY.replace("epochs: 5", "epochs: 12").replace("  hidden_sizes: [512, 512]\n", "")
                     .replace("epoch: 3}", "epoch: 6}"))


def one_run(spec, n_jobs: int, trials: int, workdir: Path, mlflow: bool, label: str) -> dict:
    from fuse_tune.ray_backend import run_ray_study

    spec = dataclasses.replace(spec, name=f"{spec.name}_{label}_j{n_jobs}")  # a fresh experiment every run
    tracking = f"sqlite:///{workdir / 'mlflow.db'}" if mlflow else None
    start = time.perf_counter()
    summary = run_ray_study(spec, n_trials=trials, n_jobs=n_jobs, storage=str(workdir / "ray_results"),
                            tracking_uri=tracking, threads=1, progress=False)
    seconds = time.perf_counter() - start
    # First trial's start (in the trial, before its MLflow run and data) to the last trial's final report.
    span = (max(r.metrics["fuse_reported_at"] for r in summary.results)
            - min(r.metrics["fuse_started_at"] for r in summary.results))
    in_trial = [r.metrics.get("time_total_s", float("nan")) for r in summary.results]
    return {"n_jobs": n_jobs, "seconds": seconds, "end_to_end": trials / seconds, "span": span,
            "throughput": trials / span, "complete": summary.counts().get("COMPLETE", 0),
            "mean_trial_s": statistics.fmean(in_trial)}


def _raw_worker(study: str, barrier: Any, out: Any) -> None:
    import torch

    from fuse_tune.trial import SeedRuns, _complete_assignment, load_spec

    torch.set_num_threads(1)
    spec = load_spec(study)
    settings = spec.configuration(_complete_assignment(spec.search, {}))  # every range at its low end
    barrier.wait()
    start = time.perf_counter()
    runs = SeedRuns(spec, settings, threads=1, device="cpu")  # the trial's training, seeds together, as under Ray
    while not runs.done:
        runs.run_epoch()
    out.put(time.perf_counter() - start)


def raw_ceiling(study: Path, repeats: int) -> dict:
    """2 x (one process's time) / (time of each of 2 processes at once), Ray left out."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    solo, paired = [], []
    for _ in range(repeats):
        for n in (1, 2):
            barrier, out = context.Barrier(n), context.Queue()
            workers = [context.Process(target=_raw_worker, args=(str(study), barrier, out)) for _ in range(n)]
            for worker in workers:
                worker.start()
            times = [out.get() for _ in workers]
            for worker in workers:
                worker.join()
            (solo if n == 1 else paired).append(statistics.fmean(times))
    return {"solo": statistics.median(solo), "paired": statistics.median(paired),
            "ceiling": 2 * statistics.median(solo) / statistics.median(paired)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", help="a study file (default: the digits-MLP study above)")
    parser.add_argument("--tiny-epochs", action="store_true", help="the study with 24 tiny epochs per trial")
    # 24 trials: 12 per lane at 2 at once. With few trials the last round runs one trial alone (the lanes end
    # unevenly, as trials differ in length), which weighs 1/(trials/2) of the 2-at-once span (8 trials: ~12%).
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--json", help="write the raw runs here")
    args = parser.parse_args()

    import ray

    from fuse_tune.ray_backend import start_local_ray
    from fuse_tune.trial import load_spec

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        workdir = Path(tmp)
        study = Path(args.study) if args.study else workdir / "bench_ray.yaml"
        if not args.study:
            study.write_text(TINY_EPOCHS_STUDY if args.tiny_epochs else STUDY)
        spec = load_spec(study)
        loads = [os.getloadavg()]
        print(f"load average before: {loads[0][0]:.2f} {loads[0][1]:.2f} {loads[0][2]:.2f}; {os.cpu_count()} cores")
        start_local_ray(num_cpus=2, log_to_driver=False)  # what fuse-tune starts: workers at normal priority
        runs, raws = [], []
        try:
            one_run(spec, 2, 2, workdir, not args.no_mlflow, "warmup")
            for repeat in range(args.repeats):
                raws.append(raw_ceiling(study, 1))
                pair = {}
                for n_jobs in (1, 2):
                    pair[n_jobs] = run = one_run(spec, n_jobs, args.trials, workdir, not args.no_mlflow, str(repeat))
                    runs.append(run)
                    loads.append(os.getloadavg())
                    print(f"  repeat {repeat}  {n_jobs} concurrent: {run['complete']} complete; trials ran "
                          f"{run['span']:5.1f} s -> {run['throughput']:.3f} trials/s; end to end "
                          f"{run['seconds']:5.1f} s -> {run['end_to_end']:.3f} trials/s; mean time in a trial "
                          f"{run['mean_trial_s']:.2f} s; load {loads[-1][0]:.2f}", flush=True)
                print(f"  repeat {repeat}: ratio {pair[2]['throughput'] / pair[1]['throughput']:.2f}x; without Ray "
                      f"{raws[-1]['solo']:.2f} s alone, {raws[-1]['paired']:.2f} s paired -> ceiling "
                      f"{raws[-1]['ceiling']:.2f}x", flush=True)
        finally:
            ray.shutdown()
        print(f"load average after: {loads[-1][0]:.2f} {loads[-1][1]:.2f} {loads[-1][2]:.2f}")
    med = {key: {n: statistics.median(r[key] for r in runs if r["n_jobs"] == n) for n in (1, 2)}
           for key in ("throughput", "end_to_end")}
    per_repeat = [runs[2 * i + 1]["throughput"] / runs[2 * i]["throughput"] for i in range(args.repeats)]
    print(f"study {spec.name} ({spec.workload}, {spec.epochs} epochs x {len(spec.seeds)} seeds), {args.trials} trials, "
          f"MLflow {'off' if args.no_mlflow else 'on (SQLite)'}; medians over {args.repeats} repeat(s):")
    for key, title in (("throughput", "trial throughput"), ("end_to_end", "end to end (start-up included)")):
        ratio = med[key][2] / med[key][1]
        target = f" (target >= 1.6x: {'met' if ratio >= 1.6 else 'NOT met'})" if key == "throughput" else ""
        print(f"  {title}: 1 concurrent {med[key][1]:.3f} trials/s, 2 concurrent {med[key][2]:.3f} trials/s, "
              f"ratio {ratio:.2f}x{target}")
    print(f"  trial throughput ratio per repeat: {', '.join(f'{r:.2f}x' for r in per_repeat)} "
          f"(median {statistics.median(per_repeat):.2f}x)")
    ceilings = [r["ceiling"] for r in raws]
    print(f"  the machine without Ray, 2 trainings at once against 1: {', '.join(f'{c:.2f}x' for c in ceilings)} "
          f"(median {statistics.median(ceilings):.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "loads": loads, "raw": raws}, indent=2))


if __name__ == "__main__":
    main()
