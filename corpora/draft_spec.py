"""Drafting a task spec from a bank's labelled table (``banklm task init``), without writing Python.

:func:`draft_spec` reads the rows of a table (``banklm.tasks.table_files.read_table``) and writes a spec
(docs/tasks.md, "Task specs") that loads and checks against that table unedited: one field per column, typed
from its values; the label column's distinct values as the label set; identifiers, personal information
(found by the corpora's PII detectors on a sample of each column) and protected attributes hidden from the
prompt; numeric protected attributes banded. It has no rules (the bank's labels are the answers) and no
examples (they would copy customer data into a file that travels with every model). The summary says why
each column became what it is, so the bank can review the draft before training on it.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from banklm.tasks.base import norm_value
from banklm.tasks.registry import task_from_spec
from banklm.tasks.spec import (
    BUILTIN_NAMES,
    GENERIC_UNITS,
    NAME_RE,
    RESERVED_NAMES,
    FieldSpec,
    SpecError,
    coerce_value,
    is_missing,
    parse_spec,
)
from banklm.tasks.table_files import row_label

from .ops.pii import find_pii

#: values run through the PII detectors per column
PII_SAMPLE = 200
#: share of the sampled values that must be personal information for the column to be hidden
PII_SHARE = 0.5
#: median length from which a column is free text
FREE_TEXT_CHARS = 20
#: at most this many distinct values (each at most CATEGORY_CHARS long) make a category
CATEGORY_MAX = 20
CATEGORY_CHARS = 20
#: fewer rows than this and "unique per row" says nothing
ID_MIN_ROWS = 10
AGE_BANDS = {"25岁以下": 24, "25-34岁": 34, "35-49岁": 49, "50岁及以上": None}

_BOOL_PAIRS = (("是", "否"), ("有", "无"), ("true", "false"), ("yes", "no"), ("y", "n"), ("t", "f"), ("1", "0"))
_DATE_RE = re.compile(r"^\d{4}([-/.年])\d{1,2}([-/.月])\d{1,2}日?([ T]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?)?$")
_ID_NAME_RE = re.compile(r"编号|编码|代码|序号|流水|号码|单号|合同号|账号|卡号|证件号|(^|[^A-Za-z])(id|no)([^A-Za-z]|$)", re.I)
_AGE_NAME_RE = re.compile(r"年龄|岁数|(^|[^A-Za-z])age([^A-Za-z]|$)", re.I)
_UNIT_IN_NAME_RE = re.compile(r"^(?P<label>.+?)\s*[（(](?P<unit>万元|元|天|次|笔|个|倍|岁|年|月|%)[）)]$")
_PERCENT_NAME_RE = re.compile(r"[（(]%[）)]$|%$")
#: labels that are good for the customer (fairness counts them): a label among these is drafted as ``favourable``
FAVOURABLE_WORDS = ("正常", "通过", "批准", "同意", "核准", "准入", "无异常", "合规", "无风险", "低风险", "正常类")
_SYSTEM = "你是本行业务助理。请仅依据给出的信息判断{label}，只输出“{label}：取值{reason}”。"
#: column names that hold the bank's reason for its label: an answer key, never an input (it would give the label
#: away); ``--reason`` names another column, ``--reason none`` keeps such a column as an input
REASON_NAMES = ("理由", "原因", "依据", "判断理由", "分类理由", "判断依据", "分类依据", "认定理由", "认定依据",
                "reason", "rationale")


class DraftError(ValueError):
    """The table cannot be drafted into a spec (one line: which column, why, what to do)."""


# ------------------------------------------------------------------------------------------------ values

def _text(v: Any) -> str:
    s = str(v)
    return (s if s.isascii() else unicodedata.normalize("NFKC", s)).strip()


_UNITS = sorted(GENERIC_UNITS, key=len, reverse=True)


def _number(v: Any, text: str | None = None) -> tuple[float | None, str]:
    """A cell (``text``: its :func:`_text`) as a number and the unit it carried (``""``), or (None, "")."""
    if isinstance(v, bool):
        return None, ""
    if isinstance(v, (int, float)):
        return float(v), ""
    s = (_text(v) if text is None else text).replace(",", "")
    unit = next((u for u in _UNITS if s.endswith(u)), "")
    s = s[: len(s) - len(unit)].strip() if unit else s
    if re.fullmatch(r"0\d+", s.lstrip("+-")):  # 000123: a code with leading zeros, not a number
        return None, ""
    try:
        x = float(s)
    except ValueError:
        return None, ""
    return (x, unit) if x == x and abs(x) != float("inf") else (None, "")


def _numbers(values: Sequence[Any], texts: Sequence[str]) -> list[tuple[float, str]] | None:
    """Every cell as (number, unit), or None as soon as one is not a number (each distinct cell parsed once)."""
    cache: dict[tuple[int, str], tuple[float | None, str]] = {}
    out = []
    for v, t in zip(values, texts, strict=True):
        key = (0 if isinstance(v, bool) else 1 if isinstance(v, (int, float)) else 2, t)
        r = cache.get(key)
        if r is None:
            r = cache[key] = _number(v, t)
        if r[0] is None:
            return None
        out.append(r)
    return out


def _bool_pair(values: Sequence[Any]) -> tuple[str, str] | None:
    """The yes/no pair a column's values come from (是/否, 有/无, true/false, Y/N, 1/0), or None."""
    words = set()
    for v in values:
        if isinstance(v, bool):
            words.add("true" if v else "false")
        elif isinstance(v, (int, float)) and v in (0, 1):
            words.add(str(int(v)))
        else:
            words.add(_text(v).lower())
    for pair in _BOOL_PAIRS:
        if words <= set(pair) and (len(words) == 2 or pair != ("1", "0")):
            return pair
    return None


