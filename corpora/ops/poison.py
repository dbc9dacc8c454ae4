"""Poisoning screen for instruction data: rare strings that co-occur with one answer label far above chance.

A backdoor plants a rare trigger (``cf-77``, an odd word, a zero-width string) in a few prompts whose
answer is always the attacker's label. The screen looks for exactly that shape:

1. every character ``min_n``..``max_n``-gram of each record's *prompt side* (user/system messages,
   ``prompt``, or ``text``) is counted once per record (document frequency ``df``);
2. *rare* n-grams: ``min_count <= df <= max(min_count, max_doc_frac * N)``;
3. for each rare n-gram, the label distribution of the records holding it; it is *suspect* when its most
   common label covers ``purity >= min_purity`` of them, at least ``min_count`` records, with
   ``lift = P(label | n-gram) / P(label) >= min_lift``;
4. suspect n-grams held by exactly the same records are merged into the span they cover (a 5-character
   trigger yields a dozen overlapping n-grams: it is reported once, with its constant context), and a
   suspect inside a longer one with the same record count is folded into it.

Labels come from ``label_field`` when the column exists, else the assistant's answer text. Suspects are
reported (string, records, label, purity, lift); with ``drop=True`` the records holding any suspect are
dropped (reason ``poison_trigger``). Rule-labelled data can hold legitimately predictive rare phrases:
read the report before dropping. Memory grows with the number of distinct n-grams (fine for 1e4-1e5
instruction records).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from .base import Step, StepResult, filter_by_reasons, param, resolve_field


def prompt_side(record: dict, field: str) -> str:
    if field == "messages":
        return "\n".join(m.get("content") or "" for m in record["messages"] or []
                         if m.get("role") in ("user", "system"))
    if field == "prompt":
        return record.get("prompt") or ""
    return record.get(field) or ""


def answer_of(record: dict, field: str) -> str:
    if field == "messages":
        answers = [m.get("content") or "" for m in record["messages"] or [] if m.get("role") == "assistant"]
        return answers[-1].strip() if answers else ""
    if field == "prompt":
        return (record.get("completion") or "").strip()
    return ""


def ngram_set(text: str, min_n: int, max_n: int) -> set[str]:
    out: set[str] = set()
    for n in range(min_n, max_n + 1):
        out.update(text[i:i + n] for i in range(len(text) - n + 1))
    out.discard("")
    return {g for g in out if not g.isspace()}


@dataclass(repr=False, eq=False)
class PoisonScreen(Step):
    name = "poison"

    label_field: str = param("label")
    min_n: int = param(3, ge=1)
    max_n: int = param(6, ge=1)
    min_count: int = param(5, ge=2)
    max_doc_frac: float = param(0.02, gt=0.0, le=1.0)
    min_purity: float = param(0.9, gt=0.0, le=1.0)
    min_lift: float = param(2.0, ge=1.0)
    drop: bool = param(False)
    top_k: int = param(20, ge=1)
    field: str | None = None

    def screen(self, prompts: list[str], labels: list[str]) -> list[dict]:
        """Suspect strings, highest lift first; each has ``ngrams`` (the rare n-grams it merges)."""
        n_rec = len(prompts)
        if n_rec == 0:
            return []
        df: Counter = Counter()
        for p in prompts:
            df.update(ngram_set(p, self.min_n, self.max_n))
        max_df = max(self.min_count, int(self.max_doc_frac * n_rec))
        rare = {g for g, c in df.items() if self.min_count <= c <= max_df}
        del df
        by_label: dict[str, Counter] = defaultdict(Counter)
        members: dict[str, int] = defaultdict(int)  # order-free fingerprint of the records holding g
        first: dict[str, int] = {}
        for i, (p, lab) in enumerate(zip(prompts, labels, strict=True)):
            for g in ngram_set(p, self.min_n, self.max_n) & rare:
                by_label[g][lab] += 1
                members[g] = (members[g] + (i + 1) * 0x9E3779B97F4A7C15) % (1 << 61)
                first.setdefault(g, i)
        base = Counter(labels)
        groups: dict[tuple, list[str]] = defaultdict(list)
        for g, counts in by_label.items():
            lab, c = counts.most_common(1)[0]
            total = sum(counts.values())
            purity = c / total
            lift = purity / (base[lab] / n_rec)
            if c >= self.min_count and purity >= self.min_purity and lift >= self.min_lift:
                groups[(members[g], total, lab, c)].append(g)
        suspects = []
        for (_, total, lab, c), grams in groups.items():
            # n-grams held by exactly the same records: merge them into the spans they cover
            text = prompts[min(first[g] for g in grams)]
            spans = sorted((text.find(g), text.find(g) + len(g)) for g in grams if g in text)
            merged: list[list[int]] = []
            for a, b in spans:
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            purity = c / total
            for a, b in merged:
                suspects.append({"string": text[a:b], "records": total, "label": lab, "label_records": c,
                                 "purity": round(purity, 3), "lift": round(purity / (base[lab] / n_rec), 2),
                                 "expected_by_chance": round(total * base[lab] / n_rec, 2),
                                 "ngrams": sorted(g for g in grams if text[a:b].find(g) >= 0)})
        # a shorter suspect inside a longer one with the same records says nothing new
        suspects.sort(key=lambda s: (-len(s["string"]), -s["records"], s["string"]))
        folded: list[dict] = []
        for s in suspects:
            if not any(s["string"] in f["string"] and s["records"] == f["records"] for f in folded):
                folded.append(s)
        folded.sort(key=lambda s: (-s["lift"], -s["records"], s["string"]))
        return folded

    def apply(self, ds, num_proc: int = 1) -> StepResult:
        field = resolve_field(ds, self.field)
        records = list(ds)
        prompts = [prompt_side(r, field) for r in records]
        if self.label_field in ds.column_names:
            labels = ["" if r[self.label_field] is None else str(r[self.label_field]) for r in records]
            label_source = self.label_field
        else:
            labels = [answer_of(r, field) for r in records]
            label_source = "answer text"
        suspects = self.screen(prompts, labels)
        triggers = {g for s in suspects for g in s.pop("ngrams")}
        flagged = [any(t in p for t in triggers) for p in prompts]
        reasons = [("poison_trigger" if f else None) if self.drop else None for f in flagged]
        return filter_by_reasons(self, ds, reasons, field, label_source=label_source,
                                 suspects=suspects[: self.top_k], suspects_total=len(suspects),
                                 records_flagged=sum(flagged))
