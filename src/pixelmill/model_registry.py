"""The MLflow Model Registry: register bundles, list versions, promote aliases, resolve ``models:/`` URIs.

A registered version is an MLflow ONNX-flavour model (``mlflow models serve`` can serve it)
whose run also holds the whole bundle directory under the ``bundle/`` artifact path.
``resolve_model`` turns a URI into a local, hash-verified bundle directory.

Torch-free: serving resolves ``models:/`` URIs through this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import tenacity
from filelock import FileLock

from pixelmill.caches import model_cache_dir
from pixelmill.errors import BundleError, ModelError, PixelmillError
from pixelmill.export.bundle import BUNDLE_FILE, BundleMeta, read_bundle

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
BUNDLE_ARTIFACT_PATH = "bundle"
MODEL_ARTIFACT_NAME = "model"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
_RETRYABLE = ("database is locked", "database table is locked", "unique constraint failed", "already exists", "deadlock")
T = TypeVar("T")


@dataclass
class VersionInfo:
    """One registered model version, as ``registry list`` shows it."""

    name: str
    version: int
    aliases: list[str] = field(default_factory=list)
    run_id: str | None = None
    source: str | None = None
    created_at: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def parse_model_uri(uri: str) -> tuple[str, int | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/3`` -> (NAME, 3, None)."""
    match = _URI.match(uri.strip())
    if not match:
        raise ModelError(f"bad model URI '{uri}'; use models:/NAME@ALIAS or models:/NAME/VERSION")
    version = match.group("version")
    return match.group("name"), int(version) if version else None, match.group("alias")


def tracking_uri_for(run_dir: str | Path | None = None, override: str | None = None) -> str:
    """``--tracking-uri``, else the run config's ``tracking.mlflow.uri``, else $MLFLOW_TRACKING_URI, else the default."""
    if override:
        return override
    if run_dir is not None:
        cfg = _run_config(Path(run_dir))
        uri = cfg.get("tracking", {}).get("mlflow", {}).get("uri")
        if uri:
            return str(uri)
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _run_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise writers of one local SQLite store across processes (SQLite has one writer at a time)."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):  # flock on Unix, msvcrt on Windows
        yield


def _store_busy(exc: BaseException) -> bool:
    """Lock contention that goes away on its own (never one of our own errors)."""
    return not isinstance(exc, PixelmillError) and any(s in str(exc).lower() for s in _RETRYABLE)


def _log_busy(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    delay = state.next_action.sleep if state.next_action else 0.0
    log.debug("store busy (%s); retrying in %.2fs", (str(exc).splitlines() or [type(exc).__name__])[0][:120], delay)


def _retry(fn: Callable[[], T], attempts: int = 10) -> T:
    """Call ``fn``, retrying with jittered backoff while the store reports lock contention.

    The wait before retry n (n = 1, 2, ...) is e * (0.5 + U(0, 1)) with e = min(2 s, 0.05 s * 2**(n-1)):
    half of e, plus a uniform share of up to e (``wait_random_exponential``). The last failure is re-raised as it is.
    """
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(_store_busy),
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=0.025, max=1.0) + tenacity.wait_random_exponential(multiplier=0.05, max=2.0),
        before_sleep=_log_busy,
        reraise=True,
    )
    return retrying(fn)


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``uri`` for the block (logged-model lookups use it)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old, old_env = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        # set_tracking_uri(None) also pops $MLFLOW_TRACKING_URI: a second models:/ lookup in this
        # process (serve resolves once to check, once per worker) would then miss the user's store.
        mlflow.set_tracking_uri(old)
        if old_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _not_found(exc: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower()


def _version_info(mv: Any) -> VersionInfo:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mv.creation_timestamp / 1000)) if mv.creation_timestamp else None
    return VersionInfo(
        name=mv.name,
        version=int(mv.version),
        aliases=sorted(getattr(mv, "aliases", []) or []),
        run_id=mv.run_id,
        source=mv.source,
        created_at=created,
        tags=dict(mv.tags or {}),
    )


