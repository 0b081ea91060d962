"""scan_images: layouts, seeded stratified splits, bad-file detection, errors, fingerprint."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelmill.data.scan import BAD_REASONS, IMAGE_EXTENSIONS, ScanResult, scan_images, split_indices
from pixelmill.errors import DataError

# --------------------------------------------------------------------------- helpers


def _all_paths(result: ScanResult) -> set[str]:
    return {p for items in result.splits.values() for p, _ in items}


def _noise_png(size: tuple[int, int] = (64, 64), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _noise_jpeg(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_noise_png(size))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _blank_bilevel_png(width: int, height: int) -> bytes:
    """A real, valid 1-bit PNG of any size: the all-zero rows compress to almost nothing."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _bad_crc_png() -> bytes:
    """Valid image data whose IDAT checksum is wrong (PIL alone would decode it)."""
    data = bytearray(_noise_png())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    crc_at = start + 8 + length
    data[crc_at : crc_at + 4] = bytes(b ^ 0xFF for b in data[crc_at : crc_at + 4])
    return bytes(data)


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# --------------------------------------------------------------------------- bad-file corpus

BAD = {
    "trunc.png": "truncated",
    "trunc.jpg": "truncated",
    "empty.png": "empty file",
    "text.png": "not an image",
    "badcrc.png": "corrupt",
    "garbled.jpg": "corrupt",
    "bomb.png": "too many pixels",  # 20000 x 20000: PIL itself refuses it (> 2 x its limit)
    "big.png": "too many pixels",  # 10000 x 10000: over max_pixels, under PIL's hard limit
    "dangling.png": "broken link",
    "loop.png": "broken link",
    "folder.png": "unreadable",
    os.fsdecode(b"bad\xff.png"): "not an image",
}
SPECIAL_GOOD = [
    "deep16.png", "palette.png", "cmyk.jpg", "one.png", "UPPER.PNG", os.fsdecode(b"caf\xe9.png"),
    "anim.gif", "scan.tiff", "photo.webp", "bitmap.bmp",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, image_folder_factory) -> Path:
    """Flat layout: cats/ and dogs/ with 8 good images each; cats/ also holds every kind of bad file."""
    root = image_folder_factory(tmp_path_factory.mktemp("corpus"), {"cats": 8, "dogs": 8})
    cats = root / "cats"
    png, jpeg = _noise_png(), _noise_jpeg()
    garbled = bytearray(jpeg)
    garbled[len(jpeg) // 3 : len(jpeg) // 3 + 200] = b"\xff" * 200  # a run of invalid markers in the scan data
    files = {
        "trunc.png": png[: len(png) // 2],
        "trunc.jpg": jpeg[: len(jpeg) // 2],
        "empty.png": b"",
        "text.png": b"this is a text file, not a picture\n",
        "badcrc.png": _bad_crc_png(),
        "garbled.jpg": bytes(garbled),
        "bomb.png": _blank_bilevel_png(20_000, 20_000),
        "big.png": _blank_bilevel_png(10_000, 10_000),
        # good ones that trip naive loaders
        "deep16.png": _save(Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 250), "PNG"),
        "palette.png": _save(Image.open(io.BytesIO(png)).convert("P"), "PNG", transparency=0),
        "cmyk.jpg": _save(Image.new("CMYK", (24, 24), (10, 200, 30, 0)), "JPEG"),
        "one.png": _save(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        "UPPER.PNG": png,
        "anim.gif": _save(Image.new("P", (8, 8)), "GIF"),
        "scan.tiff": _save(Image.new("L", (8, 8), 128), "TIFF"),
        "photo.webp": _save(Image.new("RGB", (8, 8), (0, 128, 255)), "WEBP"),
        "bitmap.bmp": _save(Image.new("RGB", (8, 8)), "BMP"),
        # ignored silently: hidden files and other extensions
        ".hidden.png": b"junk",
        "notes.txt": b"hello",
    }
    for name, data in files.items():
        (cats / name).write_bytes(data)
    assert Image.open(cats / "deep16.png").mode.startswith("I")
    os.symlink("does-not-exist.png", cats / "dangling.png")
    os.symlink("loop.png", cats / "loop.png")
    (cats / "folder.png").mkdir()
    os.symlink(".", cats / "again")  # a folder loop: walked once, nothing counted twice
    with open(os.path.join(os.fsencode(cats), b"caf\xe9.png"), "wb") as fh:
        fh.write(png)
    with open(os.path.join(os.fsencode(cats), b"bad\xff.png"), "wb") as fh:
        fh.write(b"not an image at all")
    (root / ".git").mkdir()  # hidden folders are not classes
    (root / ".git" / "x.png").write_bytes(png)
    return root


@pytest.fixture(scope="module")
def corpus_scan(corpus: Path) -> ScanResult:
    return scan_images(corpus, seed=0)


@pytest.mark.reliability("data: every bad file in the corpus reported with its reason")
def test_each_bad_file_is_reported_with_its_reason(corpus_scan: ScanResult) -> None:
    reported = {os.path.basename(b.path): b.reason for b in corpus_scan.bad}
    assert reported == BAD
    assert set(reported.values()) <= set(BAD_REASONS)


def test_good_files_are_kept_and_ignored_ones_not_counted(corpus: Path, corpus_scan: ScanResult) -> None:
    kept = {os.path.basename(p) for p in _all_paths(corpus_scan)}
    assert set(SPECIAL_GOOD) <= kept
    assert len(_all_paths(corpus_scan)) == 16 + len(SPECIAL_GOOD)
    assert not kept & {".hidden.png", "notes.txt", "x.png"} and not set(BAD) & kept
    assert corpus_scan.classes == ["cats", "dogs"] and corpus_scan.layout == "flat"
    non_utf8 = os.fsdecode(os.path.join(os.fsencode(corpus), b"cats", b"caf\xe9.png"))
    assert non_utf8 in _all_paths(corpus_scan)


def test_summary_counts_skipped_files_and_is_json(corpus_scan: ScanResult) -> None:
    summary = corpus_scan.to_summary()
    assert summary["skipped"] == dict(sorted(Counter(BAD.values()).items()))
    assert sum(summary["counts"].values()) == 16 + len(SPECIAL_GOOD)
    assert summary["class_counts"]["train"]["cats"] >= 1 and set(summary["class_counts"]) == {"train", "val", "test"}
    assert {f["path"] for f in summary["skipped_files"]} >= {"cats/trunc.png", "cats/folder.png", "cats/bad\ufffd.png"}
    json.dumps(summary, ensure_ascii=False).encode("utf-8")  # non-UTF-8 names made printable
    assert summary["fingerprint"] == corpus_scan.fingerprint and len(summary["fingerprint"]) == 16


def test_bad_files_are_logged_in_one_warning(corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pixelmill.data.scan"):
        scan_images(corpus, seed=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"skipped {len(BAD)} bad image file(s)" in warnings[0] and "2 broken link" in warnings[0]


def test_max_pixels_rejects_big_images_from_the_header(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path, {"a": 3, "b": 3}, size=(16, 16))
    image_folder_factory(tmp_path / "a", {"big": 2}, size=(40, 40), seed=1)  # a/big/*.png: 1,600 pixels
    result = scan_images(tmp_path, max_pixels=1000, workers=1)
    assert result.bad_counts() == {"too many pixels": 2}
    assert sum(result.counts().values()) == 6


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode")
def test_file_without_read_permission_is_unreadable(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path, {"a": 2, "b": 2})
    locked = tmp_path / "a" / "locked.png"
    locked.write_bytes(_noise_png())
    locked.chmod(0)
    assert scan_images(tmp_path).bad_counts() == {"unreadable": 1}


# --------------------------------------------------------------------------- layouts and splits


def test_split_layout_on_digits(digits_root: Path) -> None:
    result = scan_images(digits_root, seed=0)
    assert result.layout == "split" and result.classes == [str(d) for d in range(10)]
    assert result.bad == []
    for split in ("train", "val", "test"):
        expected = sorted(str(p) for p in (digits_root / split).glob("*/*.png"))
        assert [p for p, _ in result.splits[split]] == expected
        assert all(result.classes[label] == Path(p).parent.name for p, label in result.splits[split])
    assert result.counts() == {"train": 1257, "val": 270, "test": 270}


def test_split_layout_without_val_carves_it_from_train(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path / "train", {"a": 20, "b": 20})
    image_folder_factory(tmp_path / "test", {"a": 3, "b": 3}, seed=1)
    result = scan_images(tmp_path, val_ratio=0.2, seed=5)
    assert result.counts() == {"train": 32, "val": 8, "test": 6}
    assert result.class_counts("val") == {"a": 4, "b": 4}  # stratified
    assert all("/train/" in p for p, _ in result.splits["val"])
    assert scan_images(tmp_path, val_ratio=0.2, seed=5).splits == result.splits


def test_split_layout_without_test_keeps_test_empty(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path / "train", {"a": 5, "b": 5})
    image_folder_factory(tmp_path / "val", {"a": 2, "b": 2}, seed=1)
    assert scan_images(tmp_path).counts() == {"train": 10, "val": 4, "test": 0}


def test_flat_layout_seeded_stratified_split(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path, {"a": 40, "b": 40, "c": 20})
    result = scan_images(tmp_path, seed=1)
    assert result.layout == "flat" and result.counts() == {"train": 70, "val": 15, "test": 15}
    for split, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        sizes = {"a": 40, "b": 40, "c": 20}
        for cls, n in result.class_counts(split).items():
            assert abs(n - share * sizes[cls]) <= 1.5, (split, cls, n)
    assert len(_all_paths(result)) == 100  # disjoint and complete
    for items in result.splits.values():
        assert [p for p, _ in items] == sorted(p for p, _ in items)
    assert scan_images(tmp_path, seed=1).splits == result.splits
    assert scan_images(tmp_path, seed=2).splits != result.splits
    assert scan_images(tmp_path, seed=2).fingerprint == result.fingerprint  # same files


def test_flat_layout_tolerates_classes_too_small_to_stratify(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path, {"big": 30, "tiny": 1, "small": 2})
    result = scan_images(tmp_path, seed=0)
    assert sum(result.counts().values()) == 33
    assert result.class_counts("train")["tiny"] == 1 and result.class_counts("train")["small"] >= 1


def test_csv_manifest_relative_and_absolute_paths(tmp_path: Path, image_folder_factory) -> None:
    images = image_folder_factory(tmp_path / "imgs", {"cat": 10, "dog": 10})
    rows = ["path,label"]
    for i, p in enumerate(sorted(images.glob("*/*.png"))):
        rows.append(f"{p if i % 2 else p.relative_to(tmp_path)},{p.parent.name}")
    rows.append("imgs/missing.png,cat")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\n".join(rows) + "\n")
    result = scan_images(manifest, seed=3)
    assert result.layout == "csv" and result.classes == ["cat", "dog"]
    assert result.counts() == {"train": 14, "val": 3, "test": 3}
    assert result.bad_counts() == {"missing file": 1}
    assert scan_images(manifest, seed=3).splits == result.splits


def test_csv_manifest_with_split_column(tmp_path: Path, image_folder_factory) -> None:
    images = image_folder_factory(tmp_path, {"cat": 6, "dog": 6})
    rows = ["label,split,path"]
    for p in sorted(images.glob("*/*.png")):
        rows.append(f"{p.parent.name},{'test' if p.stem.endswith('5') else 'train'},{p.relative_to(tmp_path)}")
    (tmp_path / "m.csv").write_text("\n".join(rows))
    result = scan_images(tmp_path / "m.csv", val_ratio=0.2)
    assert result.counts() == {"train": 8, "val": 2, "test": 2}  # val carved from train
    assert result.class_counts("test") == {"cat": 1, "dog": 1}


def test_split_indices_is_stratified_and_seeded() -> None:
    labels = ["x"] * 60 + ["y"] * 40
    parts = split_indices(labels, val_ratio=0.1, test_ratio=0.2, seed=0)
    assert {k: len(v) for k, v in parts.items()} == {"train": 70, "val": 10, "test": 20}
    assert Counter(labels[i] for i in parts["test"]) == {"x": 12, "y": 8}
    assert split_indices(labels, val_ratio=0.1, test_ratio=0.2, seed=0) == parts


def test_extensions_cover_common_formats() -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"} == set(IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist; set data.path=DIR"):
        scan_images(tmp_path / "nope")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no images found"):
        scan_images(tmp_path)


def test_images_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_noise_png())
    with pytest.raises(DataError, match="one sub-folder per class"):
        scan_images(tmp_path)


def test_one_class(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path, {"only": 5})
    with pytest.raises(DataError, match="at least 2 classes"):
        scan_images(tmp_path)


def test_empty_class_folder_is_named(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "ghost").mkdir()
    with pytest.raises(DataError, match="class 'ghost' has no valid images"):
        scan_images(tmp_path)


def test_class_with_only_bad_files_is_named(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="class 'c' has no valid images"):
        scan_images(tmp_path)


def test_unknown_val_class_is_named(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path / "train", {"a": 3, "b": 3})
    image_folder_factory(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match="class 'zebra' in val is not in train"):
        scan_images(tmp_path)


def test_manifest_missing_columns_are_named(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="missing column.*path, label"):
        scan_images(tmp_path / "m.csv")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"layout": "tree"}, "choose one of: auto, split, flat, csv"), ({"val_ratio": 0.6, "test_ratio": 0.5}, "sum to")],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, words: str) -> None:
    with pytest.raises(DataError, match=words):
        scan_images(tmp_path, **kwargs)


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_file_bytes(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path, {"a": 4, "b": 4})
    first = scan_images(tmp_path).fingerprint
    assert scan_images(tmp_path).fingerprint == first
    (tmp_path / "a" / "000.png").write_bytes(_noise_png((32, 32), seed=9))
    changed = scan_images(tmp_path).fingerprint
    assert changed != first
    os.rename(tmp_path / "a" / "001.png", tmp_path / "a" / "099.png")  # same bytes, new name
    assert scan_images(tmp_path).fingerprint != changed


@pytest.mark.reliability("data: training completes on the good files of the bad corpus")
def test_training_on_the_bad_corpus_counts_skips_in_summary_and_report(corpus: Path, tmp_path: Path) -> None:
    from pixelmill.config import load_config
    from pixelmill.training.fit import train

    cfg = load_config([
        f"data.path={corpus}", "data.image_size=32", "data.batch_size=8", "trainer.max_epochs=1", "trainer.progress_bar=false",
        "logger=[csv]", f"output_dir={tmp_path}", "run_name=corpus", "data.val_ratio=0.25", "data.test_ratio=0.25",
    ])
    result = train(cfg)
    assert result.status == "finished"
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["data"]["skipped"] == dict(Counter(BAD.values()))
    assert sum(summary["data"]["counts"].values()) == 16 + len(SPECIAL_GOOD)
    html = (result.run_dir / "report.html").read_text()
    for reason in set(BAD.values()):
        assert reason in html
    assert "trunc.jpg" in html
