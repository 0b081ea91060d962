"""data.cache: decoded, resized images kept in shared memory or a memory-mapped file.

What a user relies on: evaluation sees exactly the pixels it sees without a cache; training
batches are a function of the seed alone (not of cache hits, cache mode or worker count);
a disk cache is reused by the next run on the same files.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pixelmill.config import load_config
from pixelmill.config.schema import AugmentConfig
from pixelmill.data.cache import CACHE_DIR_ENV, ImageCache
from pixelmill.data.datamodule import ImageDataModule
from pixelmill.data.preprocess import Preprocessing, load_image, resize_short
from pixelmill.data.scan import scan_images
from pixelmill.errors import ConfigError

PREP = Preprocessing(channels=3, size=32, crop_pct=0.8, interpolation="bilinear", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
GRAY = Preprocessing(channels=1, size=32, crop_pct=0.8, interpolation="bicubic", mean=(0.5,), std=(0.5,))


@pytest.fixture(scope="module")
def photos(tmp_path_factory, image_folder_factory):
    """JPEGs of two sizes and both orientations (so resizing really happens), two classes."""
    root = tmp_path_factory.mktemp("cache-photos")
    image_folder_factory(root, {"a": 10, "b": 10}, size=(75, 50), fmt="JPEG", seed=1)
    image_folder_factory(root, {"a": 6, "b": 6}, size=(48, 90), fmt="JPEG", seed=2)  # same names: overwrites some
    return root


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg(cache: str, workers: int = 0, **augment):
    return OmegaConf.create({
        "augment": OmegaConf.structured(AugmentConfig(**augment)), "num_workers": workers, "batch_size": 8,
        "eval_batch_size": None, "sampler": "shuffle", "cache": cache,
    })


def _batches(loader, epoch: int | None = None):
    if epoch is not None:
        loader.sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


@pytest.mark.parametrize("prep", [PREP, GRAY], ids=["rgb", "gray"])
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_evaluation_pixels_are_identical_with_and_without_cache(photos, prep, mode):
    scan = scan_images(photos, val_ratio=0.3, test_ratio=0.0, seed=0)
    plain = _batches(ImageDataModule(scan, prep, _cfg("none"), seed=3).eval_loader("val"))
    loader = ImageDataModule(scan, prep, _cfg(mode), seed=3).eval_loader("val")
    first, second = _batches(loader), _batches(loader)  # misses, then hits
    assert _same(plain, first) and _same(plain, second)


@pytest.mark.parametrize("augment", [
    {"random_resized_crop": True, "hflip": True, "rotation": 15.0},
    {"hflip": True, "color_jitter": 0.3},
], ids=["random-crop", "centre-crop"])
def test_training_batches_depend_on_the_seed_only(photos, augment):
    """Hits equal misses; memory equals disk; 0 workers equal 2; a new run on a full disk cache equals the first."""
    scan = scan_images(photos, val_ratio=0.2, test_ratio=0.0, seed=0)
    runs = {}
    for mode, workers in (("memory", 0), ("memory", 2), ("disk", 0), ("disk", 2)):
        loader = ImageDataModule(scan, PREP, _cfg(mode, workers, **augment), seed=7).train_dataloader()
        epoch1, epoch1_again, epoch2 = _batches(loader, 1), _batches(loader, 1), _batches(loader, 2)
        assert _same(epoch1, epoch1_again)
        assert not _same(epoch1, epoch2)  # a new epoch draws new augmentation
        runs[(mode, workers)] = epoch1
    reference = runs[("memory", 0)]
    assert all(_same(reference, batches) for batches in runs.values())
    assert reference[0][0].shape[1:] == (3, 32, 32)


def test_centre_crop_training_without_resizing_is_unchanged_by_the_cache(digits_root):
    """32 px digits at image_size 32: nothing to resize, so cached training pixels are the uncached ones."""
    scan = scan_images(digits_root)
    prep = Preprocessing(channels=1, size=32, crop_pct=1.0, interpolation="bilinear", mean=(0.5,), std=(0.5,))
    plain = _batches(ImageDataModule(scan, prep, _cfg("none", hflip=True), seed=1).train_dataloader(), 0)
    cached = _batches(ImageDataModule(scan, prep, _cfg("memory", hflip=True), seed=1).train_dataloader(), 0)
    assert _same(plain, cached)


def test_disk_cache_is_reused_and_keyed_by_preprocessing(photos, cache_dir):
    paths = sorted(str(p) for p in photos.rglob("*.jpg"))
    first = ImageCache(paths, PREP, "disk")
    for i, p in enumerate(paths):
        first.load(i, p)
    again = ImageCache(paths, PREP, "disk")
    assert again.path == first.path and all(again.get(i) is not None for i in range(len(paths)))
    np.testing.assert_array_equal(again.get(0), np.asarray(resize_short(load_image(paths[0], 3), PREP)))
    bigger = ImageCache(paths, Preprocessing(3, 40, 0.8, "bilinear", PREP.mean, PREP.std), "disk")
    training = ImageCache(paths, PREP, "disk", train=True)
    assert len({first.path, bigger.path, training.path}) == 3
    assert bigger.get(0) is None and training.get(0) is None
    assert [p.name for p in cache_dir.iterdir()] and all(p.suffix == ".u8" for p in cache_dir.iterdir())


def test_a_pickled_memory_cache_still_gives_the_same_pixels(photos):
    """A 'spawn' DataLoader worker gets a private cache: less sharing, same results."""
    paths = sorted(str(p) for p in photos.rglob("*.jpg"))[:5]
    cache = ImageCache(paths, PREP, "memory")
    expected = [cache.load(i, p).copy() for i, p in enumerate(paths)]
    clone = pickle.loads(pickle.dumps(cache))
    assert all(np.array_equal(clone.load(i, p), e) for (i, p), e in zip(enumerate(paths), expected))


def test_a_file_that_changed_size_is_read_but_not_cached(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(path)
    cache = ImageCache([str(path)], PREP, "memory")  # a slot for 53x40 pixels
    Image.new("RGB", (100, 40), (1, 2, 3)).save(path)
    pixels = cache.load(0, str(path))
    assert pixels.shape == (40, 100, 3) and (pixels == (1, 2, 3)).all()
    assert cache.get(0) is None
    assert ImageCache([str(tmp_path / "missing.png")], PREP, "memory").sizes[0] == 0


def test_bad_cache_value_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="data.cache.*none, memory, disk"):
        load_config(["data.cache=ram"])


def test_draft_decoding_is_for_big_jpegs_and_keeps_the_needed_size(tmp_path):
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(big, quality=90)
    assert load_image(big, 3).size == (800, 600)  # evaluation: always the full decode
    drafted = load_image(big, 3, draft_short=100)
    assert drafted.size == (200, 150) and min(drafted.size) >= 100
    assert load_image(big, 3, draft_short=400).size == (800, 600)  # not twice the target: no draft
