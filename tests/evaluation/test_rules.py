"""Operating points (eval.threshold): each rule's threshold does what it states on the validation data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import recall_score, roc_curve

from pixelmill.evaluation.multilabel import choose_thresholds
from pixelmill.evaluation.rules import check_feasible, parse_rule, threshold_for


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    y = (rng.random(600) < 0.3).astype(int)
    return y, np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1).round(3)


def _rates(y, scores, t):
    decided = (scores >= t).astype(int)
    return recall_score(y, decided), recall_score(y, decided, pos_label=0)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_sensitivity_target_is_met_as_specifically_as_possible(scored, target) -> None:
    y, s = scored
    t = threshold_for(f"sensitivity@{target}", y, s)
    sensitivity, specificity = _rates(y, s, t)
    assert sensitivity >= target
    higher = s[s > t]
    if len(higher):  # the next score up already misses the target
        assert _rates(y, s, higher.min())[0] < target


@pytest.mark.parametrize("target", [0.8, 0.95])
def test_specificity_target_is_met_as_sensitively_as_possible(scored, target) -> None:
    y, s = scored
    t = threshold_for(f"specificity@{target}", y, s)
    assert _rates(y, s, t)[1] >= target
    lower = s[s < t]
    if len(lower):
        assert _rates(y, s, lower.max())[1] < target


def test_youden_maximises_sensitivity_plus_specificity(scored) -> None:
    y, s = scored
    t = threshold_for("youden", y, s)
    fpr, tpr, _ = roc_curve(y, s)
    sensitivity, specificity = _rates(y, s, t)
    assert sensitivity + specificity - 1 == pytest.approx((tpr - fpr).max())


def test_rules_parse_and_feasibility_is_checked() -> None:
    assert parse_rule("Sensitivity@0.95") == ("sensitivity", 0.95) and parse_rule("0.3") == ("fixed", 0.3)
    for bad in ("sensitivity@1", "sens@0.9", "youden@0.5", "1.2", ""):
        with pytest.raises(ValueError, match="max_f1, youden, sensitivity@0.95"):
            parse_rule(bad)
    targets = np.array([[1, 0]] * 3 + [[0, 1]] * 30)
    with pytest.raises(ValueError, match="sensitivity@0.99 needs at least 100 positive validation images of 'a' \\(it has 3\\)"):
        check_feasible("sensitivity@0.99", targets, ["a", "b"])
    check_feasible("sensitivity@0.5", targets, ["a", "b"])
    with pytest.raises(ValueError, match="negative validation images of 'b'"):
        check_feasible("specificity@0.9", targets, ["a", "b"])


def test_multilabel_thresholds_follow_the_rule_per_label(scored) -> None:
    y, s = scored
    rng = np.random.default_rng(1)
    y2 = (rng.random(600) < 0.5).astype(int)
    s2 = np.clip(rng.normal(0.4 + 0.2 * y2, 0.2), 0, 1).round(3)
    ys, ps = np.c_[y, y2], np.c_[s, s2]
    t = choose_thresholds(ys, ps, "sensitivity@0.9")
    assert all(_rates(ys[:, j], ps[:, j], t[j])[0] >= 0.9 for j in range(2))
