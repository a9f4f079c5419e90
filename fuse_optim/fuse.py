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

Notes on scope:

* The Adam phase is torch's own Adam (``torch.optim.adam.adam``, foreach/fused kernels) and
  matches ``torch.optim.Adam`` step for step; ``eps_inside_sqrt=True`` gives the paper's Eq. 2c
  (``sqrt(v + a)``) instead. It takes no host synchronisation per step.
* ``weight_decay`` applies to the Adam phase only; the L-BFGS phase minimises what the closure
  returns (put an L2 term in the loss to keep the objective the same across the switch).
* The L-BFGS phase treats the parameters of all groups as one vector; its settings
  (``history_size``, ``line_search``, ...) must therefore be equal across groups.
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
from .switch import SwitchCriterion, make_criterion

__all__ = ["FusePV", "Fuse", "StepInfo", "ADAM", "LBFGS", "RECOVERY_NON_FINITE", "RECOVERY_NOT_DESCENT"]

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


def _check(condition: bool, argument: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ValueError(f"{argument} must be {accepted}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    ) -> None:
        _check(_is_number(lr) and lr >= 0, "lr", lr, "a finite number >= 0")
        betas_ok = isinstance(betas, (tuple, list)) and len(betas) == 2
        _check(betas_ok and all(_is_number(b) and 0 <= b < 1 for b in betas), "betas", betas,
               "a pair of numbers in [0, 1)")
        _check(_is_number(eps) and eps >= 0, "eps", eps, "a finite number >= 0")
        _check(_is_number(weight_decay) and weight_decay >= 0, "weight_decay", weight_decay, "a finite number >= 0")
        _check(isinstance(amsgrad, bool), "amsgrad", amsgrad, "True or False")
        _check(isinstance(eps_inside_sqrt, bool), "eps_inside_sqrt", eps_inside_sqrt, "True or False")
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
        super().__init__(params, defaults)
        if fused:
            for p in self._all_params():
                if not p.is_floating_point() or p.device.type not in ("cuda", "cpu", "mps", "xpu"):
                    raise RuntimeError("fused=True requires floating-point parameters on a supported device")
        self.track_grad_norm = bool(track_grad_norm)
        self.phase = ADAM
        self._step_count = 0
        self._epoch_count = 0
        self._memory: LBFGSMemory | None = None
        self._adam_scale: torch.Tensor | None = None
        self._last_good: torch.Tensor | None = None
        self._x0_buffer: torch.Tensor | None = None
        self._grad_reference: float | None = None
        self.closure_calls = 0
        self.recoveries = 0
        self.line_search_failures = 0
        self.recovery_log: list[tuple[int, str]] = []
        self.last_step_info: StepInfo | None = None
        self.register_state_dict_post_hook(_add_global_state)
        self.register_load_state_dict_pre_hook(_pop_global_state)

    # ------------------------------------------------------------------ parameter groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Checked before the group is added, so that a refused group leaves the optimizer unchanged.
        if self.param_groups:
            first = self.param_groups[0]
            for key in _LBFGS_KEYS:
                value = param_group.get(key, self.defaults.get(key))
                if value != first.get(key):
                    raise ValueError(
                        f"{key} must be the same in every parameter group (the L-BFGS phase treats all "
                        f"parameters as one vector), got {first.get(key)!r} and {value!r}"
                    )
        super().add_param_group(param_group)

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

    def _flat_grad(self) -> torch.Tensor:
        parts = []
        for p in self._all_params():
            if p.grad is None:
                parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
            elif p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            else:
                parts.append(p.grad.reshape(-1))
        return torch.cat(parts)

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

    def _check_lbfgs_params(self) -> None:
        params = self._all_params()
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise RuntimeError(
                f"the L-BFGS phase needs all parameters on one device with one dtype, got dtypes "
                f"{sorted(map(str, dtypes))} on devices {sorted(map(str, devices))}"
            )
        if any(p.is_complex() for p in params):
            raise RuntimeError("the L-BFGS phase does not support complex parameters")

    # ------------------------------------------------------------------ Adam phase (Eq. 2)
    def _adam_update(self, loss: torch.Tensor | None) -> torch.Tensor | None:
        """One Adam step on the gradients already in ``p.grad``; returns ||g||^2 when needed."""
        grad_sq_norm = None
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    on_device = group["fused"] or group["capturable"]
                    state["step"] = (torch.tensor(0.0, dtype=torch.float32, device=p.device) if on_device
                                     else torch.tensor(0.0, dtype=torch.float32))
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if group["amsgrad"]:
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
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
                    foreach=group["foreach"], fused=group["fused"], capturable=False, differentiable=False,
                    grad_scale=None, found_inf=None, has_complex=any(p.is_complex() for p in params),
                    decoupled_weight_decay=False, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                )
        return grad_sq_norm

    def _needs_grad_norm(self) -> bool:
        return self.track_grad_norm

    def _adam_step(self, closure: Closure | None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.closure_calls += 1
        loss_tensor = loss.detach() if isinstance(loss, torch.Tensor) else (
            None if loss is None else torch.tensor(float(loss)))
        grad_sq_norm = self._adam_update(loss_tensor)
        self._observe_adam_step(loss_tensor, grad_sq_norm)
        self.last_step_info = StepInfo(
            ADAM, loss_tensor, None if grad_sq_norm is None else grad_sq_norm.sqrt(), None,
            1 if closure is not None else 0, self.pairs_accepted, self.pairs_skipped, self.recoveries,
        )
        return loss

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
            self._check_lbfgs_params()
            group = self.param_groups[0]
            params = self._all_params()
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

    def _evaluate(self, closure: Closure) -> tuple[torch.Tensor, float, torch.Tensor]:
        with torch.enable_grad():
            loss = closure()
        self.closure_calls += 1
        value = float(loss)
        return loss, value, self._flat_grad()

    def _recover(self, reason: str, restore_to: torch.Tensor | None) -> None:
        """Restore the last good parameters, forget the curvature pairs, count and record why."""
        if restore_to is not None:
            self._set_params(restore_to)
        if self._memory is not None:
            self._memory.reset()
        self.recoveries += 1
        self.recovery_log.append((self._step_count, reason))
        del self.recovery_log[:-100]

    def _lbfgs_direction(self, grad: torch.Tensor) -> tuple[torch.Tensor, float, str | None]:
        memory = self._ensure_memory()
        direction = memory.direction(grad, self._adam_scale)
        gtd = float(torch.dot(grad, direction))
        if not (gtd < 0 and math.isfinite(gtd)):
            memory.reset()
            self.recoveries += 1
            self.recovery_log.append((self._step_count, RECOVERY_NOT_DESCENT))
            direction = memory.direction(grad, self._adam_scale)
            gtd = float(torch.dot(grad, direction))
            return direction, gtd, RECOVERY_NOT_DESCENT
        return direction, gtd, None

    def _initial_step(self, direction: torch.Tensor) -> float:
        """First trial step: ``lbfgs_lr``, scaled by ``min(1, 1/||d||_1)`` while the memory is empty."""
        lbfgs_lr = self.param_groups[0]["lbfgs_lr"]
        if self._memory is None or self._memory.count == 0:
            return min(1.0, 1.0 / max(float(direction.abs().sum()), 1e-300)) * lbfgs_lr
        return lbfgs_lr

    def _search(self, closure: Closure, x0: torch.Tensor, direction: torch.Tensor, loss0: float,
                gtd0: float) -> LineSearchResult:
        """Line search from x0 along ``direction``; on return the parameters are at x0 + result.step * d."""
        at_step = 0.0  # the parameters equal x0 + at_step * direction (exactly: x0 itself at first)

        search = self._line_search()
        needs_gtd = getattr(search, "needs_directional_derivative", True)

        def evaluate(step: float) -> tuple[float, torch.Tensor, float]:
            nonlocal at_step
            if at_step == 0.0:
                torch._foreach_add_(self._all_params(), self._views(direction), alpha=step)
            else:
                self._set_params(x0, direction, step)
            at_step = step
            _, value, grad = self._evaluate(closure)
            return value, grad, float(torch.dot(grad, direction)) if needs_gtd else math.nan

        result = search(evaluate, loss0, gtd0, self._initial_step(direction))
        if not result.ok:
            self.line_search_failures += 1
        if at_step != result.step:
            self._set_params(x0, direction, result.step)
        return result

    def _lbfgs_step(self, closure: Closure) -> torch.Tensor:
        """One L-BFGS iteration on the closure's minibatch (paper Algorithm 1, one pass of the loop)."""
        calls_before = self.closure_calls
        loss, loss0, grad0 = self._evaluate(closure)
        memory = self._ensure_memory()
        grad_max = float(grad0.abs().max())  # NaN or inf when any entry is: one pass serves both checks
        if not (math.isfinite(loss0) and math.isfinite(grad_max)):
            self._recover(RECOVERY_NON_FINITE, self._last_good)
            self._record_lbfgs(loss0, None, None, calls_before, RECOVERY_NON_FINITE)
            return loss
        # x_k goes into a buffer reused every step (a fresh 4 MB allocation per step costs page faults);
        # the previous step's x_k in it is no longer needed once this step's loss proved finite.
        if self._x0_buffer is None or self._x0_buffer.numel() != grad0.numel():
            self._x0_buffer = torch.empty_like(grad0)
        x0 = self._flat_params(out=self._x0_buffer)
        self._last_good = x0
        if self._grad_reference is None:
            self._grad_reference = grad_max
        group = self.param_groups[0]
        if grad_max <= group["tolerance_grad"] * max(self._grad_reference, 1e-300):
            self._record_lbfgs(loss0, grad0, 0.0, calls_before, "converged")
            return loss
        direction, gtd0, failure = self._lbfgs_direction(grad0)
        result = self._search(closure, x0, direction, loss0, gtd0)
        if result.step > 0:
            row = memory.free_row()
            s_row = torch.mul(direction, result.step, out=memory.s[row])
            memory.push(s_row, torch.sub(result.grad, grad0, out=memory.y[row]), self._adam_scale)
        else:
            # No step decreased the loss: restore x_k, reset the memory, take a safe steepest-descent
            # step x_k - lr g / max(1, ||g||) (lr: the Adam learning rate; length lr * min(1, ||g||), so
            # tiny at a converged iterate where only rounding stopped the search), record the failure.
            self._recover(result.failure or "line_search_failed", None)
            self._set_params(x0, grad0, -group["lr"] / max(float(grad0.norm()), 1.0))
        self._record_lbfgs(loss0, grad0, result.step, calls_before, result.failure or failure)
        return loss

    def _record_lbfgs(self, loss: float, grad: torch.Tensor | None, step_size: float | None, calls_before: int,
                      failure: str | None, theta: float | None = None) -> None:
        # self.phase: "lbfgs", or "blend" for a Fuse step with 0 < theta < 1
        self.last_step_info = StepInfo(
            self.phase, loss, None if grad is None else float(grad.norm()), step_size,
            self.closure_calls - calls_before, self.pairs_accepted, self.pairs_skipped, self.recoveries, failure, theta,
        )

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load per-parameter Adam state and the global state (phase, L-BFGS memory, criterion)."""
        super().load_state_dict(state_dict)  # type: ignore[arg-type]
        self._load_global_state(self.__dict__.pop("_pending_global_state"))

    def _global_state(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "step": self._step_count,
            "epoch": self._epoch_count,
            "memory": None if self._memory is None else self._memory.state_dict(),
            "adam_scale": None if self._adam_scale is None else self._adam_scale.clone(),
            "last_good": None if self._last_good is None else self._last_good.clone(),
            "grad_reference": self._grad_reference,
            "closure_calls": self.closure_calls,
            "recoveries": self.recoveries,
            "line_search_failures": self.line_search_failures,
            "recovery_log": list(self.recovery_log),
        }

    def _load_global_state(self, state: Mapping[str, Any]) -> None:
        self.phase = state["phase"]
        self._step_count, self._epoch_count = int(state["step"]), int(state["epoch"])
        params = self._all_params()
        device, dtype = params[0].device, params[0].dtype
        self._memory = None
        if state["memory"] is not None:
            self._memory = None
            memory = self._ensure_memory()
            memory.load_state_dict({
                k: v.to(device=device, dtype=dtype if k in ("s", "y", "rho") else v.dtype)
                if isinstance(v, torch.Tensor) else v for k, v in state["memory"].items()})
        self._adam_scale = None if state["adam_scale"] is None else state["adam_scale"].to(device, dtype).clone()
        self._last_good = None if state["last_good"] is None else state["last_good"].to(device, dtype).clone()
        self._grad_reference = state["grad_reference"]
        self.closure_calls = int(state["closure_calls"])
        self.recoveries = int(state["recoveries"])
        self.line_search_failures = int(state["line_search_failures"])
        self.recovery_log = [tuple(x) for x in state["recovery_log"]]


def _add_global_state(optimizer: _AdamLBFGSBase, state_dict: dict[str, Any]) -> None:
    state_dict["fuse"] = optimizer._global_state()


def _pop_global_state(optimizer: _AdamLBFGSBase, state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict = dict(state_dict)
    global_state = state_dict.pop("fuse", None)
    if global_state is None:
        raise ValueError(f"state_dict has no 'fuse' entry: it was not saved by {type(optimizer).__name__}")
    # torch's load_state_dict keeps references to tensors that need no cast; copy them so that an
    # optimizer loaded from another live optimizer's state never shares buffers with it.
    state_dict["state"] = {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                           for k, s in state_dict["state"].items()}
    optimizer._pending_global_state = global_state
    return state_dict


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


class FusePV(_AdamLBFGSBase):
    r"""FUSE-PV (paper Algorithm 4): Adam until a switch criterion fires, then L-BFGS.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr, betas, eps, weight_decay, amsgrad, foreach, fused: Adam phase, as ``torch.optim.Adam``
            (defaults equal; ``lr`` is alpha in Eq. 2c).
        eps_inside_sqrt: use the paper's Eq. 2c ``m / sqrt(v + a)`` (a = ``eps``) instead of torch's
            ``m / (sqrt(v) + eps)``.
        switch: a :class:`~fuse_optim.switch.SwitchCriterion` or its dict, e.g.
            ``{"criterion": "epoch", "epoch": 5}``; ``{"criterion": "step", "step": 0}`` runs
            L-BFGS from the first step. The default, ``{"criterion": "loss_change", "sigma": 1e-3,
            "relative": True, "window": 50}``, switches when the mean minibatch loss of 50 steps
            changes by less than 0.1% from the 50 before.
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
    ) -> None:
        self.criterion = make_criterion(
            switch if switch is not None
            else {"criterion": "loss_change", "sigma": 1e-3, "relative": True, "window": 50}
        )
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            eps_inside_sqrt=eps_inside_sqrt, foreach=foreach, fused=fused, history_size=history_size,
            line_search=line_search, lbfgs_lr=lbfgs_lr, c1=c1, c2=c2, max_evaluations=max_evaluations,
            shrink=shrink, curvature=curvature, curvature_eps=curvature_eps,
            initial_inverse_hessian=initial_inverse_hessian, tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change, track_grad_norm=track_grad_norm,
        )
        self.switched_at_step: int | None = None
        self.switched_at_epoch: int | None = None
        self.switch_reason: str | None = None

    def _needs_grad_norm(self) -> bool:
        return self.track_grad_norm or self.criterion.needs_grad_norm

    def _observe_adam_step(self, loss: torch.Tensor | None, grad_sq_norm: torch.Tensor | None) -> None:
        if self.criterion.needs_loss and loss is None:
            raise RuntimeError(f"the {self.criterion.name!r} switch criterion needs a closure that returns the loss")
        self.criterion.observe_step(loss, grad_sq_norm)

    def switch_to_lbfgs(self, reason: str = "manual") -> None:
        """Switch now (idempotent); the next ``step()`` is an L-BFGS step."""
        if self.phase == LBFGS:
            return
        self._check_lbfgs_params()
        self.phase = LBFGS
        self.switched_at_step = self._step_count
        self.switched_at_epoch = self._epoch_count
        self.switch_reason = reason
        self._ensure_memory()

    def _maybe_switch(self) -> None:
        if self.phase == ADAM and self.criterion.ready(self._step_count, self._epoch_count):
            self.switch_to_lbfgs(self.criterion.reason)

    def end_epoch(self) -> bool:
        """Mark the end of an epoch: call once per epoch from the training loop.

        Epoch-granular criteria (``epoch``, and ``grad_norm``/``loss_change`` without a window)
        decide here, and the switch takes effect at once (``phase`` reads ``"lbfgs"`` for the next
        epoch). Returns whether the optimizer is now in the L-BFGS phase.
        """
        self._epoch_count += 1
        if self.phase == ADAM:
            self.criterion.end_epoch()
            self._maybe_switch()
        return self.phase == LBFGS

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One Adam step (Eq. 2) or one L-BFGS iteration (Algorithm 1), per the current phase.

        The closure is optional in the Adam phase (gradients already in ``p.grad``, as with
        ``torch.optim.Adam``) unless the criterion reads the loss; the L-BFGS phase requires it.
        """
        self._maybe_switch()
        if self.phase == ADAM:
            loss = self._adam_step(closure)
        else:
            if closure is None:
                raise RuntimeError("FusePV.step() needs a closure in the L-BFGS phase (closure=None given)")
            loss = self._lbfgs_step(closure)
        self._step_count += 1
        return loss

    def _global_state(self) -> dict[str, Any]:
        state = super()._global_state()
        state.update(
            criterion=self.criterion.state_dict(), criterion_config=self.criterion.config(),
            switched_at_step=self.switched_at_step, switched_at_epoch=self.switched_at_epoch,
            switch_reason=self.switch_reason,
        )
        return state

    def _load_global_state(self, state: Mapping[str, Any]) -> None:
        if state["criterion_config"] != self.criterion.config():
            raise ValueError(
                f"state_dict was saved with switch={state['criterion_config']!r}, this optimizer has "
                f"switch={self.criterion.config()!r}"
            )
        super()._load_global_state(state)
        self.criterion.load_state_dict(state["criterion"])
        self.switched_at_step = state["switched_at_step"]
        self.switched_at_epoch = state["switched_at_epoch"]
        self.switch_reason = state["switch_reason"]


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
    ) -> None:
        self.theta = make_schedule(theta if theta is not None else {"schedule": "linear", "steps": 1000})
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            eps_inside_sqrt=eps_inside_sqrt, foreach=foreach, fused=fused, history_size=history_size,
            line_search=line_search, lbfgs_lr=lbfgs_lr, c1=c1, c2=c2, max_evaluations=max_evaluations,
            shrink=shrink, curvature=curvature, curvature_eps=curvature_eps,
            initial_inverse_hessian=initial_inverse_hessian, tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change, track_grad_norm=track_grad_norm,
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

    def _blend_step(self, closure: Closure, theta: float) -> torch.Tensor:
        calls_before = self.closure_calls
        loss, loss0, grad0 = self._evaluate(closure)
        memory = self._ensure_memory()
        if not (math.isfinite(loss0) and bool(torch.isfinite(grad0).all())):
            self._recover(RECOVERY_NON_FINITE, self._last_good)
            self._record_lbfgs(loss0, None, None, calls_before, RECOVERY_NON_FINITE, theta)
            return loss
        x0 = self._flat_params()
        self._last_good = x0
        # x^A: Adam's update from g(x_k; B_k), already in p.grad.
        self._adam_update(loss.detach())
        x_adam = self._flat_params()
        # x^L: one L-BFGS iteration from x_k on the same minibatch.
        direction, gtd0, failure = self._lbfgs_direction(grad0)
        result = self._search(closure, x0, direction, loss0, gtd0)
        x_lbfgs = torch.add(x0, direction, alpha=result.step) if result.step > 0 else x0
        if result.step == 0:
            self._recover(result.failure or "line_search_failed", None)
        x_new = x_adam.mul_(theta).add_(x_lbfgs, alpha=1 - theta)
        self._set_params(x_new)
        _, loss_new, grad_new = self._evaluate(closure)
        if math.isfinite(loss_new) and bool(torch.isfinite(grad_new).all()):
            memory.push(x_new.sub(x0), grad_new.sub_(grad0), self._adam_scale)
        else:
            self._recover(RECOVERY_NON_FINITE, x0)
            failure = RECOVERY_NON_FINITE
        self._record_lbfgs(loss0, grad0, result.step, calls_before, result.failure or failure, theta)
        return loss

