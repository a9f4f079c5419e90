"""FusePV in a real Lightning ``Trainer`` with :class:`fuse_tune.lightning.FuseSwitchCallback` (CPU, CSVLogger).

The switch happens where the criterion says and is logged; Lightning's automatic optimization hands FusePV a
closure that re-runs ``training_step`` per evaluation, so the L-BFGS phase works under it; a run checkpointed
after the switch and resumed with ``ckpt_path=`` continues bit for bit; Trainer settings that break a
multi-evaluation closure are refused with one line.
"""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from fuse_optim import Fuse, FusePV  # noqa: E402
from fuse_tune.errors import UserError  # noqa: E402
from fuse_tune.lightning import FuseSwitchCallback  # noqa: E402

SWITCH = {"criterion": "epoch", "epoch": 2}


def _digits() -> TensorDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long))


DATA = _digits()
BATCH = 128
STEPS = -(-len(DATA) // BATCH)  # optimizer steps per epoch


class DigitsMLP(L.LightningModule):
    def __init__(self, optimizer: str = "fuse_pv", switch=None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
        self.optimizer_name, self.switch = optimizer, switch or SWITCH
        self.training_steps = 0
        self.phases: list[str] = []  # the optimizer's phase at the start of each epoch
        self.epoch_losses: list[float] = []  # the full training loss at the end of each epoch

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "fuse":
            return Fuse(self.parameters(), lr=1e-2, theta={"schedule": "linear", "steps": 2 * STEPS})
        return FusePV(self.parameters(), lr=1e-2, switch=self.switch)

    def on_train_epoch_start(self) -> None:
        self.phases.append(self.optimizers().optimizer.phase)

    def on_train_epoch_end(self) -> None:
        with torch.no_grad():
            x, y = DATA.tensors
            self.epoch_losses.append(float(torch.nn.functional.cross_entropy(self.net(x), y)))


class ValidatedDigitsMLP(DigitsMLP):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))


def _trainer(tmp_path: Path, max_epochs: int, name: str = "run", callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name=name),
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, deterministic=True,
        callbacks=[FuseSwitchCallback(), *callbacks], **{"enable_checkpointing": False, **kwargs})


def _loader() -> DataLoader:
    return DataLoader(DATA, batch_size=BATCH, shuffle=False)


def _epoch_rows(trainer: L.Trainer, key: str) -> list[tuple[int, float]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return [(int(row["epoch"]), float(row[key])) for row in csv.DictReader(f) if row.get(key)]


def test_switch_at_epoch_two_is_driven_logged_and_lbfgs_works_under_automatic_optimization(tmp_path):
    L.seed_everything(0, verbose=False)
    model = DigitsMLP()
    trainer = _trainer(tmp_path, max_epochs=6)
    trainer.fit(model, _loader())
    opt = trainer.optimizers[0]
    assert isinstance(opt, FusePV)
    # (a) the switch: L-BFGS from epoch 2 on, and the logged phase reads 0, 0, 1, 1, ...
    assert model.phases == ["adam", "adam", "lbfgs", "lbfgs", "lbfgs", "lbfgs"]
    assert (opt.switched_at_epoch, opt.switched_at_step, opt.epoch) == (2, 2 * STEPS, 6)
    assert _epoch_rows(trainer, "fuse/phase") == [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0)]
    assert [value for _, value in _epoch_rows(trainer, "fuse/switch_epoch")] == [2.0] * 5
    assert {value for _, value in _epoch_rows(trainer, "fuse/switch_step")} == {2.0 * STEPS}
    # Lightning's closure re-runs training_step once per evaluation; the optimizer counts every call, and the
    # logged per-step closure calls add up to the L-BFGS phase's share
    assert trainer.global_step == opt.step_count == 6 * STEPS
    assert model.training_steps == opt.closure_calls
    lbfgs_calls = sum(value for _, value in _epoch_rows(trainer, "fuse/closure_calls_step"))
    assert lbfgs_calls == opt.closure_calls - 2 * STEPS and lbfgs_calls >= 2 * 4 * STEPS
    assert all(value > 0 for _, value in _epoch_rows(trainer, "fuse/step_size_step"))
    assert opt.last_step_info.phase == "lbfgs" and opt.pairs_accepted > 0
    # (b) after the switch the full training loss keeps decreasing, epoch after epoch
    after = model.epoch_losses[1:]
    assert all(later < earlier for earlier, later in zip(after, after[1:], strict=False)), model.epoch_losses


