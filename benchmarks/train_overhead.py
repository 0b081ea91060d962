"""Claim: ``train()`` costs almost nothing over a hand-written PyTorch loop.

pixelmill: ``train(cfg)`` (Lightning, the ClassificationModule, the seeded sampler, the image
dataset) on a folder of images held in RAM by ``data.cache=memory``, no augmentation.
Raw loop: the same network (same init), the same decoded pixels of the same training split
in one uint8 tensor, the same batch size and AdamW settings, a plain
``zero_grad / forward / cross_entropy / backward / step`` loop.

Images/s are taken over the training steps of each warm epoch (epoch 1 fills the cache and
is not counted; validation, checkpoints and trackers at epoch end are not counted on either
side). Runs alternate pixelmill / raw, so load on this shared machine hits both.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, header, interleave, median, parse_args, quiet  # noqa: E402


def make_images(root: Path, n: int, size: int, classes: int = 10, seed: int = 0) -> Path:
    """``n`` PNGs of ``size`` px in ``classes`` folders: a class colour plus seeded noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        k = i % classes
        base = np.array([(k * 67 + 30) % 256, (k * 131 + 60) % 256, (k * 29 + 90) % 256], dtype=np.int16)
        pixels = np.clip(base + rng.integers(-60, 61, size=(size, size, 3)), 0, 255).astype(np.uint8)
        folder = root / f"c{k}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return root


def pixelmill_overrides(data: Path, out: Path, model: str, size: int, batch: int, epochs: int, run: str, extra: list[str]) -> list[str]:
    return [
        f"data.path={data}",
        f"model.name={model}",
        "model.in_chans=3",
        f"data.image_size={size}",
        "data.crop_pct=1.0",
        f"data.batch_size={batch}",
        "data.val_ratio=0.05",
        "data.test_ratio=0.0",
        "data.num_workers=0",
        "data.augment.hflip=false",
        "data.cache=memory",
        f"trainer.max_epochs={epochs}",
        "trainer.progress_bar=false",
        "trainer.accelerator=cpu",
        "logger=[csv]",
        "eval.splits=[]",
        f"output_dir={out}",
        f"run_name={run}",
        *extra,
    ]


def run_pixelmill(overrides: list[str]) -> list[float]:
    """Images/s of each warm epoch of one ``train()`` call."""
    from lightning.pytorch.callbacks import Callback

    from pixelmill.config import load_config
    from pixelmill.training.fit import train

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.rates: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.start, self.images, self.end = time.perf_counter(), 0, None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.images += len(batch[1])
            self.end = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.rates.append(self.images / (self.end - self.start))

    timer = EpochTimer()
    result = train(load_config(overrides), callbacks=[timer])
    assert result.status == "finished", result.status
    return timer.rates[1:]


def raw_data(data: Path, size: int, seed: int = 42):
    """The training split pixelmill uses (same scan, same seed), decoded once: (N, 3, H, W) uint8, labels."""
    import torch

    from pixelmill.data.preprocess import Preprocessing, load_image, to_model_input
    from pixelmill.data.scan import scan_images

    scan = scan_images(data, val_ratio=0.05, test_ratio=0.0, seed=seed)
    prep = Preprocessing(3, size, 1.0, "bilinear", (0.5,) * 3, (0.5,) * 3)
    items = scan.splits["train"]
    x = np.stack([to_model_input(load_image(p, 3), prep) for p, _ in items])  # (N, H, W, C) uint8
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.tensor([y for _, y in items]), len(scan.classes)


def run_raw(model: str, x, y, num_classes: int, batch: int, epochs: int, seed: int = 42) -> list[float]:
    """Images/s of each epoch after the first of a hand-written loop over in-memory tensors."""
    import torch
    from torch.nn import functional as F

    from pixelmill.models import create_model

    torch.manual_seed(seed)
    net = create_model(model, num_classes, in_chans=3).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    mean = torch.full((1, 3, 1, 1), 0.5)
    std = torch.full((1, 3, 1, 1), 0.5)
    g = torch.Generator().manual_seed(seed)
    n = len(y) - (len(y) % batch == 1)  # pixelmill drops a last batch of one; so do we
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(y), generator=g)[:n]
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            xb = (x[idx].float().div_(255) - mean) / std
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(xb), y[idx])
            loss.backward()
            opt.step()
        rates.append(n / (time.perf_counter() - start))
    return rates[1:]


def measure(report: Report, model: str, size: int, n: int, batch: int, epochs: int, rounds: int, target: float, work: Path, extra: list[str]) -> None:
    data = make_images(work / f"data-{size}", n, size)
    x, y, classes = raw_data(data, size)
    runs = iter(range(1000))
    sides = {
        "pixelmill": lambda: run_pixelmill(
            pixelmill_overrides(data, work / "runs", model, size, batch, epochs, f"{model}-{next(runs)}", extra)
        ),
        "raw": lambda: run_raw(model, x, y, classes, batch, epochs),
    }
    rates = interleave(sides, rounds)
    pm, raw = median(rates["pixelmill"]), median(rates["raw"])
    report.figure(f"{model} {size}px batch {batch}: pixelmill train()", pm, "images/s", epochs=len(rates["pixelmill"]))
    report.figure(f"{model} {size}px batch {batch}: hand-written loop", raw, "images/s", epochs=len(rates["raw"]))
    report.ratio(f"train_overhead {model} {size}px (pixelmill/raw images/s)", pm / raw, target)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    header("train_overhead", args.quick)
    quiet()
    report = Report("train_overhead", args.quick)
    with tempfile.TemporaryDirectory(prefix="pixelmill-bench-train-") as tmp:
        work = Path(tmp)
        if args.quick:
            measure(report, "small_cnn", 32, n=400, batch=64, epochs=2, rounds=1, target=0.95, work=work, extra=args.overrides)
        else:
            measure(report, "resnet18", 64, n=1100, batch=64, epochs=3, rounds=2, target=0.98, work=work, extra=args.overrides)
            measure(report, "small_cnn", 32, n=4300, batch=64, epochs=4, rounds=2, target=0.95, work=work, extra=args.overrides)
    report.finish(args.json)


if __name__ == "__main__":
    main()
