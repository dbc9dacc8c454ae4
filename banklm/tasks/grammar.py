"""The answer grammar of a task: its spec and a prompt compiled to one GBNF text (llama.cpp's grammar format, the
single source every runtime decodes under).

An answer is exactly what :meth:`~banklm.tasks.base.Task.format_answer` writes: the keys in spec order, ``键：值``
joined by ``；``, each categorical key one of its declared values (the abstain value is one of the primary's), a
multi-label key a non-empty subset in declared order joined by ``、``, the reason free text of at most the spec's
``max_length`` characters (so every answer ends, and within a known number of tokens).

Inside the reason every digit belongs to a number **copied as written, unit included** from the prompt (every
message the model sees: system/policy and user) or from the spec's citable constants: ``近24个月逾期4次`` may be
written when the prompt says ``近24个月逾期4次``, ``79.8`` may not when it says ``79.8%``. What counts as a number,
and where it ends, is :func:`banklm.tasks.formats.read_numbers`, the reader of the faithfulness metric, so an
answer the grammar accepts cites no number the metric calls unsupported:

- a number alternative is a mention's text as the reader found it in the prompt, kept only when reading it alone
  gives back that one value;
- free text holds no digit (any Unicode decimal digit the reader reads), no line break, no ``：:；;`` (a colon
  would read as a key, a semicolon as the next field);
- right after a number comes the end of the reason or a character that cannot extend or join it for the reader
  (not a space, ``,./-``, ``%％．``, ``万亿千`` nor ``年月日``): so two numbers never run together into a third;
- the reason does not end with a space or ``。`` (the strict parser's layout).

``task_grammar(task)`` is the static part (a reason without digits: the grammar shipped next to a model);
``answer_grammar(task, messages)`` adds the numbers of one request.

**Field binding** (``answer.keys.<reason>.bind: true``): with the request's fields given, a number is written
only as one piece with the name of the field whose value it is, ``负债收入比65.0%``, ``近24个月逾期4次`` (or a
citable constant after its own name). A field's names (:func:`binding_names`) are its ``label``, its name, and
the words the spec's templates write right before its value (``近24个月逾期{{ overdue_24m }}次`` names
``overdue_24m`` ``近24个月逾期``); which number a reason attaches to which name is :func:`attached_numbers`, the
definition the field-binding metric (:func:`banklm.evaluation.metrics.field_binding`) reads with.
"""

from __future__ import annotations

import functools
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from banklm.tasks.base import Task, iter_user_messages
from banklm.tasks.formats import UNITS, NumberMention, fmt_num, read_numbers
from banklm.tasks.spec import NUMERIC_TYPES, field_text
from banklm.tasks.templates import TemplateFailure

__all__ = ["task_grammar", "answer_grammar", "number_alternatives", "citable_values", "support_texts", "task_units",
           "reason_limit", "DEFAULT_REASON_CHARS", "binds", "binding_names", "binding_values", "attached_numbers",
           "bound_alternatives", "BIND_GAP"]

#: the reason bound of a spec that declares no ``max_length``
DEFAULT_REASON_CHARS = 64
#: never in a reason: line breaks and the characters that would read as a key or the next field
_NEVER = "：:；;"
#: allowed inside a reason but not as its last character (the strict parser's layout)
_INNER_ONLY = " 。"
#: may not follow a number directly: the reader would extend the number or join it to the next one
_JOINERS = " ,.-/%％．万亿千年月日"
_CLASS_SPECIAL = "]\\^-[\""


def task_grammar(task: Task, *, max_reason_chars: int | None = None) -> str:
    """The task's answer grammar without prompt numbers: its reason holds no digit."""
    return _grammar(task, [], max_reason_chars)


