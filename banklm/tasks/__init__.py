"""Scenario tasks, each defined once as a spec (YAML): fields, labelling rules, prompt, answer, parser.

``TASKS`` maps a built-in task's name (``credit``, ``aml``, ``audit``) to its :class:`~banklm.tasks.base.Task`;
``get_task(name)`` looks up built-in and registered tasks. A bank's own task is a spec file: ``load_spec``,
``register_spec``, ``resolve_task``; ``check_spec`` / ``check_table`` / ``example_prompts`` check one.
See ``docs/tasks.md`` for the format, the rules and the answer layouts.
"""

from __future__ import annotations

from banklm.tasks.aml import AML
from banklm.tasks.audit import AUDIT
from banklm.tasks.base import AnswerField, Rule, Sampler, Task, to_fullwidth_digits
from banklm.tasks.check import check_spec, check_table, example_prompts
from banklm.tasks.credit import CREDIT
from banklm.tasks.perturb import PERTURBATIONS, perturb
from banklm.tasks.registry import (
    SPECS_FOLDER,
    TASKS,
    all_tasks,
    carried_specs,
    carry_specs,
    get_task,
    register_spec,
    resolve_task,
    resolve_tasks,
    task_from_spec,
    unregister,
)
from banklm.tasks.spec import SpecError, TaskSpec, load_spec, parse_spec
from banklm.tasks.tables import from_table

__all__ = ["TASKS", "get_task", "all_tasks", "Task", "Rule", "AnswerField", "Sampler", "from_table", "perturb",
           "PERTURBATIONS", "to_fullwidth_digits", "CREDIT", "AML", "AUDIT", "SpecError", "TaskSpec", "load_spec",
           "parse_spec", "task_from_spec", "register_spec", "unregister", "resolve_task", "resolve_tasks",
           "carried_specs", "carry_specs", "SPECS_FOLDER", "check_spec", "check_table", "example_prompts"]
