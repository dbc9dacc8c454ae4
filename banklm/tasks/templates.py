"""Templates of task specs (fact wordings, reasons): Jinja2 in its sandbox, with the number formats as filters.

``负债收入比{{ dti | pct }}过高`` -> ``负债收入比72.4%过高``. Variables are the task's fields and constants by
name (Unicode names work: ``{{ 逾期天数 }}``; any name through ``fields['申请金额(万元)']``). Undefined names
are errors (``StrictUndefined``, and checked when the spec is loaded); a missing optional value prints as
``未提供``. The sandbox refuses unsafe attribute access; ``**`` and the repetition of text or lists by large
numbers are refused too, so a spec cannot make rendering run away. Globals (``range``, ``lipsum``, ...) are
removed: a template formats values, it does not compute.

Filters: ``pct`` (52.3%), ``num`` (12.5), ``int`` (12), ``yuan`` (18500元), ``wan`` (80万元), ``thousands``
(18,500), ``yuan_thousands`` (18,500元), ``yesno`` (是/否), and Jinja's own (``default``, ``upper``, ...).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from banklm.tasks.formats import MISSING_TEXT, NUMBER_FORMATS, fmt_yesno, missing_safe

MAX_TEMPLATE_CHARS = 2000
MAX_REPEAT = 1000

FILTERS = {**{name: missing_safe(fn) for name, fn in NUMBER_FORMATS.items()}, "yesno": missing_safe(fmt_yesno)}


class TemplateFailure(ValueError):
    """A template does not compile, names something unknown, or fails to render."""


def _finalize(value: Any) -> Any:
    return MISSING_TEXT if value is None else value


class _Env(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**":
            raise SecurityError("** is not allowed in templates")
        if operator == "*" and (isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple))):
            n = right if isinstance(left, (str, list, tuple)) else left
            if isinstance(n, int) and n > MAX_REPEAT:
                raise SecurityError(f"repeating text more than {MAX_REPEAT} times is not allowed")
        return super().call_binop(context, operator, left, right)


ENV = _Env(undefined=StrictUndefined, autoescape=False, finalize=_finalize, keep_trailing_newline=False)
ENV.globals.clear()
ENV.filters.update(FILTERS)


class Template:
    """A compiled template: ``t.render(values)``; ``t.names`` are the variables it reads."""

    __slots__ = ("source", "names", "_tpl", "_parts")

    def __init__(self, source: str, allowed: Collection[str] | None = None):
        if not isinstance(source, str):
            raise TemplateFailure(f"a template is text, got {type(source).__name__}")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateFailure(f"template is {len(source)} characters, more than {MAX_TEMPLATE_CHARS}")
        self.source = source
        try:
            tree = ENV.parse(source)
            self._tpl = ENV.from_string(tree)
        except TemplateError as e:
            raise TemplateFailure(f"template does not compile: {_one_line(e)}") from None
        self.names = frozenset(meta.find_undeclared_variables(tree))
        self._parts = _plain_parts(tree)
        if allowed is not None:
            unknown = sorted(self.names - set(allowed))
            if unknown:
                known = sorted(allowed)
                shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
                raise TemplateFailure(f"template names unknown field {unknown[0]!r} (known: {shown})")

    def render(self, values: Mapping[str, Any]) -> str:
        if self._parts is not None:
            try:
                return "".join(p if isinstance(p, str) else _show(p, values) for p in self._parts)
            except Exception:  # noqa: BLE001 - a missing name or a failing filter: Jinja's path says what
                pass
        # Template.render without its copy of the values (``shared``: the globals are empty anyway); a
        # ``{% set %}`` writes to this render's own context, never to ``values``
        tpl = self._tpl
        try:
            return ENV.concat(tpl.root_render_func(tpl.new_context(values, shared=True)))  # type: ignore[attr-defined]
        except (TemplateError, SecurityError) as e:
            raise TemplateFailure(f"template {self.source!r} fails to render: {_one_line(e)}") from None
        except (TypeError, ValueError, ArithmeticError, KeyError, IndexError, AttributeError) as e:
            raise TemplateFailure(
                f"template {self.source!r} fails to render: {type(e).__name__}: {_one_line(e)}") from None

    def __repr__(self) -> str:
        return f"Template({self.source!r})"


class _Slow(Exception):
    pass


_ABSENT = object()


def _show(part: tuple, values: Mapping[str, Any]) -> str:
    name, fn = part
    v = values.get(name, _ABSENT)
    if v is _ABSENT:
        raise _Slow
    if fn is not None:
        v = fn(v)
    return MISSING_TEXT if v is None else str(v)


def _plain_parts(tree: nodes.Template) -> list | None:
    """A template made only of text, ``{{ name }}`` and ``{{ name | filter }}`` (one of ours, no arguments) as a
    list of texts and ``(name, filter)`` pairs, rendered without Jinja's runtime (same output: the filter, then
    ``None`` as 未提供, then ``str``); None for anything else."""
    parts: list = []
    for out in tree.body:
        if not isinstance(out, nodes.Output):
            return None
        for n in out.nodes:
            if isinstance(n, nodes.TemplateData):
                parts.append(n.data)
            elif isinstance(n, nodes.Name) and n.ctx == "load":
                parts.append((n.name, None))
            elif (isinstance(n, nodes.Filter) and isinstance(n.node, nodes.Name) and n.name in FILTERS
                  and not n.args and not n.kwargs and n.dyn_args is None and n.dyn_kwargs is None):
                parts.append((n.node.name, FILTERS[n.name]))
            else:
                return None
    return parts


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
