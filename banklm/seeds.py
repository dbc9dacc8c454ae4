"""``banklm run RECIPE --seeds 0,1,2``: the same recipe trained and scored once per seed, and how much its scores move.

Each seed runs in its own run folder ``runs/<name>/<id>-s<seed>/`` with ``seed=<seed>`` and the data's seed fixed
(``data_seed``: the recipe's, unless it sets one), so only training varies: the corpus and tokenizer stages of the
second seed on are reused from the first. The table (``runs/<name>/seeds-<id>.md`` and ``.json``) gives, per task
and overall, each seed's figure and their mean, standard deviation, min and max
(:func:`banklm.evaluation.uncertainty.seed_summary`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from banklm.evaluation.uncertainty import seed_summary
from banklm.io import atomic_write_json, atomic_write_text
from banklm.results import eval_results

__all__ = ["SEED_FIGURES", "parse_seeds", "seed_run_dir", "seed_table", "write_seed_table"]

#: per task: (results key, column title); ``overall`` takes the accuracy
SEED_FIGURES = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("coverage", "coverage at threshold"),
                ("answered_accuracy", "accuracy answered"), ("ece", "ECE"))


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a clear error for anything else (duplicates, negatives, fewer than two)."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: comma-separated whole numbers, e.g. 0,1,2") from None
    if len(seeds) < 2:
        raise ValueError(f"--seeds {text!r}: give at least two seeds (one seed is a plain banklm run)")
    if len(set(seeds)) != len(seeds) or any(not 0 <= s < 2**32 for s in seeds):
        raise ValueError(f"--seeds {text!r}: distinct seeds in [0, 2^32)")
    return seeds


def seed_run_dir(parent: Path, run_id: str, seed: int) -> Path:
    return Path(parent) / f"{run_id}-s{seed}"


def seed_table(run_dirs: dict[int, Path]) -> dict:
    """Each seed's final-model figures (the first model of its evaluation) and their spread, per task."""
    per_seed: dict[int, dict[str, Any]] = {}
    model = None
    for seed, run_dir in run_dirs.items():
        evals = eval_results(run_dir)
        name, res = next(iter(evals.items()), (None, {}))
        model = model or name
        per_seed[seed] = {"run_dir": str(run_dir), "model": name,
                          "tasks": {t: {k: r.get(k) for k, _ in SEED_FIGURES} for t, r in (res or {}).get("tasks",
                                                                                                          {}).items()},
                          "overall": (res or {}).get("overall", {}).get("accuracy")}
    tasks = list(dict.fromkeys(t for s in per_seed.values() for t in s["tasks"]))
    summary: dict[str, Any] = {}
    for t in tasks:
        summary[t] = {}
        for key, _ in SEED_FIGURES:
            vals = [s["tasks"].get(t, {}).get(key) for s in per_seed.values()]
            if all(isinstance(v, int | float) for v in vals):
                summary[t][key] = seed_summary(vals)
    overall = [s["overall"] for s in per_seed.values()]
    if all(isinstance(v, int | float) for v in overall):
        summary["overall"] = {"accuracy": seed_summary(overall)}
    return {"seeds": list(run_dirs), "model": model, "per_seed": {str(k): v for k, v in per_seed.items()},
            "summary": summary}


def _pm(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "–"
    sd = s.get("sd")
    return f"{s['mean']:.3f} ± {sd:.3f}" if sd is not None else f"{s['mean']:.3f}"


def _cell(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def render_seed_table(table: dict) -> str:
    seeds = table["seeds"]
    lines = [f"# Seeds {', '.join(map(str, seeds))}: model `{table['model']}`", "",
             "Each seed trained and scored in its own run folder on the same data (data_seed fixed); mean ± sample "
             "standard deviation over the seeds.", "",
             "| task | figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | min | max |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|"]
    per = table["per_seed"]
    for task, figs in table["summary"].items():
        for key, title in (SEED_FIGURES if task != "overall" else (("accuracy", "accuracy"),)):
            s = figs.get(key)
            if s is None:
                continue
            vals = [per[str(sd)]["overall"] if task == "overall" else per[str(sd)]["tasks"].get(task, {}).get(key)
                    for sd in seeds]
            lines.append(f"| {task} | {title} | " + " | ".join(_cell(v) for v in vals)
                         + f" | {_pm(s)} | {_cell(s.get('min'))} | {_cell(s.get('max'))} |")
    lines += ["", "Run folders:", ""] + [f"- seed {sd}: `{per[str(sd)]['run_dir']}`" for sd in seeds]
    return "\n".join(lines) + "\n"


def write_seed_table(parent: Path, run_id: str, run_dirs: dict[int, Path]) -> tuple[Path, Path]:
    table = seed_table(run_dirs)
    parent = Path(parent)
    js = atomic_write_json(parent / f"seeds-{run_id}.json", table)
    md = atomic_write_text(parent / f"seeds-{run_id}.md", render_seed_table(table))
    return md, js
