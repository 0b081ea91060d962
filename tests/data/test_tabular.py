"""CSV -> schema -> ColumnTransformer: strict reading, type inference, seeded splits, a saved preprocessor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelmill.config import load_config
from pixelmill.data.demo import write_tabular
from pixelmill.data.tabular import load_csv_for_eval, load_tabular, read_csv
from pixelmill.data.tabular_preprocess import TabularPreprocessor, read_schema
from pixelmill.errors import ConfigError, DataError, RunError

HEADER = "age,color,member,id,label"


def _mixed_rows(n: int = 60, seed: int = 0) -> list[str]:
    """Rows of a small mixed-type table: numeric age, categorical color, boolean member, an id, a label."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age = "" if i % 17 == 3 else f"{rng.integers(18, 80)}"
        color = "" if i % 13 == 5 else ["red", "green", "blue"][i % 3]
        member = ["yes", "no"][i % 2]
        rows.append(f"{age},{color},{member},u{i:04d},{'big' if i % 3 == 0 else 'small'}")
    return rows


def _write(path: Path, lines: list[str] | str, encoding: str = "utf-8") -> Path:
    text = lines if isinstance(lines, str) else "\n".join(lines) + "\n"
    path.write_bytes(text.encode(encoding))
    return path


def _data_cfg(path: Path, *extra: str):
    return load_config(["data=tabular", f"data.path={path}", "data.target=label", *extra]).data


@pytest.fixture
def mixed_csv(tmp_path: Path) -> Path:
    return _write(tmp_path / "people.csv", [HEADER, *_mixed_rows()])


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_of_tabular():
    handler = _Records()
    logger = logging.getLogger("pixelmill.data.tabular")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


# --------------------------------------------------------------------------- schema inference and splits


def test_types_are_inferred_and_config_overrides_win(mixed_csv: Path) -> None:
    data = load_tabular(_data_cfg(mixed_csv, "data.columns={id: ignore}"), seed=0)
    schema = data.schema
    assert schema.columns == {"age": "numeric", "color": "categorical", "member": "boolean"}
    assert schema.ignored == ["id"] and schema.sources["id"] == "config" and schema.sources["age"] == "inferred"
    assert schema.classes == ["big", "small"]
    forced = load_tabular(_data_cfg(mixed_csv, "data.columns={age: categorical, id: ignore}"), seed=0).schema
    assert forced.columns["age"] == "categorical"


def test_single_csv_split_is_seeded_and_stratified(mixed_csv: Path) -> None:
    a = load_tabular(_data_cfg(mixed_csv, "data.columns={id: ignore}"), seed=3)
    b = load_tabular(_data_cfg(mixed_csv, "data.columns={id: ignore}"), seed=3)
    c = load_tabular(_data_cfg(mixed_csv, "data.columns={id: ignore}"), seed=4)
    assert a.counts() == {"train": 42, "val": 9, "test": 9}
    assert a.splits == b.splits and a.splits != c.splits
    ids = [rid for part in a.splits.values() for rid, _ in part]
    assert len(set(ids)) == 60 and all(rid.startswith("people.csv:") for rid in ids)
    assert a.class_counts("test") == {"big": 3, "small": 6}  # 1:2 like the whole table
    assert a.frames["train"]["member"].isin([0.0, 1.0]).all()
    assert (a.frames["train"]["color"] == "").any()  # a missing category is the "" category


def test_folder_with_train_val_test_and_val_carved_when_missing(tmp_path: Path) -> None:
    write_tabular("wine", tmp_path / "wine")
    data = load_tabular(load_config(["data=tabular", f"data.path={tmp_path / 'wine'}", "data.target=target"]).data, seed=0)
    assert data.layout == "csv folder" and data.classes == ["class_0", "class_1", "class_2"]
    assert data.counts() == {"train": 124, "val": 27, "test": 27}
    (tmp_path / "wine" / "val.csv").unlink()
    carved = load_tabular(load_config(["data=tabular", f"data.path={tmp_path / 'wine'}", "data.target=target"]).data, seed=0)
    assert carved.counts() == {"train": 105, "val": 19, "test": 27}  # round(0.15 * 124) rows held out of train


def test_bom_and_semicolons_are_accepted(tmp_path: Path) -> None:
    bom = _write(tmp_path / "bom.csv", [HEADER, *_mixed_rows()], encoding="utf-8-sig")
    assert list(read_csv(bom).frame.columns) == ["age", "color", "member", "id", "label"]
    semi = _write(tmp_path / "semi.csv", [HEADER.replace(",", ";"), *(r.replace(",", ";") for r in _mixed_rows())])
    assert read_csv(semi).frame.shape == (60, 5)


def test_missing_tokens_and_blank_lines(tmp_path: Path) -> None:
    table = read_csv(_write(tmp_path / "t.csv", ["a,b,label", "1,NA,x", "", " n/a , null ,y", ",,", "3,None,x"]))
    assert table.frame["a"].isna().tolist() == [False, True, False]
    assert table.frame["b"].isna().all()
    assert table.lines.tolist() == [2, 4, 6]  # file lines, blank ones skipped


