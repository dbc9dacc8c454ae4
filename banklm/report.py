"""The run report (``report/index.html`` + PNG plots) and ``MODEL_CARD.md``, built from the run folder.

Everything shown is read from files the stages wrote (ledger, stats, metrics, results, verify):
no number is typed in here. A section whose stage did not run says so instead of inventing one.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from banklm.evaluation.confidence import ECE_FLAG
from banklm.io import atomic_dir, atomic_write_text
from banklm.modelcard import decoding_rows, instruction_rows, interval_text, render_model_card, threshold_rows
from banklm.results import (
    collect,
    distill_models,
    distill_tables,
    flags,
    task_rows,
)

# Plot labels are ASCII (no CJK font is guaranteed on a bank's server); tables keep the Chinese labels.
LABEL_EN = {
    "通过": "approve", "拒绝": "reject", "人工复核": "review",
    "可疑": "suspicious", "正常": "normal", "无": "none", "拆分交易": "structuring", "快进快出": "rapid in-out",
    "分散转入集中转出": "fan-in/out", "与高风险地区往来": "high-risk region", "与身份不符的大额现金": "cash vs profile",
    "循环交易": "circular", "发票不合规": "invoice", "超标准报销": "over-limit", "拆分审批": "split approval",
    "关联交易未披露": "related party", "无异常": "no issue", "(unparsed)": "(unparsed)",
}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------------------- data

def eval_rows(results: dict) -> list[list[Any]]:
    return task_rows((results or {}).get("tasks", {}))


def comparison(evals: dict[str, dict]) -> tuple[list[str], list[list[Any]]]:
    """One row per evaluated model: per-task label accuracy, overall accuracy, tokens/s, size."""
    tasks = sorted({t for r in evals.values() for t in (r or {}).get("tasks", {})})
    rows = []
    for name, r in evals.items():
        ov = (r or {}).get("overall", {})
        rows.append([name, *[(r["tasks"].get(t) or {}).get("accuracy") for t in tasks], ov.get("accuracy"),
                     ov.get("format_compliance"), ov.get("tokens_per_s"), ov.get("model_bytes")])
    return ["model", *tasks, "overall", "format compliance", "tokens/s", "bytes on disk"], rows


# hallucination_rate: share of answers citing >= 1 number absent from the prompt; unsupported_number_rate:
# share of cited numbers absent from it (the column used to show the former under the latter's name)
EVAL_HEADERS = ["task", "n", "accuracy", "macro-F1", "MCC", "format compliance", "answers with unsupported numbers",
                "unsupported-number rate", "field-binding error rate"]


# ----------------------------------------------------------------------------------------- plots

def _save(plt, fig, path: Path) -> Path:
    """Lay out, write the PNG and free the figure (every plot of the report ends here)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[dict]], path: Path) -> Path | None:
    series = {k: [(r["step"], r["loss"]) for r in v if r.get("loss") is not None and r.get("step") is not None]
              for k, v in curves.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.4), squeeze=False)
    for ax, (name, pts) in zip(axes[0], series.items(), strict=True):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label="train loss")
        ev = [(r["step"], r["eval_loss"]) for r in curves[name] if r.get("eval_loss") is not None]
        if ev:
            ax.plot([p[0] for p in ev], [p[1] for p in ev], "o-", label="eval loss")
        ax.set_title({"cpt": "continued pre-training", "sft": "supervised fine-tuning"}.get(name, name))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(plt, fig, path)


def plot_eval(results: dict, path: Path) -> Path | None:
    tasks = (results or {}).get("tasks", {})
    if not tasks:
        return None
    plt = _plt()
    names = list(tasks)
    metrics = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("format_compliance", "format")]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        vals = [tasks[t].get(key) or 0.0 for t in names]
        xs = [j + i * width for j in range(len(names))]
        bars = ax.bar(xs, vals, width, label=label)
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks([j + width * (len(metrics) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylim(0, 1.1)
    ax.set_title("held-out task scores")
    ax.legend(fontsize=8, loc="lower right")
    return _save(plt, fig, path)


def plot_confusions(results: dict, path: Path) -> Path | None:
    tasks = {t: r for t, r in (results or {}).get("tasks", {}).items() if r.get("confusion")}
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, (task, r) in zip(axes[0], tasks.items(), strict=True):
        conf = r["confusion"]
        labels, matrix = conf["labels"], conf["matrix"]
        ax.imshow(matrix, cmap="Blues")
        short = [LABEL_EN.get(lbl, lbl) for lbl in labels]
        ax.set_xticks(range(len(labels)), short, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), short, fontsize=7)
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(task)
    return _save(plt, fig, path)


def _confidence_tasks(results: dict | None) -> dict[str, dict]:
    return {t: r["confidence"] for t, r in (results or {}).get("tasks", {}).items() if r.get("confidence")}


def plot_reliability(results: dict, path: Path) -> Path | None:
    """Reliability diagram per task: accuracy against mean confidence in each bin (the diagonal is perfect
    calibration), with the number of answers per bin."""
    tasks = _confidence_tasks(results)
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.6), squeeze=False)
    for ax, (task, c) in zip(axes[0], tasks.items(), strict=True):
        bins = [b for b in c["calibration"]["bins"] if b["n"]]
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect")
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins],
               width=[(b["hi"] - b["lo"]) * 0.9 for b in bins], alpha=0.35, label="accuracy per bin")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label="(confidence, accuracy)")
        for b in bins:
            ax.text((b["lo"] + b["hi"]) / 2, min(1.0, b["accuracy"] + 0.03), str(b["n"]), ha="center", fontsize=6)
        ece = c["calibration"]["ece"]
        ax.set_title(f"{task}: ECE {ece:.3f}" + (f"  (> {ECE_FLAG:g})" if c["calibration"].get("flag") else ""), fontsize=9,
                     color="#cf222e" if c["calibration"].get("flag") else "black")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    return _save(plt, fig, path)


