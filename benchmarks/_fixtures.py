"""Real bundles for the inference, serving and start-up benchmarks: a briefly trained run, exported.

Quick modes reuse a bundle kept under the temp dir (checked with ``read_bundle``, which
verifies its hashes, and rebuilt if it is missing, broken or from another pixelmill version);
full runs always train and export afresh, from the code as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from _photos import bench_dir, locked, photo_dir


def train_run(model: str, size: int, out: Path, extra: list[str] = (), photos: int = 64, epochs: int = 1, batches: int | float = 2, batch_size: int = 8) -> Path:
    """A run of ``model`` at ``size`` px on ``photos`` benchmark photos (``batches`` per epoch, all if 1.0); its run directory."""
    from pixelmill.config import load_config
    from pixelmill.training.fit import train

    cfg = load_config([
        f"data.path={photo_dir(photos)}", f"model.name={model}", f"data.image_size={size}", f"data.batch_size={batch_size}",
        f"trainer.max_epochs={epochs}", f"trainer.limit_train_batches={batches}", "trainer.limit_val_batches=1",
        "trainer.progress_bar=false", "logger=[csv]", "eval.splits=[]", f"output_dir={out / 'runs'}",
        f"run_name={model}-{size}", *extra,
    ])
    return train(cfg).run_dir


def train_and_export(model: str, size: int, out: Path, extra: list[str] = ()) -> Path:
    """A run of ``model`` at ``size`` px (two small batches on the benchmark photos), exported to ``out``/runs/<model>/bundle."""
    from pixelmill.export import export_run

    return export_run(train_run(model, size, out, extra), max_images=8).path


def cached_bundle(model: str, size: int) -> Path:
    """A bundle of ``model`` at ``size`` px kept across quick runs (made on first use)."""
    from pixelmill import __version__
    from pixelmill.errors import PixelmillError
    from pixelmill.export.bundle import read_bundle

    base = bench_dir() / f"bundle-{model}-{size}"
    with locked(base):
        try:
            bundle = read_bundle(base / "runs" / "default" / f"{model}-{size}" / "bundle")
            if bundle.meta.get("versions", {}).get("pixelmill") == __version__:
                return bundle.path
        except (PixelmillError, OSError, KeyError, ValueError):
            pass
        shutil.rmtree(base, ignore_errors=True)
        return train_and_export(model, size, base)
