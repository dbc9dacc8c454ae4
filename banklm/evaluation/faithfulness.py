"""Faithfulness that can fail: does an answer's reason say only what the input and the label support?

Three checks, one number reader (:func:`banklm.tasks.formats.read_numbers`, the one the answer grammar uses):

- :func:`faithfulness`: every number a reason cites appears in the input (or is a citable constant of the spec);
  reasons citing no number are counted apart (``n_without_numbers``), never passed silently.
- :func:`field_binding`: a number written right after a field's name equals that field's value (a number copied
  from the wrong field fails here, though it is in the input).
- :func:`reason_label_consistency`: the reason argues for the label given. With the spec's rules: a reason that
  matches the reason template of a rule whose outcome differs from the label, or cites only deciding fields of
  such rules, contradicts it; a reason that matches a rule of the label, or cites a deciding field of one, is
  consistent; anything else is *unchecked* (counted as such: nothing here could fail it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from banklm.tasks.base import Task
from banklm.tasks.formats import UNITS, extract_numbers
from banklm.tasks.grammar import attached_numbers, binding_names

__all__ = ["faithfulness", "field_binding", "reason_label_consistency", "CONSISTENT", "CONTRADICTS", "UNCHECKED"]

CONSISTENT, CONTRADICTS, UNCHECKED = "consistent", "contradicts", "unchecked"
#: a template's literal pieces shorter than this are too common to identify it (``，`` ``个``)
_MIN_PIECE = 2
_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
_SPACE = re.compile(r"\s+")



def faithfulness(inputs: Sequence[str], reasons: Sequence[str | None], allowed: Iterable[tuple] = ()) -> dict:
    """Check every number of each reason against its input.

    Returns ``{"per_answer": [list of unsupported number strings per answer (None when the answer
    has no reason)], "hallucination_rate": answers with >= 1 unsupported number / answers with a
    reason, "unsupported_number_rate": unsupported / cited numbers, "n_checked", "n_numbers",
    "n_without_numbers" (reasons citing no number: nothing here could fail them, counted apart)}``.
    ``allowed`` lists canonical numbers (see :func:`extract_numbers`) accepted everywhere (rule
    constants, if a task cites them).
    """
    allowed_set = set(allowed)
    per: list[list[str] | None] = []
    checked = bad_answers = n_nums = n_bad = no_numbers = 0
    for inp, reason in zip(inputs, reasons, strict=True):
        if reason is None:
            per.append(None)
            continue
        support = set(extract_numbers(inp)) | allowed_set
        bad = []
        for num in extract_numbers(reason):
            n_nums += 1
            if num not in support:
                n_bad += 1
                bad.append(_show(num))
        per.append(bad)
        checked += 1
        bad_answers += bool(bad)
        no_numbers += not extract_numbers(reason)
    return {
        "per_answer": per,
        "hallucination_rate": bad_answers / checked if checked else 0.0,
        "unsupported_number_rate": n_bad / n_nums if n_nums else 0.0,
        "n_checked": checked,
        "n_numbers": n_nums,
        "n_without_numbers": no_numbers,
    }


def field_binding(reasons: Sequence[str | None], values: Sequence[Mapping[str, Iterable[tuple]] | None],
                  names: Mapping[str, Iterable[str]], units: Iterable[str] = UNITS) -> dict:
    """Check that every number a reason writes after a field's name is that field's value.

    ``names``: name -> the fields it names (:func:`banklm.tasks.grammar.binding_names`); ``values``: per answer,
    field -> its canonical values in that record (:func:`banklm.tasks.grammar.binding_values`), None when the
    record has no fields (a table row in prompt mode: skipped and counted). A number is bound when a name stands
    right before it in its clause (:func:`banklm.tasks.grammar.attached_numbers`); numbers without one are not
    counted (the faithfulness metric covers them). A bound number equal to none of its name's fields' values is
    a binding error: another field's value (``equals`` says whose) or no field's.

    Returns ``{"per_answer": [None (no reason or no fields) or a list of {"number", "fields", "equals"}],
    "field_binding_error_rate": errors / bound numbers (None when none is bound), "n_bound_numbers",
    "n_binding_errors", "n_binding_skipped"}``.
    """
    units = tuple(units)
    per: list[list[dict] | None] = []
    n_bound = n_bad = skipped = 0
    for reason, vals in zip(reasons, values, strict=True):
        if vals is None:
            skipped += 1
            per.append(None)
            continue
        if reason is None:
            per.append(None)
            continue
        vals = {k: set(v) for k, v in vals.items()}
        bad = []
        for m, items in attached_numbers(reason, names, units):
            n_bound += 1
            if not any(m.value in vals.get(it, ()) for it in items):
                n_bad += 1
                bad.append({"number": m.text, "fields": sorted(items),
                            "equals": sorted(k for k, v in vals.items() if m.value in v)})
        per.append(bad)
    return {
        "per_answer": per,
        "field_binding_error_rate": n_bad / n_bound if n_bound else None,
        "n_bound_numbers": n_bound,
        "n_binding_errors": n_bad,
        "n_binding_skipped": skipped,
    }


def _show(num: tuple) -> str:
    if num[0] == "date":
        return f"{num[1]:04d}-{num[2]:02d}-{num[3]:02d}"
    v = num[1]
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s + "%" if num[0] == "pct" else s


def _pieces(source: str) -> list[str]:
    """The literal text of a reason template between its placeholders (what every rendering of it contains)."""
    return [p for p in (x.strip("，,；;。 ") for x in _TAG.split(source)) if len(p) >= _MIN_PIECE]


def _in_order(pieces: Sequence[str], text: str) -> bool:
    at = 0
    for p in pieces:
        i = text.find(p, at)
        if i < 0:
            return False
        at = i + len(p)
    return True


def _norm(text: str) -> str:
    return _SPACE.sub("", text).strip("。；;，, ")


def _template_pieces(task: Task) -> dict[str, list[str]]:
    """Each rule's reason template's literal pieces (rules without a reason have none)."""
    return {r.name: _pieces(r.reason.source) for r in task._compiled if r.reason is not None}


def _field_names(task: Task) -> dict[str, set[str]]:
    """Every name a reason may call a field by: its label (``担保方式``, ``失信被执行人``), or any word the spec's
    templates write before a numeric field's value (``近24个月逾期``) -> the fields it names."""
    names: dict[str, set[str]] = {}
    for n, f in task.spec.model.fields.items():
        for name in {f.label or n, n}:
            if len(name) >= 2:
                names.setdefault(name, set()).add(n)
    for name, items in binding_names(task).items():
        names.setdefault(name, set()).update(i for i in items if i in task.spec.model.fields)
    return names


