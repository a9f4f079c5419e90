"""Users' own workloads: `package.module:builder` in study files and `fuse-tune train`, in-memory tensors and
Datasets through a DataLoader with the trainer's guarantees, metrics other than accuracy, one-line errors for
bad user code, and the Python API against the CLI."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import fuse_tune
from fuse_tune.cli import main
from fuse_tune.errors import UserError
from fuse_tune.train import TrainConfig, Trainer, train
from fuse_tune.workloads import Option, Problem, build_supervised, get_workload, register_workload
from fuse_tune.workloads.interface import options_of

FUSE_TUNE = str(Path(sys.executable).with_name("fuse-tune"))

#: a user's module: a regression builder on synthetic data, and the builders that break the interface
USER_MODULE = '''
from typing import Literal

import torch
from torch import nn

import fuse_tune


def _data(n, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=generator)
    return x, y.unsqueeze(1)


def regression(*, hidden: int = 8, activation: Literal["tanh", "relu"] = "tanh", scale: float = 1.0):
    """A small regression network on synthetic data."""
    act = nn.Tanh() if activation == "tanh" else nn.ReLU()
    model = nn.Sequential(nn.Linear(4, hidden), act, nn.Linear(hidden, 1))
    x, y = _data(300, 0)
    return fuse_tune.Problem(model=model, loss=nn.MSELoss(), metric=fuse_tune.MSE,
                             train=(x[:200], scale * y[:200]), validation=(x[200:250], scale * y[200:250]),
                             test=(x[250:], scale * y[250:]))


def returns_a_model():
    return nn.Linear(4, 1)


def non_scalar_loss():
    x, y = _data(40, 0)
    return fuse_tune.Problem(model=nn.Linear(4, 1), loss=nn.MSELoss(reduction="none"),
                             train=(x, y), validation=(x, y))


def raises():
    raise RuntimeError("the data server is down")


not_callable = 3
'''

STUDY = {
    "name": "user_regression", "workload": "user_models:regression", "optimizer": "fuse_pv", "epochs": 3,
    "seeds": [0, 1], "fixed": {"batch_size": 50, "lr": 0.01, "switch": {"criterion": "epoch"}},
    "search": {"switch.epoch": {"type": "int", "low": 1, "high": 2}, "hidden": {"type": "categorical",
                                                                               "choices": [4, 8]}},
    "budget": {"trials": 3}, "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"},
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project folder: the module and a study file beside it."""
    (tmp_path / "user_models.py").write_text(USER_MODULE)
    write_study(tmp_path / "study.yaml")
    return tmp_path