def _metric_tags(info: BundleMeta) -> dict[str, str]:
    """Flat string tags from the bundle's metrics (``test/accuracy``, ``best/val/acc``...)."""
    tags: dict[str, str] = {}
    metrics = info.metrics
    for split, values in (metrics.get("eval") or {}).items():
        for key, value in (values or {}).items():
            if isinstance(value, (int, float)) and value is not None:
                tags[f"{split}/{key}"] = f"{value:.6g}"
    best = (metrics.get("best") or {}).get("metrics") or {}
    for key, value in best.items():
        if isinstance(value, (int, float)) and key not in ("epoch", "step"):
            tags[f"best/{key}"] = f"{value:.6g}"
    return tags


def is_tracking_server(uri: str | None) -> bool:
    """An MLflow tracking server (``http(s)://``): it decides itself where artifacts go (``--artifacts-destination``)."""
    return bool(uri) and uri.split("://", 1)[0].lower() in ("http", "https")


def _artifact_location(uri: str, run_dir: Path, explicit: str | None) -> str | None:
    """Where a new experiment stores artifacts: explicit, else next to a SQLite file as ``mlartifacts/``.

    A tracking server ignores a plain local folder: on this machine's disk the server and other
    machines could not read it. A ``file:///shared/mount`` URI is still taken as it is.
    """
    if explicit and is_tracking_server(uri) and "://" not in explicit:
        return None
    if explicit:
        return explicit if "://" in explicit else Path(explicit).resolve().as_uri()
    db = _sqlite_path(uri)
    if db is not None:
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception as exc:
        if "already exists" not in str(exc).lower():
            raise
        return client.get_experiment_by_name(name).experiment_id


def _ensure_registered_model(client: Any, name: str) -> None:
    try:
        client.create_registered_model(name, description="pixelmill model (bundle under the run's bundle/ artifacts)")
    except Exception as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")):
            raise


def _signature(info: BundleMeta):
    """The MLflow signature of the bundle's own input/output contract (one tensor, or one input per column)."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    inputs = [info.input.model_dump()] if info.input else list(info.inputs or [])
    dtypes = {"uint8": np.uint8, "float32": np.float32, "string": np.str_}
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(dtypes[i["dtype"]]), tuple(i["shape"]), i["name"]) for i in inputs]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), tuple(info.output.shape), info.output.name)]),
    )


def _log_bundle(uri: str, experiment_id: str, bundle_dir: Path, info: BundleMeta, run_name: str) -> tuple[str, str, str | None]:
    """Log the ONNX flavour and the bundle directory in a new MLflow run; return (run_id, model_uri, logged model id)."""
    import mlflow
    import mlflow.onnx
    import onnx

    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.set_tags({"pixelmill.bundle": BUNDLE_ARTIFACT_PATH, "pixelmill.run_dir": info.run.get("run_dir", "")})
        metrics = {k: float(v) for k, v in _metric_tags(info).items()}
        if metrics:
            mlflow.log_metrics(metrics)
        logged = mlflow.onnx.log_model(
            onnx.load(str(bundle_dir / info.model_file)),
            name=MODEL_ARTIFACT_NAME,
            signature=_signature(info),
            save_as_external_data=False,
            # The flavour's pinned onnx/onnxruntime: skips MLflow's requirement inference, a
            # subprocess that reloads the model and costs seconds per registration.
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
        )
        mlflow.log_artifacts(str(bundle_dir), artifact_path=BUNDLE_ARTIFACT_PATH)
    return run.info.run_id, logged.model_uri, getattr(logged, "model_id", None)


def register(
    run_dir: str | Path,
    name: str,
    tracking_uri: str | None = None,
    artifact_location: str | None = None,
) -> VersionInfo:
    """Log the run's ONNX bundle (exporting it first if missing) to MLflow and register a new version."""
    from pixelmill import runs
    from pixelmill.export import default_out, export_run

    run_dir = runs.resolve_run_dir(run_dir)
    uri = tracking_uri_for(run_dir, tracking_uri)
    bundle_dir = default_out(run_dir, "onnx", None)
    with FileLock(run_dir / ".bundle.lock"):  # two registering processes export once, not twice
        if not (bundle_dir / BUNDLE_FILE).is_file():
            log.info("no bundle in %s yet; exporting it first", run_dir)
            export_run(run_dir)
    bundle = read_bundle(bundle_dir)  # verifies every hash before anything is uploaded
    if bundle.model_format != "onnx":
        raise BundleError(f"{bundle_dir} holds a {bundle.model_format} model; the registry takes ONNX bundles")
    if artifact_location is None and tracking_uri is None:
        artifact_location = _run_config(run_dir).get("tracking", {}).get("mlflow", {}).get("artifact_location")
        if artifact_location and _sqlite_path(uri) is not None and not Path(artifact_location).is_absolute():
            artifact_location = None  # relative config paths follow the SQLite file (same folder), see _artifact_location
    summary = runs.load_summary(run_dir)
    info = bundle.info
    tags = _metric_tags(info) | {
        "model_name": str(info.model_name),
        "data_fingerprint": str(info.data_fingerprint),
        "run_dir": str(run_dir.resolve()),
        "bundle_sha256": info.files[info.model_file],
    }
    with _store_lock(uri), _tracking(uri):
        client = _retry(lambda: _client(uri))
        experiment_id = _retry(lambda: _experiment_id(client, summary.experiment or "pixelmill", _artifact_location(uri, run_dir, artifact_location)))
        run_id, model_uri, model_id = _retry(lambda: _log_bundle(uri, experiment_id, bundle.path, info, f"register-{run_dir.name}"))
        _retry(lambda: _ensure_registered_model(client, name))
        # A tracking server accepts a models:/m-... source only with the logged model's id beside it.
        mv = _retry(lambda: client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id))
    log.info("registered %s version %s from %s", name, mv.version, run_dir)
    return _version_info(mv)


