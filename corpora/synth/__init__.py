"""Synthetic scenario generators: sample inputs and label them with the rules of ``banklm.tasks``.

``generate_records(task, n, seed, split, difficulty)`` returns scenario records in the format of
docs/ARCHITECTURE.md (``id``, ``task``, ``messages``, ``label``, ``gold``, ``meta``, ``target`` = ``"answer"``).
Records are balanced by rule branch (round-robin over ``Task.branches``), deterministic for (task, seed, split,
difficulty) and independent across splits and seeds (the random stream is keyed by all of them).
``generate_records(..., prevalence=shares)`` draws the labels at the spec's real-world shares instead (the split
``test_prevalence``: most AML cases are normal, where the balanced split makes 6 of 7 suspicious).
All names are synthetic (surname + 某); no personal data is involved.
"""

from __future__ import annotations

import random

from banklm.tasks import TASKS, get_task

__all__ = ["generate_records", "generate_all", "label_shares", "prevalence_branches"]


def label_shares(labels, prevalence) -> dict[str, float]:
    """Every label's share: the declared ones, the rest of 1 split evenly over the labels not declared."""
    labels = list(labels)
    given = {k: float(v) for k, v in prevalence.items() if k in labels}
    rest = [k for k in labels if k not in given]
    left = max(0.0, 1.0 - sum(given.values()))
    return {k: given[k] if k in given else (left / len(rest)) for k in labels}


def prevalence_branches(task, n: int, prevalence, rng: random.Random) -> list[str]:
    """A shuffled branch schedule of ``n`` records whose primary labels follow ``prevalence`` (largest
    remainder counts; a label's records go round-robin over the rules that give it)."""
    by_label: dict[str, list[str]] = {}
    for rule, label in task.branch_labels.items():
        by_label.setdefault(label, []).append(rule)
    shares = label_shares(by_label, prevalence)
    total = sum(shares.values()) or 1.0
    exact = {k: n * v / total for k, v in shares.items()}
    counts = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[k] += 1
    out = [by_label[k][i % len(by_label[k])] for k in by_label for i in range(counts[k])]
    rng.shuffle(out)
    return out


def generate_records(task: str, n: int, seed: int, split: str, difficulty: float = 0.0,
                     prevalence=None) -> list[dict]:
    """``n`` labelled records of ``task`` for ``split``; ids ``{task}-{split}-{i:06d}``.

    Record ``i`` exercises branch ``branches[i % len(branches)]``, or with ``prevalence`` (primary label ->
    share, e.g. the spec's ``evaluation.prevalence``) a branch drawn at those shares (:func:`prevalence_branches`);
    ``meta`` holds the sampled fields flat plus ``branch``, ``difficulty``, ``seed`` and ``split``.
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
    if prevalence:
        schedule = prevalence_branches(t, n, prevalence, rng)
    else:
        schedule = [t.branches[i % len(t.branches)] for i in range(n)]
    out = []
    for i, branch in enumerate(schedule):
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
