"""What the recipe schema and the task-spec schema share to turn a pydantic error into one clear line."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel


def _unwrap(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _unwrap(arg)]
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    return [annotation]


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The schema class that holds the keys under ``loc`` (to list the allowed keys in an error). A dict or
    list of models consumes two parts of ``loc``: the free-form key (a task name) or the list index."""
    model, i = root, 0
    while i < len(loc):
        field = model.model_fields.get(str(loc[i]))
        if field is None:
            return None
        nxt, step = None, 1
        for cand in _unwrap(field.annotation):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nxt = cand
            elif typing.get_origin(cand) in (dict, list):
                inner = typing.get_args(cand)[-1]
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    nxt, step = inner, 2
        if nxt is None:
            return None
        model, i = nxt, i + step
    return model


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for an error line."""
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."
