"""Hyper-parameter search: an Optuna study whose trials are ordinary pixelmill runs.

Trial ``n`` is ``train(cfg)`` into ``<output_dir>/<study>/trial-<n>/`` (experiment = study
name), nested under one MLflow parent run when mlflow is a logger. The study lives in an
RDB storage: a SQLite file in the study directory by default, PostgreSQL or MySQL when
``pixelmill tune`` processes on several machines share it. ``n_trials`` is the study's total
across workers; a killed worker's trial is failed and retried with the same parameters, so
running the command again continues the study.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import optuna
import yaml
from lightning.pytorch.callbacks import Callback
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from pixelmill import runs
from pixelmill.config import load_config, to_yaml
from pixelmill.errors import ConfigError, RunError

log = logging.getLogger(__name__)

# Keys tune sets itself: a space may not sample them.
RESERVED = ("experiment", "run_name", "resume", "output_dir", "trainer.monitor", "trainer.mode", "tracking.mlflow.parent_run_id")
PARENT_ATTR = "mlflow_parent_run_id"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
TAKEN = (*FINISHED, TrialState.RUNNING)  # what counts towards the total: in-flight trials of every worker too


class PruningCallback(Callback):
    """Report the monitored validation metric to the trial each epoch; stop training when Optuna prunes.

    It never raises inside Lightning: the run ends cleanly (checkpoints, summary, trackers) and
    the objective raises ``optuna.TrialPruned`` once ``train`` has returned.
    """

    def __init__(self, trial: optuna.Trial, monitor: str):
        self.trial = trial
        self.monitor = monitor
        self.pruned_at: int | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not trainer.is_global_zero:
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned_at = trainer.current_epoch
            trainer.should_stop = True


@dataclass
class TuneResult:
    """What ``tune`` hands back: the study's trials, its best trial, config and plots."""

    study_name: str
    study_dir: Path
    storage: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None = None
    best_config: Path | None = None
    plots: list[Path] = field(default_factory=list)


class _BudgetTaken(Exception):
    """This trial started after other workers had taken the study's whole total."""


@contextlib.contextmanager
def _quiet():
    """Optuna flags heartbeats, retries and its matplotlib plots as experimental on every use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _scalar(value: Any) -> str:
    """A value as YAML for a ``key=value`` override (``1e-05`` becomes ``1.0e-05``, which YAML reads as a float)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()[1:-1]


