"""compute_metrics / write_evaluation on real, imperfect predictions (digits + LogisticRegression)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, classification_report, log_loss, roc_auc_score
from sklearn.model_selection import train_test_split

from pixelmill.evaluation.metrics import (
    classification_report_text,
    compute_metrics,
    expected_calibration_error,
    write_evaluation,
)

CLASS_NAMES = [f"digit_{i}" for i in range(10)]
PLOTS = ["confusion_matrix.png", "confusion_matrix_normalized.png", "roc.png", "pr.png"]


@pytest.fixture(scope="module")
def digits():
    """Real predictions: a LogisticRegression trained on 150 digits, scored on the other 1647."""
    data = load_digits()
    index = np.arange(len(data.target))
    x_train, x_test, y_train, y_test, _, idx_test = train_test_split(
        data.data / 16.0, data.target, index, train_size=150, stratify=data.target, random_state=0
    )
    model = LogisticRegression(max_iter=300).fit(x_train, y_train)
    probs = model.predict_proba(x_test)
    ids = [f"digits/{data.target[i]}/{i:04d}.png" for i in idx_test]
    images = {sid: Image.fromarray((data.images[i] * 255 / 16).astype(np.uint8)) for sid, i in zip(ids, idx_test)}
    return {"y": y_test, "probs": probs, "ids": ids, "images": images}


def test_predictions_are_real_and_imperfect(digits):
    accuracy = (digits["probs"].argmax(1) == digits["y"]).mean()
    assert 0.7 < accuracy < 0.99


def test_matches_sklearn_classification_report(digits):
    y, probs = digits["y"], digits["probs"]
    m = compute_metrics(y, probs, CLASS_NAMES)
    ref = classification_report(
        y, probs.argmax(1), labels=list(range(10)), target_names=CLASS_NAMES, output_dict=True, zero_division=0
    )
    assert m["accuracy"] == pytest.approx(ref["accuracy"])
    for average in ("macro", "weighted"):
        for key in ("precision", "recall", "f1"):
            assert m[f"{key}_{average}"] == pytest.approx(ref[f"{average} avg"][f"{key}-score" if key == "f1" else key])
    for name in CLASS_NAMES:
        assert m["per_class"][name]["precision"] == pytest.approx(ref[name]["precision"])
        assert m["per_class"][name]["recall"] == pytest.approx(ref[name]["recall"])
        assert m["per_class"][name]["f1"] == pytest.approx(ref[name]["f1-score"])
        assert m["per_class"][name]["support"] == ref[name]["support"]
    assert m["n"] == len(y)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))
    assert m["log_loss"] == pytest.approx(log_loss(y, probs))


def test_auc_matches_sklearn_one_vs_rest(digits):
    y, probs = digits["y"], digits["probs"]
    m = compute_metrics(y, probs, CLASS_NAMES)
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    per_class = roc_auc_score(y, probs, multi_class="ovr", average=None)
    assert [m["per_class"][n]["auc"] for n in CLASS_NAMES] == pytest.approx(list(per_class))


def test_confusion_matrix_rows_are_true_classes(digits):
    y, probs = digits["y"], digits["probs"]
    cm = np.array(compute_metrics(y, probs, CLASS_NAMES)["confusion_matrix"])
    assert cm.shape == (10, 10)
    assert list(cm.sum(axis=1)) == list(np.bincount(y, minlength=10))
    assert list(cm.sum(axis=0)) == list(np.bincount(probs.argmax(1), minlength=10))
    assert np.trace(cm) == (probs.argmax(1) == y).sum()


def test_class_absent_from_y_true(digits):
    keep = digits["y"] != 3
    y, probs = digits["y"][keep], digits["probs"][keep]
    m = compute_metrics(y, probs, CLASS_NAMES)
    absent = m["per_class"]["digit_3"]
    assert absent["support"] == 0 and absent["recall"] == 0.0 and absent["auc"] is None
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (10, 10) and cm[3].sum() == 0
    present = [c for c in range(10) if c != 3]
    expected = np.mean([roc_auc_score(y == c, probs[:, c]) for c in present])
    assert m["auc_macro"] == pytest.approx(expected)
    json.dumps(m, allow_nan=False)


def test_auc_is_none_when_only_one_class_is_present(digits):
    keep = digits["y"] == 5
    m = compute_metrics(digits["y"][keep], digits["probs"][keep], CLASS_NAMES)
    assert m["auc_macro"] is None
    assert all(row["auc"] is None for row in m["per_class"].values())


def test_top_k_accuracy(digits):
    y, probs = digits["y"], digits["probs"]
    m = compute_metrics(y, probs, CLASS_NAMES, top_k=(1, 3, 5, 10, 20))
    ranked = np.argsort(-probs, axis=1)
    for k in (1, 3, 5):
        assert m[f"top{k}_acc"] == pytest.approx((ranked[:, :k] == y[:, None]).any(axis=1).mean())
    assert m["top1_acc"] == pytest.approx(m["accuracy"])
    assert m["top1_acc"] < m["top3_acc"] <= m["top5_acc"] <= 1.0
    assert "top10_acc" not in m and "top20_acc" not in m  # k >= C is trivially 1


def test_binary_problem():
    y = np.array([0, 0, 1, 1, 1, 0])
    p1 = np.array([0.2, 0.6, 0.7, 0.9, 0.4, 0.1])
    m = compute_metrics(y, np.stack([1 - p1, p1], axis=1), ["cat", "dog"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["top1_acc"] == pytest.approx(4 / 6)
    assert "top5_acc" not in m
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, p1))


def test_ece_zero_for_confident_correct_and_positive_otherwise(digits):
    y = np.array([0, 1, 2, 1])
    one_hot = np.eye(3)[y]
    assert compute_metrics(y, one_hot, ["a", "b", "c"])["ece"] == pytest.approx(0.0)
    # every prediction right at confidence 0.9 -> over 10 % under-confident
    probs = np.full((4, 3), 0.05)
    probs[np.arange(4), y] = 0.9
    assert expected_calibration_error(y, probs) == pytest.approx(0.1)
    assert 0.0 < compute_metrics(digits["y"], digits["probs"], CLASS_NAMES)["ece"] < 0.5


def test_metrics_are_plain_json(digits):
    m = compute_metrics(digits["y"], digits["probs"].astype(np.float32), CLASS_NAMES)
    assert json.loads(json.dumps(m, allow_nan=False)) == m
    for key, value in m.items():
        if key not in ("per_class", "confusion_matrix"):
            assert value is None or type(value) in (int, float), key
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)
    assert {"accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "auc_macro", "log_loss", "ece"} <= set(m)


def test_bad_inputs_are_rejected(digits):
    y, probs = digits["y"], digits["probs"]
    with pytest.raises(ValueError, match="class names"):
        compute_metrics(y, probs, CLASS_NAMES[:9])
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(y[:-1], probs, CLASS_NAMES)
    with pytest.raises(ValueError, match="sum to 1"):
        compute_metrics(y, probs * 3, CLASS_NAMES)


def test_classification_report_text_lists_every_class(digits):
    keep = digits["y"] != 3
    text = classification_report_text(digits["y"][keep], digits["probs"][keep], CLASS_NAMES)
    assert all(name in text for name in CLASS_NAMES)
    assert "accuracy" in text and "macro avg" in text


def _assert_png(path, min_side=300):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side and max(image.size) <= 4000
        assert np.asarray(image.convert("L")).std() > 5  # not a blank canvas


def test_write_evaluation_writes_every_file(tmp_path, digits):
    y, probs, ids = digits["y"], digits["probs"], digits["ids"]
    out = tmp_path / "eval" / "test"
    metrics = write_evaluation(out, y, probs, CLASS_NAMES, ids, images=digits["images"].__getitem__)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert "macro avg" in (out / "classification_report.txt").read_text()

    with (out / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(y)
    assert list(rows[0]) == ["path", "true", "predicted", "confidence", *[f"p_{c}" for c in CLASS_NAMES]]
    assert [r["path"] for r in rows] == ids
    assert [r["true"] for r in rows] == [CLASS_NAMES[t] for t in y]
    assert [r["predicted"] for r in rows] == [CLASS_NAMES[t] for t in probs.argmax(1)]
    first = np.array([float(rows[0][f"p_{c}"]) for c in CLASS_NAMES])
    assert first == pytest.approx(probs[0], abs=1e-6)
    assert float(rows[0]["confidence"]) == pytest.approx(probs[0].max(), abs=1e-6)

    for name in PLOTS + ["misclassified.png"]:
        _assert_png(out / name)


def test_write_evaluation_without_mistakes_has_no_gallery(tmp_path, digits):
    y, ids = digits["y"][:40], digits["ids"][:40]
    perfect = np.eye(10)[y] * 0.9 + 0.01
    out = tmp_path / "eval"
    # a gallery from an earlier, imperfect evaluation into the same directory must not survive
    write_evaluation(out, y, np.roll(perfect, 1, axis=1), CLASS_NAMES, ids, images=digits["images"].__getitem__)
    assert (out / "misclassified.png").is_file()
    metrics = write_evaluation(out, y, perfect, CLASS_NAMES, ids, images=digits["images"].__getitem__)
    assert metrics["accuracy"] == 1.0
    assert not (out / "misclassified.png").exists()
    assert all((out / name).is_file() for name in PLOTS)


def test_write_evaluation_without_images_has_no_gallery(tmp_path, digits):
    write_evaluation(tmp_path, digits["y"][:200], digits["probs"][:200], CLASS_NAMES, digits["ids"][:200])
    assert not (tmp_path / "misclassified.png").exists()
    assert (tmp_path / "predictions.csv").is_file()