def answer_grammar(task: Task, messages: Sequence[Mapping] | str, *, max_reason_chars: int | None = None,
                   fields: Mapping[str, Any] | None = None) -> str:
    """The answer grammar for one request: ``messages`` (chat messages; a final assistant turn is ignored) or the
    prompt text. Reason numbers are those of :func:`number_alternatives`; when the spec binds them
    (:func:`binds`) and ``fields`` (the request's input fields) are given, those of :func:`bound_alternatives`
    instead, each written with its field's name. Without ``fields`` (a served prompt whose fields are unknown) a
    binding spec falls back to the unbound numbers: still copied from the prompt, but after any words."""
    if fields is not None and binds(task):
        return _grammar(task, bound_alternatives(task, messages, fields), max_reason_chars)
    return _grammar(task, number_alternatives(task, messages), max_reason_chars)


def support_texts(messages: Sequence[Mapping] | str) -> list[str]:
    """The texts a reason may take numbers from: every message the model sees (all before the final assistant
    turn, system/policy included), each read on its own so no number spans two messages."""
    if isinstance(messages, str):
        return [messages]
    return [str(m.get("content") or "") for m in iter_user_messages({"messages": list(messages)})]


def number_alternatives(task: Task, messages: Sequence[Mapping] | str) -> list[str]:
    """The number texts a reason may write for this request: every number of the prompt as written with its unit
    (the reader's units plus the task's field units), then the task's citable constants; in first-seen order."""
    units = task_units(task)
    texts = [m.text for t in support_texts(messages) for m in read_numbers(t, units)]
    texts += _constant_texts(task)
    return [t for t in dict.fromkeys(texts) if _reads_alone(t, units)]


def citable_values(task: Task) -> list[tuple]:
    """Canonical values (:func:`~banklm.tasks.formats.extract_numbers`) of the spec's citable numeric constants:
    the faithfulness metric's ``allowed`` for this task, the numbers the grammar admits beyond the prompt's."""
    return list(dict.fromkeys(m.value for t in _constant_texts(task) for m in read_numbers(t, ())))


def reason_limit(task: Task, max_reason_chars: int | None = None) -> int:
    """The reason's bound in characters: ``max_reason_chars``, else the spec's ``max_length``, else the default."""
    n = max_reason_chars or task.reason_max_length or DEFAULT_REASON_CHARS
    if n < 1:
        raise ValueError(f"{task.name}: the reason bound must be >= 1 character, got {n}")
    return int(n)


# ----------------------------------------------------------------------------------------------
# GBNF text

def _grammar(task: Task, numbers: Sequence[str], max_reason_chars: int | None) -> str:
    head = [f"# banklm answer grammar: task {task.name} (GBNF, llama.cpp grammar format)"]
    rules: list[str] = []
    seq: list[str] = []
    for i, f in enumerate(task.answer_fields):
        seq.append(_lit(("；" if i else "") + f"{f.zh}："))
        name = f"k{i}"
        if f.kind == "reason":
            rules += _reason_rules(name, reason_limit(task, max_reason_chars), numbers)
        elif f.kind == "multi":
            rules += _multi_rules(name, list(f.values or []))
        else:
            rules.append(f"{name} ::= " + " | ".join(_lit(v) for v in f.values or []))
        seq.append(name)
    return "\n".join([*head, "root ::= " + " ".join(seq), *rules]) + "\n"


def _multi_rules(name: str, values: list[str]) -> list[str]:
    """A non-empty subset of ``values`` in their order, joined by 、: ``{name}-J`` starts at value J or later."""
    out = []
    last = len(values) - 1
    for j, v in enumerate(values):
        if j == last:
            out.append(f"{name}-{j} ::= {_lit(v)}")
        else:
            out.append(f"{name}-{j} ::= {_lit(v)} ({_lit('、')} {name}-{j + 1})? | {name}-{j + 1}")
    return [f"{name} ::= {name}-0", *out]


