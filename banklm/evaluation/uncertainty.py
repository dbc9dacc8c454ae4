"""The noise around every figure the evaluation reports, so a model-risk validator can tell a real difference
between two models from a lucky test split (pure numpy/scipy).

Inputs are per-record sequences (lists or numpy arrays) of equal length; a length mismatch raises ``ValueError``,
and so does empty input wherever the value cannot be computed (the exceptions are named in each function). Every
function returns builtin Python types (json-serialisable); a value that is not a number (NaN) is returned as None.

Methods (defaults: :data:`RESAMPLES` = 2000 resamples, :data:`SEED` = 0, :data:`LEVEL` = 0.95, two-sided):

- **Share of a count** (:func:`proportion_interval`): Wilson score interval (``scipy.stats.binomtest(k, n)
  .proportion_ci(method="wilson")``); cheap and well-behaved near 0 and 1, for the counts in segment tables.
- **One statistic of one sample** (:func:`bootstrap_interval`): percentile bootstrap by ``scipy.stats.bootstrap``
  (``method="percentile"``; BCa on request), 2000 resamples of the records with replacement, random generator
  ``numpy.random.default_rng(0)``. The estimate is the statistic on the full sample. A sample whose values are all
  equal has no spread: its interval is the estimate itself.
- **A metric of several aligned columns** (:func:`bootstrap_metric`, e.g. macro F1 of gold and predicted labels):
  paired percentile bootstrap, where each resample draws one set of record indices (``default_rng(0)``, 2000
  resamples) and takes every column at those indices, so a record's gold and prediction stay together. The indices
  are drawn here rather than by ``scipy.stats.bootstrap`` because scipy resamples numeric arrays only and the
  columns are usually string labels.
- **Two models on the same records, right or wrong** (:func:`mcnemar`): McNemar's test on the discordant pairs
  (records exactly one model got right). With fewer than 25 discordant pairs it is exact: the two-sided binomial
  test ``scipy.stats.binomtest(a_only, a_only + b_only, 0.5)``; from 25 on, the chi-square statistic with continuity
  correction ``(|a_only - b_only| - 1)^2 / (a_only + b_only)`` on 1 degree of freedom (the correction stops at 0, so
  equal counts give 0). No discordant pairs: no evidence of a difference, p = 1.
- **Difference of two per-record scores** (:func:`paired_difference`): paired percentile bootstrap of
  mean(a) - mean(b) by ``scipy.stats.bootstrap(paired=True)``, 2000 resamples, seed 0, with a bootstrap p-value
  (twice the share of resampled differences at or beyond 0 on the side opposite the observed one, at most 1).
- **Two models' answers** (:func:`compare_models`): each accuracy with its percentile bootstrap interval, McNemar's
  test and the paired bootstrap interval of the accuracy difference; a prediction None counts as wrong, and
  ``significant`` means McNemar's p < 0.05.
- **Across training seeds** (:func:`seed_summary`): mean, sample standard deviation (n - 1), min and max.

The same seed gives the same interval on the same data, so a report regenerated from the same predictions shows
the same numbers.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["RESAMPLES", "SEED", "LEVEL", "proportion_interval", "bootstrap_interval", "bootstrap_metric", "mcnemar",
           "paired_difference", "compare_models", "seed_summary"]

#: bootstrap resamples: enough that the resampling's own error in an interval end (about 0.002 for an accuracy
#: near 0.75 on 200 records) is small beside the interval's width
RESAMPLES = 2000
#: seed of every resampling, so reports are reproducible
SEED = 0
#: two-sided confidence level of every interval
LEVEL = 0.95
#: below this many discordant pairs McNemar's test uses the exact binomial distribution
EXACT_BELOW = 25


def _num(x: Any) -> float | None:
    """A builtin float, None for NaN (not valid JSON)."""
    x = float(x)
    return None if math.isnan(x) else x


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1 (exclusive), got {level!r}")


def _check_resamples(resamples: int) -> None:
    if int(resamples) != resamples or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")


def _column(values: Any) -> np.ndarray:
    """A 1-D array of one column; a list of tuples or mappings stays one object per record."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        items = list(values)
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
    return arr


