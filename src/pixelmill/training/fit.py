"""``train(cfg)`` and ``resume(run_dir)``: from a config to a finished, evaluated run directory."""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from pixelmill import runs
from pixelmill.config import flatten, load_saved, parse_override, to_yaml, validate
from pixelmill.errors import ConfigError, DataError, RunError
from pixelmill.tasks import Task, task_for_config
from pixelmill.tracking import check_trackers

log = logging.getLogger(__name__)

# Rank 0 tells the ranks it launches (Lightning DDP) which run directory they belong to.
RUN_DIR_ENV = "PIXELMILL_RUN_DIR"

# Keys a resume may change: it continues the same experiment, only longer or quieter (or with another DDP timeout).
RESUMABLE_OVERRIDES = ("trainer.max_epochs", "trainer.progress_bar", "trainer.early_stopping_patience", "data.num_workers", "trainer.ddp_timeout_s")


@dataclass
class RunResult:
    """What a finished ``train`` or ``resume`` hands back."""

    run_dir: Path
    status: str
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, Any] | None = None


def _new_run_dir(cfg: DictConfig) -> Path:
    name = cfg.run_name or runs.default_run_name()
    run_dir = Path(cfg.output_dir) / cfg.experiment / name
    if (run_dir / runs.CONFIG).exists():
        raise RunError(f"run '{run_dir}' exists already; continue it with resume={run_dir} or pick another run_name")
    try:
        (run_dir / runs.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"cannot write the run directory '{run_dir}' ({exc.strerror}); set output_dir to a writable folder") from None
    return run_dir


def train(cfg: DictConfig, callbacks: list | None = None) -> RunResult:
    """Train a classifier from ``cfg`` into a new run directory (or resume one with ``cfg.resume``).

    ``callbacks`` are extra Lightning callbacks (hyper-parameter search adds a pruning one).
    """
    if cfg.resume:
        return resume(cfg.resume)
    if not cfg.run_name and _launched_per_rank():
        # Every rank fails here, rank 0 too: were rank 0 alone to go on, it would wait for the others until the DDP timeout.
        raise ConfigError("a run started by torchrun or SLURM needs run_name=NAME, the same on every node, so that every rank uses one run directory")
    from lightning import seed_everything

    from pixelmill.models.factory import resolve_model_name
    from pixelmill.training.finders import find_settings
    from pixelmill.training.recipe import prepare_net

    started = time.time()
    early = _EarlyLog()
    with early:  # what is logged before the run directory exists goes to its train.log too
        task = task_for_config(cfg)
        resolve_model_name(cfg.model.name)  # an unknown model fails before the data is scanned
        task.check_model(cfg)
        scan = task.load_data(cfg)
        task.check_data(cfg, scan)  # what evaluation needs from the data fails now, not after training
        seed_everything(cfg.seed, workers=True, verbose=False)  # the initial weights depend on it
        net, prep = task.new_model(cfg, scan)
        prepare_net(cfg, net)
        tuned = find_settings(cfg, task, scan, net, prep, _distributed(cfg))  # data.batch_size=auto, optim.lr=auto
        rank0 = is_global_zero()
        if rank0:
            check_trackers(cfg)
            run_dir = _new_run_dir(cfg)
    if not rank0:
        return _fit(cfg, task, _shared_run_dir(cfg), scan, net, prep, ckpt_path=None, extra_callbacks=callbacks)
    early.write(run_dir)
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    runs.write_atomic(run_dir / runs.CONFIG, to_yaml(cfg))
    task.save_preprocessing(run_dir, prep)
    runs.write_splits(run_dir, scan)
    runs.update_summary(
        run_dir,
        run_name=run_dir.name,
        experiment=cfg.experiment,
        model=cfg.model.name,
        task=task.name,
        status="created",
        created_at=runs.now_iso(),
        classes=scan.classes,
        preprocessing=prep.to_dict(),
        data=scan.to_summary(),
        versions=runs.versions("torch", "lightning", "timm"),
        durations={"scan_s": round(time.time() - started, 3)},
        tuned=tuned,
    )
    return _fit(cfg, task, run_dir, scan, net, prep, ckpt_path=None, extra_callbacks=callbacks)


