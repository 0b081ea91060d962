"""Explanations mean something: on the built-in ``patches`` set, whose class evidence is one small striped square at
a known random position, the heatmap of a trained model peaks inside the square (PyTorch Grad-CAM and the bundle's
ONNX maps alike); a network with randomised weights gives unrelated maps; ONNX maps equal PyTorch maps."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from helpers import clean_env
from pixelmill.config import load_config
from pixelmill.data.demo import PATCH_FILE, write_patches
from pixelmill.data.preprocess import to_model_input
from pixelmill.explain import CAM_TOLERANCE
from pixelmill.explain.heatmaps import upsample
from pixelmill.explain.images import explain_images
from pixelmill.export import export_run
from pixelmill.inference.predictor import Predictor
from pixelmill.training.fit import train

LOCALISATION = 0.90  # share of test images whose heatmap peak must fall inside the patch
SANITY_BOUND = 0.30  # mean Spearman rank correlation of trained vs randomised maps must stay below this


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patches")
    write_patches(root, seed=3, per_split={"train": 400, "val": 80, "test": 100})
    return root


@pytest.fixture(scope="module")
def run(patches: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small_cnn on the patches at 96 px (a 12x12 final feature map), a few epochs."""
    out = tmp_path_factory.mktemp("patch-runs")
    args = [
        f"data.path={patches}", "data.image_size=96", "trainer.max_epochs=8", "trainer.progress_bar=false", "logger=[csv]",
        "trainer.deterministic=true", "eval.bootstrap=0", f"output_dir={out}",
    ]
    result = train(load_config(args))
    assert result.status == "finished" and result.test_metrics["accuracy"] >= 0.95
    return result.run_dir


@pytest.fixture(scope="module")
def bundle(run: Path, tmp_path_factory: pytest.TempPathFactory):
    return export_run(run, out=tmp_path_factory.mktemp("patch-bundle") / "bundle")


def _test_images(patches: Path) -> list[dict[str, str]]:
    with open(patches / PATCH_FILE, newline="") as fh:
        return [row for row in csv.DictReader(fh) if row["split"] == "test"]


def _inside_patch(patches: Path, rows: list[dict[str, str]], heatmaps: list[np.ndarray], prep) -> float:
    """Share of images whose heatmap peak lies inside the patch, mapped into the model's input by its own preprocessing."""
    hits = 0
    for row, heatmap in zip(rows, heatmaps):
        mask = np.zeros(Image.open(patches / row["path"]).size[::-1], np.uint8)
        top, left, size = int(row["top"]), int(row["left"]), int(row["size"])
        mask[top : top + size, left : left + size] = 255
        where = to_model_input(Image.fromarray(mask).convert("RGB"), prep)[:, :, 0] > 127
        hits += bool(where[np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)])
    return hits / len(rows)


@pytest.mark.slow
def test_heatmap_peaks_fall_inside_the_patch_in_pytorch_and_onnx(patches: Path, run: Path, bundle) -> None:
    rows = _test_images(patches)
    images = [str(patches / row["path"]) for row in rows]
    for model in (run, bundle.path):
        predictor = Predictor.load(model)
        results = explain_images(predictor.classifier, images)
        assert all(r.error is None and len(r.explanations) == 1 for r in results)
        share = _inside_patch(patches, rows, [r.explanations[0].heatmap for r in results], predictor.preprocessing)
        print(f"{'ONNX' if model == bundle.path else 'PyTorch'}: heatmap peak inside the patch on {share:.1%} of {len(rows)} test images")
        assert share >= LOCALISATION, f"{model}: {share:.0%} of peaks inside the patch"


@pytest.mark.slow
def test_onnx_maps_equal_pytorch_grad_cam_within_the_stated_tolerance(patches: Path, run: Path, bundle) -> None:
    assert bundle.meta["explain"]["available"] and bundle.meta["explain"]["max_abs_diff"] <= CAM_TOLERANCE
    images = [str(patches / row["path"]) for row in _test_images(patches)]
    onnx = explain_images(Predictor.load(bundle.path).classifier, images, class_name="vertical")
    eager = explain_images(Predictor.load(run).classifier, images, class_name="vertical")
    diff = max(float(np.abs(a.explanations[0].heatmap - b.explanations[0].heatmap).max()) for a, b in zip(onnx, eager))
    print(f"ONNX vs PyTorch maps: largest difference {diff:.2e} over {len(images)} images (tolerance {CAM_TOLERANCE})")
    assert diff <= CAM_TOLERANCE


