"""Sequence-level distillation: the teacher answers a prompt pool, a checker keeps the good answers.

Works across tokenizers (the student only ever sees text). Two-stage filter, as in Fin-R1's data
pipeline: (1) the answer must parse with the task's parser (``strict`` = exactly the documented layout,
else the tolerant parser), (2) where a reference exists it must agree with it: the record's gold answer
and/or the task's rule label recomputed from the input fields kept in ``meta``. ``match`` decides what
agreeing means: ``label`` (the primary label: credit decision, AML typology, audit category) or
``fields`` (every categorical field, e.g. decision *and* risk grade). Prompts without any reference (a
bank's unlabelled records) are kept when they parse, unless ``require_reference``.

Every rejection has a reason (``unparseable``, ``not_strict_format``, ``disagrees_with_gold``,
``disagrees_with_rule``, ``no_reference``); the stats give the yield overall and per task.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from banklm.finetune.models import load_model, pick_device
from banklm.finetune.tokenizer import load_tokenizer

from banklm.evaluation.generate import generate
from banklm.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from banklm.tasks import all_tasks, get_task
from banklm.tasks.base import iter_user_messages
from banklm.tasks.tables import rule_answer

REASONS = ("unparseable", "not_strict_format", "disagrees_with_gold", "disagrees_with_rule", "no_reference")
MATCHES = ("label", "fields")


def _loads(x) -> dict | None:
    if isinstance(x, dict):
        return x
    if not x:
        return None
    try:
        v = json.loads(x)
    except (TypeError, ValueError):
        return None
    return v if isinstance(v, dict) else None


def references(record: dict) -> dict:
    """``{"gold": answer dict or None, "rule": answer dict or None}`` for a scenario record."""
    task = get_task(record["task"])
    gold = _loads(record.get("gold"))
    fields = task.fields_from_meta(record.get("meta") or {}) if record.get("meta") else None
    # a bank's row with a missing value: no rule answer when a rule that reads it might have fired
    rule = rule_answer(task, fields)[0] if fields is not None and task.has_rules else None
    return {"gold": gold, "rule": {k: rule[k] for k in task.answer_keys} if rule else None}


def _agrees(task, parsed: dict, ref: dict, match: str) -> bool:
    if match == "label":
        return task.primary_label(parsed) == task.primary_label(ref)
    keys = [f.key for f in task.answer_fields if f.values is not None and f.key in ref]  # a bank's gold may lack some
    return all(parsed.get(k) == ref.get(k) for k in keys)


def check_answer(task, text: str | None, *, gold: dict | None = None, rule: dict | None = None,
                 strict: bool = True, match: str = "label", require_reference: bool = False) -> tuple[bool, str | None]:
    """``(keep, reason)`` for one generated answer; ``reason`` is None when kept."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    task = get_task(task)
    parsed = task.parse(text)
    if parsed is None:
        return False, "unparseable"
    if strict and task.parse(text, strict=True) is None:
        return False, "not_strict_format"
    if gold is not None and not _agrees(task, parsed, gold, match):
        return False, "disagrees_with_gold"
    if rule is not None and not _agrees(task, parsed, rule, match):
        return False, "disagrees_with_rule"
    if require_reference and gold is None and rule is None:
        return False, "no_reference"
    return True, None


def filter_answers(records: Sequence[dict], outputs: Sequence[str], *, strict: bool = True, match: str = "label",
                   require_reference: bool = False) -> tuple[list[dict], list[dict], dict]:
    """Check each teacher output against its record: ``(kept records, rejected rows, stats)``.

    A kept record is the input record with its assistant turn replaced by the teacher's answer (``label``
    and ``gold`` then describe that answer); a rejected row is ``{id, task, reason, output}``.
    """
    if len(records) != len(outputs):
        raise ValueError(f"{len(records)} records but {len(outputs)} outputs")
    kept, rejected = [], []
    by_task: dict[str, Counter] = {}
    for rec, out in zip(records, outputs, strict=True):
        task = get_task(rec["task"])
        refs = references(rec)
        ok, reason = check_answer(task, out, gold=refs["gold"], rule=refs["rule"], strict=strict, match=match,
                                  require_reference=require_reference)
        c = by_task.setdefault(task.name, Counter())
        c["prompts"] += 1
        if ok:
            c["kept"] += 1
            parsed = task.parse(out)
            kept.append({**rec, "messages": [*iter_user_messages(rec), {"role": "assistant", "content": out}],
                         "label": task.primary_label(parsed), "gold": json.dumps(parsed, ensure_ascii=False),
                         "source": "teacher"})
        else:
            c[reason] += 1
            rejected.append({"id": rec.get("id"), "task": task.name, "reason": reason, "output": out})
    stats = _stats(by_task)
    stats.update({"strict": strict, "match": match, "require_reference": require_reference})
    return kept, rejected, stats


