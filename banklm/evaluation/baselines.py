"""The baselines a model-risk validator compares a fine-tuned model with: the bank's own rule engine (the spec's
rules) and plain scorecards fitted on the same split (scikit-learn).

A fine-tuned model earns its place only when it beats what the bank already has (the rules) and what a
statistician would fit in an afternoon (a logistic scorecard, gradient boosting; a character n-gram model when the
prompt holds free text). Every baseline returns one prediction per test record (``None`` where it cannot answer),
so the caller can run paired tests against the model's predictions on the same records, and the same primary-label
metrics the evaluation reports for the model (:mod:`banklm.evaluation.metrics`, over the task's labels).

Scorecards read the spec's scalar fields from each record's ``meta`` (:func:`feature_table`); protected attributes
(gender, 户籍, an age band) are left out unless asked for, because a scorecard must not read them. A record without
fields (a bank's prompt-only row) has no scalar features: only the TF-IDF model scores it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from threadpoolctl import threadpool_limits

from banklm.evaluation import metrics as M
from banklm.tasks.base import Task, fold_fullwidth, iter_user_messages
from banklm.tasks.registry import get_task
from banklm.tasks.spec import NUMERIC_TYPES
from banklm.tasks.tables import rule_answer

__all__ = ["rule_baseline", "feature_table", "tabular_baselines", "baselines", "MIN_TRAIN", "MISSING"]

#: a scorecard is not fitted on fewer labelled rows than this
MIN_TRAIN = 10
#: the category a missing value gets (its own one-hot column: a value the bank did not give can be telling)
MISSING = "未提供"
MAX_ITER = 5000
#: BLAS/OpenMP threads while fitting: the baselines are tiny, and gradient boosting's OpenMP threads spin in
#: barriers when another job shares the CPU (20x slower on a busy 2-core machine than one thread)
THREADS = 1


# ------------------------------------------------------------------------------------------------ records

def _meta(rec: dict) -> dict:
    m = rec.get("meta")
    if isinstance(m, dict):
        return m
    return json.loads(m) if m else {}


def _fields(task: Task, rec: dict) -> dict | None:
    """The record's input fields (None for a prompt-only row)."""
    return task.fields_from_meta(_meta(rec))


def _gold(task: Task, rec: dict) -> str | None:
    """The record's gold primary label (None for an unlabelled row: predicted, never scored)."""
    if rec.get("label") is not None:
        return rec["label"]
    g = rec.get("gold")
    if isinstance(g, str):
        g = json.loads(g) if g else None
    return task.primary_label(g) if isinstance(g, dict) else None


def _prompt_text(rec: dict) -> str:
    """What the model reads besides the fixed policy: the user turns, full-width folded as serving does."""
    return fold_fullwidth("\n".join(m["content"] for m in iter_user_messages(rec) if m["role"] == "user"))


def _score(task: Task, golds: Sequence[str | None], preds: Sequence[str | None], scored: Sequence[bool]) -> dict:
    """Metrics over the records the baseline could score that have a gold label, as the model's are computed."""
    g = [x for x, s in zip(golds, scored, strict=True) if s and x is not None]
    p = [x for x, gx, s in zip(preds, golds, scored, strict=True) if s and gx is not None]
    labels = task.label_values
    return {"n": len(g), "accuracy": M.accuracy(g, p), "macro_f1": M.macro_f1(g, p, labels),
            "mcc": M.mcc(g, p, labels)}


def _correct(golds: Sequence[str | None], preds: Sequence[str | None], scored: Sequence[bool]) -> list[bool | None]:
    return [None if not s or g is None else (p is not None and p == g)
            for g, p, s in zip(golds, preds, scored, strict=True)]


# ------------------------------------------------------------------------------------------------ rules

