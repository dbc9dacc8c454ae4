"""Text normalisation that is safe for Chinese finance text, and corpus-level boilerplate removal.

Why not plain NFKC: NFKC rewrites the Chinese full-width punctuation ``，：；（）！？`` to ASCII (changing
how every Chinese sentence reads and tokenises), and folds compatibility characters that carry meaning
in finance text (``㎡`` -> ``m2``, ``①`` -> ``1``, ``²`` -> ``2``). :func:`normalize_text` does only this:

1. HTML remnants: entities (``&amp;`` ``&nbsp;`` ``&#20013;``) decoded; tags (``<br>``, ``</p>``, ``<div
   class=..>``) removed, block tags becoming line breaks. A ``<`` not followed by a letter (``金额<5万``)
   is text and stays.
2. Full-width ASCII (U+FF01-U+FF5E: ``ＡＢＣ１２３％＋``) to half-width, EXCEPT the Chinese full-width
   punctuation ``，：；（）！？`` which is kept as is (``。、「」《》【】`` are outside that block and are
   never touched). The ideographic space U+3000 becomes a normal space.
3. Unicode NFC (canonical composition only; no compatibility folding).
4. Control characters (C0/C1 except newline and tab), zero-width characters and BOMs removed;
   ``\\r\\n``/``\\r`` to ``\\n``; tabs and runs of spaces to one space; spaces at line ends removed;
   three or more line breaks to one blank line; leading/trailing whitespace stripped.

:class:`RemoveBoilerplate` drops lines that recur in many distinct documents of a corpus (navigation,
disclaimers, footers). Run it after deduplication: near-duplicate documents share most lines.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from banklm.tasks.base import FULLWIDTH_TO_ASCII as _FW_TABLE  # one table for corpora and serving
from banklm.tasks.base import KEEP_FULLWIDTH  # noqa: F401  (re-exported)

from .base import Step, StepResult, filter_by_reasons, make_stats, map_content, param, resolve_field

_CONTROL = "".join(chr(c) for c in [*range(0, 9), 11, 12, *range(14, 32), 127, *range(0x80, 0xA0)])
_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
_DELETE_TABLE = {ord(c): None for c in _CONTROL + _ZERO_WIDTH}
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|tr|h[1-6]|table|ul|ol|section|article|blockquote|pre)\b[^<>]{0,300}>",
                        re.I)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]{0,30}(?:\s[^<>]{0,300})?/?>|<!--.*?-->", re.S)
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f]+")
_MANY_BREAKS = re.compile(r"\n{3,}")


def normalize_text(text: str, fullwidth: bool = True, html_remnants: bool = True) -> str:
    """Normalise one text as described in the module docstring (idempotent)."""
    if not text:
        return ""
    if html_remnants and ("<" in text or "&" in text):
        text = _BLOCK_TAG.sub("\n", text)
        text = _TAG.sub("", text)
        text = html.unescape(text)
    if fullwidth:
        text = text.translate(_FW_TABLE)
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_DELETE_TABLE)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip(" ") for line in text.split("\n"))
    text = _MANY_BREAKS.sub("\n\n", text)
    return text.strip()


@dataclass(repr=False, eq=False)
class Normalize(Step):
    """Rewrite the content with :func:`normalize_text`; reports how many records changed."""

    name = "normalize"

    fullwidth: bool = param(True)
    html_remnants: bool = param(True)
    field: str | None = None

    def apply(self, ds, num_proc: int = 1) -> StepResult:
        field = resolve_field(ds, self.field)
        fw, hr = self.fullwidth, self.html_remnants

        def fn(rec):
            out = map_content(rec, field, lambda t: normalize_text(t, fw, hr))
            out["__changed"] = any(out[k] != rec[k] for k in out)
            return out

        out = ds.map(fn, num_proc=num_proc, desc="normalize")
        changed = sum(out["__changed"])
        out = out.remove_columns("__changed")
        return StepResult(out, make_stats(self, len(ds), len(out), records_changed=changed))


def _line_key(line: str) -> str:
    return hashlib.blake2b(line.strip().encode("utf-8"), digest_size=8).hexdigest()


@dataclass(repr=False, eq=False)
class RemoveBoilerplate(Step):
    """Remove lines found in at least ``max(min_docs, min_fraction * N)`` distinct documents.

    Lines shorter than ``min_line_chars`` (after stripping) are never counted nor removed (short headings
    such as ``第一章`` recur legitimately). Exact duplicate documents count once. A document left empty
    is dropped with reason ``only_boilerplate``. Text corpora only (``text`` column).
    """

    name = "boilerplate"

    min_docs: int = param(3, ge=2)
    min_fraction: float = param(0.0, ge=0.0, le=1.0)
    min_line_chars: int = param(4, ge=1)
    field: str | None = None

    def apply(self, ds, num_proc: int = 1) -> StepResult:
        field = resolve_field(ds, self.field)
        if field != "text":
            raise ValueError(f"{self.name}: works on raw text corpora (a 'text' column), got '{field}'")
        min_chars = self.min_line_chars
        doc_seen: set[str] = set()
        line_docs: Counter = Counter()
        for text in ds[field]:
            dk = hashlib.blake2b((text or "").encode("utf-8"), digest_size=8).hexdigest()
            if dk in doc_seen:
                continue
            doc_seen.add(dk)
            line_docs.update({_line_key(ln) for ln in (text or "").split("\n") if len(ln.strip()) >= min_chars})
        threshold = max(self.min_docs, math.ceil(self.min_fraction * len(doc_seen)))
        boiler = {k for k, c in line_docs.items() if c >= threshold}

        def fn(rec):
            lines = (rec[field] or "").split("\n")
            kept = [ln for ln in lines if len(ln.strip()) < min_chars or _line_key(ln) not in boiler]
            removed = len(lines) - len(kept)
            text = _MANY_BREAKS.sub("\n\n", "\n".join(kept)).strip() if removed else rec[field]
            return {field: text, "__removed": removed}

        if not boiler:
            return filter_by_reasons(self, ds, [None] * len(ds), field, boilerplate_lines=0, lines_removed=0,
                                     records_changed=0, threshold_docs=threshold, top_lines=[])
        out = ds.map(fn, num_proc=num_proc, desc="boilerplate")
        removed = out["__removed"]
        # a few of the removed lines, for the card (they recur in many documents: not private to one)
        top: list[str] = []
        for text in ds[field]:
            for ln in (text or "").split("\n"):
                if len(ln.strip()) >= min_chars and _line_key(ln) in boiler and ln.strip()[:80] not in top:
                    top.append(ln.strip()[:80])
            if len(top) >= 5:
                break
        reasons = [None if (t or "").strip() else "only_boilerplate" for t in out[field]]
        out = out.remove_columns("__removed")
        return filter_by_reasons(self, out, reasons, field, example_ds=ds, boilerplate_lines=len(boiler),
                                 lines_removed=int(sum(removed)),
                                 records_changed=sum(1 for r in removed if r), threshold_docs=threshold,
                                 top_lines=top)