def plot_risk_coverage(results: dict, path: Path) -> Path | None:
    """Accuracy on the answered cases against coverage as the threshold falls, per task; the dot is the
    operating point the model ships with."""
    tasks = _confidence_tasks(results)
    if not tasks:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for task, c in tasks.items():
        pts = c["abstention"]["risk_coverage"]["points"]
        line = ax.plot([p["coverage"] for p in pts], [p["accuracy"] for p in pts], label=task)[0]
        a = c["abstention"]
        if a.get("coverage") is not None and a.get("accuracy") is not None:
            ax.plot([a["coverage"]], [a["accuracy"]], "o", color=line.get_color())
    target = (results.get("operating_point") or {}).get("target_accuracy")
    if target:
        ax.axhline(target, ls="--", color="grey", lw=1, label=f"target {target:g}")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("coverage (answered / all)")
    ax.set_ylabel("accuracy on answered cases")
    ax.set_title("risk-coverage (dot: the shipped threshold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def render_confidence_section(res: dict, plots: dict[str, Path | None]) -> str:
    """The final model's confidences: calibration, the abstention rule and what it gives, operating points,
    costs (banklm.evaluation.confidence)."""
    tasks = _confidence_tasks(res)
    skipped = {t: r["confidence_skipped"] for t, r in res.get("tasks", {}).items() if r.get("confidence_skipped")}
    if not tasks:
        return ("<p class=muted>no confidence check: " + html.escape("; ".join(f"{t}: {w}" for t, w in
                                                                                skipped.items()) or "not run")
                + "</p>") if skipped else ""
    op = res.get("operating_point") or {}
    parts = ["<h4>Confidence, abstention (转人工) and operating points</h4>",
             "<p class=muted>confidence = label scoring's probability of the answered primary label"
             + (", temperature-scaled on the validation split" if any(c.get("temperature") not in (None, 1.0)
                                                                       for c in tasks.values()) else "")
             + "; " + html.escape(next(iter(tasks.values()))["calibration"]["scheme"]) + "; abstention rule: "
             + html.escape(next(iter(op.get("tasks", {}).values()), {}).get("rule", "none")) + "</p>"]
    flags = [f"{t}: ECE {c['calibration']['ece']:.3f} > {ECE_FLAG:g}" for t, c in tasks.items() if c["calibration"].get("flag")]
    if flags:
        parts.append("<p class=bad>miscalibrated: " + html.escape("; ".join(flags)) + "</p>")
    rows = []
    for t, c in tasks.items():
        cal, ab = c["calibration"], c["abstention"]
        val = (op.get("tasks", {}).get(t) or {}).get("validation") or {}
        rows.append([t, c["n"], cal["accuracy"], cal["mean_confidence"], cal["ece"], cal["brier"], cal["roc_auc"],
                     cal["pr_auc"], c.get("temperature"), ab["threshold"], ab["coverage"], ab["accuracy"],
                     val.get("coverage"), val.get("accuracy"), f"ECE > {ECE_FLAG:g}" if cal.get("flag") else "ok"])
    parts.append(_table(["task", "n", "accuracy", "mean confidence", "ECE", "Brier", "ROC-AUC", "PR-AUC",
                         "temperature", "threshold", "coverage", "accuracy answered", "validation coverage",
                         "validation accuracy", "calibration"], rows))
    parts.append(_img(plots.get("reliability"), "reliability diagrams"))
    parts.append(_img(plots.get("risk_coverage"), "risk-coverage curves"))
    op_rows = []
    for split, source in (("test", res), ("test_prevalence", res.get("test_prevalence") or {})):
        for t, c in _confidence_tasks(source).items():
            o = c.get("operating_points")
            if not o:
                continue
            dec = o["decision"]
            cells = [split, t, f"{o['key']}={o['value']}", o["n_positive"], o["n_negative"], dec["recall"], dec["fpr"],
                     dec["precision"], dec.get("alerts_per_1000")]
            for pt in o["at_fpr"]:
                cells.append(pt["recall"] if pt["estimable"] else "not estimable")
                cells.append(pt.get("alerts_per_1000") if pt["estimable"] else "–")
            op_rows.append(cells)
    if op_rows:
        parts.append("<p class=muted>detection: the model's own decision, and recall at fixed false-positive rates "
                     "of its positive score (not estimable with fewer than 10/FPR negatives); alerts per 1,000 cases "
                     "re-weighted to the spec's real-world prevalence</p>")
        parts.append(_table(["split", "task", "positive", "positives", "negatives", "recall", "FPR", "precision",
                             "alerts/1000", "recall @1% FPR", "alerts/1000 @1%", "recall @5% FPR",
                             "alerts/1000 @5%"], op_rows))
    cost_rows = []
    for t, c in tasks.items():
        if c.get("costs"):
            a, b = c["costs"]["answers"], c["costs"]["at_threshold"]
            cost_rows.append([t, a["per_case"], a.get("reweighted"), b["per_case"], b.get("reweighted"),
                              c["costs"]["handoff_cost"]])
        for g, e in (c.get("favourable_errors") or {}).items():
            cost_rows.append([t, f"gold {g} answered favourable", e["rate"], f"{e['n_favourable']}/{e['n']}", "", ""])
    if cost_rows:
        parts.append(_table(["task", "expected cost per case (answers) / error", "re-weighted to prevalence",
                             "at the threshold", "at the threshold, re-weighted", "handoff cost"], cost_rows))
    return "\n".join(parts)


def plot_labels(corpora: dict, path: Path) -> Path | None:
    sc = (corpora or {}).get("scenario")
    if not sc or "by_label" not in sc:
        return None
    by_task = sc["by_label"].get("train", {})
    if not by_task:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(by_task), figsize=(4 * len(by_task), 3.2), squeeze=False)
    for ax, (task, counts) in zip(axes[0], by_task.items(), strict=True):
        labels = list(counts)
        ax.bar(range(len(labels)), [counts[lbl] for lbl in labels])
        ax.set_xticks(range(len(labels)), [LABEL_EN.get(lbl, lbl) for lbl in labels], rotation=45, ha="right",
                      fontsize=7)
        ax.set_title(f"{task}: training labels")
    return _save(plt, fig, path)


