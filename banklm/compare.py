"""What changed between two runs: recorded parameters, data counts and scores, read from the run folders.

Used by ``banklm compare RUN_A RUN_B`` (printed as tables) and by the model card's change log
(this run against the previous run of the same recipe).

Parameters come from the ledger, not from ``recipe.yaml``: every call (also a partial one, or one with
overrides) rewrites ``recipe.yaml``, anyone can edit it and ``banklm verify`` does not check it, so it may
describe the last call rather than what made the scores. The newest ledger entry of each stage records
the parameters its current outputs were made with, under the chain's hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from banklm.chain import ChainError, chain_problems
from banklm.evaluation.evidence import paired_comparison
from banklm.io import read_jsonl
from banklm.ledger import LEDGER_NAME, Ledger, file_problem, latest_records

# the scores a change log follows: per task, then a detection task's (its spec's answer.positive), then run-level
TASK_METRICS = ("accuracy", "macro_f1", "mcc", "format_compliance", "hallucination_rate")
POSITIVE_METRICS = ("recall", "false_positive_rate")

# the "recorded by" of a key only recipe.yaml has (no stage records it: report.*, name, disabled sections)
FROM_RECIPE_FILE = "recipe.yaml (not recorded)"
RAN, NOT_RUN = "ran", "not run"
CHECK_FAILED = "ledger check failed"


class NotARun(ValueError):
    """A folder that is not a banklm run folder (no ledger, or a ledger that is not JSON lines)."""


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
    """The parts of a run folder a comparison reads: per-stage recorded parameters, data counts, scores,
    the ledger, and warnings (a ledger check that fails, a stage whose inputs were rewritten after it ran).

    ``recipe.yaml`` is optional and read only for the keys no stage records (see :data:`FROM_RECIPE_FILE`).
    """
    run_dir = Path(run_dir)
    if not (run_dir / LEDGER_NAME).is_file():
        raise NotARun(f"{run_dir}: not a banklm run folder (no {LEDGER_NAME})")
    try:
        entries = Ledger(run_dir).entries()
    except (ChainError, UnicodeDecodeError) as e:
        raise NotARun(f"{run_dir}: unreadable ledger ({e})") from None
    recipe: Any = {}
    if (run_dir / "recipe.yaml").is_file():
        try:
            recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            recipe = {}  # only the unrecorded keys come from it: an unreadable one loses just those rows
    data: dict[str, dict[str, Any]] = {}
    for stats_path in sorted((run_dir / "corpora").glob("*/stats.json")):
        st = _read_json(stats_path) or {}
        splits = st.get("splits") or {}
        data[stats_path.parent.name] = {s: (v.get("total") if isinstance(v, dict) else v) for s, v in splits.items()}
    return {"dir": run_dir, "name": run_dir.name, "recipe": recipe if isinstance(recipe, dict) else {},
            "params": stage_params(entries), "entries": entries, "data": data, "data_hash": _data_hashes(entries),
            "scores": scores(run_dir),
            "warnings": [f"{CHECK_FAILED}: {p}" for p in read_problems(run_dir, entries)] + stale_stages(entries)}


def stage_params(entries: list[dict]) -> dict[str, dict[str, Any]]:
    """Per stage (in the order stages first ran), the flattened params of its newest entry: the settings
    its current outputs were made with. Keys read like recipe keys (``train.lr``, ``seed``) because a stage's
    params are whole recipe sections (``banklm.recipe.section_params``) plus a few top-level keys."""
    newest: dict[str, dict] = {}
    for e in entries:
        if isinstance(e.get("stage"), str):
            newest[e["stage"]] = e
    return {stage: flatten(e.get("params") or {}) for stage, e in newest.items()}


# ----------------------------------------------------------------------------------------- trust checks

def _score_files(rel: str) -> bool:
    """The files whose numbers a comparison shows (scores and data counts)."""
    parts = rel.split("/")
    return (len(parts) == 3 and parts[0] == "eval" and parts[2] == "results.json") or rel == "eval/retention.json" \
        or (len(parts) == 3 and parts[0] == "corpora" and parts[2] == "stats.json")


def read_problems(run_dir: Path, entries: list[dict]) -> list[str]:
    """The ledger chain, and the files a comparison reads against the ledger's records of them.

    The same checks as :func:`banklm.ledger.verify_run` on the chain and on these few small files, so a
    comparison stays cheap on a run with gigabytes of weights: ``banklm verify`` re-hashes everything.
    """
    problems = [str(p) for p in chain_problems(entries)]
    latest, _ = latest_records(entries)
    on_disk = {p.relative_to(run_dir).as_posix() for pattern in ("eval/*/results.json", "eval/retention.json",
                                                                  "corpora/*/stats.json") for p in run_dir.glob(pattern)}
    for rel in sorted(on_disk | {p for p in latest if isinstance(p, str) and _score_files(p)}):
        if rel not in latest:
            problems.append(f"{rel}: not recorded by any ledger entry (added or replaced after its stage ran)")
            continue
        problem = file_problem(run_dir, rel, *latest[rel])
        if problem is not None:
            problems.append(str(problem))
    return problems


def stale_stages(entries: list[dict]) -> list[str]:
    """Stages whose newest entry read a file that a later entry rewrote with other content.

    E.g. ``banklm train`` with a new ``train.lr`` after the eval: the train entry records the new lr, but
    the scores on disk still come from the model trained before; a comparison must not credit them to it.
    """
    out = []
    newest = {e.get("stage"): i for i, e in enumerate(entries)}
    for stage, i in newest.items():
        rewritten: dict[str, tuple[dict, dict]] = {}
        for later in entries[i + 1:]:
            for rec in later.get("outputs") or []:
                rewritten[rec.get("path")] = (later, rec)
        changed = sorted(rec.get("path") for rec in entries[i].get("inputs") or []
                         if rec.get("path") in rewritten and rewritten[rec.get("path")][1].get("sha256") != rec.get("sha256"))
        if changed:
            by = rewritten[changed[0]][0]
            more = f" (and {len(changed) - 1} more files)" if len(changed) > 1 else ""
            out.append(f"{stage} (entry {entries[i].get('seq')}) read {changed[0]}{more}, which {by.get('stage')} "
                       f"(entry {by.get('seq')}) rewrote afterwards: {stage}'s outputs were made from the earlier "
                       f"version, not with the newest {by.get('stage')} parameters shown here")
    return out


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
            for m in TASK_METRICS:
                if isinstance(r.get(m), (int, float)):
                    out[f"{model}/{task}/{m}"] = float(r[m])
            pos = r.get("positive") or {}
            for m in POSITIVE_METRICS:
                if isinstance(pos.get(m), (int, float)):
                    out[f"{model}/{task}/{pos['key']}={pos['value']}/{m}"] = float(pos[m])
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

    ``recipe``: changed parameters as ``(key, a, b, recorded by)`` (:func:`param_diff`); ``data``: every
    corpus kind and split with both counts, plus a row per kind whose files changed; ``scores``: every score
    either run has; ``warnings``: per run, what makes its numbers doubtful (empty: nothing found).
    A run that fails the checks is still compared (a reviewer may need to see what differs), but said so.
    """
    ra = a if isinstance(a, dict) else load_run(a)
    rb = b if isinstance(b, dict) else load_run(b)
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
            "warnings": {"a": ra["warnings"], "b": rb["warnings"]},
            "recipe": param_diff(ra, rb), "data": data, "data_content_changed": content, "scores": score_rows,
            "paired": paired_deltas(ra["dir"], rb["dir"])}


