"""Confidence a bank can act on: calibration, abstention (转人工), operating points and costs of a model's answers.

Everything here reads label scoring (:mod:`banklm.evaluation.labelscore`, the ``label_scores`` of a prediction
row) and computes its statistics with :mod:`banklm.evaluation.calibration`; it scores nothing itself.

Definitions (docs/evaluation.md, "Confidence and abstention"):

- **distribution**: the probability of each primary value under label scoring (the marginal of the allowed
  answer combinations), temperature-scaled when a temperature was fitted on the validation split.
- **confidence**: the distribution's probability of the primary value the model answered (an unparseable
  answer has confidence 0 and is wrong).
- **abstention** (not answered), two kinds: ``model``: the model answered the spec's abstain value
  (``answer.abstain``, e.g. 无法判断); ``threshold``: the confidence is below the operating point's threshold,
  so the answer becomes the abstain value (:data:`HANDOFF` 转人工 when the spec declares none). Coverage =
  answered / all cases; accuracy is measured on the answered cases.
- **positive score** (a task with ``answer.positive``, aml 可疑): the probability that ``positive_key`` takes
  the positive value; operating points fix its false-positive rate.

The operating point (:data:`OPERATING_POINT_FILE`) holds, per task, the temperature and the threshold chosen
on the validation split; it travels with the model into the export bundle and is applied wherever the model
is scored (PyTorch, ONNX, llama.cpp).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from banklm.evaluation import calibration as C
from banklm.evaluation import metrics as M
from banklm.io import atomic_write_json
from banklm.tasks import get_task
from banklm.tasks.base import Task

__all__ = ["OPERATING_POINT_FILE", "HANDOFF", "FPR_POINTS", "ECE_FLAG", "primary_distribution", "confidence_rows",
           "fit_operating_point", "confidence_metrics", "abstention_at", "save_operating_point",
           "load_operating_point", "find_operating_point"]

OPERATING_POINT_FILE = "operating_point.json"
#: what a case below the threshold becomes when the spec declares no abstain value
HANDOFF = "转人工"
#: false-positive rates the operating-point table reports recall at
FPR_POINTS = (0.01, 0.05)
#: an expected calibration error above this is flagged in the report and the model card
ECE_FLAG = 0.05


def _task(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def primary_distribution(label_scores: Mapping, task: Task | str) -> dict[str, float]:
    """The primary key's marginal over the allowed combinations of one record's label scores."""
    key = _task(task).primary_key
    dist: dict[str, float] = {}
    for combo, p in label_scores["combos"]:
        v = combo.get(key)
        if v is not None:
            dist[v] = dist.get(v, 0.0) + float(p)
    return dist


def _positive_score(label_scores: Mapping, task: Task) -> float | None:
    if task.positive is None:
        return None
    return sum(float(p) for c, p in label_scores["combos"] if c.get(task.positive_key) == task.positive)


def confidence_rows(predictions: Sequence[Mapping]) -> list[dict]:
    """One row per prediction that has label scores: ``task``, ``gold`` (primary), ``answer`` (the primary value
    answered, None if unparseable), ``distribution``, ``positive_score``, ``gold_positive`` and ``answered_positive``
    (detection tasks), ``model_abstained``. Rows without label scores (free decoding) are left out."""
    rows = []
    for p in predictions:
        ls = p.get("label_scores")
        if not ls:
            continue
        task = _task(p["task"])
        gold = p["gold"] if isinstance(p["gold"], Mapping) else json.loads(p["gold"])
        parsed = p.get("parsed")
        answer = p.get("pred_label", p.get("scored_label"))
        row = {"task": task.name, "gold": gold.get(task.primary_key), "answer": answer,
               "distribution": primary_distribution(ls, task),
               "model_abstained": task.abstain is not None and answer == task.abstain}
        if task.positive is not None and task.positive_key in gold:
            chosen = parsed if parsed is not None else p.get("scored") or {}
            row.update({"positive_score": _positive_score(ls, task),
                        "gold_positive": gold[task.positive_key] == task.positive,
                        "answered_positive": chosen.get(task.positive_key) == task.positive})
        rows.append(row)
    return rows


def _scaled(rows: Sequence[Mapping], temperature: float | None) -> list[dict]:
    if not temperature or temperature == 1.0:
        return [dict(r["distribution"]) for r in rows]
    return [C.apply_temperature(r["distribution"], temperature) for r in rows]


def _confidences(rows: Sequence[Mapping], dists: Sequence[Mapping[str, float]]) -> list[float]:
    """Each row's confidence: its (scaled) distribution's probability of the answered value."""
    return [d.get(r["answer"], 0.0) if r["answer"] is not None else 0.0 for r, d in zip(rows, dists, strict=True)]


def _correct(rows: Sequence[Mapping]) -> list[bool]:
    return [r["answer"] is not None and r["answer"] == r["gold"] for r in rows]


def fit_operating_point(rows: Sequence[Mapping], *, target_accuracy: float | None = None,
                        min_confidence: float | None = None, temperature: bool = True,
                        source: str = "validation") -> dict:
    """Per task, from validation rows (:func:`confidence_rows`): the temperature (``temperature``: fitted by
    :func:`~banklm.evaluation.calibration.fit_temperature`, else 1) and the threshold (chosen for
    ``target_accuracy`` on the answered cases, or ``min_confidence``), with what they give on those rows."""
    if (target_accuracy is None) == (min_confidence is None):
        raise ValueError("fit_operating_point: give target_accuracy or min_confidence (one of them)")
    tasks = {}
    for name, rs in sorted(M.by_task(rows).items()):
        task = _task(name)
        fit = C.fit_temperature([r["distribution"] for r in rs], [r["gold"] for r in rs]) if temperature else None
        t = fit["temperature"] if fit else 1.0
        conf, correct = _confidences(rs, _scaled(rs, t)), _correct(rs)
        answered = [not r["model_abstained"] for r in rs]
        if target_accuracy is not None:
            chosen = C.choose_threshold(conf, correct, target_accuracy, answered=answered)
            threshold, rule = chosen["threshold"], f"the lowest confidence with accuracy >= {target_accuracy:g} " \
                f"on the answered {source} cases"
        else:
            threshold, rule = float(min_confidence), f"fixed min_confidence {min_confidence:g}"
        at = _abstention(rs, conf, threshold)
        tasks[name] = {"threshold": threshold, "temperature": t, "temperature_fit": fit, "rule": rule,
                       "abstain_value": task.abstain or HANDOFF,
                       source: {"n": len(rs), "coverage": at["coverage"], "accuracy": at["accuracy"],
                                **({"met": at["accuracy"] is not None and at["accuracy"] >= target_accuracy}
                                   if target_accuracy is not None else {})}}
    return {"version": 1, "confidence": "label scoring's probability of the answered primary value, "
            "temperature-scaled", "target_accuracy": target_accuracy, "min_confidence": min_confidence,
            "fitted_on": source, "tasks": tasks}


def abstention_at(rows: Sequence[Mapping], point: Mapping | None, task: Task | str) -> dict:
    """Coverage and accuracy on the answered cases of ``rows`` (one task) at a task's operating point (None: no
    threshold, only the model's own abstentions)."""
    point = point or {}
    return _abstention(rows, _confidences(rows, _scaled(rows, point.get("temperature"))), point.get("threshold"))


