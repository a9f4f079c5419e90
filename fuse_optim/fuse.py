"""FusePV and Fuse: Adam and L-BFGS as one ``torch.optim.Optimizer`` (arXiv 2503.04204).

* :class:`FusePV` (paper Algorithm 4) takes Adam steps (Eq. 2a-2c) until a switch criterion
  fires (:mod:`fuse_optim.switch`, Eqs. 3-4), then L-BFGS steps (Algorithms 1-2) for good.
* :class:`Fuse` (paper Algorithm 3) computes both updates from the same minibatch at every step
  and blends them, ``x_{k+1} = theta_k x^A_{k+1} + (1 - theta_k) x^L_{k+1}``, with theta_k from a
  schedule (:mod:`fuse_optim.schedules`).

Both are used like ``torch.optim.LBFGS``: ``loss = opt.step(closure)`` where the closure zeroes the
gradients, computes the loss on the *current* minibatch, calls ``backward()`` and returns the
loss. The L-BFGS phase calls the closure more than once per step (at ``x_k`` and at each
line-search trial), always on the same minibatch, so the curvature pair of a step is
``s = x_{k+1} - x_k``, ``y = g(x_{k+1}; B_k) - g(x_k; B_k)``.

Epoch-granular switch criteria are driven by one call the training loop makes at the end of each
epoch: :meth:`FusePV.end_epoch`.

What the torch.optim contract means here (the README lists the same):

* The Adam phase is torch's own Adam (``torch.optim.adam.adam``) and matches ``torch.optim.Adam``
  step for step. By default it runs the fastest kernel torch has for the parameters (the fused one
  on CPU and CUDA); ``foreach=False`` is bit-identical to ``torch.optim.Adam``'s CPU default, and the
  same ``foreach``/``fused`` flags give the same kernel as ``torch.optim.Adam``. ``eps_inside_sqrt=True``
  gives the paper's Eq. 2c (``sqrt(v + a)``). The Adam phase takes no host synchronisation per step.
* ``lr`` in the L-BFGS phase: a group moves by ``t (lr_g / lr) d_g``, ``lr`` being the constructor's;
  so per-group learning rates and LR schedulers scale the L-BFGS step as they scale the Adam step
  (``torch.optim.LBFGS`` scales its step by ``lr`` too), and a group at ``lr_g = 0`` stays put.
* Frozen parameters (``requires_grad=False``, or no gradient at ``x_k``) do not move in the L-BFGS
  phase and take no part in its curvature pairs.
* ``weight_decay`` (Adam's coupled L2 term) stays in the objective after the switch: the L-BFGS phase
  minimises ``loss + sum_g weight_decay_g / 2 ||x_g||^2``; ``step()`` returns the closure's loss.
* Refused, with a one-line ``ValueError``: ``maximize``, ``capturable``, ``differentiable`` and
  ``decoupled_weight_decay`` set to True (in the constructor or a parameter group), a tensor ``lr``,
  and, for an optimizer that can reach the L-BFGS phase, complex parameters or parameters of mixed
  dtypes or devices (the phase treats all parameters as one real vector). Sparse gradients raise at
  ``step()``, as in ``torch.optim.Adam``.
* The L-BFGS phase treats the parameters of all groups as one vector; its settings
  (``history_size``, ``line_search``, ...) must therefore be equal across groups. Adding a group
  (progressive unfreezing) drops the curvature memory, which is rebuilt for the longer vector.
* ``state_dict()`` carries the optimizer-wide state (phase, counters, L-BFGS memory, criterion) in
  the first parameter's state under ``"fuse"``, so that ``torch.save``, ``copy.deepcopy``, ``pickle``
  and ``torch.distributed.checkpoint`` keep it. A ``torch.optim.Adam`` state dict loads too: the Adam
  phase continues from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.adam import adam as adam_kernel

from .lbfgs import LBFGSMemory
from .line_search import LineSearchResult, make_line_search
from .schedules import ThetaSchedule, make_schedule
from .switch import Never, ProbeCriterion, SwitchCriterion, SwitchedOptimizer, SwitchState, probe_criterion

__all__ = ["FusePV", "Fuse", "StepInfo", "ADAM", "LBFGS", "RECOVERY_NON_FINITE", "RECOVERY_NOT_DESCENT", "CONVERGED",
           "NOTHING_TO_MOVE"]

ADAM = "adam"
LBFGS = "lbfgs"
#: the loss or gradient at x_k was NaN/inf: parameters restored to the last good point
RECOVERY_NON_FINITE = "non_finite_loss_or_gradient"
#: the quasi-Newton direction was not a descent direction: memory reset, steepest descent used
RECOVERY_NOT_DESCENT = "not_a_descent_direction"

Closure = Callable[[], torch.Tensor]

#: the default first trial step of each line-search policy (the ``lbfgs_lr=None`` choice)
DEFAULT_LBFGS_LR = {"strong_wolfe": 1.0, "armijo": 0.1, "fixed": 0.1}
#: the default closure-call budget of one line search
DEFAULT_MAX_EVALUATIONS = {"strong_wolfe": 25, "armijo": 10, "fixed": 1}

#: hyperparameters of the L-BFGS phase: one vector over all groups, so one value for all groups
_LBFGS_KEYS = (
    "history_size", "line_search", "lbfgs_lr", "c1", "c2", "max_evaluations", "shrink", "curvature",
    "curvature_eps", "initial_inverse_hessian", "tolerance_grad", "tolerance_change",
)
#: torch.optim.Adam options refused here, and why
_UNSUPPORTED = {
    "maximize": "the L-BFGS phase minimises; return the negated objective from the closure instead",
    "capturable": "the L-BFGS phase reads losses on the host, which CUDA graph capture forbids",
    "differentiable": "the L-BFGS phase's line search is not differentiable",
    "decoupled_weight_decay": "use weight_decay (coupled L2, kept in the L-BFGS objective) instead",
}
#: the key of the optimizer-wide state in the first parameter's entry of ``state_dict()["state"]``
GLOBAL_STATE_KEY = "fuse"
#: version of that state's layout (1: a top-level ``"fuse"`` key, read for compatibility)
GLOBAL_STATE_FORMAT = 2
#: the L-BFGS step was not taken: ||g||_inf is below tolerance_grad times the reference gradient's
CONVERGED = "converged"
#: the L-BFGS step was not taken: every parameter with a gradient is frozen or at lr 0
NOTHING_TO_MOVE = "nothing_to_move"
#: f(x_k) is trusted to within this many machine epsilons of |f(x_k)| (see ``_search``)
LOSS_RESOLUTION_ULPS = 16

@dataclass
class StepInfo:
    """Diagnostics of the last ``step()``, as data for trainers and trackers.

    ``phase`` is the phase the step ran in: ``"adam"``, ``"lbfgs"`` or, for a :class:`Fuse` step with
    ``0 < theta < 1``, ``"blend"``.

    In the Adam phase ``loss`` and ``grad_norm`` are 0-dim device tensors (reading them forces a
    host synchronisation, which the optimizer itself avoids); in the L-BFGS phase they are floats.
    ``grad_norm`` is ``None`` in the Adam phase unless the criterion or ``track_grad_norm`` needs it.
    ``step_size`` is the accepted line-search step t (``x_{k+1} = x_k + t d``), ``None`` for Adam.
    """

    phase: str
    loss: torch.Tensor | float | None
    grad_norm: torch.Tensor | float | None
    step_size: float | None
    closure_calls: int
    pairs_accepted: int
    pairs_skipped: int
    recoveries: int
    failure: str | None = None
    theta: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values (tensors read back to floats)."""
        return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in asdict(self).items()}


