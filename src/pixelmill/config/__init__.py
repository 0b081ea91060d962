"""Config loading: packaged YAML defaults in groups, a user file, then ``key=value`` overrides.

Every step is validated against the typed schema in ``schema.py``; a mistake becomes one
``ConfigError`` line that names the key, the bad value and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from pixelmill.config.schema import (
    AUTO_KEYS,
    CHOICES,
    DOCS,
    GROUP_DOCS,
    INTEGER_KEYS,
    LOGGERS,
    RANGES,
    SHOWN_TYPES,
    PixelmillConfig,
)
from pixelmill.errors import ConfigError, DataError
from pixelmill.evaluation.rules import RULE_HELP, parse_rule
from pixelmill.models.names import split_prefix
from pixelmill.tasks import TASKS, get_task

# Groups that `group=name` selects from packaged YAML files, and the default of each.
GROUPS: dict[str, str] = {"data": "image", "model": "small_cnn", "trainer": "default"}


def group_options(group: str) -> list[str]:
    """Names of the packaged YAML files in one config group."""
    folder = resources.files("pixelmill.config").joinpath(group)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{origin}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping of keys (like 'model: {{name: resnet18}}'), got {type(data).__name__}")
    return data


def _group_file(group: str, name: str) -> dict:
    options = group_options(group)
    if name not in options:
        raise ConfigError(f"unknown {group} config '{name}'; choose one of: {', '.join(options)}")
    text = resources.files("pixelmill.config").joinpath(group, f"{name}.yaml").read_text()
    return {group: _read_yaml(text, f"packaged {group}/{name}.yaml")}


def _dotted_items(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            items += _dotted_items(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is read as YAML (numbers, booleans, lists, null)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key=value (for example trainer.max_epochs=5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _key_error(key: str) -> ConfigError:
    schema = OmegaConf.structured(PixelmillConfig)
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(schema, parent) if parent else schema
    if not isinstance(node, DictConfig):
        return ConfigError(f"unknown config key '{key}': '{parent}' has no sub-keys")
    valid = [str(k) for k in node.keys()]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f"; did you mean '{(parent + '.') if parent else ''}{close[0]}'?" if close else ""
    where = f"under '{parent}'" if parent else "at the top level"
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys {where}: {', '.join(valid)})")


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    if not _KEY.match(key):
        raise ConfigError(f"bad config key {key!r}: keys are dotted names such as trainer.max_epochs")
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except (ConfigKeyError, ConfigAttributeError):
        raise _key_error(key) from None
    except ValidationError as exc:
        expected = getattr(exc, "msg", str(exc)).split("\n")[0]
        raise ConfigError(f"bad value {value!r} for '{key}': {expected}") from None
    except (OmegaConfBaseException, ValueError, TypeError, IndexError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot set '{key}' to {value!r}: {first}") from None


def _merge_mapping(cfg: DictConfig, data: dict, prefix: str = "") -> None:
    """Merge a nested mapping key by key so errors name the full dotted key."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        node = OmegaConf.select(cfg, dotted, default=None) if isinstance(value, dict) else None
        if isinstance(value, dict) and isinstance(node, DictConfig) and str(key) != "columns":
            _merge_mapping(cfg, value, f"{dotted}.")
        else:
            _set(cfg, dotted, value)


