"""Lightning loggers from the config: CSV, TensorBoard, MLflow and Weights & Biases."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger

from pixelmill.errors import ConfigError

log = logging.getLogger(__name__)


def _csv(cfg, run_dir: Path, run_name: str, ids: dict[str, str]) -> Logger:
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(run_dir), name="csv", version="")


def _tensorboard(cfg, run_dir: Path, run_name: str, ids: dict[str, str]) -> Logger:
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)


def _mlflow(cfg, run_dir: Path, run_name: str, ids: dict[str, str]) -> Logger:
    from lightning.pytorch.loggers import MLFlowLogger

    uri = cfg.tracking.mlflow.uri
    artifacts = cfg.tracking.mlflow.artifact_location
    if artifacts and "://" not in artifacts:
        artifacts = Path(artifacts).resolve().as_uri()
    # An unreachable server must fail now, in seconds, not after training.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    logger = MLFlowLogger(
        experiment_name=cfg.experiment,
        run_name=run_name,
        tracking_uri=uri,
        artifact_location=artifacts,
        run_id=ids.get("mlflow"),
    )
    try:
        _ = logger.run_id
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot reach the MLflow tracking store '{uri}' ({reason}); fix tracking.mlflow.uri or drop mlflow from logger"
        ) from None
    return logger


def _wandb(cfg, run_dir: Path, run_name: str, ids: dict[str, str]) -> Logger:
    try:
        from lightning.pytorch.loggers import WandbLogger
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("logger 'wandb' needs the wandb package: pip install 'pixelmill[wandb]'") from None
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


def log_params(loggers: list[Logger], params: dict[str, Any]) -> None:
    for logger in loggers:
        logger.log_hyperparams(params)
