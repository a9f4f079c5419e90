"""The report: files, the HTML page in a real headless Chromium, MLflow artifacts (SQLite store and a real
``mlflow server``), the best-configuration table against Optuna, and the one-line answers when there is
nothing to draw."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fuse_tune.cli import main

from .chromium import find_chromium, inspect_page


def test_report_files_best_configuration_and_torch_free(report_run, optuna_study, small_study):
    import pandas as pd

    assert "mlflow" in report_run.modules and "seaborn" in report_run.modules and "optuna" in report_run.modules
    torch = sorted(m for m in report_run.modules if m == "torch" or m.startswith("torch."))
    assert torch == []  # the whole `fuse-tune report` process, reading, drawing, Optuna, HTML, artifacts
    out = report_run.out
    assert {"learning_curves", "evaluation_curves", "criterion_sensitivity", "switch_ecdf", "seed_variance",
            "history_batch", "performance_profile", "importance"} == set(report_run.drawn)
    assert report_run.skipped == {
        "theta_schedules": "no trial of dash_small has a theta.schedule parameter (FUSE studies do)",
        "landscapes": "no 2-D test-function workload among digits-logreg"}
    for name in report_run.drawn:
        assert (out / f"{name}.png").stat().st_size > 2000 and (out / f"{name}.svg").stat().st_size > 2000
    assert f"report: {report_run.html} (8 plots)" in report_run.stdout
    reference = optuna_study.best_trial
    (best,) = pd.read_csv(out / "best_configurations.csv").to_dict(orient="records")
    assert best["trial"] == reference.number and best["value"] == reference.value
    assert best["std"] == reference.user_attrs["value_std"]
    assert best["checked"] == f"matches Optuna best_trial #{reference.number}"
    assert best["workload"] == "digits-logreg" and best["study"] == "dash_small"
    for name, value in reference.params.items():
        assert f"{name}={value if isinstance(value, str) else format(value, '.4g')}" in best["params"]
    assert (f"best of dash_small (digits-logreg): trial {reference.number}, val_accuracy {reference.value:.6g}; "
            f"matches Optuna best_trial #{reference.number}") in report_run.stdout
    assert f"logged under report/ on run(s) {small_study.parent_run_id} in {small_study.tracking_uri}" \
        in report_run.stdout


def test_report_html_is_self_contained(report_run):
    page = report_run.html.read_text()
    images = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(images) == len(report_run.drawn)
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing fetched from anywhere
    assert "<script" not in page and "theta.schedule parameter" in page
    assert page.count("<tr>") >= 3  # the studies table and the best-configuration table have a row each


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(report_run, tmp_path):
    # The harness sees failures: a broken image, a console error and an exception on a page of our own.
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><title>b</title><img alt='x' src='missing.png'>"
                      "<script>console.error('boom'); notAFunction();</script>")
    bad = inspect_page(broken)
    assert bad.images[0]["naturalWidth"] == 0
    assert any("boom" in e for e in bad.errors) and any("notAFunction" in e for e in bad.errors)

    shot = tmp_path / "shot.png"
    page = inspect_page(report_run.html, screenshot=shot)
    assert page.errors == []
    assert page.title == "fuse report: dash_small" and page.h1 == ["fuse report: dash_small"]
    assert len(page.images) == len(report_run.drawn)
    for image in page.images:
        assert image["complete"] and image["naturalWidth"] > 200 and image["naturalHeight"] > 100, image
    assert {"id": "best-configurations", "rows": 2} in page.tables
    assert "Best configuration per workload" in page.h2 and "Not drawn" in page.h2
    assert page.body_height > 2000  # seven figures stacked, not a blank page
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


def test_report_is_logged_on_the_parent_run(report_run, small_study, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(small_study.tracking_uri)
    listed = {Path(f.path).name for f in client.list_artifacts(small_study.parent_run_id, "report")}
    assert listed == {p.name for p in report_run.out.iterdir()}
    assert {"report.html", "best_configurations.csv", "importance.png", "importance.svg"} <= listed
    local = client.download_artifacts(small_study.parent_run_id, "report/report.html", str(tmp_path))
    assert Path(local).read_bytes() == report_run.html.read_bytes()


def test_cli_no_runs_is_one_line_and_exit_2(small_study, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(small_study.tracking_uri)
    client.create_experiment("hollow_cli", artifact_location=(tmp_path / "a").as_uri())
    for name, message in (("hollow_cli", f"experiment 'hollow_cli' has no trial runs in {small_study.tracking_uri}"),
                          ("no_such_study", f"no MLflow experiment named 'no_such_study' in "
                                            f"{small_study.tracking_uri}")):
        code = main(["report", "--experiment", name, "--mlflow-uri", small_study.tracking_uri,
                     "--out", str(tmp_path / name)])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == ""
        assert captured.err.splitlines() == [f"fuse-tune: error: {message}"]
        assert not (tmp_path / name).exists()


def test_cli_runs_missing_the_objective_say_so_per_plot(small_study, tmp_path, capsys):
    """A study whose runs never logged its objective (val_accuracy): each plot that needs it says so in one
    line and draws nothing; the plots that do not need it are drawn."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(small_study.tracking_uri)
    experiment = client.create_experiment("no_accuracy", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={"fuse.role": "study", "fuse.study": "no_accuracy"}).info.run_id
    client.log_batch(parent, params=[Param("objective", "val_accuracy")])
    for trial, switch in ((0, "1"), (1, "none")):
        run = client.create_run(experiment, tags={
            "fuse.role": "trial", "mlflow.parentRunId": parent, "fuse.trial": str(trial), "fuse.state": "complete",
            "fuse.seeds": "0", "fuse.criterion": "epoch", "fuse.switch_epoch": switch, "fuse.optimizer": "fuse_pv",
            "fuse.workload": "digits-logreg"}).info.run_id
        client.log_batch(run, params=[Param("switch.criterion", "epoch"), Param("switch.epoch", str(trial + 1))],
                         metrics=[Metric("train_loss/seed_0", 1.0 / (e + 1 + trial), 0, e) for e in range(3)])
    out = tmp_path / "report"
    assert main(["report", "--experiment", "no_accuracy", "--mlflow-uri", small_study.tracking_uri,
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    missing = [line for line in lines if "val_accuracy is not logged by any run of no_accuracy (logged: train_loss)"
               in line]
    assert {line.split(":")[1].strip() for line in missing} == {
        "learning_curves", "evaluation_curves", "criterion_sensitivity", "seed_variance", "performance_profile"}
    assert all(line.startswith("not drawn: ") for line in missing)
    for name in ("learning_curves", "criterion_sensitivity", "seed_variance", "performance_profile"):
        assert not (out / f"{name}.png").exists()
    assert (out / "switch_ecdf.png").exists()  # needs no objective: the switch epochs are there
    assert "not drawn: importance: no_accuracy: no Optuna storage given (--storage) or recorded on the parent run" \
        in lines
    listed = {Path(f.path).name for f in client.list_artifacts(parent, "report")}
    assert {"report.html", "switch_ecdf.png", "switch_ecdf.svg"} <= listed


def test_report_artifacts_served_by_a_real_mlflow_server(mlflow_server, small_study, tmp_path, capsys):
    """A real study logs to ``mlflow server`` over HTTP; ``fuse-tune report --mlflow-uri`` logs the report on its
    parent run through the server's artifact proxy; downloading them back gives the same bytes."""
    from mlflow.tracking import MlflowClient

    from fuse_tune.optuna_backend import run_study
    from fuse_tune.trial import load_spec

    text = small_study.spec_path.read_text().replace("name: dash_small", "name: dash_served")
    text = text.replace("seeds: [0, 1]", "seeds: [0]").replace("trials: 4", "trials: 2")
    spec_path = tmp_path / "dash_served.yaml"
    spec_path.write_text(text)
    storage = f"journal:{tmp_path / 'served.log'}"
    summary = run_study(load_spec(spec_path), storage=storage, tracking_uri=mlflow_server.uri, threads=1,
                        progress=False)
    out = tmp_path / "report"
    assert main(["report", "--experiment", "dash_served", "--mlflow-uri", mlflow_server.uri, "--out", str(out),
                 "--storage", storage]) == 0
    printed = capsys.readouterr().out
    assert f"matches Optuna best_trial #{summary.study.best_trial.number}" in printed
    assert f"logged under report/ on run(s) {summary.parent_run_id} in {mlflow_server.uri}" in printed
    client = MlflowClient(mlflow_server.uri)
    listed = {Path(f.path).name: f for f in client.list_artifacts(summary.parent_run_id, "report")}
    written = {p.name for p in out.iterdir()}
    assert set(listed) == written and "report.html" in written and "learning_curves.png" in written
    back = Path(client.download_artifacts(summary.parent_run_id, "report", str(tmp_path / "back")))
    for name in written:
        assert (back / name).read_bytes() == (out / name).read_bytes(), name
    # The server stored them itself (proxied artifacts), under its own artifact folder.
    stored = [p for p in mlflow_server.artifacts_dir.rglob("report.html") if summary.parent_run_id in str(p)]
    assert len(stored) == 1 and stored[0].read_bytes() == (out / "report.html").read_bytes()
    run = client.get_run(summary.parent_run_id)
    assert run.data.tags["fuse.role"] == "study"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")


def test_landscapes_are_asked_for_test_function_workloads_only(small_study, tmp_path):
    """The report calls its landscape provider with the workloads whose runs log ``gap`` (test functions) and
    draws the plain arrays it returns; a data-set study never calls it (so torch is never imported for it)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from dashboards.report import build_report

    client = MlflowClient(small_study.tracking_uri)
    experiment = client.create_experiment("fn_study", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={"fuse.role": "study", "fuse.study": "fn_study"}).info.run_id
    client.log_batch(parent, params=[Param("objective", "train_loss")])
    run = client.create_run(experiment, tags={
        "fuse.role": "trial", "mlflow.parentRunId": parent, "fuse.trial": "0", "fuse.state": "complete",
        "fuse.seeds": "0", "fuse.criterion": "step", "fuse.switch_epoch": "1", "fuse.optimizer": "fuse_pv",
        "fuse.workload": "rosenbrock"}).info.run_id
    client.log_batch(run, metrics=[Metric(f"{m}/seed_0", 2.0 ** -e, 0, e) for m in ("train_loss", "gap")
                                   for e in range(3)])
    asked = []

    def provider(workloads):
        asked.append(list(workloads))
        return [{"function": "rosenbrock", "x": [0.0, 1.0], "y": [0.0, 1.0], "z": [[1.0, 0.5], [0.2, 0.0]],
                 "f_star": 0.0, "start": [0.0, 0.0], "minimizers": [[1.0, 1.0]], "bounds": [[0, 1], [0, 1]],
                 "paths": [{"label": "adam", "points": [[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]], "switch_step": 1}]}]

    report = build_report(["fn_study"], tracking_uri=small_study.tracking_uri, out_dir=tmp_path / "r",
                          landscapes=provider, log_artifacts=False, formats=("png",))
    assert asked == [["rosenbrock"]] and "landscape_rosenbrock" in report.drawn
    assert (tmp_path / "r" / "landscape_rosenbrock.png").stat().st_size > 2000
    # the learning curves draw the training loss (the objective of a test-function study): nothing is missing
    assert "learning_curves" in report.drawn and not any("learning curves" in note for note in report.notes)
    assert "learning_curves" in report.drawn  # train_loss alone
    never = []
    build_report([small_study.name], tracking_uri=small_study.tracking_uri, out_dir=tmp_path / "r2",
                 landscapes=never.append, log_artifacts=False, formats=("png",))
    assert never == []
