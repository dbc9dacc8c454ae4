"""Scenario tasks (credit, aml, audit), each defined once: fields, labelling rules, prompt, answer, parser.

``TASKS`` maps a task name to its :class:`~banklm.tasks.base.Task`; ``get_task(name)`` looks one up.
See ``docs/tasks.md`` for the rules and answer layouts.
"""

from __future__ import annotations

from banklm.tasks.aml import AML
from banklm.tasks.audit import AUDIT
from banklm.tasks.base import PERTURBATIONS, AnswerField, Rule, Task, from_table, perturb, to_fullwidth_digits
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


__all__ = [
    "TASKS",
    "get_task",
    "Task",
    "Rule",
    "AnswerField",
    "from_table",
    "perturb",
    "PERTURBATIONS",
    "to_fullwidth_digits",
    "CREDIT",
    "AML",
    "AUDIT",
]
