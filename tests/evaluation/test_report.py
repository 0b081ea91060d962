"""report.html from a realistic run directory: self-contained, escaped, and rendered by Chromium."""

from __future__ import annotations

import base64
import io
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from pixelmill.errors import RunError
from pixelmill.evaluation.metrics import write_evaluation
from pixelmill.evaluation.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
SECTION_IDS = ["summary", "data", "training", "metrics", "per-class", "plots", "misclassified", "config"]
CLASS_NAMES = [f"digit {i}" for i in range(10)]
EVIL = "<img src=x onerror=alert(1)>"


class _Page(HTMLParser):
    """Collects element ids, <img> sources and <script>/<link> tags of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.img_srcs: list[str] = []
        self.scripts = 0
        self.links: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.img_srcs.append(attrs.get("src") or "")
        elif tag == "script":
            self.scripts += 1
        elif tag == "link":
            self.links.append(attrs)


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def _write_metrics_csv(path: Path, epochs: int = 5) -> None:
    """Lightning CSVLogger style: train and val values of one epoch on separate rows."""
    lines = ["epoch,step,train/loss,train/acc,val/loss,val/acc,val/f1_macro,lr-AdamW"]
    for e in range(epochs):
        lines.append(f"{e},{(e + 1) * 40 - 1},{1.9 / (e + 1):.4f},{0.55 + 0.08 * e:.4f},,,,{1e-3 * 0.5 ** e:.6g}")
        lines.append(f"{e},{(e + 1) * 40 - 1},,,{2.1 / (e + 1):.4f},{0.5 + 0.09 * e:.4f},{0.48 + 0.09 * e:.4f},")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as training leaves it, with real val/test evaluations of a digits model."""
    run = tmp_path_factory.mktemp("runs") / "digits" / "run-001"
    data = load_digits()
    index = np.arange(len(data.target))
    x_train, x_rest, y_train, y_rest, _, idx_rest = train_test_split(
        data.data / 16.0, data.target, index, train_size=150, stratify=data.target, random_state=0
    )
    model = LogisticRegression(max_iter=300).fit(x_train, y_train)

    def load(sample_id: str) -> Image.Image:
        return Image.fromarray((data.images[int(Path(sample_id).stem)] * 255 / 16).astype(np.uint8))

    for split, rows in (("val", slice(0, 270)), ("test", slice(270, 540))):
        ids = [f"data/{data.target[i]}/{i:04d}.png" for i in idx_rest[rows]]
        probs = model.predict_proba(x_rest[rows])
        write_evaluation(run / "eval" / split, y_rest[rows], probs, CLASS_NAMES, ids, images=load)

    (run / "config.yaml").write_text(
        "# pixelmill config\nmodel:\n  name: small_cnn\n  pretrained: false\ntrainer:\n  max_epochs: 5\n"
        f"note: '{EVIL}'\n"
    )
    _write_metrics_csv(run / "metrics.csv")
    skipped = [{"path": f"train/digit 1/bad_{i:03d}.png", "reason": "truncated"} for i in range(58)]
    skipped += [{"path": f"train/{EVIL}.txt", "reason": "not_an_image"}, {"path": "x.png", "reason": "too_small"}]
    summary = {
        "run_name": "digits-small_cnn-001",
        "status": "finished",
        "model": "small_cnn",
        "experiment": "digits",
        "best": {
            "epoch": 3,
            "metrics": {"epoch": 3, "step": 159, "val/acc": 0.87314, "val/loss": 0.4125, "lr-AdamW": 0.000125},
        },
        "data": {
            "layout": "split",
            "classes": CLASS_NAMES,
            "counts": {"train": 1257, "val": 270, "test": 270},
            "skipped": {"truncated": 58, "not_an_image": 1, "too_small": 1},
            "skipped_files": skipped,
        },
        "durations": {"fit_s": 50.1, "eval_s": 3.4},
        "versions": {"pixelmill": "0.1.0", "python": "3.11"},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    return write_report(run_dir)


def test_report_has_every_section(report, run_dir):
    assert report == run_dir / "report.html"
    page = _parse(report.read_text(encoding="utf-8"))
    for section in SECTION_IDS:
        assert section in page.ids
    assert (run_dir / "plots" / "training_curves.png").is_file()


def test_report_is_self_contained(report):
    html = report.read_text(encoding="utf-8")
    page = _parse(html)
    assert 'src="http' not in html and "<script" not in html and page.scripts == 0
    assert not [link for link in page.links if link.get("rel") == "stylesheet"]
    assert "url(http" not in html and "@import" not in html
    # training curves + 4 plots and a misclassified grid for each of val and test
    assert len(page.img_srcs) == 1 + 2 * 5
    for src in page.img_srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.load()
            assert min(image.size) >= 200


def test_report_shows_run_data_and_metrics(report, run_dir):
    html = report.read_text(encoding="utf-8")
    assert "digits-small_cnn-001" in html and "small_cnn" in html and "finished" in html
    assert "1,257" in html and "truncated" in html and "not_an_image" in html
    assert "bad_049.png" in html and "bad_050.png" not in html  # first 50 skipped files listed
    assert "and 10 more" in html
    test_metrics = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    val_metrics = json.loads((run_dir / "eval" / "val" / "metrics.json").read_text())
    for key in ("accuracy", "f1_macro", "auc_macro", "ece", "top5_acc"):
        assert f"{test_metrics[key]:.4f}" in html and f"{val_metrics[key]:.4f}" in html
    assert f"{test_metrics['per_class']['digit 7']['f1']:.4f}" in html
    assert "max_epochs: 5" in html
    assert "0.8731" in html and "1.250e-04" in html  # best-epoch metrics, the learning rate not shown as 0.0000


def test_report_escapes_text(report):
    html = report.read_text(encoding="utf-8")
    assert EVIL not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_report_skips_missing_sections(tmp_path):
    (tmp_path / "summary.json").write_text(
        json.dumps({"run_name": "bare", "status": "failed", "error": "RuntimeError: CUDA out of memory"})
    )
    html = write_report(tmp_path).read_text(encoding="utf-8")
    assert "bare" in html and "CUDA out of memory" in html
    page = _parse(html)
    assert "summary" in page.ids
    assert not set(page.ids) & {"data", "training", "metrics", "per-class", "plots", "misclassified", "config"}
    assert page.img_srcs == []


def test_report_on_empty_run_dir(tmp_path):
    html = write_report(tmp_path).read_text(encoding="utf-8")
    assert 'id="summary"' in html and tmp_path.name in html


def test_report_errors_name_the_problem(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(RunError, match="summary.json"):
        write_report(tmp_path)


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=180, check=False,
    )


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path, report):
    url = report.resolve().as_uri()
    shot = tmp_path / "report.png"
    result = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", url)
    assert shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).astype(np.float64)
    assert pixels.shape[:2] == (4000, 1280)
    assert pixels.std() > 20  # not blank
    assert pixels[:60].mean() < 80  # the dark header bar rendered, i.e. the inline CSS applied
    # Embedded plots paint many distinct colours (a text-only page would not).
    assert len(np.unique(pixels[::2, ::2].reshape(-1, 3), axis=0)) > 2000

    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _parse(dom.stdout)
    for section in SECTION_IDS:
        assert section in page.ids
    assert len(page.img_srcs) == 11 and all(src.startswith("data:image/png") for src in page.img_srcs)