def _number(where: str, spec: dict, name: str, kind: type, default: Any = ...) -> Any:
    value = spec.get(name)
    if value is None and default is not ...:
        return default
    if kind is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ConfigError(f"{where}: '{name}' must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    return kind(value)


def _range(dist: type, kind: type, step: Any) -> Callable[[str, dict], BaseDistribution]:
    return lambda where, spec: dist(
        _number(where, spec, "low", kind), _number(where, spec, "high", kind), log=bool(spec.get("log")), step=_number(where, spec, "step", kind, step)
    )


def _categorical(where: str, spec: dict) -> BaseDistribution:
    if not isinstance(spec.get("choices"), list) or not spec["choices"]:
        raise ConfigError(f"{where}: 'choices' must be a non-empty list, like choices: [adamw, sgd]")
    return CategoricalDistribution(spec["choices"])


# type -> (accepted fields, builder)
SPACE_TYPES: dict[str, tuple[set[str], Callable[[str, dict], BaseDistribution]]] = {
    "float": ({"type", "low", "high", "log", "step"}, _range(FloatDistribution, float, None)),
    "int": ({"type", "low", "high", "log", "step"}, _range(IntDistribution, int, 1)),
    "categorical": ({"type", "choices"}, _categorical),
}


def load_space(path: str | Path, overrides: Iterable[str] = (), config_file: str | Path | None = None) -> dict[str, BaseDistribution]:
    """Read a search space (dotted config key -> distribution); ``load_config`` checks every bound and choice."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file '{path}' does not exist; pass --space PATH to a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"space file '{path}' is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"space file '{path}' must map config keys to distributions, like 'optim.lr: {{type: float, low: 1.0e-4, high: 0.1}}'")
    space: dict[str, BaseDistribution] = {}
    for key, spec in data.items():
        where = f"space file '{path}', key '{key}'"
        if key in RESERVED:
            raise ConfigError(f"{where}: '{key}' is set by tune itself and cannot be searched")
        if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
            raise ConfigError(f"{where}: unknown type {spec.get('type') if isinstance(spec, dict) else spec!r}; choose one of: {', '.join(SPACE_TYPES)}")
        fields, build = SPACE_TYPES[spec["type"]]
        if extra := sorted(set(spec) - fields):
            raise ConfigError(f"{where}: unknown field '{extra[0]}' for type {spec['type']}; valid fields: {', '.join(sorted(fields))}")
        try:
            space[key] = build(where, spec)
        except ValueError as exc:  # optuna's own checks: low > high, log with low <= 0, ...
            raise ConfigError(f"{where}: {str(exc).splitlines()[0]}") from None
        dist = space[key]
        for value in dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high):
            try:
                load_config([*overrides, f"{key}={_scalar(value)}"], config_file)
            except ConfigError as exc:
                raise ConfigError(f"space file '{path}': {exc}") from None
    return space


def _suggest(trial: optuna.Trial, key: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, list(dist.choices))
    suggest = trial.suggest_int if isinstance(dist, IntDistribution) else trial.suggest_float
    return suggest(key, dist.low, dist.high, step=dist.step, log=dist.log)


def _open_study(url: str, name: str, direction: str, pruner: optuna.pruners.BasePruner, heartbeat: int) -> tuple[optuna.Study, bool]:
    """Create the study or load it; also says whether this process created it. A trial silent for 2 heartbeats is retried."""
    import tenacity
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import IntegrityError, SQLAlchemyError

    # SQLite: concurrent workers wait for the write lock instead of failing with "database is locked".
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    def schema_race(exc: BaseException) -> bool:
        # Workers started together on a new database race to create its tables: the loser finds them made.
        return isinstance(exc, SQLAlchemyError) and (isinstance(exc, IntegrityError) or "already exists" in str(exc))

    try:
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception(schema_race), stop=tenacity.stop_after_attempt(5),
            wait=tenacity.wait_random(0.1, 0.5), reraise=True,
        ):
            with attempt, _quiet():
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
                )
    except ImportError:
        raise ConfigError(f"no database driver for '{url.split(':')[0]}': pip install 'psycopg[binary]' (postgresql://) or pymysql (mysql+pymysql://)") from None
    except (SQLAlchemyError, ValueError) as exc:
        safe = make_url(url).render_as_string(hide_password=True)
        raise ConfigError(f"cannot open the study storage '{safe}' ({str(exc).splitlines()[0][:200]})") from None
    try:
        return optuna.create_study(storage=storage, study_name=name, direction=direction, pruner=pruner), True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study '{name}' exists and {study.direction.name.lower()}s; set trainer.mode to match or pick another --study")
    return study, False


def _mlflow_parent(study: optuna.Study, cfg, created: bool) -> str:
    """The study's MLflow parent run: made once by the worker that created the study, found by the others."""
    run_id = study.user_attrs.get(PARENT_ATTR)
    for _ in range(0 if run_id or created or study.get_trials(deepcopy=False) else 30):
        time.sleep(1)  # the worker that has just created the study is making it now
        if run_id := study.user_attrs.get(PARENT_ATTR):
            break
    if run_id:
        return run_id
    from pixelmill.tracking import create_parent_run

    run_id = create_parent_run(cfg, study.study_name, study.study_name, {"pixelmill.study": study.study_name})
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


@dataclass
class _Search:
    """One worker's part in a study: everything a trial needs to become a run."""

    study: optuna.Study
    space: dict[str, BaseDistribution]
    overrides: list[str]
    config_file: str | Path | None
    n_trials: int
    parent: str | None

    def config(self, params: dict[str, Any], number: int):
        sampled = [f"{key}={_scalar(value)}" for key, value in params.items()]
        identity = [f"experiment={self.study.study_name}", f"run_name=trial-{number}", "resume=null"]
        parent = [f"tracking.mlflow.parent_run_id={self.parent}"] if self.parent else []
        return load_config([*self.overrides, *sampled, *identity, *parent], self.config_file)

    def taken(self, before: int | None = None) -> int:
        """Complete and pruned trials, plus running ones (numbered below ``before``)."""
        trials = self.study.get_trials(deepcopy=False, states=TAKEN)
        return sum(t.state != TrialState.RUNNING or before is None or t.number < before for t in trials)

    def reap(self, *_: Any) -> None:
        """Fail and retry running trials of this host's workers whose process is gone: no need to wait for heartbeats."""
        with _quiet():
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = trial.user_attrs.get("worker") or {}
            # "trial" ignores attributes a retry copied from the trial it repeats.
            if worker.get("host") != socket.gethostname() or worker.get("trial") != trial.number or runs.pid_alive(worker.get("pid")):
                continue
            log.warning("trial %d lost its worker (pid %s): marked failed, its parameters queued again", trial.number, worker.get("pid"))
            if self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True).state == TrialState.FAIL:
                with _quiet():
                    retry(self.study, trial)

    def objective(self, trial: optuna.Trial) -> float:
        from pixelmill.training.fit import train

        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "trial": trial.number})
        if self.taken(before=trial.number) >= self.n_trials:  # another worker started the last trial a moment earlier
            self.study.stop()
            raise _BudgetTaken(f"the study's {self.n_trials} trials are taken")
        cfg = self.config({key: _suggest(trial, key, dist) for key, dist in self.space.items()}, trial.number)
        trial.set_user_attr("run_dir", str((Path(cfg.output_dir) / cfg.experiment / cfg.run_name).resolve()))
        trial.set_user_attr("config", to_yaml(cfg))
        pruning = PruningCallback(trial, cfg.trainer.monitor)
        result = train(cfg, callbacks=[pruning])
        if result.status == "interrupted":  # Ctrl+C or SIGTERM: the next `tune` tries these parameters again
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            raise KeyboardInterrupt
        state = "complete" if pruning.pruned_at is None else "pruned"
        runs.update_summary(result.run_dir, tuning={"study": self.study.study_name, "trial": trial.number, "state": state})
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"{cfg.trainer.monitor} at epoch {pruning.pruned_at} was worse than the median of earlier trials")
        if cfg.trainer.monitor not in result.best_metrics:
            raise RunError(f"run '{result.run_dir}' recorded no {cfg.trainer.monitor}; tune needs a validation split")
        return float(result.best_metrics[cfg.trainer.monitor])


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def write_best_config(search: _Search, study_dir: Path) -> Path | None:
    """``best.yaml``: the best trial's full resolved config, as a new run (no run_name, resume or parent run)."""
    if (best := _best(search.study)) is None:
        return None
    # Trials added by hand (enqueue, add_trial) have no saved config: compose it like a trial.
    cfg = yaml.safe_load(best.user_attrs.get("config") or to_yaml(search.config(best.params, best.number)))
    cfg.update(run_name=None, resume=None)
    cfg["tracking"]["mlflow"]["parent_run_id"] = None
    path = study_dir / "best.yaml"
    header = f"# best trial {best.number} of study '{search.study.study_name}': {best.value}\n"
    runs.write_atomic(path, header + yaml.safe_dump(cfg, sort_keys=False))
    return path


