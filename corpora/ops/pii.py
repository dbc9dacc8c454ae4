"""PII de-identification for Chinese banking text: detect, then replace, pseudonymise or drop.

Pure Python (``re`` + ``hmac``). Every detector is one precompiled regex pass whose candidates are then
validated in Python (check digits, dates, region codes, context), so only checksum-valid identifiers
are replaced and serial numbers, amounts, dates and citations that merely look numeric are kept.

Types: ``ID_CARD`` ``PHONE`` ``BANK_CARD`` ``ACCOUNT`` ``USCC`` ``PASSPORT`` ``PLATE`` ``EMAIL``
``PERSON`` ``ADDRESS`` (see ``docs/pii.md`` for the exact rules and the known gaps). Person names come
from ``persons.py`` (surname lexicon + context cues + romanised names; lexicons in ``names.py``).

Overlaps are resolved longest span first, then by specificity (checksum-validated types before
context-only ones). Detection always runs for every type, so an identifier kept on purpose (e.g. a
company's USCC when ``types`` leaves it out) is never partly rewritten by another detector.

Modes
    ``placeholder``  ``<ID_CARD>``
    ``pseudonym``    ``<ID_CARD_1a2b3c4d>``: the first 8 hex digits of HMAC-SHA256(key, type, normalised
                     value[, salt]); same value + same key -> same pseudonym across documents and runs.
                     The key comes from ``key=`` or the environment variable ``BANKLM_PII_KEY``; it is
                     never written anywhere.
    ``drop``         a text with PII is not returned (``None``); the caller drops and counts the record.

Nothing here logs, stores or returns a detected value except :func:`find_pii` (in memory, to the caller).
Quarantined lines are identified by a keyed digest (HMAC, :func:`quarantine_key`), never by content.
"""

from __future__ import annotations

import bisect
import codecs
import datetime as _dt
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from banklm.io import atomic_open

from ..sources import Bad, decode_line, detect_encoding  # the one encoding detector of every reader
from .persons import find_persons

__all__ = [
    "ALL_TYPES", "DEFAULT_KEY_ENV", "MODES", "PIIError", "PIIKeyError", "PIIInputError", "MissingField",
    "Span", "find_pii", "scrub_text", "scrub_record", "scrub_jsonl", "detect_encoding", "quarantine_key",
    "QUARANTINE_DIGEST_CONTEXT",
]

ALL_TYPES = ("ID_CARD", "PHONE", "BANK_CARD", "ACCOUNT", "USCC", "PASSPORT", "PLATE", "EMAIL", "PERSON",
             "ADDRESS")
MODES = ("placeholder", "pseudonym", "drop")
_MODE_ALIASES = {"hash": "pseudonym"}  # "hash" is accepted as another name for pseudonym
DEFAULT_KEY_ENV = "BANKLM_PII_KEY"
PSEUDONYM_HEX = 8

# lower = more specific; used to break ties between spans of equal length
_PRIORITY = {"ID_CARD": 0, "USCC": 1, "BANK_CARD": 2, "PASSPORT": 3, "PHONE": 4, "EMAIL": 5, "PLATE": 6,
             "ACCOUNT": 7, "ADDRESS": 8, "PERSON": 9}


class PIIError(ValueError):
    """Base class of the errors raised here (messages never contain a detected value)."""


class PIIKeyError(PIIError):
    """Pseudonym mode without a key."""


class PIIInputError(PIIError):
    """An input file that cannot be read at all (missing, unreadable, unsupported encoding)."""