def list_versions(name: str | None = None, tracking_uri: str | None = None) -> list[VersionInfo]:
    """Every version of ``name`` (newest first), or the latest and the aliased versions of every registered model."""
    uri = tracking_uri_for(None, tracking_uri)
    with _tracking(uri):
        return _list_versions(_client(uri), uri, name)


def _list_versions(client: Any, uri: str, name: str | None) -> list[VersionInfo]:
    if name:
        versions = _retry(lambda: client.search_model_versions(f"name = '{name}'"))
        if not versions:
            raise ModelError(f"no registered model '{name}' in {uri}; register one with `pixelmill registry register RUN_DIR --name {name}`")
        # search_model_versions leaves aliases out; the registered model has them.
        aliases = _aliases(client, name)
        infos = [_version_info(mv) for mv in versions]
        for info in infos:
            info.aliases = sorted(a for a, v in aliases.items() if v == info.version)
        return sorted(infos, key=lambda v: -v.version)
    out = []
    for model in _retry(lambda: client.search_registered_models()):
        aliases = {a: int(v) for a, v in (model.aliases or {}).items()}
        latest = {int(mv.version): mv for mv in model.latest_versions or []}
        for version in set(aliases.values()) - set(latest):  # aliased versions show too, e.g. an older @champion
            latest[version] = _retry(lambda name=model.name, v=version: client.get_model_version(name, str(v)))
        for mv in latest.values():
            info = _version_info(mv)
            info.aliases = sorted(a for a, v in aliases.items() if v == info.version)
            out.append(info)
    return sorted(out, key=lambda v: (v.name, -v.version))


def _aliases(client: Any, name: str) -> dict[str, int]:
    model = _retry(lambda: client.get_registered_model(name))
    return {a: int(v) for a, v in (model.aliases or {}).items()}


def promote(name: str, version: int, alias: str = "champion", tracking_uri: str | None = None) -> VersionInfo:
    """Point ``alias`` (e.g. ``champion``) at ``version`` of ``name``."""
    uri = tracking_uri_for(None, tracking_uri)
    with _tracking(uri):
        return _promote(_client(uri), uri, name, version, alias)


def _promote(client: Any, uri: str, name: str, version: int, alias: str) -> VersionInfo:
    try:
        mv = _retry(lambda: client.get_model_version(name, str(version)))
    except PixelmillError:
        raise
    except Exception as exc:
        if _not_found(exc):
            raise ModelError(f"no version {version} of registered model '{name}' in {uri}; see `pixelmill registry list {name}`") from None
        raise
    with _store_lock(uri):
        _retry(lambda: client.set_registered_model_alias(name, alias, str(version)))
    info = _version_info(mv)
    info.aliases = sorted(a for a, v in _aliases(client, name).items() if v == info.version)
    return info