def _matched_rules(task: Task, reason: str, fields: Mapping | None, pieces_of: Mapping[str, list[str]]) -> list:
    """The rules whose reason the text is: equal to its rendering for these fields; else, among the templates
    whose literal pieces all appear in order, those that explain the most of it (``负债收入比…，近24个月逾期…次`` is
    the rule whose template has both pieces, not the one with ``近24个月逾期…次`` alone)."""
    exact, partial = [], []
    text = _norm(reason)
    values = task.spec.template_values(task._with_bands(dict(fields))) if fields is not None else None
    for r in task._compiled:
        if r.reason is None:
            continue
        rendered = None
        if values is not None:
            try:
                rendered = _norm(r.reason.render(values))
            except Exception:  # noqa: BLE001 - a template that cannot render these fields is not this reason
                rendered = None
        pieces = pieces_of[r.name]
        if rendered and rendered == text:
            exact.append(r)
        elif pieces and _in_order(pieces, text):
            partial.append((sum(len(p) for p in pieces), r))
    if exact or not partial:
        return exact
    best = max(n for n, _ in partial)
    return [r for n, r in partial if n == best]


def _cited_fields(reason: str, names: Mapping[str, set[str]]) -> set[str]:
    """Fields a reason names (``names``: :func:`_field_names`)."""
    return {f for name, items in names.items() if name in reason for f in items}


def reason_label_consistency(task: Task, reasons: Sequence[str | None], labels: Sequence[str | None],
                             fields: Sequence[Mapping | None] | None = None) -> dict:
    """Whether each reason argues for its answer's primary ``labels`` (see the module docstring), with the
    spec's rules; ``fields`` (per answer, the record's input fields or None) lets a reason be matched against
    each rule's reason as rendered for that record.

    Returns ``{"per_answer": [None (no reason or label) or {"status", "rules" (matched or cited), "fields"}],
    "n_checked", "consistent", "contradicts", "unchecked", "contradiction_rate" (contradicts / (consistent +
    contradicts), None when nothing was checkable), "unchecked_rate" (unchecked / checked answers),
    "available" (False without rules: every answer unchecked)}``."""
    fields = list(fields) if fields is not None else [None] * len(reasons)
    if not (len(reasons) == len(labels) == len(fields)):
        raise ValueError("reasons, labels and fields differ in length")
    key = task.primary_key
    rules = list(task._compiled)
    outcome = {r.name: r.outcome.get(key) for r in rules}
    deciding = {r.name: set(r.when.names) if r.when is not None else set() for r in rules}
    pieces_of, names = (_template_pieces(task), _field_names(task)) if rules else ({}, {})
    per: list[dict | None] = []
    counts = {CONSISTENT: 0, CONTRADICTS: 0, UNCHECKED: 0}
    for reason, label, f in zip(reasons, labels, fields, strict=True):
        if not reason or label is None:
            per.append(None)
            continue
        status, why, cited = UNCHECKED, [], set()
        if rules:
            matched = _matched_rules(task, reason, f, pieces_of)
            if matched:
                same = [r.name for r in matched if outcome[r.name] == label]
                status = CONSISTENT if same else CONTRADICTS
                why = same or [r.name for r in matched]
            else:
                cited = _cited_fields(reason, names)
                for_label = set().union(*(deciding[n] for n in outcome if outcome[n] == label))
                against = {n for n in outcome if outcome[n] != label and deciding[n] & cited}
                only_against = cited & set().union(*(deciding[n] for n in against)) - for_label if against else set()
                if cited & for_label:
                    status, why = CONSISTENT, sorted(n for n in outcome if outcome[n] == label and deciding[n] & cited)
                elif only_against:
                    status, why = CONTRADICTS, sorted(n for n in against if deciding[n] & only_against)
        counts[status] += 1
        per.append({"status": status, "rules": why, "fields": sorted(cited)})
    judged = counts[CONSISTENT] + counts[CONTRADICTS]
    checked = sum(counts.values())
    return {"per_answer": per, "n_checked": checked, **counts,
            "contradiction_rate": counts[CONTRADICTS] / judged if judged else None,
            "unchecked_rate": counts[UNCHECKED] / checked if checked else None, "available": bool(rules)}
