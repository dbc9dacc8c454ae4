"""Number and value formats of the task prompts and reasons (deterministic: a fact is always written the same way,
so a reason can copy its numbers from the prompt).

The same functions are the template filters of task specs (``{{ dti | pct }}``, :mod:`banklm.tasks.templates`)
and the default wording of a spec's fields (:func:`display_value`). A missing optional value (``None``) is
written as :data:`MISSING_TEXT`, never as an invented value.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: how a missing optional value is written in a prompt or a reason
MISSING_TEXT = "未提供"


def fmt_pct(x: float) -> str:
    """52.3 -> '52.3%' (always one decimal)."""
    return f"{x:.1f}%"


def fmt_num(x: float) -> str:
    """80.0 -> '80', 12.5 -> '12.5', 3.25 -> '3.25' (no trailing zeros, no thousands separators)."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return s if s not in ("", "-0") else "0"


def fmt_yuan(x: float) -> str:
    """18500 -> '18500元'."""
    return f"{int(round(x))}元"


def fmt_wan(x: float) -> str:
    """Amount given in 万元: 80 -> '80万元', 12.5 -> '12.5万元'."""
    return f"{fmt_num(x)}万元"


def fmt_thousands(x: float) -> str:
    """1234567.5 -> '1,234,567.5' (up to two decimals, no trailing zeros)."""
    whole = fmt_num(x)
    sign, whole = ("-", whole[1:]) if whole.startswith("-") else ("", whole)
    head, _, tail = whole.partition(".")
    return f"{sign}{int(head):,}" + (f".{tail}" if tail else "")


def fmt_yuan_thousands(x: float) -> str:
    """18500 -> '18,500元' (whole yuan with thousands separators)."""
    return f"{int(round(x)):,}元"


def fmt_int(x: float) -> str:
    """12.0 -> '12' (rounded to a whole number)."""
    return str(int(round(x)))


def fmt_yesno(x: Any) -> str:
    """True -> '是', False -> '否'."""
    return "是" if x else "否"


#: format name -> function; the names are the template filters and the values of a field's ``format``
NUMBER_FORMATS = {
    "pct": fmt_pct,
    "num": fmt_num,
    "int": fmt_int,
    "yuan": fmt_yuan,
    "wan": fmt_wan,
    "thousands": fmt_thousands,
    "yuan_thousands": fmt_yuan_thousands,
}
#: formats that write their own unit (a field's ``unit`` is not appended)
WITH_UNIT = {"pct", "yuan", "wan", "yuan_thousands"}


def missing_safe(fn):
    """``fn`` that writes ``None`` as :data:`MISSING_TEXT` (the filters are applied to optional values too)."""

    def wrapped(x, *args, **kwargs):
        return MISSING_TEXT if x is None else fn(x, *args, **kwargs)

    wrapped.__name__ = getattr(fn, "__name__", "filter")
    wrapped.__doc__ = fn.__doc__
    return wrapped


def default_format(ftype: str, unit: str | None, fmt: str | None) -> str | None:
    """The number format a field is written with: its ``format``, else by type and unit."""
    if fmt:
        return fmt
    if ftype == "percent":
        return "pct"
    if ftype in ("integer", "decimal"):
        if unit == "元":
            return "yuan"
        if unit == "万元":
            return "wan"
        return "num"
    return None


def display_value(value: Any, ftype: str, *, unit: str | None = None, fmt: str | None = None,
                  true_text: str = "是", false_text: str = "否", subfields: dict | None = None) -> str:
    """A field value as the prompt writes it by default: ``45.0`` percent -> ``45.0%``, 80 万元 -> ``80万元``,
    35 with unit 天 -> ``35天``, True -> ``是``, a missing value -> ``未提供``; a list of records ->
    ``（日期：2024-03-01，金额：49000元）（…）`` (``无`` when empty)."""
    if value is None:
        return MISSING_TEXT
    if ftype == "boolean":
        return true_text if value else false_text
    if ftype == "list":
        if not value:
            return "无"
        parts = []
        for rec in value:
            items = []
            for name, sub in (subfields or {}).items():
                v = rec.get(name) if isinstance(rec, dict) else None
                items.append(f"{sub.label or name}：" + display_value(
                    v, sub.type, unit=sub.unit, fmt=sub.format, true_text=sub.true_text, false_text=sub.false_text))
            parts.append("（" + "，".join(items) + "）")
        return "".join(parts)
    f = default_format(ftype, unit, fmt)
    if f is None:
        return f"{value}{unit or ''}"
    text = NUMBER_FORMATS[f](value)
    return text if f in WITH_UNIT or not unit else text + unit


