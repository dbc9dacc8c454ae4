"""Readers: files of many formats and encodings -> one ``datasets.Dataset`` of ``{id, text}`` or
``{id, messages}`` records, with stats and a quarantine.

A source spec is a dict::

    {path: "data/vertical/**/*.txt",   # a file, a folder (all files of the format inside) or a glob
     format: "auto",                   # see FORMATS; auto = by file extension
     weight: 1.0,                      # expected copies of each record (0.5: random half; 2: twice)
     field_map: {"text": "content"},   # target field <- field name in the input
     name: "vertical",                 # prefix of derived ids (default: the folder name)
     unit: "file" | "block",           # txt/md: one document per file or per blank-line block
     split: "train",                   # hf: which split of a saved DatasetDict
     records_key: "data",              # json: the key of the record list in a top-level object
     keep: ["label"]}                  # extra fields carried through as strings (default: label)

File formats: ``jsonl``, ``json`` (an array, or an object holding one list of records), ``csv``, ``tsv``,
``parquet``, ``txt``, ``md`` (markup stripped), ``html`` (text via the stdlib ``html.parser``; script,
style and the like dropped), ``hf`` (a folder written by ``save_to_disk``). ``alpaca``, ``sharegpt``,
``messages`` and ``prompt_completion`` are JSON/JSONL files whose records must have that schema; with
the other structured formats the schema is detected per record, in this order: ``messages``,
``conversations`` (sharegpt), ``instruction`` (alpaca), ``prompt``+``completion``, ``text``.
Instruction records become ``messages``: alpaca ``system``/``history``/``instruction``+``\\n``+``input``/
``output`` and sharegpt ``from``/``value`` (human/user, gpt/assistant, system, observation -> tool).

Encodings, per file, by strict decoding in this order: UTF-8 with BOM (when the BOM is there), UTF-8,
GB18030 (a superset of GBK and GB2312, reported as ``gb18030``). A file that mixes UTF-8 and GBK lines
(exports of several systems concatenated) is ``mixed`` and read line by line: each line UTF-8, else
GB18030 (a line valid in both is UTF-8 only when it reads as Chinese text in UTF-8: short GBK lines are
often valid UTF-8 too); a line that is neither is quarantined (``undecodable_line``, counted as one record
read and quarantined) and left out of the text as an empty line, so the other lines keep their numbers.
A file valid as GB18030 is also ``mixed`` when one of its lines reads as Chinese UTF-8 text (UTF-8 lines
can be valid GB18030 too, as mojibake). Files in other encodings (most non-ASCII lines undecodable) are
quarantined as undecodable. Every non-UTF-8 file is listed in ``stats["encoding_notes"]``; for ``mixed``
files with its non-ASCII lines by encoding, and ``stats["lines_gb18030"]`` counts their GB18030 lines.

Bad input never disappears silently. With ``on_error="quarantine"`` (default) each problem becomes a
quarantine entry ``{file, line, reason}`` (no record content: it may hold PII; ``line`` is the line
number, the CSV row's first line, the parquet/hf row number, or 0 for the whole file) and is counted in
the stats; with ``on_error="raise"`` the first problem raises ``ValueError("file:line: reason")``.
Whatever the mode, these raise a ``ValueError``: a spec error, a glob matching no file, a file where no
record has the expected fields (wrong field names: set ``field_map``), a source without any valid record,
a corpus mixing raw text and instruction records.

Paths: a source may name any file the user can read. Links to files are read once (a file reached by two
paths is one file); links to folders are never followed (they can loop): they, links that loop or point
nowhere, unreadable files and file names that are not valid UTF-8 are quarantined as whole files with the
reason. Text with lone UTF-16 surrogates (``"\\ud800"`` escapes) is not Unicode text: the record is
quarantined (``bad_text``), as is a record of more than ``max_record_bytes`` in any format.

Ids: the record's ``id`` (string or integer) is kept; otherwise ``<name>/<path within the source>:<line>``.
A repeated id is quarantined (``duplicate_id``); copies made by ``weight > 1`` get ``#2``, ``#3`` appended.
"""

from __future__ import annotations

import codecs
import csv
import errno
import glob
import io
import json
import logging
import math
import os
import random
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

FILE_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "txt", "md", "html", "hf")
SCHEMAS = ("alpaca", "sharegpt", "messages", "prompt_completion")
FORMATS = ("auto", *FILE_FORMATS, *SCHEMAS)
EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
              ".txt": "txt", ".text": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html"}
SPEC_KEYS = {"path", "format", "weight", "field_map", "name", "unit", "split", "records_key", "keep"}
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "function_call": "assistant", "tool": "tool"}
MAX_RECORD_BYTES = 10 * 1024 * 1024
FILE_LEVEL = ("empty_file", "csv_error", "invalid_json_file", "binary_file", "undecodable", "file_too_large",
              "bad_file_name", "unreadable_file", "linked_folder")
