"""The small, safe expression language of task-spec rules (``when: 逾期天数 >= 90 and 担保方式 == '信用'``).

Grammar (a subset of Python expressions): comparisons ``== != < <= > >=`` (chains such as ``0 < x <= 10``
too), ``and`` / ``or`` / ``not``, arithmetic ``+ - * / // %`` and unary minus on numbers, membership
``x in [..]`` / ``x not in [..]`` (a list of literals or a list constant of the spec), parentheses, literals
(numbers, ``'strings'`` or ``"strings"``, ``true`` / ``false``, ``null``) and names: the spec's fields and
constants, Unicode allowed (``负债收入比 > 70``); a name that is not an identifier is written in backticks
(```申请金额(万元)` >= 50``).

The source is parsed with :func:`ast.parse` and every node is checked against a whitelist; anything else
(calls, attribute access, subscripts, lambdas, comprehensions, ``**``, ``if``-expressions, f-strings, ...) is
refused with :class:`ExprError`. The checked tree is turned into nested closures by walking it once; user text
is never given to ``eval`` or ``compile``. Names, literal category values and operand types are checked when
the spec is loaded.

Missing values: a missing optional field is ``None``. Comparisons and arithmetic with it give "unknown"
(``None``), ``and`` / ``or`` / ``not`` follow three-valued logic, and a rule fires only when its condition is
true, so a rule that needs a missing value does not fire. ``x == null`` / ``x != null`` test for a missing
value. Division by zero is "unknown" too.
"""

from __future__ import annotations

import ast
import operator
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MAX_CHARS = 1000
MAX_NODES = 300

# kinds of values, for the load-time checks
NUMBER, TEXT, BOOL, DATE, LIST, RECORDS, NULL, ANY = "number", "text", "yes/no", "date", "list", "records", "null", "any"

_CMP = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge}
_CMP_TEXT = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
             ast.In: "in", ast.NotIn: "not in"}
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_LITERAL_WORDS = {"true": True, "false": False, "null": None}
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

_REFUSED = {
    ast.Call: "function calls are not allowed",
    ast.Attribute: "attribute access (x.y) is not allowed",
    ast.Subscript: "subscripts (x[...]) are not allowed",
    ast.Lambda: "lambdas are not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "comprehensions are not allowed",
    ast.IfExp: "if-expressions are not allowed (write a rule for each case)",
    ast.JoinedStr: "f-strings are not allowed",
    ast.Dict: "dictionaries are not allowed",
    ast.NamedExpr: "assignments (:=) are not allowed",
    ast.Starred: "* unpacking is not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
    ast.Slice: "slices are not allowed",
}


class ExprError(ValueError):
    """An expression does not parse, uses something outside the language, names an unknown field, or fails."""


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _kind_of(value: Any) -> str:
    if value is None:
        return NULL
    if isinstance(value, bool):
        return BOOL
    if _is_num(value):
        return NUMBER
    if isinstance(value, str):
        return TEXT
    if isinstance(value, (list, tuple)):
        return LIST
    return ANY