_PUNCT_STRIP = " \t\r\n；;，,。.、：:「」“”\"'`*"


def norm_value(v: str) -> str:
    """The form the tolerant parser compares answer values in (NFKC, no spaces, outer punctuation and 、
    removed, upper case)."""
    v = unicodedata.normalize("NFKC", v)
    v = re.sub(r"\s+", "", v)
    return v.strip(_PUNCT_STRIP).replace("、", "").upper()


# ----------------------------------------------------------------------------------------------
# the number reader: one definition of "a number in the text" for the faithfulness metric
# (banklm.evaluation.metrics.faithfulness) and the answer grammar (banklm.tasks.grammar)

_FW = str.maketrans("０１２３４５６７８９％．", "0123456789%.")
_DATE_RE = re.compile(r"(\d{4})\s*[年\-/.]\s*(\d{1,2})\s*[月\-/.]\s*(\d{1,2})\s*日?")
_NUM_RE = re.compile(r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)\s*(%|万|亿|千)?")
_MULT = {"万": 1e4, "亿": 1e8, "千": 1e3}
#: unit words a number is written with in Chinese bank text (a task adds its fields' units); the reader
#: keeps them in a mention's text so a reason copies "24个月", not "24"
UNITS = ("元", "万元", "亿元", "千元", "美元", "港元", "欧元", "天", "日", "周", "个月", "月", "年", "小时", "分钟",
         "岁", "次", "笔", "个", "家", "户", "人", "名", "倍", "期", "项", "张", "份", "条", "单", "台", "辆", "套",
         "平方米", "亩")


@dataclass(frozen=True)
class NumberMention:
    """One number as written in a text: ``value`` is its canonical form (what the metric compares), ``text``
    the characters as written, its unit included (``24个月``, ``4.5万``, ``79.8%``), at ``start``:``end``."""

    value: tuple
    text: str
    start: int
    end: int
    unit: str = ""


def read_numbers(text: str, units: Iterable[str] = UNITS) -> list[NumberMention]:
    """Every number of ``text`` in order of position: dates ``("date", y, m, d)``, percentages ``("pct", v)``
    and other numbers ``("num", v)``.

    Full-width digits/％/． are read as ASCII; thousands separators are removed; 万/亿/千 multiply
    (``4.5万`` == ``45000`` == ``45,000元``); a unit word of ``units`` right after the number (longest first)
    belongs to the mention's text but not to its value. Chinese numerals are not read."""
    raw = text or ""
    s = raw.translate(_FW)  # one character for one: positions stay those of ``raw``
    unit_re = _unit_re(tuple(units))
    out: list[NumberMention] = []
    dates = list(_DATE_RE.finditer(s))
    for m in dates:
        end = len(s[: m.end()].rstrip())
        out.append(NumberMention(("date", int(m.group(1)), int(m.group(2)), int(m.group(3))), raw[m.start():end],
                                 m.start(), end))
    blank = list(s)
    for m in dates:
        blank[m.start():m.end()] = " " * (m.end() - m.start())
    s2 = "".join(blank)
    for m in _NUM_RE.finditer(s2):
        v = float(m.group(1).replace(",", ""))
        mult = m.group(2)
        value = ("pct", round(v, 6)) if mult == "%" else ("num", round(v * _MULT.get(mult or "", 1.0), 6))
        end = m.end(2) if mult else m.end(1)
        u = unit_re.match(s2, end) if mult != "%" and unit_re is not None else None
        unit = u.group(1) if u else ""
        if u:
            end = u.end()
        out.append(NumberMention(value, raw[m.start():end], m.start(), end, unit))
    return sorted(out, key=lambda n: n.start)


def extract_numbers(text: str) -> list[tuple]:
    """The canonical values of :func:`read_numbers` (dates first, then the other numbers, each in text order):
    ``("date", y, m, d)``, ``("pct", value)`` or ``("num", value)``. ``元`` and other units are ignored."""
    found = read_numbers(text, ())
    return [n.value for n in found if n.value[0] == "date"] + [n.value for n in found if n.value[0] != "date"]


_UNIT_RES: dict[tuple, re.Pattern | None] = {}


def _unit_re(units: tuple) -> re.Pattern | None:
    if units not in _UNIT_RES:
        words = sorted({u for u in units if u}, key=lambda u: (-len(u), u))
        _UNIT_RES[units] = re.compile("[ \t]*(" + "|".join(map(re.escape, words)) + ")") if words else None
    return _UNIT_RES[units]
