"""Workload registry and builders: every workload builds or names its missing data; paired seeding."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch

from fuse_optim.test_functions import get_test_function
from fuse_tune.workloads import (
    WORKLOADS,
    DatasetNotFound,
    Workload,
    add_gradient_noise,
    build_function,
    build_supervised,
    get_workload,
)
from fuse_tune.workloads.datasets import BUNDLED_DATASETS

REQUIRED = {
    "rosenbrock",
    "rastrigin",
    "ackley",
    "himmelblau",
    "digits-logreg",
    "digits-mlp",
    "digits-cnn",
    "mnist-logreg",
    "mnist-test-split-logreg",
    "fashionmnist-mlp",
    "kmnist-mlp",
    "usps-cnn",
    "cifar10-densenet",
}


def test_registry_holds_the_required_workloads() -> None:
    assert REQUIRED <= set(WORKLOADS)
    for name, workload in WORKLOADS.items():
        assert workload.name == name and workload.description
        assert pickle.loads(pickle.dumps(workload)) == workload  # Ray and multiprocessing pickle them
        assert hash(workload) == hash(copy.deepcopy(workload))
    with pytest.raises(TypeError):
        WORKLOADS["digits-logreg"].options["l2"] = 1.0  # read-only defaults


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_workload_builds_or_names_its_missing_data(tmp_path: Path, name: str) -> None:
    workload = get_workload(name)
    if workload.kind == "function":
        instance = build_function(workload, seed=0)
        value = instance.module()
        assert torch.isfinite(value) and value.item() > instance.f_star
        assert instance.module.x.tolist() == list(get_test_function(workload.function).default_start(2))
    elif workload.dataset is None or workload.dataset in BUNDLED_DATASETS:  # bundled data, or none (PINNs)
        instance = build_supervised(workload, data_dir=tmp_path, seed=0)
        batch_x, batch_y = instance.problem.train[0][:64], instance.problem.train[1][:64]
        loss = instance.loss_fn(instance.model, batch_x, batch_y)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in instance.model.parameters())
    else:
        with pytest.raises(DatasetNotFound) as caught:
            build_supervised(workload, data_dir=tmp_path, seed=0)
        message = str(caught.value)
        assert "\n" not in message and str(tmp_path) in message and "download=True" in message


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn"])
def test_paired_seeding_gives_identical_initial_weights(name: str) -> None:
    torch.manual_seed(123)
    first = build_supervised(name, seed=7)
    state_before = torch.random.get_rng_state()
    torch.rand(1000)  # disturb the global RNG between builds
    second = build_supervised(name, seed=7, dtype=torch.float64)
    other = build_supervised(name, seed=8)
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert first_state.keys() == second_state.keys()
    for key, value in first_state.items():
        assert torch.equal(value.to(second_state[key].dtype), second_state[key]), key
    pairs = zip(first.model.parameters(), other.model.parameters(), strict=True)
    assert any(not torch.equal(a, c) for a, c in pairs)
    # building does not touch the global RNG
    torch.random.set_rng_state(state_before)
    expected = torch.rand(3)
    torch.random.set_rng_state(state_before)
    build_supervised(name, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_logistic_regression_loss_folds_in_l2_on_weights_only() -> None:
    instance = build_supervised("digits-logreg", seed=0)
    assert instance.options["l2"] == 1e-3
    model, (x, y) = instance.model, instance.problem.train
    weight = model[1].weight
    expected = torch.nn.functional.cross_entropy(model(x), y) + 0.5 * 1e-3 * weight.pow(2).sum()
    assert torch.allclose(instance.loss_fn(model, x, y), expected)
    unregularised = build_supervised("digits-logreg", seed=0, l2=0.0)
    assert torch.allclose(unregularised.loss_fn(model, x, y), torch.nn.functional.cross_entropy(model(x), y))
    assert build_supervised("digits-mlp", seed=0).options["l2"] == 0.0


def test_supervised_options_override_model_defaults() -> None:
    instance = build_supervised("digits-mlp", seed=0, hidden_sizes=(16,))
    assert instance.options["hidden_sizes"] == (16,)
    assert instance.model(instance.problem.test[0][:3]).shape == (3, 10)
    assert instance.problem.train[0].dtype == torch.float32 and instance.problem.validation[0].dtype == torch.float32


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: get_workload("imagenet-resnet"),
            "name: unknown workload 'imagenet-resnet'; accepted: ackley",
        ),
        (
            lambda: build_supervised("digits-logreg", seed=0, hidden_sizes=(3,)),
            "hidden_sizes: not an option.*l2",
        ),
        (
            lambda: build_supervised("digits-mlp", seed=0, momentum=0.9),
            "momentum: .*accepted: hidden_sizes, l2",
        ),
        (lambda: build_supervised("digits-logreg", seed=0, l2=-1.0), "l2: expected a finite number >= 0"),
        (lambda: build_supervised("rosenbrock", seed=0), "build_function"),
        (lambda: build_function("digits-logreg", seed=0), "build_supervised"),
        (lambda: build_function("himmelblau", seed=0, dim=3), "dim: himmelblau is defined for dim=2 only"),
        (lambda: build_function("rosenbrock", seed=0, start=(0.0,)), "start: expected 2 coordinates"),
        (lambda: build_function("rosenbrock", seed=0, noise=-0.1), "noise: expected a finite number >= 0"),
        (lambda: build_function("rosenbrock", seed=0, l2=0.1), "l2: not an option.*accepted: dim, dtype"),
        (lambda: Workload("x", "quadrature", "d", build=print), "kind: expected 'function' or 'supervised'"),
    ],
)
def test_bad_names_and_options_raise_one_line_value_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_function_workload_dimensions_and_explicit_start() -> None:
    instance = build_function("rosenbrock", seed=0, dim=5)
    assert instance.module.x.tolist() == [-1.5, 2.0, -1.5, 2.0, -1.5]
    assert instance.module.x.dtype == torch.float64
    custom = build_function("rastrigin", seed=0, start=(0.5, -0.5))
    assert custom.start == (0.5, -0.5) and custom.module.x.tolist() == [0.5, -0.5]


def test_gradient_noise_is_seeded_and_optional() -> None:
    def noisy_gradient(seed: int, noise: float) -> torch.Tensor:
        instance = build_function("rosenbrock", seed=seed, noise=noise)
        instance.module().backward()
        instance.add_noise()
        return instance.module.x.grad.clone()

    exact = noisy_gradient(0, 0.0)
    assert exact.tolist() == [-155.0, -50.0]  # grad of Rosenbrock at (-1.5, 2)
    assert torch.equal(noisy_gradient(0, 0.5), noisy_gradient(0, 0.5))
    assert not torch.equal(noisy_gradient(0, 0.5), noisy_gradient(1, 0.5))
    assert not torch.equal(noisy_gradient(0, 0.5), exact)


def test_gradient_noise_has_the_requested_scale() -> None:
    module = torch.nn.Linear(200, 100)
    for parameter in module.parameters():
        parameter.grad = torch.zeros_like(parameter)
    add_gradient_noise(module, 0.3, torch.Generator().manual_seed(0))
    assert module.weight.grad.std().item() == pytest.approx(0.3, rel=0.02)
    with pytest.raises(ValueError, match="scale: expected a finite number >= 0"):
        add_gradient_noise(module, float("nan"), None)


def test_loss_function_is_reusable_in_chunks() -> None:
    instance = build_supervised("digits-logreg", seed=0)
    problem = instance.problem
    (x, y), model = problem.train, instance.model
    chunked = sum(problem.loss(model(xc), yc) * len(yc) for xc, yc in zip(x.split(500), y.split(500), strict=True))
    assert torch.allclose(chunked / len(y) + problem.penalty(model), instance.loss_fn(model, x, y), atol=1e-6)