@pytest.mark.parametrize("validate", [False, True], ids=["saved-at-train-epoch-end", "saved-after-validation"])
def test_resume_after_the_switch_continues_bit_for_bit(tmp_path, validate):
    # with a validation loop ModelCheckpoint saves after the epoch-end validation, before on_train_epoch_end
    loaders = [_loader(), DataLoader(torch.utils.data.Subset(DATA, range(256)), batch_size=256)] if validate else [
        _loader()]
    module = ValidatedDigitsMLP if validate else DigitsMLP
    L.seed_everything(0, verbose=False)
    straight = module()
    _trainer(tmp_path, max_epochs=5, name="straight").fit(straight, *loaders)

    L.seed_everything(0, verbose=False)
    first = module()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, max_epochs=3, name="first", callbacks=[checkpoints], enable_checkpointing=True).fit(
        first, *loaders)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    fuse_state = saved["optimizer_states"][0]["state"][0]["fuse"]
    assert (fuse_state["phase"], fuse_state["epoch"]) == ("lbfgs", 3)

    L.seed_everything(1, verbose=False)  # the checkpoint, not the seed, decides where the resumed run starts
    resumed = module()
    trainer = _trainer(tmp_path, max_epochs=5, name="resumed")
    trainer.fit(resumed, *loaders, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    opt = trainer.optimizers[0]
    assert (opt.phase, opt.switched_at_epoch, opt.epoch, opt.step_count) == ("lbfgs", 2, 5, 5 * STEPS)
    assert resumed.phases == ["lbfgs", "lbfgs"]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.epoch_losses == straight.epoch_losses[3:]


@pytest.mark.parametrize("setting, named", [
    ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
    ({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0"),
    ({"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}, "precision='16-mixed'"),
])
def test_settings_that_break_a_multi_evaluation_closure_are_refused_with_one_line(tmp_path, setting, named):
    model = DigitsMLP()
    with pytest.raises(UserError) as caught:
        _trainer(tmp_path, max_epochs=1, **setting).fit(model, _loader())
    message = str(caught.value)
    assert "\n" not in message and named in message and "FusePV" in message
    assert model.training_steps == 0  # refused before the first step


def test_an_optimizer_that_never_switches_may_accumulate(tmp_path):
    model = DigitsMLP(switch={"criterion": "never"})
    trainer = _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=1.0)
    trainer.fit(model, _loader())
    assert trainer.optimizers[0].phase == "adam" and trainer.optimizers[0].epoch == 1


def test_fuse_logs_its_theta_and_counts_epochs(tmp_path):
    L.seed_everything(0, verbose=False)
    model = DigitsMLP("fuse")
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(model, _loader())
    thetas = [value for _, value in _epoch_rows(trainer, "fuse/theta")]
    assert len(thetas) == 3 and thetas[0] > thetas[1] > thetas[2] == 0.0
    assert trainer.optimizers[0].epoch == 3 and model.training_steps == trainer.optimizers[0].closure_calls


def test_without_lightning_the_import_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "fuse_tune.lightning")
    for name in [name for name in sys.modules if name == "lightning" or name.startswith("lightning.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError) as caught:
        importlib.import_module("fuse_tune.lightning")
    assert str(caught.value) == 'fuse_tune.lightning needs Lightning: pip install "fuse-optim[lightning]"'
