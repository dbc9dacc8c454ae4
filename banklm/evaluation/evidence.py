"""Evidence a model-risk reviewer accepts, computed from prediction rows (``predictions.jsonl``): intervals on the
headline figures, paired tests between any two models scored on the same records, results by segment, a
confusion matrix for every categorical key and the ordinal error of graded keys, and the baselines side by side.

Nothing here scores a model; the statistics are :mod:`banklm.evaluation.uncertainty`'s (percentile bootstrap,
2000 resamples, seed 0; McNemar; Wilson intervals for segment shares). A prediction row needs ``id``, ``task``,
``gold`` (answer dict), ``parsed`` (answer dict or None), ``label``, ``pred_label`` and ``correct``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from banklm.evaluation import metrics as M
from banklm.evaluation import uncertainty as U
from banklm.tasks import get_task
from banklm.tasks.base import Task

__all__ = ["task_intervals", "paired_comparison", "segment_results", "key_confusions", "ordinal_errors",
           "baseline_comparison"]


def batched_macro_f1(n_labels: int):
    """Macro-F1 of integer-coded labels (``0..n_labels-1``; ``n_labels`` = unparseable) for a batch of resamples
    (arrays of shape (resamples, n)), as :func:`banklm.evaluation.metrics.macro_f1` computes it for one: F1 averaged
    over the classes present in gold or answers of that resample, never over the unparseable."""
    k = n_labels + 1

    def metric(gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
        rows = np.arange(gold.shape[0])[:, None]
        counts = np.bincount((rows * k * k + gold * k + pred).ravel(), minlength=gold.shape[0] * k * k)
        cm = counts.reshape(gold.shape[0], k, k).astype(float)
        tp = np.diagonal(cm, axis1=1, axis2=2)[:, :n_labels]
        support, predicted = cm.sum(axis=2)[:, :n_labels], cm.sum(axis=1)[:, :n_labels]
        with np.errstate(divide="ignore", invalid="ignore"):
            prec = np.where(predicted > 0, tp / predicted, 0.0)
            rec = np.where(support > 0, tp / support, 0.0)
            f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
        present = (support > 0) | (predicted > 0)
        n_present = present.sum(axis=1)
        return np.where(n_present > 0, (f1 * present).sum(axis=1) / np.maximum(n_present, 1), 0.0)

    return metric


def _macro_f1_interval(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str]) -> dict:
    order = list(dict.fromkeys([*labels, *gold]))
    code = {v: i for i, v in enumerate(order)}
    g = np.array([code[v] for v in gold], dtype=np.int64)
    p = np.array([code.get(v, len(order)) if v is not None else len(order) for v in pred], dtype=np.int64)
    return U.bootstrap_metric(batched_macro_f1(len(order)), g, p, batched=True)


def task_intervals(predictions: Sequence[Mapping]) -> dict[str, dict]:
    """Per task (and ``overall``): accuracy and macro-F1, each with its 95% bootstrap interval."""
    out = {}
    for name, rows in M.by_task(predictions).items():
        gold, pred = [p["label"] for p in rows], [p["pred_label"] for p in rows]
        out[name] = {"n": len(rows),
                     "accuracy": U.bootstrap_interval([float(p["correct"]) for p in rows]),
                     "macro_f1": _macro_f1_interval(gold, pred, get_task(name).label_values)}
    if predictions:
        out["overall"] = {"n": len(predictions),
                          "accuracy": U.bootstrap_interval([float(p["correct"]) for p in predictions])}
    return out


def paired_comparison(a: Sequence[Mapping], b: Sequence[Mapping], names: tuple[str, str] = ("a", "b")) -> dict:
    """Two models on the records both answered (matched by task and id): per task and overall, each accuracy with
    its interval, McNemar's test and the paired interval of the difference (a - b)."""
    ib = {(p["task"], p["id"]): p for p in b}
    pairs = [(p, ib[(p["task"], p["id"])]) for p in a if (p["task"], p["id"]) in ib]
    out: dict[str, Any] = {"names": list(names), "n": len(pairs), "tasks": {}}
    groups: dict[str, list] = {}
    for pa, pb in pairs:
        groups.setdefault(pa["task"], []).append((pa, pb))
    for name, ps in [*groups.items(), ("overall", pairs)]:
        if not ps:
            continue
        gold = [pa["label"] for pa, _ in ps]
        res = U.compare_models(gold, [pa["pred_label"] for pa, _ in ps], [pb["pred_label"] for _, pb in ps],
                               names=names)
        (out if name == "overall" else out["tasks"])[name] = res
    return out