def paired_deltas(a_dir: Path, b_dir: Path) -> list[dict]:
    """Accuracy B - A with a 95% paired bootstrap interval and McNemar's p, per model both runs scored and task,
    on the test records both answered (matched by id). Models whose predictions either run lacks (an older
    results folder) or that share no record are left out; nothing fails."""
    out = []
    for pa in sorted(Path(a_dir).glob("eval/*/predictions.jsonl")):
        pb = Path(b_dir) / "eval" / pa.parent.name / "predictions.jsonl"
        if not pb.is_file():
            continue
        try:
            rows_a, rows_b = list(read_jsonl(pa)), list(read_jsonl(pb))
            res = paired_comparison(rows_b, rows_a, ("b", "a"))
        except (KeyError, TypeError, ValueError):  # an older predictions file without the fields: not compared
            continue
        for task, r in [*res.get("tasks", {}).items(), ("overall", res.get("overall"))]:
            if r:
                d = r["difference"]
                out.append({"model": pa.parent.name, "task": task, "n": d["n"], "difference": d["difference"],
                            "low": d["low"], "high": d["high"], "p_value": r["mcnemar"]["p_value"]})
    return out



def _same(x: Any, y: Any) -> bool:
    return json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)


def param_diff(ra: dict, rb: dict) -> list[tuple[str, Any, Any, str]]:
    """Changed parameters, ``(key, value in a, value in b, recorded by)``.

    A key is compared stage by stage (the newest entry of each stage in both runs); stages that changed it
    the same way share one row (``seed`` recorded by ``corpus, train``), else each stage has its own row. A
    stage only one run has is one row ``<stage> stage``: ran / not run (none for a stage that records no
    parameters, like ``report``). Keys of ``recipe.yaml`` that no stage of either run records (``name``,
    ``report.*``, sections of stages neither run ran) come last, marked :data:`FROM_RECIPE_FILE`.
    """
    pa, pb = ra["params"], rb["params"]
    changed: dict[tuple[str, str, str], tuple[Any, Any, list[str]]] = {}
    presence: list[tuple[str, Any, Any, str]] = []
    for stage in dict.fromkeys([*pa, *pb]):
        if stage not in pa or stage not in pb:
            if pa.get(stage) or pb.get(stage):
                presence.append((f"{stage} stage", RAN if stage in pa else NOT_RUN,
                                 RAN if stage in pb else NOT_RUN, stage))
            continue
        for key in sorted(set(pa[stage]) | set(pb[stage])):
            va, vb = pa[stage].get(key), pb[stage].get(key)
            if not _same(va, vb):
                ident = (key, json.dumps(va, sort_keys=True), json.dumps(vb, sort_keys=True))
                changed.setdefault(ident, (va, vb, []))[2].append(stage)
    rows = sorted(((key, va, vb, ", ".join(stages)) for (key, _, _), (va, vb, stages) in changed.items()),
                  key=lambda r: r[0]) + presence
    if not (ra.get("recipe") and rb.get("recipe")):
        return rows  # a run without recipe.yaml: every one of its keys would look changed
    recorded = {k for params in (pa, pb) for flat in params.values() for k in flat}
    fa, fb = flatten(ra["recipe"]), flatten(rb["recipe"])
    for key in sorted(set(fa) | set(fb)):
        if key in recorded or any(key.startswith(k + ".") or k.startswith(key + ".") for k in recorded):
            continue
        if not _same(fa.get(key), fb.get(key)):
            rows.append((key, fa.get(key), fb.get(key), FROM_RECIPE_FILE))
    return rows


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
    return [[k, _cell(va), _cell(vb), by] for k, va, vb, by in diff["recipe"]]


