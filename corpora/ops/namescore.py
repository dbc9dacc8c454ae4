"""Statistical scorer for Chinese person names that stand in running text without a cue.

The rules of ``persons.py`` take a name where the text says a person stands there (a role word, a title,
a layout slot). Bank text also names people bare: ``客户祁同伟在三个月内向高小琴转账``, ``晨会上詹俊峰通报…``,
``经查，毛建国于2024年3月将资金转给邹雨涵``. This module scores every candidate *surname + 1-2 characters* with a linear
model over features read from two tables that ship inside jieba's wheel (jieba 0.42.1, MIT; nothing is
downloaded, jieba itself is never imported or run):

* ``dict.txt`` -- 349k words with a corpus frequency and a part-of-speech tag: whether the candidate, its
  first two characters, its given name, or a word crossing its left or right edge is a common word
  (``高度``, ``提高``, ``原野``); the class of the word right before and after it (a verb, a preposition,
  an adverb, a conjunction, a particle, a numeral, a noun; a role noun such as ``经理``, ``交出人``); whether
  a place or organisation (``ns``/``nt``) starts there (``张家港``, ``武侯区``); how many person names in the
  dictionary carry the same given name (``国强``: 15).
* ``posseg/prob_emit.p`` -- the emission table of jieba's part-of-speech HMM: P(character | first, middle,
  last character of a person name), against the character's frequency in the dictionary, gives how much
  more often a character opens a name (王, 祁) or ends a given name (伟, 琴, 涛) than it occurs in text.

The weights (``WEIGHTS``) were fitted by logistic regression (``scripts/bench_pii.py --fit-names``) on the
labelled windows of 200 generated benchmark records, the hand-written held-out records of
``tests/test_pii.py`` and, five times over, ``tests/data/pii_heldout_dev.jsonl`` -- never on
``pii_heldout_final.jsonl``. A candidate is taken when its
score exceeds ``THRESHOLD`` and no overlapping candidate scores higher; places, organisations and the
ambiguous words of ``names.py`` are vetoed whatever the score.

Two passes extend what the rules and the scorer found: names listed right after or before a found one
(``、 和 与 及 ，``) at a lower threshold, and every other occurrence of a found name in the same text.

Speed: a candidate is only scored where a surname character is not followed by a character that never
stands in a given name and the surname is not the tail or head of a frequent word (``加强``, ``管理``);
the tables are read on first use (about a second, some 50 MB) and kept for the process. A numeral unit
after a number (``100万进货``, ``3位``) is never a surname.

``scored_candidates`` returns every window above a floor with its veto flag, for ``persons.py`` to show
the ones just under the threshold to LAC (``lacner.py``) in a text about people.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .names import (
    AMBIGUOUS_NAME_WORDS,
    COMPOUND_SURNAMES,
    NOT_GIVEN,
    NOT_NAME_WORDS,
    SINGLE_SURNAMES,
)

__all__ = ["FEATURES", "THRESHOLD", "WEIGHTS", "candidate_starts", "candidates", "coreferences", "features",
           "best_non_overlapping", "find_scored_names", "list_neighbours", "score",
           "scored_candidates"]

# ------------------------------------------------------------------------------------------- model

FEATURES = (
    "bias", "surname", "given1", "given2", "three_chars", "word_whole", "word_head", "word_given", "word_left",
    "word_right", "left_punct", "left_function", "right_punct", "right_function", "compound", "not_given",
    "place", "repeat",
    "right_V", "right_P", "right_D", "right_C", "right_U", "right_M", "right_VN", "right_N",
    "left_V", "left_P", "left_D", "left_C", "left_U", "left_M", "left_VN", "left_N", "left_role",
    "given_pair_names", "given_char_names",
)
# fitted by ``scripts/bench_pii.py --fit-names`` (see the module docstring); order of FEATURES
WEIGHTS = (
    -7.62, 0.53, 0.25, 0.27, 2.73, -0.46, -0.31, -0.18, -0.55, -0.63, 1.5, 2.56, 5.73, 3.26, 0.28, 1.29, -1.68,
    -7.91, 3.94, 2.6, 2.54, 1.51, 3.11, 3.18, 1.47, 2.04, 0.12, -1.33, 0.75, -0.55, -3.31, -1.42, -2.51, 0.13,
    2.33, -0.01, 0.27,
)
THRESHOLD = 0.0
LIST_THRESHOLD = -3.0  # a candidate right after 、/和 next to a found name

_CLASSES = ("V", "P", "D", "C", "U", "M", "VN", "N")
_FUNCTION = frozenset("的在是了和与向为把于及或等将被对从给让由经据到至跟同也都就还又再所其之以而且但则即")
_ROLE_END = frozenset("人员长理任管师生官工")
FUNCTION_CHARS = _FUNCTION
_NAME_TAGS = frozenset(("nr", "nrfg", "nrt"))
_FLOOR = -16.0  # log-probability of a character the name HMM never emitted
_BLOCK_LOG_FREQ = 5  # a surname character inside a word at least this frequent (e^5 ~ 150) is not scored


def _is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff"


def _tag_class(tag: str) -> str:
    if tag in ("v", "vd", "vi", "vg"):
        return "V"
    if tag == "p":
        return "P"
    if tag in ("d", "ad", "df"):
        return "D"
    if tag == "c":
        return "C"
    if tag.startswith("u"):
        return "U"
    if tag in ("m", "mq", "q"):
        return "M"
    if tag == "vn":
        return "VN"
    if tag.startswith("n"):
        return "N"
    return "O"


# ------------------------------------------------------------------------------------------ tables

class _Tables:
    """What the scorer reads from jieba's data files (built once per process)."""

    def __init__(self, root: Path):
        # word -> (log frequency if freq >= 5 else 0, tag class, name tag?, place/organisation?); one shared
        # tuple per distinct value keeps the 300k entries small
        info: dict[str, tuple] = {}
        shared: dict[tuple, tuple] = {}
        char_freq: dict[str, int] = {}
        pairs: dict[str, int] = {}  # given name -> how many names in the dictionary carry it (国强: 15)
        singles: dict[str, int] = {}
        with open(root / "dict.txt", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                w, fr, tag = parts[0], int(parts[1]), parts[2]
                for ch in w:
                    char_freq[ch] = char_freq.get(ch, 0) + fr
                place = tag in ("ns", "nt")
                if tag in ("nr", "nrfg"):
                    if len(w) == 3 and w[0] in SINGLE_SURNAMES or len(w) == 4 and w[:2] in COMPOUND_SURNAMES:
                        pairs[w[-2:]] = pairs.get(w[-2:], 0) + 1
                    elif len(w) == 2 and w[0] in SINGLE_SURNAMES:
                        singles[w[1]] = singles.get(w[1], 0) + 1
                if len(w) <= 3 and fr >= 3 or place and len(w) <= 5 or len(w) == 4 and fr >= 5:
                    value = (int(round(math.log(fr))) if fr >= 5 else 0, _tag_class(tag) if fr >= 3 else "O",
                             tag in _NAME_TAGS, place)
                    info[w] = shared.setdefault(value, value)
        self.info = info
        self.given_pair = {g: math.log(1 + c) for g, c in pairs.items()}
        self.given_single = {g: math.log(1 + c) for g, c in singles.items()}
        starts = SINGLE_SURNAMES | {w[0] for w in COMPOUND_SURNAMES}
        self.block_left = frozenset(w for w, v in info.items() if len(w) == 2 and w[1] in starts and v[0] >= _BLOCK_LOG_FREQ)
        self.block_head = frozenset(w for w, v in info.items() if len(w) == 2 and w[0] in starts and v[0] >= _BLOCK_LOG_FREQ
                                    and not v[2] and w not in COMPOUND_SURNAMES)
        with open(root / "posseg" / "prob_emit.p", "rb") as f:
            emit = pickle.load(f)  # noqa: S301 -- jieba's own table, from the installed wheel
        total = sum(char_freq.values())

        def background(c: str) -> float:
            return math.log((char_freq.get(c, 0) + 5) / total)

        first, middle, last = emit[("B", "nr")], emit[("M", "nr")], emit[("E", "nr")]
        chars = set(char_freq) | set(first) | set(middle) | set(last)
        self.surname = {c: first.get(c, _FLOOR) - background(c) for c in SINGLE_SURNAMES}
        self.middle = {c: max(middle.get(c, _FLOOR), _FLOOR) - background(c) for c in chars}
        self.last = {c: max(last.get(c, _FLOOR), _FLOOR) - background(c) for c in chars}


_TABLES: _Tables | None = None
_LOCK = threading.Lock()


def jieba_data_dir() -> Path:
    spec = importlib.util.find_spec("jieba")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the person-name scorer reads jieba's dictionary: pip install 'jieba==0.42.1' "
                          "(a dependency of banklm)")
    return Path(next(iter(spec.submodule_search_locations)))


