"""The scan cache (data.scan_cache): a re-run verifies only new or changed files, and finds what a full scan finds."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from pixelmill.caches import SCAN_CACHE_ENV
from pixelmill.data.scan import ScanResult, scan_images

MINUTE_NS = 60 * 10**9
VERIFIED = re.compile(r"verified (\d+) (?:of (\d+) )?image files")  # "verified 26 image files (scan cache off)"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "scan-cache"
    monkeypatch.setenv(SCAN_CACHE_ENV, str(folder))
    return folder


def _date_back(*paths: Path, minutes: int = 1) -> None:
    """Give files an mtime in the past, as a data folder has by the time a run scans it
    (a file modified in the last 2 s is verified again next time: it may still be being written)."""
    when = time.time_ns() - minutes * MINUTE_NS
    for path in paths:
        os.utime(path, ns=(when, when))


@pytest.fixture
def folder(tmp_path: Path, image_folder_factory) -> Path:
    """Two classes of 12 PNGs, one corrupt file and one byte-identical copy (a possible leak), dated a minute back."""
    root = image_folder_factory(tmp_path / "data", {"cat": 12, "dog": 12})
    (root / "cat" / "broken.png").write_bytes((root / "cat" / "000.png").read_bytes()[:-40] + b"\0" * 40)
    shutil.copyfile(root / "dog" / "001.png", root / "dog" / "copy.png")
    _date_back(*(p for p in root.rglob("*") if p.is_file()))
    return root


def _scan(root: Path, caplog: pytest.LogCaptureFixture, **kwargs) -> tuple[ScanResult, int]:
    """The scan's result and how many files it verified (from its own log line)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pixelmill.data.scan"):
        result = scan_images(root, seed=3, **kwargs)
    found = next(m for r in caplog.records if (m := VERIFIED.search(r.getMessage())))
    verified, total = int(found.group(1)), int(found.group(2) or found.group(1))
    assert total == 26
    return result, verified


def _same(a: ScanResult, b: ScanResult) -> None:
    assert (a.classes, a.splits, a.fingerprint, a.bad, a.leaks) == (b.classes, b.splits, b.fingerprint, b.bad, b.leaks)


def test_a_second_scan_of_an_unchanged_folder_verifies_nothing(folder, cache_dir, caplog):
    first, verified = _scan(folder, caplog)
    assert verified == 26
    second, verified = _scan(folder, caplog)
    assert verified == 0
    _same(first, second)
    assert [(Path(b.path).name, b.reason) for b in second.bad] == [("broken.png", "corrupt")]


@pytest.mark.parametrize("change", ["touched", "rewritten"])
def test_a_changed_file_and_only_it_is_verified_again(folder, cache_dir, caplog, image_folder_factory, change):
    first, _ = _scan(folder, caplog)
    target = folder / "cat" / "005.png"
    if change == "rewritten":
        image_folder_factory(folder.parent / "other", {"cat": 6}, seed=9)
        target.write_bytes((folder.parent / "other" / "cat" / "005.png").read_bytes())
    _date_back(target, minutes=2)  # a new mtime, settled
    second, verified = _scan(folder, caplog)
    assert verified == 1
    assert (second.fingerprint == first.fingerprint) is (change == "touched")
    _same(second, _scan(folder, caplog, cache=False)[0])


@pytest.mark.parametrize("mtime", ["new mtime", "old mtime put back (cp -p, rsync -t)"])
def test_a_good_image_replaced_by_a_corrupt_one_of_the_same_size_is_caught(folder, cache_dir, caplog, mtime):
    first, _ = _scan(folder, caplog)
    target = folder / "dog" / "007.png"
    good, before = target.read_bytes(), target.stat()
    target.write_bytes(good[:100] + bytes(b ^ 0x5A for b in good[100:]))  # same size, scrambled pixel data
    if mtime == "new mtime":
        _date_back(target, minutes=3)
    else:
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size
    second, verified = _scan(folder, caplog)
    assert verified == 1
    assert str(target) in {b.path for b in second.bad}
    assert sum(second.bad_counts().values()) == sum(first.bad_counts().values()) + 1
    _same(second, _scan(folder, caplog, cache=False)[0])


