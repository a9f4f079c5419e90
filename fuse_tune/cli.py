"""The ``fuse-tune`` command line.

    fuse-tune train --workload W --optimizer O [--set key=value ...] [--epochs N] [--seed S]
    fuse-tune report --experiment NAME [--out DIR] [--mlflow-uri URI] [--storage URL]
    fuse-tune list

Bad input (a :class:`fuse_tune.errors.UserError`, or an argument argparse refuses) exits with status 2
and one line naming what was wrong and what is accepted, no traceback. Any other exception is a bug and
shows its traceback (exit 1). ``fuse-tune --debug ...`` shows the traceback of bad input too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fuse_tune.errors import UserError, first_line
from fuse_tune.records import REPORT_ARTIFACT_DIR, redact

__all__ = ["main", "parse_assignments"]


class CLIError(UserError):
    """A command-line argument is wrong: printed as one line, exit status 2."""


def parse_assignments(assignments: Sequence[str]) -> dict[str, Any]:
    """``["lr=0.01", "switch.criterion=epoch", "switch.epoch=3"]`` -> nested dict.

    Values are read as YAML scalars/flow collections (``1e-3`` -> float, ``[64, 64]`` -> list,
    ``true`` -> bool, ``null`` -> None); dotted keys build nested dicts.
    """
    import yaml

    from fuse_tune.spec import SpecError, nest

    flat: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise CLIError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise CLIError(f"--set key must be a name or a dotted path, got {key!r}")
        try:
            value = _read_value(raw)
        except yaml.YAMLError:
            raise CLIError(f"--set {key}: cannot read value {raw!r} (numbers, true/false, null, [lists], {{dicts}}, "
                           "or text)") from None
        flat[key] = value
    try:
        return nest(flat)
    except SpecError as exc:
        raise CLIError(f"--set {exc}") from None


def _read_value(raw: str) -> Any:
    """A YAML value, with YAML 1.1's blind spot fixed: ``1e-3`` is a float, not text."""
    import yaml

    if not raw.strip():
        return None
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _split_measures(m: Any) -> list[tuple[str, float]]:
    """Validation loss and metrics, then test loss and metrics, then any other diagnostics, as measured."""
    def rank(key: str) -> int:
        return 0 if key.startswith("val_") else 1 if key.startswith("test_") else 2

    measured = {"val_loss": m.val_loss, "test_loss": m.test_loss, **m.scores}
    keys = sorted((key for key, value in measured.items() if value is not None),
                  key=lambda key: (rank(key), not key.endswith("_loss"), key))
    return [(key, measured[key]) for key in keys]


def _format_epoch(m: Any) -> str:
    parts = [f"epoch {m.epoch:3d}", f"phase {m.phase:6s}", f"train_loss {m.train_loss:.6g}"]
    if m.gap is not None:
        parts.append(f"gap {m.gap:.3e}")
    for key, value in _split_measures(m):
        parts.append(f"{key} {value:.4g}")
    parts += [f"mean|g|^2 {m.grad_sq_norm:.3e}", f"grad_evals {m.grad_evals}", f"samples {m.samples}",
              f"wall {m.wall_time:.2f}s"]
    if m.switch_epoch is not None:
        parts.append(f"switched at epoch {m.switch_epoch} step {m.switch_step}: {m.switch_reason}")
    return " | ".join(parts)


def _first_line(exc: BaseException) -> str:
    return first_line(exc) or type(exc).__name__