def tables() -> _Tables:
    global _TABLES
    if _TABLES is None:
        with _LOCK:
            if _TABLES is None:
                _TABLES = _Tables(jieba_data_dir())
    return _TABLES


# ---------------------------------------------------------------------------------------- features

def _word(info: dict, w: str) -> int:
    """Log frequency of ``w`` as a common word (0 when it is not one, or when jieba tags it a name)."""
    v = info.get(w)
    return 0 if v is None or v[2] else v[0]


def _any_word(info: dict, w: str) -> int:
    v = info.get(w)
    return 0 if v is None else v[0]


def _class_after(info: dict, text: str, j: int) -> str | None:
    if j >= len(text) or not _is_cjk(text[j]):
        return None
    for n in (3, 2, 1):
        v = info.get(text[j:j + n])
        if v is not None and j + n <= len(text):
            return v[1]
    return None


def _word_before(info: dict, text: str, i: int) -> tuple[str | None, str | None]:
    if i == 0 or not _is_cjk(text[i - 1]):
        return None, None
    for n in (3, 2, 1):
        if i - n >= 0:
            v = info.get(text[i - n:i])
            if v is not None:
                return text[i - n:i], v[1]
    return None, None


def features(text: str, i: int, j: int, s: int) -> list[float]:
    """Feature vector (order of ``FEATURES``) of the candidate ``text[i:j]`` with an ``s``-character surname."""
    t = tables()
    info = t.info
    n = len(text)
    given = text[i + s:j]
    surname = t.surname.get(text[i], 0.0) if s == 1 else 3.0
    if len(given) == 1:
        g1, g2 = t.last.get(given, -8.0), 0.0
    else:
        g1, g2 = t.middle.get(given[0], -8.0), t.last.get(given[1], -8.0)
    whole = _word(info, text[i:j])
    head = _word(info, text[i:i + s + 1]) if len(given) == 2 else 0
    tail = _word(info, given) if len(given) == 2 else 0
    lc = text[i - 1] if i > 0 else ""
    rc = text[j] if j < n else ""
    left_open = not lc or not _is_cjk(lc)
    right_open = not rc or not _is_cjk(rc)
    left = 0 if left_open else max(_any_word(info, text[a:i + b]) for a, b in ((i - 1, 1), (i - 2, 1), (i - 1, 2)) if a >= 0)
    right = 0 if right_open else max(_any_word(info, text[j - a:j + b]) for a, b in ((1, 1), (1, 2), (2, 1))
                                      if j + b <= n and j - a >= i + s)
    not_given = sum(1 for c in given if c in NOT_GIVEN)
    place = any(v is not None and v[3] for v in (info.get(text[i:j]), info.get(text[i:j + 1]), info.get(text[i:j + 2]),
                                                  info.get(text[i - 1:j]) if i else None))
    repeat = given[0] == text[i + s - 1]
    after = _class_after(info, text, j)
    word_before, before = _word_before(info, text, i)
    role = word_before is not None and len(word_before) >= 2 and word_before[-1] in _ROLE_END and before == "N"
    return ([1.0, surname, g1, g2, float(len(given) == 2), whole, head, tail, left, right,
             float(left_open), float(lc in _FUNCTION), float(right_open), float(rc in _FUNCTION), float(s == 2),
             float(not_given), float(place), float(repeat)]
            + [float(after == c) for c in _CLASSES] + [float(before == c) for c in _CLASSES] + [float(role)]
            + [t.given_pair.get(given, 0.0) if len(given) == 2 else 0.0,
               t.given_single.get(given, 0.0) if len(given) == 1 else 0.0])


