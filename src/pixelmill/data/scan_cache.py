"""``data.scan_cache``: what the scan learnt about each image file, kept so that a re-run verifies only new or changed files.

Verifying an image means reading, hashing and decoding all of it (about 1.2 ms of CPU for a
500x375 JPEG), and training, evaluation and export each scan the data again. One
SQLite database, ``files.sqlite3`` in ``$PIXELMILL_SCAN_CACHE_DIR`` (see ``pixelmill.caches``),
keeps per file path the answer the scan computed - the verdict about the file's bytes (usable,
or a ``BadFile`` reason such as "corrupt") and their sha256, which the fingerprint and the
leakage check use - under the file's size, mtime_ns, ctime_ns and inode when it was read: the
stat fields git's index compares. A file whose stat differs in any of them (rewritten,
replaced, touched, or its mtime put back by ``cp -p`` or ``rsync -t``, which still moves ctime)
is verified again, and so is every file when what the verdicts depend on changes (``context``:
the checks' version, Pillow's version, ``max_pixels``).

Not kept: answers about access rather than bytes (missing, unreadable, broken link), and
files modified less than ``SETTLE_NS`` before they were looked at, which could be rewritten
within the same tick of the file system's clock (FAT keeps mtime in 2 s steps) without their
stat changing - git's "racy clean" entries, handled the same way. Rows of files no scan has
looked at for ``KEEP_DAYS`` days are dropped.

SQLite (standard library) because it serialises writers from concurrent processes (DDP ranks,
two runs over one folder) and commits atomically, so a crash or a second writer never leaves a
half-written cache; and queried directly, not through a key-value store on top of it (diskcache,
shelve), because those look keys up one at a time while a scan asks about thousands of files at
once (one join). A cache that cannot be opened, read or written is logged once per process and
the scan verifies as if there were none.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable, Sequence

from pixelmill.caches import SCAN_CACHE_ENV, scan_cache_dir

log = logging.getLogger(__name__)

Check = tuple[str | None, str | None]  # (bad-file reason or None, sha256 hex or None), as scan.verify_files answers

DB_NAME = "files.sqlite3"
SETTLE_NS = 2_000_000_000  # a file modified this recently is verified again next time
KEEP_DAYS = 60
_SCHEMA = """CREATE TABLE IF NOT EXISTS files_v1 (
    path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, ino INTEGER,
    context TEXT, reason TEXT, sha256 TEXT, seen INTEGER
);
CREATE INDEX IF NOT EXISTS files_v1_seen ON files_v1 (seen);"""
_warned: set[str] = set()  # cache files already reported unusable by this process


Stat = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


def cached_checks(paths: Sequence[str], context: str, verify: Callable[[list[str]], list[Check]]) -> tuple[list[Check], int]:
    """``verify(paths)``'s answers, in order, asking ``verify`` only about the files the cache cannot answer for.

    ``context`` names everything else the answers depend on; rows stored under another context
    are not used. Returns (answers, how many files ``verify`` was asked about).
    """
    looked_at = time.time_ns()
    stats = [_stat(p) for p in paths]
    keys = [p.encode("utf-8", "surrogatepass") for p in paths]  # any str, undecodable file names too
    db_path = scan_cache_dir() / DB_NAME
    db = _connect(db_path)
    try:
        known = _lookup(db, db_path, keys, stats, context) if db else {}
        todo = [i for i in range(len(paths)) if i not in known]
        answers = {i: (reason, sha) for i, (reason, sha, _) in known.items()}
        answers.update(zip(todo, verify([paths[i] for i in todo])))
        if db:
            today = looked_at // 86_400_000_000_000
            new = []
            for i in todo:
                reason, sha = answers[i]
                settled = stats[i] is not None and looked_at - stats[i][1] > SETTLE_NS
                if sha is not None and settled:  # a verdict about the bytes, of a file not being written right now
                    new.append((keys[i], *stats[i], context, reason, sha, today))
            seen = [(today, keys[i]) for i, (_, _, day) in known.items() if day < today]
            _store(db, db_path, new, seen, today)
    finally:
        if db:
            db.close()  # also rolls back a transaction an exception left open
    return [answers[i] for i in range(len(paths))], len(todo)


def _stat(path: str) -> Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _connect(db_path: Path) -> sqlite3.Connection | None:
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(db_path, timeout=30.0, isolation_level=None)  # timeout: wait for another process's write
        try:
            db.executescript(_SCHEMA)
        except sqlite3.Error:
            db.close()
            raise
        return db
    except (OSError, sqlite3.Error) as exc:
        _unusable(db_path, exc)
        return None


def _lookup(db: sqlite3.Connection, db_path: Path, keys: list[bytes], stats: list[Stat | None], context: str) -> dict[int, tuple]:
    """{position: (reason, sha256, day last seen)} of the files whose stored stat and context match theirs now."""
    try:
        # The files asked about go into a table of this connection alone, so that one join finds them all.
        db.execute("CREATE TEMP TABLE wanted (i INTEGER PRIMARY KEY, path BLOB, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, ino INTEGER)")
        db.execute("BEGIN")
        db.executemany("INSERT INTO temp.wanted VALUES (?, ?, ?, ?, ?, ?)", ((i, keys[i], *st) for i, st in enumerate(stats) if st is not None))
        db.execute("COMMIT")
        rows = db.execute(
            "SELECT w.i, f.reason, f.sha256, f.seen FROM temp.wanted AS w JOIN files_v1 AS f ON f.path = w.path "
            "WHERE f.size = w.size AND f.mtime_ns = w.mtime_ns AND f.ctime_ns = w.ctime_ns AND f.ino = w.ino AND f.context = ?",
            (context,),
        )
        known = {i: (reason, sha, seen) for i, reason, sha, seen in rows}
        db.execute("DROP TABLE temp.wanted")
        return known
    except sqlite3.Error as exc:
        _unusable(db_path, exc)
        return {}


def _store(db: sqlite3.Connection, db_path: Path, new: list[tuple], seen: list[tuple], today: int) -> None:
    """Add the new answers, mark the files found unchanged as seen today and drop long-unseen rows, in one transaction."""
    if not new and not seen:
        return
    try:
        db.execute("BEGIN IMMEDIATE")  # take the write lock now: waiting for it is safe, upgrading a read lock later is not
        db.executemany("INSERT OR REPLACE INTO files_v1 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", new)
        db.executemany("UPDATE files_v1 SET seen = ? WHERE path = ?", seen)
        db.execute("DELETE FROM files_v1 WHERE seen < ?", (today - KEEP_DAYS,))
        db.execute("COMMIT")  # on an error before this, closing the connection rolls the transaction back
    except sqlite3.Error as exc:
        _unusable(db_path, exc)


def _unusable(db_path: Path, exc: BaseException) -> None:
    if str(db_path) in _warned:
        log.debug("scan cache '%s' unusable: %s", db_path, exc)
        return
    _warned.add(str(db_path))
    log.warning(
        "cannot use the scan cache '%s' (%s); verifying every image file instead (delete the file, or set %s to a writable local folder)",
        db_path, exc, SCAN_CACHE_ENV,
    )
