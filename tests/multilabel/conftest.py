"""Multi-label fixtures: the built-in multidigits data (small), one trained run and its bundle, shared read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import multilabel_overrides

SMALL = {"train": 360, "val": 120, "test": 120}


@pytest.fixture(scope="session")
def multidigits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pixelmill data demo multidigits`` at a small size: the manifest path (path,labels,split)."""
    from pixelmill.data.demo import write_multidigits

    root = tmp_path_factory.mktemp("multidigits")
    write_multidigits(root, seed=0, per_split=SMALL)
    return root / "manifest.csv"


@pytest.fixture(scope="session")
def multilabel_run(multidigits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished multi-label run (small CNN, a few epochs, val and test evaluated)."""
    from pixelmill.config import load_config
    from pixelmill.training.fit import train

    out = tmp_path_factory.mktemp("multilabel-run")
    result = train(load_config(multilabel_overrides(multidigits, out / "runs", "run_name=shared", "eval.splits=[val,test]", epochs=6)))
    assert result.status == "finished"
    return result.run_dir


@pytest.fixture(scope="session")
def multilabel_bundle(multilabel_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real ``pixelmill export`` of the shared multi-label run."""
    from pixelmill.export import export_run

    return export_run(multilabel_run, out=tmp_path_factory.mktemp("multilabel-bundle") / "bundle").path
