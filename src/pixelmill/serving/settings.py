"""Every knob of ``pixelmill serve`` in one ``BaseSettings``; each also reads ``PIXELMILL_<NAME>``."""

from __future__ import annotations

import json
import os
from typing import Optional

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class ServeSettings(BaseSettings):
    """Settings of the serving process. ``PIXELMILL_MODEL=... PIXELMILL_MAX_BATCH_SIZE=16`` etc."""

    model_config = SettingsConfigDict(env_prefix="PIXELMILL_", extra="ignore", protected_namespaces=())

    model: Optional[str] = Field(None, description="One model: a bundle directory, a run directory (its bundle/) or a models:/name@alias or models:/name/version URI.")
    models: list[str] = Field(
        [], description="Several models (JSON list in PIXELMILL_MODELS): each [NAME[:VERSION]=]SOURCE, SOURCE a bundle, a run, a models:/ URI or a folder of bundles."
    )
    model_version: str = Field("1", description="The version of a model whose SPEC names none and that is not a models:/ URI.")
    traffic: list[str] = Field([], description="Traffic splits, each NAME=VERSION:WEIGHT,VERSION:WEIGHT (weights sum to 100).")
    shadow: list[str] = Field([], description="Shadow versions, each NAME=VERSION: gets a copy of the name's requests; answers are compared and counted only.")
    sticky_header: str = Field("X-Client-Id", description="Requests with the same value of this header go to the same version of a split.")
    providers: Optional[str] = Field(
        None, description="ONNX Runtime execution providers in order of preference, e.g. cuda,cpu or tensorrt,cuda,cpu (default cpu); missing ones fall back to CPU."
    )
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI used to resolve models:/ URIs.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=256, description="uvicorn worker processes, one ONNX Runtime session each.")
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")

    # ONNX Runtime and the dynamic batcher.
    intra_op_threads: Optional[int] = Field(None, ge=1, description="Default: available CPUs // workers.")
    inter_op_threads: int = Field(1, ge=1)
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most images run in one ONNX Runtime call.")
    max_delay_ms: float = Field(5.0, ge=0.0, le=1000.0, description="Longest wait for more requests to fill a batch.")
    max_queue: int = Field(2048, ge=1, description="Images waiting for inference before requests get 503.")
    top_k: int = Field(5, ge=1, description="Default top-k of /predict.")

    # Limits: every one of them answers 4xx instead of doing the work.
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body, counted while it streams.")
    body_timeout_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="Longest time a client may take to send a request body; past it the answer is 408 and the connection is closed."
    )
    header_timeout_s: float = Field(
        10.0, gt=0.0, le=3600.0, description="Longest time a connection may take to send a request head (from connecting or the last response); past it, it is closed."
    )
    max_pixels: int = Field(25_000_000, ge=1, description="Largest width*height of an uploaded image, checked before decoding.")
    max_files: int = Field(32, ge=1, description="Most images in one /predict request.")
    max_infer_batch: int = Field(256, ge=1, description="Largest batch dimension of a v2 infer input tensor.")

    # Safety.
    api_token: Optional[SecretStr] = Field(None, description="If set, every route but liveness needs 'Authorization: Bearer <token>'.")
    admin_token: Optional[SecretStr] = Field(
        None, description="If set, the management routes (/v2/repository/...: load, unload, traffic) need 'Authorization: Bearer <admin token>'."
    )
    rate_limit: float = Field(0.0, ge=0.0, description="Requests per second per client (token bucket); 0 turns it off.")
    rate_burst: int = Field(20, ge=1, description="Bucket size: requests a client may send at once.")

    @model_validator(mode="after")
    def _some_model(self) -> "ServeSettings":
        if not self.specs:
            raise ValueError("no model to serve: give one or more [NAME[:VERSION]=]SOURCE (PIXELMILL_MODEL or PIXELMILL_MODELS)")
        return self

    @property
    def specs(self) -> list[str]:
        """Every model SPEC: ``models``, else the one ``model``."""
        return list(self.models) or ([self.model] if self.model else [])

    @property
    def provider_list(self) -> list[str]:
        """``providers`` as ONNX Runtime's names, in order (CPU last)."""
        from pixelmill.inference.providers import parse_providers

        return parse_providers(self.providers)

    @property
    def ort_intra_threads(self) -> int:
        """ONNX Runtime intra-op threads: explicit, else the CPUs shared out over the workers."""
        return self.intra_op_threads or max(1, available_cpus() // self.workers)


def load_settings(**given: object) -> ServeSettings:
    """Settings from ``given`` (CLI flags) over ``PIXELMILL_*`` variables; a bad value is a ConfigError."""
    from pydantic import ValidationError

    from pixelmill.errors import ConfigError

    try:
        return ServeSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"PIXELMILL_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" if e["loc"] else e["msg"].removeprefix("Value error, ") for e in exc.errors()[:5]
        )
        raise ConfigError(f"invalid serve settings: {problems}") from None


def settings_env(settings: ServeSettings) -> dict[str, str]:
    """The ``PIXELMILL_*`` variables that rebuild ``settings`` in another process (uvicorn workers)."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"PIXELMILL_{name.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return env
