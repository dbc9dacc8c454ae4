"""Several evaluated models side by side: a Markdown table and a bar chart, from their results dicts.

Used by ``banklm eval --model A --model B ...`` (base vs LoRA vs student vs GGUF/ONNX exports scored on the
same records). Only figures present in each ``results.json`` are shown; a missing one is ``–``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from banklm.io import atomic_write_bytes, atomic_write_text

COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"

# (results key under tasks[task], column title)
TASK_COLUMNS = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("mcc", "MCC"),
                ("format_compliance", "format compliance"), ("unsupported_number_rate", "unsupported-number rate"),
                ("coverage", "coverage at threshold"), ("answered_accuracy", "accuracy answered")]
HEADERS = ["task", "model", "n", *[t for _, t in TASK_COLUMNS], "tokens/s", "size (MB)"]


def _cell(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v).replace("|", "\\|")


def _size_mb(ov: dict) -> float | None:
    b = ov.get("model_bytes")
    return b / 1e6 if isinstance(b, (int, float)) and b else None


def _tasks(results: dict[str, dict]) -> list[str]:
    """Every task any model was scored on, in first-seen order."""
    return list(dict.fromkeys(t for r in results.values() for t in r.get("tasks", {})))


def comparison_rows(results: dict[str, dict]) -> list[list[Any]]:
    """One row per (task, model), tasks in first-seen order, models in the given order."""
    rows = []
    for task in _tasks(results):
        for name, r in results.items():
            t = r.get("tasks", {}).get(task)
            if t is None:
                continue
            ov = r.get("overall", {})
            rows.append([task, name, t.get("n"), *[t.get(k) for k, _ in TASK_COLUMNS], ov.get("tokens_per_s"),
                         _size_mb(ov)])
    return rows


def comparison_markdown(results: dict[str, dict], sources: dict[str, str] | None = None) -> str:
    """The side-by-side table (per task and model) plus one line per model naming what was evaluated."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    digits = [3] * (len(HEADERS) - 2) + [1, 2]  # tokens/s to 0.1, MB to 0.01
    for row in comparison_rows(results):
        cells = [_cell(v, d) for v, d in zip(row, digits, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | overall accuracy | n | evaluated |", "|---|---|---|---|"]
    for name, r in results.items():
        ov = r.get("overall", {})
        what = (sources or {}).get(name, "")
        if ov.get("runtime"):
            what += f" ({ov['runtime']})"
        lines.append(f"| {_cell(name)} | {_cell(ov.get('accuracy'))} | {_cell(ov.get('n'))} | {_cell(what)} |")
    return "\n".join(lines) + "\n"


def plot_comparison(results: dict[str, dict], path: str | Path) -> Path | None:
    """Grouped bars: per-task label accuracy, one bar per model (PNG, Agg backend; None without tasks)."""
    tasks = _tasks(results)
    if not tasks:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(tasks) * len(names) ** 0.5 + 3), 3.6))
    for i, name in enumerate(names):
        vals = [(results[name].get("tasks", {}).get(t) or {}).get("accuracy") for t in tasks]
        xs = [j + i * width for j in range(len(tasks))]
        bars = ax.bar(xs, [v or 0.0 for v in vals], width, label=name)
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, (v or 0.0) + 0.01, "–" if v is None else f"{v:.2f}",
                    ha="center", fontsize=7)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("label accuracy")
    ax.set_title("per-task accuracy by model")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_comparison(results: dict[str, dict], out_dir: str | Path,
                     sources: dict[str, str] | None = None) -> tuple[Path, Path | None, str]:
    """Write ``comparison.md`` and ``comparison.png`` into ``out_dir``; returns ``(md, png, markdown)``."""
    out_dir = Path(out_dir)
    text = comparison_markdown(results, sources)
    md = atomic_write_text(out_dir / COMPARISON_MD, "# Models side by side\n\n" + text)
    png = plot_comparison(results, out_dir / COMPARISON_PNG)
    return md, png, text
