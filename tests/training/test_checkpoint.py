"""Checkpoint files: a failed save never corrupts the previous one; best and last share a file when they are the same save; loading never runs code."""

from __future__ import annotations

import os
import pickle

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from pixelmill.config import load_config
from pixelmill.errors import ModelError
from pixelmill.training.checkpoint import AtomicCheckpointIO, read_checkpoint


class _Explodes:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "boom": _Explodes()}, path)
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.reliability("untrusted: malicious pickle as a checkpoint refused, payload not run")
def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(ModelError, match="refusing to load"):
        read_checkpoint(bad)
    assert not marker.exists()


class _Scripted(L.LightningModule):
    """A one-weight model whose validation loss per epoch is given: which epochs are best is then known."""

    def __init__(self, val_losses: list[float]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.val_losses = val_losses

    def training_step(self, batch, batch_idx):
        return (self.w - batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.val_losses[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.arange(8.0)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(1)), batch_size=1)


class _Files(Callback):
    """After each epoch's saves (seen when the next epoch starts, and at the end): epochs in best/last, one file or two."""

    def __init__(self, checkpoints):
        self.checkpoints, self.seen = checkpoints, []

    def record(self):
        best, last = self.checkpoints / "best.ckpt", self.checkpoints / "last.ckpt"
        self.seen.append((read_checkpoint(best)["epoch"], read_checkpoint(last)["epoch"], os.path.samefile(best, last)))

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch:
            self.record()

    def on_train_end(self, trainer, pl_module):
        self.record()


def _fit_scripted(fast, run_dir, val_losses, epochs, ckpt_path=None) -> list:
    from pixelmill.training.fit import _callbacks

    cfg = load_config(fast("trainer.progress_bar=false", "trainer.early_stopping_patience=0", "trainer.monitor=val/loss", "trainer.mode=min"))
    files = _Files(run_dir / "checkpoints")
    trainer = L.Trainer(max_epochs=epochs, callbacks=[*_callbacks(cfg, run_dir), files], plugins=[AtomicCheckpointIO()], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(_Scripted(val_losses), ckpt_path=ckpt_path, weights_only=True)
    return files.seen


def test_last_is_the_best_file_when_the_epoch_is_the_best(fast, tmp_path):
    """An improving epoch writes one file for best.ckpt and last.ckpt (hard links); otherwise last.ckpt is its own file,
    and best.ckpt keeps the best epoch. A resumed run tracks the best as if it had not stopped."""
    losses = [3.0, 5.0, 1.0, 4.0, 0.5]
    seen = _fit_scripted(fast, tmp_path / "full", losses, 5)
    assert seen == [(0, 0, True), (0, 1, False), (2, 2, True), (2, 3, False), (4, 4, True)]
    assert _fit_scripted(fast, tmp_path / "part", losses, 3) == seen[:3]
    resumed = _fit_scripted(fast, tmp_path / "part", losses, 5, ckpt_path=tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert resumed == seen[2:]  # from the state it resumed (epoch 2); epoch 3 (loss 4) does not replace best epoch 2 (loss 1) restored from the linked last.ckpt
    assert sorted(os.listdir(tmp_path / "full" / "checkpoints")) == ["best.ckpt", "last.ckpt"]  # no temporary link left
