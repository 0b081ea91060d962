"""``pixelmill tune`` workers sharing one study in a real PostgreSQL database, as on several machines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from helpers import assert_two_workers_open_one_new_study, fast_train_overrides

PIXELMILL = [sys.executable, "-m", "pixelmill.cli"]
ENV = {**os.environ, "COLUMNS": "200"}
SPACE = "optim.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}\noptim.name: {type: categorical, choices: [adamw, sgd]}\n"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _tune_cmd(digits_root: Path, tmp_path: Path, storage: str, study: str, trials: int, *options: str, epochs: int = 1) -> list[str]:
    """``pixelmill tune --storage postgresql://... --study NAME`` over the tiniest real trainings (2 batches an epoch)."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    args = fast_train_overrides(digits_root, tmp_path / "runs", "trainer.limit_train_batches=2", "eval.splits=[]", epochs=epochs)
    return [*PIXELMILL, "tune", "--space", str(space), "--trials", str(trials), "--storage", storage, "--study", study, *options, *args]


def _trials(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def test_workers_started_together_on_a_new_postgres_database_both_open_the_study(postgres):
    """Both race to create the tables in one empty database; neither may fail."""
    for attempt in range(3):
        assert_two_workers_open_one_new_study(postgres.database(f"race{attempt}"))


@pytest.mark.slow
def test_two_workers_share_one_postgres_study_without_overshooting(postgres, digits_root, tmp_path):
    storage = postgres.database("two_workers")
    cmd = _tune_cmd(digits_root, tmp_path, storage, "w", 4)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = []
    try:
        for log in logs:
            with open(log, "wb") as out:
                workers.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=ENV, start_new_session=True))
        codes = [w.wait(timeout=600) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait()
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]

    trials = _trials(storage, "w")
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 4 and len({t.number for t in finished}) == 4
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert {t.user_attrs["worker"]["pid"] for t in finished} <= {w.pid for w in workers}
    for t in finished:
        summary = json.loads((tmp_path / "runs" / "w" / f"trial-{t.number}" / "summary.json").read_text())
        assert summary["tuning"]["trial"] == t.number and summary["status"] == "finished"
    assert (tmp_path / "runs" / "w" / "best.yaml").is_file()
    assert not (tmp_path / "runs" / "w" / "study.db").exists(), "the study lives in PostgreSQL, not in a SQLite file"


def _other_host(cmd: list[str]) -> list[str]:
    """``cmd`` in its own UTS namespace named other-machine: to pixelmill it runs on another machine."""
    return ["unshare", "--uts", "sh", "-c", 'hostname other-machine && exec "$@"', "sh", *cmd]


@pytest.mark.slow
@pytest.mark.parametrize("rerun_on", ["same machine", "other machine"])
def test_killed_worker_leaves_a_postgres_study_that_a_rerun_completes(postgres, digits_root, tmp_path, rerun_on):
    """SIGKILL mid-trial; the rerun fails the orphaned trial and tries its parameters again.

    On the same machine the rerun sees the worker's process is gone. From another machine it
    cannot: there the trial is failed once its heartbeats stop (``--heartbeat 1``: silent for 2 s).
    """
    if rerun_on == "other machine" and (shutil.which("unshare") is None or subprocess.run(["unshare", "--uts", "true"], check=False).returncode):
        pytest.skip("needs `unshare --uts` (root, util-linux) to give the rerun another host name")
    storage = postgres.database("killed_" + rerun_on.split()[0])
    cmd = _tune_cmd(digits_root, tmp_path, storage, "k", 2, epochs=2)
    worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=ENV, start_new_session=True)
    summary = tmp_path / "runs" / "k" / "trial-0" / "summary.json"
    try:
        deadline = time.monotonic() + 300
        while not (summary.is_file() and json.loads(summary.read_text()).get("status") == "running"):
            assert worker.poll() is None and time.monotonic() < deadline, "the worker never started training"
            time.sleep(0.2)
        os.killpg(worker.pid, signal.SIGKILL)  # mid-trial: no chance to clean up
        worker.wait()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    assert [t.state for t in _trials(storage, "k")] == [optuna.trial.TrialState.RUNNING]

    rerun_cmd = _other_host([*cmd, "--heartbeat", "1"]) if rerun_on == "other machine" else cmd
    rerun = subprocess.run(rerun_cmd, capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=600, start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    trials = _trials(storage, "k")
    killed, finished = trials[0], [t for t in trials if t.state in FINISHED]
    assert killed.state == optuna.trial.TrialState.FAIL and len(finished) == 2
    retry = next(t for t in finished if t.system_attrs.get("failed_trial") == 0)
    assert retry.params == killed.params  # the killed trial's parameters were tried again
    if rerun_on == "other machine":
        assert {t.user_attrs["worker"]["host"] for t in finished} == {"other-machine"}
    assert all((tmp_path / "runs" / "k" / f"trial-{t.number}" / "config.yaml").is_file() for t in finished)
