"""Perturbed prompts for robustness checks: the same facts, re-rendered or re-typed."""

from __future__ import annotations

import json
import random
from typing import Any

from banklm.tasks.base import Task, to_fullwidth_digits
from banklm.tasks.registry import get_task

Fields = dict[str, Any]

PERTURBATIONS = ("shuffle_fields", "fullwidth_digits", "distractor")

# perturbations that re-render the prompt from the input fields kept in ``meta``
_RERENDERED = ("shuffle_fields", "distractor")


class CannotPerturb(ValueError):
    """The record lacks what the perturbation needs (a prompt-only table row has no fields to re-render)."""


def can_perturb(task: Task | str, record: dict, kind: str) -> bool:
    """Whether :func:`perturb` can apply ``kind`` to ``record``, so callers can skip instead of failing."""

    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; allowed: {', '.join(PERTURBATIONS)}")
    if kind not in _RERENDERED:
        return True
    t = get_task(task) if isinstance(task, str) else task
    return t.fields_from_meta(record.get("meta") or "{}") is not None


def perturb(task: Task | str, record: dict, rng: random.Random, kind: str) -> dict:
    """A copy of ``record`` whose user prompt is perturbed; gold, label and assistant answer stay.

    kinds: ``shuffle_fields`` (re-render with another fact order and wording), ``fullwidth_digits``
    (digits, '%' and '.' as full-width characters), ``distractor`` (re-render with two extra
    irrelevant sentences). Re-rendering needs the fields in ``meta``; records loaded from a table
    with a free-text prompt support only ``fullwidth_digits`` (others raise :class:`CannotPerturb`;
    check first with :func:`can_perturb`).
    """

    t = get_task(task) if isinstance(task, str) else task
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; allowed: {', '.join(PERTURBATIONS)}")
    rec = json.loads(json.dumps(record, ensure_ascii=False))
    user_idx = max(i for i, m in enumerate(rec["messages"]) if m["role"] == "user")
    prompt = rec["messages"][user_idx]["content"]
    if kind == "fullwidth_digits":
        new = to_fullwidth_digits(prompt)
    else:
        fields = t.fields_from_meta(rec.get("meta") or "{}")
        if fields is None:
            raise CannotPerturb(f"record {rec.get('id')}: meta has no input fields; cannot apply {kind!r}")
        new = prompt
        for _ in range(10):
            new = t.render_prompt(fields, rng, distractors=2 if kind == "distractor" else 0,
                                  shuffle=True if kind == "shuffle_fields" else None)
            if new != prompt:
                break
    rec["messages"][user_idx]["content"] = new
    meta = json.loads(rec.get("meta") or "{}")
    meta["perturbation"] = kind
    rec["meta"] = json.dumps(meta, ensure_ascii=False)
    return rec