def _abstention(rows: Sequence[Mapping], conf: Sequence[float], threshold: float | None) -> dict:
    by_threshold = C.apply_threshold(conf, threshold)
    n = len(rows)
    answered = [a and not r["model_abstained"] for a, r in zip(by_threshold, rows, strict=True)]
    k = sum(answered)
    right = sum(1 for a, c in zip(answered, _correct(rows), strict=True) if a and c)
    return {"threshold": threshold, "n": n, "answered": k, "answered_right": right,
            "coverage": k / n if n else None, "accuracy": right / k if k else None,
            "abstained_model": sum(1 for r in rows if r["model_abstained"]),
            "abstained_threshold": sum(1 for a, r in zip(by_threshold, rows, strict=True)
                                       if not a and not r["model_abstained"])}


def _handed_off(rows: Sequence[Mapping], conf: Sequence[float], threshold: float | None,
                task: Task) -> list[str | None]:
    """The answers at the operating point: below the threshold, the abstain value."""
    keep = C.apply_threshold(conf, threshold)
    return [r["answer"] if k else (task.abstain or HANDOFF) for r, k in zip(rows, keep, strict=True)]


def _operating_points(rows: Sequence[Mapping], task: Task) -> dict:
    """Detection: recall at fixed false-positive rates, the model's own decision, alerts per 1,000 cases at the
    spec's real-world prevalence (re-weighted by :func:`~banklm.evaluation.calibration.prevalence_weights`)."""
    rs = [r for r in rows if "positive_score" in r]
    scores = [r["positive_score"] for r in rs]
    gold_pos = [r["gold_positive"] for r in rs]
    n_pos, n_neg = sum(gold_pos), len(rs) - sum(gold_pos)
    flagged = [r["answered_positive"] for r in rs]
    tp = sum(1 for f, g in zip(flagged, gold_pos, strict=True) if f and g)
    fp = sum(1 for f, g in zip(flagged, gold_pos, strict=True) if f and not g)
    decision = {"recall": tp / n_pos if n_pos else None, "fpr": fp / n_neg if n_neg else None,
                "precision": tp / (tp + fp) if tp + fp else None, "alerts": tp + fp}
    out = {"key": task.positive_key, "value": task.positive, "n": len(rs), "n_positive": n_pos,
           "n_negative": n_neg, "decision": decision,
           "at_fpr": [C.recall_at_fpr(scores, gold_pos, f) for f in FPR_POINTS]}
    prevalence = task.prevalence
    if prevalence and rs:
        try:
            weights = C.prevalence_weights([r["gold"] for r in rs], prevalence)
        except ValueError as e:  # a declared label absent from these records: no re-weighting reaches it
            out["prevalence"] = {"positive": None, "declared": dict(prevalence), "not_estimable": str(e)}
            return out
        w_pos = sum(w for w, g in zip(weights, gold_pos, strict=True) if g) / sum(weights)
        out["prevalence"] = {"positive": w_pos, "declared": dict(prevalence)}
        out["decision"]["alerts_per_1000"] = (1000 * sum(w for w, f in zip(weights, flagged, strict=True) if f)
                                              / sum(weights))
        for pt in out["at_fpr"]:
            pt["alerts_per_1000"] = (C.alerts_per_1000(pt["recall"], pt["fpr"], w_pos)
                                     if pt.get("estimable") and pt["recall"] is not None else None)
    return out


