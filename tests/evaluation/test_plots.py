"""Plots are real, readable PNGs for 2 to 30 classes; missing data gives None, not a crash."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from pixelmill.evaluation.metrics import compute_metrics
from pixelmill.evaluation.plots import (
    plot_confusion_matrix,
    plot_misclassified,
    plot_pr_curves,
    plot_roc_curves,
    plot_training_curves,
)

DIGIT_NAMES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def digits():
    """Real, imperfect predictions on sklearn digits plus a sample-id -> PIL image loader."""
    data = load_digits()
    index = np.arange(len(data.target))
    x_train, x_test, y_train, y_test, _, idx_test = train_test_split(
        data.data / 16.0, data.target, index, train_size=120, stratify=data.target, random_state=1
    )
    probs = LogisticRegression(max_iter=300).fit(x_train, y_train).predict_proba(x_test)
    ids = [f"{i:04d}" for i in idx_test]

    def load(sample_id: str) -> Image.Image:
        return Image.fromarray((data.images[int(sample_id)] * 255 / 16).astype(np.uint8))

    return {"y": y_test, "probs": probs, "ids": ids, "load": load}


def _synthetic(n_classes: int, seed: int = 0):
    """Noisy softmax predictions for n_classes with long class names."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, 40 * n_classes)
    logits = rng.normal(size=(len(y), n_classes))
    logits[np.arange(len(y)), y] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = [f"category with a long name {i}" for i in range(n_classes)]
    return y, probs, names


def _image(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("n_classes", [2, 10, 30])
def test_confusion_matrix_counts_and_normalised(tmp_path, n_classes):
    y, probs, names = _synthetic(n_classes)
    cm = np.array(compute_metrics(y, probs, names)["confusion_matrix"])
    counts = _image(plot_confusion_matrix(cm, names, tmp_path / "cm.png", normalize=False))
    rates = _image(plot_confusion_matrix(cm, names, tmp_path / "cmn.png", normalize=True))
    for pixels in (counts, rates):
        height, width, _ = pixels.shape
        assert 400 <= min(height, width) and max(height, width) <= 3000
        # cells grow with the class count so numbers stay legible (>= ~25 px per cell)
        assert min(height, width) >= 25 * n_classes
        assert pixels.std() > 10
    assert not np.array_equal(counts, rates)


def test_confusion_matrix_with_an_unseen_class_row(tmp_path):
    cm = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 7]])
    assert plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png", normalize=True).is_file()


@pytest.mark.parametrize("plot", [plot_roc_curves, plot_pr_curves])
def test_curves_on_real_predictions(tmp_path, digits, plot):
    path = plot(digits["y"], digits["probs"], DIGIT_NAMES, tmp_path / "curves.png")
    assert path == tmp_path / "curves.png"
    pixels = _image(path)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 500
    # coloured curves, not just black axes on white
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


@pytest.mark.parametrize("plot", [plot_roc_curves, plot_pr_curves])
def test_curves_skip_absent_classes_and_handle_30(tmp_path, digits, plot):
    keep = digits["y"] != 4
    assert plot(digits["y"][keep], digits["probs"][keep], DIGIT_NAMES, tmp_path / "a.png").is_file()
    y, probs, names = _synthetic(30)
    legend_heavy = _image(plot(y, probs, names, tmp_path / "b.png"))
    assert legend_heavy.shape[1] > legend_heavy.shape[0]  # legend placed beside the axes


def _write_lightning_csv(path, epochs: int = 4) -> None:
    """Like Lightning's CSVLogger: train and val values of one epoch land on separate rows."""
    lines = ["epoch,step,train/loss,train/acc,val/loss,val/acc,val/f1_macro,lr-AdamW"]
    for e in range(epochs):
        lines.append(f"{e},{(e + 1) * 10 - 1},{1.0 / (e + 1):.4f},{0.5 + 0.1 * e:.4f},,,,{1e-3 * 0.3 ** e:.6g}")
        lines.append(f"{e},{(e + 1) * 10 - 1},,,{1.1 / (e + 1):.4f},{0.45 + 0.1 * e:.4f},{0.4 + 0.1 * e:.4f},")
    path.write_text("\n".join(lines) + "\n")


def test_training_curves_three_panels(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    _write_lightning_csv(csv_path)
    path = plot_training_curves(csv_path, tmp_path / "plots" / "training_curves.png")
    assert path == tmp_path / "plots" / "training_curves.png"
    height, width, _ = _image(path).shape
    assert width > 3 * height * 0.85  # loss | accuracy/F1 | learning rate side by side


def test_training_curves_only_loss_is_one_panel(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,train/loss,val/loss\n0,1.0,1.2\n1,0.6,\n")
    height, width, _ = _image(plot_training_curves(csv_path, tmp_path / "t.png")).shape
    assert width < 2 * height


@pytest.mark.parametrize("content", [None, "", "epoch,train/loss\n", "epoch,step\n0,10\n"])
def test_training_curves_none_without_data(tmp_path, content):
    csv_path = tmp_path / "metrics.csv"
    if content is not None:
        csv_path.write_text(content)
    assert plot_training_curves(csv_path, tmp_path / "t.png") is None
    assert not (tmp_path / "t.png").exists()


def test_misclassified_grid_on_real_digits(tmp_path, digits):
    y, probs, ids = digits["y"], digits["probs"], digits["ids"]
    assert (probs.argmax(1) != y).sum() >= 16
    full = _image(plot_misclassified(ids, y, probs, DIGIT_NAMES, digits["load"], tmp_path / "m16.png"))
    small = _image(plot_misclassified(ids, y, probs, DIGIT_NAMES, digits["load"], tmp_path / "m4.png", n=4))
    assert full.shape[0] > 3 * small.shape[0] * 0.8  # 4 rows of 4 vs one row
    assert full.std() > 20


def test_misclassified_none_when_all_correct(tmp_path, digits):
    y = digits["y"][:30]
    perfect = np.eye(10)[y]
    assert plot_misclassified(digits["ids"][:30], y, perfect, DIGIT_NAMES, digits["load"], tmp_path / "m.png") is None
    assert not (tmp_path / "m.png").exists()


def test_misclassified_survives_a_missing_image(tmp_path, digits):
    def flaky(sample_id: str) -> Image.Image:
        if sample_id == digits["ids"][0]:
            raise FileNotFoundError(sample_id)
        return digits["load"](sample_id)

    y, probs = digits["y"], digits["probs"].copy()
    probs[0] = np.eye(10)[(y[0] + 1) % 10]  # sample 0: the most confident mistake, shown first
    assert plot_misclassified(digits["ids"], y, probs, DIGIT_NAMES, flaky, tmp_path / "m.png").is_file()
