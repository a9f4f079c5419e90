"""Peer contract: the generic checks torch.optim and pytorch_optimizer run on every optimizer, run on FusePV and Fuse.

Ported from torch ``test/test_optim.py`` (``TestOptimRenewed``, driven there by ``OptimizerInfo`` rows of
``torch/testing/_internal/common_optimizers.py``; the Adam row's inputs, scheduler inputs and error inputs are used):

* test_forloop_goes_right_direction (contiguous and not; float32 and float64; ``foreach=False``), the
  Linear-Sigmoid model of ``_test_derived_optimizers``, test_param_groups_lr, test_param_groups_weight_decay,
  test_param_group_with_lrscheduler_goes_right_direction (the seven scheduler combinations of Adam's row)
* test_state_dict_deterministic (with the old ``_test_state_dict``'s "load does not modify the dict"),
  test_save_load_equality_with_weights_only, test_can_load_older_state_dict, test_can_load_from_to_named_state_dict,
  test_load_nontensor_step, test_state_dict_pre_hook / _post_hook / _pre_post_hook,
  test_load_state_dict_pre_hook_and_prepend / _post_hook / _pre_post_hook
* test_deepcopy_copies_all_public_attrs (plus pickle, and lockstep stepping of the copies)
* test_step_pre_hook, test_step_post_hook, test_step_all_hooks
* test_errors (``get_error_inputs_for_all_optims`` and ``optim_error_inputs_func_adam``), test_tensor_lr
* test_step_is_noop_when_params_have_no_grad, test_step_is_noop_for_zero_grads, test_optimizer_can_be_printed
* test_complex (config 1 only; the others must refuse complex parameters), test_rosenbrock_sparse (as the refusal
  of sparse gradients, FusePV/Fuse not supporting them), test_foreach_matches_forloop, test_fused_matches_forloop
  (CPU fused kernel; ``_compare_between``'s None grads at step 2 and frozen layer at steps 3-4 included),
  test_second_order_optims_return_consistent_types

Deliberately not ported from torch:

* CUDA-only, multi-GPU or large-memory tests: test_forloop_goes_right_direction_multigpu, test_mixed_device_dtype,
  test_state_dict_with_cuda_params, test_cpu_load_state_dict, test_set_default_dtype_works_with_foreach,
  test_peak_memory_foreach, test_foreach_large_tensor, test_fused_large_tensor, test_fused_cpu_matches_cuda,
  test_defaults_changed_to_foreach, test_fused_does_not_step_if_foundinf (grad-scaler ``found_inf``, CUDA only)
* capturable, differentiable (TestDifferentiableOptimizer) and maximize variants: refused features here, so only
  their refusal is tested
* test_complex_2d: complex parameters are refused by every configuration that can reach L-BFGS; config 1's complex
  support is checked against torch.optim.Adam instead
* test_fused_error_on_params_on_meta: meta-device kernel dispatch, an internal of torch's fused kernel
* test_non_empty_state: the L-BFGS state is optimizer-wide (one vector over all groups), not per parameter
* test_optim_infos_do_not_specify_global_cliquey_kwargs: hygiene of torch's OptimizerInfo table itself

Ported from kozistr/pytorch_optimizer ``tests/``: test_f32_optimizers / test_bf16_optimizers (Adam phase, bf16 and
fp16), test_closure, test_no_closure, test_reset (as ``zero_grad``; FusePV has no ``reset``), test_no_gradients,
test_sparse_not_supported, test_complex_not_supported / test_complex_optimizers, test_foreach_maximize (as the
refusal of ``maximize``), TestBasicParameterValidation / TestBetaParameterValidation (negative lr, eps,
weight_decay, betas). Not ported: test_init_group and the BaseOptimizer helpers (that library's own base class),
the SAM/Lookahead/TRAC/OrthoGrad wrappers, Hessian optimizers, the adanorm/adamd/cautious/stable variants (options
FusePV does not have), test_lr_schedulers, test_create_optimizer and test_load_modules (that library's registry).

Every check runs over the five configurations of ``CONFIGS``. Every ``step`` gets a closure that zeroes the
gradients, computes the loss, calls ``backward()`` and returns the loss, except in the checks that are about
``step()`` without a closure. After ``FINAL_PHASE_STEPS`` steps every configuration is in its final phase (config 3
switched at step 3; config 4's theta reaches 0 at step 6).
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import Parameter
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    ExponentialLR,
    LinearLR,
    MultiplicativeLR,
    PolynomialLR,
    ReduceLROnPlateau,
    StepLR,
)
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from fuse_optim import Fuse, FusePV

Closure = Callable[[], Any]

#: steps after which every configuration is in its final phase (and has L-BFGS memory when it can)
FINAL_PHASE_STEPS = 8


@dataclass(frozen=True)
class Config:
    """One row of the table: the optimizer class, its options and what they imply for the phases."""

    name: str
    cls: type[Optimizer]
    options: Mapping[str, Any]
    can_reach_lbfgs: bool
    first_step_needs_closure: bool

    def make(self, params: Any, **overrides: Any) -> Optimizer:
        """The optimizer on ``params`` (tensors or groups), ``overrides`` replacing the row's options."""
        return self.cls(params, **{**copy.deepcopy(dict(self.options)), **overrides})


CONFIGS = [
    Config("fusepv-adam-never-switch", FusePV, {"lr": 1e-2, "switch": {"criterion": "never"}},
           can_reach_lbfgs=False, first_step_needs_closure=False),
    Config("fusepv-lbfgs-from-step-0", FusePV, {"switch": {"criterion": "step", "step": 0}},
           can_reach_lbfgs=True, first_step_needs_closure=True),
    Config("fusepv-switch-after-3", FusePV, {"switch": {"criterion": "step", "step": 3}},
           can_reach_lbfgs=True, first_step_needs_closure=False),
    Config("fuse-linear-theta-6", Fuse, {"theta": {"schedule": "linear", "steps": 6}},
           can_reach_lbfgs=True, first_step_needs_closure=False),
    Config("fuse-constant-theta-0.5", Fuse, {"theta": 0.5},
           can_reach_lbfgs=True, first_step_needs_closure=True),
]
LBFGS_CONFIGS = [c for c in CONFIGS if c.can_reach_lbfgs]
ADAM_ONLY = CONFIGS[0]

all_configs = pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])


# ---------------------------------------------------------------------------------------------- problems and helpers
class Problem:
    """A deterministic loss of some parameters: its value, and the closure an optimizer steps with."""

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def value(self) -> float:
        with torch.no_grad():
            return float(self.loss())

    def closure(self, opt: Optimizer) -> Closure:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = self.loss()
            loss.backward()
            return loss

        return closure


class LinearProblem(Problem):
    """torch's test problem: ``loss = ||weight @ input + bias||^2``, weight 10x5, bias 10, input 5."""

    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0, contiguous: bool = True) -> None:
        generator = torch.Generator().manual_seed(seed)
        if contiguous:
            weight = torch.randn(10, 5, generator=generator, dtype=dtype)
            bias = torch.randn(10, generator=generator, dtype=dtype)
        else:
            weight = torch.randn(10, 5, 2, generator=generator, dtype=dtype)[..., 0]
            bias = torch.randn(10, 2, generator=generator, dtype=dtype)[..., 0]
        self.weight, self.bias = Parameter(weight), Parameter(bias)
        self.input = torch.randn(5, generator=generator, dtype=dtype)

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.weight, self.bias]

    def twin(self) -> LinearProblem:
        """The same problem on cloned (equal, not identical) parameters."""
        twin = copy.copy(self)
        twin.weight = Parameter(self.weight.detach().clone())
        twin.bias = Parameter(self.bias.detach().clone())
        return twin

    def loss(self) -> torch.Tensor:
        return (self.weight.mv(self.input) + self.bias).pow(2).sum()