class MissingField(PIIError, KeyError):
    """A record lacks a field to scrub, or the field has the wrong type."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, order=True)
class Span:
    start: int
    end: int
    type: str
    text: str  # the detected value: keep it in memory, never write it out

    def __repr__(self) -> str:  # a repr in a traceback or log must not leak the value
        return f"Span({self.start}, {self.end}, {self.type!r})"


# ------------------------------------------------------------------------------------------ helpers

_CJK = r"\u4e00-\u9fff"
_ALNUM_GUARD_L = r"(?<![0-9A-Za-z])"
_ALNUM_GUARD_R = r"(?![0-9A-Za-z])"

# full-width digits/letters/@+- and the ideographic space map 1:1 to ASCII, so offsets stay valid
_FW_FROM = "０１２３４５６７８９ＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＸＹＺａｂｃｄｅｆｇｈｉｊｋｌｍｎｏｐｑｒｓｔｕｖｗｘｙｚ＠＋－\u3000"
_FW_TO = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz@+- "
_FW_TABLE = str.maketrans(_FW_FROM, _FW_TO)
_FW_RE = re.compile(f"[{re.escape(_FW_FROM)}]")


_NON_DIGIT_RE = re.compile(r"[^0-9]+")


def _digits(s: str) -> str:
    return _NON_DIGIT_RE.sub("", s)


def _luhn_ok(num: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(num)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# GB 11643-1999: ISO 7064 MOD 11-2
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_PROVINCES = frozenset({11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46,
                        50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83})


def id_check_char(first17: str) -> str:
    return _ID_CHECK[sum(int(c) * w for c, w in zip(first17[:17], _ID_WEIGHTS, strict=True)) % 11]


def _valid_date(y: int, m: int, d: int) -> bool:
    try:
        day = _dt.date(y, m, d)
    except ValueError:
        return False
    return _dt.date(1900, 1, 1) <= day <= _dt.date.today()


def valid_id18(s: str) -> bool:
    s = s.upper()
    if len(s) != 18 or not s[:17].isdigit() or int(s[:2]) not in _PROVINCES:
        return False
    if not _valid_date(int(s[6:10]), int(s[10:12]), int(s[12:14])):
        return False
    return id_check_char(s[:17]) == s[17]


def valid_id15(s: str) -> bool:
    return (len(s) == 15 and s.isdigit() and int(s[:2]) in _PROVINCES
            and _valid_date(1900 + int(s[6:8]), int(s[8:10]), int(s[10:12])))


# GB 32100-2015: 31-character alphabet without I, O, Z, S, V; weights 3^i mod 31
_USCC_ALPHA = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_VAL = {c: i for i, c in enumerate(_USCC_ALPHA)}
_USCC_WEIGHTS = tuple(pow(3, i, 31) for i in range(17))


def uscc_check_char(first17: str) -> str:
    return _USCC_ALPHA[(31 - sum(_USCC_VAL[c] * w for c, w in zip(first17[:17], _USCC_WEIGHTS, strict=True)) % 31) % 31]


def valid_uscc(s: str) -> bool:
    if len(s) != 18 or any(c not in _USCC_VAL for c in s) or not s[2:8].isdigit() or s[2] in "09":
        return False
    return uscc_check_char(s[:17]) == s[17]


def _card_prefix_ok(num: str) -> bool:
    if num[0] == "4" or num[:2] == "62":
        return True
    p2, p4 = int(num[:2]), int(num[:4])
    return 51 <= p2 <= 55 or 2221 <= p4 <= 2720 or 3528 <= p4 <= 3589 or num[:4] in ("9558", "6013")


def valid_card(num: str) -> bool:
    return 16 <= len(num) <= 19 and num.isdigit() and _card_prefix_ok(num) and _luhn_ok(num)


# numbers anyone may call: never PII
_PUBLIC_NUMBERS = frozenset({
    "110", "119", "120", "122", "12110", "12315", "12345", "12318", "12321", "12333", "12358", "12363",
    "12366", "12368", "12378", "12381", "10086", "10010", "10000", "10050", "114", "121", "12306", "12395",
})


def _is_public_number(digits: str) -> bool:
    return (digits in _PUBLIC_NUMBERS or (len(digits) == 5 and digits[:2] in ("95", "96"))
            or (len(digits) == 10 and digits[:3] in ("400", "800")))


# -------------------------------------------------------------------------------------- detectors
# Each detector: (compiled regex, validator(match) -> list[(start, end)] ) -- one pass per detector.

# (patterns start with a character class, the look-behind guard after it: lets ``re`` skip ahead fast)
_ID_RE = re.compile(
    r"[1-8](?<![0-9A-Za-z][1-8])"
    r"(?:\d{5}[ ]?(?:18|19|20)\d{2}[01]\d[0-3]\d[ ]?\d{3}[0-9Xx]|\d{5}\d{2}[01]\d[0-3]\d\d{3})"
    + _ALNUM_GUARD_R)


def _v_id(m: re.Match) -> bool:
    s = m.group().replace(" ", "")
    return valid_id18(s) if len(s) == 18 else valid_id15(s)


_MOBILE_RE = re.compile(
    r"(?<![0-9A-Za-z+\-])(?:(?:\+|00)86[\- ]?|\(\+?86\)[\- ]?|（\+?86）[\- ]?|86-)?"
    r"1[3-9]\d(?:[\- ]?\d{4}){2}(?![0-9A-Za-z]|[.,]\d)")
_AREA = r"0(?:10|2\d|[3-9]\d{2})"
_AREA_NO0 = r"(?:10|2\d|[3-9]\d{2})"
_COUNTRY = r"(?:\+[ ]?86|0086|86)"
_SUBSCRIBER = r"(?:[2-9]\d{2,3}[\- ]?\d{4}|[2-9]\d{3}[\- ]\d{3})"  # 7-8 digits, maybe split 3-4 / 4-4 / 4-3
_EXT = r"(?:[ ]?(?:转|分机|内线|ext\.?|Ext\.?|EXT\.?|x|X)[ ]?\d{1,6}|-\d{1,6})?"
# 010-65881234, (0755) 8600 1234, +86 10 6588 1234, 86-10-65881234, 0086-571-87654321, +86 (21) 62345678,
# (+86)0571-87654321, +8657187654321, each with an optional extension (转123, ext. 123, -123)
_LANDLINE_RE = re.compile(
    r"(?<![0-9A-Za-z+\-])(?:"
    r"(?:" + _COUNTRY + r"[\- ]?)?(?:" + _AREA + r"[\- ]|[(（]" + _AREA + r"[)）][ \-]?)"
    r"|" + _COUNTRY + r"[\- ]?" + _AREA_NO0 + r"[\- ]"
    r"|" + _COUNTRY + r"[\- ]?[(（]0?" + _AREA_NO0 + r"[)）][ \-]?"
    r"|" + _COUNTRY + r"[\- ]?[(（]0[)）][ ]?" + _AREA_NO0 + r"[\- ]"
    r"|[(（]\+?86[)）][\- ]?" + _AREA + r"[\- ]?"
    r"|(?:\+[ ]?86|0086)[ ]?" + _AREA_NO0 + r"(?=[2-9]\d{6,7}(?!\d))"
    r")" + _SUBSCRIBER + _EXT + r"(?![0-9A-Za-z])")
# an unseparated landline only after a phone word: 电话：02112345678, Tel 075586001234
_LANDLINE_CTX_RE = re.compile(
    r"(?:电话|座机|固话|传真|联系方式|号码|致电|拨打|回电|[Tt]el|TEL|[Pp]hone|PHONE|[Ff]ax|FAX)(?:号码)?[.：:（()）\w]{0,6}?[ ]?"
    r"(" + _AREA + r"[2-9]\d{6,7}" + _EXT + r")(?![0-9A-Za-z])")


def _v_phone(m: re.Match) -> bool:
    return not _is_public_number(_digits(m.group()))


_CARD_RE = re.compile(
    r"\d(?<![0-9A-Za-z\-]\d)(?:\d{15,18}|\d{3}(?:[ \-]\d{4}){3}(?:[ \-]\d{1,3})?|\d{5}[ \-]\d{10,13})"
    r"(?![0-9A-Za-z]|[.,]\d|-\d)")


def _v_card(m: re.Match) -> tuple[int, int] | None:
    s = m.group()
    if valid_card(_digits(s)):
        return m.span()
    # a grouped 4-4-4-4 card followed by a short unrelated group: try without the tail
    cut = max(s.rfind(" "), s.rfind("-"))
    if cut == 19 and valid_card(_digits(s[:cut])):
        return m.start(), m.start() + cut
    return None


_ACCOUNT_KW = (r"(?:收款账户|付款账户|收款账号|付款账号|收款帐号|付款帐号|银行账号|银行账户|结算账户|对公账户|"
               r"基本户|一般户|卡号|账号|账户|帐号|帐户|"
               r"[Aa]ccount\s*(?:[Nn]o\.?|[Nn]umber|#)|[Aa]/[Cc](?:\s*[Nn]o\.?)?)")
_ACCOUNT_RE = re.compile(
    _ACCOUNT_KW + r"[ \t:：#为是]*(?:[（(][^）)\n\d]{1,20}[）)][ \t:：]*)?"
    r"(\d(?:[ \-]?\d){7,29})(?![0-9A-Za-z]|[.,]\d|\s?[元万亿%])")

_USCC_RE = re.compile(r"[1-9ANY](?<![0-9A-Za-z][1-9ANY])[1-9]\d{6}[0-9A-HJ-NPQRTUWXY]{10}(?![0-9A-Za-z])")

# anywhere: Chinese ordinary passports E/G + 8 digits and E + letter + 7 digits; after a document word:
# 1-2 letters + 6-10 digits (HK/Macau permits C..., home-return permits H/M..., foreign passports) or
# 8-10 digits (Taiwan compatriot permits, some foreign passports)
_PASSPORT_RE = re.compile(
    r"[EG](?<![0-9A-Za-z][EG])\d{8}(?![0-9A-Za-z])"
    r"|E(?<![0-9A-Za-z]E)[A-HJ-NP-Z]\d{7}(?![0-9A-Za-z])"
    r"|(?:护照|通行证|回乡证|旅行证|签证|台胞证|居留证|[Pp]assport|PASSPORT)"
    r"(?:[，,]?[ ]?(?:号码|号|[Nn]o\.?|NO\.?|[Nn]umber|#))?[ \t:：（(#为是]{0,3}"
    r"([A-Z]{1,2}\d{6,10}|\d{8,10})(?![0-9A-Za-z])")

_PROV = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
_PLATE_RE = re.compile(
    f"[{_PROV}]" + r"[A-HJ-NP-Z][·•\- ]?(?:([A-HJ-NP-Z0-9]{4})[挂学警港澳]|([A-HJ-NP-Z0-9]{5,6}))(?![0-9A-Za-z])")


def _v_plate(m: re.Match) -> bool:
    if m.group(1) is not None:  # trailer / learner / police / HK-Macau plates: 4 + a special character
        return sum(c.isdigit() for c in m.group(1)) >= 3
    t = m.group(2)
    if len(t) == 5:
        return sum(c.isdigit() for c in t) >= 3
    return (t[0] in "DF" and t[2:].isdigit()) or (t[5] in "DF" and t[:5].isdigit())


_EMAIL_RE = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62})"
                       r"(?:\.[A-Za-z0-9\-]{1,63})*\.[A-Za-z]{2,24}(?![A-Za-z0-9])")

# ---- person names: see persons.py (lexicons in names.py) -------------------------------------------

# ---- addresses --------------------------------------------------------------------------------

_CN_NUM = "〇零一二三四五六七八九十百千两"
_ADDR_NUM = r"(?:\d{1,5}(?:-\d{1,5})?|[" + _CN_NUM + r"]{1,7})"
# anchors: a street number (建设路88号, 八一北街十二号, 500弄), a building + unit/floor/room (5号楼1单元,
# 十二号楼三单元), or an estate's building-unit-room triple (幸福里小区3-2-501室)
_ADDR_ANCHOR_RE = re.compile(
    r"(?:(?:路|街|大道|道|巷|弄|胡同|里|村|组|屯|社区|公路)[ ]?(" + _ADDR_NUM + r")[ ]?[号弄]"
    r"|(?<=[" + _CJK + r"A-Za-z])(" + _ADDR_NUM + r")[ ]?(?:号楼|栋|幢|座)[ ]?" + _ADDR_NUM + r"(?:单元|层|楼|室|号)"
    r"|(?<=[" + _CJK + r"])(\d{1,3}-\d{1,2}-\d{3,4})室?(?![\d\-]))")
_ADDR_TAIL_RE = re.compile(
    r"(?:[^\W\d_的了在是于为和与及或向从说称已将]{0,10}?[A-Za-z0-9" + _CN_NUM + r"]{1,6}[ ]?"
    r"(?:号楼|号院|栋|幢|座|单元|楼|层|室|号|户|院)"
    r"(?:[ ]?(?:\d{1,5}(?:-\d{1,5})?|[" + _CN_NUM + r"]{1,5})(?:室|号|户)?)?)*"
    r"(?:(?:(?<=单元)|(?<=[楼层座栋幢]))[ ]?\d{2,5}(?![\d\-年月日万元%.]))?")
_EN_ROAD = r"(?:Road|Rd\.?|Street|St\.?|Avenue|Ave\.?|Lane|Boulevard|Blvd\.?|Lu|Jie|Dajie|Hutong)"
_EN_ADDR_RE = re.compile(
    r"(?:(?:Room|Rm\.?|Flat|Unit|Suite|Apt\.?)[ ]?\d{1,5}[A-Z]?,?[ ]+)?"
    r"(?:(?:Building|Bldg\.?|Block|Tower)[ ]?\d{1,3}[A-Z]?,?[ ]+)?"
    r"(?:No\.[ ]?)?\d{1,5}(?:-\d{1,5})?,?[ ]+(?:[A-Z][a-z]+[ ]){1,3}" + _EN_ROAD + r"(?![A-Za-z])"
    r"|(?:Room|Rm\.?|Flat|Unit|Suite|Apt\.?)[ ]?\d{1,5}[A-Z]?,?[ ]+(?:Building|Bldg\.?|Block|Tower)[ ]?\d{1,3}[A-Z]?")
# every address anchor needs one of these: skip the address pass on text without them
_ADDR_GATE_CJK = re.compile(r"[号弄栋幢座室]")
_ADDR_GATE_DASHED = re.compile(r"\d-\d{1,2}-\d")
_EN_ADDR_HINT = re.compile(r"Road|Rd\.|Street|Avenue|Lane|Room|Flat|Building|Block|Tower|Lu\b|Jie\b")
_ADMIN_SUFFIX = frozenset("省市区县旗州盟镇乡")
_ADDR_STOP1 = frozenset("在于到至往为是从住址的及与或向位居现原即系：:，,。；;、（()）【】《》\"'“”‘’ 　\t\n的了他她我你说称")
_ADDR_STOP2 = ("地址", "住址", "位于", "住在", "家住", "居住", "户籍", "地点", "现居")


def _is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff"


def _extend_left(text: str, k: int, limit: int) -> int:
    """Walk left from ``k`` over at most ``limit`` CJK chars, stopping at stop words/punctuation."""
    n = 0
    while k > 0 and n < limit:
        c = text[k - 1]
        if not (_is_cjk(c) or c.isalnum()) or c in _ADDR_STOP1 or text[max(0, k - 2):k] in _ADDR_STOP2:
            break
        if c in _ADMIN_SUFFIX and n > 0:
            break
        k -= 1
        n += 1
    return k


def _find_addresses(text: str) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for m in _ADDR_ANCHOR_RE.finditer(text):
        a = m.start() if m.group(1) is not None else m.start(2) if m.group(2) is not None else m.start(3)
        # road / estate name: up to 8 chars, stopping after an admin unit (区, 市, ...)
        k = _extend_left(text, a, 8)
        if k == a and m.group(1) is not None and m.group().startswith(("路", "街", "道")):
            continue  # "路3号" with no name before it
        # then whole admin chunks: 朝阳区, 北京市, 广东省 ...
        while k > 0 and text[k - 1] in _ADMIN_SUFFIX:
            k2 = _extend_left(text, k - 1, 7)
            if k2 >= k - 1:
                break
            k = k2
        t = _ADDR_TAIL_RE.match(text, m.end())
        out.append((k, t.end() if t else m.end()))
    if _EN_ADDR_HINT.search(text):
        out += [m.span() for m in _EN_ADDR_RE.finditer(text)]
    return _merge_touching(out)


def _merge_touching(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """One span per address: a street number and the building after it are found by two anchors."""
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


# ------------------------------------------------------------------------------------ detection


def _regex_spans(regex: re.Pattern, text: str, validator=None, group: int | None = None):
    for m in regex.finditer(text):
        if validator is not None:
            r = validator(m)
            if not r:
                continue
            if isinstance(r, tuple):
                yield r
                continue
        if group is not None and m.group(group) is not None:
            yield m.span(group)
        else:
            yield m.span()


# every numeric identifier has >= 7 digits with at most single separators between them
_NUM_PREFILTER = re.compile(r"\d(?:[ \-]?\d){6}")


def _candidates(text: str) -> Iterator[tuple[int, int, str]]:
    others = list(_other_candidates(text))
    yield from others
    # a text with a phone, an ID, an e-mail ... is about people: the name recognizer may then spend its slow
    # statistical second opinion (LAC) on doubtful names there
    for s, e in find_persons(text, about_people=bool(others)):
        yield s, e, "PERSON"


def _other_candidates(text: str) -> Iterator[tuple[int, int, str]]:
    if _NUM_PREFILTER.search(text):
        for s, e in _regex_spans(_ID_RE, text, _v_id):
            yield s, e, "ID_CARD"
        for s, e in _regex_spans(_MOBILE_RE, text, _v_phone):
            yield s, e, "PHONE"
        for s, e in _regex_spans(_LANDLINE_RE, text, _v_phone):
            yield s, e, "PHONE"
        for m in _LANDLINE_CTX_RE.finditer(text):
            if not _is_public_number(_digits(m.group(1))):
                yield m.start(1), m.end(1), "PHONE"
        for s, e in _regex_spans(_CARD_RE, text, _v_card):
            yield s, e, "BANK_CARD"
        for m in _ACCOUNT_RE.finditer(text):
            if not _is_public_number(_digits(m.group(1))):
                yield m.start(1), m.end(1), "ACCOUNT"
        for s, e in _regex_spans(_USCC_RE, text, lambda m: valid_uscc(m.group())):
            yield s, e, "USCC"
        for s, e in _regex_spans(_PASSPORT_RE, text, None, group=1):
            yield s, e, "PASSPORT"
    if any(c in text for c in "0123456789"):
        for s, e in _regex_spans(_PLATE_RE, text, _v_plate):
            yield s, e, "PLATE"
    if _ADDR_GATE_CJK.search(text) or ("-" in text and _ADDR_GATE_DASHED.search(text)) or _EN_ADDR_HINT.search(text):
        for s, e in _find_addresses(text):
            yield s, e, "ADDRESS"
    if "@" in text:
        for s, e in _regex_spans(_EMAIL_RE, text):
            yield s, e, "EMAIL"


def _resolve(cands: Iterable[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Non-overlapping spans: longest first, then most specific type, then leftmost."""
    order = sorted(set(cands), key=lambda c: (c[0] - c[1], _PRIORITY[c[2]], c[0]))
    starts: list[int] = []
    ends: list[int] = []
    kept: list[tuple[int, int, str]] = []
    for s, e, t in order:
        if e <= s:
            continue
        i = bisect.bisect_right(starts, s)
        if i > 0 and ends[i - 1] > s:  # previous accepted span reaches into this one
            continue
        if i < len(starts) and starts[i] < e:  # next accepted span starts inside this one
            continue
        starts.insert(i, s)
        ends.insert(i, e)
        kept.append((s, e, t))
    kept.sort()
    return kept


