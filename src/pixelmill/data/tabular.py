"""CSV -> checked, typed columns -> schema -> train/val/test splits (``TabularData``).

``data.path`` is one CSV (split into train/val/test with the seeded stratified split) or a
folder with ``train.csv`` and optional ``val.csv`` / ``test.csv`` (a missing val is carved
from train, as for images). Every CSV is read strictly, and each problem is one
``DataError`` line naming the file, column and line to fix:

- UTF-8 only (a BOM is fine). Other encodings are refused rather than guessed, because a
  wrong guess would bake mis-decoded categories into the schema; re-save the file as UTF-8.
- Comma-separated; a header without commas but with ``;``, tab or ``|`` picks that delimiter.
- Ragged rows, empty files, a header without rows, duplicate or empty column names, a
  missing target value, an all-empty column, text in a numeric column and, at evaluation,
  a target label the model never saw are errors. Extra columns are ignored with a warning.
- Missing cells: empty, NA, N/A, NaN, null, None (any case; pandas' default tokens).

Column types (``numeric``, ``categorical``, ``boolean``; ``ignore`` drops a column) are
inferred from the training data unless set in ``data.columns``: true/false/yes/no/t/f/y/n
-> boolean, all numbers -> numeric (0/1 stays numeric), anything else -> categorical. Typed
frames hold numeric and boolean columns as float64 (NaN missing) and categoricals as str
("" missing); ``tabular_preprocess`` turns them into model input.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import pandas as pd

from pixelmill.data.scan import split_indices
from pixelmill.errors import ConfigError, DataError

log = logging.getLogger(__name__)

COLUMN_TYPES = ("numeric", "categorical", "boolean", "ignore")
# Cell values (after strip, lower-cased) that mean "missing": pandas' defaults.
MISSING_VALUES = frozenset({"", "na", "n/a", "nan", "-nan", "null", "none", "<na>", "#n/a", "#na", "#n/a n/a"})
TRUE_VALUES = ("true", "t", "yes", "y")
FALSE_VALUES = ("false", "f", "no", "n")
MISSING_CATEGORY = ""
_SPLIT_FILES = {"train": ("train.csv",), "val": ("val.csv", "valid.csv", "validation.csv"), "test": ("test.csv",)}


# --------------------------------------------------------------------------- reading


@dataclass
class RawTable:
    """One CSV as strings: ``frame`` holds stripped text or NaN (missing); ``lines[i]`` is row i's file line."""

    path: Path
    frame: pd.DataFrame
    lines: np.ndarray
    sha256: str

    def first_line(self, mask: Any) -> int:
        """File line of the first row where ``mask`` is true."""
        return int(self.lines[np.flatnonzero(np.asarray(mask))[0]])


def read_csv(path: str | Path) -> RawTable:
    """Read a CSV strictly (see the module docstring); DataError names what to fix."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read '{path}' ({exc.strerror}); point data.path at a CSV file or a folder with train.csv") from None
    if not raw.strip():
        raise DataError(f"'{path}' is empty; a CSV needs a header row and at least one data row")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"'{path}' is not UTF-8 (byte 0x{raw[exc.start]:02x} on line {line}); re-save it as UTF-8 (Excel: 'CSV UTF-8')"
        ) from None
    header_line = text.lstrip("\r\n").split("\n", 1)[0]
    delimiter = next((d for d in ";\t|" if "," not in header_line and d in header_line), ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows, lines, previous = [], [], 0
    try:
        for fields in reader:
            start, previous = previous + 1, reader.line_num
            if not any(f.strip() for f in fields):
                continue  # blank lines and Excel's ",,," rows
            if header is None:
                header = _check_header([f.strip() for f in fields], path)
            elif len(fields) != len(header):
                raise DataError(
                    f"'{path}' line {start} has {len(fields)} fields but the header has {len(header)}; "
                    "fix that row (an unquoted comma inside a value, or an unclosed quote?)"
                )
            else:
                rows.append(fields)
                lines.append(start)
    except csv.Error as exc:
        raise DataError(f"'{path}' line {reader.line_num} is not valid CSV ({exc}); fix the quoting on that line") from None
    if not rows:
        raise DataError(f"'{path}' has a header but no data rows; add rows")
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    for name in header:
        text_values = frame[name].str.strip()
        frame[name] = text_values.mask(text_values.str.lower().isin(list(MISSING_VALUES)))  # missing -> NaN
    return RawTable(path, frame, np.asarray(lines), hashlib.sha256(raw).hexdigest())


def _check_header(names: list[str], path: Path) -> list[str]:
    empty = [i + 1 for i, name in enumerate(names) if not name]
    if empty:
        raise DataError(f"column {empty[0]} of the header in '{path}' has no name; name every column")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"column '{name}' appears twice in the header of '{path}'; rename one of them")
        seen.add(name)
    return names


# --------------------------------------------------------------------------- schema


@dataclass
class TabularSchema:
    """The columns a model was trained on: target, class names, feature types (in CSV order), ignored columns."""

    target: str
    classes: list[str]
    columns: dict[str, str]
    ignored: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # column -> "inferred" | "config"

    def of_type(self, kind: str) -> list[str]:
        return [name for name, t in self.columns.items() if t == kind]


def _numbers(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, mask of present cells that are not finite numbers)."""
    parsed = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return parsed, values.notna().to_numpy() & ~np.isfinite(parsed)


