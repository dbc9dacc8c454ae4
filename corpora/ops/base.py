"""The step contract: small callable objects applied to a ``datasets.Dataset`` one after another.

A step has a ``name`` and its parameters (plain attributes), and ``step(ds, num_proc=1)`` returns a
:class:`StepResult` whose ``stats`` always carry::

    step, params, in, kept, dropped, quarantined,
    reasons   {reason: dropped count}
    examples  {reason: [up to 5 removed records as {id, text[:200]}]}   (for the dataset card)

plus step-specific details. ``in == kept + dropped + quarantined`` holds for every step and
:func:`run_steps` asserts it. Steps that only rewrite text (normalisation, PII) report ``kept == in``
and their own counts (records changed, placeholders per type, ...).

Parameters a recipe may set (``steps: [{near_dedup: {threshold: 0.85}}]``) are declared once, on the step:
steps are dataclasses whose recipe parameters are :func:`param` fields (default and bounds); the step checks
the bounds when built, and the recipe schema (``banklm.recipe``) builds its validation from
:func:`step_params`.

Records hold their content in one column, found by :func:`resolve_field`: ``text`` (raw documents),
``messages`` (instruction data, ``[{role, content}]``) or ``prompt`` (+ ``completion``). Steps read it
with :func:`text_of` and rewrite it with :func:`map_content`, so every step works on both kinds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from banklm.settings import bound_problem, setting

from .pii import scrub_text

MAX_EXAMPLES = 5
EXAMPLE_CHARS = 200
CONTENT_FIELDS = ("text", "messages", "prompt")


@dataclass
class StepResult:
    dataset: Any  # datasets.Dataset
    stats: dict
    quarantine: list[dict] = field(default_factory=list)  # {id, step, reason}; never record content


def resolve_field(ds, field: str | None) -> str:
    """The content column of ``ds``: ``field`` if given, else the first of text/messages/prompt present."""
    cols = ds.column_names
    if field is not None:
        if field not in cols:
            raise ValueError(f"column '{field}' not in dataset (columns: {', '.join(cols)})")
        return field
    for f in CONTENT_FIELDS:
        if f in cols:
            return f
    raise ValueError(f"dataset has no text, messages or prompt column (columns: {', '.join(cols)})")


def text_of(record: dict, field: str = "text") -> str:
    """All the text of one record as one string (message contents joined by newlines)."""
    if field == "messages":
        return "\n".join(m.get("content") or "" for m in record.get("messages") or [])
    if field == "prompt":
        return f"{record.get('prompt') or ''}\n{record.get('completion') or ''}"
    value = record.get(field)
    return value if isinstance(value, str) else ""


def map_content(record: dict, field: str, fn: Callable[[str], str]) -> dict:
    """The record's content columns with ``fn`` applied to every piece of text (for ``ds.map``)."""
    if field == "messages":
        return {"messages": [{**m, "content": fn(m.get("content") or "")} for m in record["messages"] or []]}
    if field == "prompt":
        out = {"prompt": fn(record.get("prompt") or "")}
        if "completion" in record:
            out["completion"] = fn(record.get("completion") or "")
        return out
    return {field: fn(record.get(field) or "")}