def rule_baseline(task: Task | str, records: Sequence[dict]) -> dict:
    """What the bank's rule engine says: the spec's rules on each record's fields.

    On generated data the rules made the gold, so they score 1.0; on a bank's table they may disagree with the
    bank's labels. A prompt-only record has no fields: prediction None, counted in ``skipped`` and left out of the
    metrics. A record on which a rule before the one that fires reads a missing value is ``undecided`` (the rules
    cannot tell, as :func:`banklm.tasks.tables.rule_answer` says): prediction None, scored as wrong. (A table
    record's meta holds None for a hidden, unprotected column, so a rule reading one is undecided on it.)
    """
    t = get_task(task)
    records = list(records)
    golds = [_gold(t, r) for r in records]
    if not t.has_rules:
        none = [None] * len(records)
        return {"name": "rules", "available": False,
                "reason": f"the task {t.name!r} has no rules (its labels come from the bank's table)",
                "predictions": none, "correct": list(none), "skipped": len(records), "undecided": 0,
                "metrics": _score(t, golds, none, [False] * len(records))}
    preds: list[str | None] = []
    scored: list[bool] = []
    undecided = 0
    for rec in records:
        f = _fields(t, rec)
        if f is None:
            preds.append(None)
            scored.append(False)
            continue
        ans, _why = rule_answer(t, f)
        undecided += ans is None
        preds.append(t.primary_label(ans))
        scored.append(True)
    return {"name": "rules", "available": True, "reason": None, "predictions": preds,
            "correct": _correct(golds, preds, scored), "skipped": scored.count(False), "undecided": undecided,
            "metrics": _score(t, golds, preds, scored)}


# ------------------------------------------------------------------------------------------------ features

def _shown(task: Task) -> set[str]:
    """The fields the prompt writes (what the model sees), as the spec check computes them."""
    shown = {n for fact in task.spec.facts for alt in fact for n in alt.names}
    return set(task.field_names) if "fields" in shown else shown


def _float(v: Any) -> float:
    if v is None or isinstance(v, str) and not v.strip():
        return math.nan
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def _day(v: Any) -> float:
    """A date as its ordinal day number (dates are ISO strings in a record's meta)."""
    if isinstance(v, _dt.datetime):
        return float(v.date().toordinal())
    if isinstance(v, _dt.date):
        return float(v.toordinal())
    try:
        return float(_dt.date.fromisoformat(str(v).strip()[:10]).toordinal())
    except ValueError:
        return math.nan


def _plan(task: Task, include_protected: bool) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]]]:
    """``(used {column: how}, excluded {field: why}, categories {column: declared values})``."""
    spec = task.spec
    shown = _shown(task)
    band_of = {b.field: b for b in spec.bands}
    used: dict[str, str] = {}
    excluded: dict[str, str] = {}
    cats: dict[str, list[str]] = {}
    for n, f in spec.fields.items():
        if f.protected and not include_protected:
            excluded[n] = "protected attribute: a scorecard must not read it"
            if n in band_of:
                excluded[band_of[n].into] = f"band of the protected attribute {n!r}"
            continue
        if n not in shown and not f.protected:
            excluded[n] = "not in the prompt: the model never sees it"
            continue
        if f.type == "text":
            excluded[n] = "free text: not a scalar (the TF-IDF model reads it in the prompt)"
            continue
        if f.type in NUMERIC_TYPES:
            used[n] = "numeric"
        elif f.type == "boolean":
            used[n] = "boolean 0/1"
        elif f.type == "date":
            used[n] = "date as ordinal day number"
        elif f.type == "list":
            used[n] = "list: its length"
        elif f.type == "category":
            used[n] = "one-hot"
            cats[n] = list(f.values or [])
        if n in band_of:
            b = band_of[n]
            used[b.into] = f"one-hot band of {n!r}"
            cats[b.into] = [name for name, _top in b.bands]
    return used, excluded, cats


