"""The model repository of a server: several names, several versions each, reload, traffic split and shadow.

``pixelmill serve`` takes one or more SPECs, ``[NAME[:VERSION]=]SOURCE``, where SOURCE is a bundle,
a run directory, a ``models:/`` URI or a folder of bundles (``NAME/VERSION/bundle.json`` as in a
Triton repository, or ``ANY/bundle.json``). A name without a SPEC name is the registered model's
name for a ``models:/`` URI, else the bundle's; a version without one is the registered version,
else the server's ``model_version`` ("1").

Every version is an :class:`~pixelmill.serving.engine.Engine`. A request without a version goes
to the name's default version (the one its first SPEC resolved to), or is split by weight between
versions (sticky by a request header when it carries one); a shadow version gets a copy of those
requests, whose answers are only compared with the served ones, counted and logged.

``load`` (the Triton repository API, and SIGHUP for every name) resolves a name's SPECs again: a
``models:/NAME@ALIAS`` whose alias moved brings its new version in, verified (hashes) and warmed
up before it takes traffic; the version it replaces leaves once the requests it holds are
answered. A version that fails to load leaves the old one serving, and the reason is raised.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Optional

import anyio
import numpy as np

from pixelmill.errors import ConfigError, PixelmillError
from pixelmill.export.bundle import BUNDLE_FILE, Bundle
from pixelmill.serving.engine import Engine, load_bundle
from pixelmill.serving.settings import ServeSettings
from pixelmill.serving.shared import POLL_S, SharedState
from pixelmill.serving.telemetry import ServingMetrics

log = logging.getLogger(__name__)
shadow_log = logging.getLogger("pixelmill.serving.shadow")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._\-]{0,127})(?::(?P<version>[A-Za-z0-9._\-]{1,64}))?=(?P<source>.+)$")


class RepositoryError(PixelmillError):
    """A repository request that cannot be done; ``status`` is the HTTP answer (the server keeps serving what it served)."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


@dataclass(frozen=True)
class ModelSpec:
    """One ``[NAME[:VERSION]=]SOURCE`` of the command line."""

    source: str
    name: Optional[str] = None
    version: Optional[str] = None

    def __str__(self) -> str:
        prefix = "" if self.name is None else f"{self.name}{'' if self.version is None else ':' + self.version}="
        return prefix + self.source


def parse_spec(text: str) -> ModelSpec:
    """``digits=models:/digits@champion``, ``digits:2=./bundle``, ``./bundle`` -> a :class:`ModelSpec`."""
    text = text.strip()
    match = _SPEC.match(text)
    if match and not text.startswith("models:/"):
        return ModelSpec(match.group("source"), match.group("name"), match.group("version"))
    if not text:
        raise ConfigError("an empty model SPEC; give [NAME[:VERSION]=]SOURCE (a bundle, a run directory, models:/NAME@ALIAS or a folder of bundles)")
    return ModelSpec(text)


def expand_folders(specs: list[ModelSpec]) -> list[ModelSpec]:
    """A SOURCE that is a folder of bundles (not a bundle, not a run) -> one SPEC per bundle in it.

    ``NAME/VERSION/bundle.json`` (Triton's layout) gives that name and version; ``ANY/bundle.json``
    gives the bundle's own name and the default version.
    """
    out: list[ModelSpec] = []
    for spec in specs:
        folder = Path(spec.source).expanduser()
        if spec.source.startswith("models:/") or not folder.is_dir() or _is_bundle_or_run(folder):
            out.append(spec)
            continue
        found = [ModelSpec(str(p.parent), p.parent.parent.name, p.parent.name) for p in sorted(folder.glob(f"*/*/{BUNDLE_FILE}"))]
        found += [ModelSpec(str(p.parent), spec.name) for p in sorted(folder.glob(f"*/{BUNDLE_FILE}"))]
        if not found:
            raise ConfigError(f"'{folder}' holds no bundle (no {BUNDLE_FILE} in it, in NAME/ or in NAME/VERSION/); export one with `pixelmill export RUN_DIR`")
        out.extend(found)
    return out