def sigmoid_net(dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[nn.Sequential, torch.Tensor]:
    """The model and input of torch's ``_test_derived_optimizers``: Linear(2, 3), Sigmoid, Linear(3, 1), Sigmoid."""
    model = reinitialise(nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid()).to(dtype), seed)
    inputs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    return model, inputs


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite the module's parameters from a seeded generator (the global RNG stays untouched)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def model_closure(opt: Optimizer, model: nn.Module, inputs: torch.Tensor,
                  loss_fn: Callable[[torch.Tensor], torch.Tensor] = torch.sum) -> Closure:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(inputs))
        loss.backward()
        return loss

    return closure


def as_float(value: Any) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def run(opt: Optimizer, closure: Closure, steps: int) -> list[Any]:
    """``steps`` calls of ``opt.step(closure)``; what each returned."""
    return [opt.step(closure) for _ in range(steps)]


def snapshot(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def all_params(opt: Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def assert_bit_identical(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], what: str = "") -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype and torch.equal(a.detach(), e.detach()), \
            f"{what} tensor {i} differs by {(a.detach() - e.detach()).abs().max().item():.3e}"


def assert_not_moved(actual: Sequence[torch.Tensor], before: Sequence[torch.Tensor], what: str = "") -> None:
    """Unchanged to within a few ulps: a step that moves nothing may still write ``theta x + (1 - theta) x``, which
    rounds (a refused step, which must write nothing, is checked bit for bit instead)."""
    for i, (a, b) in enumerate(zip(actual, before, strict=True)):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-12, msg=lambda m, i=i: f"{what} tensor {i}: {m}")


def assert_tree_equal(actual: Any, expected: Any, path: str = "state_dict") -> None:
    """Equal nested dicts/lists/tuples; tensors equal bit for bit (same dtype and values)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual).__name__} instead of a tensor"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{path}: dtype or shape differs"
        assert torch.equal(actual, expected), f"{path}: values differ"
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{path}: {type(actual).__name__} instead of a mapping"
        assert set(actual) == set(expected), f"{path}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        for key in expected:
            assert_tree_equal(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{path}: length differs"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_tree_equal(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def step_lockstep(pairs: Sequence[tuple[Optimizer, Callable[[], Closure]]], params: Sequence[Sequence[torch.Tensor]],
                  steps: int) -> None:
    """Step every optimizer ``steps`` times, each with a fresh closure; parameters must stay bit-identical."""
    for step in range(steps):
        for opt, make_closure in pairs:
            opt.step(make_closure())
        for other in params[1:]:
            assert_bit_identical(other, params[0], f"step {step}:")


def one_line_error(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


# ---------------------------------------------------------------------------------------------- goes the right way
@all_configs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "noncontiguous"])
def test_forloop_goes_right_direction(config: Config, dtype: torch.dtype, contiguous: bool) -> None:
    """torch test_forloop_goes_right_direction: 20 steps with ``foreach=False`` lower ``||W x + b||^2``."""
    problem = LinearProblem(dtype, seed=0, contiguous=contiguous)
    assert problem.weight.is_contiguous() == contiguous
    opt = config.make(problem.params, foreach=False)
    initial = problem.value()
    run(opt, problem.closure(opt), 20)
    assert problem.value() < initial


@all_configs
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_model_goes_right_direction(config: Config, dtype: torch.dtype) -> None:
    """torch _test_derived_optimizers' Linear-Sigmoid model: the summed output goes down in 20 steps."""
    model, inputs = sigmoid_net(dtype)
    opt = config.make(model.parameters())
    closure = model_closure(opt, model, inputs)
    with torch.no_grad():
        initial = float(model(inputs).sum())
    run(opt, closure, 20)
    with torch.no_grad():
        assert float(model(inputs).sum()) < initial


@all_configs
@pytest.mark.parametrize("groups", ["per-group-lr", "per-group-weight-decay"])
def test_param_groups_go_right_direction(config: Config, groups: str) -> None:
    """torch test_param_groups_lr / test_param_groups_weight_decay (direction part): two groups, different options."""
    problem = LinearProblem(seed=1)
    if groups == "per-group-lr":
        param_groups = [{"params": [problem.weight]}, {"params": [problem.bias], "lr": 1e-2}]
    else:
        param_groups = [{"params": [problem.weight], "weight_decay": 0.1},
                        {"params": [problem.bias], "weight_decay": 0.0}]
    opt = config.make(param_groups)
    initial = problem.value()
    run(opt, problem.closure(opt), 20)
    assert problem.value() < initial


#: common_optimizers.py's Adam row, ``scheduler_inputs``
SCHEDULERS: dict[str, list[Callable[[Optimizer], Any]]] = {
    "ExponentialLR": [lambda o: ExponentialLR(o, gamma=0.9)],
    "LinearLR": [lambda o: LinearLR(o, start_factor=0.4, total_iters=4)],
    "ConstantLR+ExponentialLR": [lambda o: ConstantLR(o, factor=0.4, total_iters=4),
                                 lambda o: ExponentialLR(o, gamma=0.9)],
    "ExponentialLR+ReduceLROnPlateau": [lambda o: ExponentialLR(o, gamma=0.9), lambda o: ReduceLROnPlateau(o)],
    "ConstantLR": [lambda o: ConstantLR(o, factor=0.4, total_iters=4)],
    "PolynomialLR": [lambda o: PolynomialLR(o, power=0.9, total_iters=4)],
    "StepLR+ReduceLROnPlateau": [lambda o: StepLR(o, gamma=0.9, step_size=10), lambda o: ReduceLROnPlateau(o)],
}


@all_configs
@pytest.mark.parametrize("schedulers", list(SCHEDULERS.values()), ids=list(SCHEDULERS))
def test_param_group_with_lrscheduler_goes_right_direction(config: Config, schedulers: list) -> None:
    """torch test_param_group_with_lrscheduler_goes_right_direction (and test_forloop_goes_right_direction's
    with_lrsched): two groups, schedulers stepped after every optimizer step, the loss goes down."""
    problem = LinearProblem(seed=2)
    opt = config.make([{"params": [problem.weight]}, {"params": [problem.bias], "lr": 0.01}])
    attached = [make(opt) for make in schedulers]
    initial = problem.value()
    for _ in range(20):
        loss = opt.step(problem.closure(opt))
        for scheduler in attached:
            scheduler.step(as_float(loss)) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
    assert problem.value() < initial


# ---------------------------------------------------------------------------------------------- state_dict
@all_configs
def test_state_dict_deterministic(config: Config) -> None:
    """torch test_state_dict_deterministic: a clone loaded from ``state_dict()`` steps bit for bit like the original;
    loading leaves the given dict unchanged; both then export equal state dicts; repeated parameters are
    represented identically."""
    problem = LinearProblem(seed=3)
    opt = config.make(problem.params)
    run(opt, problem.closure(opt), 10)

    twin = problem.twin()
    opt_c = config.make(twin.params)
    state_dict = copy.deepcopy(opt.state_dict())
    given = copy.deepcopy(state_dict)
    opt_c.load_state_dict(given)
    assert_tree_equal(given, state_dict, "the dict given to load_state_dict")

    step_lockstep([(opt, lambda: problem.closure(opt)), (opt_c, lambda: twin.closure(opt_c))],
                  [problem.params, twin.params], 10)
    assert_tree_equal(opt_c.state_dict(), opt.state_dict())

    opt_c.param_groups.extend(opt_c.param_groups)
    assert_tree_equal(opt_c.state_dict()["param_groups"][-1], opt.state_dict()["param_groups"][-1])