def infer_type(values: pd.Series, name: str, table: RawTable) -> str:
    """numeric, boolean or categorical for one column's present values; DataError when the column is unusable."""
    present = values.dropna()
    if present.empty:
        raise DataError(f"column '{name}' is empty in every row of '{table.path}'; fill it or set data.columns={{{name}: ignore}}")
    if present.str.lower().isin(TRUE_VALUES + FALSE_VALUES).all():
        return "boolean"
    _, bad = _numbers(values)
    if not bad.any():
        return "numeric"
    if bad.sum() <= 0.1 * len(present):  # mostly numbers: a typo, not a category
        line = table.first_line(bad)
        raise DataError(
            f"column '{name}' in '{table.path}' holds numbers but line {line} has {values[bad].iloc[0]!r}; "
            f"fix the value or set data.columns={{{name}: categorical}}"
        )
    if present.nunique() > max(50, len(present) // 2):
        log.warning("column '%s' has %d distinct values in %d rows; if it is an id, set data.columns={%s: ignore}",
                    name, present.nunique(), len(present), name)
    return "categorical"


def infer_schema(table: RawTable, target: str | None, overrides: dict[str, str]) -> TabularSchema:
    """Column types from the training table, with ``data.columns`` overrides applied."""
    names = list(table.frame.columns)
    if not target:
        raise ConfigError(f"data.target is not set; pass data.target=COLUMN, one of: {', '.join(names)}")
    if target not in names:
        close = difflib.get_close_matches(target, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"data.target '{target}' is not a column of '{table.path}'{hint} (columns: {', '.join(names)})")
    for name, kind in overrides.items():
        if name not in names:
            raise ConfigError(f"data.columns names '{name}' but '{table.path}' has no such column (columns: {', '.join(names)})")
        if kind not in COLUMN_TYPES:
            raise ConfigError(f"bad value '{kind}' for 'data.columns.{name}'; choose one of: {', '.join(COLUMN_TYPES)}")
        if name == target:
            raise ConfigError(f"data.columns sets a type for the target column '{target}'; remove it from data.columns")
    columns, ignored, sources = {}, [], {}
    for name in names:
        if name == target:
            continue
        kind = overrides.get(name) or infer_type(table.frame[name], name, table)
        sources[name] = "config" if name in overrides else "inferred"
        if kind == "ignore":
            ignored.append(name)
        else:
            columns[name] = kind
    if not columns:
        raise ConfigError(f"no feature columns left in '{table.path}' besides the target; check data.columns")
    return TabularSchema(target, [], columns, ignored, sources)


def _typed_numeric(values: pd.Series, name: str, table: RawTable) -> pd.Series:
    parsed, bad = _numbers(values)
    if bad.any():
        raise DataError(
            f"column '{name}' in '{table.path}' must be numeric but line {table.first_line(bad)} has {values[bad].iloc[0]!r}; fix the value"
        )
    return pd.Series(parsed, index=values.index)


def _typed_boolean(values: pd.Series, name: str, table: RawTable) -> pd.Series:
    lowered = values.str.lower()
    mapping = {**{v: 1.0 for v in (*TRUE_VALUES, "1")}, **{v: 0.0 for v in (*FALSE_VALUES, "0")}}
    bad = (values.notna() & ~lowered.isin(list(mapping))).to_numpy()
    if bad.any():
        raise DataError(
            f"column '{name}' in '{table.path}' must be boolean (true/false, yes/no, 1/0) but line "
            f"{table.first_line(bad)} has {values[bad].iloc[0]!r}; fix the value"
        )
    return lowered.map(mapping).astype(np.float64)


def _typed_categorical(values: pd.Series, name: str, table: RawTable) -> pd.Series:
    return values.fillna(MISSING_CATEGORY).astype(object)


_TYPED = {"numeric": _typed_numeric, "boolean": _typed_boolean, "categorical": _typed_categorical}


def typed_features(table: RawTable, schema: TabularSchema) -> pd.DataFrame:
    """The schema's feature columns, typed: numeric/boolean as float64 (NaN missing), categorical as str."""
    have = set(table.frame.columns)
    missing = [name for name in schema.columns if name not in have]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise DataError(
            f"'{table.path}' is missing column(s) {', '.join(repr(m) for m in missing[:8])}{more} that the model "
            "was trained on; add them (extra columns are fine)"
        )
    extra = sorted(have - set(schema.columns) - set(schema.ignored) - {schema.target})
    if extra:
        log.warning("ignoring column(s) %s of '%s': not in the schema", ", ".join(extra), table.path)
    out = {}
    for name, kind in schema.columns.items():
        values = table.frame[name]
        if values.isna().all():
            raise DataError(f"column '{name}' is empty in every row of '{table.path}'; fill it in")
        out[name] = _TYPED[kind](values, name, table)
    return pd.DataFrame(out, index=table.frame.index)


def _sorted_labels(labels: set[str]) -> list[str]:
    """Class names sorted numerically when they all are numbers ('2' before '10'), else as text."""
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def target_labels(table: RawTable, schema: TabularSchema) -> np.ndarray:
    """(N,) class indices of the target column; DataError names empty cells and unknown labels."""
    if schema.target not in table.frame.columns:
        raise DataError(f"'{table.path}' has no target column '{schema.target}'; training and evaluation need the true labels")
    values = table.frame[schema.target]
    empty = values.isna().to_numpy()
    if empty.any():
        lines = table.lines[empty]
        more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
        raise DataError(
            f"target column '{schema.target}' is empty on line(s) {', '.join(map(str, lines[:5]))}{more} of "
            f"'{table.path}'; fill in the labels or delete those rows"
        )
    index = {name: i for i, name in enumerate(schema.classes)}
    unknown = ~values.isin(list(index)).to_numpy()
    if unknown.any():
        raise DataError(
            f"target column '{schema.target}' in '{table.path}' has label {values[unknown].iloc[0]!r} on line "
            f"{table.first_line(unknown)} that the model was not trained on (known: {', '.join(schema.classes)})"
        )
    return values.map(index).to_numpy(dtype=np.int64)


# --------------------------------------------------------------------------- loading splits


@dataclass
class TabularData:
    """Typed feature frames and (row id, class index) pairs per split; the tabular counterpart of ``ScanResult``."""

    root: str
    layout: str  # "csv file" or "csv folder"
    schema: TabularSchema
    frames: dict[str, pd.DataFrame]
    splits: dict[str, list[tuple[str, int]]]
    fingerprint: str

    @property
    def classes(self) -> list[str]:
        return self.schema.classes

    def counts(self) -> dict[str, int]:
        return {split: len(items) for split, items in self.splits.items()}

    def class_counts(self, split: str) -> dict[str, int]:
        labels = np.bincount([y for _, y in self.splits[split]], minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, labels)}

    def split_table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of ``splits.csv``: where every row of the run went (``file.csv:LINE``), and its class."""
        return ["row", "split", "label"], [[row, split, self.classes[y]] for split, items in self.splits.items() for row, y in items]

    def write_with_splits(self, folder: Path, split_of: Mapping[str, str], group_column: str | None = None) -> dict[str, str]:
        """Write these rows re-split (``split_of[row id]``: train, val or test) as ``folder/{train,val,test}.csv``.

        The cells are the source files' text; the columns those of the schema (target, features, ignored).
        Returns the config values that make the same task read exactly that (cross-validation folds).
        """
        root = Path(self.root)
        tables: dict[str, tuple[RawTable, dict[int, int]]] = {}  # file name -> (table, file line -> position)
        picked: dict[str, dict[str, list[int]]] = {}  # split -> file name -> positions in that file
        for items in self.splits.values():
            for row_id, _ in items:
                name, _, line = row_id.rpartition(":")
                if name not in tables:
                    table = read_csv(root if self.layout == "csv file" else root / name)
                    tables[name] = (table, {int(at): i for i, at in enumerate(table.lines)})
                picked.setdefault(split_of[row_id], {}).setdefault(name, []).append(tables[name][1][int(line)])
        keep = {self.schema.target, *self.schema.columns, *self.schema.ignored}
        columns = [c for c in next(iter(tables.values()))[0].frame.columns if c in keep]
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for split, by_file in picked.items():
            rows = pd.concat([tables[name][0].frame.iloc[positions] for name, positions in by_file.items()])
            rows[columns].to_csv(folder / f"{split}.csv", index=False, na_rep="")
        return {"data.path": str(folder.resolve())}

    def to_summary(self) -> dict[str, Any]:
        """JSON-ready summary for summary.json (the report's Data and Features sections)."""
        return {
            "kind": "tabular",
            "layout": self.layout,
            "target": self.schema.target,
            "classes": self.classes,
            "counts": self.counts(),
            "class_counts": {split: self.class_counts(split) for split in self.splits},
            "features": feature_summary(self.frames["train"], self.schema),
            "ignored": self.schema.ignored,
            "fingerprint": self.fingerprint,
        }


class _Part(NamedTuple):
    """One CSV file typed by the schema, and which of its rows belong to one split."""

    table: RawTable
    frame: pd.DataFrame  # typed features of every row of the file
    labels: np.ndarray  # (N,) class index of every row
    rows: Any = slice(None)  # positions of this split's rows in the file


def _row_ids(part: _Part) -> list[tuple[str, int]]:
    """('file.csv:LINE', class index) for each row of the split: the sample ids in predictions.csv."""
    return [(f"{part.table.path.name}:{line}", int(y)) for line, y in zip(part.table.lines[part.rows], part.labels[part.rows])]


def _typed(table: RawTable, schema: TabularSchema) -> _Part:
    return _Part(table, typed_features(table, schema), target_labels(table, schema))


def _new_schema(table: RawTable, data_cfg: Any) -> TabularSchema:
    """Infer the schema from the training table; the classes are its sorted target labels."""
    overrides = {str(k): str(v) for k, v in dict(data_cfg.columns).items()}
    schema = infer_schema(table, data_cfg.target, overrides)
    classes = _sorted_labels(set(table.frame[schema.target].dropna()))  # empty cells: target_labels names them
    if len(classes) < 2:
        raise DataError(f"target column '{schema.target}' in '{table.path}' needs at least 2 classes, found {classes}")
    return dataclasses.replace(schema, classes=classes)


def _folder_parts(folder: Path, data_cfg: Any, seed: int, schema: TabularSchema | None) -> tuple[TabularSchema, dict[str, _Part]]:
    """train.csv (+ val.csv, test.csv); a missing val is carved from train, seeded and stratified like images."""
    found = {s: next((folder / n for n in names if (folder / n).is_file()), None) for s, names in _SPLIT_FILES.items()}
    if found["train"] is None:
        csvs = ", ".join(sorted(p.name for p in folder.glob("*.csv"))) or "none"
        raise DataError(f"'{folder}' has no train.csv (CSV files there: {csvs}); add train.csv or point data.path at one CSV file")
    tables = {split: read_csv(p) for split, p in found.items() if p is not None}
    schema = schema or _new_schema(tables["train"], data_cfg)
    parts = {split: _typed(table, schema) for split, table in tables.items()}
    if "val" not in parts:
        train = parts["train"]
        idx = split_indices(train.labels.tolist(), val_ratio=data_cfg.val_ratio, test_ratio=0.0, seed=seed)
        parts.update(train=train._replace(rows=idx["train"]), val=train._replace(rows=idx["val"]))
    return schema, parts


def _file_parts(path: Path, data_cfg: Any, seed: int, schema: TabularSchema | None) -> tuple[TabularSchema, dict[str, _Part]]:
    """One CSV, split train/val/test with the seeded stratified split."""
    table = read_csv(path)
    schema = schema or _new_schema(table, data_cfg)
    whole = _typed(table, schema)
    idx = split_indices(whole.labels.tolist(), val_ratio=data_cfg.val_ratio, test_ratio=data_cfg.test_ratio, seed=seed)
    return schema, {split: whole._replace(rows=idx[split]) for split in ("train", "val", "test")}


def load_tabular(data_cfg: Any, seed: int, schema: TabularSchema | None = None) -> TabularData:
    """Read, type and split ``data_cfg.path``; infer the schema from the training rows unless one is given."""
    if data_cfg.augment.mixup_alpha > 0 or data_cfg.augment.cutmix_alpha > 0:
        raise ConfigError("data.augment.mixup_alpha and cutmix_alpha apply to images only; set them to 0 for data.kind=tabular")
    if not data_cfg.path:
        raise ConfigError("data.path is not set; pass data.path=FILE.csv or a folder with train.csv (+ val.csv, test.csv)")
    path = Path(data_cfg.path)
    if not path.exists():
        raise DataError(f"data path '{path}' does not exist; set data.path=FILE.csv or a folder with train.csv")
    layout = "csv folder" if path.is_dir() else "csv file"
    schema, parts = (_folder_parts if path.is_dir() else _file_parts)(path, data_cfg, seed, schema)
    frames = {split: part.frame.iloc[part.rows].reset_index(drop=True) for split, part in parts.items()}
    splits = {split: _row_ids(part) for split, part in parts.items()}
    splits.setdefault("test", [])
    frames.setdefault("test", frames["train"].iloc[:0])
    if not splits["val"]:
        raise DataError("no validation rows: add val.csv or set data.val_ratio above 0")
    for name, kind in schema.columns.items():
        values = frames["train"][name]
        if (values == MISSING_CATEGORY).all() if kind == "categorical" else values.isna().all():
            raise DataError(f"column '{name}' is empty in every training row; fill it or set data.columns={{{name}: ignore}}")
    digest = hashlib.sha256("".join(sorted({f"{p.table.path.name}:{p.table.sha256}\n" for p in parts.values()})).encode())
    data = TabularData(str(path), layout, schema, frames, splits, digest.hexdigest()[:16])
    log.info("read %s (%s): %s", path, layout, ", ".join(f"{k}={v}" for k, v in data.counts().items()))
    return data


def load_csv_for_eval(path: str | Path, schema: TabularSchema) -> TabularData:
    """Any CSV with the schema's columns and target, as one split named after the file."""
    part = _typed(read_csv(path), schema)
    name = part.table.path.stem
    return TabularData(str(path), "csv file", schema, {name: part.frame}, {name: _row_ids(part)}, part.table.sha256[:16])


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None  # std of one row is NaN; JSON has no NaN


def feature_summary(frame: pd.DataFrame, schema: TabularSchema) -> list[dict[str, Any]]:
    """Per feature column of the training rows: type, missing %, mean/std/min/max or top categories."""
    out = []
    for name, kind in schema.columns.items():
        values = frame[name]
        missing = values.isna() if kind != "categorical" else values == MISSING_CATEGORY
        row: dict[str, Any] = {"column": name, "type": kind, "missing_pct": round(100.0 * float(missing.mean()), 2)}
        if kind == "numeric":
            row.update({k: _finite(getattr(values, k)()) for k in ("mean", "std", "min", "max")})
        elif kind == "boolean":
            row["true_pct"] = round(100.0 * float(values.dropna().mean()), 2)
        else:
            top = values[~missing].value_counts().head(3)
            row.update(n_categories=int(values[~missing].nunique()), top=[[str(k), int(v)] for k, v in top.items()])
        out.append(row)
    return out
