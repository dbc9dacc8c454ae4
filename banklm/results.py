"""What a run produced, read back from its folder: scores, corpus stats, ledger, distillation figures.

The report (HTML) and the model card (Markdown) both render from :func:`collect`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from banklm.chain import ChainError
from banklm.evaluation.confidence import ECE_FLAG
from banklm.ledger import Ledger, verify_run

# Plot labels are ASCII (no CJK font is guaranteed on a bank's server); tables keep the Chinese labels.


MODEL_ORDER = ("student", "sft", "cpt", "base")

TASK_COLUMNS = ("n", "accuracy", "macro_f1", "mcc", "format_compliance", "hallucination_rate",
                "unsupported_number_rate", "field_binding_error_rate")  # a task row in the report and the model card


def task_rows(tasks: dict) -> list[list[Any]]:
    """One row per task of a results file, then, for a task scored on several data sources, one row per source
    (``credit · bank.csv``, ``credit · synthetic``) with the same metrics: a bank's own rows are read on their
    own, not only inside an average with generated ones."""
    rows = []
    for task, r in (tasks or {}).items():
        rows.append([task, *(r.get(k) for k in TASK_COLUMNS)])
        for source, sr in (r.get("by_source") or {}).items():
            rows.append([f"{task} · {source}", *(sr.get(k) for k in TASK_COLUMNS)])
    return rows  # newest model of a run first (a distilled student is the final one)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def eval_results(run_dir: Path) -> dict[str, dict]:
    """``eval/<model>/results.json`` of a run by model name, the final model first (:data:`MODEL_ORDER`)."""
    folders = sorted((Path(run_dir) / "eval").glob("*"), key=lambda p: (
        MODEL_ORDER.index(p.name) if p.name in MODEL_ORDER else len(MODEL_ORDER), p.name))
    return {p.name: read_json(p / "results.json") for p in folders if (p / "results.json").exists()}


def collect(run_dir: Path) -> dict:
    """Everything the report and the card show, read from the run folder."""
    run_dir = Path(run_dir)
    try:
        entries = Ledger(run_dir).entries()
    except ChainError:
        entries = []
    latest: dict[str, dict] = {}
    for e in entries:
        latest[e["stage"]] = e
    corpora = {}
    cdir = run_dir / "corpora"
    if cdir.is_dir():
        for kind in sorted(p.name for p in cdir.iterdir() if p.is_dir()):
            corpora[kind] = read_json(cdir / kind / "stats.json")
    return {
        "run_dir": run_dir,
        "entries": entries,
        "latest": latest,
        "corpora": corpora,
        "curves": {name: read_jsonl(run_dir / name / "metrics.jsonl") for name in ("cpt", "sft")},
        "summaries": {name: read_json(run_dir / name / "train_summary.json") for name in ("cpt", "sft")},
        "eval": eval_results(run_dir),
        "export": read_json(run_dir / "export" / "verify.json"),
        "retention": read_json(run_dir / "eval" / "retention.json"),
        "instructions": {p.parent.name: read_json(p) for p in sorted((run_dir / "eval").glob("*/instructions.json"))},
        "distill": read_json(run_dir / "distill" / "stats.json"),
        "evidence": read_json(run_dir / "eval" / "evidence.json"),
        "problems": [str(p) for p in verify_run(run_dir, check_card=False)],  # the card is about to be rewritten
    }


DISTILL_METRICS = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("mcc", "MCC"), ("exact_match", "exact match"),
                   ("format_compliance", "format compliance")]


def distill_models(d: dict) -> list[tuple[str, str, dict]]:
    """``(role, eval name, results)`` for teacher, student and baseline, when the run distilled."""
    st = d.get("distill")
    if not st:
        return []
    evals = d["eval"]
    teacher = next((n for n in ("teacher", "sft", "cpt", "base") if n in evals), None)
    out = [("teacher", teacher, evals.get(teacher)), ("student", "student", evals.get("student")),
           ("baseline (no teacher)", "baseline", evals.get("baseline"))]
    return [(role, name, res) for role, name, res in out if name and res]


def distill_tables(d: dict) -> tuple[list[str], list[list[Any]], list[str], list[list[Any]]]:
    """Teacher vs student vs baseline: a size/speed table and a per-task metrics table (read from eval/*)."""
    st = d.get("distill") or {}
    models = distill_models(d)
    steps = {"student": (st.get("student") or {}).get("steps"), "baseline": (st.get("baseline") or {}).get("steps")}
    size_rows = []
    for role, name, res in models:
        ov = res.get("overall", {})
        mb = ov.get("model_bytes")
        size_rows.append([role, name, ov.get("parameters"), round(mb / 1e6, 2) if mb else None, ov.get("tokens_per_s"),
                          ov.get("accuracy"), steps.get(name)])
    size_headers = ["model", "eval name", "parameters", "MB on disk", "generation tokens/s", "overall accuracy",
                    "training steps"]
    task_rows = []
    tasks = sorted({t for _, _, res in models for t in res.get("tasks", {})})
    for task in tasks:
        for role, _, res in models:
            r = res.get("tasks", {}).get(task) or {}
            task_rows.append([task, role, *[r.get(k) for k, _ in DISTILL_METRICS]])
    return size_headers, size_rows, ["task", "model", *[label for _, label in DISTILL_METRICS]], task_rows


# ----------------------------------------------------------------------------------------- the verdict

def _pct(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def flags(d: dict) -> list[dict]:
    """Everything a reviewer must see first: ``{"kind", "what"}`` per raised flag (fairness, counterfactual flips,
    faithfulness, calibration and the abstention target, baselines beating the model, the ledger, reused stages).
    Read from what the run wrote; a file the run did not write raises nothing."""
    out: list[dict] = []
    _, res = next(iter(d.get("eval", {}).items()), (None, None))
    res = res or {}
    for task, r in res.get("tasks", {}).items():
        for attr, f in (r.get("fairness") or {}).items():
            if isinstance(f, dict) and f.get("flag"):
                out.append({"kind": "fairness", "what": f"{task}: favourable-rate ratio {_pct(f.get('ratio'))} by "
                                                        f"{attr} (< 0.8)"})
        if (r.get("unsupported_number_rate") or 0) > 0:
            out.append({"kind": "faithfulness", "what": f"{task}: {_pct(r['unsupported_number_rate'])} of cited "
                                                        "numbers are not in the input"})
        if (r.get("field_binding_error_rate") or 0) > 0:
            out.append({"kind": "faithfulness", "what": f"{task}: {_pct(r['field_binding_error_rate'])} of numbers "
                                                        "written after a field's name are another value"})
        if (r.get("reason_contradiction_rate") or 0) > 0:
            out.append({"kind": "faithfulness", "what": f"{task}: {_pct(r['reason_contradiction_rate'])} of checkable "
                                                        "reasons argue for another label"})
        c = r.get("confidence") or {}
        if (c.get("calibration") or {}).get("flag"):
            out.append({"kind": "calibration", "what": f"{task}: ECE {_pct(c['calibration']['ece'])} > {ECE_FLAG:g}"})
        val = ((res.get("operating_point") or {}).get("tasks", {}).get(task) or {}).get("validation") or {}
        if val.get("met") is False:
            target = (res.get("operating_point") or {}).get("target_accuracy")
            out.append({"kind": "operating point", "what": f"{task}: no threshold reaches accuracy {target} on the "
                                                           f"validation split (best {_pct(val.get('accuracy'))})"})
    ev = d.get("evidence") or {}
    for task, cf in (ev.get("counterfactual") or {}).items():
        for attr in cf.get("flagged", []):
            p = cf["protected"][attr]
            out.append({"kind": "counterfactual", "what": f"{task}: the decision changes with {attr} alone in "
                                                          f"{p['flips']} of {p['n']} swaps ({_pct(p['flip_rate'])})"})
    for task, bs in (ev.get("baselines") or {}).items():
        for name, b in bs.items():
            if b.get("model_worse"):
                sig = "significantly, " if b.get("significantly") else ""
                out.append({"kind": "baseline", "what": f"{task}: {name} beats the model ({sig}"
                                                        f"{_pct(b['baseline']['accuracy'])} vs "
                                                        f"{_pct(b['model']['accuracy'])})"})
    for p in d.get("problems") or []:
        out.append({"kind": "ledger", "what": str(p)})
    reused = [e["stage"] for e in d.get("entries", []) if e.get("status") == "reused"]
    if reused:
        out.append({"kind": "reused stages", "what": ", ".join(reused) + " reused from an earlier run (their "
                                                                         "figures come from that run)"})
    return out