def _is_bundle_or_run(folder: Path) -> bool:
    return (folder / BUNDLE_FILE).is_file() or (folder / "bundle" / BUNDLE_FILE).is_file() or (folder / "config.yaml").is_file()


@dataclass
class Resolved:
    """A SPEC resolved now: the name and version it serves under and its verified bundle."""

    spec: ModelSpec
    name: str
    version: str
    bundle: Bundle

    @property
    def digest(self) -> str:
        return self.bundle.info.files.get(self.bundle.info.model_file, "")


def resolve(spec: ModelSpec, settings: ServeSettings) -> Resolved:
    """Resolve and verify one SPEC (blocking: reads and hashes the bundle, may download it)."""
    from pixelmill.model_registry import parse_model_uri, resolve_model_version  # mlflow is imported only for models:/ URIs

    path, registered = resolve_model_version(spec.source, tracking_uri=settings.tracking_uri)
    bundle = load_bundle(str(path))
    name = spec.name or (parse_model_uri(spec.source)[0] if registered is not None else bundle.name)
    version = spec.version or (str(registered.version) if registered is not None else settings.model_version)
    if not _NAME.match(name):
        raise ConfigError(f"model name '{name[:80]}' (from {spec}) is not usable in a URL; name it: NAME={spec.source}")
    return Resolved(spec, name, version, bundle)


def resolve_all(specs: list[ModelSpec], settings: ServeSettings) -> list[Resolved]:
    """Resolve every SPEC; two under one name and version is a ConfigError naming both."""
    seen: dict[tuple[str, str], Resolved] = {}
    out = []
    for spec in specs:
        found = resolve(spec, settings)
        key = (found.name, found.version)
        if key in seen:
            raise ConfigError(
                f"two models under name '{found.name}' version '{found.version}': {seen[key].spec} and {spec}; "
                f"give one another version: {found.name}:2={spec.source}"
            )
        seen[key] = found
        out.append(found)
    return out


def check_plan(settings: ServeSettings) -> list[Resolved]:
    """Everything ``start`` would load, resolved and verified, and the traffic splits checked against it (ConfigError)."""
    resolved = resolve_all(expand_folders([parse_spec(s) for s in settings.specs]), settings)
    versions: dict[str, set[str]] = {}
    for found in resolved:
        versions.setdefault(found.name, set()).add(found.version)
    wanted = [(name, list(weights)) for name, weights in map(parse_traffic, settings.traffic)]
    wanted += [(name, [version]) for name, version in map(parse_shadow, settings.shadow)]
    for name, needed in wanted:
        if name not in versions:
            raise ConfigError(f"traffic for '{name}', which is not served; served: {', '.join(sorted(versions))}")
        missing = [v for v in needed if v not in versions[name]]
        if missing:
            raise ConfigError(f"traffic for '{name}' version(s) {', '.join(missing)}, which are not served; it has {', '.join(sorted(versions[name], key=_version_order))}")
    return resolved