def resume(run_dir: str | Path, overrides: Iterable[str] = ()) -> RunResult:
    """Continue a stopped run from ``checkpoints/last.ckpt`` in the same run directory."""
    from pixelmill.training.recipe import prepare_net

    run_dir = runs.resolve_run_dir(run_dir)
    cfg = load_saved(run_dir / runs.CONFIG)
    for key, value in (parse_override(o) for o in overrides):
        if key not in RESUMABLE_OVERRIDES:
            raise ConfigError(f"'{key}' cannot change on resume (only {', '.join(RESUMABLE_OVERRIDES)}); start a new run instead")
        OmegaConf.update(cfg, key, value)
    validate(cfg)
    ckpt = runs.checkpoint_path(run_dir, "last")
    summary = runs.load_summary(run_dir)
    task = task_for_config(cfg)
    scan = task.load_data(cfg, run_dir)
    if scan.fingerprint != summary.fingerprint:
        log.warning("the data under %s changed since this run started; resuming on the files as they are now", cfg.data.path)
    if scan.classes != summary.classes:
        raise DataError(f"the classes changed since this run started ({summary.classes} -> {scan.classes}); start a new run")
    net, prep = task.saved_model(cfg, summary, run_dir)
    prepare_net(cfg, net)
    if is_global_zero():
        from pixelmill.training.checkpoint import remove_partial_saves

        runs.write_atomic(run_dir / runs.CONFIG, to_yaml(cfg))
        for partial in remove_partial_saves(run_dir / runs.CHECKPOINTS):
            log.info("removed %s, a checkpoint save the stopped run did not finish", partial.name)
    log.info("resuming %s from %s", run_dir, ckpt)
    return _fit(cfg, task, run_dir, scan, net, prep, ckpt_path=ckpt)


def _callbacks(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from pixelmill.training.averaging import averaging_callbacks
    from pixelmill.training.callbacks import EpochProgressBar, GracefulStop, RunHistory
    from pixelmill.training.checkpoint import LastCheckpoint

    t = cfg.trainer
    best = ModelCheckpoint(
        dirpath=run_dir / runs.CHECKPOINTS,
        filename="best",
        monitor=t.monitor,
        mode=t.mode,
        save_top_k=1,
        save_on_train_epoch_end=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # Lightning's save_last only follows a top-k save; resume needs every epoch.
    last = LastCheckpoint(best, dirpath=run_dir / runs.CHECKPOINTS, filename="last", save_on_train_epoch_end=True, enable_version_counter=False)
    callbacks: list = [RunHistory(run_dir), GracefulStop(), best, last]
    callbacks += averaging_callbacks(cfg)  # model.ema / trainer.swa: validated, checkpointed and evaluated as the average
    if t.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor=t.monitor, mode=t.mode, patience=t.early_stopping_patience, check_on_train_epoch_end=True))
    if t.progress_bar:
        callbacks.append(EpochProgressBar(t.monitor, leave=True))
    return callbacks


def _trainer(cfg: DictConfig, run_dir: Path, callbacks: list, loggers: list):
    import lightning as L
    import torch

    from pixelmill.training.checkpoint import AtomicCheckpointIO

    t = cfg.trainer
    if t.sync_batchnorm and (t.accelerator == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs (PyTorch's SyncBatchNorm does not run on CPU); set it to false")
    return L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=_strategy(t),
        num_nodes=t.num_nodes,
        sync_batchnorm=t.sync_batchnorm,
        # SeededSampler shards itself per rank, keeping the global batch order of one process.
        use_distributed_sampler=False,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None,
        deterministic=t.deterministic,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        logger=loggers or False,
        callbacks=callbacks,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
    )


def _strategy(t: DictConfig):
    """``trainer.strategy``, built with ``trainer.ddp_timeout_s`` when it is a strategy that takes a timeout (ddp*, fsdp*, deepspeed*)."""
    import inspect
    from datetime import timedelta

    from lightning.pytorch.strategies import StrategyRegistry

    if t.strategy not in StrategyRegistry:  # auto, or a name Lightning reports itself
        return t.strategy
    entry = StrategyRegistry[t.strategy]
    if "timeout" not in inspect.signature(entry["strategy"]).parameters:
        return t.strategy
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=t.ddp_timeout_s))


_LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


