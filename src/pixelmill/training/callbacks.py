"""Callbacks pixelmill adds to Lightning's: the per-epoch history of a run, graceful stops, the progress bar."""

from __future__ import annotations

import csv
import io
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar

from pixelmill import runs

log = logging.getLogger(__name__)


class RunHistory(Callback):
    """One row of metrics per finished epoch, written to ``metrics.csv`` and ``summary.json``.

    The rows live in the checkpoint too (``state_dict``), so after a kill and a resume the
    history is exactly the checkpoint's: no gap and no repeated epoch.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Recorded now, so this epoch's checkpoint (saved right after) holds the row; the
        # files are written once that checkpoint exists (next epoch start or train end), so
        # a row in metrics.csv always has a checkpoint to resume from.
        row: dict[str, float] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row.update({k: float(v) for k, v in sorted(trainer.callback_metrics.items())})
        self.rows.append(row)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: L.Trainer) -> None:
        from pixelmill.tracking import log_epoch

        if not (trainer.is_global_zero and self.rows):
            return
        self.write()
        # Rows already sent (before a kill) are not sent again; the count lives beside the run.
        tracked = int(runs.read_summary(self.run_dir).get("tracked_epochs", 0))
        for row in self.rows:
            if int(row["epoch"]) >= tracked:
                log_epoch(trainer.loggers, row)
        done = int(self.rows[-1]["epoch"]) + 1
        runs.update_summary(self.run_dir, epochs_completed=done, tracked_epochs=done, last_epoch_metrics=self.rows[-1])

    def write(self) -> None:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        runs.write_atomic(self.run_dir / runs.METRICS, buf.getvalue())

    def best(self, monitor: str, mode: str) -> dict[str, float] | None:
        """The row with the best ``monitor`` value (first one on ties)."""
        rows = [r for r in self.rows if monitor in r]
        if not rows:
            return None
        pick = max if mode == "max" else min
        return pick(rows, key=lambda r: r[monitor])

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]


class GracefulStop(Callback):
    """SIGINT / SIGTERM: finish the current epoch, save its checkpoint, then stop.

    Stopping at an epoch boundary keeps resume exact. A second Ctrl+C stops at once (the
    previous epoch's checkpoint stays intact). Installed at train start, after Lightning's
    own SIGTERM handler (which would stop mid-epoch); left to Lightning under DDP, where it
    forwards the signal to every rank.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            self.install()  # again: Lightning put its own SIGTERM handler in front of ours
            if self.requested:  # a signal during start-up: stop after the first epoch, not mid-way
                trainer._signal_connector.received_sigterm = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.uninstall()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous.setdefault(sig, signal.getsignal(sig))  # the handlers from before training
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put back the handlers from before training (idempotent; runs after Lightning's teardown too)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: finishing this epoch, saving it, then stopping (Ctrl+C again stops now)", self.requested)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.requested:
            trainer.should_stop = True


class EpochProgressBar(RichProgressBar):
    """Lightning's rich bar with the epoch, the training loss and the monitored metric only.

    Lightning adds the logger's version (``v_num``) and every ``prog_bar`` metric; a person
    watching a run wants to see whether the loss falls and the metric that picks the best epoch.
    """

    def __init__(self, monitor: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.monitor = monitor

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        shown = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k in ("train/loss", self.monitor)}
        if self.monitor not in shown and self.monitor in trainer.callback_metrics:  # a metric logged without prog_bar
            shown[self.monitor] = float(trainer.callback_metrics[self.monitor])
        return shown