def _reason_rules(name: str, limit: int, numbers: Sequence[str]) -> list[str]:
    """The reason, unrolled by characters left: ``{name}-iN`` is a reason part of 1..N characters; after a number
    ``{name}-jN`` (its first character no joiner, never a number). Numbers are grouped by length ``{name}-nK``."""
    by_len: dict[int, list[str]] = {}
    for t in numbers:
        if len(t) <= limit:
            by_len.setdefault(len(t), []).append(t)
    out = [f"{name} ::= {name}-i{limit}",
           f"{name}-c ::= {_char_class(_INNER_ONLY)}",  # a free character that may end the reason
           f"{name}-e ::= {_lit_class(_INNER_ONLY)}"]  # one that may not
    free, inner = f"{name}-c", f"{name}-e"
    free_nj, inner_nj = f"{name}-cn", _lit_class(set(_INNER_ONLY) - set(_JOINERS))
    if by_len:
        out.append(f"{free_nj} ::= {_char_class(_INNER_ONLY + _JOINERS)}")  # after a number
    for k, texts in sorted(by_len.items()):
        out.append(f"{name}-n{k} ::= " + " | ".join(_lit(t) for t in texts))

    def then(kind: str, n: int, must: bool = False) -> str | None:
        """What may follow with ``n`` characters left: nothing (n == 0), an optional or a required part."""
        if n == 0:
            return None if must else ""
        return f" {name}-{kind}{n}" + ("" if must else "?")

    need_j = set()
    for n in range(limit, 0, -1):
        alts = [free + then("i", n - 1)]
        if (rest := then("i", n - 1, must=True)) is not None:
            alts.append(inner + rest)
        for k in sorted(by_len):
            if k <= n:
                alts.append(f"{name}-n{k}" + then("j", n - k))
                need_j.add(n - k)
        out.append(f"{name}-i{n} ::= " + " | ".join(alts))
    for n in sorted(x for x in need_j if x > 0):
        alts = [free_nj + then("i", n - 1)]
        if inner_nj and (rest := then("i", n - 1, must=True)) is not None:
            alts.append(inner_nj + rest)
        out.append(f"{name}-j{n} ::= " + " | ".join(alts))
    return out


def _lit(text: str) -> str:
    """A GBNF string literal."""
    return '"' + "".join(_esc(c, '"\\') for c in text) + '"'


def _lit_class(chars: Iterable[str]) -> str:
    chars = sorted(set(chars))
    return ("[" + "".join(_esc(c, _CLASS_SPECIAL) for c in chars) + "]") if chars else ""


def _char_class(extra: str) -> str:
    """A GBNF class of every character but digits, control characters, line breaks and other whitespace than a
    space, :data:`_NEVER` and ``extra``. Written as the allowed ranges, not a negated class: llama.cpp admits a
    token ending inside a UTF-8 sequence when some completion is in a positive class (exact, as llguidance),
    but rejects it under a negated class when any excluded character shares its lead bytes (``<0xE0>``), and
    admits invalid lead bytes (``<0xF5>``) there; the positive form decodes the same on both."""
    excluded = set(_NEVER) | set(extra)
    ranges = _merge(list(_reader_excluded()) + [(ord(c), ord(c)) for c in sorted(excluded)]
                    + [(0xD800, 0xDFFF)])  # surrogates: no UTF-8 character
    allowed, lo = [], 0
    for a, b in ranges:
        if a > lo:
            allowed.append((lo, a - 1))
        lo = b + 1
    if lo <= 0x10FFFF:
        allowed.append((lo, 0x10FFFF))
    return "[" + "".join(_esc(chr(a), _CLASS_SPECIAL) + ("" if a == b else "-" + _esc(chr(b), _CLASS_SPECIAL))
                         for a, b in allowed) + "]"


@functools.cache
def _reader_excluded() -> tuple[tuple[int, int], ...]:
    """Code point ranges free text never holds: decimal digits (the reader reads any Unicode one: ``\\d``),
    control characters and whitespace other than the space (``\\s``). Nd and White_Space lie below U+20000."""
    cps = [c for c in range(0x20000) if (ch := chr(c)).isdecimal() or (ch.isspace() and ch != " ")
           or c < 0x20 or 0x7F <= c <= 0x9F]
    return tuple(_merge([(c, c) for c in cps]))


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _esc(c: str, special: str) -> str:
    """``c`` inside a GBNF literal or class: a character special there and an ASCII control character as a hex
    escape (llama.cpp knows no other escape for ``^`` or ``-``); anything else as itself, in UTF-8 (llguidance's
    GBNF reader mangles ``\\u`` escapes with leading zeros)."""
    cp = ord(c)
    return f"\\x{cp:02X}" if c in special or cp < 0x20 or 0x7F <= cp <= 0xA0 else c


