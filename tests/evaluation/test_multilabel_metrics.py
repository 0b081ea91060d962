"""Multi-label evaluation: thresholds, metrics.json against scikit-learn, predictions.csv, plots and the report."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    hamming_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pixelmill.evaluation.multilabel import choose_thresholds, multilabel_metrics, write_multilabel_evaluation
from pixelmill.evaluation.report import write_report

LABELS = ["cat", "dog", "car", "tree", "person", "sky"]
PLOTS = ["plots/roc.png", "plots/pr.png", "plots/label_confusion.png", "plots/label_cooccurrence.png"]
SCALAR_KEYS = {"n", "map", "auc_macro", "f1_micro", "f1_macro", "precision_micro", "recall_micro", "precision_macro", "recall_macro", "subset_accuracy", "hamming_loss", "label_cardinality", "no_label_share"}
PER_LABEL_KEYS = {
    "precision", "recall", "f1", "auc", "ap", "support", "threshold", "tp", "fp", "fn", "tn", "sensitivity", "specificity", "ppv", "npv",
}
HEADLINE = ["map", "auc_macro", "f1_micro", "f1_macro", "subset_accuracy", "hamming_loss"]


def _sample(n: int, prevalence: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded targets (N, L) and imperfect sigmoid probabilities that track them."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(prevalence))) < np.array(prevalence)).astype(np.int64)
    logits = (2 * y - 1) * rng.uniform(0.3, 2.0, size=len(prevalence)) + rng.normal(0.0, 1.2, size=y.shape)
    # float32 as a network outputs them; round so that ties between scores occur too
    probs = np.round(1 / (1 + np.exp(-logits)), 3).astype(np.float32)
    return y, probs


@pytest.fixture(scope="module")
def random_data() -> tuple[np.ndarray, np.ndarray]:
    return _sample(400, [0.45, 0.3, 0.15, 0.08, 0.5, 0.2], seed=7)


@pytest.fixture(scope="module")
def handmade() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """'bird' is never true (no positive) and 'sky' always is (no negative)."""
    labels = ["cat", "dog", "bird", "sky"]
    y = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1], [1, 1, 0, 1]])
    probs = np.array(
        [
            [0.9, 0.2, 0.1, 0.8],
            [0.3, 0.7, 0.6, 0.9],
            [0.6, 0.4, 0.2, 0.4],
            [0.55, 0.1, 0.0, 0.7],
            [0.8, 0.65, 0.3, 0.95],
            [0.1, 0.9, 0.05, 0.6],
            [0.2, 0.3, 0.7, 0.85],
            [0.4, 0.8, 0.1, 0.75],
        ]
    )
    return y, probs, labels


def _expected(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, labels: list[str]) -> dict:
    """metrics.json as scikit-learn computes it, figure by figure, independently of pixelmill."""
    probs = np.asarray(probs, dtype=np.float64)
    pred = (probs >= thresholds).astype(int)
    has_pos = [j for j in range(y.shape[1]) if y[:, j].sum() > 0]
    has_both = [j for j in has_pos if y[:, j].sum() < len(y)]
    ap = {j: average_precision_score(y[:, j], probs[:, j]) for j in has_pos}
    auc = {j: roc_auc_score(y[:, j], probs[:, j]) for j in has_both}
    expected = {
        "task": "multilabel",
        "n": len(y),
        "labels": labels,
        "thresholds": {name: float(thresholds[j]) for j, name in enumerate(labels)},
        "map": average_precision_score(y[:, has_pos], probs[:, has_pos], average="macro") if has_pos else None,
        "auc_macro": roc_auc_score(y[:, has_both], probs[:, has_both], average="macro") if has_both else None,
        "f1_micro": f1_score(y, pred, average="micro", zero_division=0),
        "f1_macro": f1_score(y, pred, average="macro", zero_division=0),
        "precision_micro": precision_score(y, pred, average="micro", zero_division=0),
        "recall_micro": recall_score(y, pred, average="micro", zero_division=0),
        "precision_macro": precision_score(y, pred, average="macro", zero_division=0),
        "recall_macro": recall_score(y, pred, average="macro", zero_division=0),
        "subset_accuracy": accuracy_score(y, pred),
        "hamming_loss": hamming_loss(y, pred),
        "label_cardinality": y.sum() / len(y),
        "no_label_share": np.mean(y.sum(axis=1) == 0),
        "per_label": {},
    }
    precision = precision_score(y, pred, average=None, zero_division=0)
    recall = recall_score(y, pred, average=None, zero_division=0)
    f1 = f1_score(y, pred, average=None, zero_division=0)
    for j, name in enumerate(labels):
        tn, fp, fn, tp = confusion_matrix(y[:, j], pred[:, j], labels=[0, 1]).ravel()
        expected["per_label"][name] = {
            "precision": precision[j],
            "recall": recall[j],
            "f1": f1[j],
            "auc": auc.get(j),
            "ap": ap.get(j),
            "support": int(y[:, j].sum()),
            "threshold": float(thresholds[j]),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "sensitivity": recall_score(y[:, j], pred[:, j], zero_division=0),
            "specificity": recall_score(y[:, j], pred[:, j], pos_label=0) if (tn + fp) else None,
            "ppv": precision[j],
            "npv": precision_score(y[:, j], pred[:, j], pos_label=0, zero_division=0) if (tn + fn) else None,
        }
    return expected


def _assert_matches(metrics: dict, expected: dict) -> None:
    assert set(metrics) == set(expected), "every key of metrics.json is checked below"
    for key in ("task", "n", "labels", "thresholds"):
        assert metrics[key] == expected[key], key
    for key in SCALAR_KEYS:
        if expected[key] is None:
            assert metrics[key] is None, key
        else:
            assert type(metrics[key]) in (int, float) and metrics[key] == pytest.approx(expected[key], abs=1e-12), key
    assert list(metrics["per_label"]) == expected["labels"]
    for name, row in metrics["per_label"].items():
        assert set(row) == PER_LABEL_KEYS
        for key, value in expected["per_label"][name].items():
            if value is None:
                assert row[key] is None, (name, key)
            else:
                assert row[key] == pytest.approx(value, abs=1e-12), (name, key)
        assert all(type(row[k]) is int for k in ("support", "tp", "fp", "fn", "tn"))


def _brute_force_f1(y: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    return f1_score(y, (scores >= threshold).astype(int), zero_division=0)


# ---------------------------------------------------------------------------------------------
# thresholds


def test_max_f1_thresholds_are_the_best_score_values(random_data):
    y, probs = random_data
    thresholds = choose_thresholds(y, probs, "max_f1")
    assert thresholds.shape == (len(LABELS),) and thresholds.dtype == np.float64
    for j in range(len(LABELS)):
        scores = probs[:, j]
        candidates = np.unique(scores).astype(np.float64)
        f1s = np.array([_brute_force_f1(y[:, j], scores, t) for t in candidates])
        best = f1s.max()
        chosen = _brute_force_f1(y[:, j], scores, thresholds[j])
        assert chosen == pytest.approx(best, abs=1e-12)
        assert chosen >= _brute_force_f1(y[:, j], scores, 0.5)
        assert thresholds[j] in candidates  # an exact probability, no midpoint
        assert thresholds[j] == candidates[np.isclose(f1s, best, rtol=0, atol=1e-12)].max()  # ties: the higher


def test_max_f1_tie_goes_to_the_higher_threshold():
    # t=0.9: TP 1, FP 0, FN 1 and t=0.3: TP 2, FP 2, FN 0 both give F1 2/3
    y = np.array([[1], [0], [0], [1]])
    probs = np.array([[0.9], [0.7], [0.6], [0.3]])
    assert _brute_force_f1(y[:, 0], probs[:, 0], 0.9) == pytest.approx(_brute_force_f1(y[:, 0], probs[:, 0], 0.3))
    assert choose_thresholds(y, probs, "max_f1").tolist() == [0.9]


def test_label_without_positives_gets_one_half(handmade):
    y, probs, _ = handmade
    thresholds = choose_thresholds(y, probs, "max_f1")
    assert thresholds[2] == 0.5
    assert thresholds[3] == probs[:, 3].min()  # always true: predicting it everywhere is the only F1 of 1


def test_fixed_threshold_and_bad_rules(random_data):
    y, probs = random_data
    assert choose_thresholds(y, probs, 0.5).tolist() == [0.5] * len(LABELS)
    assert choose_thresholds(y, probs, 0.3).tolist() == [0.3] * len(LABELS)
    assert choose_thresholds(y, probs, "0.5").tolist() == [0.5] * len(LABELS)  # the config's text form
    for rule in ("mean", "sens@0.9", "sensitivity@1.5", None, True, 1.5, -0.1, float("nan"), [0.5]):
        with pytest.raises(ValueError):
            choose_thresholds(y, probs, rule)


# ---------------------------------------------------------------------------------------------
# metrics


@pytest.mark.parametrize("rule", ["max_f1", 0.5])
def test_every_figure_matches_sklearn(random_data, rule):
    y, probs = random_data
    thresholds = choose_thresholds(y, probs, rule)
    metrics = multilabel_metrics(y, probs, thresholds, LABELS)
    _assert_matches(metrics, _expected(y, probs, thresholds, LABELS))
    assert 0.0 < metrics["subset_accuracy"] < 1.0 and 0.0 < metrics["hamming_loss"] < 0.5
    assert 0.0 < metrics["no_label_share"] < 1.0
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics


def test_max_f1_beats_one_half_on_f1_macro(random_data):
    y, probs = random_data
    tuned = multilabel_metrics(y, probs, choose_thresholds(y, probs, "max_f1"), LABELS)
    fixed = multilabel_metrics(y, probs, choose_thresholds(y, probs, 0.5), LABELS)
    assert tuned["f1_macro"] >= fixed["f1_macro"]
    for name in LABELS:
        assert tuned["per_label"][name]["f1"] >= fixed["per_label"][name]["f1"]


def test_label_without_positives_or_negatives(handmade):
    y, probs, labels = handmade
    thresholds = choose_thresholds(y, probs, "max_f1")
    metrics = multilabel_metrics(y, probs, thresholds, labels)
    _assert_matches(metrics, _expected(y, probs, thresholds, labels))
    bird, sky = metrics["per_label"]["bird"], metrics["per_label"]["sky"]
    assert bird["auc"] is None and bird["ap"] is None and bird["support"] == 0
    assert bird["fp"] == 2 and bird["f1"] == 0.0  # predicted twice at 0.5, never right
    assert sky["auc"] is None and sky["ap"] == 1.0 and sky["support"] == len(y)
    # map over cat, dog and sky; auc_macro over cat and dog only
    aps = [metrics["per_label"][n]["ap"] for n in ("cat", "dog", "sky")]
    assert metrics["map"] == pytest.approx(np.mean(aps))
    assert metrics["auc_macro"] == pytest.approx(np.mean([metrics["per_label"][n]["auc"] for n in ("cat", "dog")]))
    assert metrics["no_label_share"] == 0.0


def test_undefined_averages_are_none():
    y = np.zeros((5, 2), dtype=int)
    metrics = multilabel_metrics(y, np.full((5, 2), 0.2), np.array([0.5, 0.5]), ["a", "b"])
    assert metrics["map"] is None and metrics["auc_macro"] is None
    assert metrics["no_label_share"] == 1.0 and metrics["subset_accuracy"] == 1.0 and metrics["hamming_loss"] == 0.0
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics


def test_bad_inputs_are_rejected(random_data):
    y, probs = random_data
    t = np.full(len(LABELS), 0.5)
    with pytest.raises(ValueError, match="label names"):
        multilabel_metrics(y, probs, t, LABELS[:-1])
    with pytest.raises(ValueError, match="unique"):
        multilabel_metrics(y, probs, t, ["a"] * len(LABELS))
    with pytest.raises(ValueError, match="shape"):
        multilabel_metrics(y[:-1], probs, t, LABELS)
    with pytest.raises(ValueError, match="one threshold per label"):
        multilabel_metrics(y, probs, t[:-1], LABELS)
    with pytest.raises(ValueError, match="0 and 1"):
        multilabel_metrics(y * 2, probs, t, LABELS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        multilabel_metrics(y, probs * 3, t, LABELS)
    with pytest.raises(ValueError, match="indicator"):
        choose_thresholds(y[:, 0], probs[:, 0], "max_f1")


# ---------------------------------------------------------------------------------------------
# files


def _assert_png(path: Path, min_side: int = 300) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side and max(image.size) <= 2500
        pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 5  # not a blank canvas
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn in several colours
    assert path.stat().st_size < 250_000  # light enough to embed in the report


def _paths(n: int) -> list[str]:
    return [f"images/{i:04d}.jpg" for i in range(n)]


def test_write_evaluation_writes_every_file(tmp_path, random_data):
    y, probs = random_data
    thresholds = choose_thresholds(y, probs, "max_f1")
    out = tmp_path / "eval" / "test"
    metrics = write_multilabel_evaluation(out, y, probs, thresholds, LABELS, _paths(len(y)))
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["plots"] == PLOTS
    _assert_matches({k: v for k, v in metrics.items() if k not in ("plots", "ece")}, _expected(y, probs, thresholds, LABELS))
    flat_y, flat_p = y.ravel(), probs.astype(np.float64).ravel()  # ECE over every (image, label) probability, 15 bins
    bins = [(flat_p > b / 15) & (flat_p <= (b + 1) / 15) for b in range(15)]
    bins[0] |= flat_p == 0
    assert metrics["ece"] == pytest.approx(sum(m.mean() * abs(flat_y[m].mean() - flat_p[m].mean()) for m in bins if m.any()))

    with (out / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "true_labels", "predicted_labels", *[f"p_{name}" for name in LABELS]]
    assert [r["path"] for r in rows] == _paths(len(y))
    predicted = probs.astype(np.float64) >= thresholds
    for row, truth, pred, p in zip(rows, y, predicted, probs):
        assert row["true_labels"] == "|".join(n for n, on in zip(LABELS, truth) if on)
        assert row["predicted_labels"] == "|".join(n for n, on in zip(LABELS, pred) if on)
        assert [row[f"p_{n}"] for n in LABELS] == [f"{v:.6f}" for v in p]
    assert any(r["true_labels"] == "" for r in rows) and any("|" in r["true_labels"] for r in rows)
    assert any(r["predicted_labels"] == "" for r in rows) and any("|" in r["predicted_labels"] for r in rows)

    for name in PLOTS:
        _assert_png(out / name)


def test_write_evaluation_with_undefined_labels(tmp_path, handmade):
    y, probs, labels = handmade
    metrics = write_multilabel_evaluation(tmp_path, y, probs, choose_thresholds(y, probs, 0.5), labels, _paths(len(y)))
    assert metrics["per_label"]["bird"]["ap"] is None
    for name in PLOTS:
        _assert_png(tmp_path / name)
    with pytest.raises(ValueError, match="sample paths"):
        write_multilabel_evaluation(tmp_path, y, probs, np.full(4, 0.5), labels, _paths(3))


# ---------------------------------------------------------------------------------------------
# report


class _Page(HTMLParser):
    """<img> sources, element ids and the text of each table row of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.img_srcs: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.img_srcs.append(attrs.get("src") or "")
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory, random_data) -> Path:
    """A run directory whose val and test evaluations are multi-label."""
    run = tmp_path_factory.mktemp("runs") / "scenes" / "run-001"
    y, probs = random_data
    val, test = slice(0, 200), slice(200, 400)
    thresholds = choose_thresholds(y[val], probs[val], "max_f1")
    for split, rows in (("val", val), ("test", test)):
        write_multilabel_evaluation(run / "eval" / split, y[rows], probs[rows], thresholds, LABELS, _paths(400)[rows])
    summary = {
        "run_name": "scenes-multilabel-001",
        "status": "finished",
        "model": "small_cnn",
        "data": {
            "layout": "manifest",
            "classes": LABELS,
            "counts": {"train": 1000, "val": 200, "test": 200},
            "class_counts": {s: {n: 10 * (i + 1) + k for i, n in enumerate(LABELS)} for k, s in enumerate(("train", "val", "test"))},
            "no_label_counts": {"train": 123, "val": 45, "test": 67},
            "skipped": {},
        },
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture(scope="module")
def multilabel_report(multilabel_run) -> tuple[str, _Page]:
    html = write_report(multilabel_run).read_text(encoding="utf-8")
    page = _Page()
    page.feed(html)
    return html, page


def test_report_shows_headline_metrics_first(multilabel_report, multilabel_run):
    _, page = multilabel_report
    test = json.loads((multilabel_run / "eval" / "test" / "metrics.json").read_text())
    val = json.loads((multilabel_run / "eval" / "val" / "metrics.json").read_text())
    header = page.rows.index(["Metric", "val", "test"])
    metric_rows = page.rows[header + 1 : header + 1 + len(HEADLINE)]
    assert [row[0] for row in metric_rows] == HEADLINE
    for row in metric_rows:
        assert row[1:] == [f"{val[row[0]]:.4f}", f"{test[row[0]]:.4f}"]
    shown = {row[0] for row in page.rows[header + 1 :] if len(row) == 3}
    assert {"precision_micro", "recall_micro", "no_label_share", "n"} <= shown
    assert not {"task", "labels", "thresholds", "plots", "per_label"} & shown


def test_report_shows_the_per_label_table(multilabel_report, multilabel_run):
    html, page = multilabel_report
    assert "per-class" in page.ids and "Per label" in html and "Per class" not in html
    header = ["Label", "Threshold", "Precision", "Recall", "F1", "AUROC", "AP", "Support"]
    starts = [i for i, row in enumerate(page.rows) if row == header]
    assert len(starts) == 2  # val and test
    for split, start in zip(("val", "test"), starts):
        metrics = json.loads((multilabel_run / "eval" / split / "metrics.json").read_text())
        for name, row in zip(LABELS, page.rows[start + 1 : start + 1 + len(LABELS)]):
            m = metrics["per_label"][name]
            cells = [f"{m[k]:.4f}" for k in ("threshold", "precision", "recall", "f1", "auc", "ap")]
            assert row == [name, *cells, f"{m['support']:,}"]


def test_report_embeds_the_listed_plots(multilabel_report):
    html, page = multilabel_report
    assert "plots" in page.ids and "misclassified" not in page.ids
    assert len(page.img_srcs) == 2 * len(PLOTS)
    for src in page.img_srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            assert min(image.size) >= 300
    for title in ("ROC curves per label", "Precision-recall curves per label", "TP / FP / FN / TN per label", "Label co-occurrence (true labels)"):
        for split in ("val", "test"):
            assert f"<figcaption>{title} &middot; {split}</figcaption>" in html
    assert 'src="http' not in html and "<script" not in html


def test_report_shows_label_frequencies_and_no_label_row(multilabel_report):
    html, page = multilabel_report
    assert ["Label", "train", "val", "test"] in page.rows
    assert ["cat", "10", "11", "12"] in page.rows and ["sky", "60", "61", "62"] in page.rows
    assert ["no label", "123", "45", "67"] in page.rows
    assert re.search(r"Labels \(6\)", html)


def test_report_ignores_plots_outside_the_split(tmp_path, handmade):
    y, probs, labels = handmade
    split_dir = tmp_path / "eval" / "test"
    write_multilabel_evaluation(split_dir, y, probs, np.full(4, 0.5), labels, _paths(len(y)))
    Image.new("RGB", (400, 400), "red").save(tmp_path / "outside.png")
    metrics = json.loads((split_dir / "metrics.json").read_text())
    metrics["plots"] = ["../../outside.png", "plots/roc.png", "predictions.csv", 3]
    (split_dir / "metrics.json").write_text(json.dumps(metrics))
    page = _Page()
    page.feed(write_report(tmp_path).read_text(encoding="utf-8"))
    assert len(page.img_srcs) == 1
