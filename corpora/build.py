"""Corpus builders: turn recipe sources into training-ready datasets with stats, a card and a quarantine.

Every builder writes one folder ``corpora/<kind>/`` atomically:
``data/`` (a ``datasets.DatasetDict`` saved to disk), ``stats.json``, ``quarantine.jsonl``, ``card.md``.
Counts obey ``in = kept + dropped + quarantined`` for every step, and the stats say so.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from banklm.io import atomic_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text

SPLITS = ("train", "validation", "test")


def _prompt_key(record: dict) -> str:
    user = "".join(m["content"] for m in record["messages"] if m["role"] == "user")
    return hashlib.sha256(" ".join(user.split()).encode("utf-8")).hexdigest()


def build_scenario(synth: dict[str, dict], seed: int, out_dir: Path, licence: str = "") -> dict:
    """Generate the scenario corpus from the task generators and write it to ``out_dir``.

    ``synth`` maps a task name to ``{train, validation, test, difficulty}``. Training and validation
    records whose prompt also appears in the test split are dropped (exact decontamination).
    """
    from datasets import Dataset, DatasetDict

    from corpora.synth import generate_records

    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for task, spec in synth.items():
        for split in SPLITS:
            n = int(spec.get(split, 0))
            if n:
                splits[split].extend(generate_records(task, n, seed=seed, split=split,
                                                      difficulty=float(spec.get("difficulty", 0.0))))
    steps = []
    test_keys = {_prompt_key(r) for r in splits["test"]}
    for split in ("train", "validation"):
        before = len(splits[split])
        kept, dropped = [], 0
        seen: set[str] = set()
        for r in splits[split]:
            k = _prompt_key(r)
            if k in test_keys or k in seen:
                dropped += 1
                continue
            seen.add(k)
            kept.append(r)
        splits[split] = kept
        steps.append({"step": f"exact_dedup_and_decontam[{split}]", "in": before, "kept": len(kept),
                      "dropped": dropped, "quarantined": 0,
                      "reason": "prompt duplicates another record or a test prompt"})
    ids = Counter(r["id"] for s in SPLITS for r in splits[s])
    dup_ids = [i for i, c in ids.items() if c > 1]
    if dup_ids:
        raise ValueError(f"scenario generator produced duplicate ids, e.g. {dup_ids[0]}")

    stats = {
        "kind": "scenario",
        "sources": [{"type": "synth", "task": t, **spec} for t, spec in synth.items()],
        "splits": {s: len(splits[s]) for s in SPLITS},
        "by_task": {s: dict(Counter(r["task"] for r in splits[s])) for s in SPLITS},
        "by_label": {s: {t: dict(Counter(r["label"] for r in splits[s] if r["task"] == t)) for t in synth}
                     for s in SPLITS},
        "steps": steps,
        "chars": {s: _length_summary([_chars(r) for r in splits[s]]) for s in SPLITS},
        "encoding": {"utf-8": sum(len(v) for v in splits.values())},
        "quarantined": 0,
    }
    with atomic_dir(out_dir) as tmp:
        dd = DatasetDict({s: Dataset.from_list(splits[s]) for s in SPLITS if splits[s]})
        dd.save_to_disk(str(tmp / "data"))
        atomic_write_json(tmp / "stats.json", stats)
        atomic_write_jsonl(tmp / "quarantine.jsonl", [])
        atomic_write_text(tmp / "card.md", scenario_card(stats, licence))
    return stats


def _chars(record: dict) -> int:
    return sum(len(m["content"]) for m in record["messages"])


def _length_summary(values: list[int]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)
    return {"n": len(v), "min": v[0], "p50": v[len(v) // 2], "p95": v[int(len(v) * 0.95) - 1 if len(v) > 1 else 0],
            "max": v[-1], "mean": round(sum(v) / len(v), 1)}


def scenario_card(stats: dict, licence: str) -> str:
    rows = "\n".join(f"| {s} | {n} | {json.dumps(stats['by_task'][s], ensure_ascii=False)} |"
                     for s, n in stats["splits"].items())
    steps = "\n".join(f"| {st['step']} | {st['in']} | {st['kept']} | {st['dropped']} | {st['quarantined']} | "
                      f"{st['reason']} |" for st in stats["steps"])
    sources = "\n".join(f"- generator `{s['task']}`: train {s.get('train', 0)}, validation {s.get('validation', 0)}, "
                        f"test {s.get('test', 0)}, difficulty {s.get('difficulty', 0.0)}" for s in stats["sources"])
    return f"""# Dataset card: scenario corpus

## Sources
{sources}

Licence: {licence or "not given in the recipe"}

## Splits
| split | records | by task |
|---|---|---|
{rows}

## Steps applied
| step | in | kept | dropped | quarantined | reason |
|---|---|---|---|---|---|
{steps}

## Known limits
- Generated records follow the documented labelling rules in `docs/tasks.md`; they show the model the
  task format and the rules, not the distribution of a real bank's customers.
- Protected attributes in credit profiles (gender, region, age band) are sampled independently of the
  label so that fairness can be measured; real data will not be so balanced.
"""


def load_split(corpus_dir: Path, split: str, tasks: list[str] | None = None, limit_per_task: int | None = None):
    """Read one split of a built corpus as a ``datasets.Dataset`` (optionally some tasks, capped per task)."""
    import datasets
    from datasets import load_from_disk

    # Transforms of a loaded corpus (filters here, tokenisation in the trainers) must never write cache
    # files into the corpus folder: that would change the files the ledger recorded for it.
    datasets.disable_caching()
    ds = load_from_disk(str(Path(corpus_dir) / "data"))[split]
    if tasks is not None:
        # keep_in_memory: a cache file written into the corpus folder would change its recorded hashes
        ds = ds.filter(lambda t: t in tasks, input_columns="task", keep_in_memory=True)
    if limit_per_task is not None:
        counts: Counter = Counter()
        keep = []
        for i, t in enumerate(ds["task"]):
            if counts[t] < limit_per_task:
                counts[t] += 1
                keep.append(i)
        ds = ds.select(keep)
    return ds
