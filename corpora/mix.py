"""Mixing datasets by target proportions, and seeded train/validation/test splits.

:func:`mix` draws ``round(p * total)`` records from each dataset: without replacement when it has enough,
else every record ``k`` times plus a random remainder (upsampling; copies get ``#2``, ``#3``... appended to
their ``id`` so ids stay unique). ``total`` defaults to the largest size reachable without upsampling.
The result keeps the columns all inputs share, adds ``source`` (the dataset's name) and is shuffled.

:func:`split` cuts a dataset into named fractions, stratified by ``label`` when that column exists: each
label group is shuffled and cut at ``round(cumulative fraction * group size)``, so every split holds each
label in (nearly) the same proportion.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import numpy as np

DEFAULT_SPLITS = {"train": 0.9, "validation": 0.05, "test": 0.05}


def _target_counts(sizes: Mapping[str, int], props: Mapping[str, float], total: int | None) -> dict[str, int]:
    if total is None:
        total = int(min(sizes[k] / p for k, p in props.items() if p > 0))
    raw = {k: p * total for k, p in props.items()}
    counts = {k: int(math.floor(v)) for k, v in raw.items()}
    # largest remainder so that the counts add up to total exactly
    for k in sorted(raw, key=lambda k: (-(raw[k] - counts[k]), k))[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def mix(datasets: Mapping, proportions: Mapping[str, float], total: int | None = None, seed: int = 0):
    """Return ``(mixed Dataset, stats)``; ``proportions`` are normalised to sum to 1."""
    from datasets import concatenate_datasets

    missing = set(proportions) - set(datasets)
    if missing:
        raise ValueError(f"mix: proportions name unknown datasets: {', '.join(sorted(missing))}")
    if any(p < 0 for p in proportions.values()) or sum(proportions.values()) <= 0:
        raise ValueError(f"mix: proportions must be >= 0 and not all zero, got {dict(proportions)}")
    s = sum(proportions.values())
    props = {k: v / s for k, v in proportions.items() if v > 0}
    empty = [k for k in props if len(datasets[k]) == 0]
    if empty:
        raise ValueError(f"mix: dataset {empty[0]} is empty but has proportion {props[empty[0]]:.3f}")
    counts = _target_counts({k: len(datasets[k]) for k in props}, props, total)
    common = set.intersection(*(set(datasets[k].column_names) for k in props)) - {"source"}
    if not common & {"text", "messages", "prompt"}:
        raise ValueError("mix: the datasets share no content column (text, messages or prompt); "
                         f"columns: { {k: datasets[k].column_names for k in props} }")
    rng = np.random.default_rng(seed)
    parts, per_source = [], {}
    for name in sorted(props):
        ds = datasets[name]
        n, want = len(ds), counts[name]
        reps, rem = divmod(want, n)
        idx = [i for _ in range(reps) for i in range(n)] + sorted(rng.choice(n, size=rem, replace=False).tolist())
        copy_no = [r for r in range(reps) for _ in range(n)] + [reps] * rem
        part = ds.select_columns(sorted(common)).select(idx)
        if "id" in common and reps > 0:
            ids = [i if c == 0 else f"{i}#{c + 1}" for i, c in zip(part["id"], copy_no, strict=True)]
            part = part.remove_columns("id").add_column("id", ids)
        part = part.add_column("source", [name] * len(part))
        parts.append(part)
        per_source[name] = {"available": n, "target_proportion": round(props[name], 4), "taken": want,
                            "epochs": round(want / n, 3), "upsampled": want > n}
    out = concatenate_datasets(parts).shuffle(seed=seed).flatten_indices() if parts else None
    stats = {"total": len(out), "seed": seed, "sources": per_source,
             "actual_proportions": {k: round(v / len(out), 4) for k, v in Counter(out["source"]).items()}}
    return out, stats


def split(ds, fractions: Mapping[str, float] | None = None, seed: int = 0, stratify: str | None = "label"):
    """Return ``(DatasetDict, stats)`` with one split per fraction (normalised to sum to 1)."""
    from datasets import DatasetDict

    fractions = dict(fractions or DEFAULT_SPLITS)
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"split: fractions must be >= 0 and not all zero, got {fractions}")
    s = sum(fractions.values())
    names = list(fractions)
    cum = np.cumsum([fractions[k] / s for k in names])
    strat = stratify if stratify and stratify in ds.column_names else None
    groups: dict[str, list[int]] = {}
    keys = ds[strat] if strat else [""] * len(ds)
    for i, k in enumerate(keys):
        groups.setdefault("" if k is None else str(k), []).append(i)
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[int]] = {k: [] for k in names}
    by_label: dict[str, dict[str, int]] = {k: {} for k in names}
    for g in sorted(groups):
        idx = np.array(groups[g])
        rng.shuffle(idx)
        cuts = [0] + [int(round(c * len(idx))) for c in cum]
        for j, name in enumerate(names):
            part = idx[cuts[j]:cuts[j + 1]].tolist()
            chosen[name].extend(part)
            if strat:
                by_label[name][g] = len(part)
    dd = DatasetDict({name: ds.select(rng.permutation(np.array(chosen[name], dtype=np.int64)).tolist())
                      .flatten_indices() for name in names})
    stats = {"seed": seed, "fractions": fractions, "stratified_by": strat,
             "sizes": {k: len(v) for k, v in dd.items()}}
    if strat:
        stats["by_label"] = by_label
    return dd, stats
