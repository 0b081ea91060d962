"""Experiment trackers: Lightning's CSV, TensorBoard, MLflow and W&B loggers, fed alike.

Every tracker gets the same things under the same names: the flattened config as params,
the run's tags, one row of metrics per finished epoch (step = epoch), and the run
directory's files as artifacts. Epoch rows reach the trackers from ``RunHistory`` only
after that epoch's checkpoint exists, so a killed and resumed run has no gap and no
repeated step in any tracker.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterable

from lightning.pytorch.loggers import Logger

from pixelmill.config.schema import LOGGERS
from pixelmill.errors import ConfigError
from pixelmill.model_registry import is_tracking_server

log = logging.getLogger(__name__)

# Files of a run directory that trackers keep as artifacts (when they exist).
ARTIFACTS = ("config.yaml", "summary.json", "metrics.csv", "report.html", "schema.json", "eval", "plots", "checkpoints/best.ckpt", "bundle")


def _quick_mlflow_http() -> None:
    # An unreachable server must fail in seconds, not after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


# Loggers MLflow gives a stderr handler of its own when it is imported (and stops from propagating).
_MLFLOW_LOGGERS = ("mlflow", "alembic", "sqlalchemy.engine", "huey")


def _route_mlflow_logs() -> None:
    """Send MLflow's log records ("Creating initial MLflow database tables...") where pixelmill's go.

    MLflow prints them to stderr itself; without its handler they reach the handlers pixelmill
    set up: ``train.log`` always, the terminal only with ``pixelmill train --verbose``.
    """
    for name in _MLFLOW_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if isinstance(h, logging.FileHandler) or not isinstance(h, logging.StreamHandler)]
        logger.propagate = True


def artifact_uri(location: str | None, tracking_uri: str | None = None) -> str | None:
    """``tracking.mlflow.artifact_location`` as a URI for a new experiment; None lets the store choose.

    A tracking server (http(s)://) chooses itself (its ``--artifacts-destination``): a plain local
    folder would put the run's files on the training machine, out of the server's reach.
    """
    if location and "://" not in location:
        return None if is_tracking_server(tracking_uri) else Path(location).resolve().as_uri()
    return location


def check_trackers(cfg) -> None:
    """Fail before any training when a chosen tracker cannot work (unreachable store, missing package)."""
    if "mlflow" in cfg.logger:
        _quick_mlflow_http()
        from mlflow.tracking import MlflowClient

        _route_mlflow_logs()
        uri = cfg.tracking.mlflow.uri
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"cannot reach the MLflow tracking store '{uri}' ({reason}); fix tracking.mlflow.uri or drop mlflow from logger"
            ) from None
    if "wandb" in cfg.logger:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logger 'wandb' needs the wandb package: pip install 'pixelmill[wandb]'") from None


def ensure_experiment(cfg, name: str) -> str:
    """The id of MLflow experiment ``name``, created if missing.

    Processes started together on a new experiment (trainings sharing a server, tuning workers,
    a parent and its first child run) race to create it: the losers take the winner's.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.mlflow.uri)
    if (found := client.get_experiment_by_name(name)) is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_uri(cfg.tracking.mlflow.artifact_location, cfg.tracking.mlflow.uri))
    except Exception:
        if (found := client.get_experiment_by_name(name)) is None:
            raise
        return found.experiment_id