def parse_traffic(text: str) -> tuple[str, dict[str, float]]:
    """``digits=1:90,2:10`` -> ("digits", {"1": 90.0, "2": 10.0}); weights must sum to 100."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"bad traffic split '{text[:80]}'; write NAME=VERSION:WEIGHT,VERSION:WEIGHT (weights summing to 100), e.g. digits=1:90,2:10")
    weights: dict[str, float] = {}
    for part in rest.split(","):
        version, sep, weight = part.strip().partition(":")
        try:
            weights[version] = float(weight)
        except ValueError:
            raise ConfigError(f"bad traffic split '{text[:80]}': '{part.strip()}' is not VERSION:WEIGHT") from None
        if not sep or not version:
            raise ConfigError(f"bad traffic split '{text[:80]}': '{part.strip()}' is not VERSION:WEIGHT")
    check_weights(name, weights)
    return name, weights


def check_weights(name: str, weights: Mapping[str, float]) -> None:
    if not weights:
        raise ConfigError(f"the traffic split of '{name}' names no version")
    if any(w < 0 for w in weights.values()):
        raise ConfigError(f"the traffic split of '{name}' has a negative weight: {dict(weights)}")
    total = sum(weights.values())
    if abs(total - 100.0) > 1e-6:
        raise ConfigError(f"the traffic weights of '{name}' sum to {total:g}, not 100: {dict(weights)}")


def parse_shadow(text: str) -> tuple[str, str]:
    """``digits=2`` -> ("digits", "2")."""
    name, sep, version = text.partition("=")
    if not sep or not name or not version:
        raise ConfigError(f"bad shadow '{text[:80]}'; write NAME=VERSION, e.g. digits=2")
    return name, version


def _version_order(version: str) -> tuple[int, Any]:
    return (0, int(version)) if version.isdigit() else (1, version)


@dataclass
class ServedModel:
    """One name: its SPECs, the versions loaded from them, the default and how traffic is split."""

    name: str
    specs: list[ModelSpec]
    versions: dict[str, Engine] = field(default_factory=dict)
    default: Optional[str] = None
    weights: dict[str, float] = field(default_factory=dict)  # empty: every request goes to `default`
    shadow: Optional[str] = None

    def in_split(self) -> set[str]:
        """Versions that traffic is split or shadowed to."""
        return set(self.weights) | ({self.shadow} if self.shadow else set())


@dataclass
class Choice:
    """Where one request goes: the engine that answers it and, in shadow mode, the one that gets a copy."""

    engine: Engine
    shadow: Optional[Engine] = None


class Repository:
    """Every served name and version; one load, unload or traffic change at a time."""

    def __init__(self, settings: ServeSettings, metrics: ServingMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self.unavailable: dict[str, tuple[ServedModel, str]] = {}  # unloaded names (their SPECs, to load again) and why
        self.folders = [Path(s.source).expanduser() for s in map(parse_spec, settings.specs) if _is_folder_repository(s)]
        self._from_folders: set[ModelSpec] = set()  # SPECs found in a folder repository: load scans the folder again instead
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self.shared: SharedState | None = None  # with several workers: the state they share
        self.generation = 0  # of the shared state this worker serves

    # --- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every SPEC of the settings and apply their traffic splits and shadows (errors: ConfigError)."""
        given = [parse_spec(s) for s in self.settings.specs]
        specs = expand_folders(given)
        self._from_folders = set(specs) - set(given)
        resolved = await anyio.to_thread.run_sync(resolve_all, specs, self.settings)
        for found in resolved:
            model = self.models.setdefault(found.name, ServedModel(found.name, []))
            model.specs.append(found.spec)
            model.versions[found.version] = await self._engine(found)
            model.default = model.default or found.version
        for text in self.settings.traffic:
            name, weights = parse_traffic(text)
            self._set_traffic(self._model(name), weights, self._model(name).shadow)
        for text in self.settings.shadow:
            name, version = parse_shadow(text)
            model = self._model(name)
            self._set_traffic(model, model.weights, version)

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        engines = [e for m in self.models.values() for e in m.versions.values()]
        self.models.clear()
        for engine in engines:
            await engine.stop()
        if self.shared is not None:
            self.shared.leave()

    async def _engine(self, found: Resolved) -> Engine:
        """Open, warm up and start the engine of a resolved SPEC (errors propagate: nothing was serving it yet)."""
        engine = await anyio.to_thread.run_sync(lambda: Engine.from_bundle(found.bundle, found.name, found.version, self.settings, self.metrics))
        try:
            await engine.start()
        except BaseException:
            await engine.stop()
            raise
        engine.digest = found.digest
        return engine

    # --- answering requests ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(e.ready for m in self.models.values() for e in m.versions.values())

    def names(self) -> list[str]:
        return sorted(self.models)

    def _model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            served = ", ".join(self.names()) or "none"
            raise RepositoryError(f"unknown model '{name[:100]}'; this server serves: {served}", 404)
        return model

    def versions(self, name: str) -> list[str]:
        return sorted(self._model(name).versions, key=_version_order)

    def only_name(self) -> str:
        """The one served name, for the routes without one (/predict, /model, /explain)."""
        if not self.models:
            raise RepositoryError("no model is loaded; load one with POST /v2/repository/models/NAME/load", 503)
        if len(self.models) != 1:
            names = ", ".join(self.names()) or "none"
            raise RepositoryError(f"this server serves {len(self.models)} models ({names}); name one: /models/NAME/predict, /v2/models/NAME/infer", 400)
        return next(iter(self.models))

    def engine(self, name: str, version: Optional[str] = None) -> Engine:
        """A served version (default: the name's default version), or a 404 RepositoryError."""
        model = self._model(name)
        chosen = version or model.default
        engine = model.versions.get(chosen or "")
        if engine is None:
            raise RepositoryError(f"model '{name}' has no version '{str(version)[:40]}'; it serves version(s) {', '.join(sorted(model.versions, key=_version_order))}", 404)
        return engine

    def route(self, name: Optional[str], version: Optional[str], headers: Mapping[str, str] | None = None) -> Choice:
        """Where a request goes: the named version, else the traffic split (sticky by header), else the default; plus the shadow."""
        name = name or self.only_name()
        if version:
            return Choice(self.engine(name, version))
        model = self._model(name)
        chosen = model.default
        if model.weights:
            chosen = self._split(model, headers.get(self.settings.sticky_header) if headers is not None else None)
        engine = self.engine(name, chosen)
        shadow = model.versions.get(model.shadow) if model.shadow and model.shadow != engine.version else None
        return Choice(engine, shadow)

    @staticmethod
    def _split(model: ServedModel, key: Optional[str]) -> str:
        """A version by weight: the same one for every request with the same sticky key, else a random draw."""
        if key:
            point = int.from_bytes(hashlib.sha256(f"{model.name}\0{key}".encode()).digest()[:8], "big") / 2**64 * 100.0
        else:
            point = random.random() * 100.0
        upto = 0.0
        for version, weight in model.weights.items():
            upto += weight
            if point < upto:
                return version
        return next(reversed(model.weights))

    def mirror(self, choice: Choice, batch: Any, outputs: np.ndarray, request_id: str = "") -> None:
        """Send a copy of the answered batch to the shadow version; its answer is compared, counted and logged only."""
        if choice.shadow is None:
            return
        shadow, served = choice.shadow, choice.engine
        lease = shadow.lease()
        lease.__enter__()  # taken now, so an unload waits for the copy too

        async def run() -> None:
            try:
                copy = await shadow.infer(batch)
                agree = int(np.sum(np.argmax(np.asarray(copy), axis=-1) == np.argmax(np.asarray(outputs), axis=-1)))
                total = len(outputs)
                outcome = {"agree": agree, "disagree": total - agree}
                shadow_log.info(
                    "shadow %s version %s vs %s: %d of %d top-1 answers agree (request %s)", shadow.name, shadow.version, served.version, agree, total, request_id
                )
            except Exception as exc:  # noqa: BLE001 - a failing shadow never affects the served answer
                outcome = {"error": len(outputs)}
                shadow_log.warning("shadow %s version %s failed: %s (request %s)", shadow.name, shadow.version, exc, request_id)
            finally:
                lease.__exit__(None, None, None)
            if self.metrics is not None:
                for name, count in outcome.items():
                    self.metrics.shadow.labels(shadow.name, shadow.version, name).inc(count)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- managing the repository ----------------------------------------------------------------

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: every name and version, READY or UNAVAILABLE with the reason."""
        rows = []
        for name in sorted(set(self.models) | set(self.unavailable)):
            model = self.models.get(name)
            if model is None:
                rows.append({"name": name, "state": "UNAVAILABLE", "reason": self.unavailable[name][1]})
                continue
            for version in sorted(model.versions, key=_version_order):
                rows.append({"name": name, "version": version, "state": "READY" if model.versions[version].ready else "UNAVAILABLE", "reason": ""})
        return rows

    def traffic(self, name: str) -> dict[str, Any]:
        model = self._model(name)
        return {
            "name": name,
            "default": model.default,
            "versions": sorted(model.versions, key=_version_order),
            "weights": dict(model.weights),
            "shadow": model.shadow,
            "sticky_header": self.settings.sticky_header,
        }

    async def set_traffic(self, name: str, weights: Mapping[str, float], shadow: Optional[str]) -> dict[str, Any]:
        async def change() -> dict[str, Any]:
            try:
                self._set_traffic(self._model(name), dict(weights), shadow)
            except ConfigError as exc:
                raise RepositoryError(str(exc), 422) from None
            log.info("traffic of %s: weights %s, shadow %s", name, dict(weights) or "none", shadow or "none")
            return self.traffic(name)

        return await self._change(change)

    def _set_traffic(self, model: ServedModel, weights: dict[str, float], shadow: Optional[str]) -> None:
        if weights:
            check_weights(model.name, weights)
        for version in [*weights, *([shadow] if shadow else [])]:
            if version not in model.versions:
                raise ConfigError(f"model '{model.name}' has no version '{version}' to send traffic to; it serves {', '.join(sorted(model.versions, key=_version_order))}")
        model.weights, model.shadow = weights, shadow

    async def load(self, name: str) -> dict[str, Any]:
        """Resolve the name's SPECs again (a moved alias brings its new version); new versions take traffic once warmed up."""
        return await self._change(lambda: self._load(name))

    async def _load(self, name: str) -> dict[str, Any]:
        model = self.models.get(name)
        if model is None:
            model = self._known_elsewhere(name)
        specs = [s for s in model.specs if s not in self._from_folders] + self._in_folders(name)  # a folder may have new versions
        if not specs:
            raise RepositoryError(f"model '{name}' is no longer in its folder repository", 404)
        try:
            resolved = await anyio.to_thread.run_sync(resolve_all, specs, self.settings)
        except PixelmillError as exc:
            raise self._refused(name, exc) from None
        if any(found.name != name for found in resolved):
            others = sorted({found.name for found in resolved} - {name})
            raise self._refused(name, ConfigError(f"its sources now resolve to other names too ({', '.join(others)})"))
        keep = {v: e for v, e in model.versions.items() if any(f.version == v and f.digest == e.digest for f in resolved)}
        versions: dict[str, Engine] = {}
        started: list[Engine] = []
        for found in resolved:
            if found.version in keep:
                versions[found.version] = keep[found.version]
                continue
            try:
                engine = await self._engine(found)
            except Exception as exc:  # noqa: BLE001 - any failure leaves the old versions serving
                for fresh in started:
                    await fresh.stop()
                raise self._refused(name, exc) from None
            started.append(engine)
            versions[found.version] = engine
        dropped = model.in_split() - set(versions)
        if dropped:
            for fresh in started:
                await fresh.stop()
            raise self._refused(name, RepositoryError(f"version(s) {', '.join(sorted(dropped))} would leave while traffic is split to them; change the split first", 409))
        retired = [e for v, e in model.versions.items() if versions.get(v) is not e]
        model.versions, model.default = versions, resolved[0].version  # one assignment: the next request sees the new set
        model.specs = specs
        self.models[name] = model
        self.unavailable.pop(name, None)
        for engine in retired:
            self._retire(engine)
        for engine in started:
            log.info("loaded %s version %s from %s", name, engine.version, engine.bundle.path)
        return {"name": name, "default": model.default, "versions": sorted(versions, key=_version_order), "loaded": [e.version for e in started]}

    def _refused(self, name: str, exc: Exception) -> RepositoryError:
        model = self.models.get(name)
        still = f"; still serving version(s) {', '.join(sorted(model.versions, key=_version_order))}" if model else ""
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("load of %s failed: %s%s", name, reason, still)
        return RepositoryError(f"load of '{name}' failed: {reason}{still}", getattr(exc, "status", 400))

    def _known_elsewhere(self, name: str) -> ServedModel:
        """An unloaded name, or one found in a folder repository given at start."""
        if name in self.unavailable:
            model, _ = self.unavailable[name]
            return ServedModel(name, model.specs)
        specs = self._in_folders(name)
        if not specs:
            raise RepositoryError(f"model '{name[:100]}' is not in this server's repository; it knows: {', '.join(self.names()) or 'none'}", 404)
        return ServedModel(name, specs)

    def _in_folders(self, name: str) -> list[ModelSpec]:
        """The SPECs of ``name`` in the folder repositories given at start, as the folders hold them now."""
        found = []
        for folder in self.folders:
            try:
                found += expand_folders([ModelSpec(str(folder))])
            except ConfigError:  # the folder is empty now
                continue
        found = [s for s in found if (s.name or _bundle_name(s)) == name]
        self._from_folders.update(found)
        return found

    async def unload(self, name: str, version: Optional[str] = None) -> dict[str, Any]:
        """Stop serving a name (or one version); refused while traffic is split or shadowed to what would leave."""
        return await self._change(lambda: self._unload(name, version))

    async def _unload(self, name: str, version: Optional[str]) -> dict[str, Any]:
        model = self._model(name)
        leaving = {version} if version else set(model.versions)
        if version and version not in model.versions:
            self.engine(name, version)  # the 404
        if model.in_split() & leaving:
            raise RepositoryError(
                f"'{name}' version(s) {', '.join(sorted(model.in_split() & leaving))} take part in its traffic split; "
                f"change the split first (POST /v2/repository/models/{name}/traffic)", 409
            )
        for v in leaving:
            self._retire(model.versions.pop(v))
        if not model.versions:
            del self.models[name]
            self.unavailable[name] = (model, "unloaded")
        elif model.default in leaving:
            model.default = max(model.versions, key=_version_order)
        log.info("unloaded %s version(s) %s", name, ", ".join(sorted(leaving, key=_version_order)))
        return {"name": name, "unloaded": sorted(leaving, key=_version_order)}

    async def reload_all(self) -> None:
        """SIGHUP: load every served name again; a failure is logged and leaves that name as it was."""
        for name in self.names():
            try:
                await self.load(name)
            except RepositoryError:
                pass  # logged by load

    # --- several workers: one repository state (see pixelmill.serving.shared) ---------------------

    async def _change(self, change: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run one load, unload or traffic change; with siblings, publish the new state and answer once they serve it too."""
        if self.shared is None:
            async with self._lock:
                return await change()
        async with self.shared.locked():
            async with self._lock:
                await self._catch_up()  # a sibling's change first: this one builds on it
                result = await change()
                self.generation += 1
                self.shared.publish(self.snapshot(), self.generation)
                self.shared.ack(self.generation)
        confirmed = await self.shared.confirmed(self.generation)
        if confirmed["failed"] or confirmed["pending"]:
            raise RepositoryError(
                f"applied by this worker, but not by worker(s) {', '.join([*confirmed['failed'], *map(str, confirmed['pending'])])} "
                f"({'; '.join(confirmed['failed'].values()) or 'no answer'}); send SIGHUP to the server to load every model again", 500
            )
        return {**result, "workers": confirmed["workers"]}

    async def start_shared(self, shared: SharedState) -> None:
        """Start as one of several workers: from the shared state when there is one, else from the SPECs (then publish them)."""
        self.shared = shared
        shared.join()
        state = shared.read()
        if state is None:
            await self.start()
            async with shared.locked():
                state = shared.read()
                if state is None:  # the first worker to get here publishes what it resolved; the others take it
                    self.generation = 1
                    shared.publish(self.snapshot(), self.generation)
        async with self._lock:
            await self._catch_up()
        shared.ack(self.generation)
        task = asyncio.get_running_loop().create_task(self._follow())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _follow(self) -> None:
        """Apply each newer state a sibling publishes (one stat() per poll; see pixelmill.serving.shared)."""
        assert self.shared is not None
        while True:
            await asyncio.sleep(POLL_S)
            if self.shared.changed():
                async with self._lock:
                    await self._catch_up()

    async def _catch_up(self) -> None:
        """Apply the shared state if it is newer than what this worker serves; acknowledge it either way."""
        assert self.shared is not None
        state = self.shared.read()
        if state is None or state["generation"] <= self.generation:
            return
        error = ""
        try:
            await self.apply(state)
        except Exception as exc:  # noqa: BLE001 - this worker keeps what it served; the worker that made the change reports it
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("could not apply repository generation %d: %s; still serving %s", state["generation"], error, ", ".join(self.names()) or "nothing")
        self.generation = state["generation"]
        self.shared.ack(self.generation, error)

    def snapshot(self) -> dict[str, Any]:
        """What this repository serves, as JSON: every name's SPECs, versions (bundle path, model hash), default, weights, shadow."""
        models = {
            name: {
                "specs": [str(s) for s in model.specs],
                "versions": {v: {"path": str(e.bundle.path), "digest": e.digest} for v, e in model.versions.items()},
                "default": model.default,
                "weights": model.weights,
                "shadow": model.shadow,
            }
            for name, model in self.models.items()
        }
        unavailable = {name: {"specs": [str(s) for s in model.specs], "reason": reason} for name, (model, reason) in self.unavailable.items()}
        return {"models": models, "unavailable": unavailable, "from_folders": sorted(map(str, self._from_folders))}

    async def apply(self, state: Mapping[str, Any]) -> None:
        """Serve what ``state`` (a :meth:`snapshot`) says: versions with the same model hash keep their engine, others load
        from the same verified bundles; all or nothing (a failure stops what it started and raises)."""
        started: list[Engine] = []
        plan: dict[str, dict[str, Engine]] = {}
        try:
            for name, entry in state["models"].items():
                current = self.models[name].versions if name in self.models else {}
                plan[name] = {}
                for version, row in entry["versions"].items():
                    engine = current.get(version)
                    if engine is None or engine.digest != row["digest"]:
                        bundle = await anyio.to_thread.run_sync(load_bundle, row["path"])
                        found = Resolved(ModelSpec(row["path"]), name, version, bundle)
                        if found.digest != row["digest"]:
                            raise RepositoryError(f"{row['path']} changed since another worker loaded it (model sha256 {found.digest[:12]}, expected {row['digest'][:12]})")
                        engine = await self._engine(found)
                        started.append(engine)
                    plan[name][version] = engine
        except BaseException:
            for engine in started:
                await engine.stop()
            raise
        kept = {id(e) for versions in plan.values() for e in versions.values()}
        retired = [e for m in self.models.values() for e in m.versions.values() if id(e) not in kept]
        for name, entry in state["models"].items():
            model = self.models.get(name) or ServedModel(name, [])
            model.specs = [parse_spec(s) for s in entry["specs"]]
            model.versions, model.default = plan[name], entry["default"]
            model.weights, model.shadow = dict(entry["weights"]), entry["shadow"]
            self.models[name] = model
        for name in set(self.models) - set(state["models"]):
            del self.models[name]
        self.unavailable = {name: (ServedModel(name, [parse_spec(s) for s in row["specs"]]), row["reason"]) for name, row in state["unavailable"].items()}
        self._from_folders = {parse_spec(s) for s in state["from_folders"]}
        for engine in retired:
            self._retire(engine)
        for engine in started:
            log.info("loaded %s version %s from %s (as another worker did)", engine.name, engine.version, engine.bundle.path)

    def _retire(self, engine: Engine) -> None:
        """Stop an engine once the requests it holds are answered (in the background)."""

        async def drain() -> None:
            await engine.drain()
            await engine.stop()
            model = self.models.get(engine.name)
            if self.metrics is not None and (model is None or engine.version not in model.versions):
                self.metrics.forget(engine.name, engine.version)
            log.info("retired %s version %s", engine.name, engine.version)

        task = asyncio.get_running_loop().create_task(drain())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _bundle_name(spec: ModelSpec) -> str | None:
    """The name a folder bundle without a NAME/ directory serves under: its own (None when it cannot be read)."""
    import json

    try:
        return json.loads((Path(spec.source) / BUNDLE_FILE).read_text()).get("name") or Path(spec.source).name
    except (OSError, ValueError):
        return None


def _is_folder_repository(spec: ModelSpec) -> bool:
    folder = Path(spec.source).expanduser()
    return not spec.source.startswith("models:/") and folder.is_dir() and not _is_bundle_or_run(folder)
