"""A labelled table (CSV, Excel export, JSONL, Parquet) turned into task records."""

from __future__ import annotations

import csv
import json
import random
import unicodedata
from pathlib import Path
from typing import Any

Fields = dict[str, Any]

# ----------------------------------------------------------------------------------------------
# number formatting (deterministic: a fact is always written the same way, so reasons can copy it)
from banklm.tasks.base import Task, norm_value
from banklm.tasks.registry import get_task


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency of datasets
        pd = None
    if suffix in (".parquet", ".pq"):
        if pd is not None:
            return pd.read_parquet(path).to_dict(orient="records")
        from datasets import Dataset  # pragma: no cover

        return list(Dataset.from_parquet(str(path)))  # pragma: no cover
    if suffix not in (".csv", ".tsv", ".txt"):
        raise ValueError(f"{path}: unsupported table format {suffix!r} (use .csv, .tsv or .parquet)")
    raw = path.read_bytes()
    for enc in ("utf-8-sig", "gb18030"):
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise ValueError(f"{path}: cannot decode as UTF-8 or GB18030")
    delim = "\t" if suffix == ".tsv" else ","
    return [dict(r) for r in csv.DictReader(text.splitlines(), delimiter=delim)]


_TRUE = {"是", "有", "true", "yes", "y", "1", "1.0", "t", "通过", "一致", "已披露", "正常"}
_FALSE = {"否", "无", "false", "no", "n", "0", "0.0", "f", "未通过", "不一致", "未披露", "异常"}


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and v != v:
        return True
    return isinstance(v, str) and not v.strip()


def _coerce(task: Task, name: str, v: Any, where: str) -> Any:
    if name in task.bool_fields:
        if isinstance(v, bool):
            return v
        s = str(v).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ValueError(f"{where}: cannot read {v!r} as yes/no")
    if name in task.numeric_fields:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
        s = unicodedata.normalize("NFKC", str(v)).replace(",", "").strip()
        mult = 1.0
        for unit in ("万元", "元", "%", "次", "笔", "个", "倍", "岁", "年", "月"):
            if s.endswith(unit):
                s = s[: -len(unit)]
                if unit == "万元" and task.extra.get("yuan_fields") and name in task.extra["yuan_fields"]:
                    mult = 10000.0
                break
        try:
            x = float(s) * mult
        except ValueError:
            raise ValueError(f"{where}: cannot read {v!r} as a number") from None
        return int(x) if x.is_integer() else x
    return str(v).strip()


def from_table(
    task: Task | str,
    path: str | Path,
    column_map: dict[str, str] | None = None,
    *,
    split: str = "bank",
    seed: int = 0,
    limit: int | None = None,
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
    ValueError naming the file, row and column.
    """

    t = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    rows = _read_table(path)
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
    rng = random.Random(f"{t.name}|{split}|{seed}|table")
    out = []
    for i, row in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        where = f"{path}: row {i + 2 if path.suffix.lower() != '.parquet' else i}"
        meta: dict[str, Any] = {"source": str(path.name), "row": i}
        fields = None
        if not prompt_mode:
            fields = {}
            for n in t.field_names:
                v = row.get(col(n))
                if _is_missing(v):
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
        rule_ans = t.label(fields) if fields is not None else None
        if have_answer:
            ans = {}
            for f in t.answer_fields:
                v = row.get(col(f.key))
                if _is_missing(v):
                    if rule_ans is not None:
                        ans[f.key] = rule_ans[f.key]
                        continue
                    if f.values is None:
                        ans[f.key] = "见行内标注"
                        continue
                    raise ValueError(f"{where}: column {col(f.key)!r} is empty")
                v = str(v).strip()
                if f.values is not None:
                    allowed = {norm_value(a): a for a in f.values}
                    if norm_value(v) not in allowed:
                        raise ValueError(f"{where}, column {col(f.key)!r}: {v!r} not in {list(f.values)}")
                    v = allowed[norm_value(v)]
                ans[f.key] = v
            # a rule-derived reason only fits when the table agrees with the rules on the label
            if rule_ans is not None and _is_missing(row.get(col("reason"), None)) and "reason" in ans:
                if t.primary_label(ans) != t.primary_label(rule_ans):
                    ans["reason"] = "见行内标注"
            meta["label_source"] = "table"
            if rule_ans is not None:
                meta["branch"] = rule_ans["rule"]
                meta["rules_agree"] = t.primary_label(ans) == t.primary_label(rule_ans)
        else:
            assert rule_ans is not None
            ans = {k: rule_ans[k] for k in t.answer_keys}
            meta["label_source"] = "rules"
            meta["branch"] = rule_ans["rule"]
        out.append(
            {
                "id": f"{t.name}-{split}-{i:06d}",
                "task": t.name,
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": t.format_answer(ans)},
                ],
                "label": t.primary_label(ans),
                "gold": json.dumps(ans, ensure_ascii=False),
                "meta": json.dumps(meta, ensure_ascii=False, default=str),
            }
        )
    return out
