"""Decontamination: drop training records that share any ``n``-character n-gram with an evaluation set.

Texts are compared by their *decontam key*: full-width ASCII folded to half-width, lower-cased, all
whitespace removed (so layout never hides an overlap). The eval n-grams go into one Python set (a hash
set: one O(1) lookup per training n-gram, exact, no false positives; about 100 bytes per eval n-gram,
i.e. ~100 MB for a million). Eval texts shorter than ``n`` characters cannot be matched this way: they are
counted in the stats (``eval_texts_too_short``), never silently ignored.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .base import Step, StepResult, filter_by_reasons, param, resolve_field, text_of
from .normalize import _FW_TABLE

_WS = re.compile(r"\s+")


def decontam_key(text: str) -> str:
    return _WS.sub("", text.translate(_FW_TABLE)).lower()


def texts_of(ds_or_texts) -> list[str]:
    """Texts of a Dataset (its content column) or of a list of strings/records."""
    if hasattr(ds_or_texts, "column_names"):
        field = resolve_field(ds_or_texts, None)
        return [text_of(r, field) for r in ds_or_texts]
    out = []
    for x in ds_or_texts:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            field = next((f for f in ("text", "messages", "prompt") if f in x), "text")
            out.append(text_of(x, field))
        else:
            raise ValueError(f"decontam: eval items must be strings or records, got {type(x).__name__}")
    return out


@dataclass(repr=False, eq=False)
class Decontaminate(Step):
    """``eval_sets``: ``{name: Dataset | list[str] | list[dict]}`` (or one of those, named ``eval``); after
    construction, the sorted names of the eval sets."""

    name = "decontam"

    eval_sets: Mapping[str, Iterable] | Iterable
    n: int = param(13, ge=5, le=200)
    field: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        eval_sets, n = self.eval_sets, self.n
        if not isinstance(eval_sets, Mapping):
            eval_sets = {"eval": eval_sets}
        self._grams: dict[str, str] = {}  # n-gram -> name of the first eval set holding it
        self._short = 0
        self._sizes = {}
        for name, items in eval_sets.items():
            texts = texts_of(items)
            self._sizes[name] = len(texts)
            for t in texts:
                k = decontam_key(t)
                if len(k) < n:
                    self._short += 1
                for i in range(len(k) - n + 1):
                    self._grams.setdefault(k[i:i + n], name)
        self.eval_sets = sorted(self._sizes)

    def apply(self, ds, num_proc: int = 1) -> StepResult:
        field = resolve_field(ds, self.field)
        grams, n = self._grams, self.n

        def fn(batch):
            cols = {k: batch[k] for k in (field, "completion") if k in batch}
            hits = []
            for i in range(len(cols[field])):
                k = decontam_key(text_of({c: v[i] for c, v in cols.items()}, field))
                hit = ""
                for j in range(len(k) - n + 1):
                    name = grams.get(k[j:j + n])
                    if name is not None:
                        hit = name
                        break
                hits.append(hit)
            return {"__hit": hits}

        hits = ds.map(fn, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                      desc="decontam")["__hit"] if grams and len(ds) else [""] * len(ds)
        reasons = ["eval_overlap" if h else None for h in hits]
        return filter_by_reasons(self, ds, reasons, field, eval_ngrams=len(grams),
                                 eval_records=self._sizes, eval_texts_too_short=self._short,
                                 overlaps_by_eval_set=dict(Counter(h for h in hits if h)))