class _Capture:
    """One handler on every path a library's log records take: the root logger, plus the loggers
    that keep their records to themselves (``propagate = False``, as Lightning's do when it is
    imported before logging is set up). Python warnings are routed to logging meanwhile, so
    third-party warnings land here too; the CLI keeps them off the terminal unless --verbose.
    """

    OWN = ("pixelmill", "lightning.pytorch", "lightning.fabric")

    def __init__(self, handler: logging.Handler):
        self.handler = handler
        self.loggers: list[logging.Logger] = []
        self.captured_warnings = False

    def __enter__(self):
        names = [n for n in self.OWN if not logging.getLogger(n).propagate]
        self.loggers = [logging.getLogger(), *(logging.getLogger(n) for n in names)]
        for logger in self.loggers:
            logger.addHandler(self.handler)
        for name in self.OWN:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET or logger.level > logging.INFO:
                logger.setLevel(logging.INFO)
        self.captured_warnings = getattr(warnings.showwarning, "__module__", "") != "logging"
        if self.captured_warnings:
            logging.captureWarnings(True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.captured_warnings:
            logging.captureWarnings(False)
        for logger in self.loggers:
            logger.removeHandler(self.handler)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _EarlyLog(_Capture):
    """Keep the records logged before the run directory exists (scan, model, tracker checks) for its ``train.log``."""

    def __init__(self) -> None:
        super().__init__(_Collect())

    def write(self, run_dir: Path) -> None:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(_LOG_FORMAT)
        for record in self.handler.records:
            handler.handle(record)
        handler.close()


class _RunLog(_Capture):
    """Every log record and warning of the run's duration, pixelmill's and the libraries', into ``train.log``."""

    def __init__(self, run_dir: Path):
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(_LOG_FORMAT)
        super().__init__(handler)

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.handler.close()


def is_global_zero() -> bool:
    """Whether this process is rank 0 of the run Lightning is about to start (True when not distributed).

    Asked before the Trainer exists (rank 0 alone creates the run directory), so it asks the cluster
    environment the Trainer will pick instead of reading rank variables in an order of its own: an
    interactive SLURM shell (job named bash or interactive) keeps ``SLURM_PROCID=0`` in every
    process started in it, while Lightning launches and numbers the ranks itself there.
    """
    from lightning.fabric.plugins.environments import LightningEnvironment

    env = _cluster_environment()
    if isinstance(env, LightningEnvironment):
        # Lightning's own launcher sets LOCAL_RANK (and NODE_RANK) on each rank it starts; the strategy
        # numbers them node_rank * devices + local_rank once the Trainer exists, so rank 0 is (0, 0).
        return env.node_rank() == 0 and env.local_rank() == 0
    return env.global_rank() == 0


def _cluster_environment():
    """The cluster environment Lightning's Trainer detects, tried in the Trainer's order (torchrun may run inside SLURM).

    Lightning keeps this choice in a private method of its accelerator connector, so the order is
    repeated here (lightning/pytorch/trainer/connectors/accelerator_connector.py).
    """
    from lightning.fabric.plugins.environments import LightningEnvironment, LSFEnvironment, MPIEnvironment, SLURMEnvironment, TorchElasticEnvironment

    for env_type in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if env_type.detect():
            return env_type()
    return LightningEnvironment()


def _launched_per_rank() -> bool:
    """Whether a launcher (torchrun, srun) started every rank of a distributed run, rather than Lightning from rank 0."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    env = _cluster_environment()
    return not isinstance(env, LightningEnvironment) and env.world_size() > 1


def _shared_run_dir(cfg: DictConfig) -> Path:
    """The run directory that rank 0 of this distributed run writes (other ranks write nothing)."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if cfg.run_name:  # torchrun / SLURM: every rank was started with the same run_name
        return Path(cfg.output_dir) / cfg.experiment / cfg.run_name
    raise ConfigError("a run started by torchrun or SLURM needs run_name=NAME so that every rank uses one run directory")


def _distributed(cfg: DictConfig) -> bool:
    t = cfg.trainer
    return "ddp" in str(t.strategy) or t.num_nodes > 1 or str(t.devices) not in ("1", "auto") or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _fit(
    cfg: DictConfig, task: Task, run_dir: Path, scan, net, prep, ckpt_path: Path | None, extra_callbacks: list | None = None
) -> RunResult:
    """Fit, then (rank 0 only) evaluate, report and close the trackers. Only rank 0 writes."""
    import lightning as L

    from pixelmill import tracking

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    rank0 = is_global_zero()
    summary = runs.load_summary(run_dir)
    with _RunLog(run_dir) if rank0 else nullcontext():
        loggers = tracking.build_loggers(cfg, run_dir, run_dir.name, summary.trackers) if rank0 else []
        if rank0 and ckpt_path is None:  # a resumed run has its params and tags already
            tags = tracking.run_tags(summary.fingerprint, summary.versions)
            tracking.log_start(loggers, flatten(cfg), tags)
        callbacks = _callbacks(cfg, run_dir) + list(extra_callbacks or [])
        trainer = _trainer(cfg, run_dir, callbacks, loggers)
        datamodule = task.datamodule(cfg, scan, prep)
        if rank0:
            runs.update_summary(run_dir, status="running", pid=os.getpid(), started_at=runs.now_iso(), trackers=tracking.tracker_ids(loggers))
        fit_start = time.time()
        history, stopper = callbacks[0], callbacks[1]
        if not _distributed(cfg):
            stopper.install()  # from now on; Lightning's SIGTERM handling would stop mid-epoch
        try:
            trainer.fit(task.lightning_module(cfg, net, scan), datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except BaseException as exc:
            # Ctrl+C twice (Lightning exits with SystemExit) is an interruption, not a failure.
            status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
            if rank0:
                runs.update_summary(run_dir, status=status, error=f"{type(exc).__name__}: {exc}"[:500], pid=None)
                tracking.finish(loggers, status)
            if status == "failed" and _lost_peer(exc):
                raise RunError(
                    f"the distributed run lost a process ({_first_sentence(exc)}): a node died, hung or lost its network;"
                    f" once every node is up, continue with 'pixelmill train resume={run_dir}' on every node, launched as before"
                ) from exc
            raise
        finally:
            stopper.uninstall()
        done = len(history.rows) >= cfg.trainer.max_epochs
        status = "interrupted" if trainer.interrupted or (stopper.requested and not done) else "finished"
        best = history.best(cfg.trainer.monitor, cfg.trainer.mode)
        result = RunResult(run_dir, status, int(best["epoch"]) if best else None, best or {})
        if rank0 and trainer.is_global_zero:
            result.test_metrics = _finish_run(cfg, task, run_dir, scan, net, prep, result, time.time() - fit_start, loggers)
    return result


def _lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` says another process of the distributed run stopped answering (died, hung past the timeout, unreachable).

    NCCL raises ``torch.distributed.DistError``; gloo a plain RuntimeError from its transport layer
    ("[.../gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:740: Connection reset by peer. ...",
    "[.../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 60000ms for recv operation to complete"),
    or, on a process whose peer timed out first, the bare signal gloo sends to every pair of its
    context ("Application timeout caused pair closure") and the peer's next send ("Connection closed by peer").
    """
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in _GLOO_LOST_PEER))


# What gloo's RuntimeErrors say when a peer is gone (see _lost_peer).
_GLOO_LOST_PEER = ("gloo/transport", "Application timeout caused pair closure", "Connection closed by peer")


def _first_sentence(exc: BaseException) -> str:
    """The library's message without its source location, up to the first full stop: ``Read error [10.0.0.2]:740: Connection reset by peer``."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())
    return text.split(". ")[0].split("\n")[0].rstrip(".")


def _finish_run(cfg: DictConfig, task: Task, run_dir: Path, scan, net, prep, result: RunResult, fit_s: float, loggers: list):
    """Summary, final evaluation, report and tracker artifacts for a run that stopped cleanly."""
    from pixelmill import tracking
    from pixelmill.evaluation.report import write_report

    summary = runs.load_summary(run_dir)
    if result.status == "interrupted":
        log.warning("stopped after %d epoch(s); continue with: pixelmill train resume=%s", summary.epochs_completed, run_dir)
    durations = {**summary.durations, "fit_s": round(fit_s, 3)}
    best = result.best_metrics
    runs.update_summary(run_dir, best={"epoch": result.best_epoch, "metrics": best} if best else None, durations=durations)
    test_metrics = _evaluate_after_fit(cfg, task, run_dir, scan, net, prep) if result.status == "finished" else None
    runs.update_summary(run_dir, status=result.status, finished_at=runs.now_iso(), pid=None)
    write_report(run_dir)
    tracking.log_artifacts(loggers, run_dir)
    tracking.finish(loggers, result.status)
    return test_metrics


def _evaluate_after_fit(cfg: DictConfig, task: Task, run_dir: Path, scan, net, prep) -> dict[str, Any] | None:
    """Evaluate the best checkpoint on each split in ``eval.splits`` that has samples.

    Returns the test metrics (or those of the last split evaluated), None when nothing ran.
    """
    from pixelmill.training.checkpoint import load_net

    load_net(net, runs.checkpoint_path(run_dir, "best"))
    task.choose_operating_point(run_dir, net, scan, prep, cfg)  # on val, with the best weights
    splits = [s for s in cfg.eval.splits if scan.splits.get(s)]
    if not splits and "test" in cfg.eval.splits and scan.splits.get("val"):
        # A train/val-only dataset still gets figures, with the caveat stated.
        log.warning("no test split: evaluated val instead; it also chose the best epoch, so its figures are optimistic (add test data or set data.test_ratio)")
        splits = ["val"]
    if not splits:
        log.info("no split to evaluate (eval.splits=%s)", list(cfg.eval.splits))
        return None
    results = {s: task.evaluate(run_dir, net, scan, prep, s, cfg) for s in splits}
    return results.get("test", results[splits[-1]])
