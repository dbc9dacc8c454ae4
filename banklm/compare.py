"""What changed between two runs: recipe keys, data counts and scores, read from the run folders.

Used by ``banklm compare RUN_A RUN_B`` (printed as tables) and by the model card's change log
(this run against the previous run of the same recipe).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from banklm.ledger import LEDGER_NAME, Ledger, LedgerError

# the scores a change log follows: per task, then AML-specific ones, then run-level ones
TASK_METRICS = ("accuracy", "macro_f1", "mcc", "format_compliance", "hallucination_rate")
AML_METRICS = ("suspicious_recall", "false_positive_rate")


class NotARun(ValueError):
    """A folder that is not a banklm run folder (no recipe.yaml or no ledger)."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists stay values."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def load_run(run_dir: str | Path) -> dict:
    """The parts of a run folder a comparison reads: resolved recipe, data counts, scores, ledger."""
    run_dir = Path(run_dir)
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.is_file() or not (run_dir / LEDGER_NAME).is_file():
        raise NotARun(f"{run_dir}: not a banklm run folder (needs recipe.yaml and {LEDGER_NAME})")
    try:
        recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}
        entries = Ledger(run_dir).entries()
    except (yaml.YAMLError, LedgerError, UnicodeDecodeError) as e:
        raise NotARun(f"{run_dir}: unreadable run folder ({e})") from None
    data: dict[str, dict[str, Any]] = {}
    for stats_path in sorted((run_dir / "corpora").glob("*/stats.json")):
        st = _read_json(stats_path) or {}
        splits = st.get("splits") or {}
        data[stats_path.parent.name] = {s: (v.get("total") if isinstance(v, dict) else v) for s, v in splits.items()}
    return {"dir": run_dir, "name": run_dir.name, "recipe": recipe if isinstance(recipe, dict) else {},
            "entries": entries, "data": data, "data_hash": _data_hashes(entries), "scores": scores(run_dir)}


def _data_hashes(entries: list[dict]) -> dict[str, str]:
    """One fingerprint per corpus kind over the files the newest corpus stage wrote: equal counts with
    different records still show as a change."""
    corpus = [e for e in entries if e.get("stage") == "corpus"]
    if not corpus:
        return {}
    groups: dict[str, list[str]] = {}
    for rec in corpus[-1].get("outputs", []):
        parts = rec["path"].split("/")
        if len(parts) > 2 and parts[0] == "corpora":
            groups.setdefault(parts[1], []).append(f"{rec['path']}:{rec['sha256']}")
    return {k: hashlib.sha256("\n".join(sorted(v)).encode()).hexdigest()[:12] for k, v in groups.items()}


def scores(run_dir: Path) -> dict[str, float]:
    """Flat ``model/task/metric -> value`` from every ``eval/<model>/results.json`` (+ retention)."""
    out: dict[str, float] = {}
    for res_path in sorted(Path(run_dir).glob("eval/*/results.json")):
        model, res = res_path.parent.name, _read_json(res_path) or {}
        for task, r in (res.get("tasks") or {}).items():
            for m in TASK_METRICS + (AML_METRICS if task == "aml" else ()):
                if isinstance(r.get(m), (int, float)):
                    out[f"{model}/{task}/{m}"] = float(r[m])
        ov = res.get("overall") or {}
        for m in ("accuracy", "format_compliance"):
            if isinstance(ov.get(m), (int, float)):
                out[f"{model}/overall/{m}"] = float(ov[m])
        for name, rb in (res.get("robustness") or {}).items():
            if isinstance(rb, dict) and isinstance(rb.get("drop"), (int, float)):
                out[f"{model}/robustness/{name}.drop"] = float(rb["drop"])
    ret = _read_json(Path(run_dir) / "eval" / "retention.json")
    if ret and isinstance(ret.get("change_pct"), (int, float)):
        out["retention/general/perplexity_change_pct"] = float(ret["change_pct"])
    return out


