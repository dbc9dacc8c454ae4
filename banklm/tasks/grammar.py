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
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

from banklm.tasks.base import Task, iter_user_messages
from banklm.tasks.formats import UNITS, fmt_num, read_numbers

__all__ = ["task_grammar", "answer_grammar", "number_alternatives", "citable_values", "support_texts", "task_units",
           "reason_limit", "DEFAULT_REASON_CHARS"]

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


def answer_grammar(task: Task, messages: Sequence[Mapping] | str, *, max_reason_chars: int | None = None) -> str:
    """The answer grammar for one request: ``messages`` (chat messages; a final assistant turn is ignored) or the
    prompt text. Reason numbers are those of :func:`number_alternatives`."""
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
    out: list[str] = []
    for name in task.reason_cite:
        if name not in consts:
            continue
        v = consts[name]
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                out += [str(x), fmt_num(x)]
    return list(dict.fromkeys(out))


def _reads_alone(text: str, units: tuple[str, ...]) -> bool:
    """The reader, given ``text`` alone, finds exactly one number spanning all of it (drops the odd span a
    number shares with a date)."""
    found = read_numbers(text, units)
    return len(found) == 1 and found[0].text == text