def create_parent_run(cfg, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """A new MLflow run in ``experiment`` for runs to nest under (``tracking.mlflow.parent_run_id``): a study, a cross-validation."""
    from mlflow.tracking import MlflowClient

    experiment_id = ensure_experiment(cfg, experiment)
    return MlflowClient(tracking_uri=cfg.tracking.mlflow.uri).create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def log_to_parent_run(
    cfg, run_id: str, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None, files: Iterable[Path] = (), status: str | None = None
) -> None:
    """Metrics, tags and files to a parent run; ``status`` (FINISHED, FAILED, KILLED, RUNNING) sets its state."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.mlflow.uri)
    if metrics:  # one request for all (a cross-validation has a hundred figures)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    for path in files:
        client.log_artifact(run_id, str(path))
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    elif status:
        client.set_terminated(run_id, status)


def _csv(cfg, run_dir: Path, run_name: str, ids: dict[str, str]) -> Logger:
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(run_dir), name="csv", version="")


def _tensorboard(cfg, run_dir: Path, run_name: str, ids: dict[str, str]) -> Logger:
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)


def _mlflow(cfg, run_dir: Path, run_name: str, ids: dict[str, str]) -> Logger:
    import mlflow  # noqa: F401  (imported here so that its loggers are routed before the logger starts)
    from lightning.pytorch.loggers import MLFlowLogger

    _quick_mlflow_http()
    _route_mlflow_logs()
    ensure_experiment(cfg, cfg.experiment)  # Lightning's logger would fail on losing the race to create it
    logger = MLFlowLogger(
        experiment_name=cfg.experiment,
        run_name=run_name,
        tracking_uri=cfg.tracking.mlflow.uri,
        artifact_location=artifact_uri(cfg.tracking.mlflow.artifact_location, cfg.tracking.mlflow.uri),
        run_id=ids.get("mlflow"),
        tags={"mlflow.parentRunId": cfg.tracking.mlflow.parent_run_id} if cfg.tracking.mlflow.parent_run_id else None,
    )
    if ids.get("mlflow"):
        logger.experiment.update_run(ids["mlflow"], status="RUNNING")  # a resumed run is running again
    return logger


def _wandb(cfg, run_dir: Path, run_name: str, ids: dict[str, str]) -> Logger:
    from lightning.pytorch.loggers import WandbLogger

    mode = cfg.tracking.wandb.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return WandbLogger(
        project=cfg.tracking.wandb.project,
        name=run_name,
        save_dir=str(run_dir),
        id=ids.get("wandb"),
        resume="allow",
        mode=mode,
    )


_LOGGERS = {"csv": _csv, "tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}
assert set(_LOGGERS) == set(LOGGERS), "logger choices and _LOGGERS differ"


def build_loggers(cfg, run_dir: Path, run_name: str, ids: dict[str, str] | None = None) -> list[Logger]:
    """One Lightning logger per name in ``cfg.logger``; ``ids`` continues earlier tracker runs."""
    return [_LOGGERS[name](cfg, run_dir, run_name, ids or {}) for name in cfg.logger]


def tracker_ids(loggers: list[Logger]) -> dict[str, str]:
    """Run ids that a resume needs to continue the same tracker runs."""
    ids: dict[str, str] = {}
    for logger in loggers:
        name = type(logger).__name__
        if name == "MLFlowLogger":
            ids["mlflow"] = logger.run_id
        elif name == "WandbLogger":
            ids["wandb"] = logger.version
    return ids


def run_tags(fingerprint: str | None, versions: dict[str, str]) -> dict[str, str]:
    """Tags every tracker gets: git commit (when in a repository), data fingerprint, versions, host."""
    tags = {"data_fingerprint": fingerprint or "", "host": socket.gethostname(), "platform": platform.platform()}
    tags.update({f"version.{k}": v for k, v in versions.items()})
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def log_start(loggers: list[Logger], params: dict[str, Any], tags: dict[str, str]) -> None:
    """Params (the flattened config) and tags to every tracker."""
    for logger in loggers:
        logger.log_hyperparams({**params, **{f"tag.{k}": v for k, v in tags.items()}})
        name = type(logger).__name__
        if name == "MLFlowLogger":
            for key, value in tags.items():
                logger.experiment.set_tag(logger.run_id, key, value)
        elif name == "WandbLogger":
            logger.experiment.tags = tuple(sorted(set(logger.experiment.tags or ()) | {f"data:{tags.get('data_fingerprint', '')}"}))


def log_epoch(loggers: list[Logger], row: dict[str, float]) -> None:
    """One finished epoch's metrics to every tracker, with step = epoch."""
    step = int(row["epoch"])
    metrics = {k: v for k, v in row.items() if k not in ("epoch", "step")}
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


def log_artifacts(loggers: list[Logger], run_dir: Path) -> None:
    """The run directory's outputs to the trackers that store files (MLflow, W&B)."""
    present = [run_dir / name for name in ARTIFACTS if (run_dir / name).exists()]
    for logger in loggers:
        name = type(logger).__name__
        if name == "MLFlowLogger":
            client, run_id = logger.experiment, logger.run_id
            for path in present:
                parent = str(path.parent.relative_to(run_dir)) if path.parent != run_dir else None
                if path.is_dir():
                    client.log_artifacts(run_id, str(path), artifact_path=str(path.relative_to(run_dir)))
                else:
                    client.log_artifact(run_id, str(path), artifact_path=parent)
        elif name == "WandbLogger":
            import wandb

            artifact = wandb.Artifact(f"run-{run_dir.name}", type="pixelmill-run")
            for path in present:
                if path.is_dir():
                    artifact.add_dir(str(path), name=str(path.relative_to(run_dir)))
                else:
                    artifact.add_file(str(path), name=str(path.relative_to(run_dir)))
            logger.experiment.log_artifact(artifact)


def finish(loggers: list[Logger], status: str) -> None:
    """Close tracker runs with pixelmill's status (finished / failed / interrupted)."""
    # MLflow takes its own status names through; the others ignore the value.
    lightning_status = {"finished": "success", "failed": "failed", "interrupted": "KILLED"}.get(status, "success")
    for logger in loggers:
        if type(logger).__name__ == "MLFlowLogger":
            logger.experiment.set_tag(logger.run_id, "pixelmill.status", status)
        logger.finalize(lightning_status)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=0 if status == "finished" else 1)
