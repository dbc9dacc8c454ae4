"""The lineage ledger: one hash-chained JSON line per stage, and its verifier.

Each entry records what a stage read and wrote (path, sha256, bytes), its parameters and the
library versions, plus ``prev`` (the previous entry's hash) and ``hash`` (sha256 of the entry's
canonical JSON without ``hash``). Editing, deleting or reordering entries breaks the chain;
editing a recorded file breaks its hash. ``verify_run`` names the first place that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from banklm.io import atomic_write_text, sha256_file

LEDGER_NAME = "ledger.jsonl"
TRACKED_PACKAGES = ("banklm", "torch", "transformers", "peft", "trl", "accelerate", "datasets",
                    "sentencepiece", "gguf", "onnx", "onnxruntime", "bitsandbytes")


class LedgerError(Exception):
    """The ledger file itself cannot be read (not valid JSON lines)."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def code_version() -> dict:
    """banklm's version and, when running from a git checkout, its commit and whether it is dirty."""
    here = Path(__file__).resolve().parent.parent
    info: dict[str, Any] = {"banklm": library_versions().get("banklm", "unknown")}
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def run_relative(path: Path, run_dir: Path) -> str:
    """Run-folder paths are stored relative (posix); files outside the run folder keep their absolute path."""
    path = path.resolve()
    try:
        return path.relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


def file_records(paths: list[Path], run_dir: Path) -> list[dict]:
    """Expand files and folders into sorted ``{path, sha256, bytes}`` records (hidden temp files skipped)."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(f for f in sorted(p.rglob("*")) if f.is_file() and not _is_temp(f, p))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: expected output/input does not exist")
    seen, out = set(), []
    for f in files:
        rel = run_relative(f, run_dir)
        if rel in seen:
            continue
        seen.add(rel)
        out.append({"path": rel, "sha256": sha256_file(f), "bytes": f.stat().st_size})
    return sorted(out, key=lambda r: r["path"])


def _is_temp(f: Path, root: Path) -> bool:
    return any(part.startswith(".") and (".tmp" in part or ".old-" in part) for part in f.relative_to(root).parts)


@dataclass
class Ledger:
    run_dir: Path

    @property
    def path(self) -> Path:
        return self.run_dir / LEDGER_NAME

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LedgerError(f"{self.path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise LedgerError(f"{self.path}:{lineno}: not a JSON object")
            out.append(obj)
        return out

    def append(self, stage: str, *, params: dict, inputs: list[dict], outputs: list[dict], started_at: str,
               finished_at: str, **extra: Any) -> dict:
        """Add one entry, chained to the last one; the file is rewritten atomically."""
        entries = self.entries()
        prev = entries[-1]["hash"] if entries else None
        entry = {
            "seq": len(entries) + 1,
            "stage": stage,
            "started_at": started_at,
            "finished_at": finished_at,
            "params": params,
            "inputs": inputs,
            "outputs": outputs,
            "versions": library_versions(),
            **extra,
            "prev": prev,
        }
        entry["hash"] = entry_hash(entry)
        old = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        atomic_write_text(self.path, old + canonical_json(entry).decode("utf-8") + "\n")
        return entry


@dataclass
class Problem:
    seq: int | None
    stage: str | None
    path: str | None
    message: str

    def __str__(self) -> str:
        where = f"entry {self.seq} ({self.stage})" if self.seq is not None else "ledger"
        return f"{where}: {self.path + ': ' if self.path else ''}{self.message}"


def verify_run(run_dir: str | os.PathLike, check_external: bool = False) -> list[Problem]:
    """Re-check the chain and every recorded file; return the problems in ledger order (empty = intact).

    A file is checked against the newest entry that wrote it (a later stage may legitimately rewrite a
    file an earlier one produced); a file no stage wrote, against the newest entry that read it. Files outside the run folder are checked only on request.
    """
    run_dir = Path(run_dir)
    ledger = Ledger(run_dir)
    if not ledger.path.exists():
        return [Problem(None, None, LEDGER_NAME, "missing: this folder has no ledger")]
    try:
        entries = ledger.entries()
    except LedgerError as e:
        return [Problem(None, None, LEDGER_NAME, str(e))]
    problems: list[Problem] = []
    prev_hash = None
    latest: dict[str, tuple[dict, dict]] = {}
    produced: set[str] = set()
    for i, entry in enumerate(entries, 1):
        seq, stage = entry.get("seq"), entry.get("stage")
        if seq != i:
            problems.append(Problem(seq, stage, None, f"is at position {i} but has seq {seq}: entries were deleted or reordered"))
        if entry.get("prev") != prev_hash:
            problems.append(Problem(seq, stage, None, "prev does not match the previous entry's hash: "
                                    "an entry before it was deleted, reordered or edited"))
        if entry.get("hash") != entry_hash(entry):
            problems.append(Problem(seq, stage, None, "content was edited: its hash does not match"))
        prev_hash = entry.get("hash")
        for rec in entry.get("inputs", []):
            if rec["path"] not in produced:
                latest[rec["path"]] = (entry, rec)
        for rec in entry.get("outputs", []):
            latest[rec["path"]] = (entry, rec)
            produced.add(rec["path"])
    for path, (entry, rec) in sorted(latest.items(), key=lambda kv: (kv[1][0].get("seq", 0), kv[0])):
        p = Path(path)
        if p.is_absolute():
            if not check_external:
                continue
        else:
            p = run_dir / p
        if not p.exists():
            problems.append(Problem(entry.get("seq"), entry.get("stage"), path, "file is missing"))
        elif p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
            problems.append(Problem(entry.get("seq"), entry.get("stage"), path,
                                    "file changed since it was recorded (sha256 differs)"))
    problems.sort(key=lambda pr: (pr.seq if pr.seq is not None else 0))
    return problems
