"""Hyper-parameter search as a user meets it: real Optuna studies in SQLite, real trainings on digits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from helpers import assert_two_workers_open_one_new_study, fast_train_overrides
from pixelmill.config import load_config
from pixelmill.errors import ConfigError
from pixelmill.tuning import PARENT_ATTR, load_space, tune

PIXELMILL = [sys.executable, "-m", "pixelmill.cli"]
ENV = {**os.environ, "COLUMNS": "200"}
SPACE = "optim.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}\noptim.name: {type: categorical, choices: [adamw, sgd]}\n"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _overrides(digits_root: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    """The tiniest real training: 2 batches of 32 digits per epoch, no final evaluation."""
    return fast_train_overrides(digits_root, out, "trainer.limit_train_batches=2", "eval.splits=[]", *extra, epochs=epochs)


def _study(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / name / 'study.db'}")


def _space(tmp_path: Path, text: str = SPACE) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_three_trial_study_writes_runs_study_best_config_and_plots(digits_root, tmp_path):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from pixelmill.cli import app

    out = tmp_path / "runs"
    mlflow_uri = f"sqlite:///{tmp_path}/mlruns.db"
    args = _overrides(digits_root, out, "logger=[csv,mlflow]", f"tracking.mlflow.uri={mlflow_uri}",
                      f"tracking.mlflow.artifact_location={tmp_path}/mlartifacts")
    result = CliRunner().invoke(app, ["tune", "--space", str(_space(tmp_path)), "--trials", "3", "--study", "s", *args])
    assert result.exit_code == 0, result.output

    study = _study(out, "s")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for t in study.trials:
        assert (out / "s" / f"trial-{t.number}" / "config.yaml").is_file()
        assert t.user_attrs["run_dir"] == str((out / "s" / f"trial-{t.number}").resolve())
    best_yaml = out / "s" / "best.yaml"
    cfg = load_config([], best_yaml)  # what `pixelmill train --config best.yaml` does
    assert cfg.optim.lr == pytest.approx(study.best_params["optim.lr"]) and cfg.optim.name == study.best_params["optim.name"]
    assert cfg.run_name is None and cfg.resume is None and cfg.data.path == str(digits_root)
    assert (out / "s" / "history.png").stat().st_size > 0 and (out / "s" / "importance.png").stat().st_size > 0
    assert "best config" in result.output and str(best_yaml) in result.output.replace("\n", "")
    assert all(f"trial-{n}" in result.output for n in range(3))

    client = MlflowClient(tracking_uri=mlflow_uri)
    parent_id = study.user_attrs[PARENT_ATTR]
    children = client.search_runs([client.get_experiment_by_name("s").experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1", "trial-2"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert "best.yaml" in [a.path for a in client.list_artifacts(parent_id)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim.lrr: {type: float, low: 0.001, high: 0.1}\n", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("optim.lr: {type: gaussian, low: 0.001, high: 0.1}\n", "unknown type 'gaussian'; choose one of: float, int, categorical"),
        ("optim.lr: {type: float, high: 0.1}\n", "'low' must be a number, got None"),
        ("data.batch_size: {type: int, low: 16, hihg: 64}\n", "unknown field 'hihg' for type int"),
        ("optim.name: {type: categorical, choices: [adamw, adamx]}\n", "bad value 'adamx' for 'optim.name'"),
        ("optim.lr: {type: float, low: 0.0, high: 0.1}\n", "bad value 0.0 for 'optim.lr'"),
        ("run_name: {type: categorical, choices: [a, b]}\n", "'run_name' is set by tune itself"),
    ],
)
def test_bad_space_file_is_one_config_error(digits_root, tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load_space(_space(tmp_path, text), _overrides(digits_root, tmp_path / "runs"))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_bad_space_file_exits_2_with_one_line(digits_root, tmp_path):
    space = _space(tmp_path, "optim.lrr: {type: float, low: 0.001, high: 0.1}\n")
    out = subprocess.run(PIXELMILL + ["tune", "--space", str(space), "--trials", "2", f"data.path={digits_root}"],
                         capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert out.returncode == 2
    assert "optim.lrr" in out.stderr and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_hopeless_trial_is_pruned_and_stops_training(digits_root, tmp_path):
    """Two good trials, then lr=1e-9 over more epochs: worse than their median at epoch 1, so it stops there."""
    out, space = tmp_path / "runs", "optim.lr: {type: categorical, choices: [0.01, 1.0e-9]}\ntrainer.max_epochs: {type: int, low: 2, high: 4}\n"
    (out / "p").mkdir(parents=True)
    study = optuna.create_study(study_name="p", storage=f"sqlite:///{out / 'p' / 'study.db'}", direction="minimize")
    for lr, epochs in ((0.01, 2), (0.01, 2), (1e-9, 4)):
        study.enqueue_trial({"optim.lr": lr, "trainer.max_epochs": epochs})
    args = _overrides(digits_root, out, "trainer.monitor=val/loss", "trainer.mode=min")
    result = tune(_space(tmp_path, space), 3, args, study_name="p", startup_trials=2, warmup_epochs=1)

    assert [r["state"] for r in result.trials] == ["complete", "complete", "pruned"]
    pruned = _study(out, "p").trials[2]
    assert sorted(pruned.intermediate_values) == [0, 1]  # reported each epoch, pruned after the warm-up epoch
    summary = json.loads((out / "p" / "trial-2" / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["status"] == "finished"  # stopped cleanly, 2 of 4 epochs
    assert summary["tuning"] == {"study": "p", "trial": 2, "state": "pruned"}
    assert result.best is not None and result.best["params"]["optim.lr"] == 0.01


def _tune_cmd(digits_root: Path, tmp_path: Path, study: str, trials: int, epochs: int = 1) -> list[str]:
    args = _overrides(digits_root, tmp_path / "runs", epochs=epochs)
    return PIXELMILL + ["tune", "--space", str(_space(tmp_path)), "--trials", str(trials), "--study", study, *args]


def test_workers_started_together_on_a_new_database_both_open_the_study(tmp_path):
    """Both race to create the tables and the schema stamp; neither may fail with 'already exists'."""
    for attempt in range(3):  # one round fails 13 times in 15 without the retry
        assert_two_workers_open_one_new_study(f"sqlite:///{tmp_path / f'study{attempt}.db'}")


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study_without_overshooting(digits_root, tmp_path):
    cmd = _tune_cmd(digits_root, tmp_path, "w", 4)
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    workers = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=ENV) for log in logs]
    codes = [w.wait(timeout=600) for w in workers]
    assert codes == [0, 0], [(tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(2)]

    study = _study(tmp_path / "runs", "w")
    finished = [t for t in study.trials if t.state in FINISHED]
    assert len(finished) == 4
    numbers = [t.number for t in finished]
    assert len(set(numbers)) == 4
    # Usually both workers run trials; on a loaded machine one may finish the study before the other has imported torch.
    assert {t.user_attrs["worker"]["pid"] for t in finished} <= {w.pid for w in workers}
    for t in finished:
        summary = json.loads((tmp_path / "runs" / "w" / f"trial-{t.number}" / "summary.json").read_text())
        assert summary["tuning"]["trial"] == t.number and summary["status"] == "finished"
    assert (tmp_path / "runs" / "w" / "best.yaml").is_file()


@pytest.mark.slow
def test_killed_worker_leaves_a_study_that_a_rerun_completes(digits_root, tmp_path):
    cmd = _tune_cmd(digits_root, tmp_path, "k", 2, epochs=2)
    worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=ENV)
    summary = tmp_path / "runs" / "k" / "trial-0" / "summary.json"
    deadline = time.time() + 300
    while not (summary.is_file() and json.loads(summary.read_text()).get("status") == "running"):
        assert worker.poll() is None and time.time() < deadline, "the worker never started training"
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)  # mid-trial: no chance to clean up
    worker.wait()
    assert _study(tmp_path / "runs", "k").trials[0].state == optuna.trial.TrialState.RUNNING

    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = _study(tmp_path / "runs", "k").trials
    killed, finished = trials[0], [t for t in trials if t.state in FINISHED]
    assert killed.state == optuna.trial.TrialState.FAIL and len(finished) == 2
    retry = next(t for t in finished if t.system_attrs.get("failed_trial") == 0)
    assert retry.params == killed.params  # the killed trial's parameters were tried again
    assert all((tmp_path / "runs" / "k" / f"trial-{t.number}" / "config.yaml").is_file() for t in finished)
    assert yaml.safe_load((tmp_path / "runs" / "k" / "best.yaml").read_text().split("\n", 1)[1])["run_name"] is None


def test_trials_running_on_other_workers_count_towards_the_total(digits_root, tmp_path):
    """A worker that joins when the rest of the total is already in flight elsewhere starts no trial."""
    out = tmp_path / "runs"
    (out / "f").mkdir(parents=True)
    study = optuna.create_study(study_name="f", storage=f"sqlite:///{out / 'f' / 'study.db'}", direction="maximize")
    space = load_space(_space(tmp_path), _overrides(digits_root, out))
    study.add_trial(optuna.trial.create_trial(params={"optim.lr": 0.01, "optim.name": "sgd"}, distributions=space, value=0.5))
    running = study.ask()  # another live worker's trial (this process: alive, so never reaped)
    running.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "trial": running.number})

    result = tune(_space(tmp_path), 2, _overrides(digits_root, out), study_name="f")
    assert [r["state"] for r in result.trials] == ["complete", "running"]
    assert not (out / "f" / "trial-1").exists()
    best = load_config([], result.best_config)  # composed from the base config: the trial was added by hand
    assert best.optim.lr == 0.01 and best.optim.name == "sgd" and best.experiment == "f"
