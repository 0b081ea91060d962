"""Training faults: SIGKILL at random moments (one during a checkpoint save), a full disk."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import fast_train_overrides
from pixelmill.config import load_config
from pixelmill.training.checkpoint import net_state_dict, read_checkpoint
from pixelmill.training.fit import train

CLI = [sys.executable, "-m", "pixelmill.cli", "train"]
EPOCHS = 6


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return net_state_dict(read_checkpoint(run_dir / "checkpoints" / "last.ckpt"))


def _saving(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob(".*.tmp-*"))


def _run_until(cmd, cwd, run_dir: Path, when) -> bool:
    """Start ``cmd``; SIGKILL it when ``when(elapsed)`` says so. True if it was killed."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.time()
    while proc.poll() is None:
        if time.time() - started > 300:
            proc.kill()
            raise AssertionError("a training segment hung")
        if (run_dir / "checkpoints" / "last.ckpt").exists() and when(time.time() - started):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    assert proc.returncode == 0
    return False


@pytest.mark.slow
@pytest.mark.reliability("training: SIGKILL at 5 random moments, resume bit-exact")
def test_five_random_kills_resume_to_identical_weights(digits_root, tmp_path):
    args = fast_train_overrides(digits_root, tmp_path / "runs", "eval.splits=[]", "trainer.limit_train_batches=6", epochs=EPOCHS)
    straight = train(load_config(args + ["run_name=straight"]))
    run_dir = tmp_path / "runs" / "default" / "chaos"
    rng = random.Random(20261123)
    kills = 0
    during_save = False
    cmd = CLI + args + ["run_name=chaos"]
    for attempt in range(12):
        if kills == 0:  # the first kill lands inside a checkpoint save
            killed = _run_until(cmd, tmp_path, run_dir, lambda t: _saving(run_dir))
            during_save = during_save or killed
        else:
            delay = rng.uniform(0.0, 3.0)
            killed = _run_until(cmd, tmp_path, run_dir, lambda t, d=delay: t > d + 4.0)  # ~4 s of start-up
        if killed:
            read_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # never corrupt
            status = json.loads((run_dir / "summary.json").read_text())["status"]
            # A kill can land after the run has finished, while the process shuts down: the run stays finished.
            killed = status != "finished"
            if killed:
                kills += 1
                assert status == "running"
        if not killed or kills == 5:
            break
        cmd = CLI + [f"resume={run_dir}"]
    if kills == 5:  # finish after the last kill
        assert _run_until(CLI + [f"resume={run_dir}"], tmp_path, run_dir, lambda t: False) is False
    assert kills >= 3, f"only {kills} kills landed before the run finished"
    assert during_save, "no kill landed inside a checkpoint save"
    final, expected = _weights(run_dir), _weights(straight.run_dir)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


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