@all_configs
@pytest.mark.parametrize("primed", [3, 10], ids=["after-3-steps", "after-10-steps"])
def test_save_load_equality_with_weights_only(config: Config, primed: int) -> None:
    """torch test_save_load_equality_with_weights_only: ``torch.save`` then ``torch.load(weights_only=True)`` gives
    the same state dict, and an optimizer loaded from it steps bit for bit like the original."""
    problem = LinearProblem(seed=4)
    opt = config.make(problem.params)
    run(opt, problem.closure(opt), primed)
    state_dict = opt.state_dict()

    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert_tree_equal(loaded, state_dict)

    twin = problem.twin()
    opt_c = config.make(twin.params)
    opt_c.load_state_dict(loaded)
    step_lockstep([(opt, lambda: problem.closure(opt)), (opt_c, lambda: twin.closure(opt_c))],
                  [problem.params, twin.params], 5)


@all_configs
def test_load_state_dict_into_an_optimizer_stepped_in_lockstep(config: Config) -> None:
    """torch _test_state_dict's lockstep run, loading into a live optimizer: two optimizers stepped in lockstep; one
    loads the other's state dict mid-run (after the switch, memory present); they stay bit-identical."""
    problem = LinearProblem(seed=5)
    twin = problem.twin()
    opt, opt_c = config.make(problem.params), config.make(twin.params)
    pairs = [(opt, lambda: problem.closure(opt)), (opt_c, lambda: twin.closure(opt_c))]
    step_lockstep(pairs, [problem.params, twin.params], FINAL_PHASE_STEPS)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    step_lockstep(pairs, [problem.params, twin.params], 5)


def _state_dict_pre_hook(optimizer: Optimizer) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


@all_configs
@pytest.mark.parametrize("hooks", ["pre", "post", "pre-and-post"])
def test_state_dict_hooks(config: Config, hooks: str) -> None:
    """torch test_state_dict_pre_hook / test_state_dict_post_hook / test_state_dict_pre_post_hook."""
    param = torch.rand(2, 3, generator=torch.Generator().manual_seed(6), requires_grad=True)
    opt = config.make([param])
    if "pre" in hooks:
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    if "post" in hooks:
        opt.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = opt.state_dict()
    if hooks == "pre":
        assert state_dict["state"]["test"] == 1
    elif hooks == "post":
        assert state_dict["ran_state_dict_pre_hook"] is False
    else:
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"] is True


@all_configs
def test_load_state_dict_pre_hook_and_prepend(config: Config) -> None:
    """torch test_load_state_dict_pre_hook_and_prepend: a pre-hook edits the dict being loaded; a prepended hook
    runs first."""
    param = torch.rand(2, 3, generator=torch.Generator().manual_seed(7), requires_grad=True)
    opt = config.make([param])
    state_dict = opt.state_dict()

    def set_lr_0002(optimizer: Optimizer, sd: dict[str, Any]) -> None:
        sd["param_groups"][0]["lr"] = 0.002

    def set_lr_0003_on_a_copy(optimizer: Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        mine = copy.deepcopy(sd)
        mine["param_groups"][0]["lr"] = 0.003
        return mine

    opt.register_load_state_dict_pre_hook(set_lr_0002)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(set_lr_0003_on_a_copy, prepend=True)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002  # the prepended hook ran first, the other overrode it


@all_configs
def test_load_state_dict_post_hook_sees_the_loaded_state(config: Config) -> None:
    """torch test_load_state_dict_post_hook / test_load_state_dict_pre_post_hook: the post-hook runs after the
    pre-hook's dict was loaded, and sees the optimizer AFTER the load: ``state_dict()`` inside it equals what was loaded
    (phase, counters and L-BFGS memory included)."""
    problem = LinearProblem(seed=8)
    opt = config.make(problem.params)
    run(opt, problem.closure(opt), FINAL_PHASE_STEPS)
    saved = copy.deepcopy(opt.state_dict())

    fresh = config.make(problem.twin().params)
    seen: dict[str, Any] = {}

    def pre_hook(optimizer: Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        mine = copy.deepcopy(sd)
        mine["param_groups"][0]["lr"] = 0.003
        return mine

    def post_hook(optimizer: Optimizer) -> None:
        seen["lr"] = optimizer.param_groups[0]["lr"]
        seen["state_dict"] = copy.deepcopy(optimizer.state_dict())

    fresh.register_load_state_dict_pre_hook(pre_hook)
    fresh.register_load_state_dict_post_hook(post_hook)
    fresh.load_state_dict(copy.deepcopy(saved))
    assert seen["lr"] == 0.003
    expected = copy.deepcopy(saved)
    expected["param_groups"][0]["lr"] = 0.003
    assert_tree_equal(seen["state_dict"], expected, "state_dict() inside the load post-hook")


#: flags torch.optim.Adam's state dicts did not always have (common_optimizers: not_og_supported_flags)
NEWER_FLAGS = ("maximize", "foreach", "fused", "differentiable", "capturable", "decoupled_weight_decay")


@all_configs
def test_can_load_older_state_dict(config: Config) -> None:
    """torch test_can_load_older_state_dict: the Conv2d+BatchNorm2d model, a state dict without the newer flags loads,
    and the optimizer then steps exactly like a twin that loaded the complete dict."""
    model = reinitialise(nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)), 1)
    inputs = torch.rand(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    opt = config.make(model.parameters())
    run(opt, model_closure(opt, model, inputs), FINAL_PHASE_STEPS)

    model_c = copy.deepcopy(model)
    opt_c = config.make(model_c.parameters())
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    old_state_dict = copy.deepcopy(opt.state_dict())
    for group in old_state_dict["param_groups"]:
        for flag in NEWER_FLAGS:
            group.pop(flag, None)
    opt.load_state_dict(old_state_dict)
    step_lockstep([(opt, lambda: model_closure(opt, model, inputs)),
                   (opt_c, lambda: model_closure(opt_c, model_c, inputs))],
                  [list(model.parameters()), list(model_c.parameters())], 3)


@all_configs
@pytest.mark.parametrize(("named_saved", "named_loaded"), [(True, False), (False, True)],
                         ids=["named-to-unnamed", "unnamed-to-named"])
def test_can_load_from_to_named_state_dict(config: Config, named_saved: bool, named_loaded: bool) -> None:
    """torch test_can_load_from_to_named_state_dict: ``named_parameters()`` work, ``param_names`` survive a load, and
    the loaded optimizer steps like the original."""
    model, inputs = sigmoid_net(seed=10)
    opt = config.make(model.named_parameters() if named_saved else model.parameters())
    run(opt, model_closure(opt, model, inputs), 3)
    model_c = copy.deepcopy(model)
    opt_c = config.make(model_c.named_parameters() if named_loaded else model_c.parameters())
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt_c.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    step_lockstep([(opt, lambda: model_closure(opt, model, inputs)),
                   (opt_c, lambda: model_closure(opt_c, model_c, inputs))],
                  [list(model.parameters()), list(model_c.parameters())], 3)


@all_configs
def test_load_nontensor_step(config: Config) -> None:
    """torch test_load_nontensor_step (and _test_state_dict's "step not wrapped in tensor"): a state dict whose
    per-parameter ``step`` is a Python number loads, and the optimizer then steps exactly like a twin that loaded
    tensor steps (so the step count keeps advancing)."""
    problem = LinearProblem(seed=11)
    opt = config.make(problem.params)
    run(opt, problem.closure(opt), FINAL_PHASE_STEPS)
    state_dict = copy.deepcopy(opt.state_dict())

    twin = problem.twin()
    opt_c = config.make(twin.params)
    opt_c.load_state_dict(copy.deepcopy(state_dict))
    for p_state in state_dict["state"].values():
        if torch.is_tensor(p_state.get("step")):
            p_state["step"] = p_state["step"].item()
    opt.load_state_dict(state_dict)
    step_lockstep([(opt, lambda: problem.closure(opt)), (opt_c, lambda: twin.closure(opt_c))],
                  [problem.params, twin.params], 4)
    assert_tree_equal(opt.state_dict(), opt_c.state_dict())


def test_load_torch_adam_state_dict_then_continue_then_switch() -> None:
    """"Trained with Adam, now switch": FusePV loads a ``torch.optim.Adam`` state dict, its Adam phase continues as
    Adam would (to within kernel rounding: the loaded groups carry Adam's ``foreach``/``fused`` flags, which may pick
    another kernel than Adam's), and a switch to L-BFGS afterwards works."""
    problem = LinearProblem(seed=12)
    adam = torch.optim.Adam(problem.params, lr=1e-2)
    run(adam, problem.closure(adam), 5)

    twin = problem.twin()
    fuse_pv = FusePV(twin.params, lr=1e-2, foreach=False, switch={"criterion": "never"})
    fuse_pv.load_state_dict(copy.deepcopy(adam.state_dict()))
    assert fuse_pv.param_groups[0]["lr"] == 1e-2
    for _ in range(5):
        adam.step(problem.closure(adam))
        fuse_pv.step(twin.closure(fuse_pv))
        for p, p_c in zip(problem.params, twin.params, strict=True):
            torch.testing.assert_close(p_c, p)
    for p, p_c in zip(problem.params, twin.params, strict=True):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fuse_pv.state[p_c][key].cpu(), adam.state[p][key], msg=key)

    before = twin.value()
    fuse_pv.switch_to_lbfgs()
    run(fuse_pv, twin.closure(fuse_pv), 5)
    assert fuse_pv.phase == "lbfgs"
    assert twin.value() < before


