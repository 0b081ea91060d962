"""Fixtures for training tests: the real digits data, shrunk to a few batches per epoch."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def fast(digits_root: Path, tmp_path: Path):
    """Overrides for a quick deterministic CPU run in ``tmp_path`` (4 batches of 32 per epoch)."""

    def make(*extra: str, epochs: int = 2) -> list[str]:
        return [
            f"data.path={digits_root}",
            "model.in_chans=1",
            "data.image_size=32",
            "data.batch_size=32",
            "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=2",
            f"trainer.max_epochs={epochs}",
            "trainer.progress_bar=false",
            "trainer.deterministic=true",
            "logger=[csv]",
            f"output_dir={tmp_path / 'runs'}",
            "eval.splits=[]",  # most tests skip the final evaluation
            *extra,
        ]

    return make
