"""A labelled table (CSV, Excel export, JSONL, Parquet) turned into task records."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from banklm.tasks.base import MULTI_SPLIT, Task, norm_value
from banklm.tasks.registry import get_task
from banklm.tasks.spec import TABLE_REASON, coerce_value, is_missing
from banklm.tasks.table_files import read_table, row_label

Fields = dict[str, Any]


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


def _coerce(task: Task, name: str, v: Any, where: str) -> Any:
    try:
        return coerce_value(task.spec.fields[name], v, strict=False)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def from_table(
    task: Task | str,
    path: str | Path,
    column_map: dict[str, str] | None = None,
    *,
    split: str = "bank",
    seed: int = 0,
    limit: int | None = None,
    skip_bad_rows: bool = False,
) -> list[dict]:
    """Turn a bank's own labelled CSV/TSV/Parquet table into scenario records.

    ``column_map`` maps the task's names (input field names, answer keys such as ``decision``,
    ``grade``, ``reason``, or ``prompt``) to the table's column names; unmapped names are looked up
    under their own name. Two modes:

    * field mode (default): every input field of the task is read (typed: numbers may carry units
      such as ``%``/``元``/``次`` and thousands separators; yes/no fields accept 是/否/true/1), the
      prompt is rendered with the task's renderer, and the answer comes from the table's answer
      columns when the primary answer column exists (missing non-primary values and a missing reason
      fall back to the documented rules; ``meta.label_source`` says ``table`` or ``rules``); without
      answer columns the rules label the row.
    * prompt mode (``prompt`` mapped or a ``prompt`` column present): the user message is that
      column verbatim and every answer column except ``reason`` is required (reason defaults to
      ``见行内标注``).

    Records get ids ``{task}-{split}-{row:06d}``; values outside a field's allowed answer set raise
    ValueError naming the file, row and column (``skip_bad_rows``: such rows are left out instead, as
    ``banklm.tasks.check.example_prompts`` does; ``banklm.tasks.check.check_table`` lists them).
    """

    t = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    rows = read_table(path)
    cmap = dict(column_map or {})

    def col(name: str) -> str:
        return cmap.get(name, name)

    columns = set(rows[0].keys()) if rows else set()
    prompt_mode = col("prompt") in columns
    missing = [col(n) for n in t.field_names if col(n) not in columns and n not in t.optional_fields]
    if not prompt_mode and missing:
        raise ValueError(
            f"{path}: missing columns {missing} (map them with column_map or give a prompt column)"
        )
    have_answer = col(t.primary_key) in columns
    if prompt_mode and not have_answer:
        raise ValueError(f"{path}: prompt mode needs the answer column {col(t.primary_key)!r}")
    if not have_answer and not t.has_rules:
        raise ValueError(f"{path}: the task {t.name!r} has no rules, so the table needs its answer column "
                         f"{col(t.primary_key)!r}")
    rng = random.Random(f"{t.name}|{split}|{seed}|table")
    out = []
    for i, row in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(_row_record(t, path, i, row, col, rng, prompt_mode, have_answer, split))
        except ValueError:
            if not skip_bad_rows:
                raise
    return out


def _row_record(t: Task, path: Path, i: int, row: dict, col, rng: random.Random, prompt_mode: bool,
                have_answer: bool, split: str) -> dict:
    where = f"{path}: {row_label(path, i)}"
    meta: dict[str, Any] = {"source": str(path.name), "row": i}
    fields = None
    if not prompt_mode:
        fields = {}
        for n in t.field_names:
            v = row.get(col(n))
            if is_missing(v):
                if n in t.optional_fields:
                    fields[n] = t.optional_fields[n]
                    continue
                raise ValueError(f"{where}: column {col(n)!r} is empty")
            fields[n] = _coerce(t, n, v, f"{where}, column {col(n)!r}")
        if t.derive is not None:
            t.derive(fields)
        prompt = t.render_prompt(fields, rng)
        meta.update(fields)
    else:
        prompt = str(row[col("prompt")]).strip()
    rule_ans = t.label(fields) if fields is not None and t.has_rules else None
    if have_answer:
        ans = {}
        for f in t.answer_fields:
            v = row.get(col(f.key))
            if is_missing(v):
                if rule_ans is not None:
                    ans[f.key] = rule_ans[f.key]
                    continue
                if f.values is None:
                    ans[f.key] = TABLE_REASON
                    continue
                raise ValueError(f"{where}: column {col(f.key)!r} is empty")
            v = str(v).strip()
            if f.kind == "multi":
                parsed = _multi(f, v)
                if parsed is None:
                    raise ValueError(f"{where}, column {col(f.key)!r}: {v!r} is not a list of {list(f.values)}")
                ans[f.key] = parsed
                continue
            if f.values is not None:
                allowed = {norm_value(a): a for a in f.values}
                if norm_value(v) not in allowed:
                    raise ValueError(f"{where}, column {col(f.key)!r}: {v!r} not in {list(f.values)}")
                v = allowed[norm_value(v)]
            ans[f.key] = v
        # a rule-derived reason only fits when the table agrees with the rules on the label
        rk = t.reason_key
        if rule_ans is not None and rk is not None and is_missing(row.get(col(rk), None)):
            if t.primary_label(ans) != t.primary_label(rule_ans):
                ans[rk] = TABLE_REASON
        meta["label_source"] = "table"
        if rule_ans is not None:
            meta["branch"] = rule_ans["rule"]
            meta["rules_agree"] = t.primary_label(ans) == t.primary_label(rule_ans)
    else:
        assert rule_ans is not None
        ans = {k: rule_ans[k] for k in t.answer_keys}
        meta["label_source"] = "rules"
        meta["branch"] = rule_ans["rule"]
    return {
        "id": f"{t.name}-{split}-{i:06d}",
        "task": t.name,
        "messages": t.messages(prompt, t.format_answer(ans)),
        "label": t.primary_label(ans),
        "gold": json.dumps(ans, ensure_ascii=False),
        "meta": json.dumps(meta, ensure_ascii=False, default=str),
    }