def score(text: str, i: int, j: int, s: int) -> float:
    """``WEIGHTS · features(text, i, j, s)``, computed without building the vector (the scorer's hot path;
    a test checks both agree)."""
    return _left_score(text, i) + _window_score(text, i, j, s)


def _left_score(text: str, i: int) -> float:
    """The terms of the score that depend only on the left edge (shared by every window starting at ``i``)."""
    w = WEIGHTS
    if i == 0 or not _is_cjk(lc := text[i - 1]):
        return w[10]
    get = (_TABLES or tables()).info.get
    best = 0
    for a, b in ((i - 1, i + 1), (i - 2, i + 1), (i - 1, i + 2)):
        if a >= 0 and (v := get(text[a:b])) is not None and v[0] > best:
            best = v[0]
    sc = w[8] * best
    if lc in _FUNCTION:
        sc += w[11]
    for k in (3, 2, 1):
        if i - k >= 0 and (v := get(text[i - k:i])) is not None:
            sc += _LEFT_W.get(v[1], 0.0)
            if k >= 2 and v[1] == "N" and lc in _ROLE_END:
                sc += w[34]
            break
    return sc


def _words_max() -> float:
    """The most the word, place and repeat terms can add (0 with the fitted weights, all negative)."""
    w = WEIGHTS
    return sum(max(0.0, w[k]) * 20 for k in (5, 6, 7, 9)) + max(0.0, w[16]) + max(0.0, w[17])