def _meta(record: Mapping) -> dict:
    m = record.get("meta")
    if isinstance(m, str):
        try:
            return json.loads(m)
        except ValueError:
            return {}
    return dict(m or {})


def segment_results(task: Task | str, predictions: Sequence[Mapping], records: Sequence[Mapping]) -> dict:
    """Accuracy by each of the spec's declared segments (``evaluation.segments``; a banded numeric field by its
    band), with counts and Wilson 95% intervals; records without the field go under ``未提供``."""
    task = get_task(task) if isinstance(task, str) else task
    meta = {r.get("id"): _meta(r) for r in records}
    out = {}
    for seg in task.segments:
        groups: dict[str, list[bool]] = {}
        for p in predictions:
            v = meta.get(p["id"], {}).get(seg)
            groups.setdefault("未提供" if v is None else str(v), []).append(bool(p["correct"]))
        out[seg] = {g: {"n": len(v), "correct": sum(v), **{k: x for k, x in U.proportion_interval(sum(v), len(v)).items()
                                                          if k in ("estimate", "low", "high")}}
                    for g, v in sorted(groups.items())}
    return out


def key_confusions(task: Task | str, predictions: Sequence[Mapping]) -> dict:
    """A confusion matrix (rows gold, columns answered; INVALID = unparseable) for every single-valued categorical
    answer key, not only the primary one."""
    task = get_task(task) if isinstance(task, str) else task
    out = {}
    for key in task.categorical_keys:
        if key in task.multi_label_keys:
            continue
        rows = [p for p in predictions if key in (p.get("gold") or {})]
        out[key] = M.confusion_matrix([p["gold"][key] for p in rows],
                                      [(p.get("parsed") or {}).get(key) if p.get("parsed") else None for p in rows],
                                      task.values_of(key))
    return out


def ordinal_errors(task: Task | str, predictions: Sequence[Mapping]) -> dict:
    """For graded keys (``ordinal: true``, credit 风险等级 A-E): the mean absolute distance in grades between the
    answer and the gold, and the share off by two grades or more; unparseable answers are counted apart."""
    task = get_task(task) if isinstance(task, str) else task
    out = {}
    for key, order in task.ordinal_keys.items():
        rank = {v: i for i, v in enumerate(order)}
        dist, invalid = [], 0
        for p in predictions:
            g = (p.get("gold") or {}).get(key)
            a = (p.get("parsed") or {}).get(key) if p.get("parsed") else None
            if g not in rank:
                continue
            if a not in rank:
                invalid += 1
                continue
            dist.append(abs(rank[a] - rank[g]))
        out[key] = {"n": len(dist), "unparseable": invalid,
                    "mean_abs_error": sum(dist) / len(dist) if dist else None,
                    "off_by_2_or_more": sum(d >= 2 for d in dist) / len(dist) if dist else None}
    return out


def baseline_comparison(predictions: Sequence[Mapping], baselines: Mapping[str, Mapping]) -> dict:
    """The model beside each baseline (:func:`banklm.evaluation.baselines.baselines` per task, its predictions in
    the order of ``test_ids``), on the records both scored: accuracies with intervals, McNemar's test, and
    ``model_worse`` when the baseline's accuracy is higher (``significantly`` when McNemar's p < 0.05)."""
    out: dict[str, dict] = {}
    for name, rows in M.by_task(predictions).items():
        b = baselines.get(name)
        if not b:
            continue
        mine = {p["id"]: p for p in rows}
        entries = [b["rules"], *b["tabular"]]
        out[name] = {}
        for e in entries:
            if not e.get("available"):
                out[name][e["name"]] = {"available": False, "reason": e.get("reason")}
                continue
            pairs = [(mine[i], pred) for i, pred, ok in zip(b["test_ids"], e["predictions"], e["correct"],
                                                             strict=True)
                     if i in mine and ok is not None]
            if not pairs:
                out[name][e["name"]] = {"available": False, "reason": "no record scored by both"}
                continue
            gold = [p["label"] for p, _ in pairs]
            cmp = U.compare_models(gold, [p["pred_label"] for p, _ in pairs], [q for _, q in pairs],
                                   names=("model", e["name"]))
            worse = cmp["b"]["accuracy"] > cmp["a"]["accuracy"]
            out[name][e["name"]] = {"available": True, "n": len(pairs), "model": cmp["a"], "baseline": cmp["b"],
                                    "mcnemar": cmp["mcnemar"], "difference": cmp["difference"],
                                    "model_worse": worse, "significantly": worse and cmp["significant"],
                                    "features": e.get("features")}
    return out
