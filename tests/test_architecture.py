"""The architecture rules a reviewer would otherwise have to remember: the task seam and private names.

Layer rules (what may import what) are import-linter contracts in pyproject.toml, run by
``make test``; these tests check what import-linter cannot: where task names are decided,
and that no module reaches into another package's private names.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import ClassVar

import pytest

import pixelmill
from pixelmill.tasks import TASKS, Task, get_task, register_task

SRC = Path(pixelmill.__file__).resolve().parent
TASKS_DIR = SRC / "tasks"
MODULES = sorted(SRC.rglob("*.py"))


def _package(path: Path) -> str:
    """``pixelmill.evaluation`` for src/pixelmill/evaluation/report.py (a module's own package)."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts if path.name == "__init__.py" else parts[:-1])


def test_no_module_imports_a_private_name_of_another_package() -> None:
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pixelmill"):
                own = node.module == _package(path) or node.module.startswith(_package(path) + ".")
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and not own:
                        found.append(f"{path.relative_to(SRC)}:{node.lineno} imports {node.module}.{alias.name}")
    assert not found, "private names imported across packages:\n" + "\n".join(found)


def _task_name_decisions(tree: ast.AST) -> list[tuple[int, str]]:
    """Places that compare with, or look up by, a task's name: ``kind == "tabular"``, ``{"image": ...}[kind]``."""
    names = set(TASKS)

    def is_name(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in names

    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(is_name(n) for n in [node.left, *node.comparators]):
            hits.append((node.lineno, "compares with a task name"))
        elif isinstance(node, ast.Dict) and any(k is not None and is_name(k) for k in node.keys):
            hits.append((node.lineno, "a table keyed by task names"))
        elif isinstance(node, ast.Subscript) and is_name(node.slice):
            hits.append((node.lineno, "looks up a task name"))
    return hits


def test_only_the_tasks_package_decides_by_task_name() -> None:
    found = []
    for path in MODULES:
        if TASKS_DIR in path.parents:
            continue
        for line, what in _task_name_decisions(ast.parse(path.read_text(encoding="utf-8"))):
            found.append(f"{path.relative_to(SRC)}:{line} {what}")
    template = (SRC / "evaluation" / "templates" / "report.html.j2").read_text(encoding="utf-8")
    found += [f"report.html.j2 mentions task '{n}'" for n in TASKS if f'"{n}"' in template]
    assert not found, "task switches outside pixelmill/tasks/:\n" + "\n".join(found)


def test_the_check_finds_a_switch() -> None:
    # The rule above is only worth having if it catches the code it forbids.
    assert _task_name_decisions(ast.parse('if cfg.data.kind == "tabular":\n    pass'))
    assert _task_name_decisions(ast.parse('cls = {"image": A, "tabular": B}[kind]'))
    assert not _task_name_decisions(ast.parse('summary = {"kind": "tabular"}'))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_implements_the_whole_protocol(name: str) -> None:
    task = TASKS[name]
    methods = [m for m, value in vars(Task).items() if callable(value) and not m.startswith("_")]
    inherited = [m for m in methods if getattr(type(task), m) is getattr(Task, m)]
    # Defaults that are correct for a task whose output is one row per input.
    optional = {"check_model", "save_preprocessing", "split_outputs", "join_inputs", "check_export", "choose_operating_point", "recognises", "check_data"}
    assert set(inherited) <= optional, f"task '{name}' lacks {sorted(set(inherited) - optional)}"
    assert task.name == name and task.title and task.sample_noun


def test_a_new_task_is_one_registration_away_from_the_config(tmp_path: Path) -> None:
    """A task registered by a plug-in is a valid data.kind at once; unknown kinds list the registered ones."""
    from pixelmill.config import load_config
    from pixelmill.errors import ConfigError

    @register_task
    class Toy(Task):
        name: ClassVar[str] = "toy-task"
        title: ClassVar[str] = "toy"

    try:
        assert get_task("toy-task").title == "toy"
        assert load_config(["data.kind=toy-task"]).data.kind == "toy-task"
        with pytest.raises(ConfigError, match="choose one of: .*image.*tabular.*toy-task"):
            load_config(["data.kind=audio"])
    finally:
        del TASKS["toy-task"]