def plot_timings(entries: list[dict], path: Path) -> Path | None:
    """Wall time per stage; a reused stage shows, in grey, the time it took when it ran."""
    rows = [(f"{e.get('seq')} {e.get('stage')}", float((e.get("reused_from") or {}).get("wall_s") or e.get("wall_s")
                                                        or 0.0), e.get("status")) for e in entries]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(rows) + 1.2))
    ys = range(len(rows))
    ax.barh(ys, [r[1] for r in rows], color=["#8c959f" if r[2] == "reused" else "#0969da" for r in rows])
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    for y, (_, secs, status) in zip(ys, rows, strict=True):
        ax.text(secs, y, f" {secs:.1f} s" + (" when it ran (reused now)" if status == "reused" else ""), va="center",
                fontsize=7)
    ax.set_xlabel("wall time (s)")
    ax.set_title("stage timings")
    return _save(plt, fig, path)


def plot_corpus_sizes(corpora: dict, path: Path) -> Path | None:
    """Records per corpus kind and split."""
    sizes = {}
    for kind, st in (corpora or {}).items():
        splits = (st or {}).get("splits") or {}
        sizes[kind] = {s: (v.get("total") if isinstance(v, dict) else v) for s, v in splits.items()}
    sizes = {k: v for k, v in sizes.items() if any(isinstance(n, int) for n in v.values())}
    if not sizes:
        return None
    plt = _plt()
    splits = ["train", "validation", "test"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    width = 0.8 / len(splits)
    kinds = list(sizes)
    for i, split in enumerate(splits):
        vals = [sizes[k].get(split) if isinstance(sizes[k].get(split), int) else 0 for k in kinds]
        bars = ax.bar([j + i * width for j in range(len(kinds))], vals, width, label=split)
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v, str(v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + width for j in range(len(kinds))], kinds)
    ax.set_ylabel("records")
    ax.set_title("records per corpus and split")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


# ----------------------------------------------------------------------------------------- distillation

