"""The model bundle: ``bundle.json`` + model file, written and read with sha256 checks.

Torch-free on purpose (stdlib, pydantic): serving reads bundles without PyTorch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from pixelmill.data.preprocess import Preprocessing
from pixelmill.errors import BundleError
from pixelmill.runs import write_atomic

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "pixelmill-bundle"
BUNDLE_FORMAT_VERSION = 1
_CHUNK = 1 << 20


class TensorInfo(BaseModel):
    """A model input or output: its name, element type, layout and shape (-1: any batch size)."""

    model_config = ConfigDict(extra="allow")

    name: str
    dtype: Optional[str] = None
    layout: Optional[str] = None
    shape: list[int] = []


class BundleMeta(BaseModel):
    """``bundle.json``, typed. The task (``kind``) owns ``input``/``inputs``, ``output`` and ``preprocessing``.

    Unknown keys are kept: a task may add its own (tabular: ``schema``).
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format: str = BUNDLE_FORMAT
    format_version: int = BUNDLE_FORMAT_VERSION
    kind: str  # the task that reads this bundle (pixelmill.tasks.TASKS)
    name: Optional[str] = None
    model_name: Optional[str] = None
    model_file: str
    classes: list[str]
    input: Optional[TensorInfo] = None  # one tensor input (images)
    inputs: Optional[list[dict[str, Any]]] = None  # one input per column (tables)
    output: TensorInfo
    preprocessing: dict[str, Any]
    metrics: dict[str, Any] = {}
    data_fingerprint: Optional[str] = None
    run: dict[str, Any] = {}
    versions: dict[str, str] = {}
    created_at: Optional[str] = None
    export: dict[str, Any] = {}
    thresholds: Optional[dict[str, float]] = None  # multi-label: label -> decision threshold
    threshold: Optional[float] = None  # binary: decide positive_class where its probability reaches it
    positive_class: Optional[str] = None
    files: dict[str, str] = {}

    @property
    def model_format(self) -> str:
        """``"onnx"`` or ``"torchscript"``."""
        return str(self.export.get("format", "onnx"))


@dataclass(frozen=True)
class Bundle:
    """A bundle directory and its parsed ``bundle.json`` (``meta`` as written, ``info`` typed)."""

    path: Path
    meta: dict
    info: BundleMeta = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "info", BundleMeta.model_validate(self.meta))  # typed once, when the bundle is read or written

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.info.preprocessing)

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def name(self) -> str:
        return self.info.name or self.path.name

    @property
    def model_file(self) -> Path:
        return self.path / self.info.model_file

    @property
    def input_name(self) -> str:
        return self.info.input.name if self.info.input else ""

    @property
    def output_name(self) -> str:
        return self.info.output.name

    @property
    def model_format(self) -> str:
        """``"onnx"`` or ``"torchscript"``."""
        return self.info.model_format


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bundle(out_dir: Path, meta: dict, files: list[str]) -> Bundle:
    """Hash ``files`` (already inside ``out_dir``) into ``meta["files"]``; write bundle.json atomically."""
    out_dir = Path(out_dir)
    hashes: dict[str, str] = {}
    for name in files:
        path = out_dir / name
        if not path.is_file():
            raise BundleError(f"Cannot write bundle: {path} does not exist.")
        hashes[name] = sha256_file(path)
    meta = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, **meta, "files": hashes}
    meta["meta_sha256"] = _meta_digest(meta)
    write_atomic(out_dir / BUNDLE_FILE, json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return Bundle(path=out_dir.resolve(), meta=meta)


def _load_meta(path: Path) -> dict[str, Any]:
    meta_path = path / BUNDLE_FILE
    if not path.is_dir():
        raise BundleError(f"Bundle directory {path} does not exist; run `pixelmill export RUN_DIR` first.")
    if not meta_path.is_file():
        raise BundleError(f"{path} is not a bundle: no {BUNDLE_FILE}. Run `pixelmill export RUN_DIR` to make one.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path} is corrupt or truncated ({exc}); export the bundle again.") from exc
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path} is not a pixelmill bundle (format != {BUNDLE_FORMAT!r}).")
    if int(meta.get("format_version", 0)) > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{meta_path} has format_version {meta.get('format_version')}; this pixelmill reads "
            f"up to {BUNDLE_FORMAT_VERSION}. Upgrade pixelmill."
        )
    for key in ("kind", "model_file", "classes", "preprocessing", "output", "files"):
        if key not in meta:
            raise BundleError(f"{meta_path} lacks the key {key!r}; export the bundle again.")
    return meta


def _meta_digest(meta: dict) -> str:
    """sha256 of bundle.json's own content: class names and preprocessing cannot be edited unseen."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_files(path: Path, meta: dict) -> None:
    """Raise BundleError if bundle.json was edited, or any listed file is missing or its sha256 differs."""
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise BundleError(
            f"Bundle {path}: {BUNDLE_FILE} was edited after export (classes, preprocessing or hashes changed); "
            "export the bundle again."
        )
    files = meta["files"]
    if meta["model_file"] not in files:
        raise BundleError(f"Bundle {path}: model file {meta['model_file']!r} has no sha256 in {BUNDLE_FILE}.")
    for name, expected in files.items():
        file_path = path / name
        if not file_path.is_file():
            raise BundleError(f"Bundle {path}: file {name} is missing; export the bundle again.")
        actual = sha256_file(file_path)
        if actual != expected:
            raise BundleError(
                f"Bundle {path}: {name} is tampered or truncated (sha256 {actual[:12]}... != "
                f"expected {expected[:12]}...); export the bundle again."
            )


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle directory (or its bundle.json); verify every file's sha256 unless told not to."""
    path = Path(path).expanduser()
    if path.name == BUNDLE_FILE and path.is_file():
        path = path.parent
    meta = _load_meta(path)
    try:
        bundle = Bundle(path=path.resolve(), meta=meta)
    except ValueError as exc:  # pydantic's ValidationError: a key of the wrong type
        first = str(exc).splitlines()[1:3]
        raise BundleError(f"{path / BUNDLE_FILE} is malformed ({' '.join(first)}); export the bundle again.") from None
    if verify:
        verify_files(path, meta)
    return bundle


def is_bundle_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory holding a bundle.json."""
    return (Path(path) / BUNDLE_FILE).is_file()