def _stats(by_task: dict[str, Counter]) -> dict:
    def one(c: Counter) -> dict:
        n = c["prompts"]
        return {"prompts": n, "kept": c["kept"], "yield": c["kept"] / n if n else 0.0,
                "rejected": {r: c[r] for r in REASONS if c[r]}}

    total = sum(by_task.values(), Counter())
    return {**one(total), "by_task": {t: one(c) for t, c in sorted(by_task.items())}}


def load_prompt_records(path: str | os.PathLike,
                        tasks: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Unlabelled prompts from a JSONL file: ``{"task", "prompt"}`` or ``{"task", "messages"}`` (+ optional
    ``id``, ``meta``, ``gold``). ``tasks``: the task names accepted (default: the built-in and registered
    tasks, e.g. a recipe's own specs). Returns ``(records, problems)``; a problem is ``{line, reason}`` (nothing
    is dropped silently)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    allowed = list(tasks) if tasks is not None else list(all_tasks())
    records, problems = [], []
    for i, row in enumerate(read_jsonl(path), start=1):
        if not isinstance(row, dict):
            problems.append({"line": i, "reason": "not a JSON object"})
            continue
        if row.get("task") not in allowed:
            problems.append({"line": i, "reason": f"task {row.get('task')!r} is not one of {', '.join(allowed)}"})
            continue
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            messages = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row.get("messages"), list) and any(
                isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
                for m in row["messages"]):
            messages = [m for m in row["messages"] if isinstance(m, dict) and m.get("role") != "assistant"]
        else:
            problems.append({"line": i, "reason": "no 'prompt' string or 'messages' with a user turn"})
            continue
        rec = {"id": str(row.get("id", f"{path.stem}-{i:06d}")), "task": row["task"], "messages": messages}
        for k in ("gold", "meta"):
            if row.get(k) is not None:
                rec[k] = row[k] if isinstance(row[k], str) else json.dumps(row[k], ensure_ascii=False)
        records.append(rec)
    return records, problems


def generate_and_filter(teacher_dir: str | os.PathLike, records: Sequence[dict], out_dir: str | os.PathLike, *,
                        device: str = "auto", batch_size: int = 64, max_new_tokens: int = 128, strict: bool = True,
                        match: str = "label", require_reference: bool = False, dtype="auto",
                        quantization: str | None = None) -> dict:
    """Teacher greedy-generates an answer per record (batched, :func:`banklm.evaluation.generate.generate`),
    the checker filters; writes ``kept.jsonl``, ``rejected.jsonl`` and ``stats.json`` into ``out_dir``.
    Returns the stats (with the generation throughput)."""

    if not records:
        raise ValueError("sequence-level distillation got an empty prompt pool")
    device = pick_device(device)
    if quantization and not device.startswith("cuda"):
        quantization = None
    teacher = load_model(teacher_dir, device=device, dtype=dtype, quantization=quantization)
    tok = load_tokenizer(teacher_dir)
    records = list(records)
    gen = generate(teacher, tok, [iter_user_messages(r) for r in records], max_new_tokens, batch_size)
    kept, rejected, stats = filter_answers(records, list(gen), strict=strict, match=match,
                                           require_reference=require_reference)
    stats["generation"] = gen.stats()
    stats["teacher"] = str(teacher_dir)
    out_dir = Path(out_dir)
    atomic_write_jsonl(out_dir / "kept.jsonl", kept)
    atomic_write_jsonl(out_dir / "rejected.jsonl", rejected)
    atomic_write_json(out_dir / "stats.json", stats)
    return stats
