"""Multi-label training and evaluation: BCE with sigmoid outputs, per-epoch multi-label metrics, thresholds
chosen on val, and a metrics.json whose every figure scikit-learn confirms."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from helpers import multilabel_overrides
from pixelmill.config import load_config
from pixelmill.tasks.multilabel.data import rarest_label
from pixelmill.tasks.multilabel.training import positive_weights
from pixelmill.training.checkpoint import net_state_dict, read_checkpoint
from pixelmill.training.fit import resume, train


def _predictions(split_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[list[str]]]:
    """(labels, y_true (N, L), probs (N, L), predicted label sets) read back from eval/<split>/predictions.csv."""
    with open(split_dir / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = [c.removeprefix("p_") for c in rows[0] if c.startswith("p_")]
    y = np.array([[float(name in r["true_labels"].split("|")) for name in labels] for r in rows])
    p = np.array([[float(r[f"p_{name}"]) for name in labels] for r in rows])
    return labels, y, p, [[x for x in r["predicted_labels"].split("|") if x] for r in rows]


def _epochs(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_every_epoch_logs_multilabel_metrics_and_the_best_is_picked_by_map(multilabel_run: Path) -> None:
    rows = _epochs(multilabel_run)
    assert len(rows) == 6
    for row in rows:
        for key in ("val/map", "val/auc_macro", "val/f1_micro", "val/f1_macro", "val/loss", "train/loss"):
            assert 0.0 <= float(row[key]) < 10, (key, row[key])
    assert "monitor: val/map" in (multilabel_run / "config.yaml").read_text()
    summary = json.loads((multilabel_run / "summary.json").read_text())
    best = max(rows, key=lambda r: float(r["val/map"]))
    assert summary["best"]["epoch"] == int(best["epoch"])
    assert float(rows[-1]["val/map"]) > float(rows[0]["val/map"])  # it learns


def test_thresholds_are_each_labels_best_f1_on_val(multilabel_run: Path) -> None:
    saved = json.loads((multilabel_run / "thresholds.json").read_text())
    assert saved["rule"] == "max_f1" and saved["split"] == "val"
    labels, y, p, _ = _predictions(multilabel_run / "eval" / "val")
    assert list(saved["thresholds"]) == labels == [str(d) for d in range(10)]
    t = np.array([saved["thresholds"][name] for name in labels])
    assert not np.allclose(t, 0.5)
    # predictions.csv rounds probabilities to 6 decimals: the F1 at the saved thresholds equals the best one.
    for j in range(len(labels)):
        best = max(skm.f1_score(y[:, j], p[:, j] >= c, zero_division=0) for c in np.unique(p[:, j]))
        assert skm.f1_score(y[:, j], p[:, j] >= t[j] - 1e-6, zero_division=0) == pytest.approx(best, abs=1e-9)
        assert skm.f1_score(y[:, j], p[:, j] >= t[j] - 1e-6, zero_division=0) >= skm.f1_score(y[:, j], p[:, j] >= 0.5, zero_division=0)


def test_metrics_json_agrees_with_scikit_learn(multilabel_run: Path) -> None:
    split = multilabel_run / "eval" / "test"
    m = json.loads((split / "metrics.json").read_text())
    labels, y, p, predicted = _predictions(split)
    t = np.array([m["thresholds"][name] for name in labels])
    pred = (p >= t - 1e-6).astype(int)  # the CSV's rounding, as above
    assert [[labels[j] for j in np.flatnonzero(row)] for row in pred] == predicted
    assert m["n"] == len(y) == 120
    assert m["map"] == pytest.approx(skm.average_precision_score(y, p, average="macro"), abs=1e-4)
    assert m["auc_macro"] == pytest.approx(skm.roc_auc_score(y, p, average="macro"), abs=1e-4)
    assert m["f1_micro"] == pytest.approx(skm.f1_score(y, pred, average="micro", zero_division=0))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, zero_division=0)
    for j, name in enumerate(labels):
        row = m["per_label"][name]
        assert row["support"] == int(support[j]) == int(y[:, j].sum())
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision[j], recall[j], f1[j]))
        assert row["auc"] == pytest.approx(skm.roc_auc_score(y[:, j], p[:, j]), abs=1e-4)
        assert row["ap"] == pytest.approx(skm.average_precision_score(y[:, j], p[:, j]), abs=1e-4)
    for plot in m["plots"]:
        assert (split / plot).stat().st_size > 2000
    for key in ("map", "auc_macro", "f1_micro", "f1_macro"):  # 95% bootstrap intervals around each figure
        assert m["ci95"][key][0] <= m[key] <= m["ci95"][key][1]
    summary = json.loads((multilabel_run / "summary.json").read_text())
    assert summary["eval"]["test"]["map"] == pytest.approx(m["map"])
    assert summary["data"]["class_counts"]["test"]["7"] == int(y[:, labels.index("7")].sum())
    report = (multilabel_run / "report.html").read_text()
    assert "Per label" in report and report.count("data:image/png;base64") >= 4


def test_positive_weights_and_balanced_keys() -> None:
    y = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=np.float32)
    assert positive_weights(y) == pytest.approx([1 / 3, 3.0, 4.0])  # negatives / positives; a label without positives: n / 1
    assert rarest_label(y).tolist() == [0, 1, 0, 3]  # the image's rarest label; 3 (= L) for no label


def test_mixup_cutmix_balanced_sampler_and_positive_weights_train(multidigits: Path, tmp_path: Path) -> None:
    args = multilabel_overrides(
        multidigits, tmp_path / "runs",
        "data.augment.mixup_alpha=0.4", "data.augment.cutmix_alpha=1.0", "data.sampler=balanced",
        "model.class_weights=auto", "eval.threshold=0.5", "trainer.limit_train_batches=4", "eval.splits=[]",
    )
    result = train(load_config(args))
    assert result.status == "finished"
    rows = _epochs(result.run_dir)
    assert all(np.isfinite(float(r["train/loss"])) for r in rows)
    assert set(json.loads((result.run_dir / "thresholds.json").read_text())["thresholds"].values()) == {0.5}


def test_resume_is_bit_exact(multidigits: Path, tmp_path: Path) -> None:
    def args(*extra: str, epochs: int) -> list[str]:
        base = ("trainer.limit_train_batches=4", "eval.splits=[]", "data.augment.mixup_alpha=0.2")
        return multilabel_overrides(multidigits, tmp_path / "runs", *base, *extra, epochs=epochs)

    full = train(load_config(args("run_name=full", epochs=3)))
    part = train(load_config(args("run_name=part", epochs=1)))
    resumed = resume(part.run_dir, ["trainer.max_epochs=3"])
    wf = net_state_dict(read_checkpoint(full.run_dir / "checkpoints" / "last.ckpt"))
    wr = net_state_dict(read_checkpoint(resumed.run_dir / "checkpoints" / "last.ckpt"))
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert _epochs(resumed.run_dir) == _epochs(full.run_dir)
    assert json.loads((resumed.run_dir / "thresholds.json").read_text()) == json.loads((full.run_dir / "thresholds.json").read_text())


@pytest.mark.slow
def test_multidigits_reaches_map_090(tmp_path: Path) -> None:
    """The issue's bar: the full built-in multidigits set, the small CNN, a few minutes on CPU, test mAP >= 0.90."""
    from pixelmill.data.demo import write_multidigits

    write_multidigits(tmp_path / "md", seed=0)
    args = ["data.kind=multilabel", f"data.path={tmp_path / 'md' / 'manifest.csv'}", "trainer.max_epochs=12",
            "trainer.progress_bar=false", "logger=[csv]", f"output_dir={tmp_path / 'runs'}"]
    result = train(load_config(args))
    assert result.test_metrics["map"] >= 0.90, result.test_metrics
    assert result.test_metrics["f1_micro"] >= 0.85, result.test_metrics


