"""Noise around the evaluation's figures (banklm.evaluation.uncertainty): every expected value is worked out by hand
in the test (the arithmetic is in the comments), and the bootstrap interval's coverage is checked on synthetic
samples whose true accuracy is known."""

from __future__ import annotations

import json
import math
import warnings
from statistics import NormalDist

import numpy as np
import pytest
from sklearn.metrics import f1_score

from banklm.evaluation.uncertainty import (
    LEVEL,
    RESAMPLES,
    SEED,
    bootstrap_interval,
    bootstrap_metric,
    compare_models,
    mcnemar,
    paired_difference,
    proportion_interval,
    seed_summary,
)

APPROVE, REJECT, REVIEW = "通过", "拒绝", "人工复核"


def _pairs(a_only: int, b_only: int, both: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Right/wrong columns of two models with the given 2x2 table."""
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return a, b


def test_constants():
    assert (RESAMPLES, SEED, LEVEL) == (2000, 0, 0.95)


def test_mcnemar_exact_below_25_discordant_pairs():
    a, b = _pairs(a_only=10, b_only=2, both=5, neither=3)
    out = mcnemar(a, b)
    assert (out["n"], out["a_only"], out["b_only"], out["both"], out["neither"]) == (20, 10, 2, 5, 3)
    # acc_a = (10 + 5) / 20 = 0.75, acc_b = (2 + 5) / 20 = 0.35 -> 0.4
    assert out["difference"] == pytest.approx(0.4, abs=1e-12)
    # 12 discordant < 25 -> exact: p = 2 * P(X <= 2 | Bin(12, 0.5)) = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12
    #                                = 2 * (1 + 12 + 66) / 4096 = 158 / 4096 = 0.03857421875
    assert out["p_value"] == pytest.approx(158 / 4096, abs=1e-12)
    assert out["statistic"] == 2.0  # min(a_only, b_only)
    assert "exact" in out["method"]
    json.dumps(out)


def test_mcnemar_chi_square_from_25_discordant_pairs():
    a, b = _pairs(a_only=40, b_only=20, both=30, neither=10)
    out = mcnemar(a, b)
    assert (out["n"], out["a_only"], out["b_only"], out["both"], out["neither"]) == (100, 40, 20, 30, 10)
    # acc_a = 70/100, acc_b = 50/100 -> 0.2
    assert out["difference"] == pytest.approx(0.2, abs=1e-12)
    # (|40 - 20| - 1)^2 / (40 + 20) = 19^2 / 60 = 361 / 60 = 6.01667
    assert out["statistic"] == pytest.approx(361 / 60, abs=1e-12)
    # chi-square with 1 df: sf(x) = P(|Z| > sqrt(x)) = erfc(sqrt(x / 2)) = erfc(sqrt(361 / 120)) = 0.014171...
    assert out["p_value"] == pytest.approx(math.erfc(math.sqrt(361 / 120)), rel=1e-9)
    assert out["p_value"] == pytest.approx(0.01417, abs=5e-5)
    assert "chi-square" in out["method"]


def test_mcnemar_boundary_and_degenerate_tables():
    # 24 discordant pairs is still exact: 2 * P(X <= 4 | Bin(24, .5)) = 2 * (1 + 24 + 276 + 2024 + 10626) / 2^24
    out = mcnemar(*_pairs(a_only=20, b_only=4, both=1, neither=1))
    assert out["p_value"] == pytest.approx(2 * 12951 / 2**24, rel=1e-12)
    assert "exact" in out["method"]
    # 25 discordant pairs is chi-square: (|20 - 5| - 1)^2 / 25 = 196 / 25 = 7.84
    out = mcnemar(*_pairs(a_only=20, b_only=5, both=1, neither=1))
    assert out["statistic"] == pytest.approx(7.84, abs=1e-12)
    assert out["p_value"] == pytest.approx(math.erfc(math.sqrt(7.84 / 2)), rel=1e-9)
    # equal discordant counts: the continuity correction stops at 0 -> statistic 0, p 1
    out = mcnemar(*_pairs(a_only=15, b_only=15, both=0, neither=0))
    assert (out["statistic"], out["p_value"], out["difference"]) == (0.0, 1.0, 0.0)
    # no discordant pairs at all
    out = mcnemar(*_pairs(a_only=0, b_only=0, both=7, neither=3))
    assert (out["statistic"], out["p_value"], out["difference"]) == (0.0, 1.0, 0.0)
    assert "no discordant" in out["method"]
    # numpy input, 0/1 ints
    out = mcnemar(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    assert (out["a_only"], out["b_only"], out["both"], out["neither"]) == (1, 1, 1, 1)
    assert out["p_value"] == 1.0  # 2 * P(X <= 1 | Bin(2, .5)) = 2 * 3/4, capped at 1
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([True, None], [True, False])


def test_wilson_interval_by_hand():
    k, n = 150, 200
    z = NormalDist().inv_cdf(0.975)  # 1.959963985
    p = k / n  # 0.75
    # centre = (p + z^2 / 2n) / (1 + z^2 / n); half width = z / (1 + z^2 / n) * sqrt(p(1-p)/n + z^2 / 4n^2)
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    out = proportion_interval(k, n)
    assert out["estimate"] == 0.75
    assert out["low"] == pytest.approx(centre - half, abs=1e-9)  # 0.68566
    assert out["high"] == pytest.approx(centre + half, abs=1e-9)  # 0.80492
    assert out["low"] == pytest.approx(0.68566, abs=1e-5) and out["high"] == pytest.approx(0.80492, abs=1e-5)
    assert (out["n"], out["method"]) == (200, "Wilson score")
    assert type(out["low"]) is float
    assert proportion_interval(0, 0) == {"estimate": None, "low": None, "high": None, "n": 0, "method": "Wilson score"}
    with pytest.raises(ValueError):
        proportion_interval(3, 2)


def test_bootstrap_interval_coverage():
    """The 95% percentile interval of an accuracy on 200 records contains the true accuracy 0.75 in 93-97% of
    1,000 synthetic test splits."""
    rng = np.random.default_rng(20240601)
    hits = 0
    for i in range(1000):
        sample = (rng.random(200) < 0.75).astype(float)
        out = bootstrap_interval(sample, resamples=1000, seed=i)
        hits += out["low"] <= 0.75 <= out["high"]
    assert 0.93 <= hits / 1000 <= 0.97, hits


def test_bootstrap_interval_values():
    out = bootstrap_interval([0, 1, 1, 1])  # mean = 3/4
    assert out["estimate"] == 0.75 and out["n"] == 4
    assert out["method"] == "percentile bootstrap, 2000 resamples, seed 0"
    # a resampled mean of 4 zeros/ones is a multiple of 1/4, so are the percentile ends
    assert out["low"] * 4 == round(out["low"] * 4) and out["high"] * 4 == round(out["high"] * 4)
    assert 0 <= out["low"] < 0.75 <= out["high"] <= 1
    assert bootstrap_interval([0, 1, 1, 1]) == out  # same seed, same interval
    json.dumps(out)
    # a statistic without an ``axis`` argument is called once per resample
    med = bootstrap_interval(np.array([1.0, 2, 3, 4, 100]), lambda x: float(np.median(x)), resamples=300)
    assert med["estimate"] == 3.0 and 1 <= med["low"] <= 3.0 <= med["high"] <= 100
    assert bootstrap_interval([]) == {"estimate": None, "low": None, "high": None, "n": 0,
                                      "method": "percentile bootstrap, 2000 resamples, seed 0"}


def test_bootstrap_interval_degenerate_samples_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("percentile", "BCa"):
            out = bootstrap_interval([1, 1, 1, 1, 1], method=method)
            assert (out["estimate"], out["low"], out["high"]) == (1.0, 1.0, 1.0)
        out = bootstrap_interval([0.4])
        assert (out["estimate"], out["low"], out["high"], out["n"]) == (0.4, 0.4, 0.4, 1)
        # varied values, but the median of 9 zeros and a one is 0 in (nearly) every resample: BCa is undefined there
        out = bootstrap_interval([0] * 9 + [1], np.median, method="BCa")
        assert (out["estimate"], out["low"], out["high"]) == (0.0, 0.0, 0.0)
        assert "BCa undefined" in out["method"]


def _macro_f1(gold, pred) -> float:
    return f1_score(gold, pred, average="macro", zero_division=0)


def test_bootstrap_metric_macro_f1():
    # class  tp fp fn   precision recall  F1
    # 通过    2  0  1   1         2/3     2*1*(2/3)/(1+2/3) = 4/5
    # 拒绝    1  1  1   1/2       1/2     1/2
    # 人工复核 1  1  0   1/2       1       2*(1/2)/(3/2) = 2/3
    # macro = (4/5 + 1/2 + 2/3) / 3 = (24 + 15 + 20) / 90 = 59/90 = 0.6556
    gold = [APPROVE, APPROVE, APPROVE, REJECT, REJECT, REVIEW] * 10
    pred = [APPROVE, APPROVE, REJECT, REJECT, REVIEW, REVIEW] * 10
    out = bootstrap_metric(_macro_f1, gold, pred, resamples=300)
    assert out["estimate"] == pytest.approx(59 / 90, abs=1e-12)
    assert out["n"] == 60
    assert out["low"] < 59 / 90 < out["high"]
    assert 0.45 < out["low"] and out["high"] < 0.85  # about +-2 standard errors, not the whole [0, 1]
    assert bootstrap_metric(_macro_f1, gold, pred, resamples=300) == out  # same seed, same interval
    assert bootstrap_metric(_macro_f1, np.array(gold), np.array(pred), resamples=300) == out  # arrays = lists
    assert out["method"] == "paired percentile bootstrap, 300 resamples, seed 0"
    json.dumps(out)


def test_bootstrap_metric_keeps_columns_paired():
    # every prediction is right: a paired resample is still all right (accuracy 1 in every resample, interval
    # [1, 1]); resampling the prediction column on its own would match gold about 1/3 of the time
    gold = [APPROVE, REJECT, REVIEW] * 20
    pred = list(gold)
    out = bootstrap_metric(lambda g, p: float(np.mean(g == p)), gold, pred, resamples=200)
    assert (out["estimate"], out["low"], out["high"]) == (1.0, 1.0, 1.0)
    # three columns: a weight travels with its record (weighted accuracy = (1+1+1+0*100) / (1+1+1+100) = 3/103)
    right = [1, 1, 1, 0]
    weight = [1.0, 1.0, 1.0, 100.0]
    out = bootstrap_metric(lambda r, w, _g: float(np.sum(r * w) / np.sum(w)), right, weight, [0, 0, 0, 0],
                           resamples=200)
    # a resample either holds record 3 (the weighted accuracy is then at most 3/103) or not (it is then 1)
    assert out["estimate"] == pytest.approx(3 / 103)
    assert out["low"] <= 3 / 103 + 1e-12 and out["high"] == 1.0


def test_paired_difference():
    same = [0.2, 0.9, 0.4, 0.4, 1.0]
    out = paired_difference(same, list(same))
    assert (out["difference"], out["low"], out["high"], out["p_value"], out["n"]) == (0.0, 0.0, 0.0, 1.0, 5)
    # model a right on 30 of 100 records where b is wrong, equal elsewhere -> difference 30/100
    a = [1] * 30 + [1] * 50 + [0] * 20
    b = [0] * 30 + [1] * 50 + [0] * 20
    out = paired_difference(a, b)
    assert out["difference"] == pytest.approx(0.3, abs=1e-12)
    assert 0 < out["low"] < 0.3 < out["high"] < 0.45
    # a resample at or below 0 has none of the 30 records: 0.7^100 = 3e-16, so p = 0 at 2000 resamples
    assert out["p_value"] < 0.05 and out["p_value"] == 0.0
    assert out["method"] == "paired percentile bootstrap, 2000 resamples, seed 0"
    rev = paired_difference(b, a)
    assert rev["difference"] == pytest.approx(-0.3, abs=1e-12) and rev["high"] < 0 and rev["p_value"] == 0.0
    # two records, d = [1, 0]: the resampled mean is 0 when both draws are record 2 (probability 1/4), so
    # p = 2 * 1/4 = 0.5 up to Monte Carlo error (sd 2 * sqrt(.25 * .75 / 2000) = 0.019); the ends are 0 and 1
    tiny = paired_difference([1.0, 0.0], [0.0, 0.0])
    assert tiny["difference"] == 0.5 and abs(tiny["p_value"] - 0.5) < 0.06
    assert (tiny["low"], tiny["high"]) == (0.0, 1.0)
    json.dumps(out)


def test_compare_models_end_to_end():
    gold = [APPROVE, REJECT, REVIEW, APPROVE, REJECT, None]
    pred_a = [APPROVE, REJECT, REVIEW, APPROVE, APPROVE, None]  # right on records 0-3
    pred_b = [None, REJECT, REVIEW, REJECT, REJECT, None]  # right on 1, 2, 4; None never counts as right
    out = compare_models(gold, pred_a, pred_b, names=("qwen-sft", "base"))
    assert out["a"]["name"] == "qwen-sft" and out["b"]["name"] == "base"
    assert out["a"]["accuracy"] == pytest.approx(4 / 6) and out["b"]["accuracy"] == pytest.approx(3 / 6)
    assert out["a"]["low"] <= 4 / 6 <= out["a"]["high"]
    m = out["mcnemar"]
    # a_only = records 0, 3; b_only = record 4; both = 1, 2; neither = 5
    assert (m["a_only"], m["b_only"], m["both"], m["neither"], m["n"]) == (2, 1, 2, 1, 6)
    # exact: 2 * P(X <= 1 | Bin(3, .5)) = 2 * (1 + 3) / 8 = 1
    assert m["p_value"] == 1.0
    assert out["difference"]["difference"] == pytest.approx(1 / 6)
    assert out["significant"] is False
    json.dumps(out)
    # 30 records a gets right and b answers None: a_only = 30 -> chi-square (30 - 1)^2 / 30 = 841 / 30 = 28.03
    big = compare_models([APPROVE] * 40, [APPROVE] * 40, [None] * 30 + [APPROVE] * 10)
    assert big["mcnemar"]["statistic"] == pytest.approx(841 / 30)
    assert big["significant"] is True
    assert big["a"]["name"] == "a" and big["b"]["accuracy"] == 0.25


def test_seed_summary():
    out = seed_summary([0.6, 0.7, 0.8])
    # mean = 2.1 / 3 = 0.7; sd = sqrt(((-0.1)^2 + 0 + 0.1^2) / (3 - 1)) = sqrt(0.01) = 0.1
    assert out["mean"] == pytest.approx(0.7, abs=1e-12) and out["sd"] == pytest.approx(0.1, abs=1e-12)
    assert (out["min"], out["max"], out["n"]) == (0.6, 0.8, 3)
    assert seed_summary(np.array([0.5]))["sd"] is None
    json.dumps(out)
    with pytest.raises(ValueError):
        seed_summary([])


def test_length_mismatch_and_empty_input():
    with pytest.raises(ValueError, match="same length"):
        mcnemar([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="same length"):
        paired_difference([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="same length"):
        bootstrap_metric(_macro_f1, [APPROVE, REJECT], [APPROVE])
    with pytest.raises(ValueError, match="same length"):
        compare_models([APPROVE], [APPROVE, REJECT], [APPROVE])
    with pytest.raises(ValueError):
        mcnemar([], [])
    with pytest.raises(ValueError):
        paired_difference([], [])
    with pytest.raises(ValueError):
        bootstrap_metric(_macro_f1, [], [])
