"""Tasks: what a model predicts, one folder per kind, registered by name (see ``base.py`` for the protocol).

``TASKS`` maps ``data.kind`` (and a bundle's ``kind``) to its task. Adding a task is a new
folder with a ``@register_task`` class and one import line below. This package and every
task's ``__init__`` import no torch: serving reads its request codecs from here.
"""

# The built-in tasks register themselves on import: one line per task.
from pixelmill.tasks import image_classification, multilabel, tabular_classification  # noqa: E402, F401  (registration)
from pixelmill.tasks.base import TASKS, PredictionTable, Task, get_task, register_task, task_for_config

__all__ = ["TASKS", "PredictionTable", "Task", "get_task", "register_task", "task_for_config"]