# ----------------------------------------------------------------------------------------------
# numbers

def task_units(task: Task) -> tuple[str, ...]:
    """The reader's units plus every unit the spec's fields (and list sub-fields) are written with."""
    units = list(UNITS)
    for f in task.spec.model.fields.values():
        units += [f.unit] if f.unit else []
        units += [s.unit for s in (f.fields or {}).values() if s.unit]
    return tuple(dict.fromkeys(units))


def _constant_texts(task: Task) -> list[str]:
    """How the reason templates print the citable numeric constants (``{{ 逾期预警天数 }}`` -> ``90``; a float
    prints as Python writes it, ``num`` shortens it): each constant of ``cite``, list constants element-wise."""
    consts = task.constants
    return list(dict.fromkeys(t for name in task.reason_cite if name in consts for t in _value_texts(consts[name])))


def _value_texts(v: Any) -> list[str]:
    """How a template prints a numeric constant: as Python writes it and shortened (``num``); a list element-wise."""
    out: list[str] = []
    for x in v if isinstance(v, list) else [v]:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            out += [str(x), fmt_num(x)]
    return out


def _reads_alone(text: str, units: tuple[str, ...]) -> bool:
    """The reader, given ``text`` alone, finds exactly one number spanning all of it (drops the odd span a
    number shares with a date)."""
    found = read_numbers(text, units)
    return len(found) == 1 and found[0].text == text


# ----------------------------------------------------------------------------------------------
# field binding: a number right after the name of the field it belongs to

#: at most this many characters (no digit, no clause end) between a name and the number it names: ``负债收入比为65%``
BIND_GAP = 4
#: end a clause: a name and the number it names are in one clause
_CLAUSE_ENDS = "，,。；;！!？?\n"
#: where the words before a value in a template start (besides another value)
_NAME_CUTS = _CLAUSE_ENDS + "、（）()【】[]「」“”/\t" + "\ue000"
#: what a text field shows while the templates are rendered to find the names (so no name holds a text value)
_TEXT_MARK = "\ue000"
#: a bindable number shows marker _NUM_MARK + _NUM_STEP * i while the templates are rendered (read back through
#: the reader's multipliers: ``{{ x | wan }}`` writes 900000万元)
_NUM_MARK, _NUM_STEP = 900000, 1000
_MULTS = (1.0, 1e3, 1e4, 1e8)
_BRACKETED_TAIL = re.compile(r"\s*[(（][^()（）]*[)）]$")
_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def binds(task: Task) -> bool:
    """Whether the spec's reason key binds its numbers to field names (``bind: true``)."""
    key = task.reason_key
    return bool(key) and bool(task.spec.model.answer.keys[key].bind)


def _bindable(task: Task) -> dict[str, Any]:
    """What a number can belong to: the numeric and date fields (name -> field spec), then the numeric
    constants (name -> value; a list: any element)."""
    out: dict[str, Any] = {n: f for n, f in task.spec.fields.items() if f.type in NUMERIC_TYPES or f.type == "date"}
    for n, v in task.constants.items():
        if _value_texts(v) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                   for x in (v if isinstance(v, list) else [v])):
            out[n] = v
    return out