# ---------------------------------------------------------------------------------------------- deepcopy, pickle
def _is_immutable(value: Any) -> bool:
    return isinstance(value, (str, bytes, int, float, complex, bool, type(None), frozenset, type)) or (
        isinstance(value, tuple) and all(_is_immutable(v) for v in value))


@all_configs
def test_deepcopy_copies_all_public_attrs(config: Config) -> None:
    """torch test_deepcopy_copies_all_public_attrs: a deep copy has the same public attributes, none of them shared
    with the original (except immutable values); its deep-copied parameters then step bit for bit like the
    original's, without touching the original's."""
    problem = LinearProblem(seed=13)
    opt = config.make(problem.params)
    run(opt, problem.closure(opt), 5)

    opt_c = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert {k for k in vars(opt_c) if not k.startswith("_")} == public
    for name in public:
        value = getattr(opt, name)
        if not _is_immutable(value):
            assert getattr(opt_c, name) is not value, f"{name} is shared with the original"

    params_c = all_params(opt_c)
    assert all(p_c is not p for p_c, p in zip(params_c, problem.params, strict=True))
    twin = copy.copy(problem)
    twin.weight, twin.bias = params_c
    step_lockstep([(opt, lambda: problem.closure(opt)), (opt_c, lambda: twin.closure(opt_c))],
                  [problem.params, twin.params], 5)
    before = snapshot(problem.params)
    opt_c.step(twin.closure(opt_c))
    assert_bit_identical(problem.params, before, "the original's parameters after the copy stepped:")


@all_configs
def test_pickle_round_trip(config: Config) -> None:
    """torch test_deepcopy_copies_all_public_attrs, with ``pickle``: the unpickled optimizer exports the same state
    dict and its next steps work, bit for bit like the original's."""
    problem = LinearProblem(seed=14)
    opt = config.make(problem.params)
    run(opt, problem.closure(opt), 5)

    opt_c = pickle.loads(pickle.dumps(opt))
    assert type(opt_c) is type(opt)
    assert_tree_equal(opt_c.state_dict(), opt.state_dict())
    twin = copy.copy(problem)
    twin.weight, twin.bias = all_params(opt_c)
    step_lockstep([(opt, lambda: problem.closure(opt)), (opt_c, lambda: twin.closure(opt_c))],
                  [problem.params, twin.params], 3)


# ---------------------------------------------------------------------------------------------- step hooks
@all_configs
def test_step_hooks_run_once_per_step(config: Config) -> None:
    """torch test_step_pre_hook / test_step_post_hook / test_step_all_hooks: local and global hooks run once per
    ``step()`` (however many closure calls the L-BFGS phase makes), in order, and not after removal."""
    problem = LinearProblem(seed=15)
    opt = config.make(problem.params)
    events: list[str] = []
    closure_calls = 0

    def closure() -> torch.Tensor:
        nonlocal closure_calls
        closure_calls += 1
        return problem.closure(opt)()

    handles = [
        register_optimizer_step_pre_hook(lambda o, args, kwargs: events.append("global-pre")),
        register_optimizer_step_post_hook(lambda o, args, kwargs: events.append("global-post")),
        opt.register_step_pre_hook(lambda o, args, kwargs: events.append("pre")),
        opt.register_step_post_hook(lambda o, args, kwargs: events.append("post")),
    ]
    try:
        steps = FINAL_PHASE_STEPS
        run(opt, closure, steps)
        assert events == ["global-pre", "pre", "post", "global-post"] * steps
        assert closure_calls >= steps
    finally:
        for handle in handles:
            handle.remove()
    opt.step(closure)
    assert len(events) == 4 * steps


# ---------------------------------------------------------------------------------------------- construction errors
@all_configs
@pytest.mark.parametrize("form", ["bare-set", "set-in-group"])
def test_params_given_as_a_set_raise_type_error(config: Config, form: str) -> None:
    """torch test_errors ("optimizer parameters need to be organized in ordered collections"): a set's order changes
    between runs, and the L-BFGS vector and the state dict depend on the order. torch refuses a set inside a group;
    a bare set is refused here too."""
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    params = {p, q} if form == "bare-set" else [{"params": {p, q}}]
    with pytest.raises(TypeError):
        config.make(params)


@all_configs
def test_params_given_as_a_tensor_raise_type_error(config: Config) -> None:
    """torch test_errors ("invalid param type")."""
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable of Tensors"):
        config.make(Parameter(torch.randn(1, 1)))


@all_configs
def test_empty_params_raise_value_error(config: Config) -> None:
    """torch Optimizer: "optimizer got an empty parameter list"."""
    with pytest.raises(ValueError, match="empty parameter list"):
        config.make([])


@all_configs
def test_duplicate_params_warn_or_raise_as_torch_does(config: Config) -> None:
    """torch test_errors: duplicates within a group warn; across groups they raise ValueError."""
    p = Parameter(torch.randn(1, 1))
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
        config.make([p, p])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        config.make([{"params": p}, {"params": p}])


#: torch test_errors (Adam's and every optimizer's error inputs) and pytorch_optimizer's parameter validation
BAD_OPTIONS = [
    pytest.param({"betas": (1.0, 0.0)}, "betas", id="beta1-is-1"),
    pytest.param({"betas": (-0.1, 0.1)}, "betas", id="negative-beta1"),
    pytest.param({"betas": (0.1, -0.1)}, "betas", id="negative-beta2"),
    pytest.param({"betas": (torch.tensor(0.9), torch.tensor(0.99))}, "betas", id="tensor-betas"),
    pytest.param({"weight_decay": -1}, "weight_decay", id="negative-weight-decay"),
    pytest.param({"lr": -1e-2}, "lr", id="negative-lr"),
    pytest.param({"eps": -1e-6}, "eps", id="negative-eps"),
    pytest.param({"lr": torch.tensor([0.001, 0.001])}, "lr", id="two-element-tensor-lr"),
]


