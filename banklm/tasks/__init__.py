"""Scenario tasks (credit, aml, audit), each defined once: fields, labelling rules, prompt, answer, parser.

``TASKS`` maps a task name to its :class:`~banklm.tasks.base.Task`; ``get_task(name)`` looks one up.
See ``docs/tasks.md`` for the rules and answer layouts.
"""

from __future__ import annotations

from banklm.tasks.aml import AML
from banklm.tasks.audit import AUDIT
from banklm.tasks.base import AnswerField, Rule, Task, to_fullwidth_digits
from banklm.tasks.credit import CREDIT
from banklm.tasks.perturb import PERTURBATIONS, perturb
from banklm.tasks.registry import TASKS, get_task
from banklm.tasks.tables import from_table

__all__ = ["TASKS", "get_task", "Task", "Rule", "AnswerField", "from_table", "perturb", "PERTURBATIONS",
           "to_fullwidth_digits", "CREDIT", "AML", "AUDIT"]
