"""Shared machinery of the scenario tasks: rule engine, answer layout, tolerant parser, table loader.

A task is a list of ordered :class:`Rule` objects (the first rule whose condition holds decides the
answer; the last rule is the catch-all default), an answer layout (:class:`AnswerField` list, rendered
as ``键：值；键：值；理由：…``) and a prompt renderer. Each concrete task (``credit``, ``aml``,
``audit``) documents its rules in its module docstring; ``docs/tasks.md`` collects them.

Answer dicts use English keys (``decision``/``grade``/``reason`` for credit, etc.).
``Task.label(fields)`` returns the answer dict plus ``"rule"`` (the branch that fired);
``Task.gold(fields)`` returns the answer dict alone, which is exactly what ``Task.parse`` returns for
``Task.format_answer(gold)``.
"""

from __future__ import annotations

import csv
import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Fields = dict[str, Any]

# ----------------------------------------------------------------------------------------------
# number formatting (deterministic: a fact is always written the same way, so reasons can copy it)


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


_FW_DIGITS = str.maketrans("0123456789%.", "０１２３４５６７８９％．")


def to_fullwidth_digits(text: str) -> str:
    """Rewrite ASCII digits, '%' and '.' as their full-width forms (robustness perturbation)."""
    return text.translate(_FW_DIGITS)


# Full-width ASCII (U+FF01-U+FF5E) -> half-width, except the Chinese punctuation the tasks are written in.
KEEP_FULLWIDTH = "，：；（）！？"
FULLWIDTH_TO_ASCII = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F) if chr(cp) not in KEEP_FULLWIDTH}
FULLWIDTH_TO_ASCII[0x3000] = 0x20  # ideographic space


def fold_fullwidth(text: str) -> str:
    """``１２．５％`` -> ``12.5%``: the input canonicalisation the corpora apply to training text.

    Serving must apply the same folding to prompts (the evaluation does), or a model that never saw a
    full-width digit in training meets one at inference (train/serve skew)."""
    return text.translate(FULLWIDTH_TO_ASCII)


# ----------------------------------------------------------------------------------------------
# sampling helpers: "difficulty" in [0, 1] shrinks the distance to a rule threshold


def gap(rng: random.Random, near: float, far: float, difficulty: float) -> float:
    """A distance from a threshold: uniform in [near, near + (far - near) * (1 - difficulty)]."""
    d = min(max(difficulty, 0.0), 1.0)
    return rng.uniform(near, near + (far - near) * (1.0 - d))


def int_gap(rng: random.Random, far: int, difficulty: float) -> int:
    """An integer distance in [0, round(far * (1 - difficulty))]."""
    d = min(max(difficulty, 0.0), 1.0)
    return rng.randint(0, max(0, round(far * (1.0 - d))))


# An unconditioned draw shows each red flag (a rule's trigger) at about this rate, as in a bank's books where
# most applicants, accounts and claims are unremarkable. Branch-conditioned sampling (``Task.sample``) then
# forces the deciding flag; lower-priority flags still co-occur at this rate, so rule precedence is learned
# from realistic overlaps instead of from every other example carrying two or three triggers.
RED_FLAG_RATE = 0.1


def red_flag(rng: random.Random, rate: float = RED_FLAG_RATE) -> bool:
    """True with probability ``rate``: draw this indicator from its red-flag range."""
    return rng.random() < rate


def r1(x: float) -> float:
    return round(x + 1e-9, 1)


# ----------------------------------------------------------------------------------------------
# rules and answer layout


@dataclass
class Rule:
    """One labelling rule. ``when`` decides; ``fire``/``avoid`` mutate sampled fields so the rule
    does (or does not) hold, used to generate balanced data by branch."""

    name: str
    when: Callable[[Fields], bool]
    outcome: Callable[[Fields], dict]
    fire: Callable[[Fields, random.Random, float], None] | None = None
    avoid: Callable[[Fields, random.Random, float], None] | None = None
    doc: str = ""


