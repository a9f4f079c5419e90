"""Optimizers by name from a plain config: the baselines of the paper and FUSE itself.

=============  ==========================================================================
name           what it builds
=============  ==========================================================================
``sgd``        ``torch.optim.SGD`` (paper: lr 0.01)
``adam``       ``torch.optim.Adam`` (paper: lr 0.001)
``adam_sgd``   :class:`AdamThenSGD`: Adam, then SGD once a switch criterion fires (Keskar & Socher)
``adam_lbfgs`` :class:`AdamThenLBFGS`: Adam, then ``torch.optim.LBFGS`` (max_iter 20, history 100): the PINN recipe
``lbfgs``      ``torch.optim.LBFGS`` (one iteration per minibatch, strong Wolfe, max_eval 25)
``fuse_pv``    :class:`fuse_optim.FusePV`
``fuse``       :class:`fuse_optim.Fuse`
=============  ==========================================================================

Every optimizer built here is stepped with a closure (``opt.step(closure)``) and answers
``end_epoch()`` (a no-op for the torch ones), so the trainer treats them alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fuse_optim import Fuse, FusePV
from fuse_optim.switch import SwitchCriterion, SwitchedOptimizer, SwitchState

__all__ = ["OPTIMIZERS", "AdamThenSGD", "AdamThenLBFGS", "build_optimizer", "optimizer_phase", "accepted_arguments"]


class _AdamThen(SwitchedOptimizer, torch.optim.Optimizer):
    """Adam until a switch criterion fires (the same criteria as FusePV, :mod:`fuse_optim.switch`), then a second
    torch optimizer on the same parameters. Subclasses build the second one (:meth:`_second`) and name its phase."""

    second_phase = "second"

    def __init__(self, params: list[torch.Tensor], adam: torch.optim.Adam, second: torch.optim.Optimizer,
                 switch: SwitchCriterion | Mapping[str, Any] | str, lr: float) -> None:
        self.adam, self.second = adam, second
        self._switch = SwitchState(switch)
        self.criterion = self._switch.criterion
        if self.criterion.needs_probe:
            raise ValueError(f"switch: the 'probe' criterion trials FusePV's own L-BFGS phase; {type(self).__name__} "
                             "takes epoch, step, grad_norm, loss_change, plateau, absolute_rules or never")
        super().__init__(params, {"lr": lr})
        self._steps = 0
        self._epochs = 0

    @property
    def phase(self) -> str:
        return self.second_phase if self._switch.fired else "adam"

    def _maybe_switch(self) -> None:
        self._switch.check(self._steps, self._epochs)

    def step(self, closure=None):  # type: ignore[override]
        self._maybe_switch()
        if self.phase != "adam":
            loss = self._second_step(closure)
            self._steps += 1
            return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.criterion.needs_loss or self.criterion.needs_grad_norm:
            grads = [p.grad for group in self.adam.param_groups for p in group["params"] if p.grad is not None]
            grad_sq = torch.stack([g.pow(2).sum() for g in grads]).sum() if grads else None
            self.criterion.observe_step(None if loss is None else loss.detach(), grad_sq)
        self.adam.step()
        self._steps += 1
        return loss

    def _second_step(self, closure):  # noqa: ANN001, ANN202
        raise NotImplementedError

    def end_epoch(self) -> bool:
        self._epochs += 1
        self._switch.end_epoch(self._steps, self._epochs)
        return self.phase != "adam"

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"adam": self.adam.state_dict(), self.second_phase: self.second.state_dict(),
                **self._switch.state_dict(), "phase": self.phase, "steps": self._steps, "epochs": self._epochs}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        self.adam.load_state_dict(state_dict["adam"])
        self.second.load_state_dict(state_dict[self.second_phase])
        self._switch.load_state_dict(state_dict)
        self._steps, self._epochs = state_dict["steps"], state_dict["epochs"]


class AdamThenSGD(_AdamThen):
    """Adam until a switch criterion fires, then SGD (with momentum) on the same parameters (Keskar & Socher).

    ``sgd_lr`` is the SGD learning rate after the switch (Keskar & Socher 2017 estimate it from Adam's steps;
    here it is a hyperparameter for the study to search).
    """

    second_phase = "sgd"

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, sgd_lr: float = 0.01, momentum: float = 0.9,
                 switch: SwitchCriterion | Mapping[str, Any] | str = "never") -> None:
        params = list(params)
        if not isinstance(sgd_lr, (int, float)) or sgd_lr <= 0:
            raise ValueError(f"sgd_lr must be a number > 0, got {sgd_lr!r}")
        super().__init__(params, torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
                         torch.optim.SGD(params, lr=sgd_lr, momentum=momentum, weight_decay=weight_decay),
                         switch, lr)

    @property
    def sgd(self) -> torch.optim.SGD:
        return self.second

    def _second_step(self, closure):  # noqa: ANN001, ANN202
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.second.step()
        return loss


class AdamThenLBFGS(_AdamThen):
    """The physics-informed-network community's recipe: Adam until a switch criterion fires (DeepXDE and the code of
    Rathore et al. 2024 switch at a fixed iteration), then ``torch.optim.LBFGS(lr=1, history_size=100, max_iter=20,
    line_search_fn="strong_wolfe")``: each step after the switch is up to ``max_iter`` L-BFGS iterations and
    ``max_eval`` (default ``max_iter * 5 // 4``) closure calls on the same closure. Meant for full-batch objectives;
    compare it with FusePV at equal closure calls (gradient evaluations), not equal steps."""

    second_phase = "lbfgs"

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, lbfgs_lr: float = 1.0, history_size: int = 100,
                 max_iter: int = 20, max_eval: int | None = None, line_search_fn: str | None = "strong_wolfe",
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9,
                 switch: SwitchCriterion | Mapping[str, Any] | str = "never") -> None:
        params = list(params)
        super().__init__(params, torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
                         torch.optim.LBFGS(params, lr=lbfgs_lr, history_size=history_size, max_iter=max_iter,
                                           max_eval=max_eval, line_search_fn=line_search_fn,
                                           tolerance_grad=tolerance_grad, tolerance_change=tolerance_change),
                         switch, lr)

    def _second_step(self, closure):  # noqa: ANN001, ANN202
        if closure is None:
            raise RuntimeError("adam_lbfgs needs a closure after the switch (torch.optim.LBFGS re-evaluates the loss)")
        return self.second.step(closure)


def _torch_lbfgs(params: Iterable[torch.Tensor], lr: float = 1.0, history_size: int = 10, max_iter: int = 1,
                 max_eval: int = 25, line_search_fn: str | None = "strong_wolfe", tolerance_grad: float = 0.0,
                 tolerance_change: float = 0.0) -> torch.optim.LBFGS:
    """torch.optim.LBFGS with settings that make it take a step per minibatch.

    With ``max_iter=1`` torch's default ``max_eval`` (``max_iter * 5 // 4 = 1``) is used up by the
    closure's first call and the strong-Wolfe search gets no evaluation: no step is ever taken (2-D
    Rosenbrock from (-1.5, 2) stays at f = 12.5, BENCHMARKS.md, "L-BFGS from the first step on 2-D
    Rosenbrock"). ``max_eval=25`` lets it step (90 closure calls to f < 1e-10 there), and
    ``tolerance_grad = tolerance_change = 0`` switch off its stopping tests, which are absolute.
    """
    return torch.optim.LBFGS(params, lr=lr, history_size=history_size, max_iter=max_iter, max_eval=max_eval,
                             line_search_fn=line_search_fn, tolerance_grad=tolerance_grad,
                             tolerance_change=tolerance_change)


def _sgd(params: Iterable[torch.Tensor], lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
         nesterov: bool = False) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def _adam(params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


OPTIMIZERS = {
    "sgd": _sgd,
    "adam": _adam,
    "adam_sgd": AdamThenSGD,
    "adam_lbfgs": AdamThenLBFGS,
    "lbfgs": _torch_lbfgs,
    "fuse_pv": FusePV,
    "fuse": Fuse,
}

#: arguments the trainer sets itself, never taken from a config
_RESERVED = {"params", "self", "foreach", "fused"}


def accepted_arguments(name: str) -> list[str]:
    """Keyword arguments the optimizer ``name`` accepts from a config."""
    signature = inspect.signature(OPTIMIZERS[name])
    return sorted(p for p in signature.parameters if p not in _RESERVED)


def build_optimizer(name: str, params: Iterable[torch.Tensor], config: Mapping[str, Any] | None = None):
    """Build optimizer ``name`` over ``params`` from a plain dict of its keyword arguments.

    Raises ``ValueError`` (one line) for an unknown name, an unknown argument or a bad value.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    config = dict(config or {})
    accepted = accepted_arguments(name)
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ValueError(f"optimizer {name!r} got unknown argument(s) {unknown}; accepted: {accepted}")
    defaults = inspect.signature(OPTIMIZERS[name]).parameters
    for key, value in config.items():
        default = defaults[key].default
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"optimizer {name!r}: argument {key} expects a number, got {value!r}")
    if "betas" in config:
        config["betas"] = tuple(config["betas"])
    try:
        optimizer = OPTIMIZERS[name](params, **config)
    except (TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"optimizer {name!r}: {exc}") from None
    if not hasattr(optimizer, "end_epoch"):
        optimizer.end_epoch = lambda: False  # type: ignore[attr-defined]
    return optimizer


def optimizer_phase(optimizer: torch.optim.Optimizer, name: str) -> str:
    """The optimizer's current phase: its ``phase`` attribute, else its name."""
    return getattr(optimizer, "phase", None) or name