def plot_distill(d: dict, path: Path) -> Path | None:
    """Accuracy against size on disk for teacher, student and baseline (one marker per task + overall)."""
    models = distill_models(d)
    if not models:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    tasks = sorted({t for _, _, res in models for t in res.get("tasks", {})})
    markers = {"teacher": "s", "student": "o", "baseline (no teacher)": "^"}
    for role, _, res in models:
        mb = (res.get("overall", {}).get("model_bytes") or 0) / 1e6
        accs = [(res["tasks"].get(t) or {}).get("accuracy") for t in tasks]
        nan = float("nan")
        ax.scatter([mb] * len(tasks), [nan if a is None else a for a in accs], marker=markers.get(role, "o"),
                   alpha=0.45, s=28)
        overall = res.get("overall", {}).get("accuracy")
        ax.scatter([mb], [nan if overall is None else overall], marker=markers.get(role, "o"), s=90,
                   label=f"{role}: {mb:.1f} MB")
        for t, a in zip(tasks, accs, strict=True):
            if a is not None:
                ax.annotate(t, (mb, a), textcoords="offset points", xytext=(6, -3), fontsize=7)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("label accuracy (small: per task, large: overall)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("distillation: accuracy against size")
    return _save(plt, fig, path)


def render_distill_section(d: dict, plot: Path | None) -> str:
    st = d.get("distill")
    if not st:
        return ""
    parts = ["<h2>Distillation</h2>"]
    init = st.get("student_init") or {}
    how = {"teacher_layers": f"teacher layers {init.get('layers')} of {init.get('teacher_layers')}"
                             + (f", MLP width {init.get('intermediate_size')}" if init.get("intermediate_size") else ""),
           "path": f"local model {init.get('path')}", "build": f"built from a config ({init.get('arch')})"}
    kd = (st.get("student") or {}).get("distill") or {}
    method = (f"logit KD ({kd.get('kind')}, T={kd.get('temperature')}, alpha={kd.get('alpha')}, "
              f"{'top-' + str(kd.get('top_k')) + ' cache' if kd.get('top_k') else 'live teacher'})"
              if st.get("method") == "logit" else "sequence-level KD (teacher answers, checked)")
    parts.append(f"<p>{html.escape(method)}; student initialised from {html.escape(how.get(init.get('from'), '?'))}; "
                 f"teacher <code>{html.escape(str(st.get('teacher')))}</code>. The baseline is the same student trained "
                 "on the same data for the same number of steps without the teacher.</p>")
    size_h, size_rows, task_h, task_rows = distill_tables(d)
    if size_rows:
        parts.append(_table(size_h, size_rows))
        parts.append(_table(task_h, task_rows))
        parts.append(_img(plot, "accuracy against size"))
    else:
        parts.append("<p class=muted>teacher/student/baseline not evaluated in this run</p>")
    seq = st.get("seqkd")
    if seq:
        parts.append(_table(["task", "prompts", "kept", "yield", "rejected (reason: count)"],
                            [[t, v["prompts"], v["kept"], v["yield"], json.dumps(v["rejected"], ensure_ascii=False)]
                             for t, v in seq.get("by_task", {}).items()]
                            + [["all", seq["prompts"], seq["kept"], seq["yield"],
                                json.dumps(seq["rejected"], ensure_ascii=False)]]))
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------- html

CSS = """body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","Microsoft YaHei",sans-serif;
max-width:1100px;margin:2em auto;padding:0 1em;color:#1b1f24}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;
padding-bottom:.2em;margin-top:1.6em}table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
td,th{border:1px solid #d0d7de;padding:.3em .6em;text-align:left}th{background:#f6f8fa}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}.ok{color:#1a7f37;font-weight:600}
.bad{color:#cf222e;font-weight:600}.muted{color:#57606a}code{background:#f6f8fa;padding:0 .3em}"""


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def render_verdict(d: dict) -> str:
    """The first screen: the final model, its headline scores with 95% intervals, coverage at its abstention
    threshold, and every flag raised (banklm.results.flags)."""
    final, res = next(iter(d.get("eval", {}).items()), (None, None))
    if not final or not res:
        return "<h2>Verdict</h2><p class=muted>no evaluation in this run</p>"
    ev = d.get("evidence") or {}
    iv = (ev.get("intervals") or {}).get(final) or {}
    rows = []
    for task, r in res.get("tasks", {}).items():
        t_iv = iv.get(task) or {}
        acc = t_iv.get("accuracy") or {"estimate": r.get("accuracy")}
        rows.append([task, r.get("n"), interval_text(acc), interval_text(t_iv.get("macro_f1")),
                     interval_text(t_iv.get("coverage") or {"estimate": r.get("coverage")}),
                     interval_text(t_iv.get("answered_accuracy") or {"estimate": r.get("answered_accuracy")}), r.get("ece"),
                     r.get("unsupported_number_rate"), r.get("reason_contradiction_rate")])
    overall = (iv.get("overall") or {}).get("accuracy") or {"estimate": res.get("overall", {}).get("accuracy")}
    rows.append(["overall", res.get("overall", {}).get("n"), interval_text(overall), "", None, None, None, None, None])
    raised = flags(d)
    parts = ["<h2>Verdict</h2>",
             f"<p>final model <b>{html.escape(final)}</b> (decoding {html.escape(str(res.get('decoding', 'free')))}); "
             "95% bootstrap intervals in brackets; coverage and accuracy answered at the shipped abstention "
             "threshold</p>",
             _table(["task", "n", "accuracy [95% CI]", "macro-F1 [95% CI]", "coverage", "accuracy answered", "ECE",
                     "unsupported-number rate", "reason contradiction rate"], rows)]
    if raised:
        parts.append("<p class=bad>" + f"{len(raised)} flag(s):</p><ul>" + "".join(
            f"<li><b>{html.escape(f['kind'])}</b>: {html.escape(f['what'])}</li>" for f in raised) + "</ul>")
    else:
        parts.append("<p class=ok>no flag raised</p>")
    return "\n".join(parts)


def plot_intervals(d: dict, path: Path) -> Path | None:
    """Accuracy with its 95% interval, every model and task (eval/evidence.json): overlapping bars are noise."""
    iv = (d.get("evidence") or {}).get("intervals") or {}
    pts = [(m, t, v["accuracy"]) for m, tasks in iv.items() for t, v in tasks.items()
           if (v.get("accuracy") or {}).get("low") is not None]
    if not pts:
        return None
    plt = _plt()
    tasks = list(dict.fromkeys(t for _, t, _ in pts))
    models = list(dict.fromkeys(m for m, _, _ in pts))
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(tasks) * len(models) + 1.2))
    y, labels = 0, []
    for t in tasks:
        for m in models:
            a = next((a for mm, tt, a in pts if mm == m and tt == t), None)
            if a is None:
                continue
            ax.errorbar(a["estimate"], y, xerr=[[a["estimate"] - a["low"]], [a["high"] - a["estimate"]]], fmt="o",
                        color=f"C{models.index(m)}", capsize=3)
            labels.append(f"{t} · {m}")
            y += 1
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("accuracy (95% bootstrap interval)")
    ax.grid(alpha=0.3, axis="x")
    return _save(plt, fig, path)


