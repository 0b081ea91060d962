"""Plain helpers shared by test modules (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

from pathlib import Path


def fast_train_overrides(data_path: Path, output_dir: Path, *extra: str, epochs: int = 2) -> list[str]:
    """Overrides for a quick deterministic CPU run of the small CNN on 32x32 grayscale digits."""
    return [
        f"data.path={data_path}",
        "model.in_chans=1",
        "data.image_size=32",
        "data.batch_size=32",
        "trainer.limit_train_batches=8",
        "trainer.limit_val_batches=2",
        f"trainer.max_epochs={epochs}",
        "trainer.progress_bar=false",
        "trainer.deterministic=true",
        "optim.lr=0.003",
        "logger=[csv]",
        f"output_dir={output_dir}",
        *extra,
    ]