def _rest_max() -> float:
    """The most the terms computed after the name's own characters can add (the right edge, the word, place
    and repeat terms): a window whose score cannot reach the threshold even so is dropped early."""
    w = WEIGHTS
    words = sum(max(0.0, w[k]) * 20 for k in (5, 6, 7, 9))
    right = max(w[12], max(0.0, w[13]) + max(0.0, *_RIGHT_W.values()))
    return words + max(0.0, w[16]) + max(0.0, w[17]) + right


def _window_score(text: str, i: int, j: int, s: int, floor: float = -math.inf) -> float:
    """The score less ``_left_score``; when it cannot exceed ``floor``, some upper bound not above ``floor``."""
    t = _TABLES or tables()
    w = WEIGHTS
    si = i + s
    if j - si == 1:
        sc = w[0] + w[2] * t.last.get(text[si], -8.0) + w[36] * t.given_single.get(text[si], 0.0)
    else:
        sc = (w[0] + w[2] * t.middle.get(text[si], -8.0) + w[3] * t.last.get(text[si + 1], -8.0) + w[4]
              + w[35] * t.given_pair.get(text[si:j], 0.0))
    sc += w[1] * t.surname.get(text[i], 0.0) if s == 1 else w[1] * 3.0 + w[14]
    for c in text[si:j]:
        if c in NOT_GIVEN:
            sc += w[15]
    if sc + _REST_MAX <= floor:
        return sc + _REST_MAX
    get = t.info.get
    n = len(text)
    # the right edge first (the class of the next word, a function character): with the fitted weights the
    # word, place and repeat terms after it can only lower the score (_WORDS_MAX bounds them), so a window
    # already at or below ``floor`` stops before their dictionary lookups
    right_open = j >= n or not _is_cjk(text[j])
    if right_open:
        sc += w[12]
    else:
        if text[j] in _FUNCTION:
            sc += w[13]
        for k in (3, 2, 1):
            if j + k <= n and (v := get(text[j:j + k])) is not None:
                sc += _RIGHT_W.get(v[1], 0.0)
                break
    if sc + _WORDS_MAX <= floor:
        return sc + _WORDS_MAX
    if j - si == 2:
        v = get(text[si:j])
        if v is not None and not v[2]:
            sc += w[7] * v[0]  # the given name is a word
        v = get(text[i:si + 1])
        if v is not None and not v[2]:
            sc += w[6] * v[0]  # surname + first given character is a word
    if text[si] == text[si - 1]:
        sc += w[17]
    v = get(text[i:j])
    if v is not None and not v[2]:
        sc += w[5] * v[0]
    if (v is not None and v[3] or (v := get(text[i:j + 1])) is not None and v[3]
            or (v := get(text[i:j + 2])) is not None and v[3] or i and (v := get(text[i - 1:j])) is not None and v[3]):
        sc += w[16]
    if not right_open:  # a word crossing the right edge
        best = 0
        for a, b in ((j - 1, j + 1), (j - 1, j + 2), (j - 2, j + 1)):
            if b <= n and a >= si and (v := get(text[a:b])) is not None and v[0] > best:
                best = v[0]
        sc += w[9] * best
    return sc


_RIGHT_W = {c: WEIGHTS[FEATURES.index("right_" + c)] for c in _CLASSES}
_LEFT_W = {c: WEIGHTS[FEATURES.index("left_" + c)] for c in _CLASSES}
_REST_MAX = _rest_max()
_WORDS_MAX = _words_max()