def compare_runs(a: str | Path | dict, b: str | Path | dict) -> dict:
    """The differences from run ``a`` to run ``b``.

    ``recipe``: changed keys only; ``data``: every corpus kind and split with
    both counts, plus a row per kind whose files changed; ``scores``: every score either run has.
    """
    ra = a if isinstance(a, dict) else load_run(a)
    rb = b if isinstance(b, dict) else load_run(b)
    fa, fb = flatten(ra["recipe"]), flatten(rb["recipe"])
    recipe = [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    data = []
    for kind in sorted(set(ra["data"]) | set(rb["data"])):
        da, db = ra["data"].get(kind, {}), rb["data"].get(kind, {})
        for split in [s for s in ("train", "validation", "test") if s in da or s in db] + \
                     sorted((set(da) | set(db)) - {"train", "validation", "test"}):
            data.append((kind, split, da.get(split), db.get(split)))
    content = [kind for kind in sorted(set(ra["data_hash"]) & set(rb["data_hash"]))
               if ra["data_hash"][kind] != rb["data_hash"][kind]]
    sa, sb = ra["scores"], rb["scores"]
    score_rows = [(k, sa.get(k), sb.get(k)) for k in sorted(set(sa) | set(sb), key=_score_order)]
    return {"a": ra["name"], "b": rb["name"], "a_dir": str(ra["dir"]), "b_dir": str(rb["dir"]),
            "recipe": recipe, "data": data, "data_content_changed": content, "scores": score_rows}


def _score_order(key: str) -> tuple:
    model = key.split("/")[0]
    order = ("sft", "student", "cpt", "base")
    return (order.index(model) if model in order else len(order), key)


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def delta(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return b - a
    return None


def _delta_cell(a: Any, b: Any) -> str:
    d = delta(a, b)
    if d is None:
        return "–" if a == b else "changed"
    return "0" if d == 0 else (f"{d:+.4g}" if isinstance(d, float) else f"{d:+d}")


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def recipe_rows(diff: dict) -> list[list[str]]:
    return [[k, _cell(va), _cell(vb)] for k, va, vb in diff["recipe"]]


def data_rows(diff: dict) -> list[list[str]]:
    rows = [[kind, split, _cell(na), _cell(nb), _delta_cell(na, nb)] for kind, split, na, nb in diff["data"]]
    rows += [[kind, "(records)", "", "", "content changed"] for kind in diff["data_content_changed"]]
    return rows


def score_rows(diff: dict) -> list[list[str]]:
    return [[k, _cell(va), _cell(vb), _delta_cell(va, vb)] for k, va, vb in diff["scores"]]


def format_comparison(diff: dict) -> str:
    """The three tables ``banklm compare`` prints."""
    a, b = diff["a"], diff["b"]
    parts = [f"A = {diff['a_dir']}", f"B = {diff['b_dir']}", "", "recipe (changed keys)"]
    parts.append(text_table(["key", a, b], recipe_rows(diff)) if diff["recipe"] else "  no recipe key changed")
    parts += ["", "data (records per corpus and split)"]
    parts.append(text_table(["corpus", "split", a, b, "change"], data_rows(diff)) if diff["data"]
                 else "  no corpora in either run")
    parts += ["", "scores"]
    parts.append(text_table(["model/task/metric", a, b, "B - A"], score_rows(diff)) if diff["scores"]
                 else "  no evaluation in either run")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------- previous run

def _started(run_dir: Path) -> str | None:
    try:
        entries = Ledger(run_dir).entries()
    except LedgerError:
        return None
    return entries[0].get("started_at") if entries else None


def previous_run(run_dir: str | Path, recipe_name: str) -> Path | None:
    """The newest sibling run folder of the same recipe that started before this one (None: first run)."""
    run_dir = Path(run_dir).resolve()
    mine = _started(run_dir)
    best: tuple[str, Path] | None = None
    for d in run_dir.parent.iterdir() if run_dir.parent.is_dir() else []:
        if d.is_symlink() or not d.is_dir() or d.resolve() == run_dir or not (d / "recipe.yaml").is_file():
            continue
        try:
            name = (yaml.safe_load((d / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("name")
        except (yaml.YAMLError, OSError, UnicodeDecodeError, AttributeError):
            continue
        started = _started(d)
        if name != recipe_name or started is None or (mine is not None and started >= mine):
            continue
        if best is None or started > best[0]:
            best = (started, d)
    return best[1] if best else None
