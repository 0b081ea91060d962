"""The model bundle: ``bundle.json`` + model file, written and read with sha256 checks.

Torch-free on purpose (stdlib + numpy only): serving reads bundles without PyTorch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixelmill.data.preprocess import Preprocessing
from pixelmill.errors import BundleError
from pixelmill.runs import write_atomic

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "pixelmill-bundle"
BUNDLE_FORMAT_VERSION = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Bundle:
    """A bundle directory and its parsed ``bundle.json``."""

    path: Path
    meta: dict

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "image"))

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def model_file(self) -> Path:
        return self.path / self.meta["model_file"]

    @property
    def input_name(self) -> str:
        return str(self.meta.get("input", {}).get("name", "image"))

    @property
    def output_name(self) -> str:
        return str(self.meta.get("output", {}).get("name", "probabilities"))

    @property
    def model_format(self) -> str:
        """``"onnx"`` or ``"torchscript"``."""
        return str(self.meta.get("export", {}).get("format", "onnx"))


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
    meta = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "kind": "image",
        **meta,
        "files": hashes,
    }
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
    for key in ("model_file", "classes", "preprocessing", "files"):
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
    if verify:
        verify_files(path, meta)
    return Bundle(path=path.resolve(), meta=meta)


def is_bundle_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory holding a bundle.json."""
    return (Path(path) / BUNDLE_FILE).is_file()
