"""Fixtures for training tests: the real digits data, shrunk to a few batches per epoch."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def fast(digits_root: Path, tmp_path: Path):
    """Overrides for a quick deterministic run in ``tmp_path`` (4 batches of 32 per epoch, no final evaluation)."""
    from helpers import fast_train_overrides

    def make(*extra: str, epochs: int = 2) -> list[str]:
        return fast_train_overrides(
            digits_root, tmp_path / "runs", "trainer.limit_train_batches=4", "optim.lr=0.001", "eval.splits=[]", *extra, epochs=epochs
        )

    return make
