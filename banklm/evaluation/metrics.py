"""Evaluation metrics (pure Python + numpy).

Conventions:
- ``None`` (or any value outside the task's labels) as a prediction means "unparseable"; it is
  always wrong and appears as the extra class ``INVALID`` in confusion matrices and in MCC.
- Macro F1 averages over the gold/predicted classes that occur (sklearn's default label set), never
  over ``INVALID``; an unparseable answer still costs its gold class a false negative.
- MCC is Gorodkin's multi-class R_K computed from the confusion matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

INVALID = "INVALID"

__all__ = [
    "INVALID",
    "by_task",
    "accuracy",
    "confusion_matrix",
    "macro_f1",
    "mcc",
    "format_compliance",
    "positive_class_metrics",
    "multi_label_metrics",
    "fairness",
    "per_class_f1",
]


def by_task(rows: Iterable[Mapping]) -> dict[str, list[Mapping]]:
    """Rows (predictions, label scores) grouped by their ``task``, in first-seen order."""
    out: dict[str, list[Mapping]] = {}
    for r in rows:
        out.setdefault(r["task"], []).append(r)
    return out


def _norm_pred(p, labels: Sequence[str] | None = None) -> str:
    if p is None or (labels is not None and p not in labels):
        return INVALID
    return p


def accuracy(gold: Sequence[str], pred: Sequence[str | None]) -> float:
    """Fraction of exact matches; None predictions count as wrong. Empty input -> 0.0."""
    if len(gold) != len(pred):
        raise ValueError("gold and pred differ in length")
    if not gold:
        return 0.0
    return sum(1 for g, p in zip(gold, pred, strict=True) if p is not None and g == p) / len(gold)


def confusion_matrix(
    gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str] | None = None
) -> dict:
    """``{"labels": [...], "matrix": [[...]]}``; rows = gold, columns = predicted.

    Label order: ``labels`` if given (extra labels seen in gold are appended in first-seen order),
    else first-seen order of gold then predictions; ``INVALID`` is the last column/row when any
    prediction is unparseable or outside the label set.
    """
    order: list[str] = list(labels) if labels is not None else []
    for g in gold:
        if g not in order:
            order.append(g)
    if labels is None:
        for p in pred:
            if p is not None and p not in order:
                order.append(p)
    preds = [_norm_pred(p, order) for p in pred]
    if INVALID in preds and INVALID not in order:
        order.append(INVALID)
    idx = {lab: i for i, lab in enumerate(order)}
    m = np.zeros((len(order), len(order)), dtype=np.int64)
    for g, p in zip(gold, preds, strict=True):
        m[idx[g], idx[p]] += 1
    return {"labels": order, "matrix": m.tolist()}


def per_class_f1(
    gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str] | None = None
) -> dict:
    """{label: {"precision", "recall", "f1", "support"}} over the classes that occur."""
    cm = confusion_matrix(gold, pred, labels)
    order, m = cm["labels"], np.array(cm["matrix"], dtype=float)
    out = {}
    for i, lab in enumerate(order):
        if lab == INVALID:
            continue
        tp = m[i, i]
        support = m[i, :].sum()
        predicted = m[:, i].sum()
        if support == 0 and predicted == 0:
            continue
        prec = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[lab] = {"precision": prec, "recall": rec, "f1": f1, "support": int(support)}
    return out


def macro_f1(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str] | None = None) -> float:
    """Unweighted mean F1 over classes occurring in gold or predictions (INVALID excluded)."""
    per = per_class_f1(gold, pred, labels)
    if not per:
        return 0.0
    return float(np.mean([v["f1"] for v in per.values()]))


def mcc(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str] | None = None) -> float:
    """Gorodkin's R_K: (c*s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)).

    c = correct, s = total, t_k = gold count of class k, p_k = predicted count (INVALID is a class).
    Returns 0.0 when the denominator is 0 (a constant gold or prediction vector).
    """
    m = np.array(confusion_matrix(gold, pred, labels)["matrix"], dtype=float)
    if m.size == 0:
        return 0.0
    s = m.sum()
    c = np.trace(m)
    t = m.sum(axis=1)
    p = m.sum(axis=0)
    num = c * s - float(p @ t)
    den = math.sqrt((s * s - float(p @ p)) * (s * s - float(t @ t)))
    return float(num / den) if den > 0 else 0.0


def format_compliance(texts: Sequence[str], parse) -> float:
    """Fraction of outputs that ``parse(text, strict=True)`` accepts (the exact answer layout)."""
    if not texts:
        return 0.0
    return sum(1 for t in texts if parse(t, strict=True) is not None) / len(texts)


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def positive_class_metrics(gold: Sequence[dict], pred: Sequence[dict | None], key: str, positive: str,
                           detail_keys: Sequence[str] = ()) -> dict:
    """Detection metrics for a task that looks for one value (the spec's ``answer.positive``, aml 可疑 on
    ``conclusion``): its recall, the false-positive rate on the other cases, and, among the true positives,
    the accuracy of each ``detail_keys`` answer (aml ``typology``). ``None`` = unparseable (a miss)."""
    pairs = [(g, p) for g, p in zip(gold, pred, strict=True) if key in g]  # a bank's gold may lack the key
    pos = [(g, p) for g, p in pairs if g[key] == positive]
    tp = [(g, p) for g, p in pos if p is not None and p.get(key) == positive]
    neg = [p for g, p in pairs if g[key] != positive]
    fp = [1 for p in neg if p is not None and p.get(key) == positive]
    return {
        "key": key,
        "value": positive,
        "recall": len(tp) / len(pos) if pos else None,
        "false_positive_rate": len(fp) / len(neg) if neg else None,
        "detail_accuracy_tp": {k: _share([p.get(k) == g[k] for g, p in tp if k in g]) for k in detail_keys},
        "n_positive": len(pos),
        "n_true_positive": len(tp),
    }


def multi_label_metrics(gold: Sequence[Iterable[str]], pred: Sequence[Iterable[str] | None],
                        values: Sequence[str]) -> dict:
    """A multi-label answer key (a set of values per case): per-value precision, recall, F1 and support,
    their macro F1, and the exact-set match rate. ``None`` (unparseable) predicts the empty set and
    never matches."""
    G = [set(g) for g in gold]
    P = [set(p) if p is not None else None for p in pred]
    per = {}
    for v in values:
        tp = sum(1 for g, p in zip(G, P, strict=True) if p is not None and v in g and v in p)
        n_pred = sum(1 for p in P if p is not None and v in p)
        n_gold = sum(1 for g in G if v in g)
        if not n_gold and not n_pred:
            continue
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_gold if n_gold else 0.0
        per[v] = {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
                  "support": n_gold}
    return {"per_value": per,
            "macro_f1": float(np.mean([x["f1"] for x in per.values()])) if per else 0.0,
            "exact_set_match": (sum(1 for g, p in zip(G, P, strict=True) if p is not None and g == p) / len(G))
            if G else 0.0}


# ------------------------------------------------------------------------------------------------
# fairness


def fairness(
    groups: dict[str, Sequence[str]],
    pred: Sequence[str | None],
    gold: Sequence[str] | None = None,
    *,
    favourable: str,
    threshold: float = 0.8,
) -> dict:
    """Parity of the favourable outcome (the spec's ``answer.favourable``, credit 通过) per protected attribute.

    ``groups`` maps an attribute (e.g. ``gender``) to each example's group value. For each attribute:
    ``rates`` (share of predictions equal to ``favourable`` per group; unparseable = not favourable),
    ``ratio`` = min rate / max rate (1.0 when every rate is 0), ``flag`` = ratio < ``threshold``
    (the four-fifths rule), and with ``gold``: per-group ``accuracy``, ``accuracy_gap`` (max - min)
    and ``gold_rates`` (the rules' favourable rates, for reference).
    """
    out = {}
    for attr, vals in groups.items():
        if len(vals) != len(pred):
            raise ValueError(f"fairness: group values of {attr!r} differ in length from predictions")
        by: dict[str, list[int]] = {}
        for i, v in enumerate(vals):
            by.setdefault(str(v), []).append(i)
        rates = {g: sum(1 for i in ix if pred[i] == favourable) / len(ix) for g, ix in sorted(by.items())}
        hi, lo = max(rates.values(), default=0.0), min(rates.values(), default=0.0)
        ratio = lo / hi if hi > 0 else 1.0
        res = {
            "rates": rates,
            "ratio": ratio,
            "flag": ratio < threshold,
            "counts": {g: len(ix) for g, ix in sorted(by.items())},
        }
        if gold is not None:
            acc = {
                g: sum(1 for i in ix if pred[i] is not None and pred[i] == gold[i]) / len(ix)
                for g, ix in sorted(by.items())
            }
            res["accuracy"] = acc
            res["accuracy_gap"] = max(acc.values()) - min(acc.values()) if acc else 0.0
            res["gold_rates"] = {
                g: sum(1 for i in ix if gold[i] == favourable) / len(ix) for g, ix in sorted(by.items())
            }
        out[attr] = res
    out["any_flag"] = any(v["flag"] for k, v in out.items() if isinstance(v, dict))
    return out