_CHUNK = 1 << 20
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_CJK_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff]")
# characters of Chinese text beyond ASCII: Latin-1 signs (·×°é), punctuation, symbols, ideographs, fullwidth forms.
# GBK bytes read as UTF-8 mostly give other scripts (Cyrillic, Hebrew, Arabic, kana...), or invalid bytes,
# which errors="surrogateescape" turns into U+DC80..U+DCFF: not in this set either.
_NOT_CHINESE_RE = re.compile("[^\x00-\x7f\u00a0-\u00ff\u2000-\u27bf\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff"
                             "\ufeff\uff00-\uffef]")

log = logging.getLogger("banklm")


class Bad(Exception):
    """One bad record or file: ``category`` is counted in the stats, ``detail`` goes into the reason."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)
        self.category = category
        self.reason = str(self)


# ---------------------------------------------------------------------------------------------------
# paths


def display_path(path: str | Path) -> str:
    """A path as printable UTF-8 text (undecodable bytes of a file name shown as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def path_problem(path: Path) -> Bad | None:
    """Why a listed path cannot be read as a source file, or None when it can."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return Bad("bad_file_name", "file name is not valid UTF-8; rename the file (e.g. convmv -f gbk -t utf8)")
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return Bad("unreadable_file", "symbolic link loop")
            return Bad("unreadable_file", f"broken symbolic link ({e.strerror})")
        if path.is_dir():
            return Bad("linked_folder", "links to folders are not followed (they can loop); "
                                        "add the target folder as its own source")
    if not os.access(path, os.R_OK):
        return Bad("unreadable_file", "permission denied")
    return None


def _linked_folders(root: Path) -> list[Path]:
    """Links to folders under ``root`` (not followed, so a loop cannot run away)."""
    out = []
    for dirpath, dirnames, _ in os.walk(root):
        out += [Path(dirpath) / d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
    return out


# ---------------------------------------------------------------------------------------------------
# encodings


def detect_encoding(path: str | Path) -> str:
    """``utf-8-sig``, ``utf-8``, ``gb18030`` or ``mixed`` (read line by line, see :func:`decode_line`); else
    raises Bad. Ordinary UTF-8 files cost one streamed strict pass; only files failing it are scanned by line.
    The one detector of every reader: ``banklm corpus build`` (these readers) and ``banklm corpus scrub``
    (``banklm.corpora.ops.pii.scrub_jsonl``) read a file alike."""
    with open(path, "rb") as fh:
        head = fh.read(4)
        if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            raise Bad("undecodable", "UTF-16 text (byte-order mark); convert it to UTF-8")
        bom = head.startswith(codecs.BOM_UTF8)
        for enc in ["utf-8-sig"] if bom else ["utf-8", "gb18030"]:
            fh.seek(0)
            dec = codecs.getincrementaldecoder(enc)(errors="strict")
            try:
                while chunk := fh.read(_CHUNK):
                    if b"\x00" in chunk:
                        raise Bad("binary_file", "NUL bytes")
                    dec.decode(chunk)
                dec.decode(b"", final=True)
            except UnicodeDecodeError:
                continue
            if enc != "gb18030":
                return enc
            fh.seek(0)
            return "mixed" if _has_utf8_cjk_line(fh) else "gb18030"
        fh.seek(0)
        n = _scan_lines(fh, bom)
    if n["undecodable"] >= max(1, n["utf-8"] + n["gb18030"]):  # mostly another encoding, or binary
        raise Bad("undecodable", "not valid UTF-8 nor GB18030 (binary or another encoding)")
    return "mixed"


def _has_utf8_cjk_line(fh) -> bool:
    """Whether a file that is valid GB18030 as a whole has a line that reads as Chinese UTF-8 text (valid
    UTF-8, 3+ ideographs, no character foreign to Chinese text). UTF-8 Chinese lines can be valid GB18030
    too (as mojibake), so a GBK export with such lines appended would pass as GB18030; GBK text practically
    never forms such a line (none of 2.16 million random GBK strings of 1-12 characters did, 2026-12-06).
    One streamed pass at codec speed."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    cjk, foreign = 0, False  # of the current line: ideographs so far; holds a foreign character or bad byte
    while True:
        chunk = fh.read(_CHUNK)
        pieces = dec.decode(chunk, final=not chunk).split("\n")
        for i, piece in enumerate(pieces):
            if not foreign and not piece.isascii():
                foreign = _NOT_CHINESE_RE.search(piece) is not None
                cjk += len(_CJK_RE.findall(piece))
            if i == len(pieces) - 1 and chunk:
                break  # the line goes on in the next chunk
            if not foreign and cjk >= 3:
                return True
            cjk, foreign = 0, False
        if not chunk:
            return False


def _scan_lines(fh, bom: bool) -> Counter:
    """How the lines holding non-ASCII bytes of a file that is neither UTF-8 nor GB18030 as a whole decode:
    ``utf-8``, ``gb18030`` (only as GB18030) or ``undecodable``. Streamed: lines of any length."""
    n: Counter = Counter()
    if bom:
        fh.read(3)
    while part := fh.readline(_CHUNK):
        if b"\x00" in part:
            raise Bad("binary_file", "NUL bytes")
        if part.endswith(b"\n") or len(part) < _CHUNK:  # the whole line (the usual case)
            if not part.isascii():
                n[decode_line(part)[1]] += 1
            continue
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="strict")  # a line over 1 MiB: in pieces
        gb = codecs.getincrementaldecoder("gb18030")(errors="strict")
        utf8_ok = gb_ok = True
        while True:
            utf8_ok, gb_ok = _feed(utf8, part, utf8_ok), _feed(gb, part, gb_ok)
            if not part or part.endswith(b"\n"):
                break
            part = fh.readline(_CHUNK)
            if b"\x00" in part:
                raise Bad("binary_file", "NUL bytes")
        n["utf-8" if utf8_ok else "gb18030" if gb_ok else "undecodable"] += 1
    return n