def set_weights(weights) -> None:
    """Replace ``WEIGHTS`` (fitting and experiments) and the tables derived from them."""
    global WEIGHTS, _RIGHT_W, _LEFT_W, _REST_MAX, _WORDS_MAX
    WEIGHTS = tuple(weights)
    _RIGHT_W = {c: WEIGHTS[FEATURES.index("right_" + c)] for c in _CLASSES}
    _LEFT_W = {c: WEIGHTS[FEATURES.index("left_" + c)] for c in _CLASSES}
    _REST_MAX = _rest_max()
    _WORDS_MAX = _words_max()


# --------------------------------------------------------------------------------------- candidates

# characters that never stand in a given name (the rules' list, less 同 as in 祁同伟): a candidate whose first
# or last given character is one is not scored
NEVER_GIVEN = NOT_GIVEN - frozenset("同")
# a numeral unit or measure word right after a digit or a Chinese numeral is not a surname (100万, 3位, 两万)
_NUMERALS = frozenset("0123456789０１２３４５６７８９一二三四五六七八九十百千万亿两〇零几数")
_NUMERAL_UNITS = frozenset("万亿千百元位项笔支张户名台件个次条间套家")
_CANDIDATE_RE = re.compile(
    "[" + "".join(sorted(SINGLE_SURNAMES | {w[0] for w in COMPOUND_SURNAMES})) + "]"
    "(?=[\u4e00-\u9fff])(?![" + "".join(sorted(NEVER_GIVEN)) + "])")


Veto = Callable[[str, int, int], bool]


def _no_veto(text: str, i: int, j: int) -> bool:
    return False


def _vetoed(text: str, i: int, j: int, veto: Veto) -> bool:
    """An ambiguous word (金华, 高峰), a word that is never a name, or what the caller's ``veto`` rejects
    (``persons.py`` passes its place and company check: 温州市, 王记餐饮有限公司)."""
    return text[i:j] in AMBIGUOUS_NAME_WORDS or text[i:j] in NOT_NAME_WORDS or veto(text, i, j)


def candidates(text: str, i: int) -> list[tuple[int, int]]:
    """(s, j) windows starting at ``i``: compound or single surname + 1-2 CJK given characters."""
    out = []
    n = len(text)
    if i and text[i] in _NUMERAL_UNITS and text[i - 1] in _NUMERALS:
        return out
    for s in ((2, 1) if text[i:i + 2] in COMPOUND_SURNAMES else (1,)):
        if s == 1 and text[i] not in SINGLE_SURNAMES:
            continue
        c = text[i + s] if i + s < n else ""
        if not ("\u4e00" <= c <= "\u9fff") or c in NEVER_GIVEN:
            continue
        out.append((s, i + s + 1))
        c = text[i + s + 1] if i + s + 1 < n else ""
        if "\u4e00" <= c <= "\u9fff" and c not in NEVER_GIVEN:
            out.append((s, i + s + 2))
    return out


def blocked(info: dict, text: str, i: int) -> bool:
    """The surname character ends a frequent word (加强, 提高) or starts one (管理, 金融; not a name word)."""
    t = _TABLES or tables()
    return i and text[i - 1:i + 1] in t.block_left or text[i:i + 2] in t.block_head


def candidate_starts(text: str) -> Iterator[int]:
    """Where a candidate may start: a surname character followed by a possible given character and not
    inside a frequent word."""
    info = tables().info
    for m in _CANDIDATE_RE.finditer(text):
        if not blocked(info, text, m.start()):
            yield m.start()


def scored_candidates(text: str, floor: float, veto: Veto = _no_veto, *,
                      blocked: bool = False) -> list[tuple[float, int, int, bool]]:
    """Every candidate of ``text`` scoring above ``floor``: ``(score, start, end, vetoed)``, where ``vetoed``
    says an ambiguous word, a never-name word or the caller's ``veto`` rejects it (``persons.py`` shows the
    unvetoed ones just under the threshold to LAC). ``blocked``: also the candidates that start inside a
    frequent word (``随后魏红``: 后魏), which are normally not scored at all."""
    t = _TABLES or tables()
    block_left, block_head = t.block_left, t.block_head
    cands = []
    n = len(text)
    for m in _CANDIDATE_RE.finditer(text):
        i = m.start()
        if not blocked and (i and text[i - 1:i + 1] in block_left or text[i:i + 2] in block_head):
            continue
        if i and text[i] in _NUMERAL_UNITS and text[i - 1] in _NUMERALS:
            continue  # 100万进货, 3位客户: a unit after a number, not a surname
        left = _left_score(text, i)
        low = floor - left
        for s in ((2, 1) if text[i:i + 2] in COMPOUND_SURNAMES else (1,)):
            # (the regex checked the character after a single surname; the window code checks the rest)
            if s == 2 and not (i + 2 < n and "\u4e00" <= text[i + 2] <= "\u9fff" and text[i + 2] not in NEVER_GIVEN):
                continue
            if s == 1 and text[i] not in SINGLE_SURNAMES:
                continue
            sc = _window_score(text, i, i + s + 1, s, low)
            if sc > low:
                cands.append((left + sc, i, i + s + 1, _vetoed(text, i, i + s + 1, veto)))
            k = i + s + 1
            if k < n and "\u4e00" <= text[k] <= "\u9fff" and text[k] not in NEVER_GIVEN:
                sc = _window_score(text, i, k + 1, s, low)
                if sc > low:
                    cands.append((left + sc, i, k + 1, _vetoed(text, i, k + 1, veto)))
    return cands


