"""Which process is rank 0 (and so alone creates and writes the run directory) under each launcher.

The case that went wrong: DDP inside an interactive SLURM allocation (``srun --pty bash``,
``salloc``). SLURM sets ``SLURM_PROCID=0`` for the whole shell, so every process started in
it inherits that value; Lightning does not treat such a job (named ``bash`` or
``interactive``) as SLURM-launched and starts the ranks itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import fast_train_overrides
from pixelmill.training.fit import is_global_zero

# What `srun --pty bash` (or `salloc` on a one-task allocation) leaves in the shell's environment.
INTERACTIVE_SLURM = {
    "SLURM_JOB_ID": "424242",
    "SLURM_JOB_NAME": "bash",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NTASKS": "1",
    "SLURM_NNODES": "1",
    "SLURM_NODELIST": "localhost",
}
# Variables a launcher (Lightning's, torchrun, pixelmill's rank 0) sets on the processes it starts.
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "PIXELMILL_RUN_DIR")


def _outside_any_launcher() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "LSB_", "JSM_"))}


def test_two_ranks_in_an_interactive_slurm_job_make_one_run(digits_root, tmp_path):
    runs = tmp_path / "runs"
    args = fast_train_overrides(
        digits_root, runs, "experiment=salloc", "model.name=small_cnn_gn", "data.batch_size=16", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "eval.splits=[]", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", epochs=1,
    )
    out = subprocess.run(
        [sys.executable, "-m", "pixelmill.cli", "train", *args], cwd=tmp_path, env={**_outside_any_launcher(), **INTERACTIVE_SLURM},
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]

    made = sorted(p.name for p in (runs / "salloc").iterdir())
    assert len(made) == 1, f"one run directory for both ranks, found {made}"
    run_dir = runs / "salloc" / made[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_completed"] == 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


SRUN_BATCH = {**INTERACTIVE_SLURM, "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}


@pytest.mark.parametrize(
    ("env", "rank0"),
    [
        pytest.param({}, True, id="one process"),
        pytest.param({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False, id="lightning launcher, second rank"),
        pytest.param({"NODE_RANK": "1"}, False, id="lightning launcher, first process of the second machine"),
        pytest.param(INTERACTIVE_SLURM, True, id="interactive slurm, the shell's process"),
        pytest.param({**INTERACTIVE_SLURM, "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False, id="interactive slurm, rank lightning started"),
        pytest.param({**INTERACTIVE_SLURM, "SLURM_JOB_NAME": "interactive", "LOCAL_RANK": "1"}, False, id="srun --job-name=interactive"),
        pytest.param({**SRUN_BATCH, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}, False, id="srun task 1"),
        pytest.param({**SRUN_BATCH, "SLURM_PROCID": "0", "LOCAL_RANK": "1"}, True, id="srun task 0 (slurm numbers the ranks)"),
        pytest.param({**SRUN_BATCH, "TORCHELASTIC_RUN_ID": "x", "RANK": "3", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, False, id="torchrun inside slurm"),
        pytest.param({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, True, id="torchrun rank 0"),
    ],
)
def test_rank_zero_is_the_process_lightning_numbers_zero(monkeypatch, env, rank0):
    for name in os.environ.keys() - _outside_any_launcher().keys():
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_global_zero() is rank0
