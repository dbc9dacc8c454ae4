"""A bank's labelled table (CSV/TSV, JSONL, Parquet, Excel) turned into task records without teaching invented facts.

What a row becomes (docs/tasks.md, "A bank's own labelled table"):

* A missing optional value stays missing (``None``): the prompt writes it ``未提供`` and a rule whose condition
  then is unknown does not fire. When such a rule comes before the rule that fires, the rules cannot label the
  row (it might have fired): the row is labelled by the bank alone, or quarantined when the bank gives no label.
* A row whose label cell is empty is **unlabelled** (``target == "none"``, no answer): the corpus keeps it apart
  (split ``unlabelled``) for the distillation teacher, never for training or evaluation.
* Where the bank gives the label, the other answer keys come from the table; a missing one comes from the rules
  only when the rules give the bank's label, else the row has no target for it. The reason: the table's, else
  the rules' when they agree with the bank, else the spec's neutral ``summary``, else none.
* A record's ``target`` says what the model learns: ``"answer"`` (the whole answer) or ``"labels"`` (the
  assistant message holds the answer keys before the first one without a value, e.g. ``结论：拒绝；风险等级：C``;
  ``gold`` holds those keys only; loss on them, no end of turn).
* Free-text values (``text`` fields, the prompt column, the bank's reasons) pass ``scrub`` (the corpus build's
  PII step) before anything is rendered or stored.

Single bad rows (a value that does not read, a label outside the set) are quarantined with file, row and reason;
a table whose label column is mostly outside the label set, or whose rows are mostly bad, is an error.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banklm.tasks.base import MULTI_SPLIT, Task, norm_value
from banklm.tasks.registry import get_task
from banklm.tasks.spec import coerce_value, is_missing
from banklm.tasks.table_files import read_table, row_label

Fields = dict[str, Any]
#: text -> (scrubbed text, or None when the text may not be kept; {PII type: count})
Scrub = Callable[[str], tuple[str | None, dict[str, int]]]

TARGET_ANSWER, TARGET_LABELS, TARGET_NONE = "answer", "labels", "none"
#: a table whose label column holds more than this share of values outside the label set, or whose rows are
#: more than this share bad, is refused as a whole (a wrong column or a wrong task), not quarantined row by row
MAX_BAD_SHARE = 0.5


class BadRow(ValueError):
    """One row that cannot become a record; the message says why (the corpus build quarantines it)."""


@dataclass
class TableRecords:
    """What :func:`read_task_table` made of a table: records (unlabelled ones with ``target == "none"``), the
    quarantined rows ``{file, row, reason}``, and counts."""

    records: list[dict]
    quarantine: list[dict]
    stats: dict = field(default_factory=dict)


def rule_answer(t: Task, fields: Fields) -> tuple[dict | None, str | None]:
    """``(answer with "rule", None)`` when the rules decide the row; ``(None, why)`` when a rule before the one
    that fires is unknown on it (it reads a missing value), so the rules cannot tell."""
    if not t.has_rules:
        return None, "the task has no rules"
    values = _banded(t, fields)
    for r in t.spec.rules:
        if r.when is None:
            break
        v = r.when(values)
        if v is None:
            missing = sorted(n for n in r.when.names if n in values and values[n] is None)
            need = f"needs {', '.join(missing)}, which the row does not give" if missing else "is unknown on the row"
            return None, f"rule {r.name!r} {need}"
        if v:
            break
    return t.label(fields), None


def _multi(f, v: str) -> list[str] | None:
    """A multi-label cell (values joined by 、，,/) as the declared values in order; None if one is unknown."""
    allowed = {norm_value(a): a for a in f.values}
    got = set()
    for part in MULTI_SPLIT.split(v):
        n = norm_value(part)
        if not n:
            continue
        if n not in allowed:
            return None
        got.add(allowed[n])
    return [a for a in f.values if a in got] or None


def _category(f, v: str) -> str | None:
    allowed = {norm_value(a): a for a in f.values}
    return allowed.get(norm_value(v))


class _Reader:
    """The per-table state: column lookup, scrubbing, counters."""

    def __init__(self, t: Task, path: Path, rows: list[dict], column_map: dict[str, str] | None, scrub: Scrub | None,
                 split: str, seed: int):
        self.t, self.path, self.scrub_fn = t, path, scrub
        self.split = split
        cols = getattr(rows, "columns", None)
        self.columns = set(cols) if cols else (set(rows[0].keys()) if rows else set())
        self.cmap = dict(column_map or {})
        self.rng = random.Random(f"{t.name}|{split}|{seed}|table")
        self.pii: Counter = Counter()
        self.values_scrubbed = 0
        self.missing: Counter = Counter()
        self._scrubbed: dict[str, tuple[str | None, dict[str, int]]] = {}

    def col(self, name: str, alias: str | None = None) -> str:
        """The column of a task name: mapped, else the name, else its label (a field's ``label``, a key's name)."""
        if name in self.cmap:
            return self.cmap[name]
        if name not in self.columns and alias and alias in self.columns:
            return alias
        return name

    def field_col(self, n: str) -> str:
        return self.col(n, self.t.spec.fields[n].label)

    def key_col(self, key: str) -> str:
        return self.col(key, next(f.zh for f in self.t.answer_fields if f.key == key))

    def scrub(self, text: str, where: str) -> str:
        if self.scrub_fn is None or not text:
            return text
        got = self._scrubbed.get(text)  # columns such as city or industry repeat a few values many times
        if got is None:
            got = self.scrub_fn(text)
            if len(text) <= 200:
                self._scrubbed[text] = got
        new, counts = got
        if new is None:
            raise BadRow(f"{where} holds personal information (pii mode drop)")
        if counts:
            self.pii.update({k: int(v) for k, v in counts.items() if v})
        if new != text:
            self.values_scrubbed += 1
        return new


def _safe(scrub: Scrub | None, reason: str) -> str:
    """A quarantine reason quotes the bad cell: through the PII step too (a shifted row may put a name there)."""
    if scrub is None:
        return reason
    return scrub(reason)[0] or "the row holds personal information (pii mode drop)"


def _check_columns(r: _Reader, prompt_mode: bool, have_answer: bool) -> None:
    t, path = r.t, r.path
    if not prompt_mode:
        missing = [r.field_col(n) for n, f in t.spec.fields.items() if f.required and r.field_col(n) not in r.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (map them with column_map or give a prompt column)")
    if prompt_mode and not have_answer:
        raise ValueError(f"{path}: prompt mode needs the answer column {r.key_col(t.primary_key)!r}")
    if not have_answer and not t.has_rules:
        raise ValueError(f"{path}: the task {t.name!r} has no rules, so the table needs its answer column "
                         f"{r.key_col(t.primary_key)!r}")


def _check_label_column(r: _Reader, rows: list[dict]) -> None:
    """Refuse a label column whose values are mostly outside the label set (a wrong column or task)."""
    t = r.t
    c = r.key_col(t.primary_key)
    f = next(a for a in t.answer_fields if a.key == t.primary_key)
    cells = [str(row.get(c)).strip() for row in rows if not is_missing(row.get(c))]
    bad = Counter(v for v in cells if _category(f, v) is None)
    if cells and sum(bad.values()) > MAX_BAD_SHARE * len(cells):
        shown = ", ".join(f"{v!r} ({n} rows)" for v, n in bad.most_common(5))
        raise ValueError(f"{r.path}: column {c!r}: {sum(bad.values())} of {len(cells)} labels are outside the "
                         f"spec's labels of {t.primary_key!r}: {shown} (allowed: {', '.join(f.values)}); "
                         "is it the right column (column_map) and task?")


def read_task_table(task: Task | str, path: str | Path, column_map: dict[str, str] | None = None, *,
                    split: str = "bank", seed: int = 0, limit: int | None = None, sheet: str | None = None,
                    scrub: Scrub | None = None, max_bad_share: float | None = MAX_BAD_SHARE) -> TableRecords:
    """Every row of a bank's table as a record (labelled, or unlabelled with ``target == "none"``) or a
    quarantined row; ValueError (one line naming the file) for a table that cannot be used as a whole.

    ``max_bad_share``: more bad rows than this share of the rows read is a table error (None: never)."""
    t = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    rows = read_table(path, sheet=sheet)
    r = _Reader(t, path, rows, column_map, scrub, split, seed)
    prompt_mode = r.col("prompt") in r.columns
    have_answer = r.key_col(t.primary_key) in r.columns
    _check_columns(r, prompt_mode, have_answer)
    if have_answer:
        _check_label_column(r, rows)
    records, quarantine, n_rows = [], [], 0
    for i, row in enumerate(rows):
        if limit is not None and len(records) >= limit:
            break
        n_rows += 1
        try:
            records.append(_row_record(r, i, row, prompt_mode, have_answer))
        except BadRow as e:
            quarantine.append({"file": str(path), "row": row_label(path, i, rows), "reason": _safe(scrub, str(e))})
    if max_bad_share is not None and quarantine and len(quarantine) > max_bad_share * n_rows:
        raise ValueError(f"{path}: {len(quarantine)} of {n_rows} rows cannot be read (first: {quarantine[0]['row']}: "
                         f"{quarantine[0]['reason']}); is it the right table, task and column_map? (banklm task "
                         "check lists every problem)")
    targets = Counter(rec["target"] for rec in records)
    sources = Counter(json.loads(rec["meta"])["label_source"] for rec in records)
    stats = {"rows": n_rows, "records": len(records), "quarantined": len(quarantine),
             "unlabelled": targets.get(TARGET_NONE, 0), "targets": dict(targets), "label_source": dict(sources),
             "missing_values": dict(r.missing), "pii": {"counts": dict(sorted(r.pii.items())),
                                                        "values_scrubbed": r.values_scrubbed}}
    return TableRecords(records, quarantine, stats)


def from_table(
    task: Task | str,
    path: str | Path,
    column_map: dict[str, str] | None = None,
    *,
    split: str = "bank",
    seed: int = 0,
    limit: int | None = None,
    skip_bad_rows: bool = False,
    unlabelled: bool = False,
    sheet: str | None = None,
    scrub: Scrub | None = None,
) -> list[dict]:
    """Turn a bank's own labelled table into scenario records (see the module docstring for what a row becomes).

    ``column_map`` maps the task's names (input field names, answer keys such as ``decision``, ``grade``,
    ``reason``, or ``prompt``) to the table's column names; unmapped names are looked up under their own name,
    then under the field's ``label`` (an answer key: its written name). Two modes:

    * field mode (default): every input field is read (typed: numbers may carry units such as ``%``/``元``/``次``
      and thousands separators; yes/no fields accept 是/否/true/1), the prompt is rendered with the task's
      renderer; the label comes from the table's label column when it exists (``meta.label_source`` ``table``),
      else from the rules (``rules``).
    * prompt mode (``prompt`` mapped or a ``prompt`` column present): the user message is that column verbatim
      and the label column is required; answer keys without a column have no target.

    Records get ids ``{task}-{split}-{row:06d}``. A bad row raises ValueError naming the file, row and column
    (``skip_bad_rows``: it is left out instead, as ``banklm.tasks.check.example_prompts`` does;
    ``banklm.tasks.check.check_table`` lists them; the corpus build quarantines them). Rows with an empty label
    are left out unless ``unlabelled`` (then they are records without an answer, ``target == "none"``).
    """
    res = read_task_table(task, path, column_map, split=split, seed=seed, limit=limit, sheet=sheet, scrub=scrub,
                          max_bad_share=None)
    if res.quarantine and not skip_bad_rows:
        q = res.quarantine[0]
        raise ValueError(f"{q['file']}: {q['row']}: {q['reason']}")
    return [rec for rec in res.records if unlabelled or rec["target"] != TARGET_NONE]


def _read_fields(r: _Reader, i: int, row: dict) -> Fields:
    t = r.t
    fields: Fields = {}
    for n, f in t.spec.fields.items():
        c = r.field_col(n)
        v = row.get(c)
        if is_missing(v):
            if not f.required:
                fields[n] = None  # never a default: the prompt says 未提供
                r.missing[n] += 1
                continue
            raise BadRow(f"column {c!r} is empty")
        try:
            x = coerce_value(f, v, strict=False)
        except ValueError as e:
            raise BadRow(f"column {c!r}: {e}") from None
        if f.type == "text":
            x = r.scrub(x, f"column {c!r}")
        elif f.type == "list":
            for rec in x:
                for sub_name, sub in (f.fields or {}).items():
                    if sub.type == "text" and isinstance(rec.get(sub_name), str):
                        rec[sub_name] = r.scrub(rec[sub_name], f"column {c!r}")
        fields[n] = x
    if t.derive is not None:
        t.derive(fields)
    return fields


def _table_value(r: _Reader, row: dict, key: str) -> Any:
    """The bank's value of an answer key (None when the table has no value); BadRow when it is not allowed."""
    f = next(a for a in r.t.answer_fields if a.key == key)
    c = r.key_col(key)
    v = row.get(c)
    if is_missing(v):
        return None
    v = str(v).strip()
    if f.kind == "multi":
        parsed = _multi(f, v)
        if parsed is None:
            raise BadRow(f"column {c!r}: {v!r} is not a list of {list(f.values)}")
        return parsed
    if f.values is not None:
        got = _category(f, v)
        if got is None:
            raise BadRow(f"column {c!r}: label {v!r} is not one of {list(f.values)}")
        return got
    v = r.scrub(v, f"column {c!r}")
    max_len = r.t.reason_max_length
    if max_len is not None and len(v) > max_len:
        raise BadRow(f"column {c!r}: the reason has {len(v)} characters, more than max_length {max_len}")
    return v


