"""The run report (``report/index.html`` + PNG plots) and ``MODEL_CARD.md``, built from the run folder.

Everything shown is read from files the stages wrote (ledger, stats, metrics, results, verify):
no number is typed in here. A section whose stage did not run says so instead of inventing one.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from banklm.io import atomic_dir, atomic_write_text
from banklm.ledger import Ledger, LedgerError, verify_run

# Plot labels are ASCII (no CJK font is guaranteed on a bank's server); tables keep the Chinese labels.
LABEL_EN = {
    "通过": "approve", "拒绝": "reject", "人工复核": "review",
    "可疑": "suspicious", "正常": "normal", "无": "none", "拆分交易": "structuring", "快进快出": "rapid in-out",
    "分散转入集中转出": "fan-in/out", "与高风险地区往来": "high-risk region", "与身份不符的大额现金": "cash vs profile",
    "循环交易": "circular", "发票不合规": "invoice", "超标准报销": "over-limit", "拆分审批": "split approval",
    "关联交易未披露": "related party", "无异常": "no issue", "(unparsed)": "(unparsed)",
}


MODEL_ORDER = ("sft", "student", "cpt", "base")  # newest model of a run first


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


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


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- data

def collect(run_dir: Path) -> dict:
    """Everything the report and the card show, read from the run folder."""
    run_dir = Path(run_dir)
    try:
        entries = Ledger(run_dir).entries()
    except LedgerError:
        entries = []
    latest: dict[str, dict] = {}
    for e in entries:
        latest[e["stage"]] = e
    corpora = {}
    cdir = run_dir / "corpora"
    if cdir.is_dir():
        for kind in sorted(p.name for p in cdir.iterdir() if p.is_dir()):
            corpora[kind] = _read_json(cdir / kind / "stats.json")
    return {
        "run_dir": run_dir,
        "entries": entries,
        "latest": latest,
        "corpora": corpora,
        "curves": {name: _read_jsonl(run_dir / name / "metrics.jsonl") for name in ("cpt", "sft")},
        "summaries": {name: _read_json(run_dir / name / "train_summary.json") for name in ("cpt", "sft")},
        "eval": {p.name: _read_json(p / "results.json") for p in sorted(
                 (run_dir / "eval").glob("*"), key=lambda p: (MODEL_ORDER.index(p.name) if p.name in MODEL_ORDER
                                                              else len(MODEL_ORDER), p.name))
                 if (p / "results.json").exists()},
        "export": _read_json(run_dir / "export" / "verify.json"),
        "retention": _read_json(run_dir / "eval" / "retention.json"),
        "problems": [str(p) for p in verify_run(run_dir)],
    }


def eval_rows(results: dict) -> list[list[Any]]:
    rows = []
    for task, r in (results or {}).get("tasks", {}).items():
        rows.append([task, r.get("n"), r.get("accuracy"), r.get("macro_f1"), r.get("mcc"),
                     r.get("format_compliance"), r.get("hallucination_rate")])
    return rows


def comparison(evals: dict[str, dict]) -> tuple[list[str], list[list[Any]]]:
    """One row per evaluated model: per-task label accuracy, overall accuracy, tokens/s, size."""
    tasks = sorted({t for r in evals.values() for t in (r or {}).get("tasks", {})})
    rows = []
    for name, r in evals.items():
        ov = (r or {}).get("overall", {})
        rows.append([name, *[(r["tasks"].get(t) or {}).get("accuracy") for t in tasks], ov.get("accuracy"),
                     ov.get("format_compliance"), ov.get("tokens_per_s"), ov.get("model_bytes")])
    return ["model", *tasks, "overall", "format compliance", "tokens/s", "bytes on disk"], rows


EVAL_HEADERS = ["task", "n", "accuracy", "macro-F1", "MCC", "format compliance", "unsupported-number rate"]


# ----------------------------------------------------------------------------------------- plots

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def render_html(d: dict, recipe, plots: dict[str, Path | None]) -> str:
    parts = [f"<h1>banklm run report: {html.escape(recipe.name)}</h1>",
             f"<p class=muted>run folder <code>{html.escape(str(d['run_dir']))}</code></p>"]
    status = ('<span class=ok>ledger intact: every recorded file matches</span>' if not d["problems"] else
              f'<span class=bad>ledger check failed: {html.escape(d["problems"][0])}</span>')
    parts.append("<h2>Pipeline</h2>")
    rows = [[e["seq"], e["stage"], e.get("status"), e.get("wall_s"), e.get("finished_at"),
             len(e.get("outputs", []))] for e in d["entries"]]
    parts.append(_table(["seq", "stage", "status", "wall s", "finished", "files"], rows) + f"<p>{status}</p>")

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
    if d["eval"]:
        for name, res in d["eval"].items():
            parts.append(f"<h3>model: {html.escape(name)}</h3>")
            parts.append(_table(EVAL_HEADERS, eval_rows(res)))
            extra = []
            for task, r in res.get("tasks", {}).items():
                for key in ("exact_match", "suspicious_recall", "typology_accuracy_tp", "false_positive_rate",
                            "mean_answer_chars"):
                    if key in r:
                        extra.append([task, key, json.dumps(r[key], ensure_ascii=False)
                                      if isinstance(r[key], dict) else r[key]])
            if extra:
                parts.append(_table(["task", "metric", "value"], extra))
            fair = {t: r["fairness"] for t, r in res.get("tasks", {}).items() if r.get("fairness")}
            for task, attrs in fair.items():
                rows = [[task, attr, f.get("ratio"), f.get("accuracy_gap"), "FLAG" if f.get("flag") else "ok"]
                        for attr, f in attrs.items() if isinstance(f, dict)]
                parts.append(_table(["task", "protected attribute", "approval-rate ratio", "accuracy gap",
                                     "flag (<0.8)"], rows))
            if res.get("robustness"):
                parts.append(_table(["perturbation", "accuracy", "drop vs clean"],
                                    [[k, v.get("accuracy"), v.get("drop")] for k, v in res["robustness"].items()]))
            ov = res.get("overall", {})
            if ov.get("tokens_per_s") is not None:
                parts.append(f"<p>generation: {_fmt(ov.get('tokens_per_s'), 1)} new tokens/s, "
                             f"{_fmt(ov.get('seconds'), 1)} s for {ov.get('n')} answers</p>")
        parts.append(_img(plots.get("eval"), "task scores"))
        parts.append(_img(plots.get("confusion"), "confusion matrices"))
    else:
        parts.append("<p class=muted>no evaluation in this run</p>")

    parts.append("<h2>Export</h2>")
    if d["export"]:
        rows = []
        for c in d["export"].get("gguf", []):
            f = d["run_dir"] / c["file"]
            lg = c.get("logits") or {}
            rows.append([c["file"], c["type"], f.stat().st_size if f.exists() else None, lg.get("max_abs"),
                         lg.get("mean_abs"), lg.get("top1_agreement"), (c.get("tokenizer") or {}).get("ids_equal"),
                         (c.get("generation") or {}).get("equal"), "pass" if c.get("passed") else "FAIL"])
        parts.append(_table(["file", "type", "bytes", "max |Δlogit|", "mean |Δlogit|", "top-1 agreement",
                             "token ids equal", "greedy equal", "verdict"], rows))
        fails = [f"{c['type']}: {m}" for c in d["export"].get("gguf", []) for m in c.get("failures", [])]
        if fails:
            parts.append("<p class=bad>" + "<br>".join(html.escape(m) for m in fails) + "</p>")
    else:
        parts.append("<p class=muted>no export in this run</p>")
    body = "\n".join(parts)
    return (f"<!doctype html><html lang=zh-CN><head><meta charset=utf-8><title>banklm report: "
            f"{html.escape(recipe.name)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def render_model_card(d: dict, recipe) -> str:
    base = recipe.base.path or f"tiny {recipe.base.build.arch} built from a config (hidden {recipe.base.build.hidden_size}, " \
        f"{recipe.base.build.num_layers} layers)"
    lines = [f"# Model card: {recipe.name}", "", "## 用途 Intended use",
             "辅助银行信贷审批、反洗钱可疑交易识别与审计底稿初筛；输出为建议，须由有资质人员复核。",
             "Decision support for credit approval, AML screening and audit working papers; every output is a "
             "suggestion for a qualified reviewer.", "", "## 不适用范围 Out-of-scope use",
             "不得用于无人工复核的自动拒贷或自动上报；不得用于训练数据以外的业务。", "",
             "## 基础模型 Base model", f"- {base}", f"- licence: {recipe.base.licence or 'not given in the recipe'}",
             "", "## 训练数据 Training data"]
    for kind, st in d["corpora"].items():
        if st:
            lines.append(f"- {kind}: {json.dumps(st.get('splits', {}), ensure_ascii=False)} "
                         f"(card: corpora/{kind}/card.md)")
    lines += ["", "## 训练方法 Training"]
    for name, s in d["summaries"].items():
        if s:
            lines.append(f"- {name}: method {s.get('method')}, steps {s.get('steps')}, tokens {s.get('tokens_seen')}, "
                         f"final loss {_md_num(s.get('final_loss'))}, {s.get('seconds')} s on {s.get('device')}")
    lines.append(f"- hyper-parameters: see recipe.yaml (train.lr {recipe.train.lr}, method {recipe.train.method})")
    lines += ["", "## 评估结果 Evaluation"]
    if d["eval"]:
        for name, res in d["eval"].items():
            lines += [f"model `{name}`:", "", _md_table(EVAL_HEADERS, eval_rows(res)), ""]
    else:
        lines.append("not evaluated in this run")
    lines += ["", "## 导出 Export"]
    if d["export"]:
        for c in d["export"].get("gguf", []):
            lines.append(f"- {c['file']} ({c['type']}): max |Δlogit| {_md_num((c.get('logits') or {}).get('max_abs'))}, "
                         f"{'verified' if c.get('passed') else 'FAILED verification'}")
    else:
        lines.append("not exported in this run")
    lines += ["", "## 局限 Known limitations",
              "- Scores are on held-out generated records that follow the documented rules (docs/tasks.md); "
              "they do not measure performance on a bank's real customers.",
              "", "## 可追溯 Traceability",
              f"- ledger: ledger.jsonl, {len(d['entries'])} entries, "
              + ("chain and files intact at report time" if not d["problems"] else f"CHECK FAILED: {d['problems'][0]}"),
              ""]
    return "\n".join(lines)


def _md_num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(run_dir: Path, recipe) -> list[Path]:
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
        }
        atomic_write_text(tmp / "index.html", render_html(d, recipe, plots))
    card = atomic_write_text(run_dir / "MODEL_CARD.md", render_model_card(d, recipe))
    return [out, card]