def _command_train(args: argparse.Namespace) -> int:
    from fuse_tune.train import TrainConfig, Trainer

    settings = parse_assignments(args.set or [])
    from fuse_tune.trial import split_settings
    from fuse_tune.workloads import get_workload

    try:  # the user's settings meet the real constructors: what they refuse is the user's input, one line
        workload_path = tuple(str(Path(p).resolve()) for p in (args.workload_path or ["."]))
        workload = get_workload(args.workload, workload_path)
        trainer_settings, workload_options, optimizer_args = split_settings(workload, settings)
        overrides = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed), ("data_dir", args.data_dir),
                                       ("device", args.device), ("threads", args.threads)) if v is not None}
        config = TrainConfig(workload=args.workload, optimizer=args.optimizer, optimizer_args=optimizer_args,
                             workload_options=workload_options, workload_path=workload_path,
                             **{**trainer_settings, **overrides})
        if args.download:
            config.download = True
        config.validate()
        trainer = Trainer(config)  # data, model and optimizer; training errors past this point are bugs
    except (ValueError, TypeError) as exc:
        raise UserError(_first_line(exc)) from exc
    from tqdm import tqdm

    progress = tqdm(total=config.epochs, desc=f"{config.workload} / {config.optimizer}", unit="epoch",
                    file=sys.stderr, disable=args.quiet or None, leave=False)

    def on_epoch(metrics: Any) -> None:
        progress.update(1)
        progress.set_postfix(loss=f"{metrics.train_loss:.4g}", phase=metrics.phase)
        tqdm.write(_format_epoch(metrics), file=sys.stdout)

    try:  # fuse_tune.train.train's loop, on the trainer built above
        while not trainer.done:
            metrics = trainer.run_epoch()
            if trainer.result.stopped_early:
                break
            on_epoch(metrics)
    finally:
        progress.close()
    result = trainer.result
    final = result.final
    print(f"\nsummary: workload={config.workload} optimizer={config.optimizer} seed={config.seed} "
          f"epochs={len(result.history)}")
    print(f"  final train loss {final.train_loss:.6g}"
          + "".join(f", {key} {value:.6g}" for key, value in _split_measures(final))
          + (f", gap to f* {final.gap:.3e}" if final.gap is not None else ""))
    print(f"  gradient evaluations {final.grad_evals}, samples {final.samples}, training wall time "
          f"{final.wall_time:.2f} s (evaluation excluded)")
    if final.switch_epoch is not None:
        print(f"  switched to the second phase at epoch {final.switch_epoch} (step {final.switch_step}): "
              f"{final.switch_reason}")
    elif config.optimizer in ("fuse_pv", "adam_sgd", "adam_lbfgs"):
        print("  no switch happened")
    for key, when in result.reached.items():
        print(f"  {key} reached at epoch {int(when['epoch'])}: {int(when['grad_evals'])} gradient evaluations, "
              f"{when['wall_time']:.2f} s of training")
    for key in (key for key in result.targets if key not in result.reached):
        print(f"  {key} not reached")
    if result.stopped_early:
        print("  stopped early: the training loss became non-finite")
    if args.json:
        payload = {"config": vars(config), "history": [m.as_dict() for m in result.history]}
        try:
            Path(args.json).write_text(json.dumps(payload,
                                                  indent=2, default=str))
        except OSError as exc:  # a folder that does not exist, no permission: the path is the user's
            raise UserError(f"--json {args.json}: cannot write ({exc.strerror or type(exc).__name__})") from exc
        print(f"  history written to {args.json}")
    return 0


def _command_run(args: argparse.Namespace, *, must_exist: bool = False) -> int:
    """``run``/``resume`` with either backend: the study, then :func:`fuse_tune.summary.summary_lines`."""
    from fuse_tune.api import run_study
    from fuse_tune.summary import summary_lines

    if args.backend != "ray" and args.address:
        raise CLIError("--address joins a Ray cluster: use it with --backend ray")
    result = run_study(args.study, backend=args.backend, n_trials=args.n_trials, n_jobs=args.n_jobs,
                       storage=args.storage, mlflow_uri=None if args.no_mlflow else (args.mlflow_uri or "default"),
                       address=args.address, threads=args.threads, device=args.device, data_dir=args.data_dir,
                       resume_only=must_exist,
                       progress=not args.quiet)
    spec, summary = result.spec, result.summary
    print("\n".join(summary_lines(spec, summary)))
    return 0


def _command_report(args: argparse.Namespace) -> int:
    """Plots (PNG + SVG) and one HTML page from a study's MLflow runs, logged on its parent run."""
    from dashboards.report import build_report
    from fuse_tune.servers import check_tracking_server
    from fuse_tune.tracking import default_tracking_uri

    def landscapes(workloads: Sequence[str]) -> list[dict[str, Any]]:  # torch is imported here, not in dashboards
        from fuse_tune.trajectories import TWO_D_FUNCTIONS, landscape_with_paths

        return [landscape_with_paths(w) for w in workloads if w in TWO_D_FUNCTIONS]

    uri = args.mlflow_uri or default_tracking_uri()
    check_tracking_server(uri)
    out = args.out or f"report-{args.experiment[0]}"
    report = build_report(args.experiment, tracking_uri=uri, out_dir=out, storage=args.storage, landscapes=landscapes)
    for name, reason in report.skipped.items():
        print(f"not drawn: {name}: {reason}")
    for note in report.notes:
        print(f"note: {note}")
    if report.best.empty:
        print(f"best configurations: {report.best.attrs.get('reason', 'none')}")
    for row in report.best.itertuples():
        print(f"best of {row.study} ({row.workload}): trial {row.trial}, {row.objective} {row.value:.6g}; "
              f"{row.checked}")
    print(f"report: {report.html_path} ({len(report.drawn)} plots)")
    if report.artifact_runs:
        print(f"logged under {REPORT_ARTIFACT_DIR}/ on run(s) {', '.join(report.artifact_runs)} in {redact(uri)}")
    return 0


