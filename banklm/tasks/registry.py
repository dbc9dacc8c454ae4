"""The task registry: a task's name -> its :class:`~banklm.tasks.base.Task`."""

from __future__ import annotations

from banklm.tasks.aml import AML
from banklm.tasks.audit import AUDIT
from banklm.tasks.base import Task
from banklm.tasks.credit import CREDIT

TASKS: dict[str, Task] = {"credit": CREDIT, "aml": AML, "audit": AUDIT}


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (a Task passes through); ValueError listing the allowed names."""
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}") from None
