"""The :class:`Task`: a task spec (:mod:`banklm.tasks.spec`) made usable: labelling rules, prompt renderer,
answer layout, tolerant and strict parsers, records; plus the helpers of the synthetic samplers.

A task is built from its spec (fields, ordered rules, facts, answer layout: YAML, ``docs/tasks.md``) and an
optional :class:`Sampler`, the Python part of a built-in task that draws realistic inputs and, per rule, makes
it fire or not (``fire`` / ``avoid`` keyed by rule name) so data can be generated balanced by branch.

``Task.label(fields)`` returns the answer dict plus ``"rule"`` (the branch that fired: the first rule whose
condition holds); ``Task.gold(fields)`` returns the answer dict alone, which is exactly what ``Task.parse``
returns for ``Task.format_answer(gold)``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from banklm.tasks.formats import (  # noqa: F401  (re-exported: the samplers and older callers import them here)
    MISSING_TEXT,
    fmt_num,
    fmt_pct,
    fmt_wan,
    fmt_yuan,
    norm_value,
)
from banklm.tasks.spec import NUMERIC_TYPES, CompiledRule, TaskSpec

Fields = dict[str, Any]


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

Mutator = Callable[[Fields, random.Random, float], None]


@dataclass
class Rule:
    """One labelling rule. ``when`` decides; ``fire``/``avoid`` mutate sampled fields so the rule
    does (or does not) hold, used to generate balanced data by branch. ``condition`` and ``reason`` are the
    spec's expression and reason template (their source text)."""

    name: str
    when: Callable[[Fields], bool]
    outcome: Callable[[Fields], dict]
    fire: Mutator | None = None
    avoid: Mutator | None = None
    doc: str = ""
    condition: str | None = None
    reason: str | None = None


@dataclass
class AnswerField:
    key: str  # key in the answer dict
    zh: str  # key as written in the answer text
    values: Sequence[str] | None = None  # allowed values; None = free text (the reason)
    aliases: Sequence[str] = ()  # other spellings of ``zh`` accepted by the tolerant parser
    kind: str = "category"  # category (one value), multi (a set of values, written joined by 、), reason
    ordinal: bool = False  # ``values`` are in the bank's order


@dataclass(frozen=True)
class Sampler:
    """The Python part of a task with synthetic data: ``sample(rng, difficulty)`` draws realistic fields;
    ``fire[rule]`` / ``avoid[rule]`` mutate them so that rule holds / does not; ``derive`` fills derived
    fields (after the spec's bands)."""

    sample: Callable[[random.Random, float], Fields]
    fire: Mapping[str, Mutator] = field(default_factory=dict)
    avoid: Mapping[str, Mutator] = field(default_factory=dict)
    derive: Callable[[Fields], None] | None = None


MULTI_SPLIT = re.compile(r"[、，,/／]+")


