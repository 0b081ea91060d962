"""Image loading, transforms and seeded sampling as training sees them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pixelmill.config.schema import AugmentConfig
from pixelmill.data.datamodule import ImageDataModule
from pixelmill.data.images import SeededSampler
from pixelmill.data.preprocess import Preprocessing, resize_and_crop, to_mode, to_model_input
from pixelmill.data.scan import scan_images
from pixelmill.data.transforms import eval_transform, train_transform

RGB = Preprocessing(channels=3, size=32, crop_pct=0.875, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
GRAY = Preprocessing(channels=1, size=32, crop_pct=1.0, interpolation="bicubic", mean=(0.5,), std=(0.5,))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1", "I", "F"])
@pytest.mark.parametrize("prep", [RGB, GRAY], ids=["rgb", "gray"])
def test_every_mode_becomes_the_model_channels(mode, prep):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert(mode)
    arr = to_model_input(img, prep)
    assert arr.shape == (32, 32, prep.channels) and arr.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped():
    arr16 = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    out = np.asarray(to_mode(Image.fromarray(arr16), 1))
    assert 120 <= out.mean() <= 135  # mid-grey, not saturated white


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_mode(rgba, 3))[0, 0].tolist() == [255, 255, 255]


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90
    img.save(tmp_path / "r.jpg", exif=exif)
    with Image.open(tmp_path / "r.jpg") as f:
        assert to_mode(f, 3).size == (20, 40)


def test_eval_geometry_matches_torchvision():
    """resize_and_crop (used by export and serving) equals torchvision's Resize + CenterCrop."""
    from torchvision.transforms import InterpolationMode, v2

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (375, 500, 3), dtype=np.uint8))
    prep = Preprocessing(3, 224, 0.875, "bilinear", (0.5,) * 3, (0.5,) * 3)
    ours = np.asarray(resize_and_crop(img, prep))
    tv = np.asarray(v2.Compose([v2.Resize(256, interpolation=InterpolationMode.BILINEAR), v2.CenterCrop(224)])(img))
    assert ours.shape == tv.shape == (224, 224, 3)
    assert np.array_equal(ours, tv)


def test_eval_transform_normalises_with_mean_std():
    img = Image.new("RGB", (32, 32), (255, 128, 0))
    x = eval_transform(RGB)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x[0, 0, 0].item() == pytest.approx((1.0 - 0.5) / 0.25)


def test_train_transform_with_every_augmentation():
    augment = OmegaConf.structured(AugmentConfig(hflip=True, vflip=True, rotation=15, color_jitter=0.3,
                                                 random_resized_crop=True, auto_augment="randaugment"))
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    t = train_transform(RGB, augment)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    b = t(img)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)


def test_seeded_sampler_depends_on_seed_and_epoch_only():
    labels = [0] * 90 + [1] * 10
    s = SeededSampler(labels, seed=3)
    first = list(s)
    assert list(SeededSampler(labels, seed=3)) == first
    s.set_epoch(1)
    assert list(s) != first
    assert sorted(i for i, _ in first) == list(range(100))


def test_balanced_sampler_evens_out_classes():
    labels = [0] * 900 + [1] * 100
    order = [i for i, _ in SeededSampler(labels, seed=0, balanced=True)]
    minority = sum(labels[i] for i in order) / len(order)
    assert 0.4 < minority < 0.6


def test_batches_do_not_depend_on_worker_count(digits_root):
    scan = scan_images(digits_root)
    cfg = OmegaConf.create({"augment": OmegaConf.structured(AugmentConfig(rotation=20, random_resized_crop=True)),
                            "num_workers": 0, "batch_size": 16, "eval_batch_size": None, "sampler": "shuffle"})
    batches = {}
    for workers in (0, 2):
        cfg.num_workers = workers
        loader = ImageDataModule(scan, GRAY, cfg, seed=5).train_dataloader()
        loader.sampler.set_epoch(2)
        it = iter(loader)
        batches[workers] = [next(it) for _ in range(3)]
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(y0, y2) and torch.equal(x0, x2)


@pytest.mark.parametrize("cache", ["none", "memory"])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_the_per_sample_transforms_stacked(digits_root, cache, workers):
    """The loader normalises whole batches (``__getitems__`` + ``collate``): the same bits as
    running each sample through the dataset on its own and stacking, for training (random
    augmentation, seeded per sample) and evaluation."""
    scan = scan_images(digits_root)
    cfg = OmegaConf.create({"augment": OmegaConf.structured(AugmentConfig(rotation=20, random_resized_crop=True, hflip=True)),
                            "num_workers": workers, "batch_size": 16, "eval_batch_size": 24, "sampler": "shuffle", "cache": cache})
    dm = ImageDataModule(scan, RGB, cfg, seed=5)
    train = dm.train_dataloader()
    train.sampler.set_epoch(1)
    keys = list(train.sampler)
    evaluation = dm.eval_loader("val")
    for loader, size, key_of in ((train, 16, lambda i: keys[i]), (evaluation, 24, lambda i: i)):
        for b, (x, y) in zip(range(2), loader):
            samples = [loader.dataset[key_of(b * size + i)] for i in range(size)]
            assert x.shape == (size, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
            assert torch.equal(x, torch.stack([s[0] for s in samples]))
            assert y.tolist() == [s[1] for s in samples] and y.dtype == torch.int64