def validate(cfg: DictConfig) -> None:
    """Check choices and ranges that the types alone cannot express."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and str(value) not in choices:
            raise ConfigError(f"bad value '{value}' for '{key}'; choose one of: {', '.join(choices)}")
    for key in AUTO_KEYS:
        _numbers_from_text(cfg, key)
    for key, (low, high, inclusive) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None or (key in AUTO_KEYS and value == "auto"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"bad value {value!r} for '{key}': expected a number{' or auto' if key in AUTO_KEYS else ''}")
        if key in INTEGER_KEYS and not float(value).is_integer():
            raise ConfigError(f"bad value {value!r} for '{key}': expected a whole number or auto")
        too_low = low is not None and (value < low if inclusive else value <= low)
        too_high = high is not None and value > high
        if too_low or too_high:
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            bracket = "[" if inclusive else "("
            raise ConfigError(f"bad value {value} for '{key}'; must be in {bracket}{lo}, {hi}]")
    for key in ("trainer.limit_train_batches", "trainer.limit_val_batches"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and value > 1.0):
            raise ConfigError(f"bad value {value!r} for '{key}'; give a number of batches (an integer) or a fraction in (0, 1]")
    _check_recipe(cfg)
    loggers = list(cfg.logger)
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise ConfigError(f"unknown logger '{unknown[0]}' in 'logger'; choose any of: {', '.join(LOGGERS)}")
    _check_monitor(cfg)
    try:
        parse_rule(cfg.eval.threshold)
    except ValueError:
        raise ConfigError(f"bad value '{cfg.eval.threshold}' for 'eval.threshold'; choose {RULE_HELP}") from None
    if cfg.data.val_ratio + cfg.data.test_ratio >= 1.0:
        raise ConfigError("data.val_ratio + data.test_ratio must be below 1 so that something is left to train on")
    for k in cfg.eval.top_k:
        if k < 1:
            raise ConfigError(f"bad value {k} in 'eval.top_k'; each k must be at least 1")


def _numbers_from_text(cfg: DictConfig, key: str) -> None:
    """A number that YAML read as text (``1e-3``: YAML 1.1 wants ``1.0e-3``) becomes the number; a key typed
    float does this itself, one that also takes ``auto`` is typed Any and needs it done."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, str) and value != "auto":
        try:
            number = float(value)
        except ValueError:
            return  # the range check names the key and the bad value
        OmegaConf.update(cfg, key, int(number) if key in INTEGER_KEYS and number.is_integer() else number)


def _check_recipe(cfg: DictConfig) -> None:
    """The training-recipe keys that depend on each other: weight averaging and its start; memory format."""
    if not isinstance(cfg.model.channels_last, bool) and cfg.model.channels_last != "auto":
        raise ConfigError(f"bad value {cfg.model.channels_last!r} for 'model.channels_last'; choose one of: true, false, auto")
    start = cfg.trainer.swa_epoch_start
    epoch = isinstance(start, int) and not isinstance(start, bool) and start >= 1
    fraction = isinstance(start, float) and 0.0 < start < 1.0
    if not (epoch or fraction):
        raise ConfigError(f"bad value {start!r} for 'trainer.swa_epoch_start'; give an epoch number (1: the first) or a fraction in (0, 1) of trainer.max_epochs")
    if cfg.trainer.swa and epoch and start > cfg.trainer.max_epochs:
        raise ConfigError(f"trainer.swa_epoch_start={start} comes after the last epoch (trainer.max_epochs={cfg.trainer.max_epochs}); averaging would never start")
    if cfg.model.ema and cfg.trainer.swa:
        raise ConfigError("model.ema=true and trainer.swa=true both replace the trained weights by an average; set one of them to false")
    averaging = "model.ema" if cfg.model.ema else "trainer.swa" if cfg.trainer.swa else None
    if averaging and cfg.model.freeze_backbone:
        raise ConfigError(
            f"{averaging}=true averages the whole network's weights over training, but model.freeze_backbone=true trains only its head;"
            f" set {averaging}=false, or model.freeze_backbone=false to fine-tune everything"
        )


def _kind_of(path: Path) -> str | None:
    """The one task that recognises the data at ``path`` as its own (``Task.recognises``), else None."""
    kinds = [name for name, task in TASKS.items() if task.recognises(path)]
    return kinds[0] if len(kinds) == 1 else None