def render_model_risk(d: dict, plots: dict[str, Path | None] | None = None) -> str:
    """Intervals for every model, the paired comparisons, the baselines, segments, counterfactual tests, every
    categorical key's confusion and ordinal error (eval/evidence.json)."""
    ev = d.get("evidence")
    if not ev:
        return ""
    parts = ["<h2>Model risk</h2>", f"<p class=muted>{html.escape(ev.get('method', ''))}</p>"]
    rows = [[m, t, v.get("n"), interval_text(v.get("accuracy")), interval_text(v.get("macro_f1"))]
            for m, tasks in ev.get("intervals", {}).items() for t, v in tasks.items()]
    parts.append("<h3>Scores with intervals, every model</h3>")
    parts.append(_table(["model", "task", "n", "accuracy [95% CI]", "macro-F1 [95% CI]"], rows))
    parts.append(_img((plots or {}).get("intervals"), "accuracy intervals"))
    crow = []
    for c in ev.get("comparisons", []):
        for t, r in [*c.get("tasks", {}).items(), ("overall", c.get("overall"))]:
            if not r:
                continue
            diff = r["difference"]
            crow.append([c["what"], t, diff.get("n"), f"{diff['difference']:+.3f} [{_fmt(diff.get('low'))}, "
                         f"{_fmt(diff.get('high'))}]", r["mcnemar"]["p_value"],
                         "yes" if r.get("significant") else "no"])
    if crow:
        parts.append("<h3>Paired comparisons (same records; difference = first - second)</h3>")
        parts.append(_table(["comparison", "task", "n", "accuracy difference [95% CI]", "McNemar p",
                             "significant (p < 0.05)"], crow))
    brow = []
    for t, bs in (ev.get("baselines") or {}).items():
        for name, b in bs.items():
            if not b.get("available"):
                brow.append([t, name, "–", "–", "–", "not available: " + str(b.get("reason"))])
                continue
            verdict = ("model WORSE" + (" (significant)" if b.get("significantly") else "")) if b["model_worse"] \
                else "model better or equal"
            brow.append([t, name, interval_text(_as_interval(b["baseline"])), interval_text(_as_interval(b["model"])),
                         b["mcnemar"]["p_value"], verdict])
    if brow:
        parts.append("<h3>Baselines on the same test records: the rule engine and scikit-learn scorecards</h3>")
        parts.append(_table(["task", "baseline", "baseline accuracy", "model accuracy", "McNemar p", "verdict"],
                            brow))
    srow = [[t, seg, g, v["n"], v["correct"], interval_text(v)] for t, segs in (ev.get("segments") or {}).items()
            for seg, groups in segs.items() for g, v in groups.items()]
    if srow:
        parts.append("<h3>By segment (final model)</h3>")
        parts.append(_table(["task", "segment", "value", "n", "right", "accuracy [95% CI]"], srow))
    cf_rows = []
    for t, cf in (ev.get("counterfactual") or {}).items():
        for attr, p in cf.get("protected", {}).items():
            cf_rows.append([t, f"swap {attr}", p["n"] if p.get("in_prompt") else "not in the prompt", p.get("flips"),
                            interval_text({"estimate": p.get("flip_rate"), **(p.get("interval") or {})} if p.get("n") else None),
                            "FLAG" if attr in cf.get("flagged", []) else "ok"])
        dc = cf.get("deciding") or {}
        if dc.get("n"):
            cf_rows.append([t, "deciding field across its threshold", dc["n"], dc["followed"],
                            interval_text({"estimate": dc.get("follow_rate"), **(dc.get("interval") or {})}), "follow rate"])
    if cf_rows:
        parts.append("<h3>Counterfactual tests (label scoring; protected swaps must not flip the decision)</h3>")
        parts.append(_table(["task", "change", "variants", "flips / followed", "rate [95% CI]", ""], cf_rows))
    orow = [[t, k, v["n"], v["unparseable"], v["mean_abs_error"], v["off_by_2_or_more"]]
            for t, keys in (ev.get("ordinal") or {}).items() for k, v in keys.items()]
    if orow:
        parts.append("<h3>Ordinal error of graded keys</h3>")
        parts.append(_table(["task", "key", "n", "unparseable", "mean |grade error|", "off by 2+"], orow))
    for t, keys in (ev.get("confusions") or {}).items():
        for key, cm in keys.items():
            labels = cm["labels"]
            parts.append(f"<p>{html.escape(t)} · {html.escape(key)} (rows gold, columns answered)</p>")
            parts.append(_table(["gold / answered", *labels],
                                [[g, *row] for g, row in zip(labels, cm["matrix"], strict=True)]))
    return "\n".join(parts)


def _as_interval(x: dict) -> dict:
    return {"estimate": x.get("accuracy"), "low": x.get("low"), "high": x.get("high")}


