"""Confidence statistics checked against small hand-computed examples (arithmetic in the comments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from banklm.evaluation.calibration import (
    alerts_per_1000,
    apply_temperature,
    apply_threshold,
    brier,
    choose_threshold,
    expected_cost,
    favourable_error_rates,
    fit_temperature,
    multiclass_brier,
    prevalence_weights,
    ranking,
    recall_at_fpr,
    reliability,
    risk_coverage,
)

APPROVE, REJECT, REVIEW = "通过", "拒绝", "人工复核"


def _builtin_only(value) -> bool:
    """True when every leaf is a builtin JSON type (a numpy scalar would fail the exact type check)."""
    if isinstance(value, dict):
        return all(type(k) is str and _builtin_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_builtin_only(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


# --- reliability, ECE, Brier --------------------------------------------------------------------------------------


def test_ece_mce_brier_on_a_miscalibrated_toy():
    # 10 records at confidence 0.9, 6 correct: one bin, accuracy 0.6, gap |0.6 - 0.9| = 0.3 -> ECE = MCE = 0.3
    confidence, correct = [0.9] * 10, [1] * 6 + [0] * 4
    table = reliability(confidence, correct)
    assert table["scheme"] == "equal-width, 10 bins over [0, 1], right-closed"
    assert table["n"] == 10
    assert table["ece"] == pytest.approx(0.3, abs=1e-12)
    assert table["mce"] == pytest.approx(0.3, abs=1e-12)
    # 0.9 lands in bin 8 = (0.8, 0.9]; every other bin is empty
    assert [b["n"] for b in table["bins"]] == [0] * 8 + [10, 0]
    assert table["bins"][8]["lo"] == 0.8 and table["bins"][8]["hi"] == 0.9
    assert table["bins"][8]["confidence"] == pytest.approx(0.9)
    assert table["bins"][8]["accuracy"] == pytest.approx(0.6)
    assert table["bins"][0]["confidence"] is None and table["bins"][0]["accuracy"] is None
    # Brier: 6 correct * (0.9 - 1)^2 + 4 wrong * (0.9 - 0)^2 = 6 * 0.01 + 4 * 0.81 = 3.3, over 10 -> 0.33
    assert brier(confidence, correct) == pytest.approx(0.6 * 0.01 + 0.4 * 0.81, abs=1e-12)
    assert _builtin_only(table) and json.dumps(table)


def test_bin_boundaries_are_right_closed():
    # 0.0 -> bin 0; 0.1 -> bin 0 (0, 0.1]; just above 0.1 -> bin 1; 0.7 -> bin 6 (0.6, 0.7]; 0.9 -> bin 8; 1.0 -> bin 9
    table = reliability([0.0, 0.1, 0.1000001, 0.7, 0.9, 1.0], [0, 0, 0, 1, 1, 1])
    assert [b["n"] for b in table["bins"]] == [2, 1, 0, 0, 0, 0, 1, 0, 1, 1]
    assert [b["lo"] for b in table["bins"]][:3] == [0.0, 0.1, 0.2]
    assert table["bins"][-1]["hi"] == 1.0
    three_bins = reliability([1 / 3, 0.34, 1.0], [1, 1, 1], n_bins=3)
    assert three_bins["scheme"] == "equal-width, 3 bins over [0, 1], right-closed"
    assert [b["n"] for b in three_bins["bins"]] == [1, 1, 1]


def test_ece_weights_bins_by_their_share_of_records():
    # bin 1 (0.1, 0.2]: two records at 0.2, one correct -> accuracy 0.5, gap 0.3, weight 2/5
    # bin 6 (0.6, 0.7]: 0.61, 0.65, 0.69 (mean 0.65), two of three correct -> gap |2/3 - 0.65| = 1/60, weight 3/5
    # ECE = 0.4 * 0.3 + 0.6 / 60 = 0.12 + 0.01 = 0.13; MCE = 0.3
    table = reliability([0.2, 0.2, 0.61, 0.65, 0.69], [1, 0, 1, 1, 0])
    assert table["ece"] == pytest.approx(0.13, abs=1e-12)
    assert table["mce"] == pytest.approx(0.3, abs=1e-12)
    assert table["bins"][6]["confidence"] == pytest.approx(0.65)
    assert table["bins"][6]["accuracy"] == pytest.approx(2 / 3)
    # Brier: (0.2-1)^2 + 0.2^2 + 0.39^2 + 0.35^2 + 0.69^2 = 0.64 + 0.04 + 0.1521 + 0.1225 + 0.4761 = 1.4307, / 5
    assert brier([0.2, 0.2, 0.61, 0.65, 0.69], [1, 0, 1, 1, 0]) == pytest.approx(0.28614, abs=1e-12)


def test_empty_and_invalid_inputs():
    table = reliability([], [])
    assert table["ece"] is None and table["mce"] is None and table["n"] == 0
    assert brier([], []) is None
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability([1.2], [1])
    # a marginal summed from label scores may overshoot 1 by a rounding error: clipped into the top bin
    assert reliability([1 + 1e-15], [1])["bins"][9]["n"] == 1
    with pytest.raises(ValueError, match="0/1"):
        brier([0.5], [2])


def test_multiclass_brier_by_hand():
    # record 1, gold A: (0.7-1)^2 + 0.2^2 + 0.1^2 = 0.09 + 0.04 + 0.01 = 0.14
    # record 2, gold C not in the dict: 0.6^2 + 0.4^2 + (0-1)^2 = 0.36 + 0.16 + 1 = 1.52; mean (0.14 + 1.52) / 2 = 0.83
    probs = [{"A": 0.7, "B": 0.2, "C": 0.1}, {"A": 0.6, "B": 0.4}]
    assert multiclass_brier(probs, ["A", "C"]) == pytest.approx(0.83, abs=1e-12)
    assert multiclass_brier([], []) is None


# --- ranking ------------------------------------------------------------------------------------------------------


def test_binary_auc_on_a_known_ranking():
    # scores 0.9(+) 0.8(-) 0.7(+) 0.6(-): ordered pairs (0.9,0.8) (0.9,0.6) (0.7,0.6) of 4 -> ROC-AUC 0.75
    # AP: precision at each positive 1/1 and 2/3 -> (1 + 2/3) / 2
    probs = [{"a": s, "b": 1 - s} for s in [0.9, 0.8, 0.7, 0.6]]
    out = ranking(probs, ["a", "b", "a", "b"], ["a", "b"])
    assert out["average"] == "binary"
    assert out["roc_auc"] == pytest.approx(0.75, abs=1e-12)
    assert out["pr_auc"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)
    assert list(out["per_label"]) == ["a"] and out["per_label"]["a"]["n_positive"] == 2
    assert _builtin_only(out)
    # naming the positive label ranks by its probability instead: b is the mirror image -> same AUC
    assert ranking(probs, ["a", "b", "a", "b"], ["a", "b"], positive="b")["roc_auc"] == pytest.approx(0.75)


def test_tied_scores_get_half_credit():
    # positives 0.9, 0.5; negatives 0.5, 0.1: pairs 1 + 1 + 0.5 (tie) + 1 = 3.5 of 4 -> 0.875
    # AP: threshold 0.9 -> P 1, R 1/2; threshold 0.5 (tie enters at once) -> P 2/3, R 1 -> 1/2 * 1 + 1/2 * 2/3 = 5/6
    probs = [{"y": s} for s in [0.9, 0.5, 0.5, 0.1]]  # "n" missing everywhere: counts as 0
    out = ranking(probs, ["y", "y", "n", "n"], ["y", "n"])
    assert out["roc_auc"] == pytest.approx(0.875, abs=1e-12)
    assert out["pr_auc"] == pytest.approx(5 / 6, abs=1e-12)


def test_one_vs_rest_macro_omits_a_label_without_positives():
    probs = [
        {"A": 0.8, "B": 0.1},  # C missing -> 0
        {"A": 0.4, "B": 0.5, "C": 0.1},
        {"A": 0.5, "B": 0.4, "C": 0.1},
        {"A": 0.1, "B": 0.8, "C": 0.1},
        {"A": 0.2, "B": 0.2, "C": 0.6},
        {"A": 0.3, "B": 0.3, "C": 0.4},
    ]
    gold = ["A", "A", "B", "B", "C", "C"]
    out = ranking(probs, gold, ["A", "B", "C", "D"])
    # A: positives 0.8, 0.4 vs negatives 0.5, 0.1, 0.2, 0.3 -> 4 + 3 of 8 = 0.875; AP 1/2 * 1 + 1/2 * 2/3 = 5/6
    # B: positives 0.4, 0.8 vs negatives 0.1, 0.5, 0.2, 0.3 -> the same 0.875 and 5/6
    # C: positives 0.6, 0.4 vs negatives 0, 0.1, 0.1, 0.1 -> 1 and 1; D has no positive -> left out
    assert out["average"] == "one-vs-rest macro over 3 labels"
    assert list(out["per_label"]) == ["A", "B", "C"]
    assert out["per_label"]["A"] == pytest.approx({"roc_auc": 0.875, "pr_auc": 5 / 6, "n_positive": 2})
    assert out["per_label"]["C"] == pytest.approx({"roc_auc": 1.0, "pr_auc": 1.0, "n_positive": 2})
    assert out["roc_auc"] == pytest.approx((0.875 + 0.875 + 1) / 3, abs=1e-12)
    assert out["pr_auc"] == pytest.approx((5 / 6 + 5 / 6 + 1) / 3, abs=1e-12)
    # binary on C alone: every C outranks every other case
    assert ranking(probs, gold, ["A", "B", "C"], positive="C")["roc_auc"] == 1.0


def test_nothing_estimable_gives_none():
    out = ranking([{"a": 0.9}, {"a": 0.3}], ["a", "a"], ["a", "b"])
    assert out == {"roc_auc": None, "pr_auc": None, "average": "binary", "per_label": {}}
    with pytest.raises(ValueError, match="positive"):
        ranking([{"a": 0.9}], ["a"], ["a", "b"], positive="c")


# --- temperature --------------------------------------------------------------------------------------------------


def test_apply_temperature():
    p = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert apply_temperature(p, 1.0) == pytest.approx(p, abs=1e-12)
    # T = 2: sqrt(0.9) : sqrt(0.1) = 3 : 1 -> 0.75, 0.25
    assert apply_temperature({"a": 0.9, "b": 0.1}, 2.0) == pytest.approx({"a": 0.75, "b": 0.25}, abs=1e-12)
    # T = 0.5: 0.6^2 : 0.4^2 = 0.36 : 0.16 -> 9/13, 4/13
    assert apply_temperature({"a": 0.6, "b": 0.4}, 0.5) == pytest.approx({"a": 9 / 13, "b": 4 / 13}, abs=1e-12)
    with pytest.raises(ValueError):
        apply_temperature(p, 0.0)


def test_fit_temperature_recovers_the_empirical_accuracy():
    # 10 records, p = 0.9 on x, x correct 6 times. Optimum: the scaled p equals 0.6, i.e.
    # 0.9^(1/T) / (0.9^(1/T) + 0.1^(1/T)) = 0.6  <=>  9^(1/T) = 1.5  <=>  T = ln 9 / ln 1.5 = 5.419
    probs = [{"x": 0.9, "y": 0.1}] * 10
    gold = ["x"] * 6 + ["y"] * 4
    fit = fit_temperature(probs, gold)
    assert fit["n"] == 10
    assert fit["temperature"] == pytest.approx(math.log(9) / math.log(1.5), rel=1e-4)
    assert apply_temperature(probs[0], fit["temperature"])["x"] == pytest.approx(0.6, abs=1e-3)
    # NLL before: -(0.6 ln 0.9 + 0.4 ln 0.1) = 0.98425; after: -(0.6 ln 0.6 + 0.4 ln 0.4) = 0.67301
    assert fit["nll_before"] == pytest.approx(-(0.6 * math.log(0.9) + 0.4 * math.log(0.1)), abs=1e-12)
    assert fit["nll_after"] == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)), abs=1e-9)
    assert fit["temperature"] > 1 and fit["nll_after"] < fit["nll_before"]
    assert _builtin_only(fit)


def test_fit_temperature_sharpens_an_underconfident_model():
    # p = 0.6, right 90 %: 1.5^(1/T) = 9 -> T = ln 1.5 / ln 9 = 0.1845 < 1
    probs = [{"x": 0.6, "y": 0.4}] * 10
    fit = fit_temperature(probs, ["x"] * 9 + ["y"])
    assert fit["temperature"] == pytest.approx(math.log(1.5) / math.log(9), rel=1e-4)
    assert fit["nll_after"] < fit["nll_before"]


def test_a_record_without_its_gold_label_counts_but_does_not_steer():
    probs = [{"x": 0.9, "y": 0.1}] * 10 + [{"x": 1.0}]
    gold = ["x"] * 6 + ["y"] * 4 + ["z"]
    fit = fit_temperature(probs, gold)
    assert fit["temperature"] == pytest.approx(math.log(9) / math.log(1.5), rel=1e-4)
    # the extra record adds -ln(1e-12) = 27.631 to the sum at every temperature; mean over 11 records
    before = (10 * -(0.6 * math.log(0.9) + 0.4 * math.log(0.1)) - math.log(1e-12)) / 11
    assert fit["nll_before"] == pytest.approx(before, abs=1e-9)
    nothing = fit_temperature([{"x": 1.0}], ["z"])
    assert nothing["temperature"] is None and nothing["nll_before"] == pytest.approx(-math.log(1e-12))
    assert fit_temperature([], []) == {"temperature": None, "nll_before": None, "nll_after": None, "n": 0}


# --- risk-coverage and thresholds ---------------------------------------------------------------------------------

CONF = [0.95, 0.9, 0.8, 0.7, 0.6]
CORRECT = [1, 1, 1, 0, 1]


def test_risk_coverage_and_threshold_on_a_known_curve():
    curve = risk_coverage(CONF, CORRECT)
    # thresholds 0.95 .. 0.6 answer 1..5 of 5 cases; accuracy 1, 1, 1, 3/4, 4/5
    assert curve["n"] == 5
    assert [p["threshold"] for p in curve["points"]] == CONF
    assert [p["coverage"] for p in curve["points"]] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert [p["accuracy"] for p in curve["points"]] == pytest.approx([1, 1, 1, 0.75, 0.8])
    # AURC, risks 0, 0, 0, 0.25, 0.2 at steps of 0.2: 0.2 * (0.25 / 2) + 0.2 * (0.45 / 2) = 0.025 + 0.045 = 0.07
    assert curve["aurc"] == pytest.approx(0.07, abs=1e-12)
    # target 0.97: the lowest threshold with accuracy >= 0.97 is 0.8 (0.7 drops to 0.75)
    assert choose_threshold(CONF, CORRECT, 0.97) == {
        "threshold": 0.8, "coverage": 0.6, "accuracy": 1.0, "target_accuracy": 0.97, "met": True}
    # target 0.75: every point meets it; the largest coverage is threshold 0.6 at accuracy 4/5
    low = choose_threshold(CONF, CORRECT, 0.75)
    assert (low["threshold"], low["coverage"], low["met"]) == (0.6, 1.0, True)
    assert low["accuracy"] == pytest.approx(0.8)
    assert apply_threshold(CONF, 0.8) == [True, True, True, False, False]
    assert apply_threshold(CONF, None) == [True] * 5


def test_aurc_by_hand_on_three_points():
    # points (1/3, risk 0), (2/3, risk 1/2), (1, risk 1/3):
    # 1/3 * (0 + 1/2) / 2 + 1/3 * (1/2 + 1/3) / 2 = 1/12 + 5/36 = 8/36 = 2/9
    curve = risk_coverage([0.9, 0.8, 0.7], [1, 0, 1])
    assert len(curve["points"]) == 3
    assert curve["aurc"] == pytest.approx(2 / 9, abs=1e-12)


def test_equal_confidences_enter_together():
    # 0.9 twice (one right, one wrong) -> one point at coverage 2/4, accuracy 1/2; then 0.8 -> 3/4, 2/3; 0.5 -> 1, 3/4
    curve = risk_coverage([0.9, 0.8, 0.9, 0.5], [1, 1, 0, 1])
    assert [(p["threshold"], p["coverage"]) for p in curve["points"]] == [(0.9, 0.5), (0.8, 0.75), (0.5, 1.0)]
    assert [p["accuracy"] for p in curve["points"]] == pytest.approx([0.5, 2 / 3, 0.75])
    # a target of 0.6 cannot stop between the tied 0.9 cases: 0.5 is the lowest threshold meeting it
    assert choose_threshold([0.9, 0.8, 0.9, 0.5], [1, 1, 0, 1], 0.6)["threshold"] == 0.5


def test_model_abstentions_lower_coverage():
    # the 0.8 case was not answered by the model: never answered, but still in the denominator N = 5
    answered = [True, True, False, True, True]
    curve = risk_coverage(CONF, CORRECT, answered)
    assert curve["n"] == 5
    assert [p["threshold"] for p in curve["points"]] == [0.95, 0.9, 0.7, 0.6]
    assert [p["coverage"] for p in curve["points"]] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [p["accuracy"] for p in curve["points"]] == pytest.approx([1, 1, 2 / 3, 0.75])
    best = choose_threshold(CONF, CORRECT, 0.97, answered=answered)
    assert (best["threshold"], best["coverage"], best["met"]) == (0.9, 0.4, True)
    none = choose_threshold(CONF, CORRECT, 0.5, answered=[False] * 5)
    assert none == {"threshold": None, "coverage": 0.0, "accuracy": None, "target_accuracy": 0.5, "met": False}
    assert risk_coverage(CONF, CORRECT, [False] * 5) == {"n": 5, "points": [], "aurc": None}


def test_unmet_target_returns_the_most_accurate_point():
    # points: 0.9 -> acc 0 (1/3), 0.8 -> 1/2, 0.7 -> 2/3: 0.9 is out of reach, best is 2/3 at threshold 0.7
    out = choose_threshold([0.9, 0.8, 0.7], [0, 1, 1], 0.9)
    assert out["met"] is False and out["threshold"] == 0.7 and out["coverage"] == 1.0
    assert out["accuracy"] == pytest.approx(2 / 3)
    # accuracies 0, 1/2, 1/3, 1/2: the tie at 1/2 goes to the larger coverage (threshold 0.6)
    tie = choose_threshold([0.9, 0.8, 0.7, 0.6], [0, 1, 0, 1], 0.9)
    assert (tie["threshold"], tie["coverage"], tie["accuracy"], tie["met"]) == (0.6, 1.0, 0.5, False)


# --- detection operating points -----------------------------------------------------------------------------------

NEGATIVE_SCORES = [k / 200 for k in range(200)]  # 0, 0.005, ..., 0.995
POSITIVE_SCORES = [0.999, 0.99, 0.97, 0.951, 0.95, 0.94, 0.9, 0.5, 0.3, 0.1]


def test_recall_at_fpr_by_hand():
    scores = NEGATIVE_SCORES + POSITIVE_SCORES
    labels = [0] * 200 + [1] * 10
    out = recall_at_fpr(scores, labels, 0.05)
    # 200 >= 10 / 0.05 = 200: estimable. Budget 5 % of 200 = 10 negatives: the top ten are 190/200 .. 199/200,
    # so t = 0.95. Positives >= 0.95: 0.999, 0.99, 0.97, 0.951, 0.95 (tie flagged) -> recall 5/10,
    # precision 5 / (5 + 10) = 1/3, actual FPR 10/200
    assert out["estimable"] is True and out["reason"] is None
    assert out["threshold"] == 0.95
    assert out["recall"] == 0.5
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["fpr"] == 0.05
    assert (out["n_negative"], out["n_positive"], out["fpr_target"]) == (200, 10, 0.05)
    assert _builtin_only(out)


def test_too_few_negatives_is_not_estimable():
    scores = NEGATIVE_SCORES + POSITIVE_SCORES
    labels = [0] * 200 + [1] * 10
    # 200 negatives are enough at 5 % (above) but not at 1 %: 200 < 10 / 0.01 = 1000
    out = recall_at_fpr(scores, labels, 0.01)
    assert out == {"fpr_target": 0.01, "estimable": False, "reason": "200 negatives < 10/FPR = 1000",
                   "threshold": None, "recall": None, "precision": None, "fpr": None,
                   "n_negative": 200, "n_positive": 10}
    # 50 negatives: 50 < 1000 at 1 % and 50 < 200 at 5 %
    assert recall_at_fpr(scores[150:], labels[150:], 0.01)["reason"] == "50 negatives < 10/FPR = 1000"
    assert recall_at_fpr(scores[150:], labels[150:], 0.05)["estimable"] is False
    # one negative short of 200 at 5 %
    assert recall_at_fpr(scores[1:], labels[1:], 0.05)["reason"] == "199 negatives < 10/FPR = 200"


def test_tied_negatives_over_budget_put_the_threshold_just_above_them():
    # all 200 negatives at 0.5: flagging at 0.5 would flag all of them (FPR 1 > 0.05) -> t just above 0.5
    scores = [0.5] * 200 + [0.6, 0.5, 0.4]
    out = recall_at_fpr(scores, [0] * 200 + [1] * 3, 0.05)
    assert out["threshold"] == float(np.nextafter(0.5, np.inf))
    assert (out["recall"], out["precision"], out["fpr"]) == (pytest.approx(1 / 3), 1.0, 0.0)
    # nothing flagged: precision undefined
    nothing = recall_at_fpr([0.5] * 200 + [0.4], [0] * 200 + [1], 0.05)
    assert (nothing["recall"], nothing["precision"], nothing["fpr"]) == (0.0, None, 0.0)


def test_alerts_per_1000():
    # 1000 * (0.01 * 0.8 + 0.99 * 0.02) = 1000 * (0.008 + 0.0198) = 27.8
    assert alerts_per_1000(0.8, 0.02, 0.01) == pytest.approx(27.8, abs=1e-9)


# --- costs and prevalence -----------------------------------------------------------------------------------------

GOLD = [APPROVE] * 4 + [REJECT] * 2 + [REVIEW] * 4
PRED = [APPROVE, APPROVE, REJECT, REVIEW, APPROVE, REJECT, APPROVE, REVIEW, REVIEW, None]
COSTS = {
    REJECT: {APPROVE: 10.0, REVIEW: 1.0},
    REVIEW: {APPROVE: 5.0, REJECT: 1.0},
    APPROVE: {REJECT: 2.0, REVIEW: 1.0},
}


def test_expected_cost_on_a_known_confusion_matrix():
    # 通过 (4): 0 + 0 + 2 + 1 = 3, mean 0.75 | 拒绝 (2): 10 + 0, mean 5 | 人工复核 (4): 5 + 0 + 0 + 0 (None, undeclared)
    # = 5, mean 1.25. Total 18 over 10 records -> 1.8
    out = expected_cost(GOLD, PRED, COSTS)
    assert out["per_case"] == pytest.approx(1.8) and out["total"] == pytest.approx(18.0) and out["n"] == 10
    assert out["reweighted"] is None and out["not_in_test"] == []
    # population 80 / 10 / 10: 0.8 * 0.75 + 0.1 * 5 + 0.1 * 1.25 = 0.6 + 0.5 + 0.125 = 1.225
    full = expected_cost(GOLD, PRED, COSTS, {APPROVE: 0.8, REJECT: 0.1, REVIEW: 0.1})
    assert full["reweighted"] == pytest.approx(1.225, abs=1e-12)
    # only 通过 given: the remaining 0.2 is split over 拒绝 and 人工复核 -> the same 1.225
    partial = expected_cost(GOLD, PRED, COSTS, {APPROVE: 0.8})
    assert partial["reweighted"] == pytest.approx(1.225, abs=1e-12)
    assert partial["prevalence_used"] == pytest.approx({APPROVE: 0.8, REJECT: 0.1, REVIEW: 0.1})
    # an abstention costs what is declared under None: + 3 -> total 21
    declared = {**COSTS, REVIEW: {**COSTS[REVIEW], None: 3.0}}
    assert expected_cost(GOLD, PRED, declared)["total"] == pytest.approx(21.0)
    assert _builtin_only(full)


def test_expected_cost_with_a_population_label_missing_from_the_test_split():
    out = expected_cost(GOLD, PRED, COSTS, {APPROVE: 0.7, REJECT: 0.1, REVIEW: 0.1, "补充材料": 0.1})
    assert out["not_in_test"] == ["补充材料"] and out["reweighted"] is None
    assert out["per_case"] == pytest.approx(1.8)
    with pytest.raises(ValueError, match="sum"):
        expected_cost(GOLD, PRED, COSTS, {APPROVE: 0.9, REJECT: 0.2})
    with pytest.raises(ValueError, match="takes the rest"):
        expected_cost(GOLD, PRED, COSTS, {APPROVE: 0.5, REJECT: 0.1, REVIEW: 0.1})


def test_favourable_error_rates_on_credit_labels():
    # 拒绝 -> 通过 once of 2 (bad approvals); 人工复核 -> 通过 once of 4 (missed escalations); 通过 itself not listed
    assert favourable_error_rates(GOLD, PRED, APPROVE) == {
        REJECT: {"rate": 0.5, "n": 2, "n_favourable": 1},
        REVIEW: {"rate": 0.25, "n": 4, "n_favourable": 1},
    }


def test_prevalence_weights_match_the_target_shares():
    # 通过 0.8 * 10 / 4 = 2.0; 拒绝 0.1 * 10 / 2 = 0.5; 人工复核 0.1 * 10 / 4 = 0.25
    weights = prevalence_weights(GOLD, {APPROVE: 0.8, REJECT: 0.1, REVIEW: 0.1})
    assert weights == pytest.approx([2.0] * 4 + [0.5] * 2 + [0.25] * 4)
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    shares = {label: sum(w for w, g in zip(weights, GOLD, strict=True) if g == label) / sum(weights)
              for label in (APPROVE, REJECT, REVIEW)}
    assert shares == pytest.approx({APPROVE: 0.8, REJECT: 0.1, REVIEW: 0.1})
    assert prevalence_weights(GOLD, {APPROVE: 0.8}) == pytest.approx(weights)
    with pytest.raises(ValueError, match="absent"):
        prevalence_weights(GOLD, {APPROVE: 0.8, "补充材料": 0.2})


# --- input checks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda: reliability([0.5, 0.6], [1]),
    lambda: brier([0.5], [1, 0]),
    lambda: multiclass_brier([{"a": 1.0}], ["a", "b"]),
    lambda: ranking([{"a": 1.0}], ["a", "b"], ["a", "b"]),
    lambda: fit_temperature([{"a": 1.0}], []),
    lambda: risk_coverage([0.5, 0.6], [1, 0], answered=[True]),
    lambda: choose_threshold([0.5], [1, 0], 0.9),
    lambda: recall_at_fpr([0.5, 0.6], [1], 0.05),
    lambda: expected_cost(["a"], ["a", "b"], {}),
    lambda: favourable_error_rates(["a", "b"], ["a"], "a"),
])
def test_length_mismatch_raises(call):
    with pytest.raises(ValueError, match="differ in length"):
        call()
