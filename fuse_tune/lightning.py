"""FusePV and Fuse in a PyTorch Lightning ``Trainer``: :class:`FuseSwitchCallback` (the ``lightning`` extra).

``configure_optimizers`` returns a :class:`~fuse_optim.FusePV` (or :class:`~fuse_optim.Fuse`) as any optimizer;
the callback does what a plain loop does by hand:

* at the end of every training epoch (after its last batch, before the epoch-end validation) it calls
  ``end_epoch()`` once on each FusePV/Fuse among the trainer's optimizers (so epoch-granular switch criteria
  decide), so a checkpoint ``ModelCheckpoint`` saves at the epoch's end holds the epoch count and the switch
  (do not call ``end_epoch()`` in the module as well);
* it logs through ``pl_module.log`` (so through every logger of the trainer): per epoch ``fuse/phase``
  (FusePV: 0 Adam, 1 L-BFGS; the phase the epoch ended in) or ``fuse/theta`` (Fuse: theta of the last step,
  1 = Adam), and from the switch on ``fuse/switch_epoch`` and ``fuse/switch_step``; per L-BFGS (or blended)
  step the diagnostics of ``opt.last_step_info``: ``fuse/closure_calls``, ``fuse/step_size`` and
  ``fuse/recoveries`` (cumulative), as ``*_step`` values and ``*_epoch`` means;
* it refuses, with one line (a :class:`~fuse_tune.errors.UserError`) when training starts, the Trainer
  settings that break the L-BFGS phase's closure, which Lightning's automatic optimization calls once per
  evaluation (``training_step``, ``zero_grad`` and ``backward`` re-run each time, several times per step):
  ``accumulate_grad_batches > 1`` (the closure zeroes gradients only on the first batch of a window, so
  each evaluation would add to the last), ``gradient_clip_val`` (Lightning clips after every evaluation:
  the line search and the curvature pairs would see clipped gradients) and a precision with a gradient
  scaler (``"16-mixed"``: Lightning calls the closure itself once, then ``optimizer.step()`` without it).

With several FusePV/Fuse optimizers (manual optimization) the metric names end in ``/<index>``.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.utilities import rank_zero_info
except ImportError as error:  # pragma: no cover - exercised by a test that hides lightning
    raise ImportError('fuse_tune.lightning needs Lightning: pip install "fuse-optim[lightning]"') from error

from fuse_optim import ADAM, LBFGS, Fuse, FusePV
from fuse_tune.errors import UserError

__all__ = ["FuseSwitchCallback", "fuse_optimizers"]

_FuseOptimizer = FusePV | Fuse


def fuse_optimizers(trainer: Trainer) -> list[_FuseOptimizer]:
    """The FusePV/Fuse optimizers among the trainer's, unwrapped from ``LightningOptimizer``."""
    found = []
    for optimizer in trainer.optimizers:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        if isinstance(optimizer, FusePV | Fuse):
            found.append(optimizer)
    return found


def _may_take_lbfgs_steps(optimizer: _FuseOptimizer) -> bool:
    return optimizer._may_use_lbfgs()