def _bank_answer(r: _Reader, row: dict, fields: Fields | None, rule_ans: dict | None) -> tuple[dict, bool]:
    """The answer keys with a target for a row the bank labelled, and whether the rules agree with its label."""
    t = r.t
    ans: dict[str, Any] = {t.primary_key: _table_value(r, row, t.primary_key)}
    agree = rule_ans is not None and t.primary_label(rule_ans) == ans[t.primary_key]
    for f in t.answer_fields:
        if f.key == t.primary_key:
            continue
        v = _table_value(r, row, f.key) if r.key_col(f.key) in r.columns else None
        if v is None and agree:
            v = rule_ans[f.key]  # the rules give the bank's label: their other keys and reason fit it
        if v is None and f.kind == "reason" and fields is not None and t.spec.summary is not None:
            v = t.spec.summary.render(t.spec.template_values(_banded(t, fields)))
        if v is not None:
            ans[f.key] = v
    return ans, agree


def _banded(t: Task, fields: Fields) -> Fields:
    values = dict(fields)
    t.spec.derive(values)
    return values


def _row_record(r: _Reader, i: int, row: dict, prompt_mode: bool, have_answer: bool) -> dict:
    t = r.t
    meta: dict[str, Any] = {"source": str(r.path.name), "row": i}
    fields = None
    if prompt_mode:
        c = r.col("prompt")
        if is_missing(row.get(c)):
            raise BadRow(f"column {c!r} (the prompt) is empty")
        prompt = r.scrub(str(row[c]).strip(), f"column {c!r}")
    else:
        fields = _read_fields(r, i, row)
        prompt = t.render_prompt(fields, r.rng)
        meta.update(fields)
        keep = set(t.spec.model.evaluation.segments)
        for n, f in t.spec.fields.items():  # a hidden column (a name, a phone number) is not copied along
            if not f.show and not f.protected and n not in keep:
                meta[n] = None
    rule_ans, undecided = rule_answer(t, fields) if fields is not None and t.has_rules else (None, None)
    if rule_ans is not None:
        meta["branch"] = rule_ans["rule"]
    elif undecided and t.has_rules and fields is not None:
        meta["rules_undecided"] = undecided
    rid = f"{t.name}-{r.split}-{i:06d}"
    if have_answer and is_missing(row.get(r.key_col(t.primary_key))):
        meta["label_source"] = "none"
        return {"id": rid, "task": t.name, "messages": t.messages(prompt), "label": None, "gold": "",
                "meta": json.dumps(meta, ensure_ascii=False, default=str), "target": TARGET_NONE}
    if have_answer:
        ans, agree = _bank_answer(r, row, fields, rule_ans)
        meta["label_source"] = "table"
        if rule_ans is not None:
            meta["rules_agree"] = agree
    elif rule_ans is not None:
        ans = {k: rule_ans[k] for k in t.answer_keys}
        meta["label_source"] = "rules"
    else:
        raise BadRow(f"no label column and the rules cannot label the row: {undecided}")
    keys = []
    for k in t.answer_keys:  # the answer up to the first key without a value
        if k not in ans:
            break
        keys.append(k)
    if t.primary_key not in keys:
        gap = next(k for k in t.answer_keys if k not in ans)
        raise BadRow(f"no value for {gap!r} (column {r.key_col(gap)!r}), which the answer writes before the label "
                     f"{t.primary_key!r}, and the rules do not give the bank's label")
    target = TARGET_ANSWER if len(keys) == len(t.answer_keys) else TARGET_LABELS
    gold = {k: ans[k] for k in keys}
    text = t.format_answer(gold, None if target == TARGET_ANSWER else keys)
    return {"id": rid, "task": t.name, "messages": t.messages(prompt, text), "label": gold[t.primary_key],
            "gold": json.dumps(gold, ensure_ascii=False), "meta": json.dumps(meta, ensure_ascii=False, default=str),
            "target": target}
