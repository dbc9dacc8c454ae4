"""The lineage ledger: one hash-chained JSON line per stage, and its verifier.

Each entry records what a stage read and wrote (path, sha256, bytes), its parameters and the
library versions, plus ``prev`` (the previous entry's hash) and ``hash`` (sha256 of the entry's
canonical JSON without ``hash``). Editing, deleting or reordering entries breaks the chain;
editing a recorded file breaks its hash. ``verify_run`` names the first place that does not match.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from banklm.chain import (
    ChainError,
    Problem,
    append_link,
    chain_problems,
    read_chain,
)
from banklm.io import sha256_file

LEDGER_NAME = "ledger.jsonl"
TRACKED_PACKAGES = ("banklm", "torch", "transformers", "peft", "trl", "accelerate", "datasets",
                    "sentencepiece", "gguf", "onnx", "onnxruntime", "bitsandbytes")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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


def host_info() -> dict:
    """The machine a stage ran on: OS, CPU threads and any CUDA devices (names only)."""
    info: dict[str, Any] = {"platform": platform.platform(terse=True), "machine": platform.machine(),
                            "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                        if torch.cuda.is_available() else [])
    except Exception:  # noqa: BLE001 (a lineage record must not stop a run)
        pass
    return info


def data_lineage(stats: dict, seed: int | None = None) -> dict:
    """What the ledger keeps about one built corpus, from its ``stats.json``: sources, sampling,
    counts and PII counts by type. Only names, paths, numbers and settings: never a text or a value."""
    sources = []
    for s in stats.get("sources") or []:
        if s.get("type") == "synth":
            sources.append({k: s.get(k) for k in ("type", "task", "train", "validation", "test", "difficulty")})
        else:
            sources.append({k: s[k] for k in ("name", "path", "format", "weight", "files", "records_read", "valid",
                                              "quarantined_records", "sampled", "licence", "task", "split")
                            if k in s})
    splits = stats.get("splits") or {}
    sampling: dict[str, Any] = {}
    synth = {s["task"]: {k: s.get(k) for k in ("train", "validation", "test", "test_prevalence", "difficulty")
                         if k != "test_prevalence" or s.get(k)}  # the prevalence split only when built
             for s in stats.get("sources") or [] if s.get("type") == "synth"}
    if synth:
        sampling["synth"] = {"generator_seed": seed, "per_task": synth}
    weights = {s.get("name") or s.get("path"): s["weight"] for s in stats.get("sources") or [] if "weight" in s}
    if weights:
        sampling["source_weights"] = weights
        sampling["records_after_weights"] = stats.get("records_after_weights")
    if stats.get("split"):
        sampling["split"] = {k: stats["split"].get(k) for k in ("seed", "fractions", "stratified_by")}
    if "proportions" in stats:  # the mix: target proportions, and what each source gave per split
        sampling["mix"] = {"proportions": stats["proportions"], "seed": stats.get("seed"),
                           "taken": {split: {k: v.get("taken") for k, v in st.get("sources", {}).items()}
                                     for split, st in splits.items() if isinstance(st, dict) and "sources" in st}}
    if stats.get("seed") is not None:
        sampling.setdefault("seed", stats["seed"])
    counts: dict[str, Any] = {"splits": {k: (v.get("total", v.get("skipped")) if isinstance(v, dict) else v)
                                         for k, v in splits.items()}}
    if stats.get("counts"):
        counts.update(stats["counts"])
    if stats.get("by_task"):
        counts["by_task"] = stats["by_task"]
    if stats.get("quarantined") is not None:
        counts["quarantined"] = stats["quarantined"]
    steps = [{k: st.get(k) for k in ("step", "in", "kept", "dropped", "quarantined")}
             for st in stats.get("steps") or [] if isinstance(st, dict)]
    pii = stats.get("pii")
    pii = ({"mode": pii.get("mode"), "counts_by_type": dict(sorted((pii.get("counts") or {}).items())),
            "records_with_pii": pii.get("records_with_pii")} if isinstance(pii, dict) else None)
    return {"sources": sources, "sampling": sampling, "counts": counts, "steps": steps, "pii": pii}


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
        return read_chain(self.path)

    def append(self, stage: str, *, params: dict, inputs: list[dict], outputs: list[dict], started_at: str,
               finished_at: str, **extra: Any) -> dict:
        """Add one entry, chained to the last one; the file is rewritten atomically."""
        return append_link(self.path, {"stage": stage, "started_at": started_at, "finished_at": finished_at,
                                       "params": params, "inputs": inputs, "outputs": outputs,
                                       "versions": library_versions(), **extra})


# ----------------------------------------------------------------------------------------- model card

CARD_NAME = "MODEL_CARD.md"
CARD_ARTEFACTS_HEADING = "## 导出文件 Exported artefacts"
_CARD_ROW = re.compile(r"^\|\s*`?([^|`]+?)`?\s*\|\s*(\d+)\s*\|\s*`?([0-9a-f]{64})`?\s*\|\s*$")


def card_artefacts_section(records: list[dict]) -> str:
    """The card's table of exported files (path, bytes, sha256), which ``verify_run`` reads back."""
    lines = [CARD_ARTEFACTS_HEADING, "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| `{r['path']}` | {r['bytes']} | `{r['sha256']}` |" for r in records]
    return "\n".join(lines)


