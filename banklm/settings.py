"""Settings declared once, on the dataclass that uses them: a default and its bounds, which the dataclass checks
when built and the recipe schema turns into pydantic constraints (corpus steps, the training config)."""

from __future__ import annotations

import operator
from dataclasses import field
from typing import Any

#: pydantic's bound names -> (check, sign shown in errors)
BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def setting(default: Any, **bounds: float) -> Any:
    """A dataclass field a recipe may set, with its ``default`` and ``bounds`` (``ge``, ``gt``, ``le``, ``lt``)
    in ``metadata["bounds"]``."""
    unknown = sorted(set(bounds) - set(BOUNDS))
    if unknown:
        raise TypeError(f"setting: unknown bound {unknown[0]!r} (allowed: {', '.join(BOUNDS)})")
    return field(default=default, metadata={"bounds": bounds})


def bound_problem(name: str, value: Any, bounds: dict) -> str | None:
    """Why ``value`` of setting ``name`` breaks ``bounds`` (not a number, or out of range), or None."""
    for bound, limit in bounds.items():
        check, sign = BOUNDS[bound]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number, got {value!r}"
        if not check(value, limit):
            return f"{name} must be {sign} {limit}, got {value!r}"
    return None