def batch_records(batch: dict) -> list[dict]:
    """Rows of a batched ``map`` batch (a dict of columns) as a list of dicts."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


def example(record: dict, field: str) -> dict:
    return {"id": record.get("id"), "text": text_of(record, field)[:EXAMPLE_CHARS]}


def make_stats(step: Step, n_in: int, kept: int, reasons: Counter | dict | None = None,
               examples: dict | None = None, quarantined: int = 0, **details) -> dict:
    reasons = dict(sorted((reasons or {}).items(), key=lambda kv: (-kv[1], kv[0])))
    return {"step": step.name, "params": step.params(), "in": n_in, "kept": kept,
            "dropped": sum(reasons.values()), "quarantined": quarantined, "reasons": reasons,
            "examples": examples or {}, **details}


def filter_by_reasons(step: Step, ds, reasons: Sequence[str | None], field: str,
                      example_ds=None, **details) -> StepResult:
    """Keep the records whose reason is empty; count and sample the others by reason.

    ``example_ds`` (same length as ``ds``) is where examples are taken from when ``ds`` itself must not
    be shown (e.g. the scrubbed text rather than the original in the PII step).
    """
    if len(reasons) != len(ds):
        raise AssertionError(f"{step.name}: {len(reasons)} reasons for {len(ds)} records")
    keep = [i for i, r in enumerate(reasons) if not r]
    counts = Counter(r for r in reasons if r)
    examples: dict[str, list[dict]] = {}
    src = ds if example_ds is None else example_ds
    for i, r in enumerate(reasons):
        if r and len(examples.setdefault(r, [])) < MAX_EXAMPLES:
            examples[r].append(example(src[i], field))
    out = ds if len(keep) == len(ds) else ds.select(keep)
    return StepResult(out, make_stats(step, len(ds), len(keep), counts, examples, **details))


#: A step parameter a recipe may set: a dataclass field with its default and bounds, the one place both the step
#: and the recipe schema read them from (the same declaration as the training config's settings).
param = setting


@dataclass(frozen=True)
class Param:
    """One declared step parameter, as :func:`step_params` returns it."""

    name: str
    type: Any
    default: Any
    bounds: dict


def step_params(cls: type) -> dict[str, Param]:
    """The parameters a recipe may set on the step class ``cls`` (its :func:`param` fields), in order."""
    if not dataclasses.is_dataclass(cls):
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: Param(f.name, hints[f.name], f.default, dict(f.metadata["bounds"]))
            for f in dataclasses.fields(cls) if "bounds" in f.metadata}


class Step:
    """Base class: subclasses set ``name``, store parameters as public attributes and implement ``apply``.
    Dataclass steps declare the parameters a recipe may set with :func:`param`; their bounds are checked here."""

    name = "step"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            problem = bound_problem(f.name, getattr(self, f.name), f.metadata.get("bounds", {}))
            if problem:
                raise ValueError(f"{self.name}: {problem}")

    def params(self) -> dict:
        return {k: _plain(v) for k, v in vars(self).items() if not k.startswith("_")}

    def apply(self, ds, num_proc: int = 1) -> StepResult:
        raise NotImplementedError

    def __call__(self, ds, num_proc: int = 1) -> StepResult:
        return self.apply(ds, num_proc=num_proc)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _plain(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        if isinstance(v, (set, frozenset, tuple)):
            return [_plain(x) for x in v]
        return repr(v)


def check_counts(stats: dict, n_in: int, n_out: int) -> None:
    name = stats.get("step", "?")
    if stats["in"] != n_in:
        raise AssertionError(f"step {name}: stats say in={stats['in']} but {n_in} records went in")
    if stats["in"] != stats["kept"] + stats["dropped"] + stats["quarantined"]:
        raise AssertionError(f"step {name}: in={stats['in']} != kept {stats['kept']} + dropped "
                             f"{stats['dropped']} + quarantined {stats['quarantined']}")
    if stats["kept"] != n_out:
        raise AssertionError(f"step {name}: stats say kept={stats['kept']} but {n_out} records came out")


def run_steps(ds, steps: Sequence[Step], num_proc: int = 1, quarantine: list | None = None):
    """Apply ``steps`` in order; return ``(dataset, [stats per step])``.

    Asserts the count invariant for every step and adds ``seconds`` to its stats. Quarantine records
    produced by steps are appended to ``quarantine`` when a list is given. Worker processes are used only
    for datasets of 1,000 records or more (below that, starting them costs more than it saves).
    """
    all_stats = []
    num_proc = max(1, min(num_proc, os.cpu_count() or 1))
    for step in steps:
        n_in = len(ds)
        t0 = time.perf_counter()
        # datasets 5.x runs map(num_proc=1) in a worker process; None keeps single-process work in-process
        res = step(ds, num_proc=num_proc if (num_proc > 1 and n_in >= 1000) else None)
        res.stats["seconds"] = round(time.perf_counter() - t0, 3)
        check_counts(res.stats, n_in, len(res.dataset))
        if quarantine is not None:
            quarantine.extend(res.quarantine)
        all_stats.append(res.stats)
        ds = res.dataset
    return ds, all_stats


class ScrubPII(Step):
    """PII de-identification through ``banklm.corpora.ops.pii.scrub_text`` (imported lazily, in the workers too).

    ``mode`` is passed to ``scrub_text`` (e.g. ``placeholder``, ``hash``); ``mode="drop"`` instead drops
    every record in which PII is found (reason ``contains_pii``; the card's examples show the scrubbed
    text). ``key_env`` names the environment variable holding the key for keyed modes: the key itself never
    enters params, stats or files. Stats: ``pii_counts`` (found per type, summed) and ``records_changed``.
    """

    name = "pii"

    def __init__(self, mode: str = "placeholder", types: Sequence[str] | None = None,
                 key_env: str | None = None, field: str | None = None):
        self.mode = mode
        self.types = list(types) if types is not None else None
        self.key_env = key_env
        self.field = field

    def apply(self, ds, num_proc: int = 1) -> StepResult:

        field = resolve_field(ds, self.field)
        key = None
        if self.key_env:
            key = os.environ.get(self.key_env)
            if not key:
                raise ValueError(f"pii: environment variable {self.key_env} (key_env) is not set or empty")
        mode = "placeholder" if self.mode == "drop" else self.mode
        types = self.types

        def fn(rec):

            total: Counter = Counter()

            def one(text: str) -> str:
                new, counts = scrub_text(text, mode=mode, types=types, key=key)
                total.update({k: int(v) for k, v in (counts or {}).items() if v})
                return new

            out = map_content(rec, field, one)
            out["__pii"] = json.dumps(dict(total), sort_keys=True)
            return out

        out = ds.map(fn, num_proc=num_proc, desc="pii")
        per_record = [json.loads(s) for s in out["__pii"]]
        out = out.remove_columns("__pii")
        pii_counts: Counter = Counter()
        for c in per_record:
            pii_counts.update(c)
        details = {"pii_counts": dict(sorted(pii_counts.items())),
                   "records_with_pii": sum(1 for c in per_record if c)}
        if self.mode == "drop":
            reasons = ["contains_pii" if c else None for c in per_record]
            return filter_by_reasons(self, ds, reasons, field, example_ds=out, **details)
        return StepResult(out, make_stats(self, len(ds), len(out), records_changed=details["records_with_pii"],
                                          **details))