def read_card_artefacts(text: str) -> list[dict]:
    """The ``{path, bytes, sha256}`` rows of the card's exported-files table (empty if it has none)."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line.strip() == CARD_ARTEFACTS_HEADING
            continue
        m = _CARD_ROW.match(line.strip()) if inside else None
        if m:
            out.append({"path": m.group(1).strip(), "bytes": int(m.group(2)), "sha256": m.group(3)})
    return out


# files of a run folder no entry records: the ledger itself, the resolved recipe and the logs (rewritten by
# every invocation; the entries' params are the record of the settings), the lock of a running process
UNRECORDED_FILES = (LEDGER_NAME, "recipe.yaml", ".lock")
UNRECORDED_FOLDERS = ("logs",)


def unrecorded_files(run_dir: str | os.PathLike, entries: list[dict]) -> list[str]:
    """Files in the run folder that no ledger entry records (run-relative paths, sorted).

    A file added after its stage ran, or the outputs of entries cut from the end of the ledger (which
    would otherwise hide edits to them), or what an interrupted stage left behind.
    """
    run_dir = Path(run_dir)
    recorded = {r["path"] for e in entries for r in [*e.get("inputs", []), *e.get("outputs", [])]}
    out = []
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if (p.is_dir() and not p.is_symlink()) or rel in recorded or rel in UNRECORDED_FILES:
            continue
        if rel.split("/", 1)[0] in UNRECORDED_FOLDERS:
            continue
        out.append(rel)
    return out


def verify_run(run_dir: str | os.PathLike, check_external: bool = False, check_card: bool = True,
               check_unrecorded: bool = False) -> list[Problem]:
    """Re-check the chain and every recorded file; return the problems in ledger order (empty = intact).

    A file is checked against the newest entry that wrote it (a later stage may legitimately rewrite a
    file an earlier one produced); a file no stage wrote, against the newest entry that read it. Files outside the run folder are checked only on request.
    With ``check_card``, every exported file ``MODEL_CARD.md`` names must be the one the ledger
    recorded and the one on disk (same sha256). With ``check_unrecorded`` (``banklm verify``), every file
    of the folder must be recorded by an entry (:func:`unrecorded_files`): cutting entries off the end of
    the ledger keeps its chain valid, but leaves their outputs unrecorded.
    """
    run_dir = Path(run_dir)
    ledger = Ledger(run_dir)
    if not ledger.path.exists():
        return [Problem(None, None, LEDGER_NAME, "missing: this folder has no ledger")]
    try:
        entries = ledger.entries()
    except ChainError as e:
        return [Problem(None, None, LEDGER_NAME, str(e))]
    problems = chain_problems(entries)
    latest, produced = latest_records(entries)
    changed: set[str] = set()
    for path, (entry, rec) in sorted(latest.items(), key=lambda kv: (kv[1][0].get("seq", 0), kv[0])):
        if Path(path).is_absolute() and not check_external:
            continue
        problem = file_problem(run_dir, path, entry, rec)
        if problem is not None:
            problems.append(problem)
            changed.add(path)
    if check_card and (run_dir / CARD_NAME).is_file():
        problems += _check_card(run_dir, latest, produced, changed)
    problems.sort(key=lambda pr: (pr.seq if pr.seq is not None else 0))
    if check_unrecorded:
        problems += [Problem(None, None, rel, "not recorded by any ledger entry (added after its stage ran, the "
                             "ledger was cut short, or an interrupted stage left it)")
                     for rel in unrecorded_files(run_dir, entries)]
    return problems


def latest_records(entries: list[dict]) -> tuple[dict[str, tuple[dict, dict]], set[str]]:
    """``({path: (entry, record)}, produced paths)``: each file's record in the newest entry that wrote it, or,
    for a file no entry wrote, in the newest entry that read it."""
    latest: dict[str, tuple[dict, dict]] = {}
    produced: set[str] = set()
    for entry in entries:
        for rec in entry.get("inputs", []):
            if rec["path"] not in produced:
                latest[rec["path"]] = (entry, rec)
        for rec in entry.get("outputs", []):
            latest[rec["path"]] = (entry, rec)
            produced.add(rec["path"])
    return latest, produced


def file_problem(run_dir: Path, path: str, entry: dict, rec: dict) -> Problem | None:
    """A recorded file against its record (``path`` relative to ``run_dir``, or absolute): missing or changed."""
    p = Path(path) if Path(path).is_absolute() else run_dir / path
    if not p.exists():
        return Problem(entry.get("seq"), entry.get("stage"), path, "file is missing")
    if p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
        return Problem(entry.get("seq"), entry.get("stage"), path, "file changed since it was recorded (sha256 differs)")
    return None


def _check_card(run_dir: Path, latest: dict[str, tuple[dict, dict]], produced: set[str],
                changed: set[str]) -> list[Problem]:
    """Card rows against the ledger; files already found changed against the ledger are named again
    here, as not the ones the card names (a card row equal to its ledger record needs no second hash)."""
    problems = []
    card_entry = latest.get(CARD_NAME, ({}, {}))[0]
    for row in read_card_artefacts((run_dir / CARD_NAME).read_text(encoding="utf-8", errors="replace")):
        path = row["path"]
        if path not in produced:
            problems.append(Problem(card_entry.get("seq"), card_entry.get("stage"), path,
                                    f"{CARD_NAME} lists this exported file but no ledger entry wrote it"))
            continue
        entry, rec = latest[path]
        if rec["sha256"] != row["sha256"] or rec["bytes"] != row["bytes"]:
            problems.append(Problem(entry.get("seq"), entry.get("stage"), path,
                                    f"{CARD_NAME} gives sha256 {row['sha256'][:12]}... but the ledger recorded "
                                    f"{rec['sha256'][:12]}..."))
        elif path in changed:
            problems.append(Problem(entry.get("seq"), entry.get("stage"), path,
                                    f"the file on disk is not the one {CARD_NAME} names (sha256 differs)"))
    return problems
