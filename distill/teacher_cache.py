"""Pre-computed top-k teacher logits on disk, so teacher and student never need to be in memory together.

The teacher runs once over the student's *prepared* training rows (tokenized, packed, labelled exactly
as the trainer will see them) and keeps, for every completion position (see
:func:`banklm.distill.losses.completion_positions`), its ``k`` largest logits (fp16), their token ids (int32)
and the full-vocabulary log-normaliser at the distillation temperature (fp32, for the tail bucket).

Layout (safetensors only, never pickles)::

    cache.json                 version, key (what the cache was computed from), top_k, temperature, shards
    shard-00000.safetensors    values [P, k] f16, indices [P, k] i32, lse [P] f32,
                               offsets [R + 1] i64 (row r owns positions offsets[r]:offsets[r+1]),
                               row_keys [R, 32] u8 (sha256 of the row: token ids, pack boundaries, label mask)

Safe reuse: :func:`open_teacher_cache` returns the cache only when ``cache.json`` carries the same key
(the caller puts the teacher's weight hashes, ``top_k`` and the temperature in it) and the same data
fingerprint; rows are found by content hash, so a row the cache never saw is reported missing instead
of getting another row's logits. Shards are read lazily (memory-mapped slices), so a cache larger than
RAM works.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from banklm.finetune.sft import PackedRowsCollator, forward_inputs

from banklm.io import atomic_dir

CACHE_VERSION = 1
CACHE_FILE = "cache.json"
CACHE_BATCH_ROWS = 8   # packed rows per teacher forward while filling the cache (banklm plan counts its logits)


def row_key(row: dict) -> bytes:
    """sha256 of what decides a row's teacher logits and stored positions."""
    h = hashlib.sha256()
    ids = np.asarray(row["input_ids"], dtype=np.int64)
    h.update(ids.tobytes())
    h.update(b"|")
    h.update(np.asarray(row.get("seq_lengths") or [len(ids)], dtype=np.int64).tobytes())
    h.update(b"|")
    labels = row.get("labels")
    mask = np.ones(len(ids), dtype=np.uint8) if labels is None else (np.asarray(labels) != -100).astype(np.uint8)
    h.update(mask.tobytes())
    return h.digest()


def data_fingerprint(rows: Sequence[dict]) -> str:
    """sha256 over the row keys in order: identifies the prepared training data."""
    h = hashlib.sha256()
    for row in rows:
        h.update(row_key(row))
    return h.hexdigest()