def _command_compare(args: argparse.Namespace) -> int:
    """Tune every method of a comparison file alike, rerun each best on the rerun seeds, print the table."""
    from dashboards.data import read_experiment, tidy
    from dashboards.tables import (
        comparison_markdown,
        comparison_table,
        paired_differences,
        paired_markdown,
        target_markdown,
        target_table,
        test_counterpart,
    )
    from fuse_tune.compare import run_comparison
    from fuse_tune.servers import check_tracking_server
    from fuse_tune.tracking import default_tracking_uri

    uri = args.mlflow_uri or default_tracking_uri()
    check_tracking_server(uri)
    out = Path(args.out or Path("results") / Path(args.comparison).stem)
    comparison, plans, _ = run_comparison(args.comparison, out_dir=out, n_jobs=args.n_jobs, storage=args.storage,
                                          tracking_uri=uri, threads=args.threads, device=args.device,
                                          data_dir=args.data_dir, progress=not args.quiet)
    frame = tidy(read_experiment(comparison.name, uri))
    table = comparison_table(frame)
    markdown = comparison_markdown(table)
    paired = ""
    seeds = len(comparison.rerun_seeds)
    if "fuse_pv" in comparison.methods and len(comparison.methods) > 1 and seeds > 1:
        from scipy.stats import t as student_t  # scipy comes with scikit-learn

        critical = float(student_t.ppf(0.975, seeds - 1))
        measure = test_counterpart(plans[0].spec.objective.metric) or plans[0].spec.objective.metric
        paired = (f"\nPaired by seed, FUSE-PV against each method (final {measure}; t over "
                  f"{seeds} seeds, |t| > {critical:.2f} is p < 0.05 two-sided at {seeds - 1} degrees of freedom):"
                  "\n\n" + paired_markdown(paired_differences(frame, "fuse_pv", measure)))
    reached = ""
    if comparison.metric_targets:
        reached = ("\nTime to target: on how many seeds each target was reached at the end of an epoch, and over "
                   "those seeds the median gradient evaluations and training time until the first such epoch:\n\n"
                   + target_markdown(target_table(frame, comparison.metric_targets, order=list(table["method"]))))
    tuned = [f"- `{p.method}`: best of {comparison.tuning['trials']} trials = trial {p.best_trial} "
             f"({p.tuning_value:.6g} on tuning seeds {comparison.tuning['seeds']}); study file {p.study_path}"
             if p.tuned else f"- `{p.method}`: fixed settings, not tuned ({p.study_path})" for p in plans]
    text = (f"# {comparison.name}: {comparison.workload}, {comparison.epochs} epochs\n\n"
            f"Rerun on seeds {list(comparison.rerun_seeds)}; mean ± std over seeds (ddof 1) of the last epoch, "
            f"and the median and the best seed of the reported metric.\n\n"
            f"{markdown}{reached}{paired}\nTuning:\n" + "\n".join(tuned) + "\n")
    (out / "results.md").write_text(text)
    table.to_csv(out / "results.csv", index=False)
    print(text)
    print(f"written: {out / 'results.md'}, {out / 'results.csv'}")
    print(f"plots: fuse-tune report --experiment {comparison.name} --mlflow-uri {redact(uri)}")
    return 0