def _save(ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")  # workers may write at the same time
    ax.figure.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(ax.figure)
    os.replace(tmp, path)
    return path


def write_plots(study: optuna.Study, study_dir: Path) -> list[Path]:
    """``history.png`` (from one completed trial) and ``importance.png`` (from two)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with _quiet():
        out = [_save(plots.plot_optimization_history(study), study_dir / "history.png")] if completed else []
        if len(completed) < 2:
            log.info("importance plot skipped: it needs 2 completed trials, the study has %d", len(completed))
            return out
        try:
            out.append(_save(plots.plot_param_importances(study), study_dir / "importance.png"))
        except Exception as exc:  # e.g. every completed trial has the same parameters
            log.info("importance plot skipped: %s", exc)
    return out


def _close_parent(cfg, search: _Search, files: list[Path]) -> None:
    """Best value and files to the MLflow parent run; it is finished once the study has all its trials."""
    from pixelmill.tracking import log_to_parent_run

    best = _best(search.study)
    log_to_parent_run(
        cfg, search.parent,
        metrics={f"best/{cfg.trainer.monitor}": best.value} if best else None,
        tags={"best_trial": str(best.number)} if best else None,
        files=files,
        status="FINISHED" if len(search.study.get_trials(deepcopy=False, states=FINISHED)) >= search.n_trials else None,
    )


def tune(
    space_file: str | Path, n_trials: int, overrides: Iterable[str] = (), config_file: str | Path | None = None,
    storage: str | None = None, study_name: str | None = None, heartbeat: int = 30, startup_trials: int = 5, warmup_epochs: int = 1,
) -> TuneResult:
    """Run (or continue) a study until it has ``n_trials`` complete or pruned trials across all its workers."""
    from sqlalchemy.engine import make_url

    from pixelmill.tracking import check_trackers

    overrides = list(overrides)
    base = load_config(overrides, config_file)
    name = study_name or f"{base.experiment}-tune"
    if not name.strip() or "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"bad study name '{name}': it names a folder, so use letters, digits, '-' or '_'")
    space = load_space(space_file, overrides, config_file)
    check_trackers(base)  # an unreachable MLflow store fails now, before a study or parent run exists
    study_dir = Path(base.output_dir) / name
    study_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    pruner = optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    study, created = _open_study(url, name, {"max": "maximize", "min": "minimize"}[base.trainer.mode], pruner, heartbeat)
    parent = _mlflow_parent(study, base, created) if "mlflow" in base.logger else None
    search = _Search(study, space, overrides, config_file, n_trials, parent)
    search.reap()
    if search.taken() < n_trials:
        # MaxTrialsCallback over TAKEN, not only finished trials: other workers' in-flight trials count too.
        callbacks = [search.reap, optuna.study.MaxTrialsCallback(n_trials, states=TAKEN)]
        study.optimize(search.objective, catch=(_BudgetTaken,), callbacks=callbacks, gc_after_trial=True)
    best_config = write_best_config(search, study_dir)
    plots = write_plots(study, study_dir)
    if parent:
        _close_parent(base, search, [p for p in (best_config, *plots) if p])
    best = _best(study)
    rows = [
        {"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params, "run_dir": t.user_attrs.get("run_dir")}
        for t in study.get_trials(deepcopy=False)
    ]
    return TuneResult(
        study_name=name, study_dir=study_dir, storage=make_url(url).render_as_string(hide_password=True), trials=rows,
        best={"number": best.number, "value": best.value, "params": best.params} if best else None,
        best_config=best_config, plots=plots,
    )