def confidence_metrics(rows: Sequence[Mapping], task: Task | str, point: Mapping | None = None, *,
                       bins: int = 10) -> dict:
    """Every confidence statistic of one task's rows at its operating point ``point`` (a task entry of
    :func:`fit_operating_point`, or None): calibration (ECE and its bins, Brier, ROC-AUC and PR-AUC of the
    primary distribution), abstention and the risk-coverage curve, operating points (detection tasks), the
    expected cost (a spec with ``evaluation.costs``) and the favourable-error rates (a spec with
    ``answer.favourable``: credit's bad approvals and missed escalations)."""
    task = _task(task)
    point = point or {}
    t = point.get("temperature")
    dists = _scaled(rows, t)
    conf, correct = _confidences(rows, dists), _correct(rows)
    gold = [r["gold"] for r in rows]
    answers = [r["answer"] for r in rows]
    rel = C.reliability(conf, correct, n_bins=bins)
    out = {
        "n": len(rows),
        "temperature": t,
        "calibration": {"ece": rel["ece"], "mce": rel["mce"], "scheme": rel["scheme"], "bins": rel["bins"],
                        "brier": C.brier(conf, correct),
                        "multiclass_brier": C.multiclass_brier(dists, gold),
                        "mean_confidence": sum(conf) / len(conf) if conf else None,
                        "accuracy": sum(correct) / len(correct) if correct else None,
                        "flag": rel["ece"] is not None and rel["ece"] > ECE_FLAG,
                        **C.ranking(dists, gold, task.label_values,
                                    positive=task.positive if task.positive_key == task.primary_key else None)},
        "abstention": {**_abstention(rows, conf, point.get("threshold")), "abstain_value": task.abstain or HANDOFF,
                       "risk_coverage": C.risk_coverage(conf, correct,
                                                        answered=[not r["model_abstained"] for r in rows])},
    }
    if task.positive is not None:
        out["operating_points"] = _operating_points(rows, task)
    if task.costs:
        handoff = task.abstain or HANDOFF  # a handed-off case costs the spec's handoff_cost unless costs name it
        with_handoff = {g: {handoff: task.handoff_cost, **row} for g, row in task.costs.items()}
        for g in task.label_values:
            with_handoff.setdefault(g, {handoff: task.handoff_cost})
        at = _handed_off(rows, conf, point.get("threshold"), task)
        out["costs"] = {"answers": C.expected_cost(gold, answers, task.costs, task.prevalence or None),
                        "at_threshold": C.expected_cost(gold, at, with_handoff, task.prevalence or None),
                        "handoff_cost": task.handoff_cost}
    if task.favourable is not None:
        out["favourable_errors"] = C.favourable_error_rates(gold, answers, task.favourable)
    return out


def save_operating_point(folder: str | Path, point: Mapping) -> Path:
    path = Path(folder) / OPERATING_POINT_FILE
    atomic_write_json(path, dict(point))
    return path


def load_operating_point(path: str | Path) -> dict:
    """Read an operating point file; a clear error when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable operating point ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise ValueError(f"{path}: not an operating point (no 'tasks' object)")
    for name, entry in data["tasks"].items():
        th = entry.get("threshold") if isinstance(entry, dict) else "?"
        if th is not None and not (isinstance(th, int | float) and 0.0 <= th <= 1.0 + 1e-9):
            raise ValueError(f"{path}: tasks.{name}.threshold must be a probability or null, got {th!r}")
    return data


def find_operating_point(path: str | Path) -> dict | None:
    """The operating point that travels with a model folder or an exported artefact: ``operating_point.json``
    in the folder itself, or in a parent up to the export bundle's root (the folder with ``SHA256SUMS``)."""
    path = Path(path).resolve()
    folder = path if path.is_dir() else path.parent
    if (folder / OPERATING_POINT_FILE).is_file():
        return load_operating_point(folder / OPERATING_POINT_FILE)
    for d in list(folder.parents)[:3]:  # export/onnx/<type>/, export/gguf/: the bundle root is 1-2 levels up
        if (d / "SHA256SUMS").is_file():
            f = d / OPERATING_POINT_FILE
            return load_operating_point(f) if f.is_file() else None
    return None