@all_configs
@pytest.mark.parametrize(("options", "named"), BAD_OPTIONS)
def test_bad_hyperparameters_raise_value_error_naming_them(config: Config, options: dict, named: str) -> None:
    """torch test_errors / pytorch_optimizer TestBasicParameterValidation, TestBetaParameterValidation."""
    with pytest.raises(ValueError, match=named) as error:
        config.make([Parameter(torch.randn(1, 1))], **options)
    one_line_error(error)


@all_configs
def test_foreach_and_fused_together_raise(config: Config) -> None:
    """torch test_errors: "`fused` and `foreach` cannot be `True` together"."""
    with pytest.raises((ValueError, RuntimeError), match=r"(?=.*foreach)(?=.*fused)"):
        config.make([Parameter(torch.randn(1, 1))], foreach=True, fused=True)


def _construct(config: Config, where: str, params: list[torch.Tensor], **options: Any) -> Optimizer:
    """The optimizer with ``options`` given in the constructor, a group dict, or an ``add_param_group`` call."""
    if where == "constructor":
        return config.make(params, **options)
    if where == "param-group":
        return config.make([{"params": params, **options}])
    opt = config.make(params[:1])
    opt.add_param_group({"params": params[1:], **options})
    return opt


WHERE = ["constructor", "param-group", "add_param_group"]


@all_configs
@pytest.mark.parametrize("where", WHERE)
def test_tensor_lr_refused_in_one_line_or_equivalent(config: Config, where: str) -> None:
    """torch test_tensor_lr: a tensor ``lr`` is either refused with a one-line ValueError naming ``lr``, or steps
    like the same float ``lr``."""
    problem = LinearProblem(seed=16)
    twin = problem.twin()
    try:
        opt = _construct(config, where, problem.params, lr=torch.tensor(1e-3))
    except ValueError as e:
        message = str(e)
        assert "lr" in message and "\n" not in message, message
        return
    opt_r = _construct(config, where, twin.params, lr=1e-3)
    for _ in range(5):
        opt.step(problem.closure(opt))
        opt_r.step(twin.closure(opt_r))
        for p, p_r in zip(problem.params, twin.params, strict=True):
            torch.testing.assert_close(p, p_r)


REFUSED = ["maximize", "capturable", "differentiable", "decoupled_weight_decay"]


@all_configs
@pytest.mark.parametrize("key", REFUSED)
@pytest.mark.parametrize("where", WHERE)
def test_refused_features_raise_value_error_naming_the_key(config: Config, key: str, where: str) -> None:
    """torch's maximize / capturable / differentiable / decoupled_weight_decay inputs (and pytorch_optimizer
    test_foreach_maximize): refused here, with a one-line ValueError naming the key, wherever they are given;
    a refused ``add_param_group`` leaves the optimizer unchanged."""
    params = [Parameter(torch.randn(2)), Parameter(torch.randn(3))]
    if where == "add_param_group":
        opt = config.make(params[:1])
        with pytest.raises(ValueError, match=key) as error:
            opt.add_param_group({"params": params[1:], key: True})
        assert len(opt.param_groups) == 1 and all_params(opt) == params[:1]
    else:
        with pytest.raises(ValueError, match=key) as error:
            _construct(config, where, params, **{key: True})
    one_line_error(error)


def _complex_params(generator: torch.Generator) -> list[torch.Tensor]:
    """torch test_complex's parameters: two complex, the last intentionally real."""
    return [torch.randn(10, 5, dtype=torch.complex64, generator=generator).requires_grad_(),
            torch.randn(10, dtype=torch.complex64, generator=generator).requires_grad_(),
            torch.randn(10, 5, dtype=torch.float32, generator=generator).requires_grad_()]


def _random_grad_closure(params: list[torch.Tensor], generator: torch.Generator) -> Closure:
    def closure() -> torch.Tensor:
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=generator)
        return torch.randn((), generator=generator)

    return closure


@pytest.mark.parametrize("config", LBFGS_CONFIGS, ids=[c.name for c in LBFGS_CONFIGS])
@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
def test_complex_params_refused_when_lbfgs_is_reachable(config: Config, where: str) -> None:
    """torch test_complex / pytorch_optimizer test_complex_not_supported: the L-BFGS phase treats the parameters as one
    real vector, so an optimizer that can reach it refuses complex parameters when they are given."""
    params = _complex_params(torch.Generator().manual_seed(17))
    with pytest.raises((ValueError, TypeError), match="complex") as error:
        if where == "constructor":
            config.make(params)
        else:
            opt = config.make(params[2:])
            opt.add_param_group({"params": params[:2]})
    one_line_error(error)


def test_complex_params_work_like_torch_adam_when_never_switching() -> None:
    """torch test_complex / pytorch_optimizer test_complex_optimizers, for config 1: complex parameters step exactly
    like ``torch.optim.Adam``'s, and like their ``view_as_real`` counterparts."""
    params = _complex_params(torch.Generator().manual_seed(18))
    params_adam = snapshot(params)
    params_real = [torch.view_as_real(p.detach()).clone() if p.is_complex() else p.detach().clone() for p in params]
    for p in params_adam + params_real:
        p.requires_grad_()
    opt = ADAM_ONLY.make(params, foreach=False)
    adam = torch.optim.Adam(params_adam, lr=opt.defaults["lr"], foreach=False)
    opt_real = ADAM_ONLY.make(params_real, foreach=False)
    gen, gen_adam, gen_real = (torch.Generator().manual_seed(19) for _ in range(3))
    closure, closure_adam = _random_grad_closure(params, gen), _random_grad_closure(params_adam, gen_adam)

    def closure_real() -> torch.Tensor:
        for p, p_real in zip(params, params_real, strict=True):
            grad = torch.randn(p.shape, dtype=p.dtype, generator=gen_real)
            p_real.grad = torch.view_as_real(grad) if p.is_complex() else grad
        return torch.randn((), generator=gen_real)

    for _ in range(3):
        opt.step(closure)
        adam.step(closure_adam)
        opt_real.step(closure_real)
    assert_bit_identical(params, params_adam, "FusePV vs torch.optim.Adam on complex parameters:")
    for p, p_real in zip(params, params_real, strict=True):
        torch.testing.assert_close(torch.view_as_real(p.detach()) if p.is_complex() else p.detach(), p_real.detach())


@all_configs
@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
def test_mixed_dtype_params(config: Config, where: str) -> None:
    """torch test_mixed_device_dtype (CPU dtype part): float32 and float64 parameters together are refused by an
    optimizer that can reach L-BFGS (one vector, one dtype), with an error naming the dtypes; with ``never`` they step
    exactly like ``torch.optim.Adam``'s."""
    generator = torch.Generator().manual_seed(20)
    params = [torch.randn(2, 3, dtype=torch.float32, generator=generator).requires_grad_(),
              torch.randn(2, 3, dtype=torch.float64, generator=generator).requires_grad_()]

    def build(ps: list[torch.Tensor], **options: Any) -> Optimizer:
        if where == "constructor":
            return config.make(ps, **options)
        opt = config.make(ps[:1], **options)
        opt.add_param_group({"params": ps[1:]})
        return opt

    if config.can_reach_lbfgs:
        with pytest.raises((ValueError, TypeError), match="dtype") as error:
            build(params)
        one_line_error(error)
        return
    params_adam = [p.detach().clone().requires_grad_() for p in params]
    opt = build(params, foreach=False)
    adam = torch.optim.Adam(params_adam, lr=opt.defaults["lr"], foreach=False)
    run(opt, _random_grad_closure(params, torch.Generator().manual_seed(21)), 3)
    run(adam, _random_grad_closure(params_adam, torch.Generator().manual_seed(21)), 3)
    assert_bit_identical(params, params_adam, "FusePV vs torch.optim.Adam on mixed dtypes:")