def _feed(decoder, part: bytes, ok: bool) -> bool:
    """Whether the line is still valid after feeding ``part`` (``b""``: the end) to an incremental decoder."""
    if not ok:
        return False
    try:
        decoder.decode(part, final=not part or part.endswith(b"\n"))
        return True
    except UnicodeDecodeError:
        return False


def decode_line(raw: bytes) -> tuple[str | None, str]:
    """``(text, encoding)`` of one line of a ``mixed`` file: UTF-8, else GB18030, else ``(None, "undecodable")``.
    A line valid in both (short GBK lines often are valid UTF-8) is UTF-8 only when it reads as Chinese text
    in UTF-8. Splitting first is safe: a newline byte is never part of a multi-byte character in either."""
    try:
        text = raw.decode("utf-8")
        if raw.isascii() or not _NOT_CHINESE_RE.search(text):
            return text, "utf-8"
    except UnicodeDecodeError:
        text = None
    try:
        return raw.decode("gb18030"), "gb18030"
    except UnicodeDecodeError:
        return (text, "utf-8") if text is not None else (None, "undecodable")


def _decode_mixed(data: bytes, lines: Counter) -> tuple[str, list[int]]:
    """Text of a ``mixed`` file decoded line by line (lines with non-ASCII bytes counted by encoding in
    ``lines``) and the numbers of its undecodable lines, left in the text as empty lines so that the other
    lines keep their numbers."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[3:]
    out, bad = [], []
    for i, raw in enumerate(data.split(b"\n"), 1):
        text, enc = decode_line(raw)
        if text is None:
            bad.append(i)
            text = ""
        if not raw.isascii():
            lines[enc] += 1
        out.append(text)
    return "\n".join(out), bad


# ---------------------------------------------------------------------------------------------------
# markup


class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "svg", "iframe", "object", "canvas"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "section",
             "article", "header", "footer", "blockquote", "pre", "title", "dd", "dt", "hr", "td", "th"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n" if tag not in ("td", "th") else " ")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def _tidy(text: str) -> str:
    lines = [" ".join(ln.split()) for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_to_text(html_text: str) -> str:
    p = _HTMLText()
    p.feed(html_text)
    p.close()
    return _tidy("".join(p.parts))


_MD_RULES = [
    (re.compile(r"\A---\n.*?\n---\n", re.S), ""),                    # front matter
    (re.compile(r"<!--.*?-->", re.S), ""),                          # comments
    (re.compile(r"^[ \t]*(```|~~~).*\n?", re.M), ""),                    # code fences (content kept)
    (re.compile(r"^[ \t]*\[[^\]]+\]:[ \t]*\S+.*\n?", re.M), ""),            # link reference definitions
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),                  # images -> alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),                   # links -> link text
    (re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+", re.M), ""),                   # heading marks
    (re.compile(r"^[ \t]{0,3}>[ \t]?", re.M), ""),                        # block quotes
    (re.compile(r"^[ \t]*[-*+][ \t]+", re.M), ""),                        # bullets
    (re.compile(r"^[ \t]*\|?[ \t]*:?-{3,}:?[ \t]*(\|[ \t]*:?-{3,}:?[ \t]*)*\|?[ \t]*(\n|$)", re.M), ""),  # table rules
    (re.compile(r"^[ \t]*([-*_][ \t]*){3,}$", re.M), ""),                 # horizontal rules
    (re.compile(r"(\*\*|__)(.+?)\1"), r"\2"),                       # bold
    (re.compile(r"`([^`]+)`"), r"\1"),                              # inline code
]


def markdown_to_text(md: str) -> str:
    text = md.replace("\r\n", "\n")
    for pattern, repl in _MD_RULES:
        text = pattern.sub(repl, text)
    lines = []
    for ln in text.split("\n"):
        s = ln.strip()
        if s.startswith("|") and s.endswith("|"):  # table row -> cells separated by spaces
            ln = " ".join(c.strip() for c in s.strip("|").split("|"))
        lines.append(ln)
    return _tidy("\n".join(lines))


# ---------------------------------------------------------------------------------------------------
# raw items of one file: (line, object | Bad)


def _iter_jsonl(path: Path, enc: str, max_bytes: int, lines: Counter):
    codec = "utf-8" if enc == "utf-8-sig" else enc
    with open(path, "rb") as fh:
        if enc == "utf-8-sig":
            fh.read(3)
        elif enc == "mixed" and fh.read(3) != codecs.BOM_UTF8:
            fh.seek(0)
        lineno = 0
        while raw := fh.readline(max_bytes + 1):
            lineno += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                while (more := fh.readline(_CHUNK)) and not more.endswith(b"\n"):
                    pass
                yield lineno, Bad("line_too_long", f"more than {max_bytes} bytes")
                continue
            if enc == "mixed":
                text, line_enc = decode_line(raw)
                if not raw.isascii():
                    lines[line_enc] += 1
                if text is None:
                    yield lineno, Bad("undecodable_line", "not valid UTF-8 nor GB18030")
                    continue
            else:
                text = raw.decode(codec)
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, Bad("invalid_json", f"{e.msg} at column {e.colno}")


def _json_array_items(text: str, start: int):
    """(line, item) of the JSON array starting at ``text[start] == '['``."""
    dec = json.JSONDecoder()
    i, line, last = start + 1, text.count("\n", 0, start) + 1, start
    ws = re.compile(r"[\s,]*")
    while True:
        i = ws.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            return
        line += text.count("\n", last, i)
        last = i
        obj, i = dec.raw_decode(text, i)
        yield line, obj


def _iter_json(path: Path, text: str, records_key: str | None):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        yield e.lineno, Bad("invalid_json_file", f"{e.msg} at line {e.lineno} column {e.colno}")
        return
    if isinstance(data, list):
        yield from _json_array_items(text, text.index("["))
        return
    if not isinstance(data, dict):
        yield 1, Bad("not_an_object", f"top level is {type(data).__name__}, expected an array or object")
        return
    key = records_key
    if key is None:
        lists = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(lists) == 1 and not _looks_like_record(data):
            key = lists[0]
    if key is None:
        yield 1, data  # a single record
        return
    if not isinstance(data.get(key), list):
        raise ValueError(f"{path}: records_key '{key}' is not a list in this file "
                         f"(top-level keys: {', '.join(list(data)[:10])})")
    m = re.search(r'"' + re.escape(key) + r'"\s*:\s*\[', text)
    if m:
        yield from _json_array_items(text, m.end() - 1)
    else:  # cannot place items on lines: use the item number
        yield from enumerate(data[key], 1)


def _looks_like_record(d: dict) -> bool:
    return any(k in d for k in ("text", "messages", "conversations", "instruction", "prompt"))


def _iter_csv(text: str, delimiter: str, max_bytes: int, skipped: frozenset[int] = frozenset()):
    """(first line, row); ``skipped``: lines blanked out (undecodable), never a row's first line."""
    csv.field_size_limit(max(max_bytes, 131072))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    prev = 1
    try:
        for row in reader:
            start, prev = prev + 1, reader.line_num
            while start in skipped and start < prev:
                start += 1
            if None in row or any(v is None for v in row.values()):
                yield start, Bad("bad_row", f"row has a different number of fields than the header "
                                            f"({len(reader.fieldnames or [])})")
                continue
            yield start, row
    except csv.Error as e:
        yield reader.line_num, Bad("csv_error", f"{e} (rest of the file skipped)")