def _check_types(types: Iterable[str] | None) -> frozenset[str]:
    if types is None:
        return frozenset(ALL_TYPES)
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",") if t.strip()]
    sel = frozenset(t.upper() for t in types)
    bad = sorted(sel - set(ALL_TYPES))
    if bad:
        raise PIIError(f"unknown PII type {bad[0]!r} (known: {', '.join(ALL_TYPES)})")
    return sel


def find_pii(text: str, types: Iterable[str] | None = None) -> list[Span]:
    """Non-overlapping PII spans of ``text`` sorted by position (all types, or only ``types``)."""
    if not text:
        return []
    sel = _check_types(types)
    shadow = text.translate(_FW_TABLE) if _FW_RE.search(text) else text
    return [Span(s, e, t, text[s:e]) for s, e, t in _resolve(_candidates(shadow)) if t in sel]


# ---------------------------------------------------------------------------------------- scrubbing


def _resolve_key(key: str | bytes | None, key_env: str = DEFAULT_KEY_ENV) -> bytes:
    if key is None:
        key = os.environ.get(key_env) or None
        if key is None:
            raise PIIKeyError(f"pseudonym mode needs a secret key: set the environment variable {key_env} "
                              "(it is only read, never written anywhere)")
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not key:
        raise PIIKeyError("pseudonym mode needs a non-empty secret key")
    return key


