"""The config's documentation lives next to the schema (``schema.DOCS``) and covers every key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pixelmill.config import config_groups, describe, schema_keys
from pixelmill.config.schema import CHOICES, DOCS, GROUP_DOCS, RANGES


def test_every_schema_key_has_a_one_line_description():
    keys = schema_keys()
    missing = [k for k in keys if not DOCS.get(k, "").strip()]
    assert not missing, f"add a line to schema.DOCS for: {', '.join(missing)}"
    stale = sorted(set(DOCS) - set(keys))
    assert not stale, f"schema.DOCS describes keys the schema does not have: {', '.join(stale)}"
    assert all("\n" not in text for text in DOCS.values())


def test_every_group_has_a_heading_and_every_checked_key_exists():
    assert set(config_groups()) - {"tracking"} <= set(GROUP_DOCS)
    assert set(CHOICES) | set(RANGES) <= set(schema_keys())


def test_describe_gives_type_default_and_allowed_values():
    docs = {d.key: d for d in describe()}
    assert set(docs) == set(schema_keys())
    assert all(d.type for d in docs.values())
    assert docs["trainer.max_epochs"].type == "int" and docs["trainer.max_epochs"].default == 10
    assert docs["data.path"].type == "str | null" and docs["data.path"].default is None
    assert docs["model.hidden_sizes"].type == "list of int" and docs["model.hidden_sizes"].default == [128, 64]
    assert docs["optim.name"].allowed == "sgd, adam, adamw, rmsprop"
    assert docs["data.val_ratio"].allowed == "[0, 1]" and docs["optim.lr"].allowed == "(0, inf)"
    assert docs["data.augment.hflip"].default is True  # the packaged data/image.yaml, not only the dataclass


def test_data_kind_choices_follow_the_registered_tasks():
    from pixelmill.tasks import TASKS, Task

    TASKS["multilabel_probe"] = Task()  # what @register_task does for a plug-in task
    try:
        assert "multilabel_probe" in {d.key: d for d in describe()}["data.kind"].allowed
    finally:
        del TASKS["multilabel_probe"]
    assert "multilabel_probe" not in CHOICES["data.kind"]


def test_a_bad_model_prefix_gets_the_factorys_error_before_torch_loads():
    from pixelmill.config import check_inputs, load_config
    from pixelmill.errors import ModelError
    from pixelmill.models import factory

    cfg = load_config([f"data.path={Path(__file__).parent}", "model.name=foo:resnet18"])
    with pytest.raises(ModelError) as before_torch:
        check_inputs(cfg)
    with pytest.raises(ModelError) as in_factory:
        factory.resolve_model_name("foo:resnet18")
    assert str(before_torch.value) == str(in_factory.value)
    assert "valid prefixes: pixelmill:, timm:, tv:, torchvision:" in str(before_torch.value)


def test_config_package_stays_light():
    code = "import pixelmill.config, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'mlflow', 'timm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
