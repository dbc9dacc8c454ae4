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

import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
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


def norm_value(v: str) -> str:
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
                v = norm_value(raw.split("\n")[0])
                allowed = {norm_value(a): a for a in f.values}
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
