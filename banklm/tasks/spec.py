"""Task specs: a task (fields, prompt, answer, rules, evaluation settings) written once in YAML.

``load_spec(path)`` reads and checks a spec and returns a :class:`TaskSpec` (compiled rules and templates);
:class:`banklm.tasks.base.Task` is built from one. Every problem is a :class:`SpecError` whose message is one
line naming the file, the key path, the bad value and what is allowed, like the recipe's errors. The format
is documented in ``docs/tasks.md``; the built-in tasks are ``banklm/tasks/specs/{credit,aml,audit}.yaml``.

Checks made when a spec is loaded, beyond the schema (unknown keys, types): duplicate names, labels and
aliases; rules that do not parse (:mod:`banklm.tasks.expr`) or name an unknown field or value; outcomes
outside the label sets; a favourable, positive or abstain value outside its label set; a protected
attribute that is also the label; templates (:mod:`banklm.tasks.templates`) that do not compile, name an
unknown field, or fail to render on the spec's own examples; examples whose expected answer the rules
contradict.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from banklm.schema import model_at, short_repr
from banklm.tasks.expr import ANY, BOOL, DATE, NUMBER, RECORDS, TEXT, Expr, ExprError, compile_expr
from banklm.tasks.formats import MISSING_TEXT, NUMBER_FORMATS, display_value, norm_value
from banklm.tasks.templates import Template, TemplateFailure

MAX_SPEC_BYTES = 1_000_000
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
RULE_NAME_RE = re.compile(r"^\w{1,64}$")
#: names a field may not have: template variables of their own, and the expression literals
RESERVED_NAMES = ("fields", "value", "label", "true", "false", "null")
NUMERIC_TYPES = ("integer", "decimal", "percent")


class SpecError(ValueError):
    """A task spec is invalid; the message is one line a user can act on (file, key, value, what is allowed)."""


# ------------------------------------------------------------------------------------------------ schema

FieldType = Literal["text", "integer", "decimal", "percent", "boolean", "date", "category", "list"]
FormatName = Literal["pct", "num", "int", "yuan", "wan", "thousands", "yuan_thousands"]


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class SubFieldSpec(_M):
    """A field of a record in a list field (and the base of :class:`FieldSpec`)."""

    type: FieldType = "text"
    label: str | None = None  # how the prompt names it (default: the field's name)
    description: str = ""
    unit: str | None = None
    format: FormatName | None = None
    values: list[str] | None = None  # category values
    required: bool = True
    default: Any = None  # optional fields only: the value a spec example without the field gets (never a table row)
    true_text: str = "是"
    false_text: str = "否"
    min: float | None = None
    max: float | None = None
    example: Any = None


class FieldSpec(SubFieldSpec):
    """An input field of the task."""

    show: bool = True  # written in the prompt (default wording) or not
    protected: bool = False  # a fairness attribute (rules should not read it)
    bands: dict[str, int | float | None] | None = None  # numeric: band name -> largest value in it (last: null)
    band_field: str | None = None  # where the band is stored (default <name>_band)
    wording: list[str] | None = None  # alternative templates of this field's fact
    fields: dict[str, SubFieldSpec] | None = None  # list of records: the fields of one record

    _wording_list = field_validator("wording", mode="before")(_as_list)


class AnswerKeySpec(_M):
    type: Literal["category", "multi", "reason"] = "category"
    name: str | None = None  # as written in the answer (default: the key)
    aliases: list[str] = []
    values: list[str] | None = None
    ordinal: bool = False  # values listed in order (lowest first or highest first, as the bank ranks them)
    max_length: int | None = Field(None, ge=1, le=2000)  # reason only
    cite: list[str] | None = None  # reason only: the fields and constants a reason may cite
    bind: bool = False  # reason only: the answer grammar puts a number only right after its own field's name
    summary: str | None = None  # reason only: a neutral template of the fields, the reason of a bank's row without one
    description: str = ""


class AnswerSpec(_M):
    keys: dict[str, AnswerKeySpec] = Field(min_length=1)
    primary: str
    favourable: str | None = None  # the primary value that is good for the customer (fairness, costs)
    positive: str | None = None  # the value a detection task looks for (e.g. 可疑)
    positive_key: str | None = None  # the key ``positive`` belongs to (default: the primary key)
    abstain: str | None = None  # the primary value that hands the case to a person (e.g. 转人工)


class RuleSpec(_M):
    name: str
    when: Any = None  # expression; only the last rule has none (the catch-all)
    outcome: dict[str, Any]
    reason: str | None = None  # template
    doc: str = ""


class PromptSpec(_M):
    system: str | None = None  # policy text: the system prompt of every record
    instruction: str | None = None
    intros: list[str] | None = None  # alternatives to ``instruction``
    question: str | None = None
    questions: list[str] | None = None
    facts: list[Any] | None = None  # each: a template or a list of alternative templates
    distractors: list[str] = []
    head_facts: int = Field(0, ge=0)
    shuffle: bool = False
    separators: list[str] = Field(default_factory=lambda: ["；"], min_length=1)


class ExampleSpec(_M):
    fields: dict[str, Any]
    expect: dict[str, Any] = {}  # answer keys and/or ``rule``


class EvaluationSpec(_M):
    segments: list[str] = []
    costs: dict[str, dict[str, float]] = {}  # costs[gold][predicted]
    handoff_cost: float = Field(0.0, ge=0.0)  # the cost of a case handed to a person (abstention, 转人工)
    prevalence: dict[str, float] = {}


class SpecModel(_M):
    name: str
    title: str
    description: str = ""
    fields: dict[str, FieldSpec] = Field(min_length=1)
    constants: dict[str, Any] = {}
    prompt: PromptSpec = PromptSpec()
    answer: AnswerSpec
    rules: list[RuleSpec] = []
    examples: list[ExampleSpec] = []
    evaluation: EvaluationSpec = EvaluationSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"task name {v!r}: lowercase ASCII letters, digits and _, starting with a letter, "
                             "at most 32 characters (e.g. post_loan)")
        return v


# ------------------------------------------------------------------------------------------------ YAML

class _SpecLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe loader that refuses duplicate keys (YAML would keep the last); aliases are refused by
    :func:`_yaml_load` (billion laughs)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                except TypeError:
                    continue
                if dup:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _refuse_aliases(node) -> None:
    """An alias is a node met twice in the document's graph (walked without expanding it)."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            raise yaml.constructor.ConstructorError(None, None, "YAML aliases (*name) are not allowed in specs",
                                                    n.start_mark)
        seen.add(id(n))
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.extend((k, v))


