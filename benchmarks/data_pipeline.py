"""Claim: pixelmill's image loading is as fast as torchvision's ImageFolder, and ``data.cache`` beats it.

A folder of 2,000 JPEG photos (about 500x375, made offline by ``_photos.py``) feeds the
training transforms of an ImageNet-style recipe for resnet18 at 224 px: RandomResizedCrop(224,
scale 0.08-1, bicubic - the model's interpolation), horizontal flip, normalise. Both sides use DataLoader batches of 64 and
the same worker count with persistent workers; batches are only consumed (no model), so
the figure is the data pipeline alone.

pixelmill: ``ImageDataModule.train_dataloader()`` exactly as ``train()`` builds it, with
``data.cache`` none, memory and disk. torchvision: ``datasets.ImageFolder`` + ``DataLoader``.
Epoch 1 is the first pass over the files (already in the OS page cache, so JPEG decoding -
not the disk - is measured); later epochs are where a cache pays off.

The scan: every run verifies its images (read, hash, decode) before training. On a folder of
20,000 files (``scan_folder``: the 2,000 photos, each hard-linked 10 times, so every file costs
what a photo costs), the first scan with an empty scan cache (``data.scan_cache``) against the
second over the unchanged folder, which verifies no file.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, header, median, parse_args, quiet  # noqa: E402
from _photos import bench_dir, locked, photo_dir  # noqa: E402

BATCH = 64
WORKERS = 2


def warm_page_cache(root: Path) -> int:
    n = 0
    for p in sorted(root.rglob("*.jpg")):
        n += len(p.read_bytes())
    return n


class Side:
    """One loader under test, stepped one epoch at a time so that sides alternate epoch by epoch."""

    def __init__(self, make_loader):
        self.make_loader = make_loader
        self.loader = None
        self.epoch = 0

    def next_epoch(self) -> float:
        """Images/s of the next epoch; the first includes building the loader and starting its workers."""
        start = time.perf_counter()
        if self.loader is None:
            self.loader = self.make_loader()
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(self.epoch)
        n = 0
        for x, _ in self.loader:
            n += len(x)
        self.epoch += 1
        return n / (time.perf_counter() - start)

    def close(self) -> None:
        self.loader = None  # persistent workers exit with their iterator


def pixelmill_loader(root: Path, cache: str, extra: list[str]):
    """The training DataLoader ``train()`` would build for resnet18 on this folder."""
    from pixelmill.config import load_config
    from pixelmill.data.datamodule import ImageDataModule
    from pixelmill.data.scan import scan_images
    from pixelmill.models import create_model
    from pixelmill.tasks.image_classification.preprocessing import resolve_preprocessing

    cfg = load_config([
        f"data.path={root}", "model.name=resnet18", f"data.batch_size={BATCH}", f"data.num_workers={WORKERS}",
        "data.val_ratio=0.05", "data.test_ratio=0.0", "data.augment.random_resized_crop=true",
        "data.augment.scale_min=0.08", "data.augment.hflip=true", f"data.cache={cache}", *extra,
    ])
    scan = scan_images(root, val_ratio=cfg.data.val_ratio, test_ratio=cfg.data.test_ratio, seed=cfg.seed)
    prep = resolve_preprocessing(cfg, create_model("resnet18", len(scan.classes)))
    # torchvision_loader writes the same transforms out by hand: keep them in step.
    assert (prep.size, prep.interpolation, prep.mean) == (224, "bicubic", (0.485, 0.456, 0.406)), prep
    return lambda: ImageDataModule(scan, prep, cfg.data, cfg.seed).train_dataloader()


def torchvision_loader(root: Path):
    """What a user writes instead: ImageFolder + the same transforms + DataLoader.

    Same transforms: resnet18's own preprocessing (timm's: 224 px, bicubic, ImageNet mean/std),
    as pixelmill resolves it for the model.
    """
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import InterpolationMode, v2

    transform = v2.Compose([
        v2.RandomResizedCrop(224, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return lambda: DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS, persistent_workers=True)


def draft_figures(report: Report, work: Path, n: int) -> None:
    """JPEG draft mode on large photos (training-time cache fills only): decode + resize to 256 px."""
    from PIL import Image

    from pixelmill.data.preprocess import Preprocessing, load_image, resize_short

    big = work / "big"
    big.mkdir()
    src = sorted(photo_dir(64).rglob("*.jpg"))[:n]
    for i, p in enumerate(src):
        Image.open(p).resize((2000, 1500), Image.Resampling.BICUBIC).save(big / f"{i}.jpg", quality=90)
    prep = Preprocessing(3, 224, 0.875, "bilinear", (0.5,) * 3, (0.5,) * 3)
    files = sorted(big.glob("*.jpg"))
    times: dict[str, list[float]] = {"full": [], "draft": []}
    for _ in range(3):
        for name, draft in (("full", None), ("draft", prep.resize_to)):
            start = time.perf_counter()
            for f in files:
                resize_short(load_image(f, 3, draft_short=draft), prep)
            times[name].append((time.perf_counter() - start) / len(files) * 1000)
    full, draft = median(times["full"]), median(times["draft"])
    report.figure("2000x1500 JPEG -> 256 px: full decode + resize", full, "ms/image")
    report.figure("2000x1500 JPEG -> 256 px: draft decode + resize (train cache fill)", draft, "ms/image")
    report.ratio("draft decoding speed-up on 2000x1500 photos (info)", full / draft, 1.0)


def scan_folder(n: int, photos: Path) -> Path:
    """A reusable folder of ``n`` files under ``bench_dir()``: hard links to the photos in ``photos``, round robin,
    each in its photo's class folder (made on first use; copies where hard links are not possible).

    Each of the ``n`` paths is a file the scan verifies, at the cost of a real photo, without
    writing ``n`` photos to disk.
    """
    import shutil

    sources = sorted(photos.rglob("*.jpg"))
    root = bench_dir() / f"scan-{n}-of-{len(sources)}-{photos.name}"
    with locked(root):
        done = root / ".complete"
        if done.exists():
            return root
        for i in range(n):
            src = sources[i % len(sources)]
            dest = root / src.parent.name / f"{i:06d}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
        done.touch()
    return root


def scan_cache_figures(report: Report, n: int, photos: Path, rounds: int) -> float:
    """First scan (empty scan cache) vs second scan (unchanged folder) of ``n`` files; the speed-up (median of ``rounds``)."""
    import sklearn.model_selection  # noqa: F401 - the split's import, made before timing as in a run

    from pixelmill.caches import SCAN_CACHE_ENV
    from pixelmill.data.scan import scan_images

    root = scan_folder(n, photos)
    warm_page_cache(root)
    first, second = [], []
    with tempfile.TemporaryDirectory(prefix="pixelmill-bench-scan-cache-") as tmp:
        for r in range(rounds):
            os.environ[SCAN_CACHE_ENV] = str(Path(tmp) / f"round-{r}")  # an empty scan cache per round
            for times in (first, second):
                start = time.perf_counter()
                scan_images(root, val_ratio=0.05, test_ratio=0.0)
                times.append(time.perf_counter() - start)
    del os.environ[SCAN_CACHE_ENV]
    report.figure(f"scan of {n:,} photo files, first run (every file verified)", median(first), "s")
    report.figure("scan, first run: time per file", median(first) / n * 1000, "ms/file")
    report.figure(f"scan of {n:,} photo files, second run (scan cache, none verified)", median(second), "s")
    report.figure("scan, second run: time per file", median(second) / n * 1000, "ms/file")
    return median(first) / median(second)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    header("data_pipeline", args.quick)
    quiet()
    report = Report("data_pipeline", args.quick)
    n, epochs, rounds = (64, 2, 1) if args.quick else (2000, 3, 3)
    root = photo_dir(n)
    report.figure("photos", n, "JPEG files", bytes=warm_page_cache(root))
    with tempfile.TemporaryDirectory(prefix="pixelmill-bench-cache-") as cache_dir:
        os.environ["PIXELMILL_CACHE_DIR"] = cache_dir  # a fresh disk cache for this run
        from pixelmill.data.scan import scan_images

        pixelmill_loader(root, "none", args.overrides)  # imports, once
        start = time.perf_counter()
        scan_images(root, val_ratio=0.05, test_ratio=0.0, cache=False)
        report.figure("pixelmill scan (verify + hash every file, data.scan_cache=false)", time.perf_counter() - start, "s")
        sides = {
            "torchvision ImageFolder": torchvision_loader(root),
            "pixelmill cache=none": pixelmill_loader(root, "none", args.overrides),
            "pixelmill cache=memory": pixelmill_loader(root, "memory", args.overrides),
        }
        if not args.quick:
            disk_loader = pixelmill_loader(root, "disk", args.overrides)
            fresh = iter(range(100))

            def fresh_disk_loader():  # every round starts from an empty cache directory
                os.environ["PIXELMILL_CACHE_DIR"] = str(Path(cache_dir) / f"round-{next(fresh)}")
                return disk_loader()

            sides["pixelmill cache=disk"] = fresh_disk_loader
        first: dict[str, list[float]] = {k: [] for k in sides}
        later: dict[str, list[float]] = {k: [] for k in sides}
        names = list(sides)
        for r in range(rounds):  # fresh loaders (and caches) per round; sides alternate every epoch
            running = {name: Side(sides[name]) for name in names}
            for epoch in range(epochs):
                order = names[(r + epoch) % len(names):] + names[: (r + epoch) % len(names)]
                for name in order:
                    (first if epoch == 0 else later)[name].append(running[name].next_epoch())
            for side in running.values():
                side.close()
        if not args.quick:  # a second run over the same files finds the disk cache full
            disk_rerun = [Side(disk_loader).next_epoch()]
        for name in names:
            report.figure(f"{name}: epoch 1", median(first[name]), "images/s")
            report.figure(f"{name}: epochs 2+", median(later[name]), "images/s")
        if not args.quick:
            report.figure("pixelmill cache=disk: epoch 1 of a later run (cache file reused)", disk_rerun[0], "images/s")
            with tempfile.TemporaryDirectory(prefix="pixelmill-bench-draft-") as tmp:
                draft_figures(report, Path(tmp), 24)
    scan_files, scan_rounds = (400, 1) if args.quick else (20_000, 3)
    scan_speedup = scan_cache_figures(report, scan_files, root, scan_rounds)
    tv = "torchvision ImageFolder"
    report.ratio(f"data_pipeline scan of {scan_files:,} unchanged files, first run / second run (scan cache)", scan_speedup, 20.0)
    report.ratio("data_pipeline epoch 1, cache=memory vs ImageFolder", median(first["pixelmill cache=memory"]) / median(first[tv]), 1.0)
    if not args.quick:
        report.ratio("data_pipeline epochs 2+, cache=disk vs ImageFolder", median(later["pixelmill cache=disk"]) / median(later[tv]), 3.0)
    report.ratio("data_pipeline epochs 2+, cache=memory vs ImageFolder", median(later["pixelmill cache=memory"]) / median(later[tv]), 3.0)
    report.ratio("data_pipeline epoch 1 (pixelmill cache=none / ImageFolder images/s)", median(first["pixelmill cache=none"]) / median(first[tv]), 1.0)
    report.finish(args.json)


if __name__ == "__main__":
    main()