def write_study(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump({**STUDY, **changes}, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path, capsys) -> tuple[int, str, str]:
    """``fuse-tune`` in this process (``main``), from ``cwd``."""
    import os

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(list(args))
    finally:
        os.chdir(previous)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ the interface


def test_options_are_declared_by_the_builder_signature(project: Path) -> None:
    workload = get_workload("user_models:regression", [project])
    assert workload.kind == "supervised" and workload.description == "A small regression network on synthetic data."
    assert {o.name: (o.type, o.default, o.choices) for o in workload.options} == {
        "hidden": (int, 8, ()), "activation": (None, "tanh", ("tanh", "relu")), "scale": (float, 1.0, ())}
    assert workload.check_options({"scale": 2}) == {"hidden": 8, "activation": "tanh", "scale": 2.0}
    for bad, message in (({"hidden": 2.5}, "hidden: expected int"), ({"activation": "gelu"}, "activation: expected "
                         "one of ['tanh', 'relu']"), ({"depth": 2}, "depth: not an option of workload"),
                         ({"hidden": True}, "hidden: expected int")):
        with pytest.raises(ValueError, match=re.escape(message)):
            workload.check_options(bad)

    def needs_a_value(*, width):  # noqa: ANN001, ANN202
        return None

    with pytest.raises(UserError, match="parameter 'width' has no default"):
        options_of(needs_a_value, "w")
    assert options_of(lambda *, seed, data_dir=None, size=(1, 2): None, "w") == (Option("size", tuple, (1, 2)),)


def test_builtin_workloads_are_registered_through_the_same_interface() -> None:
    builtin = get_workload("digits-mlp")
    assert {o.name for o in builtin.options} == {"l2", "hidden_sizes"}
    instance = build_supervised(builtin, seed=0)
    assert isinstance(instance.problem, Problem) and instance.problem.metric is fuse_tune.ACCURACY
    assert [len(split[0]) for split in (instance.problem.train, instance.problem.validation,
                                        instance.problem.test)] == [1123, 224, 450]


def test_regression_trains_with_validation_and_test_metrics(project: Path) -> None:
    config = TrainConfig(workload="user_models:regression", workload_path=(str(project),), optimizer="fuse_pv",
                         epochs=4, batch_size=50, optimizer_args={"lr": 0.01, "switch": {"criterion": "epoch",
                                                                                        "epoch": 2}})
    result = train(config)
    final = result.final
    assert set(final.scores) == {"val_mse", "test_mse"} and final.phase == "lbfgs"
    assert final.scores["val_mse"] < result.history[0].scores["val_mse"]
    # with no penalty the validation loss is the validation MSE (same mean over the same samples)
    assert final.val_loss == pytest.approx(final.scores["val_mse"], rel=1e-5)


class Indexed(Dataset):
    """A map-style Dataset over tensors that is not a TensorDataset (the DataLoader path, item by item)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def _classification(as_dataset: bool):
    """A seeded classification problem whose splits are tensors or Datasets of the same samples."""

    def build(*, seed: int = 0) -> Problem:
        generator = torch.Generator().manual_seed(123)
        x = torch.randn(230, 6, generator=generator)
        y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        splits = (x[:150], y[:150]), (x[150:190], y[150:190]), (x[190:], y[190:])
        if as_dataset:
            splits = tuple(Indexed(*split) for split in splits)
        return Problem(model=model, loss=nn.CrossEntropyLoss(), metric=fuse_tune.ACCURACY, train=splits[0],
                       validation=splits[1], test=splits[2])

    return build


def _run(name: str, **config) -> list[dict]:
    settings = dict(workload=name, optimizer="fuse_pv", epochs=3, batch_size=32, batch_size_after_switch=75,
                    optimizer_args={"lr": 0.02, "switch": {"criterion": "epoch", "epoch": 1}}, seed=5)
    result = train(TrainConfig(**{**settings, **config}))
    return [m.as_dict() for m in result.history]


def _same_training(a: list[dict], b: list[dict]) -> None:
    for first, second in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "test_loss", "batch_loss", "grad_sq_norm"):
            assert first[key] == pytest.approx(second[key], rel=1e-6, abs=1e-9), key
        assert first["scores"] == pytest.approx(second["scores"])
        for key in ("steps", "samples", "closure_calls", "batch_size", "phase", "switch_epoch"):
            assert first[key] == second[key], key


def test_a_dataset_through_the_dataloader_trains_as_the_same_tensors_do() -> None:
    """Same seed, same batches, same closure calls: the Dataset path and the tensor path are one training run,
    including the batch size change at the switch and with worker processes."""
    register_workload("test_user.tensors", _classification(as_dataset=False))
    register_workload("test_user.dataset", _classification(as_dataset=True))
    tensors = _run("test_user.tensors")
    assert [m["batch_size"] for m in tensors] == [32, 75, 75]
    assert tensors[1]["steps"] - tensors[0]["steps"] == math.ceil(150 / 75)
    _same_training(tensors, _run("test_user.dataset"))
    _same_training(tensors, _run("test_user.dataset", num_workers=2))
    other_seed = _run("test_user.dataset", seed=6)
    assert other_seed[0]["train_loss"] != tensors[0]["train_loss"]


def test_the_batch_size_changes_at_the_switch_step_mid_epoch_on_a_dataset() -> None:
    """A step-criterion switch inside an epoch: the very next batch has the new size, however far the DataLoader's
    workers had read ahead."""
    register_workload("test_user.dataset", _classification(as_dataset=True))
    config = TrainConfig(workload="test_user.dataset", optimizer="fuse_pv", epochs=1, batch_size=10,
                         batch_size_after_switch=40, num_workers=2, optimizer_args={
                             "lr": 0.02, "switch": {"criterion": "step", "step": 3}})
    trainer = Trainer(config)
    sizes: list[int] = []
    original = trainer._step

    def spy(inputs, targets, record):  # noqa: ANN001, ANN202
        sizes.append(int(targets.shape[0]))
        return original(inputs, targets, record)

    trainer._step = spy
    trainer.run_epoch()
    # the step criterion fires inside the 4th step (on a batch of 10): every batch after it has 40 samples
    assert sizes == [10, 10, 10, 10, 40, 40, 30]
    assert trainer.optimizer.switched_at_step == 3


def test_paired_seeding_holds_for_a_users_model(project: Path) -> None:
    first = build_supervised("user_models:regression", seed=3, search_path=[project])
    again = build_supervised("user_models:regression", seed=3, search_path=[project])
    other = build_supervised("user_models:regression", seed=4, search_path=[project])
    state = torch.get_rng_state()
    build_supervised("user_models:regression", seed=3, search_path=[project])
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    weights = [list(m.model.parameters())[0] for m in (first, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_batch_norm_statistics_are_not_moved_by_the_probe() -> None:
    def build() -> Problem:
        x, y = torch.randn(20, 3), torch.randn(20, 1)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        return Problem(model=model, loss=nn.MSELoss(), train=(x, y), validation=(x, y))

    register_workload("test_user.batchnorm", build)
    instance = build_supervised("test_user.batchnorm", seed=0)
    assert torch.equal(instance.model[1].running_mean, torch.zeros(4))
    assert int(instance.model[1].num_batches_tracked) == 0


# ------------------------------------------------------------------ studies, the CLI and the API


def test_study_of_a_users_regression_minimizes_val_mse(project: Path, capsys) -> None:
    storage = f"journal:{project / 'j.log'}"
    code, out, err = run_cli("run", "study.yaml", "--storage", storage, "--no-mlflow", "--quiet", cwd=project,
                             capsys=capsys)
    assert code == 0, err
    assert "study user_regression: complete 3" in out and "best configurations (val_mse" in out
    study = optuna.load_study(study_name="user_regression", storage=_journal(project / "j.log"))
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.best_value == min(t.value for t in study.trials)


def _journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def test_workload_path_is_relative_to_the_study_file(project: Path, capsys) -> None:
    (project / "models").mkdir()
    (project / "user_models.py").rename(project / "models" / "user_models.py")
    (project / "studies").mkdir()
    write_study(project / "studies" / "study.yaml", workload_path="../models")
    code, out, err = run_cli("run", "studies/study.yaml", "--storage", f"journal:{project / 'j.log'}",
                             "--no-mlflow", "--quiet", "--n-trials", "1", cwd=project, capsys=capsys)
    assert code == 0, err


MALFORMED = [
    ("bad-import-path", {"workload": "user_modelz:regression"}, ["workload", "no module named 'user_modelz'"]),
    ("missing-builder", {"workload": "user_models:regresion"}, ["workload", "has no 'regresion'"]),
    ("not-a-function", {"workload": "user_models:not_callable"}, ["workload", "expected a builder function"]),
    ("wrong-return-type", {"workload": "user_models:returns_a_model", "search": {}},
     ["workload", "returned Linear, expected a fuse_tune.Problem"]),
    ("non-scalar-loss", {"workload": "user_models:non_scalar_loss", "search": {}},
     ["workload", "tensor of shape (2, 1), expected a scalar"]),
    ("builder-raises", {"workload": "user_models:raises", "search": {}},
     ["workload", "RuntimeError: the data server is down"]),
    ("unknown-option", {"fixed": {**STUDY["fixed"], "depth": 3}}, ["fixed.depth", "not a setting"]),
    ("option-of-the-wrong-type", {"fixed": {**STUDY["fixed"], "scale": "big"}},
     ["fixed", "scale: expected float"]),
    ("no-such-metric", {"objective": {"metric": "val_accuracy"}}, ["objective.metric", "'val_mse'"]),
]


@pytest.mark.parametrize(("name", "changes", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_bad_user_workloads_are_one_line_and_exit_2(project: Path, capsys, name, changes, expected) -> None:
    if changes.get("search") == {}:
        changes = {**changes, "search": {"lr": {"type": "float", "low": 0.001, "high": 0.01}}, "fixed":
                   {"batch_size": 10}}
    write_study(project / f"{name}.yaml", **changes)
    code, out, err = run_cli("run", f"{name}.yaml", "--storage", f"journal:{project / 'j.log'}", "--no-mlflow",
                             "--quiet", cwd=project, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"fuse-tune: error: {name}.yaml: {expected[0]}") and "Traceback" not in err
    for fragment in expected:
        assert fragment in lines[0]
    assert not (project / "j.log").exists() or "user_regression" not in (project / "j.log").read_text()


def test_fuse_tune_train_takes_a_builder_and_its_options(project: Path) -> None:
    done = subprocess.run([FUSE_TUNE, "train", "--workload", "user_models:regression", "--optimizer", "fuse_pv",
                           "--epochs", "2", "--set", "hidden=4", "--set", "batch_size=50", "--quiet"],
                          cwd=project, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "val_mse" in done.stdout and "test_mse" in done.stdout
    bad = subprocess.run([FUSE_TUNE, "train", "--workload", "user_models:non_scalar_loss", "--optimizer", "adam",
                          "--epochs", "1"], cwd=project, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "expected a scalar" in bad.stderr
    unknown = subprocess.run([FUSE_TUNE, "train", "--workload", "user_models:regression", "--optimizer", "adam",
                              "--set", "activation=gelu"], cwd=project, capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "activation: expected one of ['tanh', 'relu']" in unknown.stderr


def test_the_api_finds_the_cli_best_trial_and_leaves_the_same_records(project: Path, capsys,
                                                                        monkeypatch) -> None:
    """The same study through the CLI and through fuse_tune.run_study with the builder passed as a callable:
    same trials, same values, same best trial, and the same MLflow parent and child runs."""
    import mlflow

    uri_cli, uri_api = f"sqlite:///{project / 'cli.db'}", f"sqlite:///{project / 'api.db'}"
    code, out, err = run_cli("run", "study.yaml", "--storage", f"journal:{project / 'cli.log'}", "--mlflow-uri",
                             uri_cli, "--quiet", cwd=project, capsys=capsys)
    assert code == 0, err
    monkeypatch.syspath_prepend(str(project))
    import user_models

    study = {key: value for key, value in STUDY.items() if key != "workload"}
    result = fuse_tune.run_study(study, workload=user_models.regression, storage=f"journal:{project / 'api.log'}",
                                 mlflow_uri=uri_api)
    cli = optuna.load_study(study_name="user_regression", storage=_journal(project / "cli.log"))
    assert result.best["trial"] == cli.best_trial.number and result.best["value"] == cli.best_value
    assert [row["value"] for row in result.trials] == [t.value for t in cli.trials]
    assert result.best["config"]["switch"] == {"criterion": "epoch", "epoch": cli.best_params["switch.epoch"]}
    assert result.trials_frame().shape[0] == 3

    def records(uri: str) -> list[tuple]:
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("user_regression")
        runs = client.search_runs([experiment.experiment_id])
        return sorted((r.info.run_name, r.info.status, tuple(sorted(r.data.params.items())),
                       tuple(sorted(k for k in r.data.metrics))) for r in runs
                      if r.data.tags.get("fuse.role") != "study")

    assert records(uri_api) == records(uri_cli) and len(records(uri_cli)) == 3


def test_the_api_runs_a_builder_defined_in_a_notebook(tmp_path: Path) -> None:
    """A builder that no other process can import (nested, like a notebook cell's): in this process, and a clear
    refusal for worker processes."""
    def build(*, width: int = 4) -> Problem:
        x = torch.linspace(-1, 1, 60).unsqueeze(1)
        return Problem(model=nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1)), loss=nn.MSELoss(),
                       metric=fuse_tune.MSE, train=(x[::2], x[::2] ** 2), validation=(x[1::2], x[1::2] ** 2))

    study = {"name": "notebook", "optimizer": "adam", "epochs": 2, "seeds": [0], "fixed": {"batch_size": 10},
             "search": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}, "budget": {"trials": 2},
             "pruner": {"name": "none"}}
    result = fuse_tune.run_study(study, workload=build, storage=f"journal:{tmp_path / 'n.log'}", mlflow_uri=None)
    assert [row["state"] for row in result.trials] == ["COMPLETE", "COMPLETE"]
    assert result.spec.objective.metric == "val_mse" and result.spec.objective.direction == "minimize"
    with pytest.raises(UserError, match="worker processes cannot import: use n_jobs=1"):
        fuse_tune.run_study(study, workload=build, n_jobs=2, storage=f"journal:{tmp_path / 'm.log'}",
                            mlflow_uri=None)


def test_a_loss_only_workload_is_tuned_on_its_validation_loss() -> None:
    def autoencoder(*, code: int = 2) -> Problem:
        x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
        model = nn.Sequential(nn.Linear(5, code), nn.Linear(code, 5))
        return Problem(model=model, loss=nn.MSELoss(), train=TensorDataset(x[:48], x[:48]),
                       validation=TensorDataset(x[48:], x[48:]))

    register_workload("test_user.autoencoder", autoencoder)
    from fuse_tune.spec import parse_spec
    from fuse_tune.trial import check_spec

    spec = check_spec(parse_spec({**{k: v for k, v in STUDY.items() if k not in ("search",)},
                                  "workload": "test_user.autoencoder", "fixed": {"batch_size": 16},
                                  "search": {"code": {"type": "int", "low": 1, "high": 3}}}))
    assert (spec.objective.metric, spec.objective.direction) == ("val_loss", "minimize")
    result = train(TrainConfig(workload="test_user.autoencoder", optimizer="adam", epochs=1, batch_size=16))
    assert result.final.scores == {} and result.final.test_loss is None and result.final.val_loss > 0


def test_cli_train_of_a_script_file_module_runs_in_a_fresh_process(tmp_path: Path) -> None:
    """The module lives only in the user's folder: a fresh interpreter finds it through --workload-path."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mine.py").write_text(USER_MODULE)
    done = subprocess.run([FUSE_TUNE, "train", "--workload", "mine:regression", "--workload-path", "lib",
                           "--optimizer", "adam", "--epochs", "1", "--set", "batch_size=40", "--quiet"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert textwrap.dedent("  final train loss") in done.stdout


NOTEBOOK = '''
import json, sys
import torch
from torch import nn
import fuse_tune

def build(*, width: int = 4) -> fuse_tune.Problem:   # defined in __main__, as in a notebook: not importable
    x = torch.linspace(-1, 1, 60).unsqueeze(1)
    return fuse_tune.Problem(model=nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, 1)),
                             loss=nn.MSELoss(), metric=fuse_tune.MSE,
                             train=(x[::2], x[::2] ** 2), validation=(x[1::2], x[1::2] ** 2))

study = {"name": "notebook_ray", "optimizer": "fuse_pv", "epochs": 2, "seeds": [0],
         "fixed": {"batch_size": 10, "switch": {"criterion": "epoch", "epoch": 1}},
         "search": {"width": {"type": "categorical", "choices": [2, 4]}}, "budget": {"trials": 2},
         "sampler": {"name": "grid"}, "pruner": {"name": "none"}}
result = fuse_tune.run_study(study, workload=build, backend="ray", storage=sys.argv[1], mlflow_uri=sys.argv[2])
print(json.dumps({"states": [row["state"] for row in result.trials], "best": result.best["params"],
                  "metric": result.spec.objective.metric}))
'''


def test_the_api_ships_a_notebook_builder_to_ray_workers(tmp_path: Path) -> None:
    """Ray's workers are other processes: a builder from __main__ reaches them by value (cloudpickle) and every
    trial completes, with its MLflow child run."""
    pytest.importorskip("ray")
    import json
    import os

    import mlflow

    script = tmp_path / "notebook.py"
    script.write_text(NOTEBOOK)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ray_results"), uri], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["states"] == ["COMPLETE", "COMPLETE"] and outcome["metric"] == "val_mse"
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("notebook_ray").experiment_id])
    children = [r for r in runs if r.data.tags.get("fuse.role") == "trial"]
    assert len(children) == 2 and all(r.info.status == "FINISHED" and "val_mse/seed_0" in r.data.metrics
                                      for r in children)


def test_a_comparison_of_a_users_workload_selects_on_validation_and_reports_test(project: Path) -> None:
    comparison = {"name": "cmp_user", "workload": "user_models:regression", "epochs": 2,
                  "fixed": {"batch_size": 50}, "tuning": {"trials": 2, "seeds": [0], "sampler": {"name": "random",
                                                                                               "seed": 0}},
                  "rerun": {"seeds": [1, 2]},
                  "methods": {"adam": {"search": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}},
                              "fuse_pv": {"fixed": {"lr": 0.01, "switch": {"criterion": "epoch", "epoch": 1}}}}}
    (project / "cmp.yaml").write_text(yaml.safe_dump(comparison, sort_keys=False))
    done = subprocess.run([FUSE_TUNE, "compare", "cmp.yaml", "--mlflow-uri", f"sqlite:///{project / 'm.db'}",
                           "--storage", f"journal:{project / 'j.log'}", "--out", "out", "--threads", "1", "--quiet"],
                          cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    header = "| method | seeds | validation mse | test mse | test mse median (best) | final train loss |"
    assert header in done.stdout and "final test_mse" in done.stdout  # the paired comparison on the test split
    written = yaml.safe_load((project / "out" / "studies" / "cmp_user-adam.yaml").read_text())
    assert written["workload_path"] == [str(project)]  # the comparison file's folder, not out/studies


def test_a_ratio_metric_is_finished_from_sums_over_the_whole_split() -> None:
    """L2RE = ||u - u*|| / ||u*|| over the whole split, not a mean of per-chunk ratios; diagnostics are logged."""
    def build() -> Problem:
        x = torch.linspace(0, 1, 100).unsqueeze(1)
        model = nn.Linear(1, 1)
        return Problem(model=model, loss=nn.MSELoss(), metric=fuse_tune.L2RE, train=(x, 2 * x + 1),
                       validation=(x, 2 * x + 1),
                       diagnostics=lambda m, data: {"train_max_error": float((m(data[0]) - data[1]).abs().max())})

    register_workload("test_user.l2re", build)
    trainer = Trainer(TrainConfig(workload="test_user.l2re", optimizer="adam", epochs=1, batch_size=10,
                                  eval_batch_size=7, optimizer_args={"lr": 0.01}))
    metrics = trainer.run_epoch()
    with torch.no_grad():
        x, u = trainer.problem.validation
        expected = float(torch.linalg.vector_norm(trainer.model(x) - u) / torch.linalg.vector_norm(u))
        max_error = float((trainer.model(x) - u).abs().max())
    assert metrics.scores["val_l2re"] == pytest.approx(expected, rel=1e-6)
    assert metrics.scores["train_max_error"] == pytest.approx(max_error, rel=1e-6)


def test_full_batch_steps_see_the_whole_split_and_an_epoch_is_steps_per_epoch() -> None:
    """full_batch: a deterministic objective, one evaluation of the whole training split per closure call, an
    epoch of steps_per_epoch steps, the same from a Dataset as from tensors; costs counted in closure calls."""
    register_workload("test_user.tensors", _classification(as_dataset=False))
    register_workload("test_user.dataset", _classification(as_dataset=True))
    runs = []
    for name in ("test_user.tensors", "test_user.dataset"):
        config = TrainConfig(workload=name, optimizer="fuse_pv", epochs=2, full_batch=True, steps_per_epoch=5,
                             optimizer_args={"lr": 0.02, "switch": {"criterion": "step", "step": 5}})
        runs.append(train(config).history)
    tensors, dataset = runs
    _same_training([m.as_dict() for m in tensors], [m.as_dict() for m in dataset])
    first, second = tensors
    assert (first.steps, second.steps) == (5, 10) and first.batch_size == second.batch_size == 150
    assert first.grad_evals == 5 and first.samples == 5 * 150  # Adam: one evaluation of all 150 samples a step
    assert second.phase == "lbfgs" and second.grad_evals - first.grad_evals >= 5
    assert second.samples == 150 * second.grad_evals