def _key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class TeacherCache:
    """Read side: ``lookup(row)`` -> ``(values f16 [n,k], indices i32 [n,k], lse f32 [n])`` or None."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        meta_path = self.folder / CACHE_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder}: no {CACHE_FILE} (not a teacher cache)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("version") != CACHE_VERSION:
            raise ValueError(f"{meta_path}: cache version {self.meta.get('version')}, expected {CACHE_VERSION}")
        self.top_k = int(self.meta["top_k"])
        self.temperature = float(self.meta["temperature"])
        self._shards = []
        self._index: dict[bytes, tuple[int, int, int]] = {}
        for s, info in enumerate(self.meta["shards"]):
            f = safe_open(str(self.folder / info["file"]), framework="pt")
            self._shards.append(f)
            offsets = f.get_tensor("offsets").tolist()
            keys = f.get_tensor("row_keys").numpy()
            for r in range(len(offsets) - 1):
                self._index[keys[r].tobytes()] = (s, offsets[r], offsets[r + 1])

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, row: dict):
        found = self._index.get(row_key(row))
        if found is None:
            return None
        s, a, b = found
        f = self._shards[s]
        return f.get_slice("values")[a:b], f.get_slice("indices")[a:b], f.get_slice("lse")[a:b]


def open_teacher_cache(folder: str | Path, key: dict, fingerprint: str) -> TeacherCache | None:
    """The cache in ``folder`` if it was built from the same ``key`` and data ``fingerprint``, else None."""
    meta_path = Path(folder) / CACHE_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if (meta.get("version") != CACHE_VERSION or meta.get("key_sha256") != _key_digest(key)
            or meta.get("data_fingerprint") != fingerprint):
        return None
    return TeacherCache(folder)


def build_teacher_cache(teacher, rows: Sequence[dict], out_dir: str | Path, *, pad_token_id: int, top_k: int,
                        temperature: float = 1.0, key: dict | None = None, batch_rows: int = CACHE_BATCH_ROWS,
                        shard_rows: int = 4096, fingerprint: str | None = None,
                        vocab_size: int | None = None) -> TeacherCache:
    """Run ``teacher`` over ``rows`` (dicts with ``input_ids``, ``labels``, optional ``seq_lengths``) in
    chunks of ``batch_rows`` and write the top-k cache atomically into ``out_dir``.

    Rows are batched with the trainer's own collator (:class:`banklm.finetune.sft.PackedRowsCollator`, right-padded
    rows: position ids restart per packed example, no attention mask, first token of each example
    unlabelled), so the stored positions, in row order, are exactly those the student's loss uses, whether
    its batches are padded rows or one flat row. ``vocab_size`` keeps only the first logit
    columns (a teacher whose embedding matrix is padded beyond the shared vocabulary).
    """
    import torch
    from safetensors.torch import save_file

    from .losses import completion_positions, topk_teacher

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    collate = PackedRowsCollator(pad_token_id)
    device = next(teacher.parameters()).device
    key = dict(key or {})
    fingerprint = fingerprint or data_fingerprint(rows)
    was_training = teacher.training
    teacher.eval()
    shards_meta, total_positions = [], 0
    with atomic_dir(out_dir) as tmp:
        buf: dict[str, list] = {"values": [], "indices": [], "lse": [], "lengths": [], "keys": []}

        def flush():
            nonlocal total_positions
            if not buf["keys"]:
                return
            name = f"shard-{len(shards_meta):05d}.safetensors"
            lengths = torch.tensor(buf["lengths"], dtype=torch.int64)
            offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
            offsets[1:] = lengths.cumsum(0)
            tensors = {
                "values": torch.cat(buf["values"]).to(torch.float16).contiguous(),
                "indices": torch.cat(buf["indices"]).to(torch.int32).contiguous(),
                "lse": torch.cat(buf["lse"]).to(torch.float32).contiguous(),
                "offsets": offsets,
                "row_keys": torch.from_numpy(np.frombuffer(b"".join(buf["keys"]), dtype=np.uint8)
                                             .reshape(-1, 32).copy()),
            }
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            shards_meta.append({"file": name, "rows": len(buf["keys"]), "positions": int(offsets[-1])})
            total_positions += int(offsets[-1])
            for v in buf.values():
                v.clear()

        with torch.inference_mode():
            for start in range(0, len(rows), batch_rows):
                chunk = [rows[i] for i in range(start, min(start + batch_rows, len(rows)))]
                batch = collate(chunk)
                logits = teacher(**forward_inputs(batch, device), use_cache=False).logits
                if vocab_size:
                    logits = logits[..., :vocab_size]
                mask = completion_positions(batch["labels"]).to(device)
                values, indices, lse = topk_teacher(logits[:, :-1][mask], top_k, temperature)
                buf["values"].append(values.cpu())
                buf["indices"].append(indices.cpu())
                buf["lse"].append(lse.cpu())
                buf["lengths"] += mask.sum(1).tolist()
                buf["keys"] += [row_key(r) for r in chunk]
                if len(buf["keys"]) >= shard_rows:
                    flush()
            flush()
        meta = {"version": CACHE_VERSION, "key": key, "key_sha256": _key_digest(key),
                "data_fingerprint": fingerprint, "top_k": int(top_k), "temperature": float(temperature),
                "rows": len(rows), "positions": total_positions, "shards": shards_meta}
        (tmp / CACHE_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    if was_training:
        teacher.train()
    return TeacherCache(out_dir)