def warning_lines(diff: dict) -> list[str]:
    """One line per warning, naming the run (A or B) it is about."""
    return [f"{side.upper()} ({diff[side]}): {w}" for side in ("a", "b") for w in diff["warnings"][side]]


def data_rows(diff: dict) -> list[list[str]]:
    rows = [[kind, split, _cell(na), _cell(nb), _delta_cell(na, nb)] for kind, split, na, nb in diff["data"]]
    rows += [[kind, "(records)", "", "", "content changed"] for kind in diff["data_content_changed"]]
    return rows


def score_rows(diff: dict) -> list[list[str]]:
    return [[k, _cell(va), _cell(vb), _delta_cell(va, vb)] for k, va, vb in diff["scores"]]


def format_comparison(diff: dict) -> str:
    """What ``banklm compare`` prints: warnings (if any), then the three tables."""
    a, b = diff["a"], diff["b"]
    parts = [f"A = {diff['a_dir']}", f"B = {diff['b_dir']}", ""]
    warnings = warning_lines(diff)
    if warnings:
        parts += ["WARNING: the tables below may not show what made these runs' outputs",
                  *(f"  {w}" for w in warnings)]
        for side in ("a", "b"):
            if any(w.startswith(CHECK_FAILED) for w in diff["warnings"][side]):
                parts.append(f"  `banklm verify {diff[side + '_dir']}` re-checks every file of run {side.upper()}")
        parts.append("")
    parts.append("parameters (changed; from each stage's newest ledger entry)")
    parts.append(text_table(["key", a, b, "recorded by"], recipe_rows(diff)) if diff["recipe"]
                 else "  no recorded parameter changed")
    parts += ["", "data (records per corpus and split)"]
    parts.append(text_table(["corpus", "split", a, b, "change"], data_rows(diff)) if diff["data"]
                 else "  no corpora in either run")
    parts += ["", "scores"]
    parts.append(text_table(["model/task/metric", a, b, "B - A"], score_rows(diff)) if diff["scores"]
                 else "  no evaluation in either run")
    if diff.get("paired"):
        parts += ["", "accuracy B - A on the same test records (95% paired bootstrap interval; McNemar p)"]
        parts.append(text_table(["model/task", "records", "B - A", "95% interval", "p"],
                                [[f"{r['model']}/{r['task']}", str(r["n"]), f"{r['difference']:+.3f}",
                                  f"[{r['low']:+.3f}, {r['high']:+.3f}]", f"{r['p_value']:.3g}"]
                                 for r in diff["paired"]]))
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------- previous run

def _started(run_dir: Path) -> str | None:
    try:
        entries = Ledger(run_dir).entries()
    except (ChainError, OSError, UnicodeDecodeError):
        return None
    return entries[0].get("started_at") if entries else None


def previous_run(run_dir: str | Path, recipe_name: str) -> Path | None:
    """The newest sibling run folder of the same recipe that started before this one (None: first run).

    "Started" is the first ledger entry's ``started_at``; the recipe name is read from each sibling's
    ``recipe.yaml`` (no ledger entry records it). Siblings without a readable ledger are skipped, as is the
    ``latest`` link (it points at a run that is also a sibling).
    """
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