def _numeric(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must hold numbers: {e}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _binary(values: Any, name: str) -> np.ndarray:
    """Right/wrong per record as booleans; anything but 0/1/True/False is an error (a None would silently count)."""
    arr = _numeric(values, name)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"{name} must hold only 0/1 or True/False")
    return arr.astype(bool)


def _same_length(**columns: Sequence) -> int:
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("columns must have the same length, got " + ", ".join(f"{k}={v}" for k, v in lengths.items()))
    return next(iter(lengths.values()))


def _method(kind: str, resamples: int, seed: int) -> str:
    return f"{kind} bootstrap, {resamples} resamples, seed {seed}"


def proportion_interval(k: int, n: int, level: float = LEVEL) -> dict:
    """Wilson score interval of the share k/n: unlike the normal approximation it stays inside [0, 1] and does not
    collapse to a point at k = 0 or k = n, which small segments of a table often hit. n == 0 gives None."""
    from scipy import stats  # seconds to import: not at start-up

    _check_level(level)
    if int(k) != k or int(n) != n or not 0 <= k <= n:
        raise ValueError(f"need integers 0 <= k <= n, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n == 0:
        return {"estimate": None, "low": None, "high": None, "n": 0, "method": "Wilson score"}
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return {"estimate": k / n, "low": float(ci.low), "high": float(ci.high), "n": n, "method": "Wilson score"}


def _is_vectorized(statistic: Callable) -> bool:
    """scipy's own rule when ``vectorized`` is None: the statistic is vectorised if it takes ``axis``."""
    try:
        return "axis" in inspect.signature(statistic).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return False


def bootstrap_interval(values: Sequence[float], statistic: Callable | None = None, *, resamples: int = RESAMPLES,
                       level: float = LEVEL, seed: int = SEED, method: str = "percentile",
                       vectorized: bool | None = None) -> dict:
    """Bootstrap interval of ``statistic`` (default: the mean, which for 0/1 correctness is accuracy) of one sample.

    ``statistic`` is vectorised when it takes an ``axis`` argument (as ``numpy.mean`` does; thousands of times
    faster), else it is called once per resample; ``vectorized`` overrides the guess. ``method`` is "percentile"
    or "BCa"; when BCa is undefined (a degenerate bootstrap distribution) the percentile interval of the same
    resamples is returned and ``method`` says so. n == 0 gives None for estimate, low and high.
    """
    from scipy import stats  # seconds to import: not at start-up

    _check_level(level)
    _check_resamples(resamples)
    if method not in ("percentile", "BCa"):
        raise ValueError(f"method must be 'percentile' or 'BCa', got {method!r}")
    arr = _numeric(values, "values")
    n = len(arr)
    label = _method(method, resamples, seed)
    if n == 0:
        return {"estimate": None, "low": None, "high": None, "n": 0, "method": label}
    stat = np.mean if statistic is None else statistic
    vec = _is_vectorized(stat) if vectorized is None else vectorized
    estimate = _num(stat(arr, axis=-1) if vec else stat(arr))
    if n == 1 or np.all(arr == arr[0]):
        # every resample is the sample itself: no spread (scipy would refuse n == 1 and BCa would warn and give NaN)
        return {"estimate": estimate, "low": estimate, "high": estimate, "n": n, "method": label}
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's BCa acceleration divides 0 by 0 on such data
        res = stats.bootstrap((arr,), stat, n_resamples=resamples, vectorized=vec, confidence_level=level,
                              method=method, rng=rng)
        low, high = res.confidence_interval
        if method == "BCa" and (math.isnan(low) or math.isnan(high)):
            res = stats.bootstrap((arr,), stat, n_resamples=0, vectorized=vec, confidence_level=level,
                                  method="percentile", bootstrap_result=res)
            low, high = res.confidence_interval
            label = _method("percentile", resamples, seed) + " (BCa undefined for this sample)"
    return {"estimate": estimate, "low": _num(low), "high": _num(high), "n": n, "method": label}


def bootstrap_metric(metric: Callable[..., float], *columns: Sequence, resamples: int = RESAMPLES,
                     level: float = LEVEL, seed: int = SEED, method: str = "percentile", batched: bool = False) -> dict:
    """Percentile interval of ``metric(*columns)`` with the records resampled together (paired), e.g.
    ``bootstrap_metric(macro_f1, gold, pred)``: resampling the columns separately would break the pairing of a
    record's gold label and prediction. The indices are drawn here (``numpy.random.default_rng(seed)``) because
    ``scipy.stats.bootstrap`` takes numeric arrays and labels are strings. ``metric`` is called once per resample;
    with ``batched`` it is called once with every resample at once (each column an array of shape (resamples, n),
    one row per resample) and returns one value per row: the same interval, without a Python loop.
    """
    _check_level(level)
    _check_resamples(resamples)
    if method != "percentile":
        raise ValueError(f"bootstrap_metric supports method='percentile' only, got {method!r}")
    if not columns:
        raise ValueError("bootstrap_metric needs at least one column")
    n = _same_length(**{f"column {i}": c for i, c in enumerate(columns)})
    if n == 0:
        raise ValueError("bootstrap_metric needs at least one record")
    cols = [_column(c) for c in columns]
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    if batched:
        estimate = _num(np.asarray(metric(*(c[None, :] for c in cols)), dtype=float)[0])
        dist = np.asarray(metric(*(c[idx] for c in cols)), dtype=float)
    else:
        estimate = _num(metric(*cols))
        dist = np.array([float(metric(*(c[row] for c in cols))) for row in idx])
    alpha = 1 - level
    if np.isnan(dist).any():
        low = high = None
    else:
        low, high = (_num(x) for x in np.percentile(dist, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    return {"estimate": estimate, "low": low, "high": high, "n": n, "method": _method("paired percentile", resamples,
                                                                                          seed)}


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """McNemar's test of two models scored on the same records: only the records where they disagree carry
    evidence, so it is far more sensitive than comparing two separate accuracy intervals. Exact binomial test below
    25 discordant pairs (the chi-square approximation is poor there), continuity-corrected chi-square from 25 on.

    ``statistic`` is min(a_only, b_only) for the exact test (as statsmodels reports it) and the chi-square value
    otherwise.
    """
    from scipy import stats  # seconds to import: not at start-up

    n = _same_length(a_correct=a_correct, b_correct=b_correct)
    if n == 0:
        raise ValueError("mcnemar needs at least one record")
    a, b = _binary(a_correct, "a_correct"), _binary(b_correct, "b_correct")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    both, neither = int(np.sum(a & b)), int(np.sum(~a & ~b))
    discordant = a_only + b_only
    if discordant == 0:
        statistic, p_value, method = 0.0, 1.0, "McNemar: no discordant pairs, no evidence of a difference (p = 1)"
    elif discordant < EXACT_BELOW:
        statistic = float(min(a_only, b_only))
        p_value = float(stats.binomtest(a_only, discordant, 0.5).pvalue)
        method = f"McNemar exact (two-sided binomial test, {discordant} discordant pairs < {EXACT_BELOW})"
    else:
        statistic = max(abs(a_only - b_only) - 1, 0) ** 2 / discordant
        p_value = float(stats.chi2.sf(statistic, 1))
        method = f"McNemar chi-square with continuity correction, 1 df ({discordant} discordant pairs)"
    return {"n": n, "a_only": a_only, "b_only": b_only, "both": both, "neither": neither,
            "difference": (a_only - b_only) / n, "statistic": float(statistic), "p_value": min(p_value, 1.0),
            "method": method}


def paired_difference(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES, level: float = LEVEL,
                      seed: int = SEED) -> dict:
    """Paired percentile bootstrap of mean(a) - mean(b) for per-record scores of two models on the same records
    (0/1 correctness, or a continuous loss): resampling records, not models, keeps the between-record variation
    that both models share out of the difference.

    ``p_value`` (two-sided bootstrap p-value): with d the observed difference and d* the resampled ones,
    2 * share(d* <= 0) when d > 0, 2 * share(d* >= 0) when d < 0, at most 1; d == 0 gives 1. Its resolution is
    2 / resamples: 0.0 means no resample crossed 0.
    """
    from scipy import stats  # seconds to import: not at start-up

    _check_level(level)
    _check_resamples(resamples)
    n = _same_length(a=a, b=b)
    if n == 0:
        raise ValueError("paired_difference needs at least one record")
    x, y = _numeric(a, "a"), _numeric(b, "b")
    d = x - y
    difference = _num(d.mean())
    method = _method("paired percentile", resamples, seed)
    if n == 1 or np.all(d == d[0]):
        # every resample has the same difference: no spread (scipy refuses n == 1)
        p_value = 1.0 if difference == 0 else 0.0
        return {"difference": difference, "low": difference, "high": difference, "n": n, "p_value": p_value,
                "method": method}

    def diff(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(u, axis=axis) - np.mean(v, axis=axis)

    res = stats.bootstrap((x, y), diff, paired=True, vectorized=True, n_resamples=resamples,
                          confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    dist = res.bootstrap_distribution
    if difference is None:
        p_value = None
    elif difference > 0:
        p_value = min(1.0, 2 * float(np.mean(dist <= 0)))
    elif difference < 0:
        p_value = min(1.0, 2 * float(np.mean(dist >= 0)))
    else:
        p_value = 1.0
    low, high = res.confidence_interval
    return {"difference": difference, "low": _num(low), "high": _num(high), "n": n, "p_value": p_value,
            "method": method}


def compare_models(gold: Sequence, pred_a: Sequence, pred_b: Sequence, *,
                   names: tuple[str, str] = ("a", "b")) -> dict:
    """Two models' answers on the same records, as the report shows them: each accuracy with its bootstrap interval,
    McNemar's test and the paired bootstrap interval of the accuracy difference. A prediction None (unparseable, no
    answer) counts as wrong. ``significant`` is McNemar's p-value < 0.05."""
    n = _same_length(gold=gold, pred_a=pred_a, pred_b=pred_b)
    if n == 0:
        raise ValueError("compare_models needs at least one record")
    right_a = [p is not None and bool(p == g) for g, p in zip(gold, pred_a, strict=True)]
    right_b = [p is not None and bool(p == g) for g, p in zip(gold, pred_b, strict=True)]
    out: dict[str, Any] = {}
    for key, name, right in (("a", names[0], right_a), ("b", names[1], right_b)):
        acc = bootstrap_interval(right)
        out[key] = {"name": str(name), "accuracy": acc["estimate"], "low": acc["low"], "high": acc["high"]}
    out["mcnemar"] = mcnemar(right_a, right_b)
    out["difference"] = paired_difference(right_a, right_b)
    out["significant"] = bool(out["mcnemar"]["p_value"] < 0.05)
    return out


def seed_summary(values: Sequence[float]) -> dict:
    """Spread of one figure across training seeds: the noise of training itself, next to the test split's noise.
    The sample standard deviation (n - 1) is None for fewer than two seeds."""
    arr = _numeric(values, "values")
    n = len(arr)
    if n == 0:
        raise ValueError("seed_summary needs at least one value")
    return {"mean": _num(arr.mean()), "sd": _num(arr.std(ddof=1)) if n >= 2 else None, "min": _num(arr.min()),
            "max": _num(arr.max()), "n": n}