class Task:
    """A task built from its spec (and, for synthetic data, a :class:`Sampler`)."""

    def __init__(self, spec: TaskSpec, sampler: Sampler | None = None):
        self.spec = spec
        m = spec.model
        self.name: str = m.name
        self.title: str = m.title
        self.description: str = m.description
        self.sampler = sampler
        a = m.answer
        self.answer_fields: list[AnswerField] = [
            AnswerField(k, ks.name or k, None if ks.type == "reason" else list(ks.values), tuple(ks.aliases),
                        ks.type, ks.ordinal)
            for k, ks in a.keys.items()
        ]
        self.primary_key: str = a.primary
        self.field_names: list[str] = list(m.fields)
        self._reason_key = next((f.key for f in self.answer_fields if f.kind == "reason"), None)
        # the prompt
        p = m.prompt
        self.intros: list[str] = list(p.intros) if p.intros is not None else [p.instruction or ""]
        self.questions: list[str] = list(p.questions) if p.questions is not None else [p.question or ""]
        self.distractors: list[str] = list(p.distractors)
        self.head_facts: int = p.head_facts
        self.shuffle: bool = p.shuffle
        self.separators: list[str] = list(p.separators)
        self._facts = spec.facts
        # field groups (the table loader and the evaluation read these)
        fs = m.fields
        self.numeric_fields: tuple[str, ...] = tuple(n for n, f in fs.items() if f.type in NUMERIC_TYPES)
        self.bool_fields: tuple[str, ...] = tuple(n for n, f in fs.items() if f.type == "boolean")
        self.optional_fields: dict[str, Any] = {n: (f.default if "default" in f.model_fields_set else None)
                                                for n, f in fs.items() if not f.required}
        band_into = {b.field: b.into for b in spec.bands}
        self.protected: tuple[str, ...] = tuple(band_into.get(n, n) for n, f in fs.items() if f.protected)
        self.extra: dict = {"yuan_fields": tuple(n for n, f in fs.items() if f.unit == "元")}
        # the rules
        unknown = sorted((set(sampler.fire) | set(sampler.avoid)) - {r.name for r in spec.rules}) if sampler else []
        if unknown:
            raise ValueError(f"{self.name}: the sampler's fire/avoid name unknown rules: {', '.join(unknown)} "
                             f"(rules: {', '.join(r.name for r in spec.rules)})")
        self._compiled: list[CompiledRule] = list(spec.rules)
        self.rules: list[Rule] = [self._rule(r) for r in self._compiled]
        self.derive: Callable[[Fields], None] | None = self._derive if (spec.bands or (sampler and sampler.derive)) \
            else None

    def _rule(self, r: CompiledRule) -> Rule:
        s = self.sampler
        return Rule(
            r.name,
            (lambda f: True) if r.when is None else r.when.test,
            lambda f, r=r: self._answer(r, f),
            s.fire.get(r.name) if s else None,
            s.avoid.get(r.name) if s else None,
            r.doc,
            r.when.source if r.when is not None else None,
            r.reason.source if r.reason is not None else None,
        )

    def _derive(self, f: Fields) -> None:
        self.spec.derive(f)
        if self.sampler is not None and self.sampler.derive is not None:
            self.sampler.derive(f)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {self.title!r}, source={self.spec.source!r})"

    # -- spec-derived properties -------------------------------------------------------------------
    @property
    def branches(self) -> list[str]:
        return [r.name for r in self.rules]

    @property
    def branch_labels(self) -> dict[str, str]:
        """rule name -> the primary value it answers (generating data at a declared prevalence)."""
        return {r.name: r.outcome[self.primary_key] for r in self._compiled
                if isinstance(r.outcome.get(self.primary_key), str)}

    @property
    def label_values(self) -> list[str]:
        return list(self._key(self.primary_key).values or [])

    @property
    def reason_key(self) -> str | None:
        """The free-text answer field (credit/aml ``reason``, audit ``basis``; None when the answer has none)."""
        return self._reason_key

    @property
    def answer_keys(self) -> list[str]:
        return [f.key for f in self.answer_fields]

    @property
    def categorical_keys(self) -> list[str]:
        """The answer keys with declared values (single- and multi-valued), in answer order."""
        return [f.key for f in self.answer_fields if f.values is not None]

    @property
    def secondary_keys(self) -> list[str]:
        """The categorical keys other than the primary one (credit ``grade``, audit ``severity``)."""
        return [k for k in self.categorical_keys if k != self.primary_key]

    def values_of(self, key: str) -> list[str]:
        """The declared values of answer key ``key`` (ValueError for a free-text or unknown key)."""
        for f in self.answer_fields:
            if f.key == key and f.values is not None:
                return list(f.values)
        raise ValueError(f"{self.name}: {key!r} is not a categorical answer key ({', '.join(self.categorical_keys)})")

    @property
    def multi_label_keys(self) -> list[str]:
        return [f.key for f in self.answer_fields if f.kind == "multi"]

    @property
    def ordinal_keys(self) -> dict[str, list[str]]:
        """key -> its values in the declared order, for the ordinal keys (credit ``grade`` A-E)."""
        return {f.key: list(f.values or []) for f in self.answer_fields if f.ordinal}

    @property
    def favourable(self) -> str | None:
        """The primary value that is good for the customer (credit ``通过``): fairness and costs."""
        return self.spec.model.answer.favourable

    @property
    def positive(self) -> str | None:
        """The value a detection task looks for (aml ``可疑``), on :attr:`positive_key`."""
        return self.spec.model.answer.positive

    @property
    def positive_key(self) -> str | None:
        a = self.spec.model.answer
        return (a.positive_key or a.primary) if a.positive is not None else None

    @property
    def abstain(self) -> str | None:
        """The primary value that hands a case to a person (e.g. ``转人工``), if the task has one."""
        return self.spec.model.answer.abstain

    @property
    def protected_bands(self) -> dict[str, dict]:
        """protected numeric field -> ``{"field": band field, "bands": {name: upper bound or None}}``."""
        return {b.field: {"field": b.into, "bands": dict(b.bands)} for b in self.spec.bands
                if self.spec.fields[b.field].protected}

    @property
    def segments(self) -> list[str]:
        """Fields to report results by (a banded numeric field: its band field)."""
        into = {b.field: b.into for b in self.spec.bands}
        return [into.get(s, s) for s in self.spec.model.evaluation.segments]

    @property
    def costs(self) -> dict[str, dict[str, float]]:
        """costs[gold][predicted] over the primary labels (missing pairs: 0)."""
        return {g: dict(row) for g, row in self.spec.model.evaluation.costs.items()}

    @property
    def handoff_cost(self) -> float:
        """The cost of a case handed to a person (an abstention), in the units of :attr:`costs`."""
        return float(self.spec.model.evaluation.handoff_cost)

    @property
    def prevalence(self) -> dict[str, float]:
        """The real-world share of each primary label (as declared; may be empty)."""
        return dict(self.spec.model.evaluation.prevalence)

    @property
    def policy(self) -> str | None:
        """Policy text: the system prompt of every record (None when the spec has none)."""
        return self.spec.model.prompt.system

    system_prompt = policy

    @property
    def reason_max_length(self) -> int | None:
        return self.spec.model.answer.keys[self._reason_key].max_length if self._reason_key else None

    @property
    def reason_cite(self) -> list[str]:
        """The fields and constants a reason may cite (default: every field)."""
        if not self._reason_key:
            return []
        cite = self.spec.model.answer.keys[self._reason_key].cite
        return list(cite) if cite is not None else list(self.field_names)

    @property
    def constants(self) -> dict[str, Any]:
        return dict(self.spec.constants)

    @property
    def spec_text(self) -> str:
        """The spec's YAML, to store next to a model (``tasks/<name>.yaml``)."""
        return self.spec.text

    @property
    def has_rules(self) -> bool:
        return bool(self.rules)

    @property
    def has_sampler(self) -> bool:
        return self.sampler is not None

    def _key(self, key: str) -> AnswerField:
        return next(f for f in self.answer_fields if f.key == key)

    # -- rules ---------------------------------------------------------------------------------
    def _with_bands(self, fields: Fields) -> Fields:
        """``fields`` with its band fields (a copy, derived, when they are missing: e.g. fields from a meta)."""
        bands = self.spec.bands
        if bands and any(b.into not in fields for b in bands):
            fields = dict(fields)
            self.spec.derive(fields)
        return fields

    def _match(self, fields: Fields) -> CompiledRule:
        fields = self._with_bands(fields)
        for r in self._compiled:
            if r.when is None or r.when.test(fields):
                return r
        if not self._compiled:
            raise ValueError(f"{self.name}: the spec has no rules (labels come from the bank's table)")
        raise AssertionError(f"{self.name}: no rule matched (the last rule must be a catch-all)")  # pragma: no cover

    def _answer(self, r: CompiledRule, fields: Fields) -> dict:
        ans = {k: (list(v) if isinstance(v, list) else v) for k, v in r.outcome.items()}
        if self._reason_key is not None:
            ans[self._reason_key] = r.reason.render(self.spec.template_values(self._with_bands(fields)))
        return {k: ans[k] for k in self.answer_keys}

    def label(self, fields: Fields) -> dict:
        """The structured gold answer by the documented rules, plus ``rule`` (the branch that fired)."""
        r = self._match(fields)
        ans = self._answer(r, fields)
        ans["rule"] = r.name
        return ans

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
        if self.sampler is None:
            raise ValueError(f"{self.name}: no synthetic sampler (the data of a spec task comes from the bank's "
                             "tables)")
        if branch is None:
            branch = rng.choice(self.branches)
        if branch not in self.branches:
            raise ValueError(f"{self.name}: unknown branch {branch!r}; allowed: {', '.join(self.branches)}")
        k = self.branches.index(branch)
        for _ in range(200):
            f = self.sampler.sample(rng, difficulty)
            for rule in self.rules[:k]:
                if rule.avoid is not None:
                    rule.avoid(f, rng, difficulty)
            target = self.rules[k]
            if target.fire is not None:
                target.fire(f, rng, difficulty)
            if self.derive is not None:
                self.derive(f)
            if self._match(f).name == branch:
                return f
        raise RuntimeError(f"{self.name}: could not sample branch {branch!r}")  # pragma: no cover

    # -- prompt ----------------------------------------------------------------------------------
    def facts(self, fields: Fields) -> list[list[str]]:
        """Every fact's alternative wordings for these fields."""
        tv = self.spec.template_values(self._with_bands(fields))
        return [[alt.render(tv) for alt in alts] for alts in self._facts]

    def render_prompt(self, fields: Fields, rng: random.Random, distractors: int | None = None,
                      shuffle: bool | None = None) -> str:
        """Prompt: intro, the facts (one wording each, drawn; the facts after the first ``head_facts`` in shuffled
        order when the spec shuffles or ``shuffle``), 0-1 distractors (or ``distractors``), question."""
        tv = self.spec.template_values(self._with_bands(fields))
        # a fact that ends a sentence itself (free text ending in 。) would read "。。" or "。，" once joined
        facts = [rng.choice(alts).render(tv).rstrip("。；;，, ") for alts in self._facts]
        head, rest = facts[: self.head_facts], facts[self.head_facts :]
        if self.shuffle if shuffle is None else shuffle:
            rng.shuffle(rest)
        n_dis = rng.choice((0, 0, 1)) if distractors is None else distractors
        for d in rng.sample(list(self.distractors), min(n_dis, len(self.distractors))):
            rest.insert(rng.randint(0, len(rest)), d)
        sep = rng.choice(self.separators)
        body = "，".join(head) + ("，" if head and rest else "") + sep.join(rest)
        return f"{rng.choice(self.intros)}{body}。{rng.choice(self.questions)}"

    def messages(self, prompt: str, answer_text: str | None = None) -> list[dict]:
        """Chat messages of a record: the policy as system prompt (when the spec has one), the user prompt, the
        answer."""
        msgs = [{"role": "system", "content": self.policy}] if self.policy else []
        msgs.append({"role": "user", "content": prompt})
        if answer_text is not None:
            msgs.append({"role": "assistant", "content": answer_text})
        return msgs

    # -- answer layout ---------------------------------------------------------------------------
    def format_answer(self, answer: dict, keys: Sequence[str] | None = None) -> str:
        """The answer text in the spec's layout; ``keys``: only those keys, in the spec's order (a bank's row
        labelled without a reason: the labelled keys only)."""
        parts = []
        for f in self.answer_fields:
            if keys is not None and f.key not in keys:
                continue
            v = answer[f.key]
            if f.kind == "multi":
                chosen = [v] if isinstance(v, str) else list(v)
                v = "、".join(x for x in (f.values or []) if x in chosen)
            parts.append(f"{f.zh}：{v}")
        return "；".join(parts)

    def parse(self, text: str | None, strict: bool = False, keys: Sequence[str] | None = None) -> dict | None:
        """Parse an answer. Tolerant by default (full/half-width ``：:；;``, spaces, any field order,
        extra text around); ``strict`` demands exactly the layout of :meth:`format_answer`.
        Returns the answer dict or None when a field is missing or a value is not allowed. ``keys`` (tolerant
        only): the keys that must be there (a bank's row scored on its labelled keys); the others found are kept."""
        if not isinstance(text, str):
            return None
        if strict:
            return self._parse_strict(text)
        key_re, by_zh = self._key_re()
        hits = list(key_re.finditer(text))
        out: dict[str, Any] = {}
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
            elif f.kind == "multi":
                allowed = {norm_value(a): a for a in f.values}
                got = set()
                for part in MULTI_SPLIT.split(raw.split("\n")[0]):
                    v = norm_value(part)
                    if not v:
                        continue
                    if v not in allowed:
                        return None
                    got.add(allowed[v])
                if not got:
                    return None
                out[f.key] = [a for a in f.values if a in got]
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
        need = self.answer_fields if keys is None else [f for f in self.answer_fields if f.key in keys]
        if any(f.key not in out for f in need):
            return None
        return {f.key: out[f.key] for f in self.answer_fields if f.key in out}

    def _key_re(self):
        cached = getattr(self, "_key_re_cache", None)
        if cached is None:
            names = []
            for f in self.answer_fields:
                for n in (f.zh, *f.aliases):
                    names.append((n, f))
            names.sort(key=lambda t: -len(t[0]))
            pattern = "|".join(re.escape(n) for n, _ in names)
            cached = (re.compile(rf"({pattern})\s*[:：]\s*"), {n: f for n, f in names})
            self._key_re_cache = cached
        return cached

    def _parse_strict(self, text: str) -> dict | None:
        parts = []
        for f in self.answer_fields:
            if f.values is None:
                parts.append(f"{re.escape(f.zh)}：(?P<{_group(f.key)}>[^\\n]*?[^\\s；。\\n])")
            else:
                alts = "|".join(re.escape(v) for v in f.values)
                if f.kind == "multi":
                    alts = f"(?:{alts})(?:、(?:{alts}))*"
                parts.append(f"{re.escape(f.zh)}：(?P<{_group(f.key)}>{alts})")
        m = re.fullmatch("；".join(parts), text.strip("\n"))
        if not m:
            return None
        out: dict[str, Any] = {}
        for f in self.answer_fields:
            v = m.group(_group(f.key))
            if f.kind == "multi":
                got = v.split("、")
                ordered = [a for a in (f.values or []) if a in got]
                if got != ordered:  # repeated or out of the declared order
                    return None
                v = got
            out[f.key] = v
        return out

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
            "messages": self.messages(self.render_prompt(fields, rng), self.format_answer(gold)),
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


def _group(key: str) -> str:
    """A regex group name for an answer key (keys may be Chinese or hold characters a group name cannot)."""
    return "k" + "".join(f"{ord(c):x}" for c in key)


# ----------------------------------------------------------------------------------------------
# records

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
