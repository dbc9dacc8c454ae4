"""The hash-chain primitive shared by every tamper-evident log (the run ledger, the serving audit log).

A chain is a JSONL file of objects. Each carries ``seq`` (1, 2, ...), ``prev`` (the previous object's
``hash``, or null for the first) and ``hash``: sha256 of the object's canonical JSON without ``hash``.
Editing, deleting or reordering a line breaks the chain at that line; :func:`chain_problems` names it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from banklm.io import atomic_write_text


class ChainError(Exception):
    """The chain file itself cannot be read (not valid JSON lines)."""


@dataclass
class Problem:
    """One place where a chain, or a file it records, does not match. ``stage`` labels the entry."""

    seq: int | None
    stage: str | None
    path: str | None
    message: str

    def __str__(self) -> str:
        where = f"entry {self.seq} ({self.stage})" if self.seq is not None else "ledger"
        return f"{where}: {self.path + ': ' if self.path else ''}{self.message}"


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes a hash is taken over."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def read_chain(path: str | os.PathLike) -> list[dict]:
    """Every object of a chain file (``[]`` when the file does not exist); :class:`ChainError` names a bad line."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChainError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ChainError(f"{path}:{lineno}: not a JSON object")
        out.append(obj)
    return out


def append_link(path: str | os.PathLike, body: dict, entries: list[dict] | None = None) -> dict:
    """Chain ``body`` to the last object of ``path`` (``seq``, ``prev``, ``hash`` added) and rewrite the file
    atomically, so a crash leaves either the old chain or the new one. ``entries``: the file's objects when
    the caller has just read them."""
    path = Path(path)
    entries = read_chain(path) if entries is None else entries
    entry = {"seq": len(entries) + 1, **body, "prev": entries[-1]["hash"] if entries else None}
    entry["hash"] = entry_hash(entry)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + canonical_json(entry).decode("utf-8") + "\n")
    return entry


def chain_problems(entries: list[dict], label: str = "stage") -> list[Problem]:
    """The chain itself: positions, ``prev`` links and each entry's own hash (``label`` names an entry)."""
    problems, prev_hash = [], None
    for i, entry in enumerate(entries, 1):
        seq, name = entry.get("seq"), entry.get(label)
        if seq != i:
            problems.append(Problem(seq, name, None, f"is at position {i} but has seq {seq}: entries were deleted or reordered"))
        if entry.get("prev") != prev_hash:
            problems.append(Problem(seq, name, None, "prev does not match the previous entry's hash: "
                                    "an entry before it was deleted, reordered or edited"))
        if entry.get("hash") != entry_hash(entry):
            problems.append(Problem(seq, name, None, "content was edited: its hash does not match"))
        prev_hash = entry.get("hash")
    return problems