def _command_list(args: argparse.Namespace) -> int:
    from fuse_tune.optimizers import OPTIMIZERS, accepted_arguments
    from fuse_tune.workloads import WORKLOADS

    print("workloads:")
    for name, workload in WORKLOADS.items():
        print(f"  {name:26s} {workload.description}")
    print("optimizers:")
    for name in OPTIMIZERS:
        print(f"  {name:26s} arguments: {', '.join(accepted_arguments(name))}")
    studies = sorted(Path(args.studies).glob("*.yaml")) if Path(args.studies).is_dir() else []
    print("studies:" + ("" if studies else f" (none in {args.studies})"))
    for path in studies:
        print(f"  {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuse-tune", description="Train and tune FUSE / FUSE-PV.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of bad input too (a bug always shows one)")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="one training run with per-epoch metrics")
    train.add_argument("--workload", required=True,
                       help="a workload name (see `fuse-tune list`) or your own builder, package.module:builder")
    train.add_argument("--workload-path", action="append", metavar="FOLDER",
                       help="folder your builder's module is imported from (default: the current folder)")
    train.add_argument("--optimizer", required=True, help="sgd, adam, adam_sgd, adam_lbfgs, lbfgs, fuse_pv or fuse")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="optimizer argument, workload option or trainer setting; dotted keys nest "
                            "(--set switch.criterion=epoch --set switch.epoch=3)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--data-dir", help="folder with torchvision data sets (not needed for digits)")
    train.add_argument("--download", action="store_true", help="let torchvision download missing data sets")
    train.add_argument("--device", help="auto (default), cpu or cuda[:i]")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--json", help="write the per-epoch history to this JSON file")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=_command_train)
    for command, text in (("run", "run (or resume) a study from a YAML file"),
                          ("resume", "resume an existing study (it must exist in the storage)")):
        runner = sub.add_parser(command, help=text)
        runner.add_argument("study", help="a study file, e.g. studies/quickstart.yaml")
        runner.add_argument("--n-trials", type=int, help="finished trials to reach (default: the file's budget)")
        runner.add_argument("--n-jobs", type=int, help="worker processes on this machine (default 1); with --backend "
                                                       "ray: trials at once (default: as many as the cluster fits)")
        runner.add_argument("--storage", help="journal:PATH (default ./fuse-studies.log), sqlite:///..., "
                                              "postgresql://...; with --backend ray: the Ray results folder "
                                              "(default ./ray_results)")
        runner.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///$PWD/mlflow.db)")
        runner.add_argument("--no-mlflow", action="store_true", help="do not track in MLflow")
        runner.add_argument("--backend", choices=["optuna", "ray"], default="optuna")
        runner.add_argument("--address", help="with --backend ray: join the Ray cluster at HOST:PORT (default "
                                              "$RAY_ADDRESS, else a local Ray on this machine's cores)")
        runner.add_argument("--threads", type=int, help="torch threads per worker (default: cores / n-jobs)")
        runner.add_argument("--device", help="auto (default), cpu or cuda[:i]")
        runner.add_argument("--data-dir", help="the data folder handed to the workload (overrides the file's data_dir)")
        runner.add_argument("--quiet", action="store_true", help="no progress bar")
        runner.set_defaults(handler=_command_run if command == "run" else
                            (lambda a: _command_run(a, must_exist=True)))
    report = sub.add_parser("report", help="plots and an HTML report of a study's MLflow runs")
    report.add_argument("--experiment", action="append", required=True, metavar="NAME",
                        help="MLflow experiment (= study name); repeat to compare studies in one report")
    report.add_argument("--out", help="output folder (default ./report-<experiment>)")
    report.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///$PWD/mlflow.db)")
    report.add_argument("--storage", help="Optuna storage to check the best trial against (default: the one recorded)")
    report.set_defaults(handler=_command_report)
    compare = sub.add_parser("compare", help="tune every method of a comparison file alike, then rerun each best "
                                             "configuration on fresh paired seeds")
    compare.add_argument("comparison", help="a comparison file, e.g. studies/compare/digits_logreg.yaml")
    compare.add_argument("--n-jobs", type=int, default=1, help="worker processes (default 1)")
    compare.add_argument("--storage", help="Optuna storage of the tuning studies (default journal ./fuse-studies.log)")
    compare.add_argument("--mlflow-uri", help="MLflow tracking URI (default sqlite:///$PWD/mlflow.db)")
    compare.add_argument("--threads", type=int, help="torch threads per worker (default: cores / n-jobs)")
    compare.add_argument("--device", help="auto (default), cpu or cuda[:i]")
    compare.add_argument("--data-dir", help="folder with torchvision data sets (overrides the file's data_dir)")
    compare.add_argument("--out", help="folder for the method study files and the results table "
                                       "(default ./results/<file name>)")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.set_defaults(handler=_command_compare)
    listing = sub.add_parser("list", help="workloads, optimizers and studies")
    listing.add_argument("--studies", default="studies", help="folder of study files")
    listing.set_defaults(handler=_command_list)
    return parser


#: what ``fuse-tune`` needs beyond the optimizer's torch-only base install (the ``tuning`` extra)
TUNING_EXTRA_MODULES = ("yaml", "numpy", "sklearn", "torchvision")


def _require_tuning_extra() -> None:
    """One line instead of an import traceback when ``fuse-tune`` runs in a base install."""
    missing = [name for name in TUNING_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"fuse-tune needs the 'tuning' extra (missing: {', '.join(missing)}): "
                        "pip install 'fuse-optim[tuning]'")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Bad input (:class:`UserError`) is one line and exit 2 (with ``--debug``, its traceback
    first); any other exception propagates with its traceback (a bug, exit 1)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse's own errors: usage and one line, exit 2
    try:
        _require_tuning_extra()
        return args.handler(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"fuse-tune: error: {_first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fuse-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
