"""Exact and near deduplication.

Both compare a *dedup key*: the text normalised (:func:`banklm.corpora.ops.normalize.normalize_text`), lower-
cased, with all whitespace removed, so that layout differences never hide a duplicate. The first record
of each group (in dataset order) is kept.

Near dedup: MinHash signatures (``datasketch``, ``num_perm`` permutations) over the set of character
``ngram``-grams of the key, computed with ``datasets.map(num_proc)``; candidate pairs from MinHash LSH
(``threshold``; band parameters chosen with ``lsh_weights=(0.1, 0.9)`` = false negatives weigh 9x false
positives: with 128 permutations a pair at Jaccard 0.9 is a candidate with probability 0.999, at 0.8 0.87,
where datasketch's default (0.5, 0.5) gives 0.93 and 0.40), each verified by the signature's Jaccard
estimate (mean of equal signature slots >= ``threshold``); clusters are the connected components
of verified pairs (union-find). Stats report the cluster-size histogram. Shingles are hashed with CRC32
(fast, deterministic across processes; 32 bits suits the ``affine32`` scheme).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .base import Step, StepResult, filter_by_reasons, param, resolve_field, text_of
from .normalize import normalize_text

_WS = re.compile(r"\s+")


def dedup_key(text: str) -> str:
    return _WS.sub("", normalize_text(text)).lower()


def text_hash(text: str) -> str:
    return hashlib.blake2b(dedup_key(text).encode("utf-8"), digest_size=16).hexdigest()


def char_ngrams(text: str, n: int) -> set[str]:
    if len(text) <= n:
        return {text}
    return {text[i:i + n] for i in range(len(text) - n + 1)}


@dataclass(repr=False, eq=False)
class ExactDedup(Step):
    """Drop records whose dedup key equals that of an earlier record (reason ``exact_duplicate``)."""

    name = "exact_dedup"

    field: str | None = None

    def apply(self, ds, num_proc: int = 1) -> StepResult:
        field = resolve_field(ds, self.field)

        def fn(batch):
            cols = {k: batch[k] for k in (field, "completion") if k in batch}
            n = len(cols[field])
            return {"__h": [text_hash(text_of({k: v[i] for k, v in cols.items()}, field)) for i in range(n)]}

        hashes = ds.map(fn, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                        desc="exact_dedup")["__h"]
        seen: set[str] = set()
        reasons: list[str | None] = []
        for h in hashes:
            reasons.append("exact_duplicate" if h in seen else None)
            seen.add(h)
        return filter_by_reasons(self, ds, reasons, field, duplicate_groups=sum(
            1 for c in Counter(hashes).values() if c > 1))


@dataclass(repr=False, eq=False)
class NearDedup(Step):
    """MinHash-LSH near-duplicate removal over character n-grams; keeps one record per cluster."""

    name = "near_dedup"

    ngram: int = param(5, ge=1, le=64)
    threshold: float = param(0.8, gt=0.0, le=1.0)
    num_perm: int = param(128, ge=16, le=1024)
    seed: int = param(42)
    lsh_weights: tuple[float, float] = (0.1, 0.9)
    field: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lsh_weights = tuple(self.lsh_weights)

    def signatures(self, ds, field: str, num_proc: int = 1) -> np.ndarray:
        """``(len(ds), num_perm)`` uint32 MinHash signatures."""
        from datasketch import MinHash

        perms = MinHash(num_perm=self.num_perm, seed=self.seed).permutations
        n, num_perm, seed = self.ngram, self.num_perm, self.seed

        def fn(batch):
            cols = {k: batch[k] for k in (field, "completion") if k in batch}
            sigs = []
            for i in range(len(cols[field])):
                key = dedup_key(text_of({k: v[i] for k, v in cols.items()}, field))
                m = MinHash(num_perm=num_perm, seed=seed, hashfunc=_crc32, permutations=perms,
                            scheme="affine32")
                m.update_batch([g.encode("utf-8") for g in char_ngrams(key, n)])
                sigs.append(m.hashvalues)
            return {"__mh": sigs}

        out = ds.map(fn, batched=True, batch_size=256, num_proc=num_proc, remove_columns=ds.column_names,
                     desc="minhash")
        if len(out) == 0:
            return np.zeros((0, num_perm), dtype=np.uint32)
        return np.asarray(out.with_format("numpy")["__mh"], dtype=np.uint32)

    def clusters(self, sigs: np.ndarray) -> list[int]:
        """Representative (lowest index of its cluster) for every record.

        LSH banding with datasketch's optimal (bands, rows) for the threshold and weights, done with numpy:
        records whose signatures agree on a whole band are candidates, and a candidate pair joins a cluster
        only when its estimated Jaccard (share of equal slots) reaches the threshold. The clusters are the
        connected components of the verified pairs, so the result does not depend on record order.
        """
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm, weights=self.lsh_weights)
        bands, rows = lsh.b, lsh.r
        sigs = np.ascontiguousarray(sigs, dtype=np.uint32)
        parent = list(range(len(sigs)))
        need = self.threshold * self.num_perm  # equal slots for an estimated Jaccard >= threshold

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for k in range(bands):
            band = np.ascontiguousarray(sigs[:, k * rows:(k + 1) * rows])
            keys = band.view(np.dtype((np.void, band.dtype.itemsize * rows))).ravel()
            _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
            members = np.nonzero(counts[inverse] > 1)[0]
            if len(members) == 0:
                continue
            members = members[np.argsort(inverse[members], kind="stable")]  # grouped, ascending inside
            bounds = np.nonzero(np.diff(inverse[members]))[0] + 1
            for group in np.split(members, bounds):
                group = group.tolist()
                for a in range(1, len(group)):
                    i = group[a]
                    for j in group[:a]:
                        ri, rj = find(i), find(j)
                        if ri != rj and np.count_nonzero(sigs[j] == sigs[i]) >= need:
                            parent[max(ri, rj)] = min(ri, rj)
        return [find(i) for i in range(len(sigs))]

    def apply(self, ds, num_proc: int = 1) -> StepResult:
        field = resolve_field(ds, self.field)
        sigs = self.signatures(ds, field, num_proc)
        reps = self.clusters(sigs)
        reasons = [None if r == i else "near_duplicate" for i, r in enumerate(reps)]
        sizes = Counter(Counter(reps).values())
        histogram = {str(k): sizes[k] for k in sorted(sizes)}
        return filter_by_reasons(self, ds, reasons, field, cluster_size_histogram=histogram,
                                 clusters_with_duplicates=sum(v for k, v in sizes.items() if k > 1))


def _crc32(b: bytes) -> int:
    return zlib.crc32(b)