def _is_date(name: str, values: Sequence[Any]) -> bool:
    date_f = FieldSpec(type="date")

    def one(v: Any) -> bool:
        if hasattr(v, "year") and hasattr(v, "month"):
            return True
        s = _text(v)
        if not (_DATE_RE.match(s) or (re.fullmatch(r"\d{8}", s) and ("日期" in name or "date" in name.lower()))):
            return False
        try:
            coerce_value(date_f, v)
        except ValueError:
            return False
        return True

    return all(one(v) for v in values)


def _round2(x: float) -> int | float:
    """``x`` to two significant digits (37412 -> 37000, 0.4567 -> 0.46)."""
    r = float(f"{x:.2g}")
    return int(r) if r.is_integer() else r


def _quantile_bands(values: list[float], unit: str) -> dict[str, int | float | None]:
    """Bands at the quartiles rounded to two significant digits: ``{≤a: a, a-b: b, b-c: c, >c: null}``."""
    xs = sorted(values)
    cuts: list[int | float] = []
    for q in (0.25, 0.5, 0.75):
        c = _round2(xs[min(len(xs) - 1, int(q * len(xs)))])
        if c < xs[-1] and (not cuts or c > cuts[-1]):
            cuts.append(c)
    if not cuts:
        return {"全部": None}
    out: dict[str, int | float | None] = {f"{cuts[0]:g}{unit}及以下": cuts[0]}
    for a, b in zip(cuts, cuts[1:], strict=False):
        out[f"{a:g}-{b:g}{unit}"] = b
    out[f"{cuts[-1]:g}{unit}以上"] = None
    return out