@dataclass
class _Evaluation:
    """One closure call of the L-BFGS phase: where (``x``), what it returned, the objective and its gradient."""

    x: torch.Tensor
    loss: Any
    value: float
    grad: torch.Tensor
    weight_decay: tuple[float, ...]


def _check(condition: bool, argument: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ValueError(f"{argument} must be {accepted}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_adam_hyperparameters(options: Mapping[str, Any]) -> None:
    """The Adam hyperparameters present in ``options`` (constructor arguments or a parameter group)."""
    if "lr" in options:
        _check(_is_number(options["lr"]) and options["lr"] >= 0, "lr", options["lr"],
               "a finite number >= 0 (a tensor lr is not supported)")
    if "betas" in options:
        betas = options["betas"]
        betas_ok = isinstance(betas, (tuple, list)) and len(betas) == 2
        _check(betas_ok and all(_is_number(b) and 0 <= b < 1 for b in betas), "betas", betas,
               "a pair of numbers in [0, 1)")
    if "eps" in options:
        _check(_is_number(options["eps"]) and options["eps"] >= 0, "eps", options["eps"], "a finite number >= 0")
    if "weight_decay" in options:
        _check(_is_number(options["weight_decay"]) and options["weight_decay"] >= 0, "weight_decay",
               options["weight_decay"], "a finite number >= 0")


def _refuse_unsupported(options: Mapping[str, Any]) -> None:
    for key, why in _UNSUPPORTED.items():
        if options.get(key):
            raise ValueError(f"{key}=True is not supported by FusePV and Fuse: {why}")


def _check_one_vector(params: list[torch.Tensor]) -> None:
    """The L-BFGS phase treats all parameters as one real vector: one dtype, one device, no complex."""
    complex_params = [p for p in params if p.is_complex()]
    if complex_params:
        raise ValueError(f"params: the L-BFGS phase does not support complex parameters ({complex_params[0].dtype}); "
                         "use switch='never' for Adam alone")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"params: the L-BFGS phase needs all parameters on one device with one dtype, got dtypes "
            f"{sorted(map(str, dtypes))} on devices {sorted(map(str, devices))}"
        )


def _max_abs(values: torch.Tensor) -> float:
    """``||v||_inf``, NaN when any entry is NaN or inf: one pass, no temporary.

    ``torch.aminmax`` measured 0.12 ms at 1M float32 entries on CPU, ``abs().max()`` 0.28 ms (it
    allocates ``|v|``) and ``linalg.vector_norm(ord=inf)`` 3.1 ms. ``aminmax`` puts NaN in both
    outputs; an infinite entry makes one of them infinite.
    """
    low, high = (float(x) for x in torch.aminmax(values))
    if not (math.isfinite(low) and math.isfinite(high)):
        return math.nan
    return max(-low, high)


def _fused_devices() -> list[str]:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return _get_fused_kernels_supported_devices()


def _adam_kernel_flags(group: Mapping[str, Any], params: list[torch.Tensor]) -> tuple[bool | None, bool | None]:
    """(foreach, fused) for torch's Adam kernel: the group's flags; when both are None (the default),
    the fused kernel where torch has one for every parameter's device and dtype (several times faster
    than ``torch.optim.Adam``'s CPU default), else torch's own default."""
    foreach, fused = group["foreach"], group["fused"]
    if foreach is None and fused is None and not group["eps_inside_sqrt"]:
        devices = _fused_devices()
        if all(p.is_floating_point() and p.device.type in devices for p in params):
            return False, True
    return foreach, fused


class _AdamLBFGSBase(Optimizer):
    """Bookkeeping shared by FusePV and Fuse: the Adam update, the L-BFGS step, state, recovery."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        amsgrad: bool,
        eps_inside_sqrt: bool,
        foreach: bool | None,
        fused: bool | None,
        maximize: bool,
        capturable: bool,
        differentiable: bool,
        decoupled_weight_decay: bool,
        history_size: int,
        line_search: str | None,
        lbfgs_lr: float | None,
        c1: float,
        c2: float,
        max_evaluations: int | None,
        shrink: float,
        curvature: str,
        curvature_eps: float,
        initial_inverse_hessian: str,
        tolerance_grad: float,
        tolerance_change: float,
        track_grad_norm: bool,
        deterministic_closure: bool = False,
    ) -> None:
        _check_adam_hyperparameters(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        _check(isinstance(amsgrad, bool), "amsgrad", amsgrad, "True or False")
        _check(isinstance(eps_inside_sqrt, bool), "eps_inside_sqrt", eps_inside_sqrt, "True or False")
        _check(foreach is None or isinstance(foreach, bool), "foreach", foreach, "None, True or False")
        _check(fused is None or isinstance(fused, bool), "fused", fused, "None, True or False")
        _refuse_unsupported(dict(maximize=maximize, capturable=capturable, differentiable=differentiable,
                                 decoupled_weight_decay=decoupled_weight_decay))
        if fused and foreach:
            raise ValueError("foreach and fused cannot both be True")
        if eps_inside_sqrt and (amsgrad or fused):
            raise ValueError("eps_inside_sqrt=True (paper Eq. 2c) cannot be combined with amsgrad or fused")
        _check(isinstance(history_size, int) and not isinstance(history_size, bool) and history_size >= 1,
               "history_size", history_size, "an integer >= 1")
        _check(line_search in (None, "strong_wolfe", "armijo", "fixed"), "line_search", line_search,
               "one of 'strong_wolfe', 'armijo', 'fixed' or None")
        policy = line_search or "fixed"
        _check(lbfgs_lr is None or (_is_number(lbfgs_lr) and lbfgs_lr > 0), "lbfgs_lr", lbfgs_lr,
               "None (policy default) or a finite number > 0")
        _check(_is_number(c1) and 0 < c1 < 1, "c1", c1, "a number in (0, 1)")
        _check(_is_number(c2) and c1 < c2 < 1, "c2", c2, "a number in (c1, 1)")
        _check(max_evaluations is None or (isinstance(max_evaluations, int) and not isinstance(max_evaluations, bool)
                                           and max_evaluations >= 1),
               "max_evaluations", max_evaluations, "None (policy default) or an integer >= 1")
        _check(_is_number(shrink) and 0 < shrink < 1, "shrink", shrink, "a number in (0, 1)")
        _check(curvature in ("skip", "damp"), "curvature", curvature, "'skip' or 'damp'")
        _check(_is_number(curvature_eps) and curvature_eps >= 0, "curvature_eps", curvature_eps, "a number >= 0")
        _check(initial_inverse_hessian in ("scalar", "adam"), "initial_inverse_hessian", initial_inverse_hessian,
               "'scalar' (s'y/y'y) or 'adam' (diagonal from Adam's second moment)")
        _check(_is_number(tolerance_grad) and tolerance_grad >= 0, "tolerance_grad", tolerance_grad, "a number >= 0")
        _check(_is_number(tolerance_change) and tolerance_change >= 0, "tolerance_change", tolerance_change,
               "a number >= 0")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            eps_inside_sqrt=eps_inside_sqrt, foreach=foreach, fused=fused, maximize=False, capturable=False,
            differentiable=False, decoupled_weight_decay=False,
            history_size=history_size, line_search=policy,
            lbfgs_lr=DEFAULT_LBFGS_LR[policy] if lbfgs_lr is None else float(lbfgs_lr),
            c1=c1, c2=c2,
            max_evaluations=max_evaluations if max_evaluations is not None else DEFAULT_MAX_EVALUATIONS[policy],
            shrink=shrink, curvature=curvature, curvature_eps=curvature_eps,
            initial_inverse_hessian=initial_inverse_hessian, tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
        )
        self.track_grad_norm = bool(track_grad_norm)
        _check(isinstance(deterministic_closure, bool), "deterministic_closure", deterministic_closure,
               "True or False")
        #: the closure is the same function at every step (full batch): the L-BFGS phase reuses the evaluation
        #: of the point its line search accepted (see _reuse_accepted); not saved in the state dict
        self.deterministic_closure = deterministic_closure
        self._accepted: _Evaluation | None = None
        #: the learning rate at which the L-BFGS step is unscaled (see _step_scales); saved with the state
        self.lr_reference = float(lr)
        self.phase = ADAM
        self._step_count = 0
        self._epoch_count = 0
        self._memory: LBFGSMemory | None = None
        self._adam_scale: torch.Tensor | None = None
        self._last_good: torch.Tensor | None = None
        #: vectors of the parameters' length reused by every L-BFGS step (x_k, g_k, d_k): a fresh 4 MB
        #: allocation per step and vector costs page faults
        self._step_buffers: dict[str, torch.Tensor] = {}
        self._grad_reference: float | None = None
        self.closure_calls = 0
        self.recoveries = 0
        self.line_search_failures = 0
        self.recovery_log: list[tuple[int, str]] = []
        self.last_step_info: StepInfo | None = None
        if isinstance(params, (set, frozenset)):
            raise TypeError("params must be an ordered collection (a list or a generator), not a set: the L-BFGS "
                            "phase's vector and the state dict follow the parameters' order")
        super().__init__(params, defaults)
        if fused:
            for p in self._all_params():
                if not p.is_floating_point() or p.device.type not in _fused_devices():
                    raise RuntimeError("fused=True requires floating-point parameters on a supported device")
        self._install_state_hooks()
        self._hold_state_entry()

    # ------------------------------------------------------------------ torch.optim plumbing
    def _install_state_hooks(self) -> None:
        """The hooks that carry the optimizer-wide state through ``state_dict``/``load_state_dict``.

        Installed again after unpickling (torch does not pickle hooks). Ours runs first on export and
        import, and the import's post-hook is prepended, so users' load post-hooks see the loaded state.
        """
        if not any(hook is _export_global_state for hook in self._optimizer_state_dict_post_hooks.values()):
            self.register_state_dict_post_hook(_export_global_state, prepend=True)
            self.register_load_state_dict_pre_hook(_import_global_state, prepend=True)
            self.register_load_state_dict_post_hook(_apply_global_state, prepend=True)

    def _hold_state_entry(self) -> None:
        """Keep an entry for the first parameter in ``self.state`` from construction on.

        The first parameter's state carries the optimizer-wide state in ``state_dict()``. Holding its
        entry also tells ``torch.distributed.checkpoint`` that the state exists, so that its
        ``_init_optim_state`` does not call ``step()`` without a closure on a fresh optimizer.
        """
        self.state[self.param_groups[0]["params"][0]]  # noqa: B018  (defaultdict: creates {})

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults, state and param_groups; the phase, the L-BFGS memory and the
        # criterion are attributes here, so everything but the (unpicklable, user-owned) hooks goes.
        return {k: v for k, v in self.__dict__.items() if not k.endswith("_hooks")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # older or foreign dicts (torch.optim.Adam's) lack keys: fill them in
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for group in self.param_groups:
            on_device = bool(group["fused"] or group["capturable"])
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32,
                                                   device=p.device if on_device else None)
        self._install_state_hooks()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (progressive unfreezing); checked first, so a refused group changes nothing.

        The L-BFGS phase treats all parameters as one vector, so its settings must be equal in every
        group, and a new group changes the vector's length: the curvature memory is dropped and
        rebuilt at the next L-BFGS step.
        """
        options = {key: value for key, value in param_group.items() if key != "params"}
        _refuse_unsupported(options)
        _check_adam_hyperparameters(options)
        if self.param_groups:
            first = self.param_groups[0]
            for key in _LBFGS_KEYS:
                value = param_group.get(key, self.defaults.get(key))
                if value != first.get(key):
                    raise ValueError(
                        f"{key} must be the same in every parameter group (the L-BFGS phase treats all "
                        f"parameters as one vector), got {first.get(key)!r} and {value!r}"
                    )
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # a generator is read once: keep what it gave
            param_group["params"] = params = list(params)
        if self._may_use_lbfgs() and not isinstance(params, set):  # torch refuses a set itself, below
            new = [params] if isinstance(params, torch.Tensor) else params
            _check_one_vector(self._all_params() + [p for p in new if isinstance(p, torch.Tensor)])
        super().add_param_group(param_group)
        if self._memory is not None:
            self._forget_vector_layout()

    def _forget_vector_layout(self) -> None:
        self._memory = None
        self._adam_scale = None
        self._last_good = None
        self._step_buffers = {}

    def _may_use_lbfgs(self) -> bool:
        """Whether this optimizer can ever take an L-BFGS step (FusePV with ``never`` cannot)."""
        return True

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ public counters
    @property
    def step_count(self) -> int:
        """Completed ``step()`` calls."""
        return self._step_count

    @property
    def epoch(self) -> int:
        """Completed epochs, counted by :meth:`end_epoch`."""
        return self._epoch_count

    @property
    def pairs_accepted(self) -> int:
        return self._memory.accepted if self._memory is not None else 0

    @property
    def pairs_skipped(self) -> int:
        return self._memory.skipped if self._memory is not None else 0

    # ------------------------------------------------------------------ flat views
    def _flat_params(self, out: torch.Tensor | None = None) -> torch.Tensor:
        parts = [p.detach().reshape(-1) for p in self._all_params()]
        return torch.cat(parts) if out is None else torch.cat(parts, out=out)

    def _step_buffer(self, name: str) -> torch.Tensor:
        """A reused vector of the parameters' length, dtype and device (contents undefined)."""
        params = self._all_params()
        buffer = self._step_buffers.get(name)
        if buffer is None or buffer.numel() != sum(p.numel() for p in params):
            buffer = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            self._step_buffers[name] = buffer
        return buffer

    def _flat_grad(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """``g`` over all parameters; a parameter without a gradient or frozen (``requires_grad=False``)
        contributes zeros, so it takes no part in the curvature pairs."""
        parts = []
        for p in self._all_params():
            if p.grad is None or not p.requires_grad:
                parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            elif p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            else:
                parts.append(p.grad.reshape(-1))
        return torch.cat(parts) if out is None else torch.cat(parts, out=out)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, offset = [], 0
        for p in self._all_params():
            n = p.numel()
            views.append(flat[offset:offset + n].view_as(p))
            offset += n
        return views

    def _set_params(self, flat: torch.Tensor, direction: torch.Tensor | None = None, step: float = 0.0) -> None:
        """params <- flat (+ step * direction)."""
        params = self._all_params()
        torch._foreach_copy_(params, self._views(flat))
        if direction is not None and step != 0.0:
            torch._foreach_add_(params, self._views(direction), alpha=step)

    # ------------------------------------------------------------------ Adam phase (Eq. 2)
    def _adam_update(self) -> torch.Tensor | None:
        """One Adam step on the gradients already in ``p.grad``; returns ||g||^2 when needed."""
        grad_sq_norm = None
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    params.append(p)
            if not params:
                continue
            foreach, fused = _adam_kernel_flags(group, params)
            for p in params:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if fused else None)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif fused and state["step"].device != p.device:  # loaded from a dict saved without fused
                    state["step"] = state["step"].to(p.device)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if group["amsgrad"]:
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"])
                steps.append(state["step"])
            if self._needs_grad_norm():
                norms = torch._foreach_norm(grads)
                group_sq = torch.stack([n.to(torch.float64) for n in norms]).square().sum()
                grad_sq_norm = group_sq if grad_sq_norm is None else grad_sq_norm + group_sq
            beta1, beta2 = group["betas"]
            if group["eps_inside_sqrt"]:
                _adam_eq2c(params, grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2, lr=group["lr"],
                           eps=group["eps"], weight_decay=group["weight_decay"])
            else:
                adam_kernel(
                    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    foreach=foreach, fused=fused, capturable=False, differentiable=False,
                    grad_scale=None, found_inf=None, has_complex=any(p.is_complex() for p in params),
                    decoupled_weight_decay=False, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                )
        return grad_sq_norm

    def _needs_grad_norm(self) -> bool:
        return self.track_grad_norm

    def _adam_step(self, closure: Closure | None) -> torch.Tensor | float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.closure_calls += 1
        loss_tensor = None if loss is None else self._loss_tensor(loss)
        grad_sq_norm = self._adam_update()
        self._observe_adam_step(loss_tensor, grad_sq_norm)
        self.last_step_info = StepInfo(
            ADAM, loss_tensor, None if grad_sq_norm is None else grad_sq_norm.sqrt(), None,
            1 if closure is not None else 0, self.pairs_accepted, self.pairs_skipped, self.recoveries,
        )
        return loss

    def _loss_tensor(self, loss: Any) -> torch.Tensor:
        """The closure's loss as a detached 0-dim tensor on the parameters' device (no host sync)."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
            return loss.detach().reshape(())
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return torch.tensor(float(loss), device=self.param_groups[0]["params"][0].device)
        raise TypeError(f"the closure must return the loss (a scalar tensor or a number), got {type(loss).__name__}")

    def _observe_adam_step(self, loss: torch.Tensor | None, grad_sq_norm: torch.Tensor | None) -> None:
        """Hook for FusePV's switch criterion."""

    def _adam_inverse_scale(self) -> torch.Tensor | None:
        """D = 1 / (sqrt(v_hat) + eps), flattened, from Adam's bias-corrected second moment."""
        parts = []
        for group in self.param_groups:
            beta2, eps = group["betas"][1], group["eps"]
            for p in group["params"]:
                state = self.state.get(p, {})
                if "exp_avg_sq" not in state or float(state["step"]) == 0:
                    return None
                correction = 1 - beta2 ** float(state["step"])
                v_hat = state["exp_avg_sq"].reshape(-1) / correction
                parts.append(1.0 / (v_hat.sqrt() + max(eps, 1e-12)))
        return torch.cat(parts) if parts else None

    # ------------------------------------------------------------------ L-BFGS phase (Algorithms 1-2)
    def _ensure_memory(self) -> LBFGSMemory:
        if self._memory is None:
            params = self._all_params()
            _check_one_vector(params)
            group = self.param_groups[0]
            self._memory = LBFGSMemory(
                group["history_size"], sum(p.numel() for p in params), dtype=params[0].dtype,
                device=params[0].device, curvature=group["curvature"], curvature_eps=group["curvature_eps"],
            )
            if group["initial_inverse_hessian"] == "adam":
                self._adam_scale = self._adam_inverse_scale()
        return self._memory

    def _line_search(self):
        group = self.param_groups[0]
        options: dict[str, Any] = {}
        if group["line_search"] == "strong_wolfe":
            options = dict(c1=group["c1"], c2=group["c2"], max_evaluations=group["max_evaluations"],
                           tolerance_change=group["tolerance_change"])
        elif group["line_search"] == "armijo":
            options = dict(c1=group["c1"], shrink=group["shrink"], max_evaluations=group["max_evaluations"])
        return make_line_search(group["line_search"], **options)

    def _evaluate(self, closure: Closure, out: torch.Tensor | None = None) -> tuple[Any, float, torch.Tensor]:
        """Call the closure at the current parameters: (its loss, the objective f, the gradient of f,
        written into ``out`` when given).

        ``f`` is the closure's loss plus, for groups with ``weight_decay`` wd > 0, ``wd / 2 ||x_g||^2``:
        the term whose gradient ``wd x`` Adam's (coupled) weight decay adds, so that the L-BFGS phase
        minimises the same objective as the Adam phase.
        """
        with torch.enable_grad():
            loss = closure()
        self.closure_calls += 1
        value = float(self._loss_tensor(loss))
        grad = self._flat_grad(out)
        if any(group["weight_decay"] for group in self.param_groups):
            value += self._add_weight_decay(grad)
        return loss, value, grad

    def _add_weight_decay(self, grad: torch.Tensor) -> float:
        """``grad += wd x`` per group; returns ``sum_g wd_g / 2 ||x_g||^2``."""
        views = iter(self._views(grad))
        for group in self.param_groups:
            decay = group["weight_decay"]
            for p in group["params"]:
                view = next(views)
                if decay and p.requires_grad:
                    view.add_(p.detach(), alpha=decay)
        return self._weight_decay_penalty()

    def _weight_decay_penalty(self) -> float:
        """``sum_g wd_g / 2 ||x_g||^2`` at the current parameters (the term :meth:`_evaluate` adds to f)."""
        return sum(0.5 * group["weight_decay"] * float(p.detach().square().sum())
                   for group in self.param_groups if group["weight_decay"] for p in group["params"]
                   if p.requires_grad)

    def _step_scales(self) -> list[float] | None:
        """Per-parameter factor of the L-BFGS step, ``None`` when every factor is 1.

        A group moves by ``t * (lr_g / lr) d_g``: ``lr_g`` is the group's current learning rate (as set
        per group or by an LR scheduler), ``lr`` the constructor's (``lr_reference``, saved in the state
        dict). So the L-BFGS step scales with the learning rate as ``torch.optim.LBFGS``'s does, and a
        group at ``lr_g = 0`` stays put. A parameter with no gradient at ``x_k`` or with
        ``requires_grad=False`` (frozen) has factor 0.
        """
        base = self.lr_reference
        scales, trivial = [], True
        for group in self.param_groups:
            factor = group["lr"] / base if base > 0 else float(group["lr"] > 0)
            for p in group["params"]:
                scale = factor if (p.requires_grad and p.grad is not None) else 0.0
                trivial = trivial and scale == 1.0
                scales.append(scale)
        return None if trivial else scales

    def _recover(self, reason: str, restore_to: torch.Tensor | None) -> None:
        """Restore the last good parameters, forget the curvature pairs, count and record why."""
        if restore_to is not None:
            self._set_params(restore_to)
        if self._memory is not None:
            self._memory.reset()
        self.recoveries += 1
        self.recovery_log.append((self._step_count, reason))
        del self.recovery_log[:-100]

    def _lbfgs_direction(self, grad: torch.Tensor, out: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, float, float, str | None]:
        """``d = -P H g`` (P: the per-parameter step factors; in ``out`` when given), ``g'd``, the first
        trial step, and a recovery reason when ``H`` gave no descent direction (memory reset,
        ``d = -P g`` instead)."""
        memory = self._ensure_memory()
        scales = self._step_scales()
        failure = None
        for attempt in range(2):
            direction = memory.direction(grad, self._adam_scale, out=out)
            initial_step = self._initial_step(direction)
            if scales is not None:
                torch._foreach_mul_(self._views(direction), scales)
            gtd = float(torch.dot(grad, direction))
            if (gtd < 0 and math.isfinite(gtd)) or attempt == 1 or memory.count == 0:
                return direction, gtd, initial_step, failure
            memory.reset()
            self.recoveries += 1
            self.recovery_log.append((self._step_count, RECOVERY_NOT_DESCENT))
            failure = RECOVERY_NOT_DESCENT
        raise AssertionError("unreachable")

    def _initial_step(self, direction: torch.Tensor) -> float:
        """First trial step: ``lbfgs_lr``, scaled by ``min(1, 1/||d||_1)`` while the memory is empty."""
        lbfgs_lr = self.param_groups[0]["lbfgs_lr"]
        if self._memory is None or self._memory.count == 0:
            return min(1.0, 1.0 / max(float(direction.abs().sum()), 1e-300)) * lbfgs_lr
        return lbfgs_lr

    def _search(self, closure: Closure, x0: torch.Tensor, direction: torch.Tensor, loss0: float,
                gtd0: float, initial_step: float) -> LineSearchResult:
        """Line search from x0 along ``direction``; on return the parameters are at x0 + result.step * d.

        ``f(x_k)`` is known only to within its rounding (a few ulps of ``|f|`` in the parameters'
        dtype), so the policy's sufficient-decrease test allows that much (``loss_resolution``): near
        an optimum, where float32 cannot resolve the decrease, a step that leaves f level within that
        resolution is accepted (the approximate Armijo condition of Hager & Zhang 2005) instead of
        being reported as a failed search.
        """
        at_step = 0.0  # the parameters equal x0 + at_step * direction (exactly: x0 itself at first)
        search = self._line_search()
        needs_gtd = getattr(search, "needs_directional_derivative", True)

        last_loss: Any = None

        def evaluate(step: float) -> tuple[float, torch.Tensor, float]:
            nonlocal at_step, last_loss
            if at_step == 0.0:
                torch._foreach_add_(self._all_params(), self._views(direction), alpha=step)
            else:
                self._set_params(x0, direction, step)
            at_step = step
            last_loss, value, grad = self._evaluate(closure)
            return value, grad, float(torch.dot(grad, direction)) if needs_gtd else math.nan

        resolution = LOSS_RESOLUTION_ULPS * torch.finfo(x0.dtype).eps * abs(loss0)
        result = search(evaluate, loss0, gtd0, initial_step, loss_resolution=resolution)
        if not result.ok:
            self.line_search_failures += 1
        if at_step != result.step:
            self._set_params(x0, direction, result.step)
        elif self.deterministic_closure and result.step > 0 and result.grad is not None:
            self._remember_accepted(last_loss, result.loss, result.grad)
        return result

    def _weight_decays(self) -> tuple[float, ...]:
        return tuple(float(group["weight_decay"]) for group in self.param_groups)

    def _remember_accepted(self, loss: Any, value: float, grad: torch.Tensor) -> None:
        """Keep the line search's last evaluation, at the accepted point, for the next step (deterministic closure)."""
        x = self._flat_params(out=self._accepted.x if self._accepted is not None else None)
        saved = grad.clone() if self._accepted is None else self._accepted.grad.copy_(grad)
        self._accepted = _Evaluation(x, loss, value, saved, self._weight_decays())

    def _reuse_accepted(self, out: torch.Tensor) -> tuple[Any, float, torch.Tensor] | None:
        """With ``deterministic_closure``: the previous step's accepted point's (loss, f, gradient) when the
        parameters are still exactly there (and the weight decays unchanged), so that the closure is not called
        at x_k again: one evaluation per L-BFGS iteration instead of two on a full-batch objective. ``None``
        otherwise (a minibatch closure, or the parameters moved: a user's edit, a loaded state dict)."""
        accepted, self._accepted = self._accepted, None
        if (not self.deterministic_closure or accepted is None or accepted.weight_decay != self._weight_decays()
                or accepted.x.shape[0] != out.shape[0] or not torch.equal(self._flat_params(), accepted.x)):
            return None
        return accepted.loss, accepted.value, out.copy_(accepted.grad)

    def _converged(self, grad_max: float) -> bool:
        """``||g||_inf <= tolerance_grad * ||g_ref||_inf`` (the reference: the first L-BFGS gradient)."""
        if self._grad_reference is None:
            self._grad_reference = grad_max
        return grad_max <= self.param_groups[0]["tolerance_grad"] * max(self._grad_reference, 1e-300)

    def _lbfgs_step(self, closure: Closure) -> Any:
        """One L-BFGS iteration on the closure's minibatch (paper Algorithm 1, one pass of the loop)."""
        calls_before = self.closure_calls
        reused = self._reuse_accepted(self._step_buffer("grad"))
        loss, loss0, grad0 = reused if reused is not None else self._evaluate(closure, out=self._step_buffer("grad"))
        memory = self._ensure_memory()
        grad_max = _max_abs(grad0)
        if not (math.isfinite(loss0) and math.isfinite(grad_max)):
            self._recover(RECOVERY_NON_FINITE, self._last_good)
            self._record_lbfgs(loss0, None, None, calls_before, RECOVERY_NON_FINITE)
            return loss
        # the previous step's x_k in this buffer is no longer needed once this step's loss proved finite
        x0 = self._flat_params(out=self._step_buffer("x"))
        self._last_good = x0
        if self._converged(grad_max):
            self._record_lbfgs(loss0, grad0, 0.0, calls_before, CONVERGED)
            return loss
        direction, gtd0, initial_step, failure = self._lbfgs_direction(grad0, out=self._step_buffer("direction"))
        if not gtd0 < 0:  # every parameter with a gradient is frozen or at lr 0
            self._record_lbfgs(loss0, grad0, 0.0, calls_before, NOTHING_TO_MOVE)
            return loss
        result = self._search(closure, x0, direction, loss0, gtd0, initial_step)
        if result.step > 0:
            row = memory.free_row()
            s_row = torch.mul(direction, result.step, out=memory.s[row])
            memory.push(s_row, torch.sub(result.grad, grad0, out=memory.y[row]), self._adam_scale)
        else:
            # No step decreased the loss: the parameters are back at x_k (the search leaves them at
            # x_k + 0 d) and the memory, which proposed the direction, is forgotten.
            self._recover(result.failure or "line_search_failed", None)
        self._record_lbfgs(loss0, grad0, result.step, calls_before, result.failure or failure)
        return loss

    def _record_lbfgs(self, loss: float, grad: torch.Tensor | None, step_size: float | None, calls_before: int,
                      failure: str | None, theta: float | None = None) -> None:
        # self.phase: "lbfgs", or "blend" for a Fuse step with 0 < theta < 1
        self.last_step_info = StepInfo(
            self.phase, loss, None if grad is None else math.sqrt(float(torch.dot(grad, grad))), step_size,
            self.closure_calls - calls_before, self.pairs_accepted, self.pairs_skipped, self.recoveries, failure, theta,
        )

    # ------------------------------------------------------------------ state
    def _global_state(self) -> dict[str, Any]:
        """The optimizer-wide state (phase, counters, L-BFGS memory), as plain data and tensors."""
        return {
            "format": GLOBAL_STATE_FORMAT,
            "phase": self.phase,
            "step": self._step_count,
            "epoch": self._epoch_count,
            "memory": None if self._memory is None else self._memory.state_dict(),
            "adam_scale": None if self._adam_scale is None else self._adam_scale.clone(),
            "last_good": None if self._last_good is None else self._last_good.clone(),
            "grad_reference": self._grad_reference,
            "lr_reference": self.lr_reference,
            "closure_calls": self.closure_calls,
            "recoveries": self.recoveries,
            "line_search_failures": self.line_search_failures,
            "recovery_log": list(self.recovery_log),
        }

    def _check_global_state(self, state: Mapping[str, Any]) -> None:
        """Refuse, before anything changes, a global state this optimizer cannot continue from."""
        memory = state.get("memory")
        dimension = sum(p.numel() for p in self._all_params())
        if memory is not None and memory["s"].shape[-1] != dimension:
            raise ValueError(f"state_dict holds an L-BFGS memory over {memory['s'].shape[-1]} parameters, "
                             f"this optimizer has {dimension}")

    def _load_global_state(self, state: Mapping[str, Any]) -> None:
        self.phase = state["phase"]
        self._step_count, self._epoch_count = int(state["step"]), int(state["epoch"])
        params = self._all_params()
        device, dtype = params[0].device, params[0].dtype
        self._forget_vector_layout()
        if state["memory"] is not None:
            memory = self._ensure_memory()
            memory.load_state_dict({
                k: v.to(device=device, dtype=dtype if k in ("s", "y", "rho") else v.dtype)
                if isinstance(v, torch.Tensor) else v for k, v in state["memory"].items()})
        self._adam_scale = None if state["adam_scale"] is None else state["adam_scale"].to(device, dtype).clone()
        self._last_good = None if state["last_good"] is None else state["last_good"].to(device, dtype).clone()
        self._grad_reference = state["grad_reference"]
        self.lr_reference = float(state.get("lr_reference", self.lr_reference))
        self.closure_calls = int(state["closure_calls"])
        self.recoveries = int(state["recoveries"])
        self.line_search_failures = int(state["line_search_failures"])
        self.recovery_log = [tuple(x) for x in state["recovery_log"]]

    def _load_adam_state_only(self) -> None:
        """After loading a state dict without our global state (``torch.optim.Adam``'s): the Adam
        phase continues from it, the step counter from the first parameter's Adam step."""
        self.phase = ADAM
        first = self.state.get(self.param_groups[0]["params"][0], {})
        self._step_count = int(first["step"]) if "step" in first else 0
        self._epoch_count = 0
        self._forget_vector_layout()
        self._grad_reference = None


def _export_global_state(optimizer: _AdamLBFGSBase, state_dict: dict[str, Any]) -> None:
    """State-dict post-hook: the global state goes into the first parameter's state, under ``"fuse"``.

    There, rather than beside ``"state"`` and ``"param_groups"``, it survives tools that keep only those
    two keys (``torch.distributed.checkpoint``'s ``get/set_optimizer_state_dict``). Every parameter gets
    an entry, empty where it has no Adam state (the L-BFGS phase keeps none per parameter), because
    that checkpointer refuses to load a trainable parameter without one.
    """
    count = len(optimizer._all_params())
    state = {index: state_dict["state"].get(index, {}) for index in range(count)}
    state[0] = {**state[0], GLOBAL_STATE_KEY: optimizer._global_state()}
    # keys that are not parameter indices (put there by users' hooks) stay as they are
    state.update((k, v) for k, v in state_dict["state"].items() if not (isinstance(k, int) and 0 <= k < count))
    state_dict["state"] = state


def _import_global_state(optimizer: _AdamLBFGSBase, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load-state-dict pre-hook: take the global state out (checked before anything changes).

    Accepts our current layout, the earlier one (a top-level ``"fuse"`` key), and dicts with no global
    state at all (``torch.optim.Adam``'s: the Adam phase continues from them).
    """
    state_dict = dict(state_dict)
    state = {k: dict(v) for k, v in state_dict["state"].items()}
    global_state = state_dict.pop(GLOBAL_STATE_KEY, None)
    groups = state_dict["param_groups"]
    # the first parameter's key: 0 in torch's own layout, its name in torch.distributed.checkpoint's
    first = groups[0]["params"][0] if groups and groups[0]["params"] else 0
    if GLOBAL_STATE_KEY in state.get(first, {}):
        global_state = state[first].pop(GLOBAL_STATE_KEY)
    for group in groups:
        _refuse_unsupported({k: v for k, v in group.items() if k in _UNSUPPORTED})
    if global_state is not None:
        optimizer._check_global_state(global_state)
    # torch's load_state_dict keeps references to tensors that need no cast; copy them so that an
    # optimizer loaded from another live optimizer's state never shares buffers with it.
    state_dict["state"] = {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                           for k, s in state.items() if s}
    optimizer._pending_global_state = global_state
    return state_dict


def _apply_global_state(optimizer: _AdamLBFGSBase) -> None:
    """Load-state-dict post-hook (runs before users' post-hooks): the global state takes effect."""
    global_state = optimizer.__dict__.pop("_pending_global_state", None)
    if global_state is None:
        optimizer._load_adam_state_only()
    else:
        optimizer._load_global_state(global_state)
    optimizer._hold_state_entry()


def _adam_eq2c(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, beta1: float, beta2: float, lr: float,
               eps: float, weight_decay: float) -> None:
    """The paper's Eq. 2a-2c: ``x -= lr sqrt(1 - beta2^k) / (1 - beta1^k) m / sqrt(v + a)``, a = eps."""
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_add_(steps, 1.0)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    for param, exp_avg, exp_avg_sq, step in zip(params, exp_avgs, exp_avg_sqs, steps, strict=True):
        k = float(step)
        step_size = lr * math.sqrt(1 - beta2**k) / (1 - beta1**k)
        param.addcdiv_(exp_avg, exp_avg_sq.add(eps).sqrt_(), value=-step_size)


@dataclass
class _Probe:
    """A trial of the L-BFGS phase in progress (see :class:`fuse_optim.switch.ProbeCriterion`): its start ``x0``,
    Adam's pace ``rate`` it must beat, the steps and L-BFGS evaluations so far, ``f_0(x_0)`` (reused on a
    deterministic closure), and the running sums ``sum_j g_j`` and ``sum_j E_j``."""

    x0: torch.Tensor
    rate: float
    #: completed steps and epochs when it began: a kept probe's steps are the L-BFGS phase's first
    start_step: int = 0
    start_epoch: int = 0
    steps: int = 0
    evaluations: int = 0
    reference: float | None = None
    gain: float = 0.0
    weighted_evaluations: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self), "x0": self.x0.clone()}


class FusePV(SwitchedOptimizer, _AdamLBFGSBase):
    r"""FUSE-PV (paper Algorithm 4): Adam until a switch criterion fires, then L-BFGS.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr, betas, eps, weight_decay, amsgrad, foreach, fused: Adam phase, as ``torch.optim.Adam``
            (defaults equal; ``lr`` is alpha in Eq. 2c; ``foreach=fused=None`` picks torch's fused
            kernel where it has one). In the L-BFGS phase ``lr_g / lr`` scales each group's step and
            ``weight_decay`` stays in the objective (see the module docstring).
        maximize, capturable, differentiable, decoupled_weight_decay: accepted for drop-in
            compatibility with ``torch.optim.Adam``; only ``False`` is supported.
        eps_inside_sqrt: use the paper's Eq. 2c ``m / sqrt(v + a)`` (a = ``eps``) instead of torch's
            ``m / (sqrt(v) + eps)``.
        switch: a :class:`~fuse_optim.switch.SwitchCriterion` or its dict, e.g.
            ``{"criterion": "epoch", "epoch": 5}``; ``{"criterion": "step", "step": 0}`` runs
            L-BFGS from the first step. The default, ``{"criterion": "loss_change", "sigma": 1e-3,
            "relative": True, "window": 50}``, switches when the mean minibatch loss of 50 steps
            changes by less than 0.1% from the 50 before. ``{"criterion": "auto"}`` needs no threshold: it
            switches at the first of a won ``probe`` (after an epoch, up to 5 steps of the L-BFGS phase are
            tried and undone exactly when they gained less per evaluation than Adam; ``probing`` is True
            meanwhile) and Adam's ``plateau``.
        history_size: L-BFGS memory m (pairs kept).
        line_search: ``"armijo"`` (default: backtracking from a capped first step, the policy that
            measured best on minibatches, see BENCHMARKS.md), ``"strong_wolfe"`` (first trial
            step 1; for deterministic/full-batch problems), ``"fixed"`` or ``None`` (step
            ``lbfgs_lr``, no search).
        lbfgs_lr: first trial step t0 of the line search (``x_{k+1} = x_k + t d``); ``None`` picks
            the policy's default (1 for strong Wolfe, 0.1 for Armijo and fixed). While the memory
            is empty t0 is further scaled by ``min(1, 1 / ||d||_1)`` as in torch.optim.LBFGS.
        c1, c2: sufficient-decrease and curvature constants (``0 < c1 < c2 < 1``).
        max_evaluations: closure calls allowed per line search (default 25 for strong Wolfe, 10
            for Armijo).
        shrink: Armijo backtracking factor.
        curvature: ``"skip"`` pairs with ``s'y <= curvature_eps ||s|| ||y||`` or ``"damp"`` them
            (Powell).
        initial_inverse_hessian: ``"scalar"`` (``s'y / y'y``) or ``"adam"`` (``gamma D`` with ``D``
            from Adam's second moment at the switch).
        tolerance_grad: no step is taken when ``||g||_inf <= tolerance_grad * ||g_switch||_inf``
            (relative to the gradient at the first L-BFGS step).
        tolerance_change: relative bracket width at which the strong-Wolfe search gives up.
        track_grad_norm: compute ``||g||`` in the Adam phase for diagnostics even when the
            criterion does not need it (a device-side reduction, no synchronisation).

    Example::

        opt = FusePV(model.parameters(), lr=1e-3, switch={"criterion": "epoch", "epoch": 5})
        for epoch in range(10):
            for x, y in loader:
                def closure():
                    opt.zero_grad()
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
            opt.end_epoch()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        switch: SwitchCriterion | Mapping[str, Any] | str | None = None,
        eps_inside_sqrt: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        decoupled_weight_decay: bool = False,
        history_size: int = 10,
        line_search: str | None = "armijo",
        lbfgs_lr: float | None = None,
        c1: float = 1e-4,
        c2: float = 0.9,
        max_evaluations: int | None = None,
        shrink: float = 0.5,
        curvature: str = "skip",
        curvature_eps: float = 1e-8,
        initial_inverse_hessian: str = "scalar",
        tolerance_grad: float = 1e-10,
        tolerance_change: float = 1e-12,
        track_grad_norm: bool = False,
        deterministic_closure: bool = False,
    ) -> None:
        self._switch = SwitchState(
            switch if switch is not None
            else {"criterion": "loss_change", "sigma": 1e-3, "relative": True, "window": 50}
        )
        self.criterion = self._switch.criterion
        #: the criterion's probe part, when it decides on trials of the L-BFGS phase; the trial in progress
        self._prober: ProbeCriterion | None = probe_criterion(self.criterion)
        self._probe: _Probe | None = None
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            eps_inside_sqrt=eps_inside_sqrt, foreach=foreach, fused=fused, maximize=maximize, capturable=capturable,
            differentiable=differentiable, decoupled_weight_decay=decoupled_weight_decay, history_size=history_size,
            line_search=line_search, lbfgs_lr=lbfgs_lr, c1=c1, c2=c2, max_evaluations=max_evaluations,
            shrink=shrink, curvature=curvature, curvature_eps=curvature_eps,
            initial_inverse_hessian=initial_inverse_hessian, tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change, track_grad_norm=track_grad_norm,
            deterministic_closure=deterministic_closure,
        )

    def _may_use_lbfgs(self) -> bool:
        return not isinstance(self.criterion, Never)

    def _needs_grad_norm(self) -> bool:
        return self.track_grad_norm or self.criterion.needs_grad_norm

    def _observe_adam_step(self, loss: torch.Tensor | None, grad_sq_norm: torch.Tensor | None) -> None:
        self.criterion.observe_step(loss, grad_sq_norm)

    def switch_to_lbfgs(self, reason: str = "manual") -> None:
        """Switch now (idempotent); the next ``step()`` is an L-BFGS step."""
        if self.phase == LBFGS:
            return
        _check_one_vector(self._all_params())
        self.phase = LBFGS
        if not self._switch.fired:  # a manual switch; check() has recorded a criterion's
            self._switch.fire(self._step_count, self._epoch_count, reason)
        self._ensure_memory()

    def _maybe_switch(self) -> None:
        if self.phase == ADAM and self._switch.check(self._step_count, self._epoch_count):
            self.switch_to_lbfgs(self._switch.reason)

    def end_epoch(self) -> bool:
        """Mark the end of an epoch: call once per epoch from the training loop.

        Epoch-granular criteria (``epoch``, and ``grad_norm``/``loss_change`` without a window)
        decide here, and the switch takes effect at once (``phase`` reads ``"lbfgs"`` for the next
        epoch). Returns whether the optimizer is now in the L-BFGS phase.
        """
        self._epoch_count += 1
        if self.phase == ADAM and self._switch.end_epoch(self._step_count, self._epoch_count):
            self.switch_to_lbfgs(self._switch.reason)
        return self.phase == LBFGS

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One Adam step (Eq. 2) or one L-BFGS iteration (Algorithm 1), per the current phase.

        The closure is optional in the Adam phase (gradients already in ``p.grad``, as with
        ``torch.optim.Adam``) unless the criterion reads the loss; the L-BFGS phase requires it.
        Without a needed closure, ``step()`` raises before anything changes.
        """
        self._maybe_switch()
        if closure is None and self.phase == LBFGS:
            raise RuntimeError("FusePV.step() needs a closure in the L-BFGS phase (closure=None given)")
        if closure is None and self.criterion.needs_loss:
            raise RuntimeError(
                f"FusePV.step() needs a closure that returns the loss: the {self.criterion.name!r} switch criterion "
                "reads it (or choose a criterion that does not, e.g. switch={'criterion': 'epoch', 'epoch': 5})")
        if self.phase == ADAM and self._probe is None and self._prober is not None and self._prober.wants_probe:
            self._start_probe()
        if self._probe is not None:
            loss = self._probe_step(closure)
        elif self.phase == ADAM:
            loss = self._adam_step(closure)
        else:
            loss = self._lbfgs_step(closure)
        self._step_count += 1
        return loss

    @property
    def probing(self) -> bool:
        """Whether a trial of the L-BFGS phase (the ``probe`` criterion) is in progress."""
        return self._probe is not None

    def _start_probe(self) -> None:
        assert self._prober is not None
        _check_one_vector(self._all_params())
        self._probe = _Probe(self._flat_params().clone(), self._prober.take_rate(), self._step_count,
                             self._epoch_count)
        self._forget_lbfgs()

    def _forget_lbfgs(self) -> None:
        """A fresh L-BFGS phase: no pairs, no reference gradient, no remembered evaluation."""
        self._memory, self._adam_scale, self._last_good, self._accepted = None, None, None, None
        self._grad_reference = None

    def _probe_step(self, closure: Closure) -> Any:
        """One step of the probe: measure ``g_j = f_j(x_0) - f_j(x_j)`` (from the second step on), take one L-BFGS
        iteration on this closure, and after ``probe_steps`` of them keep the probe (the switch) or return to
        ``x_0`` (Adam continues, its state untouched)."""
        probe, prober = self._probe, self._prober
        assert probe is not None and prober is not None
        reference = probe.reference
        if probe.steps > 0 and not self.deterministic_closure:
            reference = self._value_at(probe.x0, closure)
        calls = self.closure_calls
        loss = self._lbfgs_step(closure)
        value = float(self.last_step_info.loss) if self.last_step_info is not None else math.nan
        if probe.steps == 0:
            probe.reference = value
        elif reference is not None:
            probe.gain += reference - value
            probe.weighted_evaluations += probe.evaluations
        probe.evaluations += self.closure_calls - calls
        probe.steps += 1
        if probe.steps >= prober.probe_steps:
            self._probe = None
            # the whole criterion decides ('all' may still wait for its other parts); a kept probe switched
            # where it began
            if (prober.judge(probe.gain, probe.weighted_evaluations, probe.rate)
                    and self._switch.check(probe.start_step, probe.start_epoch)):
                self.switch_to_lbfgs(self._switch.reason)
            if self.phase == ADAM:
                self._set_params(probe.x0)
                self._forget_lbfgs()
        return loss

    def _value_at(self, x: torch.Tensor, closure: Closure) -> float:
        """The objective ``f(x)`` of :meth:`_evaluate` on this closure, the parameters put back where they were
        (one evaluation; the gradients it leaves are overwritten by the next evaluation)."""
        here = self._flat_params().clone()
        self._set_params(x)
        with torch.enable_grad():
            loss = closure()
        self.closure_calls += 1
        value = float(self._loss_tensor(loss)) + self._weight_decay_penalty()
        self._set_params(here)
        return value

    def _global_state(self) -> dict[str, Any]:
        state = super()._global_state()
        state.update(self._switch.state_dict(), criterion_config=self.criterion.config(),
                     probe=None if self._probe is None else self._probe.state_dict())
        return state

    def _check_global_state(self, state: Mapping[str, Any]) -> None:
        super()._check_global_state(state)
        if state.get("criterion_config") != self.criterion.config():
            raise ValueError(
                f"state_dict was saved with switch={state.get('criterion_config')!r}, this optimizer has "
                f"switch={self.criterion.config()!r}"
            )

    def _load_global_state(self, state: Mapping[str, Any]) -> None:
        super()._load_global_state(state)
        self._switch.load_state_dict(state)
        probe = state.get("probe")
        params = self._all_params()
        self._probe = None if probe is None else _Probe(
            **{**probe, "x0": probe["x0"].to(device=params[0].device, dtype=params[0].dtype).clone()})


class Fuse(_AdamLBFGSBase):
    r"""FUSE (paper Algorithm 3): blend Adam and L-BFGS updates from the same minibatch.

    Each step, from ``x_k`` and the minibatch ``B_k``:

    1. ``x^A`` = one Adam step (Eq. 2) with ``g(x_k; B_k)``;
    2. ``x^L = x_k + t d`` = one L-BFGS iteration (Algorithm 1: two-loop direction, line search on
       ``B_k``);
    3. ``x_{k+1} = theta_k x^A + (1 - theta_k) x^L``;
    4. the curvature pair ``(x_{k+1} - x_k, g(x_{k+1}; B_k) - g(x_k; B_k))`` (one more closure call
       when ``0 < theta_k < 1``).

    ``theta_k = 1`` is exactly ``torch.optim.Adam`` (no L-BFGS work, one closure call);
    ``theta_k = 0`` is exactly FusePV's L-BFGS step (Adam moments are then left untouched). A step
    with ``0 < theta_k < 1`` costs 2 + (line-search evaluations) closure calls, reported in
    ``last_step_info.closure_calls``.

    Args:
        theta: a schedule ``step -> theta`` (callable), a number (constant), or a dict for
            :func:`~fuse_optim.schedules.make_schedule`. Default: linear from 1 to 0 over 1000 steps.
        Other arguments: as :class:`FusePV`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        theta: ThetaSchedule | Mapping[str, Any] | float | None = None,
        eps_inside_sqrt: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        decoupled_weight_decay: bool = False,
        history_size: int = 10,
        line_search: str | None = "armijo",
        lbfgs_lr: float | None = None,
        c1: float = 1e-4,
        c2: float = 0.9,
        max_evaluations: int | None = None,
        shrink: float = 0.5,
        curvature: str = "skip",
        curvature_eps: float = 1e-8,
        initial_inverse_hessian: str = "scalar",
        tolerance_grad: float = 1e-10,
        tolerance_change: float = 1e-12,
        track_grad_norm: bool = False,
        deterministic_closure: bool = False,
    ) -> None:
        self.theta = make_schedule(theta if theta is not None else {"schedule": "linear", "steps": 1000})
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            eps_inside_sqrt=eps_inside_sqrt, foreach=foreach, fused=fused, maximize=maximize, capturable=capturable,
            differentiable=differentiable, decoupled_weight_decay=decoupled_weight_decay, history_size=history_size,
            line_search=line_search, lbfgs_lr=lbfgs_lr, c1=c1, c2=c2, max_evaluations=max_evaluations,
            shrink=shrink, curvature=curvature, curvature_eps=curvature_eps,
            initial_inverse_hessian=initial_inverse_hessian, tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change, track_grad_norm=track_grad_norm,
            deterministic_closure=deterministic_closure,
        )

    def end_epoch(self) -> bool:
        """Count an epoch (Fuse has no switch; kept so trainers can treat both alike)."""
        self._epoch_count += 1
        return False

    def current_theta(self) -> float:
        theta = float(self.theta(self._step_count))
        if not 0.0 <= theta <= 1.0:
            raise ValueError(f"theta schedule returned {theta!r} at step {self._step_count}; accepted: [0, 1]")
        return theta

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | None:  # type: ignore[override]
        theta = self.current_theta()
        if theta == 1.0:
            self.phase = ADAM
            loss = self._adam_step(closure)
            self.last_step_info.theta = theta
        else:
            if closure is None:
                raise RuntimeError(f"Fuse.step() needs a closure when theta < 1 (theta={theta:g} at this step)")
            self.phase = LBFGS if theta == 0.0 else "blend"
            loss = self._lbfgs_step(closure) if theta == 0.0 else self._blend_step(closure, theta)
            self.last_step_info.theta = theta
        self._step_count += 1
        return loss

    def _blend_step(self, closure: Closure, theta: float) -> Any:
        """Algorithm 3: both updates from the same ``x_k`` and minibatch, then their convex combination.

        ``x_{k+1} = x_k + theta (x^A - x_k) + (1 - theta)(x^L - x_k)``: written as increments so that
        where both updates are zero (a stationary point) ``x_{k+1}`` is ``x_k`` exactly.
        """
        calls_before = self.closure_calls
        loss, loss0, grad0 = self._evaluate(closure)
        memory = self._ensure_memory()
        grad_max = _max_abs(grad0)
        if not (math.isfinite(loss0) and math.isfinite(grad_max)):
            self._recover(RECOVERY_NON_FINITE, self._last_good)
            self._record_lbfgs(loss0, None, None, calls_before, RECOVERY_NON_FINITE, theta)
            return loss
        x0 = self._flat_params()
        self._last_good = x0
        # x^A - x_k: Adam's update from g(x_k; B_k), already in p.grad; then back to x_k.
        self._adam_update()
        update = self._flat_params().sub_(x0).mul_(theta)
        self._set_params(x0)
        # x^L - x_k: one L-BFGS iteration from x_k on the same minibatch.
        failure, step = None, 0.0
        if self._converged(grad_max):
            failure = CONVERGED
        else:
            direction, gtd0, initial_step, failure = self._lbfgs_direction(grad0)
            if not gtd0 < 0:
                failure = NOTHING_TO_MOVE
            else:
                result = self._search(closure, x0, direction, loss0, gtd0, initial_step)
                step = result.step
                if step > 0:
                    update.add_(direction, alpha=(1 - theta) * step)
                else:
                    self._recover(result.failure or "line_search_failed", None)
                failure = result.failure or failure
        x_new = update.add_(x0)
        self._set_params(x_new)
        _, loss_new, grad_new = self._evaluate(closure)
        if math.isfinite(loss_new) and bool(torch.isfinite(grad_new).all()):
            memory.push(x_new.sub(x0), grad_new.sub_(grad0), self._adam_scale)
        else:
            self._recover(RECOVERY_NON_FINITE, x0)
            failure = RECOVERY_NON_FINITE
        self._record_lbfgs(loss0, grad0, step, calls_before, failure, theta)
        return loss
