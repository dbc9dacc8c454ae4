"""Synthetic scenario generators: sample inputs and label them with the rules of ``banklm.tasks``.

``generate_records(task, n, seed, split, difficulty)`` returns scenario records in the format of
docs/ARCHITECTURE.md (``id``, ``task``, ``messages``, ``label``, ``gold``, ``meta``, ``target`` = ``"answer"``).
Records are balanced by rule branch (round-robin over ``Task.branches``), deterministic for (task, seed, split,
difficulty) and independent across splits and seeds (the random stream is keyed by all of them).
All names are synthetic (surname + 某); no personal data is involved.
"""

from __future__ import annotations

import random

from banklm.tasks import TASKS, get_task

__all__ = ["generate_records", "generate_all"]


def generate_records(task: str, n: int, seed: int, split: str, difficulty: float = 0.0) -> list[dict]:
    """``n`` labelled records of ``task`` for ``split``; ids ``{task}-{split}-{i:06d}``.

    Record ``i`` exercises branch ``branches[i % len(branches)]``; ``meta`` holds the sampled fields
    flat plus ``branch``, ``difficulty``, ``seed`` and ``split``.
    """
    t = get_task(task)
    if not t.has_sampler:
        raise ValueError(f"task {t.name!r} has no synthetic sampler: a spec task's records come from the bank's "
                         "tables (banklm.tasks.from_table, corpora.scenario.tables)")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    rng = random.Random(f"banklm-synth|{t.name}|{split}|{seed}|{float(difficulty):.4f}")
    branches = t.branches
    out = []
    for i in range(n):
        branch = branches[i % len(branches)]
        fields = t.sample(rng, branch, difficulty)
        rec = t.make_record(
            f"{t.name}-{split}-{i:06d}",
            fields,
            rng,
            extra_meta={"difficulty": float(difficulty), "seed": seed, "split": split},
        )
        rec["target"] = "answer"  # the whole answer is learnt (a bank's row may have "labels": its labels only)
        out.append(rec)
    return out


def generate_all(n_per_task: int, seed: int, split: str, tasks=None, difficulty: float = 0.0) -> list[dict]:
    """Records of several tasks (default: the built-ins), concatenated in task order."""
    out: list[dict] = []
    for name in tasks or list(TASKS):
        out.extend(generate_records(name, n_per_task, seed, split, difficulty))
    return out