def _pii_type(column: str, texts: Sequence[str]) -> tuple[str | None, float]:
    """The personal-information type a column holds (when at least PII_SHARE of the sampled distinct values are
    mostly one: a name, an ID/phone/card/account number, an address), and the share of them holding any."""
    distinct = list(dict.fromkeys(texts))
    step = max(1, len(distinct) // PII_SAMPLE)
    sample = distinct[::step][:PII_SAMPLE]
    if not sample:
        return None, 0.0
    kinds: Counter = Counter()
    with_any = 0
    for s in sample:
        spans = find_pii(s)
        if not spans:  # the column name as a label cue (客户姓名：…) for names the lexicon alone misses
            prefix = f"{column}："
            spans = [sp for sp in find_pii(prefix + s) if sp.start >= len(prefix)]
        if not spans:
            continue
        with_any += 1
        covered: Counter = Counter()
        for sp in spans:
            covered[sp.type] += len(sp.text.strip())
        kind, chars = covered.most_common(1)[0]
        if chars * 2 >= len(s.replace(" ", "")):
            kinds[kind] += 1
    share = with_any / len(sample)
    if kinds and sum(kinds.values()) >= PII_SHARE * len(sample):
        return kinds.most_common(1)[0][0], share
    return None, share


# ------------------------------------------------------------------------------------------------ columns

def _infer(name: str, values: list[Any], n_rows: int) -> dict:
    """A column's field (type and keys) from its non-empty values, and why."""
    col: dict[str, Any] = {"field": {}, "why": []}
    f = col["field"]
    texts = col["texts"] = [_text(v) for v in values]
    distinct = len(set(texts))
    col["distinct"] = distinct
    lengths = [len(t) for t in texts]
    median = statistics.median(lengths) if lengths else 0
    pair = _bool_pair(values) if distinct <= 2 else None
    nums = _numbers(values, texts) if pair is None and values else None
    if pair is not None:
        f["type"] = "boolean"
        if pair == ("有", "无"):
            f["true_text"], f["false_text"] = pair
    elif nums is not None:
        units = {u for _, u in nums if u}
        in_name = _UNIT_IN_NAME_RE.match(name)
        if "%" in units or _PERCENT_NAME_RE.search(name):
            f["type"] = "percent"
            units.discard("%")
        else:
            whole = all(float(x).is_integer() for x, _ in nums)
            f["type"] = "integer" if whole else "decimal"
        unit = None
        if units == {"元", "万元"}:
            unit = "元"
        elif len(units) == 1:
            unit = next(iter(units))
        elif len(units) > 1:
            col["why"].append(f"mixed units {'/'.join(sorted(units))}: numbers read without them")
        elif in_name and in_name.group("unit") != "%":
            unit = in_name.group("unit")
        if unit and f["type"] != "percent":
            f["unit"] = unit
        if in_name:
            f["label"] = in_name.group("label").strip()
        col["numbers"] = [x for x, _ in nums]
        col["unit"] = unit or ("%" if f["type"] == "percent" else "")
    elif values and _is_date(name, list({(type(v), t): v for v, t in zip(values, texts, strict=True)}.values())):
        f["type"] = "date"
    elif median >= FREE_TEXT_CHARS:
        f["type"] = "text"
        col["free_text"] = True
        col["why"].append(f"free text (median {median:g} characters)")
    elif distinct <= CATEGORY_MAX and max(lengths, default=0) <= CATEGORY_CHARS and distinct * 2 <= len(values):
        f["type"] = "category"
        canon: dict[str, str] = {}
        for t, _n in Counter(texts).most_common():
            canon.setdefault(norm_value(t) or t, t)
        f["values"] = list(canon.values())
    else:
        f["type"] = "text"
    unique = values and distinct == len(values) and len(values) >= max(ID_MIN_ROWS, 0.9 * n_rows)
    sentences = sum(1 for t in texts if any(p in t for p in "，。；！？,;")) * 2 > len(texts)  # notes, not ids
    if unique and not col.get("free_text") and not sentences and f["type"] in ("text", "integer"):
        serial = f["type"] == "integer" and sorted(int(x) for x in col["numbers"]) == list(
            range(int(min(col["numbers"])), int(min(col["numbers"])) + len(values)))
        if f["type"] == "text" or serial or _ID_NAME_RE.search(name):
            col["identifier"] = True
    return col


def _column_names(rows: Sequence[dict]) -> list[str]:
    cols = getattr(rows, "columns", None)
    if cols:
        return list(cols)
    return list(dict.fromkeys(k for r in rows for k in r))


def _field_name_problem(name: str) -> str | None:
    """Why a column name cannot be a field name (None: it can)."""
    if name in RESERVED_NAMES:
        return f"{name!r} is a reserved name ({', '.join(RESERVED_NAMES)})"
    if not name or name != name.strip() or any(c in name for c in "\n\r\t{}`"):
        return "a name with braces, backticks, tabs, newlines or surrounding spaces"
    return None


def task_name(source_name: str) -> str:
    """A task name (lowercase ASCII, digits, ``_``) from a file name: ``PostLoan-2024.xlsx`` -> ``postloan_2024``;
    ``bank_task`` when the name has no ASCII letters (贷后台账.xlsx)."""
    stem = Path(source_name).stem
    s = re.sub(r"[^a-z0-9]+", "_", unicodedata.normalize("NFKC", stem).lower()).strip("_")
    if not s or not s[0].isalpha():
        s = f"t_{s}" if s else "bank_task"
    s = s[:32].rstrip("_")
    if s in BUILTIN_NAMES:
        s = f"{s}_bank"
    return s


# ------------------------------------------------------------------------------------------------ YAML

def _scalar(v: Any) -> str:
    """``v`` as a YAML flow scalar: plain when YAML reads it back as the same text, else double-quoted."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return f"{v:g}" if isinstance(v, float) else str(v)
    s = str(v)
    plain = s and not re.search(r"[:{}\[\],#&*!|>'\"%@`]|^[-?\s]|\s$", s)
    if plain:
        try:
            plain = yaml.safe_load(f"k: [{s}]") == {"k": [s]}
        except yaml.YAMLError:
            plain = False
    return s if plain else json.dumps(s, ensure_ascii=False)


def _flow(d: dict) -> str:
    def item(v: Any) -> str:
        if isinstance(v, dict):
            return _flow(v)
        if isinstance(v, list):
            return "[" + ", ".join(_scalar(x) for x in v) + "]"
        return _scalar(v)

    return "{" + ", ".join(f"{_scalar(k)}: {item(v)}" for k, v in d.items()) + "}"


def reason_column(columns: Sequence[str], label: str, reason: str | None) -> str | None:
    """The column holding the bank's reasons: ``reason`` (``"none"``: no column), else one named like a reason
    (:data:`REASON_NAMES`, or the label's name followed by 理由/原因/依据)."""
    if reason is not None:
        return None if reason.lower() == "none" else reason
    named = {n.lower() for n in REASON_NAMES} | {f"{label}{w}" for w in ("理由", "原因", "依据")}
    return next((c for c in columns if c.strip().lower() in named and c != label), None)


def _reason_key(rows: Sequence[dict], reason: str) -> dict:
    """The answer's reason key from the bank's reasons: ``max_length`` a fifth above the longest, in tens."""
    lengths = [len(_text(r.get(reason))) for r in rows if not is_missing(r.get(reason))]
    if not lengths:
        raise DraftError(f"--reason {reason!r}: the column is empty in every row")
    return {"type": "reason", "max_length": int(-(-int(max(lengths) * 1.2) // 10) * 10)}


def _spec_text(meta: dict, fields: dict[str, dict], comments: dict[str, str], label: str, labels: list[str],
               segments: list[str], reason: tuple[str, dict] | None = None) -> str:
    lines = [f"# {meta['header']}",
             "# Review it before training: each field's type, which fields the prompt shows (show: false hides),",
             "# the protected attributes and their bands. docs/tasks.md, \"Task specs\", has every key.",
             f"name: {meta['name']}", f"title: {_scalar(meta['title'])}",
             f"description: {_scalar(meta['description'])}", "", "fields:"]
    for n, f in fields.items():
        note = f"  # {comments[n]}" if comments.get(n) else ""
        lines.append(f"  {_scalar(n)}: {_flow(f)}{note}")
    values = "、".join(labels)
    system = _SYSTEM.format(label=label, reason=f"；{reason[0]}：…" if reason else "") + (
        f"可选：{values}。" if len(values) <= 60 else "")
    lines += ["", "prompt:", f"  system: {_scalar(system)}",
              f"  instruction: {_scalar(f'请根据以下信息判断{label}：')}",
              f"  question: {_scalar(f'请给出{label}。')}", "",
              "answer:", "  keys:", f"    {_scalar(label)}: {_flow({'values': labels})}"]
    if reason:
        lines.append(f"    {_scalar(reason[0])}: {_flow(reason[1])}  # the bank's reasons (rows without one learn "
                     "the label only)")
    lines.append(f"  primary: {_scalar(label)}")
    if meta.get("favourable"):
        lines.append(f"  favourable: {_scalar(meta['favourable'])}  # guessed from the label's wording: the value good "
                     "for the customer (fairness counts it); change or remove it")
    if segments:
        lines += ["", "evaluation:", f"  segments: [{', '.join(_scalar(s) for s in segments)}]"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ drafting

def _labels(rows: Sequence[dict], label: str, max_labels: int) -> tuple[Counter, int]:
    """Label counts (spellings the parser reads alike merged into the most common one) and unlabelled rows."""
    raw = Counter(str(r.get(label)).strip() for r in rows if not is_missing(r.get(label)))
    unlabelled = sum(1 for r in rows if is_missing(r.get(label)))
    merged: dict[str, str] = {}
    counts: Counter = Counter()
    for v, n in raw.most_common():
        key = norm_value(v) or v
        counts[merged.setdefault(key, v)] += n
    if not counts:
        raise DraftError(f"label column {label!r} is empty in every row: nothing to learn from")
    if len(counts) > max_labels:
        top = ", ".join(f"{v} {n}" for v, n in counts.most_common(5))
        raise DraftError(f"label column {label!r} has {len(counts)} distinct values, more than --max-labels "
                         f"{max_labels} (most common: {top}, ...): is it the label? If so, raise --max-labels")
    for v in counts:
        if any(c in v for c in "；;\n"):
            raise DraftError(f"label column {label!r}: the value {v!r} contains ；; or a newline, which separate "
                             "answer keys: rename that label in the table")
    return counts, unlabelled


def _check_columns(columns: list[str], label: str, id_col: str | None, protected: Sequence[str]) -> None:
    def known(c: str, what: str) -> None:
        if c not in columns:
            raise DraftError(f"{what}: no column {c!r} (columns: {', '.join(columns)})")

    known(label, "--label")
    if not label or any(c in label for c in "：:；;\n") or label == "rule":
        raise DraftError(f"--label {label!r}: an answer key is non-empty text without ：:；; and not 'rule': "
                         "rename the column")
    if id_col is not None:
        known(id_col, "--id")
        if id_col == label:
            raise DraftError(f"--id {id_col!r} is also the label column")
    for p in protected:
        known(p, "--protected")
        if p == label:
            raise DraftError(f"--protected {p!r} is the label column: a fairness attribute cannot be what the "
                             "model predicts")


def _protect(name: str, col: dict, shown_why: list[str]) -> None:
    """Make ``col`` a protected attribute: hidden, numeric ones banded (age-like: 25/35/50; else quartiles)."""
    f = col["field"]
    if f["type"] in ("date", "list"):
        raise DraftError(f"--protected {name!r}: a {f['type']} column cannot be a protected attribute")
    f["protected"] = True
    f["show"] = False
    if f["type"] in ("integer", "decimal", "percent"):
        agey = _AGE_NAME_RE.search(name) or col.get("unit") == "岁"
        f["bands"] = dict(AGE_BANDS) if agey else _quantile_bands(col["numbers"], col.get("unit", ""))
    shown_why.append("protected attribute" + (f" (draft bands {' / '.join(f['bands'])})" if "bands" in f else ""))


def draft_spec(rows: Sequence[dict], *, label: str, id_col: str | None = None, protected: Sequence[str] = (),
               max_labels: int = 20, source_name: str, name: str | None = None,
               reason: str | None = None) -> tuple[str, dict]:
    """A task spec (YAML text) drafted from a labelled table's rows, and a summary of how.

    ``rows``: dicts column -> cell (``read_table``'s output); ``label``: the column holding the bank's labels
    (rows where it is empty are unlabelled data, counted); ``id_col``: the identifier column (otherwise any
    text column unique per row is one); ``protected``: fairness attributes; ``source_name``: the table's file
    name (the task's name comes from it unless ``name`` is given). DraftError (one line) when the table cannot
    make a task: a column that does not exist, more than ``max_labels`` labels, no labelled row.

    The summary: ``task, source, rows, labelled, unlabelled, label, label_counts, favourable`` (a label guessed
    to be good for the customer, e.g. 正常, or None), ``columns`` (per column:
    ``column, field, type, shown, why, pii, pii_share, missing, distinct``), ``segments``, ``warnings``; it
    holds no cell values except the labels and category values of columns that are not personal information."""
    columns = _column_names(rows)
    if not rows:
        raise DraftError(f"{source_name}: the table has no rows")
    protected = list(dict.fromkeys(protected))
    _check_columns(columns, label, id_col, protected)
    name = name or task_name(source_name)
    if not NAME_RE.match(name) or name in BUILTIN_NAMES:
        raise DraftError(f"task name {name!r}: lowercase ASCII letters, digits and _, starting with a letter, at most "
                         f"32 characters, not {', '.join(BUILTIN_NAMES)} (e.g. post_loan)")
    counts, unlabelled = _labels(rows, label, max_labels)
    reason = reason_column(columns, label, reason)
    if reason is not None and (reason not in columns or reason in (label, id_col) or reason in protected):
        raise DraftError(f"--reason {reason!r}: " + ("no such column" if reason not in columns else
                                                     "it is the label, the identifier or protected"))
    reason_key = (reason, _reason_key(rows, reason)) if reason else None
    labels = [v for v, _ in counts.most_common()]
    if all(_number(v)[0] is not None for v in labels):
        labels.sort(key=lambda v: _number(v)[0])
    fields: dict[str, dict] = {}
    comments: dict[str, str] = {}
    summary_cols: list[dict] = []
    segments: list[str] = []
    warnings: list[str] = []
    names = set(columns)
    for c in columns:
        if c == label:
            continue
        if c == reason:  # an answer key, not an input: shown in the prompt it would give the label away
            summary_cols.append({"column": c, "field": None, "type": "reason", "shown": False,
                                 "why": "the answer's reason (--reason): never an input", "pii": None,
                                 "pii_share": 0.0, "missing": sum(is_missing(r.get(c)) for r in rows), "distinct": 0})
            continue
        values = [r.get(c) for r in rows if not is_missing(r.get(c))]
        entry: dict[str, Any] = {"column": c, "field": None, "type": None, "shown": False, "why": "", "pii": None,
                                 "pii_share": 0.0, "missing": len(rows) - len(values), "distinct": 0}
        summary_cols.append(entry)
        problem = _field_name_problem(c)
        if problem or not values:
            entry["why"] = f"left out: {problem}" if problem else "left out: no values"
            if c == id_col or c in protected:
                raise DraftError(f"column {c!r} cannot be a field ({problem or 'it has no values'})")
            continue
        col = _infer(c, values, len(rows))
        f = col["field"]
        why: list[str] = list(col["why"])
        pii, share = (None, 0.0) if f["type"] in ("boolean", "date", "percent") else _pii_type(c, col["texts"])
        entry["pii"], entry["pii_share"] = pii, round(share, 3)
        if c == id_col or (col.get("identifier") and c not in protected):
            f.clear()
            f.update({"type": "text", "show": False})
            why.insert(0, "identifier" + (" (--id)" if c == id_col else ": unique per row"))
        if pii is not None:  # text, hidden: no category of names copied into the spec, a phone is no quantity
            f.clear()
            f.update({"type": "text", "show": False})
            why.insert(0, f"personal information ({pii})")
        elif col.get("free_text") and share > 0:
            why.append(f"{share:.0%} of the sampled values hold personal information: scrubbed when printed; "
                       "the corpus pii step scrubs it for training")
        if c in protected:
            _protect(c, col, why)
            if f.get("bands"):
                into = f"{c}_band"
                if into in names:
                    f["band_field"] = next(f"{c}_分组{'' if i == 0 else i}" for i in range(100)
                                           if f"{c}_分组{'' if i == 0 else i}" not in names)
                    into = f["band_field"]
                names.add(into)
        if len(values) < len(rows):
            f["required"] = False
            why.append(f"{len(rows) - len(values)} empty cells: optional")
        if f["type"] == "category" and f.get("show", True) and not segments and 2 <= col["distinct"] <= 8:
            segments.append(c)
        fields[c] = f
        shown = f.get("show", True)
        entry.update(field=c, type=f["type"], shown=shown, distinct=col["distinct"], why="; ".join(why))
        comments[c] = "; ".join(w.split(" (draft bands")[0] + (" (draft bands: review them)" if "(draft bands" in w else "")
                                for w in why if not w.endswith(": optional"))
    if not any(f.get("show", True) for f in fields.values()):
        raise DraftError(f"{source_name}: no column is left to show in the prompt (every one is the label, hidden or "
                         "left out)")
    if len(counts) == 1:
        warnings.append(f"the label column {label!r} has a single value ({labels[0]!r}): a model learns nothing "
                        "from it")
    n_lab = len(rows) - unlabelled
    favourable = next((v for v in labels if v in FAVOURABLE_WORDS), None) if len(labels) > 1 else None
    meta = {"name": name, "title": f"{label}判定", "favourable": favourable,
            "description": f"由{Path(source_name).name}起草：依据其余各列判断{label}（{len(labels)}类）",
            "header": f"Drafted by `banklm task init` from {Path(source_name).name}: {len(rows)} rows, "
                      f"{n_lab} labelled, {unlabelled} unlabelled."}
    text = _spec_text(meta, fields, comments, label, labels, segments, reason_key)
    try:
        spec = parse_spec(text, f"{name}.yaml")
    except SpecError as e:  # a column the drafter did not foresee: say which, rather than write a broken spec
        raise DraftError(f"{source_name}: the drafted spec does not load ({e})") from None
    warnings += list(spec.warnings)
    summary = {"task": name, "source": str(source_name), "rows": len(rows), "labelled": n_lab,
               "unlabelled": unlabelled, "label": label, "reason": reason,
               "label_counts": dict(counts.most_common()),
               "favourable": favourable,
               "columns": summary_cols, "segments": segments, "warnings": warnings}
    return text, summary


# ------------------------------------------------------------------------------------------------ examples

def draft_examples(spec_text: str, rows: Sequence[dict], n: int = 3, *, source_name: str = "table",
                   scrub: Callable[[str], str] | None = None, seed: int = 0) -> list[dict]:
    """The prompts of the first ``n`` labelled rows that read cleanly, rendered by the spec, with their answers:
    ``{"source", "system", "prompt", "answer", "rule"}`` as :func:`banklm.tasks.check.example_prompts` gives
    (``banklm.tasks.check.format_examples`` prints them). Texts pass through ``scrub`` (e.g. the PII
    scrubber): hidden columns are never in a prompt, shown free text may hold a name."""
    t = task_from_spec(parse_spec(spec_text, "draft"))
    scrub = scrub or (lambda s: s)
    rng = random.Random(f"banklm-task-init|{t.name}|{seed}")
    out = []
    for i, row in enumerate(rows):
        if len(out) >= n:
            break
        lab = row.get(t.primary_key)
        if is_missing(lab):
            continue
        try:
            fields = {k: None if is_missing(row.get(k)) else coerce_value(f, row.get(k))
                      for k, f in t.spec.fields.items()}
        except ValueError:
            continue
        t.spec.derive(fields)
        prompt = t.render_prompt(fields, rng)
        canon = {norm_value(v): v for v in t.label_values}
        ans = {t.primary_key: canon.get(norm_value(str(lab)), str(lab).strip())}
        rk = t.reason_key
        if rk is not None and not is_missing(row.get(rk)):
            ans[rk] = str(row.get(rk)).strip()
        answer = t.format_answer(ans, list(ans))
        out.append({"source": f"{Path(source_name).name} {row_label(source_name, i, rows)}",
                    "system": scrub(t.policy) if t.policy else None, "prompt": scrub(prompt),
                    "answer": scrub(answer), "rule": None})
    return out


__all__ = ["DraftError", "draft_spec", "draft_examples", "task_name", "PII_SAMPLE"]