def _normalise(value: str, type_: str) -> str:
    v = value.translate(_FW_TABLE)
    if type_ in ("ID_CARD", "BANK_CARD", "ACCOUNT", "USCC", "PASSPORT", "PLATE"):
        return re.sub(r"[\s\-·•]", "", v).upper()
    if type_ == "PHONE":
        d = _digits(re.split(r"转|分机|ext|EXT|[xX]", v)[0])
        if d.startswith("0086"):
            d = d[4:]
        elif d.startswith("86") and len(d) >= 12:
            d = d[2:]
        if d and d[0] != "0" and not (len(d) == 11 and d[0] == "1" and d[1] in "3456789"):
            d = "0" + d  # +86 10 xxxxxxxx -> 010xxxxxxxx
        return d
    if type_ == "EMAIL":
        return v.lower()
    if type_ == "PERSON" and v.isascii():
        # Li Yirong, LI Yirong, Yirong Li, Li Yi-rong: one person, one pseudonym
        return " ".join(sorted(re.sub(r"[\-.]", "", v).lower().split()))
    return re.sub(r"\s", "", v)


def pseudonym(value: str, type_: str, key: bytes, salt: str = "") -> str:
    msg = f"{type_}\x00{_normalise(value, type_)}\x00{salt}".encode()
    return f"<{type_}_{hmac.new(key, msg, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]}>"