# ---------------------------------------------------------------------------------------------- kernels
@all_configs
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_foreach_and_fused_match_forloop(config: Config, impl: str) -> None:
    """torch test_foreach_matches_forloop / test_fused_matches_forloop (``_compare_between``, float64): 7 steps with
    no gradients at step 2 and the second Linear frozen at steps 3-4, plus a 0-dim parameter that never gets a
    gradient; parameters and tensor state agree with the for-loop kernel's within tolerance."""
    runs = []
    for flags in ({"foreach": False}, {impl: True}):
        model, inputs = sigmoid_net(torch.float64, seed=22)
        extra = torch.zeros((), dtype=torch.float64, requires_grad=True)
        extra.grad = torch.rand((), dtype=torch.float64, generator=torch.Generator().manual_seed(23))
        params = [*model.parameters(), extra]
        opt = config.make(params, **flags)
        for i in range(7):
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)

            def closure(backward: bool = i != 2) -> torch.Tensor:
                opt.zero_grad()
                loss = model(inputs).sum()
                if backward:
                    loss.backward()
                return loss

            opt.step(closure)
        runs.append((params, opt))
    (params, opt), (params_i, opt_i) = runs
    for p, p_i in zip(params, params_i, strict=True):
        torch.testing.assert_close(p_i, p)
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(opt_i.state[p_i][key], value, msg=lambda m, k=key: f"state[{k!r}]: {m}")


ADAM_INPUTS = [
    pytest.param({}, id="default"),
    pytest.param({"lr": 0.01}, id="non-default-lr"),
    pytest.param({"weight_decay": 0.1}, id="nonzero-weight-decay"),
    pytest.param({"weight_decay": 0.1, "amsgrad": True}, id="amsgrad"),
]


@pytest.mark.parametrize("options", ADAM_INPUTS)
def test_foreach_false_is_bit_identical_to_torch_adam(options: dict) -> None:
    """FusePV(foreach=False, never) against torch.optim.Adam with its default flags on CPU (optim_inputs_func_adam's
    CPU inputs): 10 steps, parameters and moments equal bit for bit."""
    model, inputs = sigmoid_net(seed=24)
    model_adam = copy.deepcopy(model)
    opt = FusePV(model.parameters(), foreach=False, switch={"criterion": "never"}, **options)
    adam = torch.optim.Adam(model_adam.parameters(), **options)
    for step in range(10):
        opt.step(model_closure(opt, model, inputs))
        adam.step(model_closure(adam, model_adam, inputs))
        assert_bit_identical(list(model.parameters()), list(model_adam.parameters()), f"step {step}:")
    for p, p_adam in zip(model.parameters(), model_adam.parameters(), strict=True):
        for key in adam.state[p_adam]:
            assert_tree_equal(opt.state[p][key], adam.state[p_adam][key], f"state[{key!r}]")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("flags", [{"foreach": False}, {}], ids=["forloop", "default-kernel"])
