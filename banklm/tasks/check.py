"""``banklm task check`` as library functions: a spec, a bank's table against it, example prompts.

* :func:`check_spec` loads and checks a spec (raising :class:`~banklm.tasks.spec.SpecError`, one line) and
  returns its warnings (a rule reading a protected attribute or a field the prompt does not show);
* :func:`check_table` reads a table (CSV/TSV/Parquet) and lists what does not fit the spec, by column: missing
  columns, empty required cells, values outside a category, numbers / yes-no / dates that do not parse,
  numbers out of range, labels outside the label set, reasons longer than allowed; each with its count and
  the first row numbers (a CSV's line numbers, the header being line 1; a Parquet file's row index);
* :func:`example_prompts` renders a few examples with their answers (from the table, the sampler, or the
  spec's examples).

Whatever may hold personal data (table values, prompts, answers) goes through ``scrub`` (a ``str -> str``
function, e.g. the corpora's PII scrubber) before it is returned, so a caller can print it.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banklm.tasks.base import MULTI_SPLIT, Task, norm_value
from banklm.tasks.registry import TASKS, get_task, task_from_spec
from banklm.tasks.spec import (
    NUMERIC_TYPES,
    SpecError,
    TaskSpec,
    coerce_value,
    example_value,
    is_missing,
)
from banklm.tasks.table_files import read_table, row_label
from banklm.tasks.tables import from_table

Scrub = Callable[[str], str]
MAX_ROWS_LISTED = 10
MAX_VALUES_LISTED = 3


def _task(spec: Task | TaskSpec | str | os.PathLike) -> Task:
    """A Task from a Task, a checked spec, a spec file, or the name of a built-in / registered task."""
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, TaskSpec):
        return task_from_spec(spec)
    if isinstance(spec, str) and not spec.endswith((".yaml", ".yml")) and os.sep not in spec and "/" not in spec:
        return get_task(spec)
    return task_from_spec(spec)


def _same(x: str) -> str:
    return x


# ------------------------------------------------------------------------------------------------ spec

@dataclass
class SpecCheck:
    task: Task
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return True  # an invalid spec raises SpecError

    def lines(self) -> list[str]:
        t = self.task
        n_rules = len(t.rules)
        out = [f"{t.spec.source}: task {t.name!r} ({t.title}) is valid: {len(t.field_names)} fields, "
               f"{n_rules} rules, answer {'；'.join(f.zh for f in t.answer_fields)}"]
        out += [f"{t.spec.source}: warning: {w}" for w in self.warnings]
        return out


def check_spec(spec: Task | TaskSpec | str | os.PathLike) -> SpecCheck:
    """Check a spec (file, checked spec, or task): SpecError on the first problem (a bank's spec named like a
    built-in task included), else its warnings."""
    t = _task(spec)
    if t.name in TASKS and t.spec.text != TASKS[t.name].spec.text:
        raise SpecError(f"{t.spec.source}: name: {t.name!r} is a built-in task; give the bank's task another name "
                        f"(built-ins: {', '.join(TASKS)})")
    return SpecCheck(t, list(t.spec.warnings))


# ------------------------------------------------------------------------------------------------ table

@dataclass
class TableProblem:
    kind: str  # missing_column, empty, outside_category, not_a_number, not_whole_number, out_of_range,
    #            not_yes_no, not_a_date, bad_records, bad_label, reason_too_long
    column: str
    name: str  # the field or answer key the column holds
    count: int = 0
    rows: list[int] = field(default_factory=list)  # the first MAX_ROWS_LISTED row numbers
    values: list[str] = field(default_factory=list)  # the first few bad values (scrubbed)
    detail: str = ""

    def line(self, source: str) -> str:
        what = {
            "missing_column": "missing column",
            "empty": "empty required cells",
            "outside_category": "values outside the category",
            "not_a_number": "values that are not numbers",
            "not_whole_number": "values that are not whole numbers",
            "out_of_range": "numbers out of range",
            "not_yes_no": "values that are not yes/no",
            "not_a_date": "values that are not dates",
            "bad_records": "cells that are not lists of records",
            "bad_label": "labels outside the label set",
            "reason_too_long": "reasons longer than allowed",
        }.get(self.kind, self.kind)
        col = f"column {self.column!r}" + (f" ({self.name})" if self.name != self.column else "")
        if self.kind == "missing_column":
            return f"{source}: {col}: missing column" + (f" ({self.detail})" if self.detail else "")
        rows = ", ".join(str(r) for r in self.rows) + (", ..." if self.count > len(self.rows) else "")
        vals = f"; e.g. {', '.join(repr(v) for v in self.values)}" if self.values else ""
        extra = f"; {self.detail}" if self.detail else ""
        return f"{source}: {col}: {self.count} {what} (rows {rows}){vals}{extra}"


@dataclass
class TableCheck:
    path: str
    rows: int
    columns: dict[str, str]  # field / answer key -> the column read
    problems: list[TableProblem]
    unused_columns: list[str]
    mode: str  # "fields" or "prompt"
    unlabelled: int = 0  # rows whose label cell is empty: unlabelled data (teacher pool), not a problem

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + max(p.count, 1)
        return out

    def lines(self) -> list[str]:
        head = (f"{self.path}: {self.rows} rows"
                + (f" ({self.unlabelled} unlabelled: kept apart for the distillation teacher, never trained on)"
                   if self.unlabelled else "")
                + f", {'no problems' if self.ok else f'{len(self.problems)} problems'}"
                + (f"; unused columns: {', '.join(self.unused_columns)}" if self.unused_columns else ""))
        return [head] + [p.line(self.path) for p in self.problems]


def _kind_of_error(ftype: str, msg: str) -> str:
    if ftype == "category":
        return "outside_category"
    if ftype in NUMERIC_TYPES:
        if "whole number" in msg:
            return "not_whole_number"
        if "minimum" in msg or "maximum" in msg:
            return "out_of_range"
        return "not_a_number"
    if ftype == "boolean":
        return "not_yes_no"
    if ftype == "date":
        return "not_a_date"
    if ftype == "list":
        return "bad_records"
    return "invalid"


def check_table(spec: Task | TaskSpec | str | os.PathLike, table_path: str | os.PathLike,
                column_map: dict[str, str] | None = None, *, scrub: Scrub | None = None,
                sheet: str | None = None) -> TableCheck:
    """Check a bank's table against a task: every cell read as the spec's type, every label in its set.

    ``column_map`` maps the task's names (fields, answer keys, ``prompt``) to column names; unmapped names are
    looked up under their own name (a field's ``label`` works too). Values quoted in the result pass through
    ``scrub``. Raises ValueError when the file cannot be read."""
    t = _task(spec)
    scrub = scrub or _same
    path = Path(table_path)
    if not path.is_file():
        raise ValueError(f"{path}: table not found")
    rows = read_table(path, sheet=sheet)
    columns_present = list(rows.columns) or (list(rows[0].keys()) if rows else [])
    present = set(columns_present)
    cmap = dict(column_map or {})

    def col(name: str, label: str | None = None) -> str:
        if name in cmap:
            return cmap[name]
        if name not in present and label and label in present:
            return label
        return name

    problems: dict[tuple[str, str], TableProblem] = {}

    def add(kind: str, column: str, name: str, row: int | None = None, value: Any = None, detail: str = ""):
        p = problems.setdefault((kind, column), TableProblem(kind, column, name, detail=detail))
        if row is None:
            return
        p.count += 1
        if len(p.rows) < MAX_ROWS_LISTED:
            p.rows.append(row)
        if value is not None and len(p.values) < MAX_VALUES_LISTED:
            shown = scrub(str(value))
            if shown not in p.values:
                p.values.append(shown)

    prompt_mode = col("prompt") in present
    used: dict[str, str] = {}
    fields = t.spec.fields
    if not prompt_mode:
        for n, f in fields.items():
            c = col(n, f.label)
            if c in present:
                used[n] = c
            elif f.required:
                add("missing_column", c, n, detail=f"required field {n!r}, a {f.type}")
    else:
        used["prompt"] = col("prompt")
    answer_cols = {}
    for af in t.answer_fields:
        c = col(af.key, af.zh)
        if c in present:
            answer_cols[af.key] = c
            used[af.key] = c
    if t.primary_key not in answer_cols and (prompt_mode or not t.has_rules):
        why = "prompt mode needs the labels" if prompt_mode else "the task has no rules to label the rows"
        add("missing_column", col(t.primary_key, t._key(t.primary_key).zh), t.primary_key, detail=why)
    reason_max = t.reason_max_length

    def number(i: int) -> int:
        return int(row_label(path, i, rows).split()[-1])

    label_col = answer_cols.get(t.primary_key)
    unlabelled = 0
    for i, row in enumerate(rows):
        rn = number(i)
        if label_col is not None and is_missing(row.get(label_col)):
            unlabelled += 1  # an empty label makes the row unlabelled data (banklm.tasks.tables), not a bad row
        if not prompt_mode:
            for n, c in used.items():
                if n not in fields:
                    continue
                f = fields[n]
                v = row.get(c)
                if is_missing(v):
                    if f.required:
                        add("empty", c, n, rn)
                    continue
                try:
                    coerce_value(f, v, strict=True)
                except ValueError as e:
                    detail = ""
                    if f.type == "category":
                        detail = "allowed: " + ", ".join(f.values or [])
                    elif f.min is not None or f.max is not None:
                        detail = f"range: {f.min if f.min is not None else '-∞'} to {f.max if f.max is not None else '∞'}"
                    add(_kind_of_error(f.type, str(e)), c, n, rn, v, detail)
        for key, c in answer_cols.items():
            af = t._key(key)
            v = row.get(c)
            if is_missing(v):
                continue
            s = str(v).strip()
            if af.values is None:
                if reason_max is not None and len(s) > reason_max:
                    add("reason_too_long", c, key, rn, None, f"max_length {reason_max}")
                continue
            allowed = {norm_value(a) for a in af.values}
            parts = [p for p in MULTI_SPLIT.split(s)] if af.kind == "multi" else [s]
            if any(norm_value(p) not in allowed for p in parts if norm_value(p)):
                add("bad_label", c, key, rn, v, "allowed: " + ", ".join(af.values))
    known_cols = set(used.values())
    unused = [c for c in columns_present if c not in known_cols]
    return TableCheck(str(path), len(rows), used, list(problems.values()), unused,
                      "prompt" if prompt_mode else "fields", unlabelled)


# ------------------------------------------------------------------------------------------------ examples

def example_prompts(spec: Task | TaskSpec | str | os.PathLike, n: int = 3, *, table: str | os.PathLike | None = None,
                    column_map: dict[str, str] | None = None, seed: int = 0,
                    scrub: Scrub | None = None, sheet: str | None = None) -> list[dict]:
    """``n`` rendered examples: ``{"source", "system", "prompt", "answer", "rule"}`` (texts scrubbed).

    Fields come from the first rows of ``table`` that read cleanly (the answer from its label columns, else
    the rules), else from the task's sampler (one branch after another), else from the spec's examples and
    the fields' example values. ``answer`` is None when neither a table label nor a rule gives one."""
    t = _task(spec)
    scrub = scrub or _same
    rng = random.Random(f"banklm-task-check|{t.name}|{seed}")
    cases: list[tuple[str, dict]] = []  # (source, fields)
    if table is not None:
        try:
            # the first rows may be unlabelled (left out): read a few more than n
            recs = from_table(t, table, column_map, split="check", seed=seed, limit=max(20 * n, 60),
                              skip_bad_rows=True, sheet=sheet)[:n]
        except ValueError:
            recs = []  # check_table says what is wrong; fall back to the spec's own examples
        rows = read_table(Path(table), sheet=sheet) if recs else None  # exact row numbers
        out = []
        for r in recs:
            msgs = r["messages"]
            sys_msg = next((m["content"] for m in msgs if m["role"] == "system"), None)
            meta = json.loads(r["meta"])
            out.append({"source": f"{Path(table).name} {row_label(Path(table), meta.get('row', 0), rows)}",
                        "system": scrub(sys_msg) if sys_msg else None,
                        "prompt": scrub(next(m["content"] for m in msgs if m["role"] == "user")),
                        "answer": scrub(next(m["content"] for m in msgs if m["role"] == "assistant")),
                        "rule": meta.get("branch")})
        if out:
            return out
    if t.has_sampler and t.has_rules:
        for i in range(n):
            b = t.branches[i % len(t.branches)]
            cases.append((f"sampled ({b})", t.sample(rng, b, 0.0)))
    else:
        for i, ex in enumerate(t.spec.examples[:n]):
            cases.append((f"examples[{i}]", dict(ex)))
        if len(cases) < n:
            synth = {name: coerce_value(f, example_value(f), strict=False) for name, f in t.spec.fields.items()}
            t.spec.derive(synth)
            cases.append(("the fields' example values", synth))
    out = []
    for source, fields_ in cases[:n]:
        prompt = t.render_prompt(fields_, rng)
        answer, rule = None, None
        if t.has_rules:
            lab = t.label(fields_)
            rule = lab.pop("rule")
            answer = t.format_answer(lab)
        out.append({"source": source, "system": scrub(t.policy) if t.policy else None, "prompt": scrub(prompt),
                    "answer": scrub(answer) if answer is not None else None, "rule": rule})
    return out


def format_examples(examples: Sequence[dict]) -> list[str]:
    """Lines to print for :func:`example_prompts` output."""
    lines = []
    for i, ex in enumerate(examples, 1):
        lines.append(f"--- example {i} ({ex['source']}" + (f", rule {ex['rule']}" if ex.get("rule") else "") + ")")
        if ex.get("system"):
            lines.append(f"[system] {ex['system']}")
        lines.append(f"[user] {ex['prompt']}")
        lines.append(f"[answer] {ex['answer'] if ex['answer'] is not None else '(no rules: the label comes from the table)'}")
    return lines


__all__ = ["check_spec", "check_table", "example_prompts", "format_examples", "SpecCheck", "TableCheck",
           "TableProblem", "SpecError"]