def get_version(uri: str, tracking_uri: str | None = None) -> VersionInfo:
    """The registered version a ``models:/`` URI points at."""
    name, version, alias = parse_model_uri(uri)
    store = tracking_uri_for(None, tracking_uri)
    client = _client(store)
    try:
        with _tracking(store):
            mv = _version_by(client, name, version, alias)
    except PixelmillError:
        raise
    except Exception as exc:
        if _not_found(exc):
            raise ModelError(f"'{uri}' does not exist in {store}; see `pixelmill registry list {name}`") from None
        raise
    return _version_info(mv)


def _version_by(client: Any, name: str, version: int | None, alias: str | None) -> Any:
    if alias:
        return _retry(lambda: client.get_model_version_by_alias(name, alias))
    return _retry(lambda: client.get_model_version(name, str(version)))


def cache_root() -> Path:
    """Where downloaded bundles live: $PIXELMILL_MODEL_CACHE_DIR, else <user cache>/pixelmill/models (see ``pixelmill.caches``)."""
    return model_cache_dir()


def resolve_model(uri_or_path: str | Path, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A bundle directory, a run directory (its ``bundle/``) or a ``models:/`` URI -> a local, verified bundle directory.

    Registered versions are downloaded once to ``cache_dir`` (default :func:`cache_root`),
    keyed by store, name and version; a cached copy is re-verified on every call.
    """
    return resolve_model_version(uri_or_path, tracking_uri, cache_dir)[0]


def resolve_model_version(
    uri_or_path: str | Path, tracking_uri: str | None = None, cache_dir: str | Path | None = None
) -> tuple[Path, VersionInfo | None]:
    """:func:`resolve_model` plus the registered version a ``models:/`` URI pointed at (None for a path).

    A server that re-resolves ``models:/NAME@ALIAS`` on reload learns from it which version it now serves.
    """
    text = str(uri_or_path)
    if not text.startswith("models:/"):
        path = Path(text).expanduser()
        for candidate in (path, path / BUNDLE_ARTIFACT_PATH):
            if (candidate / BUNDLE_FILE).is_file():
                return read_bundle(candidate).path, None
        raise BundleError(f"'{path}' is neither a bundle nor a run with a bundle; run `pixelmill export RUN_DIR` first")
    store = tracking_uri_for(None, tracking_uri)
    info = get_version(text, store)
    if not info.run_id:
        raise BundleError(f"'{text}' (version {info.version}) has no MLflow run with a bundle")
    key = hashlib.sha256(store.encode()).hexdigest()[:12]
    target = Path(cache_dir or cache_root()) / key / info.name / str(info.version)
    if (target / BUNDLE_FILE).is_file():
        try:
            return read_bundle(target).path, info
        except BundleError as exc:
            log.warning("cached bundle %s is damaged (%s); downloading it again", target, exc)
            shutil.rmtree(target, ignore_errors=True)
    return _download_bundle(store, info, target), info


def _download_bundle(store: str, info: VersionInfo, target: Path) -> Path:
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bar in CLI or server logs
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{random.getrandbits(24):06x}")
    tmp.mkdir()
    try:
        _retry(
            lambda: mlflow.artifacts.download_artifacts(
                run_id=info.run_id, artifact_path=BUNDLE_ARTIFACT_PATH, dst_path=str(tmp), tracking_uri=store
            )
        )
        bundle = read_bundle(tmp / BUNDLE_ARTIFACT_PATH)
        expected = info.tags.get("bundle_sha256")
        if expected and bundle.info.files[bundle.info.model_file] != expected:
            raise BundleError(f"the bundle of {info.name} version {info.version} does not match the registered model hash")
        try:
            os.replace(tmp / BUNDLE_ARTIFACT_PATH, target)
        except OSError:  # another process cached it first
            if not (target / BUNDLE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return read_bundle(target).path

