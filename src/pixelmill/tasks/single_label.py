"""``SingleLabelTask``: the part of the Task protocol every single-label classifier shares (torch-free at import).

One softmax over classes, cross-entropy training, the classification metrics: image and
tabular classification subclass it and add what differs (data, preprocessing, export,
runtime, serving codecs). Its PyTorch side is ``tasks/classification.py``, imported on call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pixelmill.errors import ConfigError, DataError
from pixelmill.evaluation.rules import check_feasible, parse_rule
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

    def check_data(self, cfg: Any, data: Any) -> None:
        """A binary model's operating point and calibration need what the val split has; other models take no threshold."""
        classes = list(data.classes)
        if cfg.eval.calibrate == "platt":
            raise ConfigError("eval.calibrate=platt applies to multi-label models; a single-label model takes eval.calibrate=temperature")
        val = data.class_counts("val")
        if cfg.eval.calibrate != "none" and sum(1 for n in val.values() if n) < 2:
            raise DataError(f"eval.calibrate={cfg.eval.calibrate} needs validation samples of at least 2 classes; the val split has {_counted(val)}")
        stated = parse_rule(cfg.eval.threshold)[0] != "auto" or cfg.eval.positive_class
        if len(classes) != 2:
            if stated:
                raise ConfigError(f"eval.threshold and eval.positive_class apply to binary models; this one has {len(classes)} classes, so drop them")
            return
        positive = positive_class(cfg, classes)
        if parse_rule(cfg.eval.threshold)[0] not in ("auto", "fixed") and sum(1 for n in val.values() if n) < 2:
            raise DataError(f"eval.threshold={cfg.eval.threshold} is chosen on validation samples of both classes; the val split has {_counted(val)}")
        n_positive = val.get(positive, 0)
        y = np.repeat([1, 0], [n_positive, sum(val.values()) - n_positive])[:, None]  # the val targets, as check_feasible counts them
        try:
            check_feasible(str(cfg.eval.threshold), y, [positive], self.sample_noun)
        except ValueError as exc:
            raise DataError(str(exc)) from None

    def choose_operating_point(self, run_dir: Path, net: Any, data: Any, prep: Any, cfg: Any) -> None:
        """On val with the best weights: ``eval.calibrate`` (RUN_DIR/calibration.json) and, for a binary model,
        the decision threshold of ``eval.threshold`` (RUN_DIR/threshold.json)."""
        from pixelmill.tasks.classification import choose_operating_point

        binary = len(data.classes) == 2
        needed = data.splits.get("val") and (cfg.eval.calibrate != "none" or binary)
        loader = self.datamodule(cfg, data, prep).eval_loader("val") if needed else None
        positive = positive_class(cfg, list(data.classes)) if binary else None
        choose_operating_point(run_dir, net, loader, cfg.eval.calibrate, str(cfg.eval.threshold), positive, list(data.classes))

    def evaluate(self, run_dir: Path, net: Any, data: Any, prep: Any, split: str, cfg: Any) -> dict[str, Any]:
        from pixelmill.tasks.classification import evaluate

        loader = self.datamodule(cfg, data, prep).eval_loader(split)
        return evaluate(
            run_dir, loader, data, net, split, list(cfg.eval.top_k), images=self.eval_images(prep), bootstrap=cfg.eval.bootstrap, seed=cfg.seed,
            prep=prep,
        )


def positive_class(cfg: Any, classes: list[str]) -> str:
    """The class a binary model's threshold decides for: ``eval.positive_class``, else the second class
    (scikit-learn's ``pos_label=1``: with folders ``benign``/``malignant``, ``malignant``)."""
    chosen = str(cfg.eval.positive_class or classes[1])
    if chosen not in classes:
        raise ConfigError(f"eval.positive_class '{chosen}' is not a class of this data; choose {' or '.join(classes)}")
    return chosen


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in counts.items()) or "no samples"