def render_html(d: dict, recipe, plots: dict[str, Path | None]) -> str:
    parts = [f"<h1>banklm run report: {html.escape(recipe.name)}</h1>",
             f"<p class=muted>run folder <code>{html.escape(str(d['run_dir']))}</code></p>", render_verdict(d)]
    status = ('<span class=ok>ledger intact: every recorded file matches</span>' if not d["problems"] else
              f'<span class=bad>ledger check failed: {html.escape(d["problems"][0])}</span>')
    parts.append("<h2>Pipeline</h2>")
    rows = [[e["seq"], e["stage"], e.get("status"),
             f"{(e.get('reused_from') or {}).get('wall_s') or 0:.1f} when it ran" if e.get("status") == "reused"
             else e.get("wall_s"), e.get("finished_at"), len(e.get("outputs", []))] for e in d["entries"]]
    parts.append(_table(["seq", "stage", "status", "wall s", "finished", "files"], rows) + f"<p>{status}</p>")
    parts.append(_img(plots.get("timings"), "stage timings"))

    parts.append("<h2>Corpora</h2>")
    if d["corpora"]:
        for kind, st in d["corpora"].items():
            if not st:
                continue
            parts.append(f"<h3>{html.escape(kind)}</h3>")
            parts.append(_table(["split", "records", "by task"],
                                [[s, n, json.dumps(st.get("by_task", {}).get(s, {}), ensure_ascii=False)]
                                 for s, n in st.get("splits", {}).items()]))
            if st.get("steps"):
                parts.append(_table(["step", "in", "kept", "dropped", "quarantined"],
                                    [[s["step"], s["in"], s["kept"], s["dropped"], s["quarantined"]]
                                     for s in st["steps"]]))
        parts.append(_img(plots.get("corpus_sizes"), "records per corpus and split"))
        parts.append(render_pii_table(d["corpora"]))
        parts.append(_img(plots.get("labels"), "training label distribution"))
    else:
        parts.append("<p class=muted>no corpus stage in this run</p>")

    parts.append("<h2>Training</h2>")
    srows = [[name, s.get("method"), s.get("steps"), s.get("tokens_seen"), s.get("seconds"), s.get("final_loss"),
              s.get("trainable_params"), s.get("total_params")] for name, s in d["summaries"].items() if s]
    if srows:
        parts.append(_table(["stage", "method", "steps", "tokens", "seconds", "final loss", "trainable params",
                             "total params"], srows))
        parts.append(_img(plots.get("curves"), "loss curves"))
    else:
        parts.append("<p class=muted>no training stage in this run</p>")

    parts.append("<h2>Evaluation</h2>")
    if len(d["eval"]) > 1:
        parts.append("<h3>Models side by side (label accuracy)</h3>")
        parts.append(_table(*comparison(d["eval"])))
    if d.get("retention"):
        rt = d["retention"]
        parts.append(_table(["general-text perplexity", "model", "perplexity", "tokens"],
                            [["before fine-tuning", rt["before"]["model"], rt["before"]["perplexity"],
                              rt["before"]["tokens"]],
                             ["after fine-tuning", rt["after"]["model"], rt["after"]["perplexity"],
                              rt["after"]["tokens"]]]))
        parts.append(f"<p>general-ability retention: perplexity change {rt['change_pct']:+.1f}% on "
                     f"{html.escape(rt['corpus'])}</p>")
    headers, rows = instruction_rows(d)
    if rows:
        parts.append("<h3>Instruction data held out (the bank's own): loss, exact match</h3>")
        parts.append("<p class=muted>instruction records of the general / private test splits: answer loss = mean "
                     "negative log-likelihood per answer token (the tokens SFT trains on); exact match of the greedy "
                     "answer for short reference answers (last column)</p>")
        parts.append(_table(headers, rows))
    if d["eval"]:
        for i, (name, res) in enumerate(d["eval"].items()):
            parts.append(f"<h3>model: {html.escape(name)}</h3>")
            parts.append(_table(EVAL_HEADERS, eval_rows(res)))
            if i == 0:  # the final model: the one export ships, with its operating point
                parts.append(render_confidence_section(res, plots))
            extra = []
            for task, r in res.get("tasks", {}).items():
                for key in ("exact_match", "mean_answer_chars"):
                    if key in r:
                        extra.append([task, key, r[key]])
                pos = r.get("positive") or {}
                for key in ("recall", "false_positive_rate", "detail_accuracy_tp"):
                    if key in pos:
                        extra.append([task, f"{pos['key']}={pos['value']}: {key}",
                                      json.dumps(pos[key], ensure_ascii=False) if isinstance(pos[key], dict)
                                      else pos[key]])
                if r.get("fairness_skipped"):
                    extra.append([task, "fairness", "skipped: " + r["fairness_skipped"]])
            if extra:
                parts.append(_table(["task", "metric", "value"], extra))
            fair = {t: r["fairness"] for t, r in res.get("tasks", {}).items() if r.get("fairness")}
            for task, attrs in fair.items():
                rows = [[task, attr, f.get("ratio"), f.get("accuracy_gap"), "FLAG" if f.get("flag") else "ok"]
                        for attr, f in attrs.items() if isinstance(f, dict)]
                parts.append(_table(["task", "protected attribute", "favourable-rate ratio", "accuracy gap",
                                     "flag (<0.8)"], rows))
            if res.get("robustness"):
                parts.append(_table(["perturbation", "records", "skipped (cannot perturb)", "accuracy",
                                     "clean accuracy (same records)", "drop vs clean"],
                                    [[k, v.get("n"), v.get("skipped"), v.get("accuracy"), v.get("clean_accuracy"),
                                      v.get("drop")] for k, v in res["robustness"].items()]))
            ov = res.get("overall", {})
            if ov.get("tokens_per_s") is not None:
                parts.append(f"<p>generation: {_fmt(ov.get('tokens_per_s'), 1)} new tokens/s, "
                             f"{_fmt(ov.get('seconds'), 1)} s for {ov.get('n')} answers</p>")
        parts.append(_img(plots.get("eval"), "task scores"))
        parts.append(_img(plots.get("confusion"), "confusion matrices"))
    else:
        parts.append("<p class=muted>no evaluation in this run</p>")

    parts.append(render_model_risk(d, plots))
    parts.append(render_distill_section(d, plots.get("distill")))

    parts.append(render_export_section(d))
    parts.append(render_ledger_section(d))
    body = "\n".join(parts)
    return (f"<!doctype html><html lang=zh-CN><head><meta charset=utf-8><title>banklm report: "
            f"{html.escape(recipe.name)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


EXPORT_HEADERS = ["file", "format", "type", "bytes", "max |Δlogit|", "mean |Δlogit|", "top-1 agreement",
                  "token ids equal", "greedy equal", "llama.cpp max |Δlogit|", "task accuracy", "Δ accuracy vs PyTorch",
                  "tokens/s", "verdict"]


def export_rows(verify: dict, run_dir: Path) -> list[list[Any]]:
    """One row per exported artefact (GGUF, then ONNX): size, parity figures, task accuracy after export."""
    rows = []
    for fmt in ("gguf", "onnx"):
        for c in (verify or {}).get(fmt, []):
            f = run_dir / c["file"]
            lg, te, lc = c.get("logits") or {}, c.get("task_eval") or {}, c.get("llama_cpp") or {}
            llama = (lc.get("logits") or {}).get("max_abs") if lc.get("checked") else (
                "not checked" if fmt == "gguf" else None)
            drop = te.get("accuracy_drop")
            rows.append([c["file"], fmt, c["type"], c.get("bytes") or (f.stat().st_size if f.exists() else None),
                         _sci(lg.get("max_abs")), _sci(lg.get("mean_abs")), lg.get("top1_agreement"),
                         (c.get("tokenizer") or {}).get("ids_equal"), (c.get("generation") or {}).get("equal"),
                         _sci(llama), te.get("accuracy"), -drop if isinstance(drop, float) else None,
                         _sci(te.get("tokens_per_s"), "{:.0f}"), "pass" if c.get("passed") else "FAIL"])
    return rows


def _sci(v: Any, fmt: str = "{:.2g}") -> Any:
    """Logit differences span 1e-7 .. 1: two significant digits, not three decimals."""
    return fmt.format(v) if isinstance(v, float) else v


def render_export_section(d: dict) -> str:
    """Export: the verification table (every artefact vs the PyTorch model) and accuracy before/after."""
    v = d.get("export")
    if not v:
        return "<h2>Export</h2><p class=muted>no export in this run</p>"
    parts = ["<h2>Export</h2>", _table(EXPORT_HEADERS, export_rows(v, d["run_dir"]))]
    te = v.get("task_eval")
    if te:
        tasks = sorted(te["pytorch"].get("per_task", {}))
        rows = [["PyTorch (before export)", *[te["pytorch"]["per_task"].get(t) for t in tasks],
                 te["pytorch"].get("accuracy"), _sci(te["pytorch"].get("tokens_per_s"), "{:.0f}"), "transformers"]]
        for fmt in ("gguf", "onnx"):
            for c in v.get(fmt, []):
                a = c.get("task_eval") or {}
                if "accuracy" in a:
                    rows.append([f"{fmt} {c['type']}", *[a["per_task"].get(t) for t in tasks], a["accuracy"],
                                 _sci(a.get("tokens_per_s"), "{:.0f}"), a.get("runtime")])
        parts.append(f"<h3>Task accuracy before and after export ({te['records']} test records)</h3>")
        parts.append(_table(["model", *tasks, "overall", "tokens/s", "runtime"], rows))
        headers, drows = decoding_rows(d)
        if drows:  # the same records decoded freely and under the answer grammar
            parts.append(f"<h3>Free vs constrained decoding ({te['records']} test records)</h3>")
            parts.append(_table(headers, drows))
        prow = []
        for fmt in ("gguf", "onnx"):
            for c in v.get(fmt, []):
                for key, pr in ((c.get("task_eval") or {}).get("paired") or {}).items():
                    prow.append([f"{fmt} {c['type']} vs PyTorch", key.removeprefix("vs_pytorch_"), pr.get("n"),
                                 pr.get("difference"), pr.get("low"), pr.get("high"), pr.get("p_value")])
        for key, pr in (te["pytorch"].get("paired") or {}).items():
            prow.append(["PyTorch " + key.replace("_vs_", " vs "), "", pr.get("n"), pr.get("difference"),
                         pr.get("low"), pr.get("high"), pr.get("p_value")])
        if prow:
            parts.append("<h3>Paired on the same records: each export vs PyTorch, and the two decodings</h3>")
            parts.append(_table(["comparison", "decoding", "records", "accuracy difference", "95% low", "95% high",
                                 "McNemar p"], prow))
        headers, trows = threshold_rows(d)
        if trows:  # the bundle's operating point applied to each artefact (quantization shifts confidences)
            parts.append(f"<h3>Coverage at the shipped threshold after export ({te['records']} test records)</h3>")
            parts.append(_table(headers, trows))
    elif v.get("gguf") or v.get("onnx"):
        parts.append("<p class=muted>exported artefacts were not scored on the tasks (export.evaluate: false)</p>")
    if any((c.get("llama_cpp") or {}).get("checked") is False for c in v.get("gguf", [])):
        parts.append("<p class=muted>GGUF files were checked with transformers' GGUF reader only: "
                     "pip install 'banklm[llamacpp]' to check them in llama.cpp</p>")
    fails = v.get("failures") or [f"{c['type']}: {m}" for c in v.get("gguf", []) for m in c.get("failures", [])]
    if fails:
        parts.append("<p class=bad>" + "<br>".join(html.escape(m) for m in fails) + "</p>")
    return "\n".join(parts)


def render_pii_table(corpora: dict) -> str:
    """PII replaced per corpus kind and type (counts only)."""
    rows = []
    for kind, st in (corpora or {}).items():
        pii = (st or {}).get("pii")
        if isinstance(pii, dict):
            for ptype, n in sorted((pii.get("counts") or {}).items()):
                rows.append([kind, pii.get("mode"), ptype, n])
    if not rows:
        return "<p class=muted>no PII step in this run's corpora</p>"
    return "<h3>de-identification (counts only, never values)</h3>" + _table(["corpus", "mode", "PII type",
                                                                               "replaced"], rows)


def render_ledger_section(d: dict) -> str:
    """Ledger summary: chain head, code and library versions, devices, and the verification result."""
    entries = d["entries"]
    if not entries:
        return "<h2>Ledger</h2><p class=muted>no ledger in this run folder</p>"
    last = entries[-1]
    code = last.get("code") or {}
    host = last.get("host") or {}
    git = code.get("git_commit")
    rows = [["entries", len(entries)], ["chain head (hash of the last entry)", last.get("hash")],
            ["banklm", code.get("banklm")],
            ["git commit", (git + (" (uncommitted changes)" if code.get("git_dirty") else "")) if git else "not a git checkout"],
            ["devices", ", ".join(sorted({str(e.get("device")) for e in entries if e.get("device")})) or "–"],
            ["host", f"{host.get('platform', '?')}, {host.get('cpu_count', '?')} CPU threads, CUDA: "
                     f"{', '.join(host.get('cuda') or []) or 'none'}"],
            ["seed", last.get("seed")],
            ["files recorded", sum(len(e.get("outputs", [])) for e in entries)],
            ["libraries", ", ".join(f"{k} {v}" for k, v in (last.get("versions") or {}).items())]]
    if d["problems"]:
        verdict = ("<p class=bad>verification FAILED at report time:<br>"
                   + "<br>".join(html.escape(p) for p in d["problems"]) + "</p>")
    else:
        verdict = (f"<p class=ok>verified at report time: {len(entries)} entries chained, every recorded file "
                   "matches its sha256</p>")
    return ("<h2>Ledger</h2>" + _table(["", ""], rows) + verdict
            + "<p class=muted>re-check any time with <code>banklm verify RUN_DIR</code>; the model card "
              "(<code>MODEL_CARD.md</code>) lists the exported files with their sha256.</p>")


def write_report(run_dir: Path, recipe, mask_pii: Callable[[str], str] | None = None) -> list[Path]:
    """Write report/ and MODEL_CARD.md; ``mask_pii`` masks what a PII detector finds in quoted model outputs."""

    run_dir = Path(run_dir)
    d = collect(run_dir)
    out = run_dir / "report"
    first_eval = next(iter(d["eval"].values()), None)  # the final model: collect() orders it first
    with atomic_dir(out) as tmp:
        plots = {
            "curves": plot_curves(d["curves"], tmp / "loss.png"),
            "eval": plot_eval(first_eval, tmp / "eval.png"),
            "confusion": plot_confusions(first_eval, tmp / "confusion.png"),
            "labels": plot_labels(d["corpora"], tmp / "labels.png"),
            "timings": plot_timings(d["entries"], tmp / "timings.png"),
            "corpus_sizes": plot_corpus_sizes(d["corpora"], tmp / "corpora.png"),
            "distill": plot_distill(d, tmp / "distill.png"),
            "reliability": plot_reliability(first_eval, tmp / "reliability.png"),
            "risk_coverage": plot_risk_coverage(first_eval, tmp / "risk_coverage.png"),
            "intervals": plot_intervals(d, tmp / "intervals.png"),
        }
        atomic_write_text(tmp / "index.html", render_html(d, recipe, plots))
    card = atomic_write_text(run_dir / "MODEL_CARD.md", render_model_card(d, recipe, mask_pii=mask_pii))
    return [out, card]