def feature_table(task: Task | str, records: Sequence[dict], *,
                  include_protected: bool = False) -> tuple[list[dict | None], dict]:
    """The spec's scalar fields of each record (None for a prompt-only record) and a description of the columns.

    Numbers (integer/decimal/percent) as floats, booleans 0/1, dates as ordinal days, lists as their length (a
    missing value: NaN); categories and band fields as their value (missing: :data:`MISSING`), one-hot encoded over
    the declared values by the models (undeclared values ignored). Text fields are not scalars; fields the prompt
    does not show are left out (the model never sees them); protected attributes are left out unless
    ``include_protected`` (then all of them, shown or not: a what-if, never a scorecard to deploy).
    """
    t = get_task(task)
    used, excluded, cats = _plan(t, include_protected)
    kinds = {n: f.type for n, f in t.spec.fields.items()}
    rows: list[dict | None] = []
    for rec in records:
        f = _fields(t, rec)
        if f is None:
            rows.append(None)
            continue
        f = dict(f)
        t.spec.derive(f)  # band fields
        row: dict[str, Any] = {}
        for c in used:
            v = f.get(c)
            k = kinds.get(c, "category")  # a band field is not a spec field
            if c in cats:
                row[c] = MISSING if v is None else str(v)
            elif k == "boolean":
                row[c] = math.nan if v is None else float(bool(v))
            elif k == "date":
                row[c] = math.nan if v is None else _day(v)
            elif k == "list":
                row[c] = float(len(v)) if isinstance(v, (list, tuple)) else math.nan
            else:
                row[c] = _float(v)
        rows.append(row)
    numeric = [c for c in used if c not in cats]
    description = {
        "used": used,
        "excluded": excluded,
        "numeric": numeric,
        "categorical": {c: vals + [MISSING] for c, vals in cats.items()},
        "protected": ("included on request (include_protected=True): a what-if, not a scorecard to deploy"
                      if include_protected else
                      "excluded: a scorecard must not read protected attributes (include_protected=True to compare)"),
        "prompt_only": sum(r is None for r in rows),
    }
    return rows, description


# ------------------------------------------------------------------------------------------------ models

def _to_float(x):
    return np.asarray(x, dtype=float)


def _preprocess(desc: dict, scale: bool) -> ColumnTransformer:
    numeric, cats = desc["numeric"], desc["categorical"]
    parts = []
    if numeric:
        steps = [FunctionTransformer(_to_float)]
        if scale:  # gradient boosting reads NaN natively; the linear model needs values and a missingness flag
            steps += [SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True), StandardScaler()]
        parts.append(("numeric", make_pipeline(*steps), list(range(len(numeric)))))
    if cats:
        enc = OneHotEncoder(categories=list(cats.values()), handle_unknown="ignore", sparse_output=False)
        parts.append(("categorical", enc, list(range(len(numeric), len(numeric) + len(cats)))))
    return ColumnTransformer(parts)


def _matrix(rows: Sequence[dict], desc: dict) -> np.ndarray:
    cols = list(desc["numeric"]) + list(desc["categorical"])
    x = np.empty((len(rows), len(cols)), dtype=object)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            x[i, j] = r[c]
    return x


def _entry(name: str, desc: dict, n_test: int, reason: str | None = None) -> dict:
    return {"name": name, "available": reason is None, "reason": reason, "features": desc,
            "predictions": [None] * n_test, "correct": [None] * n_test, "skipped": 0,
            "metrics": {"n": 0, "accuracy": 0.0, "macro_f1": 0.0, "mcc": 0.0}, "train_n": 0, "seconds": 0.0}


def _not_fittable(y: Sequence[str], what: str) -> str | None:
    if len(y) < MIN_TRAIN:
        return f"{len(y)} labelled training rows {what}, fewer than {MIN_TRAIN}"
    if len(set(y)) < 2:
        return f"the training rows {what} hold a single class ({y[0]!r}): nothing to learn"
    return None


def _fit_predict(task: Task, name: str, model, x_train, y_train: list[str], x_test, test_ok: list[bool],
                 golds: list[str | None], desc: dict, what: str) -> dict:
    """Fit ``model`` on the rows given, predict the test records marked ``test_ok`` (the rest: None, skipped)."""
    n_test = len(golds)
    why = _not_fittable(y_train, what)
    if why is not None:
        out = _entry(name, desc, n_test, why)
        out["train_n"] = len(y_train)
        out["skipped"] = n_test
        return out
    start = time.perf_counter()
    preds: list[str | None] = [None] * n_test
    try:
        with threadpool_limits(THREADS):
            model.fit(x_train, np.asarray(y_train, dtype=object))
            if len(x_test):
                got = iter(str(p) for p in model.predict(x_test))
                preds = [next(got) if ok else None for ok in test_ok]
    except ValueError as e:  # data scikit-learn cannot fit (e.g. a column with no value at all): said, not raised
        out = _entry(name, desc, n_test, f"scikit-learn could not fit it: {e}")
        out.update(train_n=len(y_train), skipped=n_test)
        return out
    seconds = time.perf_counter() - start
    out = _entry(name, desc, n_test)
    out.update(predictions=preds, correct=_correct(golds, preds, test_ok), skipped=test_ok.count(False),
               metrics=_score(task, golds, preds, test_ok), train_n=len(y_train), seconds=round(seconds, 3))
    return out