@dataclass
class AnswerField:
    key: str  # key in the answer dict
    zh: str  # key as written in the answer text
    values: Sequence[str] | None = None  # allowed values; None = free text (the reason)
    aliases: Sequence[str] = ()  # other spellings of ``zh`` accepted by the tolerant parser


_PUNCT_STRIP = " \t\r\n；;，,。.、：:「」“”\"'`*"


def _norm_value(v: str) -> str:
    v = unicodedata.normalize("NFKC", v)
    v = re.sub(r"\s+", "", v)
    return v.strip(_PUNCT_STRIP).replace("、", "").upper()


@dataclass
class Task:
    """A scenario task; concrete tasks instantiate this with their rules and renderer."""

    name: str
    title: str  # Chinese name, e.g. 授信审批
    rules: list[Rule]
    answer_fields: list[AnswerField]
    primary_key: str
    field_names: list[str]
    sampler: Callable[[random.Random, float], Fields]
    facts: Callable[[Fields], list[list[str]]]  # each fact: list of alternative wordings
    intros: Sequence[str]
    questions: Sequence[str]
    distractors: Sequence[str]
    head_facts: int = 1  # how many leading facts keep their position (e.g. the applicant)
    protected: Sequence[str] = ()  # fields the rules must not use (fairness analysis)
    numeric_fields: Sequence[str] = ()
    bool_fields: Sequence[str] = ()
    optional_fields: dict = field(default_factory=dict)  # field -> default when a table lacks it
    derive: Callable[[Fields], None] | None = None  # fills derived fields (e.g. age_band) in place
    extra: dict = field(default_factory=dict)

    # -- rules ---------------------------------------------------------------------------------
    @property
    def branches(self) -> list[str]:
        return [r.name for r in self.rules]

    @property
    def label_values(self) -> list[str]:
        for f in self.answer_fields:
            if f.key == self.primary_key:
                return list(f.values or [])
        raise AssertionError(self.primary_key)

    @property
    def reason_key(self) -> str:
        """The free-text answer field (credit/aml ``reason``, audit ``basis``)."""
        return next(f.key for f in self.answer_fields if f.values is None)

    @property
    def answer_keys(self) -> list[str]:
        return [f.key for f in self.answer_fields]

    def label(self, fields: Fields) -> dict:
        """The structured gold answer by the documented rules, plus ``rule`` (the branch that fired)."""
        for rule in self.rules:
            if rule.when(fields):
                ans = dict(rule.outcome(fields))
                ans["rule"] = rule.name
                return ans
        raise AssertionError(f"{self.name}: no rule matched (the last rule must be a catch-all)")

    def gold(self, fields: Fields) -> dict:
        """The answer dict alone (what ``parse(format_answer(...))`` returns)."""
        ans = self.label(fields)
        return {k: ans[k] for k in self.answer_keys}

    def primary_label(self, answer: dict | None) -> str | None:
        if not answer:
            return None
        return answer.get(self.primary_key)

    # -- sampling --------------------------------------------------------------------------------
    def sample(self, rng: random.Random, branch: str | None = None, difficulty: float = 0.0) -> Fields:
        """Sample realistic input fields; with ``branch`` the fields make exactly that rule fire first.

        ``difficulty`` in [0, 1] moves the deciding and the avoided quantities nearer the thresholds.
        """
        if branch is None:
            branch = rng.choice(self.branches)
        if branch not in self.branches:
            raise ValueError(f"{self.name}: unknown branch {branch!r}; allowed: {', '.join(self.branches)}")
        k = self.branches.index(branch)
        for _ in range(200):
            f = self.sampler(rng, difficulty)
            for rule in self.rules[:k]:
                if rule.avoid is not None:
                    rule.avoid(f, rng, difficulty)
            target = self.rules[k]
            if target.fire is not None:
                target.fire(f, rng, difficulty)
            if self.derive is not None:
                self.derive(f)
            if self.label(f)["rule"] == branch:
                return f
        raise RuntimeError(f"{self.name}: could not sample branch {branch!r}")  # pragma: no cover

    # -- prompt ----------------------------------------------------------------------------------
    def render_prompt(self, fields: Fields, rng: random.Random, distractors: int | None = None) -> str:
        """Chinese prompt: intro, key facts (varied wording and order), 0-1 distractors, question."""
        facts = [rng.choice(alts) for alts in self.facts(fields)]
        head, rest = facts[: self.head_facts], facts[self.head_facts :]
        rng.shuffle(rest)
        n_dis = rng.choice((0, 0, 1)) if distractors is None else distractors
        for d in rng.sample(list(self.distractors), min(n_dis, len(self.distractors))):
            rest.insert(rng.randint(0, len(rest)), d)
        sep = rng.choice(("，", "；"))
        body = "，".join(head) + ("，" if head and rest else "") + sep.join(rest)
        return f"{rng.choice(self.intros)}{body}。{rng.choice(self.questions)}"

    # -- answer layout ---------------------------------------------------------------------------
    def format_answer(self, answer: dict) -> str:
        return "；".join(f"{f.zh}：{answer[f.key]}" for f in self.answer_fields)

    def parse(self, text: str | None, strict: bool = False) -> dict | None:
        """Parse an answer. Tolerant by default (full/half-width ``：:；;``, spaces, any field order,
        extra text around); ``strict`` demands exactly the layout of :meth:`format_answer`.
        Returns the answer dict or None when a field is missing or a value is not allowed."""
        if not isinstance(text, str):
            return None
        if strict:
            return self._parse_strict(text)
        names = []
        for f in self.answer_fields:
            for n in (f.zh, *f.aliases):
                names.append((n, f))
        names.sort(key=lambda t: -len(t[0]))
        pattern = "|".join(re.escape(n) for n, _ in names)
        key_re = re.compile(rf"({pattern})\s*[:：]\s*")
        by_zh = {n: f for n, f in names}
        hits = list(key_re.finditer(text))
        out: dict[str, str] = {}
        for i, m in enumerate(hits):
            f = by_zh[m.group(1)]
            end = hits[i + 1].start() if i + 1 < len(hits) else len(text)
            raw = text[m.end() : end]
            if f.key in out:  # first occurrence wins
                continue
            if f.values is None:
                val = raw.strip().strip("；;").strip()
                val = val.split("\n")[0].strip().rstrip("；;。").strip()
                if not val:
                    return None
                out[f.key] = val
            else:
                v = _norm_value(raw.split("\n")[0])
                allowed = {_norm_value(a): a for a in f.values}
                if v not in allowed:
                    # tolerate a trailing grade suffix such as "D级"
                    v2 = v[:-1] if v.endswith("级") else v
                    if v2 not in allowed:
                        return None
                    v = v2
                out[f.key] = allowed[v]
        if any(f.key not in out for f in self.answer_fields):
            return None
        return {f.key: out[f.key] for f in self.answer_fields}

    def _parse_strict(self, text: str) -> dict | None:
        parts = []
        for f in self.answer_fields:
            if f.values is None:
                parts.append(f"{re.escape(f.zh)}：(?P<{f.key}>[^\\n]*?[^\\s；。\\n])")
            else:
                alts = "|".join(re.escape(v) for v in f.values)
                parts.append(f"{re.escape(f.zh)}：(?P<{f.key}>{alts})")
        m = re.fullmatch("；".join(parts), text.strip("\n"))
        if not m:
            return None
        return {f.key: m.group(f.key) for f in self.answer_fields}

    # -- records ---------------------------------------------------------------------------------
    def make_record(
        self, rid: str, fields: Fields, rng: random.Random, extra_meta: dict | None = None
    ) -> dict:
        """Scenario record (docs/ARCHITECTURE.md) for sampled fields; meta = fields + branch (+ extra)."""
        ans = self.label(fields)
        gold = {k: ans[k] for k in self.answer_keys}
        meta = dict(fields)
        meta["branch"] = ans["rule"]
        if extra_meta:
            meta.update(extra_meta)
        return {
            "id": rid,
            "task": self.name,
            "messages": [
                {"role": "user", "content": self.render_prompt(fields, rng)},
                {"role": "assistant", "content": self.format_answer(gold)},
            ],
            "label": self.primary_label(gold),
            "gold": json.dumps(gold, ensure_ascii=False),
            "meta": json.dumps(meta, ensure_ascii=False),
        }

    def fields_from_meta(self, meta: dict | str) -> Fields | None:
        """Recover the input fields stored flat in a record's meta (None when they are incomplete)."""
        if isinstance(meta, str):
            meta = json.loads(meta) if meta else {}
        if not all(k in meta for k in self.field_names):
            return None
        return {k: meta[k] for k in self.field_names}