def _check_monitor(cfg: DictConfig) -> None:
    """``trainer.monitor`` must be a metric the task logs; ``auto`` becomes the task's default."""
    task = get_task(str(cfg.data.kind))
    monitor = str(cfg.trainer.monitor)
    if monitor == "auto":
        cfg.trainer.monitor = task.default_monitor
    elif monitor not in task.monitors:
        raise ConfigError(
            f"bad value '{monitor}' for 'trainer.monitor'; a {task.title} run logs: auto, {', '.join(task.monitors)}"
        )


def load_config(overrides: Iterable[str] = (), config_file: str | Path | None = None) -> DictConfig:
    """Compose the run config: schema defaults, packaged groups, a user file, then overrides."""
    cfg = OmegaConf.structured(PixelmillConfig)
    parsed = [parse_override(item) for item in overrides]
    user: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass --config PATH to a YAML file")
        user = _read_yaml(path.read_text(), f"config file '{path}'")
    # `group: name` in the file or `group=name` on the command line picks a packaged file.
    file_groups = {g: user.pop(g) for g in GROUPS if isinstance(user.get(g), str)}
    cli_groups: dict[str, str] = {}
    dotted: list[tuple[str, Any]] = []
    for key, value in parsed:
        if key in GROUPS and isinstance(value, str):
            if key == "model" and value not in group_options("model"):
                # `model=convnext_tiny` names an architecture, not a packaged file.
                dotted.append(("model.name", value))
            else:
                cli_groups[key] = value
        else:
            dotted.append((key, value))
    selections = {**GROUPS, **file_groups, **cli_groups}
    # `data.kind=tabular` or `model.name=mlp` without a group choice picks the packaged
    # defaults of that kind or model, as `data=tabular` / `model=mlp` would.
    chosen = {**{k: v for k, v in _dotted_items(user)}, **dict(dotted)}
    if "data.kind" not in chosen and "data" not in file_groups and "data" not in cli_groups and chosen.get("data.path"):
        recognised = _kind_of(Path(str(chosen["data.path"])).expanduser())
        if recognised:  # e.g. a path,labels manifest is multi-label data: data.kind may be left out
            chosen["data.kind"] = recognised
            dotted.insert(0, ("data.kind", recognised))
    implied = {"data": chosen.get("data.kind"), "model": chosen.get("model.name")}
    for group, name in implied.items():
        if group not in file_groups and group not in cli_groups and isinstance(name, str) and name in group_options(group):
            selections[group] = name

    for group, name in selections.items():
        _merge_mapping(cfg, _group_file(group, name))
    _merge_mapping(cfg, user)
    for key, value in dotted:
        if key == "logger" and isinstance(value, str):
            value = [value]
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text, the form saved in every run directory."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def load_saved(path: str | Path) -> DictConfig:
    """Load a run's saved ``config.yaml`` back onto the schema."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config at '{path}'")
    cfg = OmegaConf.structured(PixelmillConfig)
    _merge_mapping(cfg, _read_yaml(path.read_text(), f"config file '{path}'"))
    return cfg


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """Flattened ``{"data.batch_size": 64, ...}`` view, for trackers' params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig):
            for k in node.keys():
                walk(node[k], f"{prefix}{k}.")
        elif isinstance(node, ListConfig):
            out[prefix[:-1]] = list(node)
        else:
            out[prefix[:-1]] = node

    walk(cfg, "")
    return out


def check_inputs(cfg: DictConfig) -> None:
    """What can be checked before torch loads: the data path exists and the model name's source prefix.

    The CLI calls this right after ``load_config``, so a wrong path answers in a fraction of a
    second rather than after the training stack has been imported.
    """
    path = cfg.data.path
    if not path:
        raise ConfigError(f"data.path is not set; pass data.path=PATH: {DOCS['data.path']}")
    if not Path(str(path)).expanduser().exists():
        raise DataError(f"data path '{path}' does not exist; set data.path to {DOCS['data.path']}")
    split_prefix(str(cfg.model.name).strip())  # the factory's own check, torch-free


# ---------------------------------------------------------------------------- documentation