def test_the_results_are_the_same_with_and_without_the_cache(folder, cache_dir, caplog):
    without, verified = _scan(folder, caplog, cache=False)
    assert verified == 26 and not cache_dir.exists()
    cold, _ = _scan(folder, caplog)
    warm, verified = _scan(folder, caplog)
    assert verified == 0
    _same(without, cold)
    _same(without, warm)
    assert warm.to_summary() == without.to_summary()


def test_files_written_moments_ago_are_verified_again_next_time(folder, cache_dir, caplog):
    (folder / "dog" / "new.png").write_bytes((folder / "dog" / "002.png").read_bytes())  # mtime: now
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pixelmill.data.scan"):
        scan_images(folder, seed=3)
        scan_images(folder, seed=3)
    verified = [int(m.group(1)) for r in caplog.records if (m := VERIFIED.search(r.getMessage()))]
    assert verified == [27, 1]


@pytest.mark.parametrize("damage", ["cache folder cannot be created", "cache file is not a database"])
def test_an_unusable_cache_is_logged_once_and_the_scan_verifies_everything(folder, tmp_path, monkeypatch, caplog, damage):
    if damage == "cache folder cannot be created":
        (tmp_path / "a-file").write_text("not a folder")
        where = tmp_path / "a-file" / "scan-cache"
    else:
        where = tmp_path / "scan-cache"
        where.mkdir()
        (where / "files.sqlite3").write_bytes(b"this is not an SQLite database, just text. " * 100)
    monkeypatch.setenv(SCAN_CACHE_ENV, str(where))
    expected, _ = _scan(folder, caplog, cache=False)
    with caplog.at_level(logging.WARNING):
        first, verified_first = _scan(folder, caplog)
        warnings_first = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "scan cache" in r.getMessage()]
        second, verified_second = _scan(folder, caplog)
        warnings_second = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "scan cache" in r.getMessage()]
    assert (verified_first, verified_second) == (26, 26)
    assert len(warnings_first) == 1 and str(where) in warnings_first[0] and SCAN_CACHE_ENV in warnings_first[0]
    assert warnings_second == [], "logged once per process"
    _same(expected, first)
    _same(expected, second)


def _scan_when_both_are_ready(root: str, barrier, results) -> None:
    barrier.wait(timeout=60)
    scan = scan_images(root, seed=3)
    results.put((scan.fingerprint, scan.splits, [b.path for b in scan.bad]))


def test_two_processes_scanning_one_folder_at_once_leave_a_sound_cache(folder, cache_dir, caplog):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_scan_when_both_are_ready, args=(str(folder), barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    answers = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    after, verified = _scan(folder, caplog)
    assert verified == 0, "both processes' answers are in the cache"
    assert answers[0] == answers[1] == (after.fingerprint, after.splits, [b.path for b in after.bad])
    _same(after, _scan(folder, caplog, cache=False)[0])


def test_a_multilabel_manifest_scan_uses_the_cache_too(folder, cache_dir, caplog):
    from pixelmill.tasks.multilabel.data import scan_manifest

    rows = [f"{p.relative_to(folder)},{p.parent.name}|{'small' if i % 2 else 'big'}" for i, p in enumerate(sorted(folder.rglob("0*.png")))]
    manifest = folder / "labels.csv"
    manifest.write_text("path,labels\n" + "\n".join(rows) + "\n")
    counted = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pixelmill.data.scan"):
            first = scan_manifest(manifest, seed=3)
        counted += [int(m.group(1)) for r in caplog.records if (m := VERIFIED.search(r.getMessage()))]
    assert counted == [24, 0]
    assert first.fingerprint == scan_manifest(manifest, seed=3).fingerprint