def _blocks(text: str):
    """(first line, block) of blank-line separated blocks."""
    line, buf, start = 0, [], 1
    for line, ln in enumerate(text.split("\n"), 1):
        if ln.strip():
            if not buf:
                start = line
            buf.append(ln)
        elif buf:
            yield start, "\n".join(buf)
            buf = []
    if buf:
        yield start, "\n".join(buf)


# ---------------------------------------------------------------------------------------------------
# record schemas -> {id?, text | messages, keep...}


def _str_field(obj: dict, key: str, required: bool = True) -> str | None:
    v = obj.get(key)
    if v is None:
        if required:
            raise Bad("missing_field", f"no field '{key}'")
        return None
    if not isinstance(v, str):
        raise Bad("wrong_type", f"field '{key}' is {type(v).__name__}, expected string")
    return v


def _check_messages(msgs: Any, key: str = "messages") -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise Bad("wrong_type", f"field '{key}' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise Bad("wrong_type", f"{key}[{i}] is {type(m).__name__}, expected an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise Bad("bad_messages", f"{key}[{i}].role is {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise Bad("wrong_type", f"{key}[{i}].content is {type(content).__name__}, expected string")
        out.append({"role": role, "content": content})
    roles = {m["role"] for m in out}
    if "user" not in roles or "assistant" not in roles:
        raise Bad("bad_messages", f"'{key}' needs at least one user and one assistant message")
    if not any(m["content"].strip() for m in out if m["role"] == "assistant"):
        raise Bad("empty_text", "assistant messages are empty")
    return out


def _from_alpaca(obj: dict) -> list[dict]:
    instruction = _str_field(obj, "instruction")
    inp = _str_field(obj, "input", required=False) or ""
    output = _str_field(obj, "output")
    system = _str_field(obj, "system", required=False)
    msgs = [{"role": "system", "content": system}] if system else []
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
        raise Bad("wrong_type", "field 'history' must be a list of [question, answer] string pairs")
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    user = "\n".join(p for p in (instruction, inp) if p)
    if not user.strip():
        raise Bad("empty_text", "instruction and input are empty")
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _check_messages(msgs)


def _from_sharegpt(obj: dict) -> list[dict]:
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise Bad("wrong_type", "field 'conversations' must be a non-empty list of {from, value}")
    system = _str_field(obj, "system", required=False)
    msgs = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise Bad("wrong_type", f"conversations[{i}] is {type(turn).__name__}, expected an object")
        who, value = turn.get("from"), turn.get("value")
        if who not in SHAREGPT_ROLES:
            raise Bad("bad_messages", f"conversations[{i}].from is {who!r}, expected one of "
                                      f"{', '.join(SHAREGPT_ROLES)}")
        if not isinstance(value, str):
            raise Bad("wrong_type", f"conversations[{i}].value is {type(value).__name__}, expected string")
        msgs.append({"role": SHAREGPT_ROLES[who], "content": value})
    return _check_messages(msgs, "conversations")


def _from_prompt_completion(obj: dict) -> list[dict]:
    p, c = obj.get("prompt"), obj.get("completion")
    if p is None or c is None:
        raise Bad("missing_field", "needs both 'prompt' and 'completion'")
    if isinstance(p, list) and isinstance(c, list):  # conversational prompt-completion (TRL)
        return _check_messages(p + c, "prompt+completion")
    if not isinstance(p, str) or not isinstance(c, str):
        raise Bad("wrong_type", f"'prompt' is {type(p).__name__} and 'completion' is {type(c).__name__}, "
                                "expected strings (or two lists of messages)")
    return _check_messages([{"role": "user", "content": p}, {"role": "assistant", "content": c}])


def detect_schema(obj: dict) -> str:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj:
        return "alpaca"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    keys = ", ".join(list(obj)[:10])
    raise Bad("missing_field", f"no content field (text, messages, conversations, instruction or "
                               f"prompt/completion); found keys: {keys}")


def to_record(obj: Any, schema: str | None = None, field_map: dict | None = None,
              keep: tuple[str, ...] = ("label",)) -> dict:
    """One input object -> ``{id?, text | messages, keep...}``; raises :class:`Bad`."""
    if not isinstance(obj, dict):
        raise Bad("not_an_object", f"expected an object, got {type(obj).__name__}")
    if field_map:
        missing = [src for src in field_map.values() if src not in obj]
        if missing:
            raise Bad("missing_field", f"no field '{missing[0]}' (from field_map); found keys: "
                                       f"{', '.join(list(obj)[:10])}")
        obj = {**{k: v for k, v in obj.items() if k not in field_map.values()},
               **{dst: obj[src] for dst, src in field_map.items()}}
    schema = schema or detect_schema(obj)
    rec: dict[str, Any] = {}
    if schema == "text":
        text = _str_field(obj, "text")
        if not text.strip():
            raise Bad("empty_text", "field 'text' is empty")
        rec["text"] = text
    elif schema == "messages":
        rec["messages"] = _check_messages(obj.get("messages"))
    elif schema == "sharegpt":
        rec["messages"] = _from_sharegpt(obj)
    elif schema == "alpaca":
        rec["messages"] = _from_alpaca(obj)
    elif schema == "prompt_completion":
        rec["messages"] = _from_prompt_completion(obj)
    else:
        raise ValueError(f"unknown schema {schema!r}")
    rid = obj.get("id")
    if rid is not None and rid != "":
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise Bad("wrong_type", f"field 'id' is {type(rid).__name__}, expected string or integer")
        rec["id"] = str(rid)
    for k in keep:
        v = obj.get(k)
        rec[k] = v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False, sort_keys=True)
    for key, value in _record_strings(rec):
        if _SURROGATE_RE.search(value):
            raise Bad("bad_text", f"field '{key}' holds a lone UTF-16 surrogate (an escape like \\ud800): "
                                  "not valid Unicode text")
    return rec


def _record_strings(rec: dict):
    """(field, string) of every string a record carries."""
    for k, v in rec.items():
        if k == "messages":
            for i, m in enumerate(v):
                yield f"messages[{i}].content", m["content"]
        elif isinstance(v, str):
            yield k, v


def _record_bytes(rec: dict) -> int:
    return sum(len(v.encode("utf-8")) for _, v in _record_strings(rec))


# ---------------------------------------------------------------------------------------------------
# sources


def _check_spec(spec: dict) -> dict:
    if not isinstance(spec, dict) or "path" not in spec:
        raise ValueError(f"source spec must be a mapping with a 'path', got {spec!r}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"source {spec['path']}: unknown key '{sorted(unknown)[0]}' "
                         f"(allowed: {', '.join(sorted(SPEC_KEYS))})")
    fmt = spec.get("format", "auto")
    if fmt not in FORMATS:
        raise ValueError(f"source {spec['path']}: format '{fmt}' unknown (allowed: {', '.join(FORMATS)})")
    w = spec.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or not math.isfinite(w):
        raise ValueError(f"source {spec['path']}: weight must be a number > 0, got {w!r}")
    if spec.get("unit", "file") not in ("file", "block"):
        raise ValueError(f"source {spec['path']}: unit must be 'file' or 'block', got {spec['unit']!r}")
    fm = spec.get("field_map") or {}
    if not isinstance(fm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in fm.items()):
        raise ValueError(f"source {spec['path']}: field_map must map target field names to input field names")
    return spec


def _file_format(path: Path, fmt: str) -> str:
    if fmt in FILE_FORMATS:
        return fmt
    ext = EXTENSIONS.get(path.suffix.lower())
    if fmt in SCHEMAS:
        if ext not in ("json", "jsonl"):
            raise ValueError(f"{path}: format '{fmt}' needs a .json or .jsonl file")
        return ext
    if ext is None:
        raise ValueError(f"{path}: cannot tell the format from the extension '{path.suffix}'; "
                         f"set format (one of {', '.join(FILE_FORMATS)})")
    return ext


def expand_paths(pattern: str, fmt: str = "auto", base_dir: str | Path | None = None) -> tuple[Path, list[Path]]:
    """(root, sorted files) of a file, folder or glob. The root is the part before any wildcard."""
    p = Path(pattern)
    if base_dir is not None and not p.is_absolute():
        p = Path(base_dir) / p
    if fmt == "hf":
        if not p.is_dir():
            raise ValueError(f"source {pattern}: format hf needs a folder written by save_to_disk")
        return p.parent, [p]
    # pathlib's glob and rglob never descend into linked folders (glob.glob's '**' does, and a link
    # loop then lists each file ~40 times, or 2^40 times with two loops)
    if glob.has_magic(str(p)):
        parts = p.parts
        first = next(i for i, s in enumerate(parts) if glob.has_magic(s))
        root = Path(*parts[:first]) if first else Path(".")
        rest = str(Path(*parts[first:]))
        files = [f for f in root.glob(rest) if f.is_file() or f.is_symlink()]
        if "**" in parts[first:]:
            files += _linked_folders(root)
    elif p.is_dir():
        root = p
        exts = {e for e, f in EXTENSIONS.items() if fmt in ("auto", f) or (fmt in SCHEMAS and f in ("json", "jsonl"))}
        files = [f for f in p.rglob("*") if (f.is_file() or f.is_symlink()) and f.suffix.lower() in exts]
        files += _linked_folders(root)
    elif p.is_file():
        root, files = p.parent, [p]
    elif p.is_symlink():  # a link that loops or points nowhere: quarantined with the reason
        root, files = p.parent, [p]
    else:
        raise ValueError(f"source {pattern}: no such file or folder")
    files = sorted({f for f in files if not any(s.startswith(".") for s in f.relative_to(root).parts)})
    files = _one_path_per_file(files)
    if not files:
        raise ValueError(f"source {pattern}: no files match")
    return root, files


def _one_path_per_file(files: list[Path]) -> list[Path]:
    """Drop second paths to the same file (links), keeping the first; paths with problems are kept."""
    seen: dict[tuple[int, int], Path] = {}
    out = []
    for f in files:
        if path_problem(f) is None and f.is_file():
            st = f.stat()
            first = seen.setdefault((st.st_dev, st.st_ino), f)
            if first != f:
                log.info("source file %s is the same file as %s: read once", display_path(f), display_path(first))
                continue
        out.append(f)
    return out


def _raw_items(path: Path, ffmt: str, spec: dict, max_bytes: int, info: dict):
    """(line, object | text | Bad) of one file; records the encoding in ``info``."""
    if ffmt == "parquet":
        import pyarrow.parquet as pq

        info["encoding"] = "parquet"
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
        return
    if ffmt == "hf":
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            split = spec.get("split") or (next(iter(ds)) if len(ds) == 1 else None)
            if split not in ds:
                raise ValueError(f"{path}: a DatasetDict with splits {', '.join(ds)}: set 'split' in the source")
            ds = ds[split]
        info["encoding"] = "arrow"
        for i, row in enumerate(ds, 1):
            yield i, row
        return
    if Path(path).stat().st_size == 0:
        yield 0, Bad("empty_file")
        return
    enc = detect_encoding(path)
    info["encoding"] = enc
    lines = info.setdefault("lines", Counter())
    if ffmt == "jsonl":
        yield from _iter_jsonl(path, enc, max_bytes, lines)
        return
    size = Path(path).stat().st_size
    if size > (max_bytes if ffmt in ("txt", "md", "html") and spec.get("unit", "file") == "file" else 20 * max_bytes):
        raise Bad("file_too_large" if ffmt in ("json", "csv", "tsv") or spec.get("unit") == "block"
                  else "record_too_large", f"{size} bytes")
    bad_lines: list[int] = []
    if enc == "mixed":
        text, bad_lines = _decode_mixed(Path(path).read_bytes(), lines)
        for line in bad_lines:
            yield line, Bad("undecodable_line", "not valid UTF-8 nor GB18030 (left out of the text)")
    else:
        text = Path(path).read_bytes().decode(enc)
    if not text.strip():
        yield 0, Bad("empty_file", "only whitespace")
        return
    if ffmt == "json":
        yield from _iter_json(path, text, spec.get("records_key"))
    elif ffmt in ("csv", "tsv"):
        yield from _iter_csv(text, "," if ffmt == "csv" else "\t", max_bytes, frozenset(bad_lines))
    else:
        if ffmt == "html":
            text = html_to_text(text)
        elif ffmt == "md":
            text = markdown_to_text(text)
        if spec.get("unit", "file") == "block":
            yield from _blocks(text)
        else:
            yield 1, text


def read_source(spec: dict, base_dir: str | Path | None = None, on_error: str = "quarantine",
                max_record_bytes: int = MAX_RECORD_BYTES):
    """Read one source (all its files, no sampling, no id check across sources):
    ``(records, stats, quarantine)``; each record carries ``_where = (file, line)``."""
    spec = _check_spec(dict(spec))
    fmt = spec.get("format", "auto")
    root, files = expand_paths(spec["path"], fmt, base_dir)
    name = spec.get("name") or (root.resolve().name or "source")
    schema = fmt if fmt in SCHEMAS else None
    keep = tuple(spec.get("keep", ("label",)))
    records: list[dict] = []
    quarantine: list[dict] = []
    st = {"name": name, "path": str(spec["path"]), "format": fmt, "weight": spec.get("weight", 1.0),
          "files": len(files), "records_read": 0, "valid": 0, "quarantined_records": 0, "bad_files": 0,
          "encodings": Counter(), "reasons": Counter(), "encoding_notes": [], "lines_gb18030": 0}

    def bad(file: Path, line: int, b: Bad, is_file: bool):
        if on_error == "raise":
            raise ValueError(f"{display_path(file)}:{line}: {b.reason}")
        quarantine.append({"file": display_path(file), "line": line, "reason": b.reason})
        st["reasons"][b.category] += 1
        st["bad_files" if is_file else "quarantined_records"] += 1

    for f in files:
        problem = path_problem(f)
        if problem is not None:
            bad(f, 0, problem, is_file=True)
            continue
        ffmt = _file_format(f, fmt)
        rel = f.relative_to(root).as_posix() if ffmt != "hf" else f.name
        info: dict = {}
        ok, file_bad = 0, []
        try:
            for line, item in _raw_items(f, ffmt, spec, max_record_bytes, info):
                if isinstance(item, Bad) and item.category in FILE_LEVEL:
                    bad(f, line, item, is_file=True)
                    continue
                st["records_read"] += 1
                try:
                    if isinstance(item, Bad):
                        raise item
                    if isinstance(item, str):
                        if len(item.encode("utf-8")) > max_record_bytes:
                            raise Bad("record_too_large", f"more than {max_record_bytes} bytes")
                        if not item.strip():
                            raise Bad("empty_text", "no text")
                        rec = {"text": item, **{k: None for k in keep}}
                    else:
                        rec = to_record(item, schema, spec.get("field_map"), keep)
                        if _record_bytes(rec) > max_record_bytes:
                            raise Bad("record_too_large", f"more than {max_record_bytes} bytes")
                except Bad as b:
                    file_bad.append(b)
                    bad(f, line, b, is_file=False)
                    continue
                rec.setdefault("id", f"{name}/{rel}:{line}")
                rec["_where"] = (str(f), line)
                records.append(rec)
                ok += 1
        except Bad as b:  # the whole file (encoding, binary, size)
            if b.category == "record_too_large":  # a one-document file: that document
                st["records_read"] += 1
            bad(f, 0, b, is_file=b.category != "record_too_large")
            continue
        except OSError as e:  # a disk or permission error while reading: stop, naming the file
            raise ValueError(f"{display_path(f)}: cannot read ({e.strerror or e})") from None
        if ok == 0 and file_bad and all(b.category == "missing_field" for b in file_bad):
            raise ValueError(f"{f}:{quarantine[-len(file_bad)]['line']}: {file_bad[0].reason}; no record of "
                             f"this file has the expected fields: set field_map in the source spec "
                             f"(e.g. field_map: {{text: <your field>}})")
        if "encoding" in info:
            st["encodings"][info["encoding"]] += 1
            if info["encoding"] == "mixed":
                n = info["lines"]
                st["lines_gb18030"] += n["gb18030"]
                st["encoding_notes"].append({
                    "file": str(f), "encoding": "mixed",
                    "note": f"read line by line: {n['utf-8']} non-ASCII lines UTF-8, {n['gb18030']} GB18030, "
                            f"{n['undecodable']} undecodable (quarantined)",
                    "lines_utf8": n["utf-8"], "lines_gb18030": n["gb18030"], "lines_undecodable": n["undecodable"]})
            elif info["encoding"] not in ("utf-8", "parquet", "arrow"):
                st["encoding_notes"].append({"file": str(f), "encoding": info["encoding"],
                                             "note": "converted to UTF-8"})
    st["valid"] = len(records)
    if not records:
        top = ", ".join(f"{k} x{v}" for k, v in st["reasons"].most_common(3))
        raise ValueError(f"source {spec['path']}: no valid records ({len(quarantine)} problems: {top or 'none'})")
    st["encodings"] = dict(st["encodings"])
    st["reasons"] = dict(st["reasons"])
    return records, st, quarantine


def read_sources(specs: list[dict], seed: int = 0, base_dir: str | Path | None = None,
                 on_error: str = "quarantine", max_record_bytes: int = MAX_RECORD_BYTES):
    """Read and weight several sources into one Dataset: ``(Dataset, stats, quarantine_records)``.

    Columns: ``id``, ``text`` or ``messages``, ``source`` (the source's name) and the ``keep`` fields.
    ``stats["records_read"] == stats["valid"] + stats["quarantined_records"]`` (duplicate ids included).
    """
    from datasets import Dataset, Features, Value

    if on_error not in ("quarantine", "raise"):
        raise ValueError(f"on_error must be 'quarantine' or 'raise', got {on_error!r}")
    if not specs:
        raise ValueError("read_sources: no sources given")
    out: list[dict] = []
    quarantine: list[dict] = []
    per_source = []
    kinds: dict[str, str] = {}
    seen_ids: dict[str, tuple[str, int]] = {}
    keep_all: list[str] = []
    for i, spec in enumerate(specs):
        records, st, q = read_source(spec, base_dir, on_error, max_record_bytes)
        quarantine += q
        for rec in records:
            kinds.setdefault("messages" if "messages" in rec else "text", "{}:{}".format(*rec["_where"]))
        if len(kinds) > 1:
            raise ValueError(f"sources mix raw text ({kinds.get('text')}) and instruction records "
                             f"({kinds.get('messages')}): build them as separate corpora")
        for k in spec.get("keep", ("label",)):
            if k not in keep_all:
                keep_all.append(k)
        st["duplicate_ids"] = 0
        unique = []
        for rec in records:
            where = rec.pop("_where")
            first = seen_ids.setdefault(rec["id"], where)
            if first != where:
                b = Bad("duplicate_id", f"first seen at {first[0]}:{first[1]}")
                if on_error == "raise":
                    raise ValueError(f"{where[0]}:{where[1]}: {b.reason}")
                quarantine.append({"file": where[0], "line": where[1], "reason": b.reason})
                st["duplicate_ids"] += 1
                st["quarantined_records"] += 1
                st["reasons"]["duplicate_id"] = st["reasons"].get("duplicate_id", 0) + 1
                continue
            unique.append(rec)
        st["valid"] = len(unique)
        # exactly round(frac * n) records get the fractional extra copy, chosen by (seed, source position):
        # the same sample wherever the files live, and a weight of 0.3 keeps 30%, not 30% +- noise
        rng = random.Random(f"{seed}:{i}")
        w = float(spec.get("weight", 1.0))
        whole, frac = int(w), w - int(w)
        extra = set(rng.sample(range(len(unique)), round(frac * len(unique)))) if frac else set()
        sampled = 0
        for j, rec in enumerate(unique):
            copies = whole + (1 if j in extra else 0)
            for c in range(copies):
                out.append({**rec, "id": rec["id"] if c == 0 else f"{rec['id']}#{c + 1}", "source": st["name"]})
            sampled += copies
        st["sampled"] = sampled
        per_source.append(st)
    kind = next(iter(kinds))
    for rec in out:
        for k in keep_all:
            rec.setdefault(k, None)
    content = ({"text": Value("string")} if kind == "text" else
               {"messages": [{"role": Value("string"), "content": Value("string")}]})
    features = Features({"id": Value("string"), **content, "source": Value("string"),
                         **{k: Value("string") for k in keep_all if k not in ("id", "source")}})
    ds = Dataset.from_list(out, features=features)
    enc: Counter = Counter()
    for s in per_source:
        enc.update(s["encodings"])
    stats = {"kind": kind, "seed": seed, "sources": per_source, "records": len(ds),
             "files": sum(s["files"] for s in per_source), "bad_files": sum(s["bad_files"] for s in per_source),
             "records_read": sum(s["records_read"] for s in per_source),
             "valid": sum(s["valid"] for s in per_source),
             "quarantined_records": sum(s["quarantined_records"] for s in per_source),
             "quarantined": len(quarantine), "encodings": dict(enc),
             "lines_gb18030": sum(s["lines_gb18030"] for s in per_source),
             "encoding_notes": [n for s in per_source for n in s["encoding_notes"]][:200],
             "reasons": dict(sum((Counter(s["reasons"]) for s in per_source), Counter()))}
    assert stats["records_read"] == stats["valid"] + stats["quarantined_records"], stats
    return ds, stats, quarantine