def find_scored_names(text: str, threshold: float | None = None, veto: Veto = _no_veto) -> list[tuple[int, int]]:
    """Name spans the scorer takes in ``text``: best-scoring non-overlapping candidates above ``threshold``."""
    threshold = THRESHOLD if threshold is None else threshold
    return best_non_overlapping([(sc, i, j) for sc, i, j, v in scored_candidates(text, threshold, veto) if not v])


def best_non_overlapping(cands: list[tuple[float, int, int]]) -> list[tuple[int, int]]:
    cands.sort(reverse=True)
    taken: list[tuple[int, int]] = []
    for _, i, j in cands:
        if all(j <= a or i >= b for a, b in taken):
            taken.append((i, j))
    return taken


def _best_at(text: str, i: int, threshold: float, veto: Veto, end: int | None = None) -> tuple[float, int, int] | None:
    best = None
    if i < 0 or i >= len(text):
        return None
    for s, j in candidates(text, i):
        if end is not None and j != end:
            continue
        sc = score(text, i, j, s)
        if sc > threshold and not _vetoed(text, i, j, veto) and (best is None or sc > best[0]):
            best = (sc, i, j)
    return best


_LIST_SEP_RE = re.compile(r"[ \t]*(?:、|和|与|及|，|,)[ \t]*")


def list_neighbours(text: str, spans: list[tuple[int, int]], threshold: float | None = None,
                    veto: Veto = _no_veto) -> list[tuple[int, int]]:
    """Names listed right after or before a found one (``巫启贤和鞠萍``, ``隆晓燕、鞠红、宾有为``), scored
    at a lower threshold: the list says the neighbour is of the same kind."""
    threshold = LIST_THRESHOLD if threshold is None else threshold
    out: list[tuple[int, int]] = []
    seen = set(spans)
    todo = list(spans)
    while todo:
        a, b = todo.pop()
        found = []
        m = _LIST_SEP_RE.match(text, b)
        if m:
            found.append(_best_at(text, m.end(), threshold, veto))
        k = a
        while k > 0 and text[k - 1] in " \t":
            k -= 1
        if k > 0 and text[k - 1] in "、和与及":
            e = k - 1
            back = [_best_at(text, e - n, threshold, veto, end=e) for n in (2, 3, 4)]
            back = [x for x in back if x]
            if back:
                found.append(max(back))
        for r in found:
            if r and (r[1], r[2]) not in seen:
                seen.add((r[1], r[2]))
                out.append((r[1], r[2]))
                todo.append((r[1], r[2]))
    return out


def coreferences(text: str, spans: list[tuple[int, int]], veto: Veto = _no_veto,
                  vetoed: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Every other occurrence of a Chinese name found in ``text`` (``施天翼…由施天翼之父``), unless that
    occurrence is inside a frequent word or before a place or organisation word; the occurrences rejected
    only by ``veto`` or the word lists (``文静近三年`` after ``借款人文静``) go to ``vetoed`` when given."""
    info = tables().info
    out = []
    names = {text[a:b] for a, b in spans if b - a >= 2 and all(_is_cjk(c) for c in text[a:b])}
    for name in names:
        k = text.find(name)
        while k >= 0:
            e = k + len(name)
            if (_any_word(info, text[k - 1:k + 1] if k else "") < _BLOCK_LOG_FREQ
                    and _any_word(info, text[e - 1:e + 1]) < _BLOCK_LOG_FREQ):
                if not _vetoed(text, k, e, veto):
                    out.append((k, e))
                elif vetoed is not None:
                    vetoed.append((k, e))
            k = text.find(name, k + 1)
    return out
