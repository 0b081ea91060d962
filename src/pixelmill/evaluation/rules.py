"""Decision-threshold rules (``eval.threshold``): parsed and checked without heavy imports, applied with NumPy.

A rule states how the operating point is chosen on the validation split:

- ``max_f1``: the threshold with the best F1;
- ``youden``: the one maximising sensitivity + specificity - 1 (Youden's J);
- ``sensitivity@0.95`` / ``specificity@0.95``: the most specific (sensitive) threshold whose
  sensitivity (specificity) on validation reaches the target;
- a probability such as ``0.5``: that threshold;
- ``auto`` (the default): ``max_f1`` for multi-label models; ``0.5`` for binary ones, which is
  the plain argmax decision, so a binary model decides as it always did unless a rule is stated.

A target of ``x`` is only meaningful with at least ``1 / (1 - x)`` validation samples of the
class it is measured on (100 positives for sensitivity@0.99): with fewer, one sample decides
between 0% and 100% misses. Such a rule is refused before training, naming the label.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # NumPy loads when a rule is applied, not when the config parses it
    import numpy as np

RULE_HELP = "auto, max_f1, youden, sensitivity@0.95, specificity@0.95 (any target in (0, 1)) or a probability such as 0.5"


def parse_rule(text: object) -> tuple[str, float | None]:
    """``(kind, value)``: ("auto", None), ("max_f1", None), ("youden", None), ("sensitivity", 0.95), ("specificity", 0.9) or ("fixed", 0.5).

    ValueError with the accepted forms otherwise.
    """
    rule = str(text).strip().lower()
    if rule in ("auto", "max_f1", "youden"):
        return rule, None
    kind, _, target = rule.partition("@")
    if kind in ("sensitivity", "specificity"):
        value = _probability(target)
        if value is not None:
            return kind, value
    else:
        value = _probability(rule)
        if value is not None:
            return "fixed", value
    raise ValueError(f"threshold rule '{text}' is not one of: {RULE_HELP}")


def resolve(text: object, default: str) -> str:
    """The rule to apply: ``text`` itself, or the task's ``default`` when it is ``auto``."""
    rule = str(text).strip().lower()
    return default if rule == "auto" else rule


def _probability(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0.0 < value < 1.0 else None


def needed(target: float) -> int:
    """Samples of the measured class a target of ``target`` needs to be more than one sample's worth."""
    return math.ceil(1.0 / (1.0 - target) - 1e-9)


def check_feasible(rule: str, targets: np.ndarray, labels: Sequence[str], noun: str = "images") -> None:
    """ValueError naming the first label whose validation samples cannot support ``rule`` ((N, L) 0/1 targets)."""
    kind, value = parse_rule(rule)
    if kind not in ("sensitivity", "specificity"):
        return
    counts = targets.sum(axis=0) if kind == "sensitivity" else (1 - targets).sum(axis=0)
    kind_noun = "positive" if kind == "sensitivity" else "negative"
    for name, count in zip(labels, counts):
        if count < needed(value):
            raise ValueError(
                f"eval.threshold={rule} needs at least {needed(value)} {kind_noun} validation {noun} of '{name}' "
                f"(it has {int(count)}); lower the target or add validation data"
            )


def threshold_for(rule: str, y: np.ndarray, scores: np.ndarray) -> float | None:
    """The threshold ``rule`` picks for one binary problem (0/1 ``y``, ``scores``; decide ``scores >= t``).

    None for ``max_f1`` (the caller's own) and when ``y`` lacks a class the rule needs.
    """
    kind, value = parse_rule(rule)
    if kind == "fixed":
        return value
    if kind == "max_f1" or y.min() == y.max():
        return None
    import numpy as np
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(y, scores, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # the first point (t = inf) decides nothing
    if kind == "youden":
        j = tpr - fpr
        return float(thresholds[np.flatnonzero(j >= j.max() - 1e-12)].max())  # ties: the higher threshold
    if kind == "sensitivity":
        return float(thresholds[tpr >= value - 1e-12].max())  # the most specific one that reaches the target
    specific = thresholds[1.0 - fpr >= value - 1e-12]
    if not len(specific):  # negatives tie with the top score: only deciding nothing is specific enough
        return float(np.nextafter(scores.max(), np.inf))
    return float(specific.min())  # specificity: the most sensitive one that reaches the target
