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

from banklm.tasks.formats import UNITS, extract_numbers
from banklm.tasks.grammar import attached_numbers

INVALID = "INVALID"

__all__ = [
    "INVALID",
    "accuracy",
    "confusion_matrix",
    "macro_f1",
    "mcc",
    "format_compliance",
    "positive_class_metrics",
    "multi_label_metrics",
    "extract_numbers",
    "faithfulness",
    "field_binding",
    "fairness",
    "per_class_f1",
]


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
# faithfulness: numbers cited in a reason must appear in the input

def faithfulness(inputs: Sequence[str], reasons: Sequence[str | None], allowed: Iterable[tuple] = ()) -> dict:
    """Check every number of each reason against its input.

    Returns ``{"per_answer": [list of unsupported number strings per answer (None when the answer
    has no reason)], "hallucination_rate": answers with >= 1 unsupported number / answers with a
    reason, "unsupported_number_rate": unsupported / cited numbers, "n_checked", "n_numbers"}``.
    ``allowed`` lists canonical numbers (see :func:`extract_numbers`) accepted everywhere (rule
    constants, if a task cites them).
    """
    allowed_set = set(allowed)
    per: list[list[str] | None] = []
    checked = bad_answers = n_nums = n_bad = 0
    for inp, reason in zip(inputs, reasons, strict=True):
        if reason is None:
            per.append(None)
            continue
        support = set(extract_numbers(inp)) | allowed_set
        bad = []
        for num in extract_numbers(reason):
            n_nums += 1
            if num not in support:
                n_bad += 1
                bad.append(_show(num))
        per.append(bad)
        checked += 1
        bad_answers += bool(bad)
    return {
        "per_answer": per,
        "hallucination_rate": bad_answers / checked if checked else 0.0,
        "unsupported_number_rate": n_bad / n_nums if n_nums else 0.0,
        "n_checked": checked,
        "n_numbers": n_nums,
    }


def field_binding(reasons: Sequence[str | None], values: Sequence[Mapping[str, Iterable[tuple]] | None],
                  names: Mapping[str, Iterable[str]], units: Iterable[str] = UNITS) -> dict:
    """Check that every number a reason writes after a field's name is that field's value.

    ``names``: name -> the fields it names (:func:`banklm.tasks.grammar.binding_names`); ``values``: per answer,
    field -> its canonical values in that record (:func:`banklm.tasks.grammar.binding_values`), None when the
    record has no fields (a table row in prompt mode: skipped and counted). A number is bound when a name stands
    right before it in its clause (:func:`banklm.tasks.grammar.attached_numbers`); numbers without one are not
    counted (the faithfulness metric covers them). A bound number equal to none of its name's fields' values is
    a binding error: another field's value (``equals`` says whose) or no field's.

    Returns ``{"per_answer": [None (no reason or no fields) or a list of {"number", "fields", "equals"}],
    "field_binding_error_rate": errors / bound numbers (None when none is bound), "n_bound_numbers",
    "n_binding_errors", "n_binding_skipped"}``.
    """
    units = tuple(units)
    per: list[list[dict] | None] = []
    n_bound = n_bad = skipped = 0
    for reason, vals in zip(reasons, values, strict=True):
        if vals is None:
            skipped += 1
            per.append(None)
            continue
        if reason is None:
            per.append(None)
            continue
        vals = {k: set(v) for k, v in vals.items()}
        bad = []
        for m, items in attached_numbers(reason, names, units):
            n_bound += 1
            if not any(m.value in vals.get(it, ()) for it in items):
                n_bad += 1
                bad.append({"number": m.text, "fields": sorted(items),
                            "equals": sorted(k for k, v in vals.items() if m.value in v)})
        per.append(bad)
    return {
        "per_answer": per,
        "field_binding_error_rate": n_bad / n_bound if n_bound else None,
        "n_bound_numbers": n_bound,
        "n_binding_errors": n_bad,
        "n_binding_skipped": skipped,
    }


def _show(num: tuple) -> str:
    if num[0] == "date":
        return f"{num[1]:04d}-{num[2]:02d}-{num[3]:02d}"
    v = num[1]
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return s + "%" if num[0] == "pct" else s


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