def _protect_backticks(source: str) -> tuple[str, dict[str, str]]:
    """Replace ```any name``` (outside string literals) by placeholder identifiers."""
    out, names, i, quote = [], {}, 0, None
    while i < len(source):
        c = source[i]
        if quote:
            out.append(c)
            if c == "\\" and i + 1 < len(source):
                out.append(source[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
            out.append(c)
        elif c == "`":
            j = source.find("`", i + 1)
            if j < 0:
                raise ExprError("unclosed backtick")
            name = source[i + 1 : j]
            if not name.strip():
                raise ExprError("empty name in backticks")
            ph = f"_bt{len(names)}_"
            names[ph] = name
            out.append(f" {ph} ")
            i = j
        else:
            out.append(c)
        i += 1
    return "".join(out), names


class Expr:
    """A checked expression: ``expr(values)`` evaluates it on a mapping of field values (``None`` = unknown);
    ``expr.test(values)`` is True only when the value is true (a rule fires)."""

    __slots__ = ("source", "names", "_fn")

    def __init__(self, source: str, names: frozenset[str], fn: Callable[[Mapping[str, Any]], Any]):
        self.source = source
        self.names = names  # the field names it reads
        self._fn = fn

    def __call__(self, values: Mapping[str, Any]) -> Any:
        return self._fn(values)

    def test(self, values: Mapping[str, Any]) -> bool:
        v = self._fn(values)
        return v is not None and bool(v)

    def __repr__(self) -> str:
        return f"Expr({self.source!r})"


class _Compiler:
    def __init__(self, source: str, kinds: Mapping[str, str], constants: Mapping[str, Any],
                 categories: Mapping[str, Sequence[str]], placeholders: dict[str, str]):
        self.source = source
        self.kinds = dict(kinds)
        self.constants = dict(constants)
        self.categories = categories
        self.placeholders = placeholders
        self.used: set[str] = set()
        # Python's parser folds identifiers to NFKC: look names up the same way
        self.by_nfkc = {unicodedata.normalize("NFKC", n): n for n in (*self.kinds, *self.constants)}

    def fail(self, msg: str):
        raise ExprError(msg)

    # -- names and literals ------------------------------------------------------------------------
    def name(self, ident: str) -> tuple[Callable, str, Any]:
        """(fn, kind, literal value or _NOLIT)"""
        name = self.placeholders.get(ident)
        if name is None:
            name = self.by_nfkc.get(unicodedata.normalize("NFKC", ident), ident)
            if name not in self.kinds and name not in self.constants and ident in _LITERAL_WORDS:
                v = _LITERAL_WORDS[ident]
                return (lambda env, v=v: v), _kind_of(v), v
        if name in self.kinds:
            self.used.add(name)
            return (lambda env, n=name: env.get(n)), self.kinds[name], _NOLIT
        if name in self.constants:
            v = self.constants[name]
            if isinstance(v, list):
                v = tuple(v)
            return (lambda env, v=v: v), _kind_of(v), v
        known = sorted(self.kinds)
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        consts = f"; constants: {', '.join(sorted(self.constants))}" if self.constants else ""
        self.fail(f"unknown field {name!r} (fields: {shown}{consts})")

    def literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            v = node.value
            if v is None or isinstance(v, (bool, int, float, str)):
                return v
            self.fail(f"literal {v!r} is not allowed (numbers, strings, true/false, null)")
        if isinstance(node, ast.Name):
            _, kind, v = self.name(node.id)
            if v is _NOLIT:
                self.fail(f"a list holds literal values, not the field {self.placeholders.get(node.id, node.id)!r}")
            return v
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
                and _is_num(node.operand.value):
            return -node.operand.value
        self.fail("a list holds literal values only")

    # -- nodes -------------------------------------------------------------------------------------
    def build(self, node: ast.AST) -> tuple[Callable, str]:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.func.id.isascii():
            self.fail("function calls are not allowed (a name with brackets goes in backticks: `申请金额(万元)`)")
        for cls, msg in _REFUSED.items():
            if isinstance(node, cls):
                self.fail(msg)
        if isinstance(node, ast.Expression):
            return self.build(node.body)
        if isinstance(node, ast.Constant):
            v = self.literal(node)
            return (lambda env, v=v: v), _kind_of(v)
        if isinstance(node, ast.Name):
            fn, kind, _ = self.name(node.id)
            if kind == RECORDS:
                self.fail(f"the list field {self.placeholders.get(node.id, node.id)!r} cannot be used in a rule")
            return fn, kind
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            self.fail("a list [...] is only allowed after 'in' / 'not in'")
        if isinstance(node, ast.BoolOp):
            fns = [self.build(v)[0] for v in node.values]
            return (_and(fns) if isinstance(node.op, ast.And) else _or(fns)), BOOL
        if isinstance(node, ast.UnaryOp):
            fn, kind = self.build(node.operand)
            if isinstance(node.op, ast.Not):
                return _not(fn), BOOL
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                self.need_number(kind, "unary minus" if isinstance(node.op, ast.USub) else "unary plus")
                neg = isinstance(node.op, ast.USub)
                return (lambda env: _neg(fn(env), neg, self.source)), NUMBER
            self.fail("operator ~ is not allowed")
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                self.fail("operator ** is not allowed")
            op = _ARITH.get(type(node.op))
            if op is None:
                self.fail(f"operator {type(node.op).__name__} is not allowed (+ - * / // %)")
            lf, lk = self.build(node.left)
            rf, rk = self.build(node.right)
            self.need_number(lk, "arithmetic")
            self.need_number(rk, "arithmetic")
            return _arith(op, lf, rf, self.source), NUMBER
        if isinstance(node, ast.Compare):
            return self.compare(node), BOOL
        self.fail(f"{type(node).__name__} is not allowed")

    def need_number(self, kind: str, what: str):
        if kind not in (NUMBER, ANY, NULL):
            self.fail(f"{what} needs numbers, got a {kind} value")

    def compare(self, node: ast.Compare) -> Callable:
        parts = []
        left_node = node.left
        lf, lk = self.build(left_node)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            opname = _CMP_TEXT.get(type(op))
            if opname is None:
                self.fail(f"comparison {type(op).__name__} is not allowed ('is' is written == null)")
            if isinstance(op, (ast.In, ast.NotIn)):
                if isinstance(right_node, (ast.List, ast.Tuple, ast.Set)):
                    items = tuple(self.literal(e) for e in right_node.elts)
                else:
                    fn, kind, v = self.name(right_node.id) if isinstance(right_node, ast.Name) else (None, None, _NOLIT)
                    if v is _NOLIT or not isinstance(v, tuple):
                        self.fail(f"'{opname}' needs a list of values [..] or a list constant on its right")
                    items = v
                for it in items:
                    self.check_pair(left_node, lk, it, _kind_of(it), "in")
                parts.append(_member(lf, items, isinstance(op, ast.NotIn)))
                lf, lk, left_node = (lambda env, items=items: items), LIST, right_node
                continue
            rf, rk = self.build(right_node)
            lit_r = self.literal_of(right_node)
            lit_l = self.literal_of(left_node)
            if lit_r is not _NOLIT:
                self.check_pair(left_node, lk, lit_r, rk, opname)
            elif lit_l is not _NOLIT:
                self.check_pair(right_node, rk, lit_l, lk, opname)
            else:
                self.check_kinds(lk, rk, opname)
            if (lit_r is None or lit_l is None) and opname not in ("==", "!="):
                self.fail(f"null is tested with == null or != null, not '{opname}'")
            if opname in ("==", "!=") and (lit_r is None or lit_l is None):
                other = lf if lit_r is None else rf
                parts.append(_null_test(other, opname == "=="))
            else:
                if opname not in ("==", "!=") and BOOL in (lk, rk):
                    self.fail(f"'{opname}' orders numbers, dates or text, not yes/no values")
                parts.append(_cmp(_CMP[type(op)], lf, rf, opname, self.source))
            lf, lk, left_node = rf, rk, right_node
        return parts[0] if len(parts) == 1 else _and(parts)

    def literal_of(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            ident = node.id
            name = self.placeholders.get(ident) or self.by_nfkc.get(unicodedata.normalize("NFKC", ident), ident)
            if name in self.constants:
                return self.constants[name]
            if name not in self.kinds and ident in _LITERAL_WORDS:
                return _LITERAL_WORDS[ident]
        return _NOLIT

    def check_kinds(self, a: str, b: str, op: str):
        if ANY in (a, b) or NULL in (a, b) or a == b:
            return
        if {a, b} == {DATE, TEXT}:
            return
        self.fail(f"'{op}' compares a {a} value with a {b} value")

    def check_pair(self, node: ast.AST, kind: str, value: Any, vkind: str, op: str):
        """A field compared with a literal: kinds agree, a category value exists, a date is ISO."""
        if value is None:
            return
        self.check_kinds(kind, vkind, op)
        name = None
        if isinstance(node, ast.Name):
            ident = node.id
            name = self.placeholders.get(ident) or self.by_nfkc.get(unicodedata.normalize("NFKC", ident), ident)
        if name in self.categories and isinstance(value, str) and value not in self.categories[name]:
            allowed = ", ".join(self.categories[name])
            self.fail(f"{value!r} is not a value of {name!r} (allowed: {allowed})")
        if kind == DATE and isinstance(value, str) and not _DATE_RE.match(value):
            self.fail(f"date {value!r}: write dates as 'YYYY-MM-DD'")


_NOLIT = object()


def _and(fns: list[Callable]) -> Callable:
    def f(env):
        res = True
        for fn in fns:
            v = fn(env)
            if v is None:
                res = None
            elif not v:
                return False
        return res

    return f


def _or(fns: list[Callable]) -> Callable:
    def f(env):
        res = False
        for fn in fns:
            v = fn(env)
            if v is None:
                res = None
            elif v:
                return True
        return res

    return f


def _not(fn: Callable) -> Callable:
    def f(env):
        v = fn(env)
        return None if v is None else not v

    return f


def _neg(v, neg: bool, source: str):
    if v is None:
        return None
    if not _is_num(v):
        raise ExprError(f"{source!r}: unary minus needs a number, got {v!r}")
    return -v if neg else v


def _arith(op, lf, rf, source):
    def f(env):
        a, b = lf(env), rf(env)
        if a is None or b is None:
            return None
        if not (_is_num(a) and _is_num(b)):
            raise ExprError(f"{source!r}: arithmetic needs numbers, got {a!r} and {b!r}")
        try:
            return op(a, b)
        except ZeroDivisionError:
            return None

    return f


def _cmp(op, lf, rf, opname, source):
    def f(env):
        a, b = lf(env), rf(env)
        if a is None or b is None:
            return None
        try:
            return op(a, b)
        except TypeError:
            raise ExprError(f"{source!r}: cannot compare {a!r} {opname} {b!r}") from None

    return f


def _member(lf, items: tuple, negate: bool):
    def f(env):
        a = lf(env)
        if a is None:
            return None
        return (a not in items) if negate else (a in items)

    return f


def _null_test(fn, is_null: bool):
    return lambda env: (fn(env) is None) is is_null


def compile_expr(source: str | bool, kinds: Mapping[str, str], *, constants: Mapping[str, Any] | None = None,
                 categories: Mapping[str, Sequence[str]] | None = None) -> Expr:
    """Parse and check ``source``.

    ``kinds``: the names an expression may read (fields) -> their kind (``number``, ``text``, ``yes/no``,
    ``date``, ``records``, ``any``); ``constants``: declared values (numbers, strings, lists) inlined as
    literals; ``categories``: category field -> its values (a literal compared with it must be one of them).
    Raises :class:`ExprError` with one line saying what is wrong."""
    if isinstance(source, bool):
        source = "true" if source else "false"
    if not isinstance(source, str) or not source.strip():
        raise ExprError("empty expression")
    if len(source) > MAX_CHARS:
        raise ExprError(f"expression is {len(source)} characters, more than {MAX_CHARS}")
    text, placeholders = _protect_backticks(source)
    text = " ".join(text.splitlines())
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        odd_name = re.search(r"\w[（(%/／\-]|[)）]\w", text)
        hint = " (a name that is not an identifier goes in backticks: `申请金额(万元)`)" if odd_name else ""
        raise ExprError(f"does not parse: {e.msg}{hint}") from None
    except (ValueError, RecursionError, MemoryError):
        raise ExprError("does not parse (too deeply nested)") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ExprError(f"expression has more than {MAX_NODES} parts")
    comp = _Compiler(source, kinds, constants or {}, categories or {}, placeholders)
    try:
        fn, _ = comp.build(tree)
    except RecursionError:
        raise ExprError("expression is too deeply nested") from None
    return Expr(source, frozenset(comp.used), fn)
