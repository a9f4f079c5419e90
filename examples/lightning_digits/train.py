"""Train module.DigitsClassifier with a lightning.Trainer and fuse_tune.lightning.FuseSwitchCallback.

    python train.py --epochs 10 --switch-epoch 3 --lr 0.01 [--history-size 10] [--hidden 32] [--seed 0]

The callback calls FusePV's ``end_epoch()`` at the end of every training epoch, so the ``epoch`` switch
criterion fires after ``--switch-epoch`` completed epochs as it does in fuse-tune's own trainer; the settings a
study found (``study.yaml``) therefore carry over as they are.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as L
from torch.utils.data import DataLoader, TensorDataset

from fuse_tune.lightning import FuseSwitchCallback, fuse_optimizers

# isort: split
from module import DigitsClassifier, digits_splits  # module.py next to this file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--switch-epoch", type=int, default=3, help="completed epochs before L-BFGS")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--history-size", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="as the study's fixed batch_size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu", help="cpu (default; the model is tiny), gpu, auto")
    args = parser.parse_args(argv)

    # the same seed gives the same initial weights as fuse-tune's trial on that seed (torch's RNG seeded, then
    # the module built)
    L.seed_everything(args.seed, verbose=False)
    model = DigitsClassifier(hidden=args.hidden, lr=args.lr, switch_epoch=args.switch_epoch,
                             history_size=args.history_size)
    splits = digits_splits()
    train = DataLoader(TensorDataset(*splits["train"]), batch_size=args.batch_size, shuffle=True)
    validation = DataLoader(TensorDataset(*splits["validation"]), batch_size=1024)
    test = DataLoader(TensorDataset(*splits["test"]), batch_size=1024)

    trainer = L.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=1,
                        callbacks=[FuseSwitchCallback()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train, validation)
    (optimizer,) = fuse_optimizers(trainer)
    if optimizer.switched_at_epoch is not None:
        print(f"switched to L-BFGS at epoch {optimizer.switched_at_epoch} (step {optimizer.switched_at_step}): "
              f"{optimizer.switch_reason}")
    else:
        print(f"no switch in {args.epochs} epochs (phase {optimizer.phase})")
    val = trainer.validate(model, validation, verbose=False)[0]
    scores = trainer.test(model, test, verbose=False)[0]
    print(f"final val_accuracy {val['val_accuracy']:.4f}, test_accuracy {scores['test_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
