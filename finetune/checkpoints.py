"""Training checkpoints that survive a crash, and finding the one to resume from.

The Trainer writes ``checkpoint-<step>/`` (weights or adapter, optimizer, scheduler, RNG states,
``trainer_state.json``) into the checkpoint folder. A crash can leave that folder half written, so
banklm writes ``banklm_state.json`` into it *last* and atomically (:class:`banklm.finetune.callbacks.CheckpointState`):
a checkpoint is complete only when that file exists. It also records the run's *fingerprint* (every field
of the training config, seed, device, precision, base model files, data content, world size), so a
checkpoint left by different settings or data is never resumed: it is deleted and training starts over.

Rotation (keep the last K) is done here too, after the marker is written, so at every moment the newest
complete checkpoint exists on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "banklm_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")

log = logging.getLogger("banklm")


def checkpoint_step(path: Path) -> int | None:
    m = _CKPT_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-<step>`` folders (complete or not), oldest step first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def read_state(checkpoint: Path) -> dict | None:
    """The checkpoint's ``banklm_state.json``, or None when the checkpoint is incomplete."""
    try:
        return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def find_resumable(ckpt_dir: str | os.PathLike, fingerprint: str, *, clean: bool = True) -> tuple[Path, dict] | None:
    """Newest complete checkpoint whose fingerprint matches, with its banklm state.

    With ``clean`` (the main process only), incomplete checkpoints and those of other settings/data are
    deleted, with a log line saying why.
    """
    best = None
    for ck in reversed(list_checkpoints(ckpt_dir)):
        state = read_state(ck)
        if state is None:
            reason = "incomplete (interrupted while saving)"
        elif state.get("fingerprint") != fingerprint:
            reason = "written with other training settings or data"
        elif best is None:
            best = (ck, state)
            continue
        else:
            continue
        if clean:
            log.warning("discarding checkpoint %s: %s", ck, reason)
            shutil.rmtree(ck, ignore_errors=True)
    return best


def rotate(ckpt_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (never an incomplete newer one's only fallback)."""
    complete = [ck for ck in list_checkpoints(ckpt_dir) if read_state(ck) is not None]
    removed = complete[: max(0, len(complete) - max(1, keep))]
    for ck in removed:
        shutil.rmtree(ck, ignore_errors=True)
    return removed


# --------------------------------------------------------------------------- fingerprint


def dataset_digest(ds) -> str:
    """sha256 of a ``datasets.Dataset``'s rows (column order, values), batch by batch."""
    h = hashlib.sha256(json.dumps(ds.column_names).encode())
    h.update(str(len(ds)).encode())
    for batch in ds.iter(batch_size=2048):
        h.update(json.dumps(batch, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()


def model_folder_stamp(folder: str | os.PathLike) -> list:
    """(name, bytes, mtime) of a model folder's config and weight files: cheap even for a 7B base."""
    folder = Path(folder)
    files = sorted([*folder.glob("*.json"), *folder.glob("*.safetensors"), *folder.glob("tokenizer*")])
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def training_fingerprint(config, model_dir: str | os.PathLike, train_ds, eval_ds=None, **runtime) -> str:
    """Identity of a training run for resuming: every field of ``config`` (a settings dataclass, nested ones
    included: nothing is listed twice), the ``runtime`` facts that also decide the weights (seed, device,
    precision, world size, ...), the base model files and the data content."""
    material = {
        "config": dataclasses.asdict(config),
        "runtime": runtime,
        "model": model_folder_stamp(model_dir),
        "train": dataset_digest(train_ds),
        "eval": dataset_digest(eval_ds) if eval_ds is not None else None,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