# ----------------------------------------------------------------------------------------------
# robustness perturbations

PERTURBATIONS = ("shuffle_fields", "fullwidth_digits", "distractor")

# perturbations that re-render the prompt from the input fields kept in ``meta``
_RERENDERED = ("shuffle_fields", "distractor")


class CannotPerturb(ValueError):
    """The record lacks what the perturbation needs (a prompt-only table row has no fields to re-render)."""


def can_perturb(task: Task | str, record: dict, kind: str) -> bool:
    """Whether :func:`perturb` can apply ``kind`` to ``record``, so callers can skip instead of failing."""
    from banklm.tasks import get_task

    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; allowed: {', '.join(PERTURBATIONS)}")
    if kind not in _RERENDERED:
        return True
    t = get_task(task) if isinstance(task, str) else task
    return t.fields_from_meta(record.get("meta") or "{}") is not None


def perturb(task: Task | str, record: dict, rng: random.Random, kind: str) -> dict:
    """A copy of ``record`` whose user prompt is perturbed; gold, label and assistant answer stay.

    kinds: ``shuffle_fields`` (re-render with another fact order and wording), ``fullwidth_digits``
    (digits, '%' and '.' as full-width characters), ``distractor`` (re-render with two extra
    irrelevant sentences). Re-rendering needs the fields in ``meta``; records loaded from a table
    with a free-text prompt support only ``fullwidth_digits`` (others raise :class:`CannotPerturb`;
    check first with :func:`can_perturb`).
    """
    from banklm.tasks import get_task

    t = get_task(task) if isinstance(task, str) else task
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; allowed: {', '.join(PERTURBATIONS)}")
    rec = json.loads(json.dumps(record, ensure_ascii=False))
    user_idx = max(i for i, m in enumerate(rec["messages"]) if m["role"] == "user")
    prompt = rec["messages"][user_idx]["content"]
    if kind == "fullwidth_digits":
        new = to_fullwidth_digits(prompt)
    else:
        fields = t.fields_from_meta(rec.get("meta") or "{}")
        if fields is None:
            raise CannotPerturb(f"record {rec.get('id')}: meta has no input fields; cannot apply {kind!r}")
        new = prompt
        for _ in range(10):
            new = t.render_prompt(fields, rng, distractors=2 if kind == "distractor" else 0)
            if new != prompt:
                break
    rec["messages"][user_idx]["content"] = new
    meta = json.loads(rec.get("meta") or "{}")
    meta["perturbation"] = kind
    rec["meta"] = json.dumps(meta, ensure_ascii=False)
    return rec


# ----------------------------------------------------------------------------------------------
# a bank's own labelled table -> scenario records


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
    from banklm.tasks import get_task

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
                    allowed = {_norm_value(a): a for a in f.values}
                    if _norm_value(v) not in allowed:
                        raise ValueError(f"{where}, column {col(f.key)!r}: {v!r} not in {list(f.values)}")
                    v = allowed[_norm_value(v)]
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


def iter_user_messages(record: dict) -> list[dict]:
    """The messages to condition on: everything before the final assistant turn."""
    msgs = list(record["messages"])
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    return msgs


def balanced_branches(branches: Iterable[str], n: int) -> list[str]:
    """Round-robin schedule over branches."""
    b = list(branches)
    return [b[i % len(b)] for i in range(n)]