def scrub_text(text: str, mode: str = "placeholder", types: Iterable[str] | None = None,
               key: str | bytes | None = None, *, salt: str = "",
               key_env: str = DEFAULT_KEY_ENV) -> tuple[str | None, dict[str, int]]:
    """Return ``(new_text, {type: count})``.

    In ``drop`` mode ``new_text`` is ``None`` when any selected PII is found (else the text unchanged).
    ``salt`` (pseudonym mode) narrows consistency, e.g. to one document by passing its id.
    """
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise PIIError(f"unknown mode {mode!r} (allowed: {', '.join(MODES)})")
    kbytes = _resolve_key(key, key_env) if mode == "pseudonym" else b""
    spans = find_pii(text, types)
    counts: dict[str, int] = {}
    for sp in spans:
        counts[sp.type] = counts.get(sp.type, 0) + 1
    if not spans:
        return text, counts
    if mode == "drop":
        return None, counts
    parts: list[str] = []
    pos = 0
    for sp in spans:
        parts.append(text[pos:sp.start])
        parts.append(pseudonym(sp.text, sp.type, kbytes, salt) if mode == "pseudonym" else f"<{sp.type}>")
        pos = sp.end
    parts.append(text[pos:])
    return "".join(parts), counts


def _merge(into: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


def scrub_record(record: dict, fields: str | Sequence[str] = ("text",), mode: str = "placeholder",
                 types: Iterable[str] | None = None, key: str | bytes | None = None, *,
                 salt: str = "", key_env: str = DEFAULT_KEY_ENV) -> tuple[dict | None, dict[str, int]]:
    """Scrub ``fields`` of one record; return ``(new_record, counts)`` (``None`` when dropped).

    A ``messages`` field (``[{role, content}]``) has every message's content scrubbed. Other fields are
    copied unchanged. Raises :class:`MissingField` when a field is absent or has the wrong type.
    """
    mode = _MODE_ALIASES.get(mode, mode)
    if isinstance(fields, str):
        fields = (fields,)
    if "prompt" in fields and "completion" in record and "completion" not in fields:
        fields = (*fields, "completion")  # prompt/completion records: the answer is scrubbed too
    if mode == "pseudonym":
        key = _resolve_key(key, key_env)
    sel = _check_types(types)
    out = dict(record)
    counts: dict[str, int] = {}
    dropped = False
    for f in fields:
        if f not in record:
            raise MissingField(f"missing field '{f}'")
        value = record[f]
        if isinstance(value, str):
            new, c = scrub_text(value, mode, sel, key, salt=salt, key_env=key_env)
            _merge(counts, c)
            dropped |= new is None
            out[f] = new
        elif isinstance(value, list) and all(isinstance(m, dict) for m in value):
            msgs = []
            for idx, m in enumerate(value):
                content = m.get("content", m.get("value"))  # value: ShareGPT {from, value}
                ckey = "content" if "content" in m else "value"
                if content is None:
                    msgs.append(dict(m))
                    continue
                if not isinstance(content, str):
                    raise MissingField(f"field '{f}' message {idx}: {ckey} is {type(content).__name__}, "
                                       "expected a string")
                new, c = scrub_text(content, mode, sel, key, salt=salt, key_env=key_env)
                _merge(counts, c)
                dropped |= new is None
                msgs.append({**m, ckey: new})
            out[f] = msgs
        else:
            raise MissingField(f"field '{f}' is {type(value).__name__}, expected a string or a messages list")
    return (None if dropped else out), counts


# -------------------------------------------------------------------------------------------- files

QUARANTINE_DIGEST_CONTEXT = b"banklm pii quarantine line digest v1"


def quarantine_key(key: str | bytes | None = None, key_env: str = DEFAULT_KEY_ENV) -> tuple[bytes, str]:
    """``(key, source)`` for the digests of quarantined lines.

    A plain SHA-256 of a line that holds only an identifier (an 18-digit ID, an 11-digit mobile) is
    reversed by hashing every candidate, so the digest is an HMAC. Its key is derived from the PII key
    (``key=`` or ``$BANKLM_PII_KEY``) when one is set, so digests of one line match across runs with the
    same key; otherwise it is a random per-run secret that is never stored, so digests only match within
    one run. ``source`` names where the key came from (never the key)."""
    raw = key if key is not None else os.environ.get(key_env) or None
    if raw:
        base = raw.encode("utf-8") if isinstance(raw, str) else raw
        source = "key argument" if key is not None else f"${key_env}"
        return hmac.new(base, QUARANTINE_DIGEST_CONTEXT, hashlib.sha256).digest(), f"derived from {source}"
    return secrets.token_bytes(32), "random per run (not stored)"


def _line_digest(qkey: bytes, raw: bytes) -> str:
    return hmac.new(qkey, raw, hashlib.sha256).hexdigest()


def scrub_jsonl(in_path: str | os.PathLike, out_path: str | os.PathLike, field: str | Sequence[str] = "text",
                mode: str = "placeholder", quarantine_path: str | os.PathLike | None = None,
                types: Iterable[str] | None = None, key: str | bytes | None = None, *,
                scope: str = "corpus", key_env: str = DEFAULT_KEY_ENV) -> dict:
    """Scrub one JSONL file into ``out_path`` (UTF-8); return stats.

    ``field`` is one field name, a comma-separated list (``instruction,input,output``) or a sequence;
    ``messages`` scrubs every message's content, ``prompt`` also scrubs ``completion``.

    Malformed lines, non-object lines, undecodable lines and records missing ``field`` go to the
    quarantine file (default ``<out>.quarantine.jsonl``) as ``{file, line, reason, line_hmac}`` --
    never their content; ``line_hmac`` is keyed (see :func:`quarantine_key`), so a line holding only an
    identifier cannot be recovered by hashing candidates. ``records_in == kept + dropped + quarantined``; blank lines are not records.
    ``scope="document"`` makes pseudonyms consistent within a record only (salted with its ``id``).
    """
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise PIIError(f"unknown mode {mode!r} (allowed: {', '.join(MODES)})")
    if scope not in ("corpus", "document"):
        raise PIIError(f"unknown scope {scope!r} (allowed: corpus, document)")
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise PIIInputError(f"{in_path}: no such file")
    if not os.access(in_path, os.R_OK):
        raise PIIInputError(f"{in_path}: not readable")
    qpath = Path(quarantine_path) if quarantine_path else _default_quarantine(out_path)
    sel = _check_types(types)
    kbytes = _resolve_key(key, key_env) if mode == "pseudonym" else None
    qkey, qkey_source = quarantine_key(key, key_env)
    try:  # as `banklm corpus build` reads it: utf-8(-sig), gb18030, or mixed (each line UTF-8, else GB18030)
        enc = detect_encoding(in_path)
    except Bad as e:
        raise PIIInputError(f"{in_path}: {e.reason}") from None
    line_enc = "utf-8" if enc == "utf-8-sig" else enc
    fields = tuple(f.strip() for f in field.split(",") if f.strip()) if isinstance(field, str) else tuple(field)
    counts: dict[str, int] = {}
    stats = {"input": str(in_path), "output": str(out_path), "quarantine_file": str(qpath), "mode": mode,
             "fields": list(fields), "types": [t for t in ALL_TYPES if t in sel], "encoding": enc,
             "records_in": 0, "kept": 0, "dropped": 0, "quarantined": 0, "records_with_pii": 0,
             "blank_lines": 0, "bytes_in": 0, "counts": counts, "quarantine_reasons": {},
             "quarantine_digest": f"HMAC-SHA256, key {qkey_source}"}
    if enc != "utf-8":
        stats["encoding_note"] = f"input decoded as {enc}, written as UTF-8"
    reasons: dict[str, int] = stats["quarantine_reasons"]
    t0 = time.perf_counter()

    def quarantine(qfh, lineno: int, raw: bytes, reason: str) -> None:
        stats["quarantined"] += 1
        short = reason.split(":")[0]
        reasons[short] = reasons.get(short, 0) + 1
        qfh.write(json.dumps({"file": str(in_path), "line": lineno, "reason": reason,
                              "line_hmac": _line_digest(qkey, raw)}, ensure_ascii=False) + "\n")

    with open(in_path, "rb") as src, atomic_open(out_path, "w") as out, atomic_open(qpath, "w") as qfh:
        for lineno, raw in enumerate(src, 1):
            stats["bytes_in"] += len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            body = raw.rstrip(b"\r\n")
            if not body.strip():
                stats["blank_lines"] += 1
                continue
            stats["records_in"] += 1
            try:
                line = decode_line(body)[0] if enc == "mixed" else body.decode(line_enc)
            except UnicodeDecodeError:
                line = None
            if line is None:
                quarantine(qfh, lineno, body, "undecodable: bytes invalid for "
                           + ("UTF-8 and GB18030" if enc == "mixed" else line_enc))
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                quarantine(qfh, lineno, body, f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            except RecursionError:
                quarantine(qfh, lineno, body, "invalid JSON: nested too deeply")
                continue
            if not isinstance(rec, dict):
                quarantine(qfh, lineno, body, f"not a JSON object: {type(rec).__name__}")
                continue
            salt = str(rec.get("id", lineno)) if scope == "document" else ""
            try:
                new, c = scrub_record(rec, fields, mode, sel, kbytes, salt=salt, key_env=key_env)
            except MissingField as e:
                quarantine(qfh, lineno, body, f"bad field: {e}")
                continue
            _merge(counts, c)
            if c:
                stats["records_with_pii"] += 1
            if new is None:
                stats["dropped"] += 1
                continue
            out.write(json.dumps(new, ensure_ascii=False) + "\n")
            stats["kept"] += 1
    stats["counts"] = {t: counts[t] for t in ALL_TYPES if t in counts}
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    assert stats["records_in"] == stats["kept"] + stats["dropped"] + stats["quarantined"]
    return stats


def _default_quarantine(out_path: Path) -> Path:
    name = out_path.name[:-len(".jsonl")] if out_path.name.endswith(".jsonl") else out_path.name
    return out_path.with_name(name + ".quarantine.jsonl")


# ---------------------------------------------------------------------------------------------------
# leak checks: is any PII value of the inputs anywhere in the outputs?

_SEPARATORS_RE = re.compile(r"[\s\-]")
_SEPARATED_TYPES = ("ID_CARD", "PHONE", "BANK_CARD", "ACCOUNT")


def pii_values(texts: Iterable[str], min_chars: int = 2) -> set[str]:
    """Every PII value the detector finds in ``texts`` (as written, plus the separator-free form of
    numbers written with spaces or dashes). Values shorter than ``min_chars`` (a bare one-character
    surname) are left out: they occur in any Chinese text."""
    values: set[str] = set()
    for text in texts:
        for span in find_pii(text):
            if len(span.text) >= min_chars:
                values.add(span.text)
                if span.type in _SEPARATED_TYPES:
                    values.add(_SEPARATORS_RE.sub("", span.text))
    return values


def find_values_in_files(root: str | os.PathLike, values: Iterable[str]) -> list[tuple[str, str]]:
    """``(file relative to root, hint)`` for every file under ``root`` whose bytes contain one of ``values``
    (UTF-8). The hint is the value's first two characters only, so a report of leaks does not leak again.
    Binary files (Arrow, safetensors, GGUF) are searched as bytes too: text is stored in them as UTF-8.

    Thousands of values over a run folder of ~100 MB: a regex alternation or one ``in`` per value takes
    minutes, so candidate positions come from the values' first bytes (vectorised with numpy, in chunks)
    and only those are compared in full.
    """
    import numpy as np

    root = Path(root)
    needles = sorted({v.encode("utf-8") for v in values if v})
    if not needles:
        return []
    k = min(8, min(len(n) for n in needles))
    by_head: dict[int, list[bytes]] = {}
    for n in needles:
        by_head.setdefault(int.from_bytes(n[:k], "little"), []).append(n)
    heads = np.array(sorted(by_head), dtype=np.uint64)
    chunk = 1 << 23
    found = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        hits: set[bytes] = set()
        for start in range(0, max(0, len(data) - k + 1), chunk):
            window = np.frombuffer(data, dtype=np.uint8, count=min(len(data) - start, chunk + k - 1), offset=start)
            n = len(window) - k + 1
            key = np.zeros(n, dtype=np.uint64)
            for j in range(k):
                key |= window[j:j + n].astype(np.uint64) << np.uint64(8 * j)
            idx = np.searchsorted(heads, key)  # (np.isin sorts the 8M keys: 10x slower)
            idx[idx == len(heads)] = 0
            for pos in np.nonzero(heads[idx] == key)[0]:
                at = start + int(pos)
                hits.update(v for v in by_head[int(key[pos])] if data.startswith(v, at))
        found += [(p.relative_to(root).as_posix(), v.decode("utf-8")[:2] + "…") for v in sorted(hits)]
        del data
    return found