@dataclass(frozen=True)
class KeyDoc:
    """One config key as ``pixelmill config`` shows it."""

    key: str  # dotted: trainer.max_epochs
    group: str  # the dotted parent ("" for the top level)
    type: str
    default: Any  # what a run gets when nothing overrides it (packaged groups applied)
    allowed: str  # choices or range, "" when any value of the type goes
    help: str


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _schema_keys(cls: type = PixelmillConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, type) of every leaf key, in the schema's order; nested dataclasses are groups."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _schema_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp))
    return out


def schema_keys() -> list[str]:
    """Every dotted key the schema has."""
    return [key for key, _ in _schema_keys()]


def _number(value: float | None, infinite: str) -> str:
    if value is None:
        return infinite
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _allowed(key: str) -> str:
    if key in CHOICES:
        return ", ".join(CHOICES[key])  # data.kind: the tasks registered now
    if key == "logger":
        return "any of " + ", ".join(LOGGERS)
    if key == "trainer.monitor":
        return "auto, " + ", ".join(dict.fromkeys(m for task in TASKS.values() for m in task.monitors))
    if key == "model.name":
        return "see pixelmill models"
    if key in RANGES:
        low, high, inclusive = RANGES[key]
        text = f"{'[' if inclusive else '('}{_number(low, '-inf')}, {_number(high, 'inf')}{']' if high is not None else ')'}"
        return text + (" (fraction at most 1)" if key.startswith("trainer.limit_") else "")
    return ""


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def describe(defaults: DictConfig | None = None) -> list[KeyDoc]:
    """Every key with its type, default (``defaults``: a loaded config; the no-override config if None), allowed values and help."""
    cfg = defaults if defaults is not None else load_config([])
    return [
        KeyDoc(
            key=key,
            group=key.rpartition(".")[0],
            type=SHOWN_TYPES.get(key, _type_name(tp)),
            default=_plain(OmegaConf.select(cfg, key)),
            allowed=_allowed(key),
            help=DOCS.get(key, ""),
        )
        for key, tp in _schema_keys()
    ]


def config_groups() -> list[str]:
    """The groups of keys, in the schema's order ("" is the top level)."""
    groups: list[str] = []
    for key in schema_keys():
        group = key.rpartition(".")[0]
        if group not in groups:
            groups.append(group)
    return groups


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML (flow style): 64, '32', null, [csv, mlflow], {}."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6, sort_keys=False)
    return "\n".join(line for line in text.splitlines() if line != "...").strip()


def template(defaults: DictConfig | None = None) -> str:
    """A commented YAML file of every key at its default; ``pixelmill train --config`` reads it back as is."""
    docs = {d.key: d for d in describe(defaults)}
    lines = [
        "# pixelmill config: every key at its default. Change what you need, delete the rest, then run",
        "#   pixelmill train --config THIS_FILE [key=value ...]",
        "# key=value on the command line overrides this file; `pixelmill config` explains every key.",
        "",
        f"# {GROUP_DOCS['']}",
    ]
    opened: list[str] = []  # the mapping keys written so far ("data", "data.augment", ...)
    nested = False
    for key, doc in docs.items():
        parts = key.split(".")
        if len(parts) == 1 and nested:  # a top-level key after a group: set it apart
            lines.append("")
        nested = len(parts) > 1
        for depth in range(len(parts) - 1):
            group = ".".join(parts[: depth + 1])
            if group not in opened:
                opened.append(group)
                indent = "  " * depth
                lines.append("")
                if group in GROUP_DOCS:
                    lines.append(f"{indent}# {GROUP_DOCS[group]}")
                lines.append(f"{indent}{parts[depth]}:")
        indent = "  " * (len(parts) - 1)
        note = f" ({doc.type}; {doc.allowed})" if doc.allowed else f" ({doc.type})"
        lines.append(f"{indent}# {doc.help}{note}")
        lines.append(f"{indent}{parts[-1]}: {yaml_value(doc.default)}")
    return "\n".join(lines) + "\n"