# --------------------------------------------------------------------------- malformed CSVs: one line naming what to fix


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "is empty"),
        ("   \n\n", "is empty"),
        ("a,b,label\n", "has a header but no data rows"),
        ("a,b,label\n1,2,x\n1,2\n", "line 3 has 2 fields but the header has 3"),
        ("a,b,label\n1,2,x,4\n", "line 2 has 4 fields"),
        ("a,a,label\n1,2,x\n", "column 'a' appears twice"),
        ("a,,label\n1,2,x\n", "column 2 of the header .* has no name"),
    ],
    ids=["empty", "whitespace", "header-only", "short-row", "long-row", "duplicate-name", "unnamed"],
)
def test_malformed_csv_is_one_clear_error(tmp_path: Path, content: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        read_csv(_write(tmp_path / "bad.csv", content))


def test_non_utf8_is_refused_with_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "latin.csv", "city,label\nBerlin,a\nZ\u00fcrich,b\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"not UTF-8 \(byte 0xfc on line 3\); re-save it as UTF-8"):
        read_csv(path)


def test_missing_target_values_are_named_by_line(tmp_path: Path) -> None:
    rows = _mixed_rows()
    rows[4] = rows[4].rsplit(",", 1)[0] + ","
    rows[9] = rows[9].rsplit(",", 1)[0] + ",NA"
    path = _write(tmp_path / "t.csv", [HEADER, *rows])
    with pytest.raises(DataError, match=r"target column 'label' is empty on line\(s\) 6, 11 .*fill in the labels or delete"):
        load_tabular(_data_cfg(path), seed=0)


def test_all_empty_column_is_an_error(tmp_path: Path) -> None:
    rows = [r + ",NaN" for r in _mixed_rows()]
    path = _write(tmp_path / "t.csv", [HEADER + ",notes", *rows])
    with pytest.raises(DataError, match=r"column 'notes' is empty in every row .*data.columns=\{notes: ignore\}"):
        load_tabular(_data_cfg(path), seed=0)
    assert load_tabular(_data_cfg(path, "data.columns={notes: ignore}"), seed=0).schema.ignored == ["notes"]


def test_text_in_a_numeric_column_names_column_and_line(tmp_path: Path) -> None:
    rows = _mixed_rows()
    rows[6] = "4O," + rows[6].split(",", 1)[1]  # letter O typed for a zero
    path = _write(tmp_path / "t.csv", [HEADER, *rows])
    with pytest.raises(DataError, match=r"column 'age' .* holds numbers but line 8 has '4O'"):
        load_tabular(_data_cfg(path), seed=0)
    with pytest.raises(DataError, match=r"column 'age' .* must be numeric but line 8 has '4O'"):
        load_tabular(_data_cfg(path, "data.columns={age: numeric, color: categorical}"), seed=0)


def test_config_mistakes_are_config_errors(mixed_csv: Path) -> None:
    with pytest.raises(ConfigError, match="data.target is not set; .* one of: age, color, member, id, label"):
        load_tabular(load_config(["data=tabular", f"data.path={mixed_csv}"]).data, seed=0)
    with pytest.raises(ConfigError, match="did you mean 'label'"):
        load_tabular(load_config(["data=tabular", f"data.path={mixed_csv}", "data.target=lable"]).data, seed=0)
    with pytest.raises(ConfigError, match="'data.columns.age'; choose one of: numeric, categorical, boolean, ignore"):
        load_tabular(_data_cfg(mixed_csv, "data.columns={age: text}"), seed=0)
    with pytest.raises(ConfigError, match="data.columns names 'agee'"):
        load_tabular(_data_cfg(mixed_csv, "data.columns={agee: numeric}"), seed=0)
    with pytest.raises(ConfigError, match="images only"):
        load_tabular(_data_cfg(mixed_csv, "data.augment.mixup_alpha=0.2"), seed=0)
    with pytest.raises(DataError, match="no train.csv"):
        load_tabular(_data_cfg(mixed_csv.parent), seed=0)


# --------------------------------------------------------------------------- other CSVs against a saved schema


@pytest.fixture
def fitted(mixed_csv: Path, tmp_path: Path) -> tuple[TabularPreprocessor, Path]:
    data = load_tabular(_data_cfg(mixed_csv, "data.columns={id: ignore}"), seed=0)
    prep = TabularPreprocessor.fit(data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prep.save(run_dir)
    return prep, run_dir


def test_eval_csv_is_checked_against_the_schema(fitted, tmp_path: Path, warnings_of_tabular: list[str]) -> None:
    prep, run_dir = fitted
    schema = read_schema(run_dir)
    # Columns in another order plus an extra one: fine, with a warning.
    ok = _write(tmp_path / "ok.csv", ["extra,label,member,color,age", "1,big,no,red,30", "2,small,yes,purple,"])
    rows = load_csv_for_eval(ok, schema)
    assert rows.splits == {"ok": [("ok.csv:2", 0), ("ok.csv:3", 1)]}
    assert any("extra" in m for m in warnings_of_tabular)
    x = prep.transform(rows.frames["ok"])
    color = [i for i, n in enumerate(prep.feature_names) if n.startswith("categorical__color")]
    assert x[1, color].sum() == 0  # an unseen category encodes as all zeros
    cases = {
        "no_col.csv": (["age,member,label", "3,no,big"], r"missing column\(s\) 'color'"),
        "bad_bool.csv": (["age,color,member,label", "3,red,maybe,big"], r"column 'member' .* boolean .* line 2 has 'maybe'"),
        "bad_num.csv": (["age,color,member,label", "3,red,no,big", "old,red,no,big"], r"column 'age' .* numeric but line 3 has 'old'"),
        "new_label.csv": (["age,color,member,label", "3,red,no,big", "4,red,no,huge"], r"label 'huge' on line 3 .*known: big, small"),
        "no_target.csv": (["age,color,member", "3,red,no"], "no target column 'label'"),
        "empty_col.csv": (["age,color,member,label", ",red,no,big", "NA,red,no,big"], "column 'age' is empty in every row"),
    }
    for name, (lines, match) in cases.items():
        with pytest.raises(DataError, match=match):
            load_csv_for_eval(_write(tmp_path / name, lines), schema)


def test_preprocessor_is_fitted_on_train_only_and_saved_for_export(fitted, mixed_csv: Path) -> None:
    prep, run_dir = fitted
    data = load_tabular(_data_cfg(mixed_csv, "data.columns={id: ignore}"), seed=0)
    train_age = data.frames["train"]["age"]
    doc = json.loads((run_dir / "schema.json").read_text())
    age = next(c for c in doc["columns"] if c["name"] == "age")
    assert age["impute"] == pytest.approx(train_age.median())  # train rows only, not the whole file
    assert age["mean"] == pytest.approx(train_age.fillna(train_age.median()).mean())  # scaled after imputing
    assert [c["name"] for c in doc["columns"]] == ["age", "color", "member"]
    color = next(c for c in doc["columns"] if c["name"] == "color")
    assert color["type"] == "categorical" and color["categories"] == ["", "blue", "green", "red"]
    assert doc["classes"] == ["big", "small"] and doc["target"] == "label" and doc["ignored"] == ["id"]
    assert doc["features_out"] == prep.feature_names and len(prep.feature_names) == prep.n_features == 6
    assert doc["missing_category"] == "" and "yes" in doc["boolean_values"]["true"]
    x = prep.transform(data.frames["train"])
    assert x.dtype == np.float32 and x.shape == (42, 6) and np.isfinite(x).all()
    assert abs(float(x[:, 0].mean())) < 1e-5  # standardised age, missing ages imputed with the median
    loaded = TabularPreprocessor.load(run_dir)
    np.testing.assert_array_equal(loaded.transform(data.frames["test"]), prep.transform(data.frames["test"]))
    (run_dir / "preprocessor.joblib").write_bytes(b"tampered")
    with pytest.raises(RunError, match="does not match schema.json"):
        TabularPreprocessor.load(run_dir)


def test_feature_summary(mixed_csv: Path) -> None:
    data = load_tabular(_data_cfg(mixed_csv, "data.columns={id: ignore}"), seed=0)
    features = {f["column"]: f for f in data.to_summary()["features"]}
    assert features["age"]["type"] == "numeric" and 0 < features["age"]["missing_pct"] < 20
    assert 18 <= features["age"]["min"] <= features["age"]["mean"] <= features["age"]["max"] < 80
    assert features["member"]["true_pct"] == pytest.approx(100 * data.frames["train"]["member"].mean(), abs=0.01)
    assert features["color"]["n_categories"] == 3 and len(features["color"]["top"]) == 3
    json.dumps(data.to_summary(), allow_nan=False)


def test_datamodule_train_order_is_seeded(mixed_csv: Path) -> None:
    from pixelmill.data.datamodule import TabularDataModule

    cfg = _data_cfg(mixed_csv, "data.columns={id: ignore}", "data.batch_size=8")
    data = load_tabular(cfg, seed=0)
    prep = TabularPreprocessor.fit(data)

    def first_epoch(seed: int) -> list[torch.Tensor]:
        return [y for _, y in TabularDataModule(data, prep, cfg, seed).train_dataloader()]

    a, b, c = first_epoch(1), first_epoch(1), first_epoch(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and any(not torch.equal(u, v) for u, v in zip(a, c))
    assert sum(len(y) for y in a) == 42
    xv, yv = next(iter(TabularDataModule(data, prep, cfg, 0).val_dataloader()))
    assert xv.shape == (8, prep.n_features) and xv.dtype == torch.float32 and yv.dtype == torch.long