def _text_shown(task: Task) -> bool:
    """Whether the prompt writes free text (a text field, or a list whose records have one) that the scalar
    table cannot read."""
    shown = _shown(task)
    return any(f.type == "text" or (f.type == "list" and any(s.type == "text" for s in (f.fields or {}).values()))
               for n, f in task.spec.fields.items() if n in shown)


def tabular_baselines(task: Task | str, train_records: Sequence[dict], test_records: Sequence[dict], *, seed: int = 0,
                      include_protected: bool = False) -> list[dict]:
    """Scorecards fitted on ``train_records`` and scored on ``test_records``: ``logistic_regression`` (standardised
    numbers + one-hot) and ``gradient_boosting`` (HistGradientBoosting) on :func:`feature_table`, plus
    ``tfidf_logistic_regression`` on the user prompt's character 1-3 grams when the prompt shows free text (a
    text field, a list with text in its records: the scalar table cannot read it) or some records are prompt-only
    (nothing else can score them).

    Scalar models skip prompt-only records (``skipped``; prediction None; not in the metrics). A model whose
    labelled training rows are fewer than :data:`MIN_TRAIN` or hold one class is ``available: False`` with the
    reason. Deterministic for a ``seed``.
    """
    t = get_task(task)
    train_records, test_records = list(train_records), list(test_records)
    rows_tr, desc = feature_table(t, train_records, include_protected=include_protected)
    rows_te, _ = feature_table(t, test_records, include_protected=include_protected)
    desc = {**desc, "prompt_only": sum(r is None for r in rows_tr) + sum(r is None for r in rows_te)}
    y_all = [_gold(t, r) for r in train_records]
    golds = [_gold(t, r) for r in test_records]
    n_test = len(test_records)

    keep = [i for i, (r, y) in enumerate(zip(rows_tr, y_all, strict=True)) if r is not None and y is not None]
    y_tr = [y_all[i] for i in keep]
    test_ok = [r is not None for r in rows_te]
    have_columns = bool(desc["numeric"] or desc["categorical"])
    x_tr = _matrix([rows_tr[i] for i in keep], desc) if have_columns else None
    x_te = _matrix([r for r in rows_te if r is not None], desc) if have_columns else None
    models = {
        "logistic_regression": lambda: Pipeline([("features", _preprocess(desc, scale=True)),
                                                 ("model", LogisticRegression(max_iter=MAX_ITER))]),
        "gradient_boosting": lambda: Pipeline([("features", _preprocess(desc, scale=False)),
                                               ("model", HistGradientBoostingClassifier(random_state=seed))]),
    }
    out = []
    for name, make in models.items():
        if not have_columns:
            e = _entry(name, desc, n_test, "no scalar features (every field is text, hidden or protected)")
            e["skipped"] = n_test
            out.append(e)
            continue
        out.append(_fit_predict(t, name, make(), x_tr, y_tr, x_te, test_ok, golds, desc, "with fields"))

    prompt_only = desc["prompt_only"] > 0
    if _text_shown(t) or prompt_only:
        tdesc = {"used": {"prompt": "character 1-3 gram TF-IDF of the user turns (full-width folded)"},
                 "excluded": {"system": "the policy text: the same in every record"},
                 "why": "the prompt shows free-text fields" if _text_shown(t) else "some records are prompt-only"}
        keep_t = [i for i, y in enumerate(y_all) if y is not None]
        model = Pipeline([("features", TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)),
                          ("model", LogisticRegression(max_iter=MAX_ITER))])
        out.append(_fit_predict(t, "tfidf_logistic_regression", model, [_prompt_text(train_records[i]) for i in keep_t],
                                [y_all[i] for i in keep_t], [_prompt_text(r) for r in test_records], [True] * n_test,
                                golds, tdesc, "with a prompt"))
    return out


def baselines(task: Task | str, train_records: Sequence[dict], test_records: Sequence[dict], *,
              seed: int = 0) -> dict:
    """The rule engine on the test records and the scorecards fitted on the train records, with the test ids (the
    order of every ``predictions`` list), ready to pair with the model's predictions."""
    test_records = list(test_records)
    return {"rules": rule_baseline(task, test_records),
            "tabular": tabular_baselines(task, train_records, test_records, seed=seed),
            "test_ids": [r.get("id", str(i)) for i, r in enumerate(test_records)]}