@pytest.mark.slow
def test_maps_of_the_same_network_with_random_weights_are_not_alike(patches: Path, run: Path) -> None:
    """Adebayo et al. 2018: a saliency method that ignores the weights fails this; Grad-CAM of a trained net passes."""
    rows = _test_images(patches)[:40]
    images = [str(patches / row["path"]) for row in rows]
    predictor = Predictor.load(run)
    trained = [explain_images(predictor.classifier, [img], class_name=row["label"])[0] for img, row in zip(images, rows)]
    torch.manual_seed(0)
    for module in predictor.classifier._model.net.modules():  # the same architecture, weights drawn afresh
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    randomised = [explain_images(predictor.classifier, [img], class_name=row["label"])[0] for img, row in zip(images, rows)]
    correlations = []
    for a, b in zip(trained, randomised):
        rho = spearmanr(a.explanations[0].heatmap.ravel(), b.explanations[0].heatmap.ravel()).statistic
        correlations.append(0.0 if np.isnan(rho) else rho)  # an all-zero map correlates with nothing
    print(f"rank correlation trained vs randomised weights: mean {np.mean(correlations):.3f} over {len(rows)} images (bound {SANITY_BOUND})")
    assert float(np.mean(correlations)) < SANITY_BOUND
    # and the trained maps localise where the random ones do not
    assert _inside_patch(patches, rows, [r.explanations[0].heatmap for r in trained], predictor.preprocessing) >= LOCALISATION


def _explain_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pixelmill.cli", "explain", *args], capture_output=True, text=True, env=clean_env({}))


@pytest.mark.slow
def test_explain_cli_on_a_run_and_a_bundle_and_its_bad_input(patches: Path, run: Path, bundle, tmp_path: Path) -> None:
    images = [str(patches / row["path"]) for row in _test_images(patches)[:3]]
    for model, out in ((run, tmp_path / "run"), (bundle.path, tmp_path / "bundle")):
        done = _explain_cli(str(model), *images, "--out", str(out))
        assert done.returncode == 0, done.stderr
        pngs, npys = sorted(out.glob("*.png")), sorted(out.glob("*.npy"))
        assert len(pngs) == len(npys) == 3
        assert Image.open(pngs[0]).size == (96, 96) and np.load(npys[0]).shape == (96, 96)
    asked = _explain_cli(str(bundle.path), images[0], "--class", "horizontal", "--out", str(tmp_path / "asked"))
    assert asked.returncode == 0 and [p.name for p in (tmp_path / "asked").glob("*.png")] == [f"{Path(images[0]).stem}_horizontal.png"]

    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    mixed = _explain_cli(str(bundle.path), images[0], str(corrupt), "--out", str(tmp_path / "mixed"))
    assert mixed.returncode == 2 and "broken.png" in mixed.stderr and len(list((tmp_path / "mixed").glob("*.png"))) == 1

    unknown = _explain_cli(str(bundle.path), images[0], "--class", "diagonal")
    assert unknown.returncode == 2 and "unknown class 'diagonal'; the model's classes are: horizontal, vertical" in unknown.stderr
    layer = _explain_cli(str(run), images[0], "--layer", "nope")
    assert layer.returncode == 2 and "unknown layer 'nope'" in layer.stderr and "features" in layer.stderr
    on_bundle = _explain_cli(str(bundle.path), images[0], "--layer", "features")
    assert on_bundle.returncode == 2 and "--layer applies to run directories" in on_bundle.stderr
    int8 = export_run(run, quantize="int8", out=tmp_path / "int8", min_int8_agreement=0.5)
    assert int8.meta["explain"]["available"] is False
    refused = _explain_cli(str(int8.path), images[0])
    assert refused.returncode == 2 and "has no explain output (an int8 bundle carries no class activation maps" in refused.stderr
    assert "Traceback" not in refused.stderr + unknown.stderr + layer.stderr + mixed.stderr


@pytest.mark.slow
def test_the_report_shows_where_the_model_looked(run: Path) -> None:
    assert (run / "eval" / "test" / "explained.png").stat().st_size > 10_000
    assert "Where the model looked" in (run / "report.html").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"


def test_only_a_pooling_and_linear_head_gets_the_onnx_maps() -> None:
    from pixelmill.explain.gradcam import cam_weights
    from pixelmill.models import create_model

    assert cam_weights(create_model("small_cnn", 3)) is not None
    assert cam_weights(create_model("resnet18", 3, pretrained=False)) is not None  # timm: global pool + fc
    assert cam_weights(create_model("xray_cnn", 3)) is None  # a hidden layer after pooling: no CAM, Grad-CAM still works


@pytest.mark.parametrize(("shape", "size"), [((5, 7), (40, 33)), ((8, 8), (96, 96)), ((3, 1, 4), (9, 12))])
def test_numpy_upsampling_is_torch_bilinear_without_aligned_corners(shape: tuple[int, ...], size: tuple[int, int]) -> None:
    maps = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    torch_maps = torch.from_numpy(maps.reshape(-1, 1, *shape[-2:]))
    expected = torch.nn.functional.interpolate(torch_maps, size=size, mode="bilinear", align_corners=False).numpy().reshape(*shape[:-2], *size)
    np.testing.assert_allclose(upsample(maps, size), expected, atol=1e-5)
