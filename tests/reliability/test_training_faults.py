"""Training faults: SIGKILL at random moments (one during a checkpoint save), a full disk."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers import fast_train_overrides
from pixelmill.config import load_config
from pixelmill.training.checkpoint import net_state_dict, read_checkpoint
from pixelmill.training.fit import train

CLI = [sys.executable, "-m", "pixelmill.cli", "train"]
EPOCHS = 10  # a killed segment trains at most two epochs: 5 kills leave epochs to finish


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return net_state_dict(read_checkpoint(run_dir / "checkpoints" / "last.ckpt"))


def _saving(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob(".*.tmp-*"))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


class _EpochClock(Callback):
    """When each epoch ended: the interval is one epoch of training, validation and checkpoint save."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.ends.append(time.monotonic())


def _run_until(cmd, cwd, run_dir: Path, when) -> tuple[bool, list[float]]:
    """Start ``cmd``; SIGKILL it once ``when(seconds since start, when it replaced last.ckpt)`` holds.

    Returns whether it was killed and the moments (seconds since its start) it replaced ``last.ckpt``.
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    seen = _identity(last)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started, saves = time.monotonic(), []
    while proc.poll() is None:
        elapsed = time.monotonic() - started
        if elapsed > 300:
            proc.kill()
            raise AssertionError("a training segment hung")
        if (now := _identity(last)) not in (None, seen):
            seen = now
            saves.append(elapsed)
        if last.exists() and when(elapsed, saves):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True, saves
        time.sleep(0.001)
    assert proc.returncode == 0
    return False, saves


def _into_an_epoch(delay: float):
    """Kill ``delay`` seconds after the segment's first save, or at its second save if that comes first."""
    return lambda t, saves: bool(saves) and (t - saves[0] > delay or len(saves) > 1)


@pytest.mark.slow
@pytest.mark.reliability("training: SIGKILL at 5 random moments, resume bit-exact")
def test_five_random_kills_resume_to_identical_weights(digits_root, tmp_path):
    """Kills land inside a checkpoint save, during a resume's start-up and at random points of epochs.

    Moments follow each segment's own progress, not the wall clock, and no killed segment trains
    more than two epochs: on a fast or a loaded machine alike every kill lands before the run ends.
    """
    args = fast_train_overrides(digits_root, tmp_path / "runs", "eval.splits=[]", "trainer.limit_train_batches=6", epochs=EPOCHS)
    clock = _EpochClock()
    straight = train(load_config(args + ["run_name=straight"]), callbacks=[clock])
    epoch = statistics.median(b - a for a, b in zip(clock.ends, clock.ends[1:]))
    run_dir = tmp_path / "runs" / "default" / "chaos"
    rng = random.Random(20261123)
    to_first_save = []  # per segment: start-up (a resume's, from the second on) and one epoch
    moments = [
        lambda t, saves: bool(saves) and (_saving(run_dir) or len(saves) > 1),  # inside a save, once last.ckpt exists
        _into_an_epoch(rng.uniform(0.0, 0.8) * epoch),
        # During the start-up of a resume, timed by the previous resume's; at the latest at its first save.
        lambda t, saves, f=rng.uniform(0.2, 0.7): bool(saves) or t > f * to_first_save[-1],
        *[_into_an_epoch(rng.uniform(0.0, 0.8) * epoch) for _ in range(2)],
    ]
    cmd = CLI + args + ["run_name=chaos"]
    for kill, moment in enumerate(moments, 1):
        killed, saves = _run_until(cmd, tmp_path, run_dir, moment)
        to_first_save += saves[:1]
        assert killed, f"the run finished before kill {kill} of {len(moments)}"
        read_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # never corrupt
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"
        cmd = CLI + [f"resume={run_dir}"]
    assert _run_until(cmd, tmp_path, run_dir, lambda t, saves: False)[0] is False  # finish after the last kill
    final, expected = _weights(run_dir), _weights(straight.run_dir)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert not _saving(run_dir), "a save the kill interrupted was left behind"


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.reliability("training: disk full during a checkpoint save")
def test_full_disk_during_save_keeps_previous_checkpoint(digits_root, tmp_path):
    args = fast_train_overrides(digits_root, tmp_path / "runs", "run_name=full", "eval.splits=[]", "trainer.limit_train_batches=2", epochs=1)
    first = train(load_config(args))
    before = _weights(first.run_dir)
    size = (first.run_dir / "checkpoints" / "last.ckpt").stat().st_size
    out = subprocess.run(CLI + [f"resume={first.run_dir}", "trainer.max_epochs=3"], cwd=tmp_path, capture_output=True, text=True,
                         preexec_fn=_limit_file_size(size // 2))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "could not save checkpoint" in out.stderr and "resume=" in out.stderr and "Traceback" not in out.stderr
    after = _weights(first.run_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list((first.run_dir / "checkpoints").glob(".*.tmp-*"))
    assert json.loads((first.run_dir / "summary.json").read_text())["status"] == "failed"


@pytest.mark.reliability("training: unwritable output directory detected before training")
def test_read_only_output_dir_fails_before_training(digits_root, tmp_path):
    from pixelmill.errors import RunError

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(RunError, match="cannot write the run directory"):
        train(load_config(fast_train_overrides(digits_root, blocker / "runs", "run_name=x", epochs=1)))