def test_low_precision_adam_phase(dtype: torch.dtype, flags: dict) -> None:
    """pytorch_optimizer test_bf16_optimizers (and torch's float16 inputs, eps=0.1): config 1 on a bf16/fp16
    LogisticRegression steps like ``torch.optim.Adam`` with the same flags (bit for bit with ``foreach=False``; to
    within a few low-precision ulps with the default flags, whose kernels may differ), and the loss goes down."""
    generator = torch.Generator().manual_seed(25)
    x = torch.cat([torch.randn(50, 2, generator=generator) * 2 - 2, torch.randn(50, 2, generator=generator) * 2 + 2])
    y = torch.cat([torch.zeros(50, 1), torch.ones(50, 1)])
    model = reinitialise(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)), 42).to(dtype)
    model_adam = copy.deepcopy(model)
    x, y = x.to(dtype), y.to(dtype)
    eps = 0.1 if dtype == torch.float16 else 1e-8

    def bce(out: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(out.float(), y.float())

    opt = ADAM_ONLY.make(model.parameters(), eps=eps, **flags)
    adam = torch.optim.Adam(model_adam.parameters(), lr=opt.defaults["lr"], eps=eps, **flags)
    initial = float(bce(model(x)).detach())
    for _ in range(20):
        opt.step(model_closure(opt, model, x, bce))
        adam.step(model_closure(adam, model_adam, x, bce))
    if flags:
        assert_bit_identical(list(model.parameters()), list(model_adam.parameters()), f"{dtype}:")
    else:
        tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
        for p, p_adam in zip(model.parameters(), model_adam.parameters(), strict=True):
            torch.testing.assert_close(p, p_adam, rtol=tolerance, atol=tolerance)
    final = float(bce(model(x)).detach())
    assert final == final and final < initial


# ---------------------------------------------------------------------------------------------- L-BFGS semantics
class CoupledQuadratic(Problem):
    """``loss = ||A [x1; x2] - c||^2``: two parameters whose gradients depend on each other."""

    def __init__(self, seed: int, dtype: torch.dtype = torch.float64) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.a = torch.randn(12, 8, generator=generator, dtype=dtype)
        self.c = torch.randn(12, generator=generator, dtype=dtype)
        self.x1 = torch.randn(5, generator=generator, dtype=dtype).requires_grad_()
        self.x2 = torch.randn(3, generator=generator, dtype=dtype).requires_grad_()

    def loss(self) -> torch.Tensor:
        return (self.a @ torch.cat([self.x1, self.x2]) - self.c).pow(2).sum()


@all_configs
def test_add_param_group_after_lbfgs_memory_exists(config: Config) -> None:
    """Progressive unfreezing (torch ``add_param_group``): after several steps (L-BFGS memory built), a new group is
    added; the next step works and moves the new parameters, and the loss keeps going down."""
    problem = CoupledQuadratic(seed=26)
    problem.x2.requires_grad_(False)
    opt = config.make([problem.x1])
    run(opt, problem.closure(opt), FINAL_PHASE_STEPS)
    if config.can_reach_lbfgs:
        assert opt.pairs_accepted > 0  # the memory exists

    problem.x2.requires_grad_(True)
    opt.add_param_group({"params": [problem.x2]})
    x2_before, loss_before = problem.x2.detach().clone(), problem.value()
    opt.step(problem.closure(opt))
    assert not torch.equal(problem.x2.detach(), x2_before), "the new parameters did not move"
    run(opt, problem.closure(opt), 4)
    after = problem.value()
    assert after == after and after < loss_before


@all_configs
def test_param_frozen_mid_training_does_not_move(config: Config) -> None:
    """A parameter frozen mid-training (``requires_grad_(False)`` after L-BFGS steps, ``zero_grad(set_to_none=True)``)
    stays exactly where it is while the others keep moving (torch's frozen layer in ``_compare_between``)."""
    problem = CoupledQuadratic(seed=27)
    opt = config.make([problem.x1, problem.x2])
    run(opt, problem.closure(opt), FINAL_PHASE_STEPS)
    problem.x2.requires_grad_(False)
    opt.zero_grad(set_to_none=True)
    x1_before, x2_before = problem.x1.detach().clone(), problem.x2.detach().clone()
    run(opt, problem.closure(opt), 4)
    assert_not_moved([problem.x2], [x2_before], "the frozen parameter:")
    assert not torch.equal(problem.x1.detach(), x1_before), "the trainable parameter did not move"


@all_configs
def test_param_group_with_tiny_lr_does_not_move(config: Config) -> None:
    """torch test_param_groups_lr: a group at lr=1e-28 (the others at 1e-2) does not move, in the L-BFGS phase too,
    while the loss goes down. (Its gradient comes from a linear term of the loss, so the line search sees the
    gradient it uses; torch draws random gradients instead.)"""
    problem = LinearProblem(seed=28)
    generator = torch.Generator().manual_seed(29)
    irrelevant = Parameter(torch.randn(2, generator=generator))
    direction = torch.rand(2, generator=generator) + 0.5
    irrelevant_before = irrelevant.detach().clone()
    opt = config.make([{"params": problem.params}, {"params": [irrelevant], "lr": 1e-28}], lr=1e-2)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = problem.loss() + (irrelevant * direction).sum()
        loss.backward()
        return loss

    initial = problem.value()
    run(opt, closure, 20)
    assert problem.value() < initial
    assert (irrelevant.detach() - irrelevant_before).abs().max().item() < 1e-20


@all_configs
def test_zero_lr_makes_the_step_a_noop(config: Config) -> None:
    """Every group at lr=0 (e.g. a scheduler's last value): the step moves nothing, in every phase."""
    problem = LinearProblem(seed=30)
    opt = config.make([{"params": [problem.weight]}, {"params": [problem.bias], "lr": 1e-2}])
    run(opt, problem.closure(opt), FINAL_PHASE_STEPS)
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = snapshot(problem.params)
    run(opt, problem.closure(opt), 3)
    assert_not_moved(problem.params, before, "at lr=0:")


@all_configs
def test_lr_scheduler_scaling_lr_changes_the_step(config: Config) -> None:
    """An LR scheduler acts in every phase: two optimizers stepped in lockstep into the final phase; a scheduler
    halving lr on one of them (MultiplicativeLR, factor 0.5) changes its next steps."""
    problem = LinearProblem(seed=31)
    twin = problem.twin()
    opt, opt_half = config.make(problem.params), config.make(twin.params)
    keep = MultiplicativeLR(opt, lr_lambda=lambda epoch: 1.0)
    halve = MultiplicativeLR(opt_half, lr_lambda=lambda epoch: 0.5)
    step_lockstep([(opt, lambda: problem.closure(opt)), (opt_half, lambda: twin.closure(opt_half))],
                  [problem.params, twin.params], FINAL_PHASE_STEPS)
    keep.step()
    halve.step()
    assert opt_half.param_groups[0]["lr"] == 0.5 * opt.param_groups[0]["lr"]
    for _ in range(2):
        opt.step(problem.closure(opt))
        opt_half.step(twin.closure(opt_half))
    assert any(not torch.equal(p, p_h) for p, p_h in zip(problem.params, twin.params, strict=True)), \
        "halving lr did not change the step"


WEIGHT_DECAY = 0.5


def _distance_to_one_closure(opt: Optimizer, x: torch.Tensor) -> Closure:
    """f(x) = ||x - 1||^2 / 2, whose minimiser with weight decay wd is 1 / (1 + wd)."""
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (x - 1).pow(2).sum()
        loss.backward()
        return loss

    return closure


@all_configs
def test_weight_decay_minimiser_is_a_fixed_point(config: Config) -> None:
    """``weight_decay`` stays in the objective in every phase: at x = 1 / (1 + wd), the minimiser of
    f + wd/2 ||x||^2 for f(x) = ||x - 1||^2 / 2, no step moves x (a phase minimising f alone heads for 1).
    ``eps=1``: with the default eps, Adam itself amplifies the rounding-level gradient there (torch.optim.Adam
    drifts by ~1e-2 * lr per step too); eps only enters the Adam update."""
    x = torch.full((4,), 1 / (1 + WEIGHT_DECAY), dtype=torch.float64, requires_grad=True)
    opt = config.make([x], weight_decay=WEIGHT_DECAY, eps=1.0)
    run(opt, _distance_to_one_closure(opt, x), 10)
    assert (x.detach() - 1 / (1 + WEIGHT_DECAY)).abs().max().item() < 1e-8


@pytest.mark.parametrize("config", CONFIGS[1:4], ids=[c.name for c in CONFIGS[1:4]])
def test_weight_decay_lbfgs_converges_to_the_decayed_minimiser(config: Config) -> None:
    """In the L-BFGS phase the objective is closure_loss + wd/2 ||x||^2: on f(x) = ||x - 1||^2 / 2 it converges to
    1 / (1 + wd), not to 1. (Strong Wolfe and lr=1, so that the L-BFGS step is the unscaled quasi-Newton step.)"""
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = config.make([x], lr=1.0, weight_decay=WEIGHT_DECAY, line_search="strong_wolfe")
    run(opt, _distance_to_one_closure(opt, x), 30)
    assert (x.detach() - 1 / (1 + WEIGHT_DECAY)).abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------- closures and losses
@all_configs
def test_step_returns_the_closure_loss(config: Config) -> None:
    """pytorch_optimizer test_closure / torch.optim.LBFGS: ``step(closure)`` returns the closure's loss at x_k."""
    problem = LinearProblem(seed=32)
    opt = config.make(problem.params)
    for _ in range(FINAL_PHASE_STEPS):
        expected = problem.value()
        returned = opt.step(problem.closure(opt))
        assert isinstance(returned, torch.Tensor)
        assert as_float(returned) == pytest.approx(expected, rel=1e-6)


@all_configs
def test_closure_returning_a_python_float(config: Config) -> None:
    """A closure that calls ``backward()`` and returns ``loss.item()`` works in every phase; ``step`` returns that
    value and the loss goes down."""
    problem = LinearProblem(seed=33)
    opt = config.make(problem.params)

    def closure() -> float:
        opt.zero_grad()
        loss = problem.loss()
        loss.backward()
        return loss.item()

    initial = problem.value()
    for _ in range(12):
        expected = problem.value()
        assert as_float(opt.step(closure)) == pytest.approx(expected, rel=1e-6)
    assert problem.value() < initial


@all_configs
def test_non_scalar_loss_raises_on_the_first_step(config: Config) -> None:
    """A closure returning a loss of several elements raises a one-line error on the first step, before moving
    anything."""
    problem = LinearProblem(seed=34)
    opt = config.make(problem.params)
    before = snapshot(problem.params)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        per_row = (problem.weight.mv(problem.input) + problem.bias).pow(2)
        per_row.sum().backward()
        return per_row

    with pytest.raises((ValueError, RuntimeError, TypeError), match="(?i)scalar|loss|element") as error:
        opt.step(closure)
    one_line_error(error)
    assert_bit_identical(problem.params, before, "after the refused step:")


@all_configs
def test_step_without_closure(config: Config) -> None:
    """pytorch_optimizer test_no_closure: with gradients already in ``p.grad``, ``step()`` works in an Adam step
    (config 1, and the first step of configs 3 and 4); a step that needs the closure (L-BFGS or blend) raises
    RuntimeError naming it, moves nothing, and the optimizer keeps working with a closure."""
    problem = LinearProblem(seed=35)
    opt = config.make(problem.params)
    problem.closure(opt)()
    before = snapshot(problem.params)
    if config.first_step_needs_closure:
        with pytest.raises(RuntimeError, match="closure") as error:
            opt.step()
        one_line_error(error)
        assert_bit_identical(problem.params, before, "after the refused first step:")
    else:
        opt.step()
        assert any(not torch.equal(p, b) for p, b in zip(problem.params, before, strict=True))

    run(opt, problem.closure(opt), FINAL_PHASE_STEPS)
    problem.closure(opt)()
    before = snapshot(problem.params)
    if config.can_reach_lbfgs:
        with pytest.raises(RuntimeError, match="closure"):
            opt.step()
        assert_bit_identical(problem.params, before, "after the refused step:")
    else:
        opt.step()
    value = problem.value()
    opt.step(problem.closure(opt))
    assert problem.value() < value


NO_GRAD_CASES = ["requires-grad-false", "grads-none", "grads-zero", "float-loss-grads-none"]


@all_configs
@pytest.mark.parametrize("case", NO_GRAD_CASES)
def test_step_is_noop_without_gradients(config: Config, case: str) -> None:
    """torch test_step_is_noop_when_params_have_no_grad / test_step_is_noop_for_zero_grads, pytorch_optimizer
    test_closure (a dummy closure returning 1.0): a closure that returns a loss but leaves every gradient None or zero
    moves nothing, in every phase, over several steps."""
    generator = torch.Generator().manual_seed(36)
    params = [torch.randn(2, 3, generator=generator).requires_grad_(case != "requires-grad-false") for _ in range(2)]
    before = snapshot(params)
    opt = config.make(params)

    def closure() -> Any:
        if case == "grads-zero":
            for p in params:
                p.grad = torch.zeros_like(p)
        return 1.0 if case == "float-loss-grads-none" else torch.tensor(1.0)

    run(opt, closure, FINAL_PHASE_STEPS)
    assert_not_moved(params, before, f"{case}:")


@all_configs
@pytest.mark.parametrize("set_to_none", [True, False], ids=["set-to-none", "set-to-zero"])
def test_zero_grad(config: Config, set_to_none: bool) -> None:
    """torch Optimizer.zero_grad (pytorch_optimizer test_reset's role): gradients become None or zeros, and stepping
    resumes afterwards."""
    problem = LinearProblem(seed=37)
    opt = config.make(problem.params)
    run(opt, problem.closure(opt), 4)
    problem.closure(opt)()
    opt.zero_grad(set_to_none=set_to_none)
    for p in problem.params:
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any()
    value = problem.value()
    run(opt, problem.closure(opt), 2)
    assert problem.value() < value


@all_configs
def test_optimizer_can_be_printed(config: Config) -> None:
    """torch test_optimizer_can_be_printed: ``repr`` names the class and the group options."""
    opt = config.make([Parameter(torch.randn(2, 3)), Parameter(torch.randn(2, 3))])
    text = repr(opt)
    assert type(opt).__name__ in text and "Parameter Group 0" in text and "lr" in text


@all_configs
def test_sparse_gradients_raise(config: Config) -> None:
    """torch test_rosenbrock_sparse / pytorch_optimizer test_sparse_not_supported: sparse gradients raise an error
    mentioning them, and nothing moves."""
    embedding = nn.Embedding(5, 2, sparse=True)
    opt = config.make(embedding.parameters())
    before = snapshot(embedding.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = embedding(torch.tensor([0, 3])).pow(2).sum()
        loss.backward()
        return loss

    with pytest.raises((RuntimeError, ValueError), match="(?i)sparse"):
        opt.step(closure)
    assert_bit_identical(list(embedding.parameters()), before, "after the refused sparse step:")


@all_configs
def test_no_gradients_for_some_params(config: Config) -> None:
    """pytorch_optimizer test_no_gradients: groups mixing parameters with and without ``requires_grad``; only those
    with gradients move, the loss goes down, ``zero_grad(set_to_none=True)`` clears everything."""
    p1, p3 = torch.ones(1, 1, requires_grad=True), torch.ones(1, 1, requires_grad=True)
    p2, p4 = torch.zeros(1, 1), torch.zeros(1, 1)
    p2.grad, p4.grad = torch.zeros(1, 1), torch.zeros(1, 1)
    opt = config.make([{"params": [p1, p2]}, {"params": [p3]}, {"params": [p4]}])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (p1 + p3).pow(2).sum()
        loss.backward()
        return loss

    run(opt, closure, 5)
    assert_not_moved([p2, p4], [torch.zeros(1, 1), torch.zeros(1, 1)], "parameters without gradients:")
    assert as_float((p1 + p3).pow(2).sum()) < 4.0
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in (p1, p2, p3, p4))


@all_configs
def test_second_order_optims_return_consistent_types(config: Config) -> None:
    """torch test_second_order_optims_return_consistent_types: ``step`` returns the same type whether the L-BFGS
    tolerance stops it at once or not."""
    returned = []
    for tolerance_grad in (1e30, 0.0):
        problem = LinearProblem(seed=38)
        opt = config.make(problem.params, tolerance_grad=tolerance_grad)
        returned.append(run(opt, problem.closure(opt), 3))
    assert [type(r) for r in returned[0]] == [type(r) for r in returned[1]]


# ---------------------------------------------------------------------------------------------- distributed checkpoint
def _linear_regression(seed: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    model = reinitialise(nn.Linear(5, 3), seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    return model, torch.randn(8, 5, generator=generator), torch.randn(8, 3, generator=generator)


@all_configs
@pytest.mark.parametrize("moment", ["mid-adam", "after-switch-memory-full"])
def test_distributed_checkpoint_round_trip(config: Config, moment: str) -> None:
    """``torch.distributed.checkpoint.state_dict``: ``get_optimizer_state_dict(model, opt)``, then
    ``set_optimizer_state_dict`` on a fresh optimizer of a fresh copy of the model (single process, no process
    group); both then step bit for bit alike. Saved after 1 step (Adam phase for configs 1, 3, 4) and after 10 steps
    (past the switch, memory of 3 pairs full)."""
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    history = 3
    model, x, y = _linear_regression(seed=39)

    def mse(out: torch.Tensor) -> torch.Tensor:
        return (out - y).pow(2).mean()

    opt = config.make(model.parameters(), history_size=history)
    run(opt, model_closure(opt, model, x, mse), 1 if moment == "mid-adam" else 10)
    if moment != "mid-adam" and config.can_reach_lbfgs:
        assert opt.pairs_accepted >= history

    osd = copy.deepcopy(dcp.get_optimizer_state_dict(model, opt))  # as read back from a checkpoint
    model_c, _, _ = _linear_regression(seed=40)
    model_c.load_state_dict(model.state_dict())
    opt_c = config.make(model_c.parameters(), history_size=history)
    dcp.set_optimizer_state_dict(model_c, opt_c, osd)
    assert_bit_identical(list(model_c.parameters()), list(model.parameters()), "after set_optimizer_state_dict:")
    step_lockstep([(opt, lambda: model_closure(opt, model, x, mse)),
                   (opt_c, lambda: model_closure(opt_c, model_c, x, mse))],
                  [list(model.parameters()), list(model_c.parameters())], 5)


def test_configs_table_is_what_the_rows_say() -> None:
    """The table itself: config 1 never leaves Adam; 2 is L-BFGS from its first step; 3 switches after 3 steps;
    4 is Adam at step 0 and pure L-BFGS from step 6; 5 blends every step."""
    phases: dict[str, list[str]] = {}
    for config in CONFIGS:
        problem = LinearProblem(seed=41)
        opt = config.make(problem.params)
        phases[config.name] = []
        for _ in range(FINAL_PHASE_STEPS):
            opt.step(problem.closure(opt))
            phases[config.name].append(opt.last_step_info.phase)
    assert phases == {
        "fusepv-adam-never-switch": ["adam"] * 8,
        "fusepv-lbfgs-from-step-0": ["lbfgs"] * 8,
        "fusepv-switch-after-3": ["adam"] * 3 + ["lbfgs"] * 5,
        "fuse-linear-theta-6": ["adam"] + ["blend"] * 5 + ["lbfgs"] * 2,
        "fuse-constant-theta-0.5": ["blend"] * 8,
    }