def binding_names(task: Task) -> dict[str, frozenset[str]]:
    """Every name a number can be written after -> the fields (and numeric constants) it names: a field's
    ``label`` (default its name; also without a bracketed tail, ``申请金额(万元)`` -> ``申请金额``), a constant's name, and
    the words the spec's templates (facts, rule reasons, summary) write right before the value, back to the
    previous clause end, bracket, list mark or value (``近24个月逾期{{ overdue_24m }}次`` -> ``近24个月逾期``). Found
    by rendering the templates with a distinct marker per value, so any template (conditions, filters) counts.
    A name has two characters or more, one of them a letter. Cached per task."""
    if task in _NAMES:
        return _NAMES[task]
    bindable = _bindable(task)
    found: dict[str, set[str]] = {}

    def add(word: str, item: str) -> None:
        w = word.strip().rstrip("：: ").strip()
        if len(w) >= 2 and any(c.isalpha() for c in w) and _TEXT_MARK not in w:
            found.setdefault(w, set()).add(item)

    for n in bindable:
        label = (task.spec.fields[n].label if n in task.spec.fields else None) or n
        add(label, n)
        add(_BRACKETED_TAIL.sub("", label), n)
    units = task_units(task)
    for flag in (False, True):
        values, marks = _marked_values(task, bindable, flag)
        for text in _renderings(task, values):
            cut = 0
            for m in read_numbers(text, units):
                item = _marked(m.value, marks)
                if item is None:
                    continue
                seg = text[cut:m.start]
                add(seg[max(seg.rfind(c) for c in _NAME_CUTS) + 1:], item)
                cut = m.end
    order = {n: i for i, n in enumerate(bindable)}
    _NAMES[task] = out = {w: frozenset(sorted(items, key=order.__getitem__)) for w, items in found.items()}
    return out


def _marked_values(task: Task, bindable: Mapping[str, Any], flag: bool) -> tuple[dict, dict]:
    """What the templates see while the names are found: a marker per bindable number (a date: year 2900 + i),
    a text mark for every other text, ``flag`` for booleans; and each marker's canonical value -> its item."""
    fields: dict[str, Any] = {}
    marks: dict[tuple, str] = {}
    for i, (n, f) in enumerate(task.spec.fields.items()):
        if f.type in NUMERIC_TYPES:
            v = _NUM_MARK + _NUM_STEP * i
            fields[n] = v if f.type == "integer" else float(v)
            marks[("num", float(v))] = n
        elif f.type == "date" and i < 7000:
            fields[n] = f"{2900 + i}-11-27"
            marks[("date", 2900 + i, 11, 27)] = n
        else:
            fields[n] = flag if f.type == "boolean" else [] if f.type == "list" else _TEXT_MARK
    for b in task.spec.bands:
        fields[b.into] = _TEXT_MARK
    values = task.spec.template_values(fields)
    for j, n in enumerate(x for x in bindable if x not in task.spec.fields):
        if not isinstance(task.constants[n], list):
            v = _NUM_MARK + _NUM_STEP * (len(task.spec.fields) + j)
            values[n] = v if isinstance(task.constants[n], int) else float(v)
            marks[("num", float(v))] = n
    return values, marks


def _renderings(task: Task, values: Mapping[str, Any]) -> list[str]:
    """Every fact wording, rule reason and the summary rendered with ``values`` (one failing on the markers,
    e.g. one that computes with a value, is left out)."""
    spec = task.spec
    templates = [alt for alts in spec.facts for alt in alts] + [r.reason for r in spec.rules if r.reason is not None]
    templates += [spec.summary] if spec.summary is not None else []
    out = []
    for t in templates:
        try:
            out.append(t.render(values))
        except (TemplateFailure, TypeError, ValueError):
            continue
    return out


def _marked(value: tuple, marks: Mapping[tuple, str]) -> str | None:
    if value[0] == "date":
        return marks.get(value)
    return next((marks[k] for mult in _MULTS if (k := ("num", round(value[1] / mult, 6))) in marks), None)


