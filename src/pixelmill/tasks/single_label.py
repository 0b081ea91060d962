"""``SingleLabelTask``: the part of the Task protocol every single-label classifier shares (torch-free at import).

One softmax over classes, cross-entropy training, the classification metrics: image and
tabular classification subclass it and add what differs (data, preprocessing, export,
runtime, serving codecs). Its PyTorch side is ``tasks/classification.py``, imported on call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pixelmill.tasks.base import Task


class SingleLabelTask(Task):
    """A task whose model returns one probability vector over classes per input."""

    def eval_images(self, prep: Any) -> Any:
        """``path -> PIL image`` for the plots of misclassified samples, or None when samples are not images."""
        return None

    def lightning_module(self, cfg: Any, net: Any, data: Any) -> Any:
        from pixelmill.tasks.classification import lightning_module

        return lightning_module(cfg, net, data)

    def probabilities(self, logits: Any) -> Any:
        from pixelmill.tasks.classification import softmax

        return softmax(logits)

    def choose_operating_point(self, run_dir: Path, net: Any, data: Any, prep: Any, cfg: Any) -> None:
        """``eval.calibrate=temperature``: fit temperature scaling on val (RUN_DIR/calibration.json)."""
        from pixelmill.tasks.classification import CALIBRATION_FILE, calibrate

        if cfg.eval.calibrate == "none":
            (Path(run_dir) / CALIBRATION_FILE).unlink(missing_ok=True)  # a resumed run whose config dropped calibration
            return
        calibrate(run_dir, net, self.datamodule(cfg, data, prep).eval_loader("val"))

    def evaluate(self, run_dir: Path, net: Any, data: Any, prep: Any, split: str, cfg: Any) -> dict[str, Any]:
        from pixelmill.tasks.classification import evaluate

        loader = self.datamodule(cfg, data, prep).eval_loader(split)
        return evaluate(
            run_dir, loader, data, net, split, list(cfg.eval.top_k), images=self.eval_images(prep), bootstrap=cfg.eval.bootstrap, seed=cfg.seed
        )
