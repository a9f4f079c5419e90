"""Malformed study files: ``fuse-tune run`` exits 2 with one line naming the offending field, no traceback.

Every case runs through ``fuse_tune.cli.main`` in this process (one torch import for all of them); a
handful also run as real ``fuse-tune`` subprocesses, two at a time, to check what a user sees.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from fuse_tune.cli import main

BASE = {
    "name": "malformed",
    "workload": "digits-logreg",
    "optimizer": "fuse_pv",
    "epochs": 1,
    "seeds": [0],
    "fixed": {"batch_size": 64},
    "search": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    "budget": {"trials": 1, "timeout": 20},  # should a case pass validation, its run ends anyway
}
DROP = object()
CRITERION = {"type": "categorical", "choices": ["grad_norm", "epoch"]}


def study(search=None, **changes) -> str:
    """BASE with top-level changes (``DROP`` removes a key) and, when given, another search space."""
    document = copy.deepcopy(BASE)
    if search is not None:
        document["search"] = search
    for key, value in changes.items():
        if value is DROP:
            document.pop(key)
        else:
            document[key] = value
    return yaml.safe_dump(document, sort_keys=False)


def lr(**changes) -> dict:
    return {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, **changes}}


# (case id, study file text, fragments the one error line must contain)
CASES = [
    ("unknown-top-level-key", study(epoch=3), ["epoch: unknown field"]),
    ("unknown-key-in-param", study(search={"lr": {"type": "float", "low": 1e-3, "hi": 1e-2}}),
     ["search.lr", "unknown key(s) ['hi']"]),
    ("epochs-not-a-number", study(epochs="ten"), ["epochs", "'ten'"]),
    ("seeds-not-integers", study(seeds="a"), ["seeds", "'a'"]),
    ("search-not-a-mapping", study(search=["lr"]), ["search: expected a mapping"]),
    ("choices-not-a-list", study(search={"switch.criterion": {"type": "categorical", "choices": "epoch"}}),
     ["search.switch.criterion.choices", "non-empty list"]),
    ("zeta-range-low-zero", study(search={
        "switch.criterion": {"type": "categorical", "choices": ["grad_norm"]},
        "switch.zeta": {"type": "float", "low": 0.0, "high": 1.0, "when": {"switch.criterion": "grad_norm"}}}),
     ["search.switch.zeta.low", "zeta"]),
    ("sigma-negative", study(fixed={"batch_size": 64, "switch": {"criterion": "loss_change", "sigma": -1.0e-3}}),
     ["fixed", "sigma"]),
    ("history-size-zero-fixed", study(fixed={"history_size": 0}), ["fixed", "history_size"]),
    ("history-size-zero-range-low", study(search={"history_size": {"type": "int", "low": 0, "high": 10}}),
     ["search.history_size.low", "history_size"]),
    ("batch-size-larger-than-data", study(fixed={"batch_size": 5000}),
     ["fixed", "batch_size=5000 is larger than the training set"]),
    ("batch-after-switch-choice-too-large",
     study(search={"batch_size_after_switch": {"type": "categorical", "choices": [64, 4096]}}),
     ["search.batch_size_after_switch.choices[1]", "4096"]),
    ("empty-search-space", study(search={}), ["search: the search space is empty"]),
    ("missing-workload", study(workload=DROP), ["workload: missing"]),
    ("unknown-workload", study(workload="digits-transformer"), ["workload", "'digits-transformer'"]),
    ("unknown-optimizer", study(optimizer="adamw"), ["optimizer", "'adamw'"]),
    ("unknown-optimizer-argument", study(fixed={"momentun": 0.9}), ["fixed.momentun", "not a setting"]),
    ("low-above-high", study(search=lr(low=0.1, high=0.01)), ["search.lr", "low must be <= high"]),
    ("log-range-low-zero", study(search=lr(low=0.0, log=True)), ["search.lr.low", "log-scaled range needs low > 0"]),
    ("int-param-non-integer-bounds", study(search={"history_size": {"type": "int", "low": 2.5, "high": 10}}),
     ["search.history_size", "integer bounds"]),
    ("when-unknown-param", study(search={
        "switch.epoch": {"type": "int", "low": 1, "high": 3, "when": {"switch.criterion": "epoch"}}}),
     ["search.switch.epoch.when", "not a searched parameter"]),
    ("when-later-param", study(search={
        "switch.epoch": {"type": "int", "low": 1, "high": 3, "when": {"switch.criterion": "epoch"}},
        "switch.criterion": CRITERION}),
     ["search.switch.epoch.when", "must be listed before it"]),
    ("when-value-never-taken", study(search={
        "switch.criterion": CRITERION,
        "switch.epoch": {"type": "int", "low": 1, "high": 3, "when": {"switch.criterion": "epochs"}}}),
     ["search.switch.epoch.when", "never takes the value 'epochs'"]),
    ("grid-sampler-float-param", study(sampler={"name": "grid"}), ["search.lr", "grid sampler"]),
    ("unknown-sampler", study(sampler={"name": "bayes"}), ["sampler.name", "'bayes'"]),
    ("unknown-pruner", study(pruner={"name": "asha"}), ["pruner.name", "'asha'"]),
    ("cost-objective-with-pruner", study(objective={"metric": "val_accuracy", "cost": "grad_evals"}),
     ["pruner.name", "multi-objective"]),
    ("time-to-target-without-target", study(objective={"metric": "time_to_target"}),
     ["objective.target_loss", "required"]),
    ("not-yaml", "name: x\nsearch: {lr: [1, 2\n", ["not valid YAML"]),
    ("yaml-list", "- name: x\n- workload: digits-logreg\n", ["must be a YAML mapping", "list"]),
    ("unknown-switch-criterion-choice",
     study(search={"switch.criterion": {"type": "categorical", "choices": ["never", "sometimes"]}}),
     ["search.switch.criterion.choices[1]", "criterion", "'sometimes'"]),
    ("theta-above-one", study(optimizer="fuse", search={
        "theta.schedule": {"type": "categorical", "choices": ["constant"]},
        "theta.theta": {"type": "float", "low": 0.5, "high": 1.5, "when": {"theta.schedule": "constant"}}}),
     ["search.theta.theta.high", "theta must be a number in [0, 1]"]),
    ("lr-negative", study(fixed={"lr": -0.01}, search={"history_size": {"type": "int", "low": 3, "high": 9}}),
     ["fixed", "lr"]),
    ("argument-of-another-optimizer", study(optimizer="adam", fixed={"history_size": 10}),
     ["fixed.history_size", "not a setting of optimizer 'adam'"]),
    ("param-fixed-and-searched", study(fixed={"lr": 0.01}), ["search.lr", "also in 'fixed'"]),
    ("epochs-under-fixed", study(fixed={"epochs": 3}), ["fixed.epochs", "top level"]),
    ("unknown-param-type", study(search={"lr": {"type": "uniform", "low": 1e-3, "high": 1e-2}}),
     ["search.lr.type", "'uniform'"]),
    ("accuracy-on-a-test-function", study(workload="rosenbrock", objective={"metric": "val_accuracy"}),
     ["objective.metric", "train_loss"]),
    ("test-split-objective", study(objective={"metric": "test_accuracy"}), ["objective.metric", "'val_accuracy'"]),
    ("metric-the-workload-lacks", study(objective={"metric": "val_mse"}), ["objective.metric", "val_accuracy"]),
    ("trials-zero", study(budget={"trials": 0}), ["budget.trials"]),
    ("duplicate-seeds", study(seeds=[1, 1]), ["seeds", "distinct"]),
    ("name-with-slash", study(name="a/b"), ["name", "must not contain"]),
    ("unknown-workload-option", study(workload="digits-mlp", fixed={"hidden_sizes": [0]}),
     ["fixed", "hidden_sizes"]),
]
IDS = [case[0] for case in CASES]
#: run again as real subprocesses (the rest only in-process)
SUBPROCESS_CASES = ["unknown-top-level-key", "zeta-range-low-zero", "unknown-optimizer-argument", "not-yaml"]


def test_the_cases_are_distinct():
    assert len(CASES) >= 30 and len(set(IDS)) == len(IDS)
    assert len({text for _, text, _ in CASES}) == len(CASES)
    assert set(SUBPROCESS_CASES) <= set(IDS)


def check_one_line(returncode: int, stderr: str, fragments: list[str], path: Path) -> None:
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("fuse-tune: error: "), line
    assert str(path) in line or path.name in line, line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"


@pytest.mark.parametrize("case_id, text, fragments", CASES, ids=IDS)
def test_malformed_study_in_process(case_id, text, fragments, tmp_path, capsys):
    path = tmp_path / f"{case_id}.yaml"
    path.write_text(text)
    code = main(["run", str(path), "--no-mlflow", "--storage", f"journal:{tmp_path / 'j.log'}", "--quiet"])
    captured = capsys.readouterr()
    assert captured.out == ""
    check_one_line(code, captured.err, fragments, path)
    assert not (tmp_path / "j.log").exists()  # refused before any storage was touched


def test_a_missing_study_file_in_process(tmp_path, capsys):
    path = tmp_path / "nowhere.yaml"
    code = main(["run", str(path), "--no-mlflow", "--storage", f"journal:{tmp_path / 'j.log'}"])
    check_one_line(code, capsys.readouterr().err, ["no such study file"], path)


def _cli(path: Path, storage: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("fuse-tune")), "run", str(path), "--no-mlflow",
         "--storage", f"journal:{storage}"],
        capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_malformed_studies_through_the_real_command(tmp_path):
    by_id = {case_id: (text, fragments) for case_id, text, fragments in CASES}
    jobs = []
    for case_id in SUBPROCESS_CASES:
        text, fragments = by_id[case_id]
        path = tmp_path / f"{case_id}.yaml"
        path.write_text(text)
        jobs.append((path, fragments))
    jobs.append((tmp_path / "missing.yaml", ["no such study file"]))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _cli(job[0], tmp_path / "j.log"), jobs))
    for (path, fragments), done in zip(jobs, results, strict=True):
        assert done.stdout == ""
        check_one_line(done.returncode, done.stderr, fragments, path)
    assert not (tmp_path / "j.log").exists()
