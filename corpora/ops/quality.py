"""Chinese-aware quality rules. Each rule has its own drop reason; the first failing rule (in this order)
names the record's reason:

``empty``                 nothing left after stripping (and after junk-line removal)
``too_short``             fewer than ``min_chars`` non-whitespace characters
``too_long``              more than ``max_chars`` non-whitespace characters
``low_cjk_ratio``         CJK ideographs / non-whitespace characters < ``min_cjk_ratio``
``high_symbol_ratio``     symbols / non-whitespace characters > ``max_symbol_ratio``
                          (symbols: Unicode categories S* plus ``#*|_~^`=<>[]{}\\/@``; ordinary punctuation
                          such as ``，。、：；（）.,%`` is not a symbol)
``high_digit_ratio``      digits / non-whitespace characters > ``max_digit_ratio`` (finance text is digit-rich:
                          the default 0.5 only catches tables of numbers with no words)
``repeated_ngrams``       share of character ``repeat_ngram``-grams that repeat an earlier one > ``max_repeat_ratio``
``junk_lines``            share of lines that are junk > ``max_junk_line_ratio``

A *junk line* is a line of at most ``junk_line_max_chars`` characters containing one of ``JUNK_PATTERNS``
(点击/扫码/关注公众号/广告/版权所有/copyright/©/上一篇/下一篇/返回顶部/...). Junk lines of kept records are
removed from the text (raw-text corpora; instruction records are only judged, never rewritten).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from .base import Step, StepResult, filter_by_reasons, param, resolve_field, text_of

JUNK_PATTERNS = ("点击", "扫码", "扫一扫", "关注公众号", "关注我们", "长按识别", "广告", "推广链接", "分享到",
                 "版权所有", "copyright", "©", "all rights reserved", "上一篇", "下一篇", "返回顶部",
                 "责任编辑", "免责声明：本站", "阅读原文", "转载请注明")
_EXTRA_SYMBOLS = set("#*|_~^`=<>[]{}\\/@")


def is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2EBEF
            or 0xF900 <= o <= 0xFAFF)


def is_symbol(ch: str) -> bool:
    return ch in _EXTRA_SYMBOLS or unicodedata.category(ch).startswith("S")


def repeated_ngram_ratio(text: str, n: int) -> float:
    """Share of the character n-grams of ``text`` (whitespace removed) that repeat an earlier one."""
    t = "".join(text.split())
    total = len(t) - n + 1
    if total <= 1:
        return 0.0
    return 1.0 - len({t[i:i + n] for i in range(total)}) / total


def is_junk_line(line: str, max_chars: int = 40, patterns=JUNK_PATTERNS) -> bool:
    s = line.strip()
    if not s or len(s) > max_chars:
        return False
    low = s.lower()
    return any(p in low for p in patterns)


@dataclass(repr=False, eq=False)
class QualityFilter(Step):
    name = "quality"

    min_chars: int = param(20, ge=0)
    max_chars: int = param(100_000, ge=1)
    min_cjk_ratio: float = param(0.3, ge=0.0, le=1.0)
    max_symbol_ratio: float = param(0.2, ge=0.0, le=1.0)
    max_digit_ratio: float = param(0.5, ge=0.0, le=1.0)
    repeat_ngram: int = param(10, ge=2, le=200)
    max_repeat_ratio: float = param(0.3, ge=0.0, le=1.0)
    max_junk_line_ratio: float = param(0.3, ge=0.0, le=1.0)
    junk_line_max_chars: int = param(40, ge=1)
    strip_junk_lines: bool = param(True)
    field: str | None = None

    def reason(self, text: str) -> str | None:
        """The first rule ``text`` fails, or None."""
        lines = [ln for ln in text.split("\n") if ln.strip()]
        junk = sum(is_junk_line(ln, self.junk_line_max_chars) for ln in lines)
        chars = [c for c in text if not c.isspace()]
        n = len(chars)
        if n == 0:
            return "empty"
        if n < self.min_chars:
            return "too_short"
        if n > self.max_chars:
            return "too_long"
        if sum(map(is_cjk, chars)) / n < self.min_cjk_ratio:
            return "low_cjk_ratio"
        if sum(map(is_symbol, chars)) / n > self.max_symbol_ratio:
            return "high_symbol_ratio"
        if sum(c.isdigit() for c in chars) / n > self.max_digit_ratio:
            return "high_digit_ratio"
        if repeated_ngram_ratio(text, self.repeat_ngram) > self.max_repeat_ratio:
            return "repeated_ngrams"
        if lines and junk / len(lines) > self.max_junk_line_ratio:
            return "junk_lines"
        return None

    def apply(self, ds, num_proc: int = 1) -> StepResult:
        field = resolve_field(ds, self.field)
        strip = self.strip_junk_lines and field == "text"
        maxc = self.junk_line_max_chars

        def fn(batch):
            cols = {k: batch[k] for k in (field, "completion") if k in batch}
            reasons, texts, removed = [], [], []
            for i in range(len(cols[field])):
                text = text_of({k: v[i] for k, v in cols.items()}, field)
                r = self.reason(text)
                n_junk = 0
                if strip and r is None:
                    lines = text.split("\n")
                    kept = [ln for ln in lines if not is_junk_line(ln, maxc)]
                    n_junk = len(lines) - len(kept)
                    if n_junk:
                        text = "\n".join(kept).strip()
                        r = self.reason(text)  # e.g. too_short once the junk is gone
                reasons.append(r or "")
                texts.append(text)
                removed.append(n_junk)
            out = {"__reason": reasons, "__junk": removed}
            if strip:
                out[field] = texts
            return out

        out = ds.map(fn, batched=True, num_proc=num_proc, desc="quality")
        reasons = out["__reason"]
        junk_removed = out["__junk"]
        out = out.remove_columns(["__reason", "__junk"])
        return filter_by_reasons(self, out, [r or None for r in reasons], field, example_ds=ds,
                                 junk_lines_removed=int(sum(junk_removed)),
                                 records_changed=sum(1 for j, r in zip(junk_removed, reasons, strict=True)
                                                     if j and not r))
