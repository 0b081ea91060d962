"""``evaluate_run``: run a trained run's checkpoint over a split (or other data) and write ``RUN_DIR/eval/<name>/`` and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pixelmill import runs
from pixelmill.errors import ConfigError

SPLITS = ("train", "val", "test")


def evaluate_run(
    run_dir: str | Path, split: str = "test", data: str | Path | None = None, checkpoint: str = "best"
) -> tuple[dict[str, Any], Path]:
    """Evaluate a trained run's checkpoint on one of its splits, or on other data of its task (a folder, a CSV).

    Returns the metrics and the folder they were written to (``RUN_DIR/eval/<name>``).
    """
    from pixelmill.evaluation.report import write_report

    if split not in SPLITS:
        raise ConfigError(f"bad split '{split}'; choose one of: {', '.join(SPLITS)}")
    run = runs.load_run(run_dir, checkpoint)
    samples, name = run.task.evaluation_data(run.config, run.run_dir, run.classes, split, Path(data) if data is not None else None)
    metrics = run.task.evaluate(run.run_dir, run.net, samples, run.preprocessing, name, run.config)
    write_report(run.run_dir)
    return metrics, run.run_dir / "eval" / name