class FuseSwitchCallback(Callback):
    """Drive FusePV's epoch-granular switch criteria in a Lightning ``Trainer`` and log the phase and the switch.

    Args:
        prefix: the start of every metric name.
        log_steps: log the L-BFGS diagnostics of every step (``*_step``) besides their epoch means.
        verbose: say on rank zero when an optimizer switches, with the epoch, step and reason.
    """

    def __init__(self, prefix: str = "fuse/", log_steps: bool = True, verbose: bool = True) -> None:
        super().__init__()
        self.prefix = prefix
        self.log_steps = bool(log_steps)
        self.verbose = bool(verbose)
        self._logged_step: dict[int, int] = {}
        self._announced: set[int] = set()
        #: the trainer epoch whose end_epoch() was called (kept in checkpoints, so a resumed run never repeats it)
        self._ended_epoch: int | None = None

    # ------------------------------------------------------------------ names
    def _name(self, key: str, index: int, count: int) -> str:
        return f"{self.prefix}{key}" if count == 1 else f"{self.prefix}{key}/{index}"

    # ------------------------------------------------------------------ refusals
    def _refuse_unsupported(self, trainer: Trainer, pl_module: LightningModule, lbfgs_now_only: bool) -> None:
        if not pl_module.automatic_optimization:
            return  # the training_step writes the closure itself
        for optimizer in fuse_optimizers(trainer):
            if lbfgs_now_only and optimizer.phase == ADAM:
                continue
            if not _may_take_lbfgs_steps(optimizer):
                continue
            name = type(optimizer).__name__
            if trainer.accumulate_grad_batches > 1:
                raise UserError(
                    f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) with {name}: the L-BFGS "
                    "phase calls the closure several times per step and Lightning zeroes gradients only on the first "
                    "batch of a window; accepted: 1 (or switch={'criterion': 'never'}, or a larger batch_size)")
            if trainer.gradient_clip_val:
                raise UserError(
                    f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) with {name}: Lightning clips after every "
                    "closure call, so the L-BFGS line search and curvature pairs would see clipped gradients; "
                    "accepted: None or 0")
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                raise UserError(
                    f"Trainer(precision={trainer.precision_plugin.precision!r}) with {name}: with a gradient scaler "
                    "Lightning calls optimizer.step() without the closure the L-BFGS phase needs; accepted: "
                    "'32-true', '64-true', 'bf16-mixed' or 'bf16-true'")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refuse_unsupported(trainer, pl_module, lbfgs_now_only=False)
        optimizers = fuse_optimizers(trainer)
        self._logged_step = {index: optimizer.step_count for index, optimizer in enumerate(optimizers)}
        # a run resumed after the switch does not announce it again
        self._announced = {index for index, optimizer in enumerate(optimizers) if optimizer.phase == LBFGS}

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # e.g. a GradientAccumulationScheduler that raised accumulate_grad_batches for this epoch
        self._refuse_unsupported(trainer, pl_module, lbfgs_now_only=True)

    # ------------------------------------------------------------------ per step
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        optimizers = fuse_optimizers(trainer)
        for index, optimizer in enumerate(optimizers):
            info = optimizer.last_step_info
            if optimizer.step_count == self._logged_step.get(index) or info is None:
                continue  # no step this batch (accumulation, a skipped step)
            self._logged_step[index] = optimizer.step_count
            if info.phase == ADAM:
                continue
            values = {"closure_calls": float(info.closure_calls), "recoveries": float(info.recoveries)}
            if info.step_size is not None:
                values["step_size"] = float(info.step_size)
            for key, value in values.items():
                pl_module.log(self._name(key, index, len(optimizers)), value, on_step=self.log_steps, on_epoch=True,
                              batch_size=1)
        if self._is_last_batch(trainer):
            # end the epoch here, before the epoch-end validation and the checkpoint ModelCheckpoint saves after it
            self._end_epoch(trainer, pl_module)

    # ------------------------------------------------------------------ per epoch
    def _is_last_batch(self, trainer: Trainer) -> bool:
        # as Lightning's epoch loop decides it (limit_train_batches included)
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return progress.is_last_batch or progress.current.ready >= trainer.num_training_batches

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_epoch(trainer, pl_module)  # a no-op where the last batch already ended it

    def _end_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``end_epoch()`` once per training epoch, logging the epoch's phase and, once switched, the switch."""
        if self._ended_epoch == trainer.current_epoch:
            return
        self._ended_epoch = trainer.current_epoch
        optimizers = fuse_optimizers(trainer)
        count = len(optimizers)
        for index, optimizer in enumerate(optimizers):
            if isinstance(optimizer, Fuse):
                theta = optimizer.last_step_info.theta if optimizer.last_step_info is not None else None
                if theta is not None:
                    pl_module.log(self._name("theta", index, count), float(theta), on_step=False, on_epoch=True)
                optimizer.end_epoch()
                continue
            pl_module.log(self._name("phase", index, count), float(optimizer.phase == LBFGS), on_step=False,
                          on_epoch=True)
            optimizer.end_epoch()
            if optimizer.phase != LBFGS:
                continue
            if self.verbose and index not in self._announced:
                self._announced.add(index)
                rank_zero_info(f"{type(optimizer).__name__} switched to L-BFGS at epoch {optimizer.switched_at_epoch} "
                               f"(step {optimizer.switched_at_step}): {optimizer.switch_reason}")
            pl_module.log(self._name("switch_epoch", index, count), float(optimizer.switched_at_epoch), on_step=False,
                          on_epoch=True)
            pl_module.log(self._name("switch_step", index, count), float(optimizer.switched_at_step), on_step=False,
                          on_epoch=True)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"ended_epoch": self._ended_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ended_epoch = state_dict.get("ended_epoch")
