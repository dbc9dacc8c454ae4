"""Confidence statistics a model-risk validator asks for, from per-record label confidences (pure numpy/sklearn/scipy).

Inputs are per-record sequences (lists or numpy arrays) of equal length; a length mismatch raises ``ValueError``.
``confidence`` is the probability the model gave its own answer (top label), in [0, 1]; ``correct`` is 1/True when
that answer equals the gold label; ``probs`` is one ``{label: probability}`` mapping per record, and a label missing
from a mapping counts as probability 0. Every function returns builtin Python types (json-serialisable) and
``None`` where a value is not defined (empty input, a class absent, no case answered).

Conventions:
- Bins (reliability, ECE, MCE): equal-width over [0, 1] and right-closed: with n bins, bin i holds confidences in
  (i/n, (i+1)/n], and bin 0 also holds 0.0. So with 10 bins 0.9 is in bin 8 (0.8, 0.9], 1.0 in bin 9, 0.0 in bin 0.
  The edges are i/n computed by one division, so a confidence written as 0.7 sits exactly on its edge.
  ECE = sum over bins of (bin share of records) * |accuracy - mean confidence|; MCE = the largest such gap over
  non-empty bins.
- Abstention: ``answered`` marks the records the model itself answered (it did not abstain or fail to parse). A
  record not answered is never answered at any confidence threshold, and coverage is always relative to ALL records,
  so a model that abstains on its own cannot look better by it. ``apply_threshold`` knows nothing of abstentions:
  combine its mask with ``answered``.
- Ties: in risk-coverage curves and threshold choice, cases with equal confidence enter together (one curve point per
  distinct confidence, threshold t answers confidence >= t). ROC-AUC gives a tied positive/negative pair half credit
  and average precision treats tied scores as one threshold (scikit-learn). In ``recall_at_fpr`` a score equal to the
  threshold is flagged.
- Temperature scaling acts on the label distribution: p_k ** (1/T) renormalised, which equals softmax(log p / T);
  probabilities are clamped at 1e-12 before the log. T > 1 softens an overconfident model, T < 1 sharpens.
- Prevalence: a mapping ``{label: share}`` of the population the model will see. Labels present in the test split but
  not given share the remaining 1 - sum(given) evenly; given shares must be non-negative and sum to at most 1, and to 1
  when no present label is left to take the remainder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "PROB_FLOOR",
    "reliability",
    "brier",
    "multiclass_brier",
    "ranking",
    "fit_temperature",
    "apply_temperature",
    "risk_coverage",
    "choose_threshold",
    "apply_threshold",
    "recall_at_fpr",
    "expected_cost",
    "favourable_error_rates",
    "alerts_per_1000",
    "prevalence_weights",
]

PROB_FLOOR = 1e-12  # probabilities are clamped here before a log, so a confident miss costs a finite NLL
_SHARE_TOLERANCE = 1e-9  # float slack when prevalence shares are checked to sum to 1
_RANGE_SLACK = 1e-9  # float slack on a confidence computed as a sum of probabilities


# --- input checks -----------------------------------------------------------------------------------------------


def _same_length(**sequences) -> int:
    """The common length; a mismatch is a caller bug that would silently misalign records, so it raises."""
    lengths = {name: len(seq) for name, seq in sequences.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"per-record inputs differ in length ({detail})")
    return next(iter(lengths.values()), 0)


def _confidences(confidence, name: str = "confidence") -> np.ndarray:
    """Confidences as floats in [0, 1]; a float overshoot within 1e-9 (a sum of probabilities) is clipped."""
    values = np.asarray(confidence, dtype=float).reshape(-1)
    if values.size and (np.isnan(values).any() or values.min() < -_RANGE_SLACK or values.max() > 1 + _RANGE_SLACK):
        raise ValueError(f"{name} values must lie in [0, 1] (no NaN)")
    return np.clip(values, 0.0, 1.0)


def _outcomes(correct, name: str = "correct") -> np.ndarray:
    values = np.asarray(correct, dtype=float).reshape(-1)
    if values.size and not np.isin(values, (0.0, 1.0)).all():
        raise ValueError(f"{name} must be booleans or 0/1")
    return values.astype(bool)


def _answered_mask(answered, n: int) -> np.ndarray:
    if answered is None:
        return np.ones(n, dtype=bool)
    return _outcomes(answered, "answered")


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


# --- calibration ------------------------------------------------------------------------------------------------


def reliability(confidence, correct, n_bins: int = 10) -> dict:
    """Top-label reliability table with ECE and MCE: does a stated 90 % confidence mean 90 % correct?"""
    _same_length(confidence=confidence, correct=correct)
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    conf = _confidences(confidence)
    hit = _outcomes(correct)
    edges = np.arange(n_bins + 1) / n_bins
    # right-closed bins: the first edge >= c closes c's bin; 0.0 (index -1) joins bin 0
    bin_of = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    n = int(conf.size)
    bins, gaps, ece = [], [], 0.0
    for i in range(n_bins):
        in_bin = bin_of == i
        count = int(in_bin.sum())
        mean_conf = _mean_or_none(conf[in_bin])
        accuracy = _mean_or_none(hit[in_bin].astype(float))
        if count:
            gap = abs(accuracy - mean_conf)
            gaps.append(gap)
            ece += count / n * gap
        bins.append({"lo": float(edges[i]), "hi": float(edges[i + 1]), "n": count,
                     "confidence": mean_conf, "accuracy": accuracy})
    return {
        "scheme": f"equal-width, {n_bins} bins over [0, 1], right-closed",
        "n": n,
        "ece": float(ece) if n else None,
        "mce": float(max(gaps)) if gaps else None,
        "bins": bins,
    }


def brier(confidence, correct) -> float | None:
    """Top-label Brier score, mean (confidence - correct)^2: calibration and sharpness in one number."""
    _same_length(confidence=confidence, correct=correct)
    conf = _confidences(confidence)
    hit = _outcomes(correct).astype(float)
    return _mean_or_none((conf - hit) ** 2)


def multiclass_brier(probs: Sequence[Mapping[str, float]], gold: Sequence[str]) -> float | None:
    """Mean over records of sum_k (p_k - 1[k == gold])^2 over the record's labels and its gold label.

    Scores the whole distribution, not just the top label, so mass put on the wrong runner-up is penalised.
    """
    n = _same_length(probs=probs, gold=gold)
    if not n:
        return None
    total = 0.0
    for dist, g in zip(probs, gold, strict=True):
        scored_labels = list(dist) if g in dist else [*dist, g]  # ordered, so the float sum is reproducible
        total += sum((float(dist.get(k, 0.0)) - (1.0 if k == g else 0.0)) ** 2 for k in scored_labels)
    return total / n


# --- ranking ----------------------------------------------------------------------------------------------------


def _rank_scores(scores: np.ndarray, is_positive: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score  # seconds to import: not at start-up

    return {
        "roc_auc": float(roc_auc_score(is_positive, scores)),
        "pr_auc": float(average_precision_score(is_positive, scores)),
        "n_positive": int(is_positive.sum()),
    }


def ranking(
    probs: Sequence[Mapping[str, float]],
    gold: Sequence[str],
    labels: Sequence[str],
    positive: str | None = None,
) -> dict:
    """ROC-AUC and PR-AUC (average precision): does the model rank cases well, whatever threshold is used?

    Binary when ``positive`` is given or there are exactly two labels (then the first label is positive); else
    one-vs-rest per label, macro-averaged over the labels whose gold has both a positive and a negative case (the
    others are not estimable and are left out of ``per_label``). A gold value outside ``labels`` is a negative for
    every label.
    """
    _same_length(probs=probs, gold=gold)
    if positive is not None and positive not in labels:
        raise ValueError(f"positive label {positive!r} is not one of labels {list(labels)}")
    gold_arr = np.asarray(list(gold), dtype=object)
    binary = positive is not None or len(labels) == 2
    scored = [positive if positive is not None else labels[0]] if binary else list(labels)
    per_label = {}
    for label in scored:
        is_pos = gold_arr == label
        if is_pos.any() and not is_pos.all():
            scores = np.array([float(dist.get(label, 0.0)) for dist in probs])
            per_label[label] = _rank_scores(scores, is_pos)
    roc = [v["roc_auc"] for v in per_label.values()]
    pr = [v["pr_auc"] for v in per_label.values()]
    return {
        "roc_auc": float(np.mean(roc)) if roc else None,
        "pr_auc": float(np.mean(pr)) if pr else None,
        "average": "binary" if binary else f"one-vs-rest macro over {len(per_label)} labels",
        "per_label": per_label,
    }


# --- temperature scaling ----------------------------------------------------------------------------------------


def apply_temperature(probs: Mapping[str, float], temperature: float) -> dict[str, float]:
    """The distribution softened (T > 1) or sharpened (T < 1): p_k^(1/T) renormalised; T = 1 only renormalises."""
    if not temperature > 0:
        raise ValueError("temperature must be positive")
    if not probs:
        return {}
    keys = list(probs)
    scaled = np.log(np.maximum(np.array([float(probs[k]) for k in keys]), PROB_FLOOR)) / temperature
    scaled -= scaled.max()
    weights = np.exp(scaled)
    weights /= weights.sum()
    return {k: float(w) for k, w in zip(keys, weights, strict=True)}


def fit_temperature(
    probs: Sequence[Mapping[str, float]],
    gold: Sequence[str],
    bounds: tuple[float, float] = (0.05, 20.0),
) -> dict:
    """The temperature minimising the mean NLL of gold: one parameter, so it recalibrates without changing ranks.

    A record whose gold label is not a key of its mapping (e.g. an unparseable answer) contributes -log(1e-12) at
    every temperature, the same as after ``apply_temperature``: it counts in the NLL but cannot steer the fit. When
    no record has its gold among its keys the temperature is not identified and is None.
    """
    from scipy.optimize import minimize_scalar  # seconds to import: not at start-up
    from scipy.special import logsumexp

    n = _same_length(probs=probs, gold=gold)
    low, high = bounds
    if not 0 < low < high:
        raise ValueError("bounds must satisfy 0 < low < high")
    if not n:
        return {"temperature": None, "nll_before": None, "nll_after": None, "n": 0}
    informative = [(dist, g) for dist, g in zip(probs, gold, strict=True) if g in dist]
    width = max((len(dist) for dist, _ in informative), default=0)
    # log-probabilities padded with -inf (exp -> 0) so all records are scored at once
    log_p = np.full((len(informative), max(width, 1)), -np.inf)
    gold_col = np.zeros(len(informative), dtype=int)
    for row, (dist, g) in enumerate(informative):
        keys = list(dist)
        log_p[row, : len(keys)] = np.log(np.maximum([float(dist[k]) for k in keys], PROB_FLOOR))
        gold_col[row] = keys.index(g)
    gold_log_p = log_p[np.arange(len(informative)), gold_col]
    uninformative_nll = (n - len(informative)) * -math.log(PROB_FLOOR)

    def mean_nll(temperature: float) -> float:
        scaled_gold = gold_log_p / temperature
        normaliser = logsumexp(log_p / temperature, axis=1) if len(informative) else np.zeros(0)
        return float((np.sum(normaliser - scaled_gold) + uninformative_nll) / n)

    nll_before = mean_nll(1.0)
    if not informative:
        return {"temperature": None, "nll_before": nll_before, "nll_after": None, "n": n}
    result = minimize_scalar(lambda log_t: mean_nll(math.exp(log_t)), bounds=(math.log(low), math.log(high)),
                             method="bounded", options={"xatol": 1e-10})
    temperature = math.exp(float(result.x))
    return {"temperature": temperature, "nll_before": nll_before, "nll_after": mean_nll(temperature), "n": n}


# --- selective prediction ---------------------------------------------------------------------------------------


def risk_coverage(confidence, correct, answered=None) -> dict:
    """Accuracy against coverage as the confidence threshold falls: what answering fewer cases buys.

    One point per distinct confidence among answered cases, highest first (equal confidences enter together);
    coverage is over all N records. AURC integrates risk = 1 - accuracy over coverage by the trapezoid rule between
    the points only (from the first point's coverage to the last's; a single point gives 0.0).
    """
    per_record = {"confidence": confidence, "correct": correct}
    if answered is not None:
        per_record["answered"] = answered
    n = _same_length(**per_record)
    conf = _confidences(confidence)
    hit = _outcomes(correct)
    mask = _answered_mask(answered, n)
    conf, hit = conf[mask], hit[mask]
    order = np.argsort(-conf, kind="stable")
    conf, hit = conf[order], hit[order]
    cum_answered = np.arange(1, conf.size + 1)
    cum_correct = np.cumsum(hit)
    # the last position of each run of equal confidences closes one curve point
    closes = np.r_[conf[1:] != conf[:-1], True] if conf.size else np.zeros(0, dtype=bool)
    points = [
        {"threshold": float(conf[i]), "coverage": int(cum_answered[i]) / n,
         "accuracy": int(cum_correct[i]) / int(cum_answered[i])}
        for i in np.flatnonzero(closes)
    ]
    aurc = None
    if points:
        coverage = [p["coverage"] for p in points]
        risk = [1.0 - p["accuracy"] for p in points]
        aurc = float(sum((coverage[i + 1] - coverage[i]) * (risk[i + 1] + risk[i]) / 2
                         for i in range(len(points) - 1)))
    return {"n": n, "points": points, "aurc": aurc}


def choose_threshold(confidence, correct, target_accuracy: float, answered=None) -> dict:
    """The lowest confidence threshold whose answered cases reach the target accuracy (so the largest coverage).

    When no threshold reaches it, the most accurate point (ties: larger coverage) with ``met`` False, so a caller can
    report the shortfall. Accuracy is compared with a 1e-12 float slack.
    """
    if not 0.0 <= target_accuracy <= 1.0:
        raise ValueError("target_accuracy must lie in [0, 1]")
    points = risk_coverage(confidence, correct, answered)["points"]
    if not points:
        return {"threshold": None, "coverage": 0.0, "accuracy": None, "target_accuracy": target_accuracy,
                "met": False}
    meeting = [p for p in points if p["accuracy"] >= target_accuracy - 1e-12]
    met = bool(meeting)
    # points run in increasing coverage, so the last meeting point has the largest coverage
    best = meeting[-1] if met else max(points, key=lambda p: (p["accuracy"], p["coverage"]))
    return {"threshold": best["threshold"], "coverage": best["coverage"], "accuracy": best["accuracy"],
            "target_accuracy": target_accuracy, "met": met}


def apply_threshold(confidence, threshold: float | None) -> list[bool]:
    """Which records a threshold answers (confidence >= threshold); None answers all. AND it with model abstentions."""
    conf = _confidences(confidence)
    if threshold is None:
        return [True] * int(conf.size)
    return [bool(v) for v in conf >= threshold]


# --- detection operating points ---------------------------------------------------------------------------------


def recall_at_fpr(scores, is_positive, fpr: float, min_negatives_factor: float = 10.0) -> dict:
    """Recall and precision at the threshold that keeps the false-positive rate within a budget (AML alerting).

    The threshold comes from the negatives alone (the smallest distinct negative score t whose share of negatives
    with score >= t is <= fpr; just above the highest negative when even that exceeds the budget), so the recall
    measured on the positives is not tuned on them. Below ``min_negatives_factor / fpr`` negatives the FPR itself
    cannot be measured with any precision, and the point is reported as not estimable.
    """
    _same_length(scores=scores, is_positive=is_positive)
    if not 0.0 < fpr <= 1.0:
        raise ValueError("fpr must lie in (0, 1]")
    score = np.asarray(scores, dtype=float).reshape(-1)
    if np.isnan(score).any():
        raise ValueError("scores contain NaN")
    positive = _outcomes(is_positive, "is_positive")
    n_negative, n_positive = int((~positive).sum()), int(positive.sum())
    required = min_negatives_factor / fpr
    if n_negative == 0 or n_negative < required * (1 - 1e-12):
        return {"fpr_target": fpr, "estimable": False,
                "reason": f"{n_negative} negatives < {min_negatives_factor:g}/FPR = {required:g}",
                "threshold": None, "recall": None, "precision": None, "fpr": None,
                "n_negative": n_negative, "n_positive": n_positive}
    negatives = np.sort(score[~positive])
    candidates = np.unique(negatives)
    # share of negatives with score >= t, for each distinct negative score t (decreasing in t)
    share_at_or_above = (n_negative - np.searchsorted(negatives, candidates, side="left")) / n_negative
    within = np.flatnonzero(share_at_or_above <= fpr)
    threshold = float(candidates[within[0]]) if within.size else float(np.nextafter(negatives[-1], np.inf))
    flagged = score >= threshold
    flagged_positive = int((flagged & positive).sum())
    return {
        "fpr_target": fpr,
        "estimable": True,
        "reason": None,
        "threshold": threshold,
        "recall": flagged_positive / n_positive if n_positive else None,
        "precision": flagged_positive / int(flagged.sum()) if flagged.any() else None,
        "fpr": int((flagged & ~positive).sum()) / n_negative,
        "n_negative": n_negative,
        "n_positive": n_positive,
    }


def alerts_per_1000(tpr: float, fpr: float, prevalence: float) -> float:
    """Expected alerts per 1000 cases in a population with this prevalence: the workload an operating point makes."""
    for name, value in (("tpr", tpr), ("fpr", fpr), ("prevalence", prevalence)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1]")
    return 1000.0 * (prevalence * tpr + (1.0 - prevalence) * fpr)


# --- costs and prevalence ---------------------------------------------------------------------------------------


def _resolve_shares(present: Sequence[str], prevalence: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """Population share per present label (remainder split evenly over the present labels not given) and the given
    labels with a positive share that the test split lacks."""
    given = {label: float(share) for label, share in prevalence.items()}
    if any(share < 0 or math.isnan(share) for share in given.values()):
        raise ValueError("prevalence shares must be non-negative")
    total_given = sum(given.values())
    if total_given > 1 + _SHARE_TOLERANCE:
        raise ValueError(f"prevalence shares sum to {total_given:g} > 1")
    not_given = [label for label in present if label not in given]
    remainder = max(0.0, 1.0 - total_given)
    if not not_given and remainder > _SHARE_TOLERANCE:
        raise ValueError(f"prevalence shares sum to {total_given:g}, and no label in the test split takes the rest")
    shares = {label: given[label] if label in given else remainder / len(not_given) for label in present}
    absent = sorted(label for label, share in given.items() if share > 0 and label not in set(present))
    return shares, absent


def _first_seen(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def expected_cost(
    gold: Sequence[str],
    pred: Sequence[str | None],
    costs: Mapping[str, Mapping[str, float]],
    prevalence: Mapping[str, float] | None = None,
) -> dict:
    """Mean misclassification cost, ``costs[gold][pred]``, on the test split and reweighted to a population.

    A pair not declared costs 0, including a gold label without a row and a prediction that is None or outside the
    labels: declare the cost of an unparseable answer or abstention under the key None (``costs[gold][None]``) or map
    such predictions to a label first, or they are free. ``reweighted`` = sum over gold labels of population share *
    mean cost among that label's records; None without prevalence, and None when a label with a positive share is
    absent from the test split (listed in ``not_in_test``) since its cost cannot be estimated.
    """
    n = _same_length(gold=gold, pred=pred)
    per_record = np.array([float(costs.get(g, {}).get(p, 0.0)) for g, p in zip(gold, pred, strict=True)])
    result = {"per_case": _mean_or_none(per_record), "total": float(per_record.sum()), "n": n,
              "reweighted": None, "prevalence_used": None, "not_in_test": []}
    if prevalence is None:
        return result
    present = _first_seen(gold)
    shares, absent = _resolve_shares(present, prevalence)
    result["not_in_test"] = absent
    if absent or not present:
        return result
    gold_arr = np.asarray(list(gold), dtype=object)
    result["prevalence_used"] = shares
    result["reweighted"] = float(sum(shares[g] * per_record[gold_arr == g].mean() for g in present))
    return result


def favourable_error_rates(gold: Sequence[str], pred: Sequence[str | None], favourable: str) -> dict:
    """Per gold label other than the favourable one, the share of its cases given the favourable outcome.

    For credit with favourable 通过: gold 拒绝 -> the bad-approval rate, gold 人工复核 -> the missed-escalation rate;
    these are the errors that cost a bank money, whatever the overall accuracy.
    """
    _same_length(gold=gold, pred=pred)
    rates = {}
    for label in _first_seen(gold):
        if label == favourable:
            continue
        preds = [p for g, p in zip(gold, pred, strict=True) if g == label]
        n_favourable = sum(1 for p in preds if p == favourable)
        rates[label] = {"rate": n_favourable / len(preds), "n": len(preds), "n_favourable": n_favourable}
    return rates


def prevalence_weights(gold: Sequence[str], prevalence: Mapping[str, float]) -> list[float]:
    """Per-record weights that make the test split's label shares equal a population's (mean weight 1).

    Raises ValueError when a label with a positive share is absent from the test split: no weight can represent it.
    """
    present = _first_seen(gold)
    shares, absent = _resolve_shares(present, prevalence)
    if absent:
        raise ValueError(f"labels with a prevalence share are absent from the test split: {absent}")
    n = len(gold)
    counts = {label: 0 for label in present}
    for g in gold:
        counts[g] += 1
    return [shares[g] * n / counts[g] for g in gold]
