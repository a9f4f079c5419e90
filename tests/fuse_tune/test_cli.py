"""The fuse-tune CLI as a user runs it: a real subprocess, its output and exit status."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fuse_tune.cli import CLIError, parse_assignments


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fuse_tune.cli", *args], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_train_prints_per_epoch_metrics_and_the_switch(tmp_path):
    out = tmp_path / "history.json"
    done = run("train", "--workload", "digits-logreg", "--optimizer", "fuse_pv", "--epochs", "4", "--quiet",
               "--set", "lr=0.01", "--set", "batch_size_after_switch=256", "--json", str(out))
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 4
    assert "phase adam" in lines[0] and "phase lbfgs" in lines[-1]
    assert "switched at epoch 2" in lines[-1]
    assert "switched to the second phase at epoch 2" in done.stdout
    history = json.loads(out.read_text())["history"]
    assert [h["phase"] for h in history] == ["adam", "adam", "lbfgs", "lbfgs"]
    assert history[-1]["batch_size"] == 256


def test_list_shows_workloads_and_optimizers():
    done = run("list")
    assert done.returncode == 0
    for name in ("digits-logreg", "usps-cnn", "rosenbrock", "fuse_pv", "adam_sgd", "lbfgs"):
        assert name in done.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--workload", "nope", "--optimizer", "adam"], "accepted:"),
    (["--workload", "digits-logreg", "--optimizer", "nope"], "optimizer must be one of"),
    (["--workload", "digits-logreg", "--optimizer", "adam", "--set", "lrr=1"], "accepted:"),
    (["--workload", "digits-logreg", "--optimizer", "adam", "--set", "lr=-1"], "learning rate"),
    (["--workload", "digits-logreg", "--optimizer", "fuse_pv", "--set", "switch.criterion=bogus"], "criterion"),
    (["--workload", "digits-logreg", "--optimizer", "fuse_pv", "--set", "switch.criterion=grad_norm",
      "--set", "switch.zeta=-1"], "zeta"),
    (["--workload", "digits-logreg", "--optimizer", "fuse_pv", "--set", "history_size=0"], "history_size"),
    (["--workload", "digits-logreg", "--optimizer", "adam", "--set", "batch_size=0"], "batch_size"),
    (["--workload", "digits-logreg", "--optimizer", "adam", "--set", "lr"], "key=value"),
    (["--workload", "digits-mlp", "--optimizer", "adam", "--set", "hidden_sizes=[0]"], "hidden_sizes"),
    (["--workload", "usps-cnn", "--optimizer", "adam", "--data-dir", "/nonexistent-fuse-dir"], "usps"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(args, fragment):
    done = run("train", *args, "--epochs", "1", "--quiet")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuse-tune: error:")
    assert fragment in lines[0]


def test_parse_assignments_reads_yaml_values_and_nests_dotted_keys():
    parsed = parse_assignments(["lr=1e-3", "switch.criterion=epoch", "switch.epoch=3", "betas=[0.8, 0.9]",
                                "amsgrad=true", "line_search=armijo"])
    assert parsed == {"lr": 1e-3, "switch": {"criterion": "epoch", "epoch": 3}, "betas": [0.8, 0.9],
                      "amsgrad": True, "line_search": "armijo"}
    with pytest.raises(CLIError):
        parse_assignments(["a=1", "a.b=2"])