def attached_numbers(text: str, names: Mapping[str, Iterable[str]],
                     units: Iterable[str] = UNITS) -> list[tuple[NumberMention, frozenset[str]]]:
    """The numbers of ``text`` written after a name (:func:`binding_names`), each with what the name names: the
    name ending nearest before the number in the same clause, at most :data:`BIND_GAP` characters before it with
    no digit between (every name ending there counts: ``近24个月逾期次数`` and ``逾期次数``). A number inside a name
    (``24个月`` of ``近24个月逾期``) belongs to the name; a number without a name before it is not bound."""
    spans: list[tuple[int, int, frozenset[str]]] = []
    for w, items in names.items():
        i = text.find(w)
        while i >= 0:
            spans.append((i, i + len(w), frozenset(items)))
            i = text.find(w, i + 1)
    out = []
    for m in read_numbers(text, tuple(units)):
        if any(s <= m.start < e for s, e, _ in spans):
            continue
        end = max((e for _, e, _ in spans if e <= m.start), default=None)
        if end is None:
            continue
        gap = text[end:m.start]
        if len(gap) > BIND_GAP or any(c in _CLAUSE_ENDS or c.isdecimal() for c in gap):
            continue
        out.append((m, frozenset().union(*(items for _, e, items in spans if e == end))))
    return out


def _value_mentions(f, value: Any, units: tuple[str, ...]) -> list[NumberMention]:
    """A field value's numbers as the prompt writes it by default (:func:`~banklm.tasks.spec.field_text`)."""
    try:
        text = field_text(f, value)
    except (TypeError, ValueError):  # a table value of an unexpected type: as written
        text = str(value)
    return read_numbers(text, units)


def binding_values(task: Task, fields: Mapping[str, Any]) -> dict[str, frozenset[tuple]]:
    """Each bindable field's value (from ``fields``, e.g. :meth:`~banklm.tasks.base.Task.fields_from_meta`) read
    canonically as the prompt writes it (``65.0%`` -> ``("pct", 65.0)``, ``80万元`` -> ``("num", 800000.0)``; a
    missing value: none), and each numeric constant's values: what a number bound to it must equal."""
    out = {}
    for n, x in _bindable(task).items():
        if n in task.spec.fields:
            out[n] = frozenset(m.value for m in _value_mentions(x, fields.get(n), ()))
        else:
            out[n] = frozenset(m.value for t in _value_texts(x) for m in read_numbers(t, ()))
    return out


def bound_alternatives(task: Task, messages: Sequence[Mapping] | str, fields: Mapping[str, Any]) -> list[str]:
    """The number pieces of a binding reason for one request: a name of a cited field (or constant) then that
    field's value as the prompt writes it, unit included (a prompt mention with the value and unit of the
    field's default text; any mention with the value when none has that unit), a constant as the templates print
    it. Kept when the value and every number inside the name are in the prompt (or citable), and the piece reads
    back (:func:`attached_numbers`) as that value bound to that name, the name's own numbers unchanged."""
    units = task_units(task)
    prompt = [m for t in support_texts(messages) for m in read_numbers(t, units)]
    support = {m.value for m in prompt} | set(citable_values(task))
    cite = set(task.reason_cite)
    texts: dict[str, list[str]] = {}
    for n, x in _bindable(task).items():
        if n not in cite:
            continue
        if n in task.spec.fields:
            ts = []
            for own in _value_mentions(x, fields.get(n), units):
                same = [m.text for m in prompt if m.value == own.value]
                ts += [m.text for m in prompt if m.value == own.value and m.unit == own.unit] or same
        else:
            ts = _value_texts(x)
        texts[n] = [t for t in dict.fromkeys(ts) if _reads_alone(t, units)]
    names = binding_names(task)
    out = []
    for word, items in names.items():
        inner = read_numbers(word, units)
        if any(m.value not in support for m in inner):
            continue
        for item in items:
            for t in texts.get(item, ()):
                piece = word + t
                found = read_numbers(piece, units)
                if ([m.text for m in found] == [m.text for m in inner] + [t] and found[-1].start == len(word)
                        and any(m.start == len(word) and item in its
                                for m, its in attached_numbers(piece, names, units))):
                    out.append(piece)
    return list(dict.fromkeys(out))