def test_splits_csv_records_every_image_with_its_labels(multilabel_run: Path, multidigits: Path) -> None:
    with open(multidigits, newline="") as fh:
        manifest = {str((multidigits.parent / r["path"]).resolve()): (r["split"], r["labels"]) for r in csv.DictReader(fh)}
    with open(multilabel_run / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "split", "labels"] and len(rows) == len(manifest) == 600
    assert all(manifest[r["path"]] == (r["split"], r["labels"]) for r in rows)


def test_a_sensitivity_rule_holds_on_val_and_an_unmeasurable_one_is_refused_before_training(multidigits: Path, tmp_path: Path) -> None:
    args = multilabel_overrides(multidigits, tmp_path / "runs", "eval.threshold=sensitivity@0.9", "eval.splits=[val]", "trainer.limit_train_batches=4")
    result = train(load_config(args))
    saved = json.loads((result.run_dir / "thresholds.json").read_text())
    assert saved["rule"] == "sensitivity@0.9"
    m = json.loads((result.run_dir / "eval" / "val" / "metrics.json").read_text())
    for name, row in m["per_label"].items():
        assert row["sensitivity"] >= 0.9, name
        assert row["specificity"] == pytest.approx(row["tn"] / (row["tn"] + row["fp"]))
        assert row["npv"] == pytest.approx(row["tn"] / (row["tn"] + row["fn"]))
    import subprocess
    import sys

    bad = multilabel_overrides(multidigits, tmp_path / "bad", "eval.threshold=sensitivity@0.99")
    out = subprocess.run([sys.executable, "-m", "pixelmill.cli", "train", *bad], capture_output=True, text=True, cwd=tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "needs at least 100 positive validation images" in errors[0]
    assert not (tmp_path / "bad").exists()