def _yaml_load(text: str, source: str) -> Any:
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_aliases(node)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise SpecError(f"{source}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    finally:
        loader.dispose()


# ------------------------------------------------------------------------------------------------ errors

def _path(loc: tuple) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


def _format_error(source: str, err: dict) -> str:
    loc = tuple(err["loc"])
    key = _path(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = model_at(SpecModel, loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        return f"{source}: unknown key '{key}' (allowed here: {allowed})"
    if kind == "missing":
        return f"{source}: missing required key '{key}'"
    msg = " ".join(str(err["msg"]).split())
    if kind == "value_error":
        return f"{source}: {key}: {msg.removeprefix('Value error, ')}"
    if kind == "literal_error":
        return f"{source}: {key} = {short_repr(err.get('input'))}: {msg.replace('Input should be', 'allowed:')}"
    return f"{source}: {key} = {short_repr(err.get('input'))}: {msg}"


def _allowed(values) -> str:
    vals = [str(v) for v in values]
    return ", ".join(vals[:15]) + (f", ... ({len(vals)} in all)" if len(vals) > 15 else "")


# ------------------------------------------------------------------------------------------------ values

TRUE_WORDS = {"是", "有", "true", "yes", "y", "1", "1.0", "t", "通过", "一致", "已披露", "正常"}
FALSE_WORDS = {"否", "无", "false", "no", "n", "0", "0.0", "f", "未通过", "不一致", "未披露", "异常"}
GENERIC_UNITS = ("万元", "元", "%", "次", "笔", "个", "倍", "岁", "年", "月")
_DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%Y.%m.%d", "%Y%m%d", "%Y年%m月%d日")


def is_missing(v: Any) -> bool:
    """An empty cell: None, NaN, or blank text."""
    if v is None:
        return True
    if isinstance(v, float) and v != v:
        return True
    return isinstance(v, str) and not v.strip()


def coerce_value(f: SubFieldSpec, v: Any, *, strict: bool = True) -> Any:
    """A raw value (a table cell, a YAML example) as the field's type; ValueError saying why not.

    Numbers may carry units (the field's own, and 万元 元 % 次 笔 个 倍 岁 年 月) and thousands separators; a
    ``万元`` amount in a field whose unit is 元 is multiplied by 10000; yes/no fields accept 是/否, true/false,
    1/0, 通过/未通过, 一致/不一致, 已披露/未披露 and the field's own ``true_text``/``false_text``; dates are
    written ISO (2024-03-01; 2024/3/1, 20240301, 2024年3月1日 are read). ``strict`` (checks, examples) also
    demands a category's values, whole numbers for integers and the ``min``/``max`` range; without it (the
    built-ins' table loader) those are taken as they come."""
    t = f.type
    if t == "boolean":
        if isinstance(v, bool):
            return v
        s = str(v).strip()
        if s == f.true_text:
            return True
        if s == f.false_text:
            return False
        if s.lower() in TRUE_WORDS:
            return True
        if s.lower() in FALSE_WORDS:
            return False
        raise ValueError(f"cannot read {v!r} as yes/no")
    if t in NUMERIC_TYPES:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            x = v
        else:
            s = unicodedata.normalize("NFKC", str(v)).replace(",", "").strip()
            mult = 1.0
            units = sorted(dict.fromkeys(((f.unit,) if f.unit else ()) + GENERIC_UNITS), key=len, reverse=True)
            for unit in units:
                if s.endswith(unit):
                    s = s[: -len(unit)].strip()
                    if unit == "万元" and f.unit == "元":
                        mult = 10000.0
                    break
            try:
                x = float(s) * mult
            except ValueError:
                raise ValueError(f"cannot read {v!r} as a number") from None
            if x != x or x in (float("inf"), float("-inf")):
                raise ValueError(f"cannot read {v!r} as a number")
            x = int(x) if x.is_integer() else x
        if strict:
            if t == "integer":
                if isinstance(x, float) and not x.is_integer():
                    raise ValueError(f"{v!r} is not a whole number")
                x = int(x)
            if f.min is not None and x < f.min:
                raise ValueError(f"{v!r} is below the minimum {f.min:g}")
            if f.max is not None and x > f.max:
                raise ValueError(f"{v!r} is above the maximum {f.max:g}")
        return x
    if t == "date":
        if isinstance(v, _dt.datetime):
            return v.date().isoformat()
        if isinstance(v, _dt.date):
            return v.isoformat()
        s = unicodedata.normalize("NFKC", str(v)).strip()
        s = s.split(" ")[0].split("T")[0] if re.match(r"^\d{4}-\d{1,2}-\d{1,2}[ T]", s) else s
        for fmt in _DATE_FORMATS:
            try:
                return _dt.datetime.strptime(s, fmt).date().isoformat()
            except ValueError:
                continue
        raise ValueError(f"cannot read {v!r} as a date (write 2024-03-01)")
    if t == "list":
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                raise ValueError("a list of records is a JSON list of objects") from None
        if not isinstance(v, list) or not all(isinstance(r, dict) for r in v):
            raise ValueError("a list of records is a list of objects")
        subs = getattr(f, "fields", None) or {}
        out = []
        for i, rec in enumerate(v):
            unknown = [k for k in rec if k not in subs]
            if unknown and strict:
                raise ValueError(f"record {i + 1}: unknown field {unknown[0]!r} (allowed: {_allowed(subs)})")
            r = {}
            for name, sub in subs.items():
                raw = rec.get(name)
                if is_missing(raw):
                    if sub.required and strict:
                        raise ValueError(f"record {i + 1}: {name!r} is missing")
                    r[name] = sub.default if "default" in sub.model_fields_set else None
                    continue
                try:
                    r[name] = coerce_value(sub, raw, strict=strict)
                except ValueError as e:
                    raise ValueError(f"record {i + 1}, {name!r}: {e}") from None
            out.append(r)
        return out
    s = str(v).strip()
    if t == "category" and strict and f.values is not None and s not in f.values:
        canon = {norm_value(a): a for a in f.values}
        if norm_value(s) in canon:
            return canon[norm_value(s)]
        raise ValueError(f"{v!r} is not one of {_allowed(f.values)}")
    return s


def _expr_kind(f: SubFieldSpec) -> str:
    return {"integer": NUMBER, "decimal": NUMBER, "percent": NUMBER, "boolean": BOOL, "date": DATE,
            "list": RECORDS, "text": TEXT, "category": TEXT}.get(f.type, ANY)


def example_value(f: SubFieldSpec) -> Any:
    """A value to render a template with when the spec gives no example."""
    if f.example is not None:
        return f.example
    if "default" in f.model_fields_set:
        return f.default
    t = f.type
    lo = f.min if f.min is not None else None
    return {
        "integer": int(lo) if lo is not None else 1,
        "decimal": float(lo) if lo is not None else 1.5,
        "percent": float(lo) if lo is not None else 12.5,
        "boolean": False,
        "date": "2024-01-01",
        "category": (f.values or ["?"])[0],
        "list": [{n: example_value(s) for n, s in (getattr(f, "fields", None) or {}).items()}],
    }.get(t, "示例")


# ------------------------------------------------------------------------------------------------ compiled

class DefaultWording:
    """The default fact of a field: ``label：value`` with the field's number format and unit."""

    __slots__ = ("name", "field", "source", "names")

    def __init__(self, name: str, f: FieldSpec):
        self.name, self.field = name, f
        self.source = f"{f.label or name}：<value>"
        self.names = frozenset({name})

    def render(self, values: Mapping[str, Any]) -> str:
        return f"{self.field.label or self.name}：{field_text(self.field, values.get(self.name))}"


class FieldWording:
    """A field's own ``wording`` template: ``value`` (formatted) and ``label`` besides the fields."""

    __slots__ = ("name", "field", "template", "source", "names")

    def __init__(self, name: str, f: FieldSpec, template: Template):
        self.name, self.field, self.template = name, f, template
        self.source = template.source
        self.names = (template.names - {"value", "label"}) | {name}

    def render(self, values: Mapping[str, Any]) -> str:
        return self.template.render({**values, "value": field_text(self.field, values.get(self.name)),
                                     "label": self.field.label or self.name})


def field_text(f: SubFieldSpec, value: Any) -> str:
    """How the prompt writes one field value by default (``45.0%``, ``80万元``, ``35天``, ``是``, ``未提供``)."""
    return display_value(value, f.type, unit=f.unit, fmt=f.format, true_text=f.true_text, false_text=f.false_text,
                         subfields=getattr(f, "fields", None))


@dataclass
class CompiledRule:
    name: str
    when: Expr | None  # None: the catch-all
    outcome: dict[str, Any]
    reason: Template | None
    doc: str = ""


@dataclass
class Band:
    field: str  # the numeric field
    into: str  # the band field it fills
    bands: list[tuple[str, float | None]]  # (name, largest value in it; None = everything above)

    def of(self, value: Any) -> str | None:
        if value is None:
            return None
        for name, top in self.bands:
            if top is None or value <= top:
                return name
        return self.bands[-1][0]


@dataclass
class TaskSpec:
    """A checked task spec: the validated schema plus compiled rules, facts and bands."""

    model: SpecModel
    source: str
    text: str
    rules: list[CompiledRule]
    facts: list[list[Any]]  # each fact: alternatives with ``.render(values)`` and ``.names``
    bands: list[Band]
    examples: list[dict]  # the examples' fields (typed, bands derived)
    warnings: list[str] = field(default_factory=list)
    #: the reason key's ``summary`` template: the reason of a bank's labelled row that gives none (None: such a
    #: row has no reason target)
    summary: Template | None = None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def title(self) -> str:
        return self.model.title

    @property
    def fields(self) -> dict[str, FieldSpec]:
        return self.model.fields

    @property
    def constants(self) -> dict[str, Any]:
        return self.model.constants

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def template_values(self, values: Mapping[str, Any]) -> dict:
        """What a template sees: the constants, the field values by name, and ``fields`` (all of them)."""
        return {**self.model.constants, **values, "fields": values}

    def derive(self, values: dict) -> None:
        """Fill the band fields in place (e.g. ``age_band`` from ``age``)."""
        for b in self.bands:
            values[b.into] = b.of(values.get(b.field))


class _Checker:
    def __init__(self, model: SpecModel, source: str):
        self.m = model
        self.source = source
        self.warnings: list[str] = []

    def fail(self, path: str, msg: str):
        raise SpecError(f"{self.source}: {path}: {' '.join(str(msg).split())}")

    # -- fields -----------------------------------------------------------------------------------
    def check_field(self, path: str, name: str, f: SubFieldSpec):
        if not name or name != name.strip() or any(c in name for c in "\n\r\t{}`"):
            self.fail(path, f"field name {name!r}: no surrounding spaces, tabs, newlines, braces or backticks")
        if name in RESERVED_NAMES:
            self.fail(path, f"field name {name!r} is reserved ({', '.join(RESERVED_NAMES)})")
        t = f.type
        given = f.model_fields_set
        if t == "category":
            if not f.values:
                self.fail(f"{path}.values", "a category field lists its values")
            self.unique(f"{path}.values", f.values, "value")
        elif f.values is not None:
            self.fail(f"{path}.values", f"only a category field has values (this one is {t})")
        if f.format is not None and t not in NUMERIC_TYPES:
            self.fail(f"{path}.format", f"a number format applies to integer, decimal and percent fields, not {t}")
        if f.unit is not None and t not in NUMERIC_TYPES:
            self.fail(f"{path}.unit", f"a unit applies to integer, decimal and percent fields, not {t}")
        if t == "percent" and f.unit not in (None, "%"):
            self.fail(f"{path}.unit", "a percent field is written with % (leave unit out)")
        if (f.min is not None or f.max is not None) and t not in NUMERIC_TYPES:
            self.fail(f"{path}.min", f"min/max apply to numbers, not {t}")
        if ("true_text" in given or "false_text" in given) and t != "boolean":
            self.fail(f"{path}.true_text", f"true_text/false_text apply to boolean fields, not {t}")
        if t == "boolean" and f.true_text == f.false_text:
            self.fail(f"{path}.false_text", "true_text and false_text must differ")
        if "default" in given:
            if f.required:
                self.fail(f"{path}.default", "only an optional field (required: false) has a default")
            if f.default is not None:
                self.value(f"{path}.default", f, f.default)
        if f.example is not None:
            self.value(f"{path}.example", f, f.example)
        if isinstance(f, FieldSpec):
            if t == "list":
                if not f.fields:
                    self.fail(f"{path}.fields", "a list field declares the fields of its records")
                for sub_name, sub in f.fields.items():
                    if sub.type == "list":
                        self.fail(f"{path}.fields.{sub_name}.type", "a record in a list cannot hold another list")
                    self.check_field(f"{path}.fields.{sub_name}", sub_name, sub)
            elif f.fields is not None:
                self.fail(f"{path}.fields", f"only a list field has record fields (this one is {t})")
            if f.bands is not None:
                if t not in NUMERIC_TYPES:
                    self.fail(f"{path}.bands", f"bands group numbers, not {t} values")
                if not f.bands:
                    self.fail(f"{path}.bands", "bands: at least one band")
                tops = list(f.bands.values())
                if tops[-1] is not None:
                    self.fail(f"{path}.bands", "the last band has no upper bound (null): it holds everything above")
                if any(x is None for x in tops[:-1]):
                    self.fail(f"{path}.bands", "only the last band has no upper bound")
                nums = list(tops[:-1])
                if nums != sorted(nums) or len(set(nums)) != len(nums):
                    self.fail(f"{path}.bands", f"upper bounds must increase, got {nums}")
            elif f.band_field is not None:
                self.fail(f"{path}.band_field", "band_field needs bands")
            if f.protected:
                if t in NUMERIC_TYPES and f.bands is None:
                    self.fail(f"{path}.bands", f"the numeric protected attribute {name!r} needs bands "
                              "(e.g. bands: {18-30岁: 30, 31-45岁: 45, 46岁以上: null})")
                if t in ("list", "date"):
                    self.fail(f"{path}.protected", f"a {t} field cannot be a protected attribute")

    def value(self, path: str, f: SubFieldSpec, v: Any) -> Any:
        try:
            return coerce_value(f, v, strict=True)
        except ValueError as e:
            self.fail(path, str(e))

    def unique(self, path: str, items, what: str):
        seen = {}
        for v in items:
            if not isinstance(v, str) or not v.strip():
                self.fail(path, f"{what} {v!r}: a non-empty text")
            if v in seen:
                self.fail(path, f"duplicate {what} {v!r}")
            n = norm_value(v)
            if n in seen.values():
                other = next(k for k, x in seen.items() if x == n)
                self.fail(path, f"{what}s {other!r} and {v!r} read the same to the tolerant parser")
            seen[v] = n

    # -- the whole spec ---------------------------------------------------------------------------
    def run(self, text: str) -> TaskSpec:
        m = self.m
        # fields and bands
        for name, f in m.fields.items():
            self.check_field(f"fields.{name}", name, f)
        bands: list[Band] = []
        names = set(m.fields)
        for name, f in m.fields.items():
            if f.bands is not None:
                into = f.band_field or f"{name}_band"
                if into in names:
                    self.fail(f"fields.{name}.band_field", f"{into!r} is already a field")
                names.add(into)
                bands.append(Band(name, into, list(f.bands.items())))
        band_of = {b.field: b for b in bands}
        for cname, cv in m.constants.items():
            p = f"constants.{cname}"
            if cname in names:
                self.fail(p, f"constant {cname!r} has the name of a field")
            if cname in RESERVED_NAMES or not cname.strip():
                self.fail(p, f"constant name {cname!r} is reserved or empty")
            scalars = (str, int, float, bool)
            ok = isinstance(cv, scalars) or (isinstance(cv, list) and cv and all(isinstance(x, scalars) for x in cv))
            if not ok:
                self.fail(p, f"a constant is a number, a text, true/false or a list of them, got {short_repr(cv)}")
        kinds = {n: _expr_kind(f) for n, f in m.fields.items()}
        kinds.update({b.into: TEXT for b in bands})
        categories = {n: f.values for n, f in m.fields.items() if f.type == "category"}
        categories.update({b.into: [n for n, _ in b.bands] for b in bands})
        tpl_names = set(kinds) | set(m.constants) | {"fields"}

        answer = self.check_answer(set(m.fields) | {b.into for b in bands})
        facts = self.check_prompt(tpl_names)
        rules = self.check_rules(kinds, categories, tpl_names, facts)
        self.check_evaluation(band_of)
        spec = TaskSpec(model=m, source=self.source, text=text, rules=rules, facts=facts, bands=bands,
                        examples=[], warnings=self.warnings, summary=self.check_summary(answer, tpl_names))
        spec.examples = self.check_examples(spec)
        self.render_check(spec, answer)
        return spec

    def check_answer(self, field_names: set[str]) -> dict:
        a = self.m.answer
        written: dict[str, str] = {}
        reason_keys = []
        for key, k in a.keys.items():
            p = f"answer.keys.{key}"
            if not key.strip() or key == "rule":
                self.fail(p, f"answer key {key!r} is empty or reserved ('rule' holds the rule that fired)")
            if key in field_names:
                if key == a.primary and self.m.fields.get(key) is not None and self.m.fields[key].protected:
                    self.fail(p, f"{key!r} is a protected attribute and also the label: a fairness attribute "
                                 "cannot be what the model predicts")
                self.fail(p, f"answer key {key!r} is also an input field (the answer would be in the prompt)")
            if k.type == "reason":
                reason_keys.append(key)
                if k.values is not None:
                    self.fail(f"{p}.values", "a reason is free text: it has no values")
                if k.ordinal:
                    self.fail(f"{p}.ordinal", "a reason cannot be ordinal")
            else:
                if not k.values:
                    self.fail(f"{p}.values", f"a {k.type} key lists its values")
                self.unique(f"{p}.values", k.values, "label")
                for v in k.values:
                    if any(c in v for c in "；;\n") or (k.type == "multi" and "、" in v):
                        self.fail(f"{p}.values", f"value {v!r} contains a separator (；; newline"
                                  + (" or 、" if k.type == "multi" else "") + ")")
                if k.max_length is not None or k.cite is not None:
                    self.fail(f"{p}.max_length", "max_length and cite apply to the reason key")
                if k.summary is not None:
                    self.fail(f"{p}.summary", "a summary applies to the reason key")
                if k.bind:
                    self.fail(f"{p}.bind", "bind applies to the reason key (numbers after their field's name)")
                if k.ordinal and k.type != "category":
                    self.fail(f"{p}.ordinal", "only a single-valued category key is ordinal")
            for w in (k.name or key, *k.aliases):
                if not w.strip() or any(c in w for c in "：:；;\n"):
                    self.fail(f"{p}.name", f"{w!r}: a key as written is non-empty text without ：:；;")
                if w in written:
                    self.fail(f"{p}.aliases", f"{w!r} already names the key {written[w]!r}")
                written[w] = key
            if k.cite is not None:
                known = field_names | set(self.m.constants)
                for c in k.cite:
                    if c not in known:
                        self.fail(f"{p}.cite", f"unknown field or constant {c!r} (allowed: {_allowed(sorted(known))})")
        if len(reason_keys) > 1:
            self.fail("answer.keys", f"at most one reason key, got {', '.join(reason_keys)}")
        if a.primary not in a.keys:
            self.fail("answer.primary", f"{a.primary!r} is not an answer key (allowed: {_allowed(a.keys)})")
        prim = a.keys[a.primary]
        if prim.type != "category":
            self.fail("answer.primary", f"the primary label is a single-valued category key, {a.primary!r} is {prim.type}")
        for what in ("favourable", "abstain"):
            v = getattr(a, what)
            if v is not None and v not in prim.values:
                self.fail(f"answer.{what}", f"{v!r} is not a label of {a.primary!r} (allowed: {_allowed(prim.values)})")
        if a.positive_key is not None and a.positive is None:
            self.fail("answer.positive_key", "positive_key needs positive (the value looked for)")
        if a.positive is not None:
            pk = a.positive_key or a.primary
            if pk not in a.keys or a.keys[pk].type == "reason":
                self.fail("answer.positive_key", f"{pk!r} is not a category answer key")
            if a.positive not in a.keys[pk].values:
                self.fail("answer.positive", f"{a.positive!r} is not a value of {pk!r} "
                                             f"(allowed: {_allowed(a.keys[pk].values)})")
        protected_here = [n for n, fs in self.m.fields.items() if fs.protected and n in (a.primary, prim.name)]
        if protected_here:
            self.fail(f"fields.{protected_here[0]}.protected",
                      f"{protected_here[0]!r} is a protected attribute and also the label")
        return {"reason": reason_keys[0] if reason_keys else None}

    def check_summary(self, answer: dict, tpl_names: set[str]) -> Template | None:
        key = answer["reason"]
        source = self.m.answer.keys[key].summary if key is not None else None
        return None if source is None else self.template(f"answer.keys.{key}.summary", source, tpl_names)

    def template(self, path: str, source: Any, allowed: set[str]) -> Template:
        if not isinstance(source, str):
            self.fail(path, f"a template is text, got {short_repr(source)}")
        try:
            return Template(source, allowed)
        except TemplateFailure as e:
            self.fail(path, str(e))

    def check_prompt(self, tpl_names: set[str]) -> list[list[Any]]:
        p = self.m.prompt
        if p.instruction is not None and p.intros is not None:
            self.fail("prompt.intros", "give instruction or intros (alternatives), not both")
        if p.question is not None and p.questions is not None:
            self.fail("prompt.questions", "give question or questions (alternatives), not both")
        for what in ("intros", "questions", "separators"):
            vals = getattr(p, what)
            if vals is not None and not vals:
                self.fail(f"prompt.{what}", "an empty list (leave the key out)")
        for i, s in enumerate(p.separators):
            if not s:
                self.fail(f"prompt.separators[{i}]", "an empty separator")
        facts: list[list[Any]] = []
        if p.facts is not None:
            if not p.facts:
                self.fail("prompt.facts", "an empty list (leave the key out to show each field)")
            for i, fact in enumerate(p.facts):
                alts = [fact] if isinstance(fact, str) else fact
                if not isinstance(alts, list) or not alts:
                    self.fail(f"prompt.facts[{i}]", f"a fact is a template or a list of alternative templates, "
                                                   f"got {short_repr(fact)}")
                facts.append([self.template(f"prompt.facts[{i}]" + (f"[{j}]" if len(alts) > 1 else ""), a, tpl_names)
                              for j, a in enumerate(alts)])
            for name, f in self.m.fields.items():
                if f.wording is not None:
                    self.fail(f"fields.{name}.wording", "prompt.facts replaces the fields' wording: give one or the other")
        else:
            for name, f in self.m.fields.items():
                if not f.show:
                    continue
                if f.wording:
                    allowed = tpl_names | {"value", "label"}
                    facts.append([FieldWording(name, f, self.template(f"fields.{name}.wording[{j}]", w, allowed))
                                  for j, w in enumerate(f.wording)])
                else:
                    facts.append([DefaultWording(name, f)])
            if not facts:
                self.fail("fields", "no field is shown in the prompt (show: false everywhere)")
        if p.head_facts > len(facts):
            self.fail("prompt.head_facts", f"{p.head_facts} but the prompt has {len(facts)} facts")
        return facts

    def check_rules(self, kinds: dict, categories: dict, tpl_names: set[str], facts: list) -> list[CompiledRule]:
        a = self.m.answer
        out: list[CompiledRule] = []
        seen: set[str] = set()
        reason_key = next((k for k, v in a.keys.items() if v.type == "reason"), None)
        protected = {n for n, f in self.m.fields.items() if f.protected}
        protected |= {f.band_field or f"{n}_band" for n, f in self.m.fields.items() if f.protected and f.bands}
        shown = {n for fact in facts for alt in fact for n in alt.names}
        if "fields" in shown:  # a template reads the fields mapping: it may show any of them
            shown |= set(self.m.fields)
        for i, r in enumerate(self.m.rules):
            p = f"rules[{i}]"
            if not isinstance(r.name, str) or not RULE_NAME_RE.match(r.name):
                self.fail(f"{p}.name", f"rule name {r.name!r}: letters, digits and _ only")
            p = f"rules[{i}] ({r.name})"
            if r.name in seen:
                self.fail(f"{p}.name", f"duplicate rule name {r.name!r}")
            seen.add(r.name)
            last = i == len(self.m.rules) - 1
            when = None
            if r.when is None:
                if not last:
                    self.fail(f"{p}.when", "only the last rule has no condition (the catch-all)")
            else:
                if last:
                    self.fail(f"{p}.when", "the last rule is the catch-all: leave its condition out, so every input "
                                           "gets an answer")
                if not isinstance(r.when, (str, bool)):
                    self.fail(f"{p}.when", f"a condition is an expression, got {short_repr(r.when)}")
                try:
                    when = compile_expr(r.when, kinds, constants=self.m.constants, categories=categories)
                except ExprError as e:
                    self.fail(f"{p}.when", f"rule {r.name!r}: {e} in {short_repr(r.when)}")
                for n in sorted(when.names & protected):
                    self.warnings.append(f"rule {r.name!r} reads the protected attribute {n!r}")
                for n in sorted(when.names - shown - protected):
                    if n in self.m.fields:
                        self.warnings.append(f"rule {r.name!r} reads {n!r}, which the prompt does not show")
            outcome = {}
            for key, v in r.outcome.items():
                if key not in a.keys or a.keys[key].type == "reason":
                    allowed = [k for k, ks in a.keys.items() if ks.type != "reason"]
                    extra = " (the reason comes from the rule's reason template)" if key == reason_key else ""
                    self.fail(f"{p}.outcome.{key}", f"unknown answer key {key!r} (allowed: {_allowed(allowed)}){extra}")
                ks = a.keys[key]
                if ks.type == "multi":
                    vals = [v] if isinstance(v, str) else v
                    if not isinstance(vals, list) or not vals or any(x not in ks.values for x in vals):
                        self.fail(f"{p}.outcome.{key}", f"{short_repr(v)}: a list of values of {key!r} "
                                                        f"(allowed: {_allowed(ks.values)})")
                    if len(set(vals)) != len(vals):
                        self.fail(f"{p}.outcome.{key}", f"{short_repr(v)}: a value is repeated")
                    outcome[key] = [x for x in ks.values if x in vals]
                else:
                    if not isinstance(v, str) or v not in ks.values:
                        self.fail(f"{p}.outcome.{key}", f"{short_repr(v)} is not a value of {key!r} "
                                                        f"(allowed: {_allowed(ks.values)})")
                    outcome[key] = v
            missing = [k for k, ks in a.keys.items() if ks.type != "reason" and k not in outcome]
            if missing:
                self.fail(f"{p}.outcome", f"no value for {missing[0]!r} (an outcome gives every answer key)")
            reason = None
            if reason_key is not None:
                if r.reason is None:
                    self.fail(f"{p}.reason", f"the rule needs a reason template (the answer key {reason_key!r})")
                reason = self.template(f"{p}.reason", r.reason, tpl_names)
            elif r.reason is not None:
                self.fail(f"{p}.reason", "the answer has no reason key")
            out.append(CompiledRule(r.name, when, {k: outcome[k] for k in a.keys if k in outcome}, reason, r.doc))
        return out

    def check_evaluation(self, band_of: dict[str, Band]):
        e = self.m.evaluation
        a = self.m.answer
        labels = a.keys[a.primary].values
        known = set(self.m.fields) | {b.into for b in band_of.values()}
        for i, s in enumerate(e.segments):
            if s not in known:
                self.fail(f"evaluation.segments[{i}]", f"unknown field {s!r} (allowed: {_allowed(sorted(known))})")
            f = self.m.fields.get(s)
            if f is not None and f.type in NUMERIC_TYPES and s not in band_of:
                self.fail(f"evaluation.segments[{i}]", f"the numeric field {s!r} needs bands to be a segment")
            if f is not None and f.type == "list":
                self.fail(f"evaluation.segments[{i}]", f"the list field {s!r} cannot be a segment")
        for g, row in e.costs.items():
            if g not in labels:
                self.fail(f"evaluation.costs.{g}", f"{g!r} is not a label of {a.primary!r} (allowed: {_allowed(labels)})")
            for pr, c in row.items():
                if pr not in labels:
                    self.fail(f"evaluation.costs.{g}.{pr}", f"{pr!r} is not a label of {a.primary!r} "
                                                            f"(allowed: {_allowed(labels)})")
                if c < 0:
                    self.fail(f"evaluation.costs.{g}.{pr}", f"a cost is >= 0, got {c}")
        for lab, share in e.prevalence.items():
            if lab not in labels:
                self.fail(f"evaluation.prevalence.{lab}", f"{lab!r} is not a label of {a.primary!r} "
                                                          f"(allowed: {_allowed(labels)})")
            if not 0 <= share <= 1:
                self.fail(f"evaluation.prevalence.{lab}", f"a share is in [0, 1], got {share}")
        total = sum(e.prevalence.values())
        if e.prevalence and (total > 1 + 1e-6 or (set(e.prevalence) == set(labels) and abs(total - 1) > 1e-3)):
            self.fail("evaluation.prevalence", f"the shares add up to {total:g}, not 1")

    def typed_fields(self, path: str, raw: dict, strict_required: bool) -> dict:
        out = {}
        for n in raw:
            if n not in self.m.fields:
                self.fail(f"{path}.{n}", f"unknown field {n!r} (allowed: {_allowed(self.m.fields)})")
        for n, f in self.m.fields.items():
            v = raw.get(n)
            if is_missing(v):
                if f.required and strict_required:
                    self.fail(f"{path}.{n}", f"the required field {n!r} has no value")
                out[n] = f.default if "default" in f.model_fields_set else None
            else:
                out[n] = self.value(f"{path}.{n}", f, v)
        return out

    def check_examples(self, spec: TaskSpec) -> list[dict]:
        out = []
        a = self.m.answer
        for i, ex in enumerate(self.m.examples):
            p = f"examples[{i}]"
            vals = self.typed_fields(f"{p}.fields", ex.fields, strict_required=True)
            spec.derive(vals)
            for key, v in ex.expect.items():
                if key == "rule":
                    if v not in [r.name for r in spec.rules]:
                        self.fail(f"{p}.expect.rule", f"unknown rule {short_repr(v)} (rules: {_allowed(r.name for r in spec.rules)})")
                    continue
                if key not in a.keys:
                    self.fail(f"{p}.expect.{key}", f"unknown answer key {key!r} (allowed: {_allowed([*a.keys, 'rule'])})")
            out.append(vals)
        return out

    def render_check(self, spec: TaskSpec, answer: dict):
        """Every template renders on the examples (or on values made from the field types), with the optional
        fields missing too; the rules' answers agree with what the examples expect."""
        cases = [(f"examples[{i}]", v, i) for i, v in enumerate(spec.examples)]
        if not cases:
            synth = {n: coerce_value(f, example_value(f), strict=False) for n, f in self.m.fields.items()}
            spec.derive(synth)
            cases = [("the fields' example values", synth, None)]
        base = cases[0][1]
        blank = {n: (None if not f.required else base[n]) for n, f in self.m.fields.items()}
        spec.derive(blank)
        reason_key = answer["reason"]
        max_len = self.m.answer.keys[reason_key].max_length if reason_key else None
        for where, vals, ex in cases + [("values with the optional fields missing", blank, None)]:
            tv = spec.template_values(vals)
            full = vals is not blank
            for fact in spec.facts:
                for alt in fact:
                    try:
                        alt.render(tv)
                    except TemplateFailure as e:
                        self.fail(self._fact_path(alt), f"on {where}: {e}")
            if spec.summary is not None:
                self._reason_text(f"answer.keys.{reason_key}.summary", "summary", spec.summary, tv, where,
                                  max_len if full else None)
            matched = None
            for i, r in enumerate(spec.rules):
                fires = True
                if r.when is not None:
                    try:
                        fires = r.when.test(vals)
                    except ExprError as e:
                        self.fail(f"rules[{i}] ({r.name}).when", f"on {where}: {e}")
                if fires and matched is None:
                    matched = r
                if r.reason is not None and (full or r is matched):
                    self._reason_text(f"rules[{i}] ({r.name}).reason", "reason", r.reason, tv, where,
                                      max_len if full else None)
            expect = self.m.examples[ex].expect if ex is not None else {}
            if expect and not spec.rules:
                self.fail(f"{where}.expect", "the spec has no rules to give the expected answer")
            if expect:
                got = dict(matched.outcome)
                if reason_key is not None:
                    got[reason_key] = matched.reason.render(tv)
                got["rule"] = matched.name
                for key, want in expect.items():
                    have = got.get(key)
                    if isinstance(have, list) and isinstance(want, (str, list)):
                        want = sorted([want] if isinstance(want, str) else want)
                        have = sorted(have)
                    if have != want:
                        self.fail(f"{where}.expect.{key}", f"the rules answer {have!r} (rule {matched.name!r}), "
                                                                 f"the example expects {want!r}")

    def _reason_text(self, path: str, what: str, template, tv: dict, where: str, max_len: int | None) -> None:
        """A reason template renders on ``where``'s values, within ``max_len`` characters when given."""
        try:
            text = template.render(tv)
        except TemplateFailure as e:
            self.fail(path, f"on {where}: {e}")
        if max_len is not None and len(text) > max_len:
            self.fail(path, f"on {where} the {what} {text!r} has {len(text)} characters, more than max_length {max_len}")

    def _fact_path(self, alt) -> str:
        if isinstance(alt, FieldWording):
            return f"fields.{alt.name}.wording"
        for i, fact in enumerate(self.m.prompt.facts or []):
            alts = [fact] if isinstance(fact, str) else fact
            if alt.source in alts:
                return f"prompt.facts[{i}]"
        return "prompt.facts"


# ------------------------------------------------------------------------------------------------ loading

def validate_spec(data: Any, source: str = "spec", text: str | None = None) -> TaskSpec:
    """Check a spec given as data (the parsed YAML); ``text``: its YAML (kept for copying it into models)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a task spec is a YAML mapping (name, title, fields, answer, ...), "
                        f"got {type(data).__name__}")
    try:
        model = SpecModel.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpecError(_format_error(source, errors[0]) + more) from None
    if text is None:
        text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    return _Checker(model, source).run(text)


def parse_spec(text: str, source: str = "spec") -> TaskSpec:
    """Check a spec given as YAML text."""
    if len(text.encode("utf-8")) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: spec is larger than {MAX_SPEC_BYTES} bytes")
    data = _yaml_load(text, source)
    if data is None:
        raise SpecError(f"{source}: spec is empty")
    return validate_spec(data, source, text)


def load_spec(path: str | Path) -> TaskSpec:
    """Read and check a spec file (UTF-8 YAML)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder, not a spec file") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: spec is larger than {MAX_SPEC_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: spec is not UTF-8 text") from None
    return parse_spec(text, str(path))


#: the folder of the built-in specs (package data)
SPEC_DIR = Path(__file__).with_name("specs")
BUILTIN_NAMES = ("credit", "aml", "audit")


def builtin_spec(name: str) -> TaskSpec:
    """The spec of a built-in task, shipped in the package (``banklm/tasks/specs/<name>.yaml``)."""
    if name not in BUILTIN_NAMES:
        raise SpecError(f"{name!r} is not a built-in task (built-ins: {', '.join(BUILTIN_NAMES)})")
    return load_spec(SPEC_DIR / f"{name}.yaml")


__all__ = ["SpecError", "TaskSpec", "SpecModel", "FieldSpec", "SubFieldSpec", "AnswerKeySpec", "CompiledRule",
           "Band", "load_spec", "builtin_spec", "BUILTIN_NAMES", "SPEC_DIR", "parse_spec", "validate_spec", "coerce_value", "is_missing", "field_text",
           "MISSING_TEXT", "NUMBER_FORMATS"]
