"""Corpus builders: turn recipe sources into training-ready datasets with stats, a card and a quarantine.

One builder per kind: :func:`build_general`, :func:`build_vertical`, :func:`build_private` (raw text or
instruction records read by ``banklm.corpora.sources``, cleaned by the ``banklm.corpora.ops`` steps, split) and
:func:`build_scenario` (task generators plus the bank's own labelled tables). Every builder writes one
folder ``corpora/<kind>/`` atomically (``banklm.io.atomic_dir``: a crash leaves no folder that looks
complete): ``data/`` (a ``datasets.DatasetDict`` saved to disk), ``stats.json``, ``quarantine.jsonl``,
``card.md``. Counts obey ``in = kept + dropped + quarantined`` for every step (asserted, and written).
:func:`build_mix` mixes built corpora by target proportions into ``corpora/mix/``. The cards are rendered by
``banklm.corpora.cards``; built corpora are read back with ``banklm.corpora.splits``.

Source paths (``resolve_source_path``): ``samples:<path>`` is inside the bundled ``corpora/samples``;
an absolute path is taken as given; any other path is relative to ``base_dir``. A relative or
``samples:`` path whose ``..`` parts lead outside both ``base_dir`` and the samples folder is refused.

Library functions take plain arguments (lists of dicts, paths, numbers); ``banklm.stages.run_corpus``
maps the recipe onto them. See docs/corpora.md.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from banklm.io import atomic_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text
from banklm.tasks import get_task
from banklm.tasks.tables import TARGET_NONE, TableRecords, read_task_table

from .cards import mix_card, scenario_card, text_card
from .mix import DEFAULT_SPLITS, mix
from .mix import split as split_ds
from .ops import (
    Decontaminate,
    ExactDedup,
    NearDedup,
    Normalize,
    PoisonScreen,
    QualityFilter,
    RemoveBoilerplate,
    ScrubPII,
    Step,
    run_steps,
)
from .ops.base import resolve_field, step_params, text_of
from .ops.pii import scrub_text
from .sources import (
    FILE_LEVEL,
    MAX_RECORD_BYTES,
    SCHEMAS,
    Bad,
    _check_spec,
    _file_format,
    _raw_items,
    detect_encoding,
    display_path,
    expand_paths,
    path_problem,
    read_sources,
    to_record,
)
from .synth import generate_records

SPLITS = ("train", "validation", "test")
#: the scenario corpus's splits: plus ``unlabelled`` (a bank's rows without label: distillation prompts only)
ALL_SPLITS = (*SPLITS, "test_prevalence", "unlabelled")
#: a ``split: auto`` bank table keeps at least this many rows of each label in test (ScenarioTable.min_test_per_label)
MIN_TEST_PER_LABEL = 30
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
SAMPLES_PREFIX = "samples:"
KINDS = ("general", "vertical", "private", "scenario")

#: Every step a corpus can list, by name (in the order errors list them). Each declares the parameters a recipe
#: may set on it (``banklm.corpora.ops.base.param``); ``pii`` and ``decontam`` are configured by the corpus
#: options instead (``pii=``, ``eval_prompts=``, ``decontam_n=``; ``corpora.<kind>.pii`` / ``.decontaminate``).
STEPS: dict[str, type[Step]] = {cls.name: cls for cls in (Normalize, RemoveBoilerplate, ScrubPII, ExactDedup,
                                                          NearDedup, QualityFilter, Decontaminate, PoisonScreen)}
#: The steps of each corpus kind when a recipe (or a caller) gives none; the recipe schema's defaults.
DEFAULT_STEPS: dict[str, list] = {
    # instruction data: arithmetic and English answers are fine, so only very short/long records go
    "general": ["normalize", "exact_dedup",
                {"quality": {"min_chars": 5, "min_cjk_ratio": 0.0, "max_digit_ratio": 0.8}}],
    "vertical": ["normalize", "boilerplate", "exact_dedup", "near_dedup", "quality"],
    "private": ["normalize", "pii", "exact_dedup", "near_dedup", "quality"],
    "scenario": [],
}
LENGTH_BINS = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
PEEK_RECORDS = 20


class SourceError(ValueError):
    """A source the build cannot use at all (missing, outside the allowed folders, wrong field names).

    The message names the file (and line) or the recipe value at fault.
    """


# ---------------------------------------------------------------------------------------------------
# source paths


def _inside(p: Path, root: Path) -> bool:
    try:
        p.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_source_path(path: str, base_dir: str | Path | None = None) -> str:
    """The absolute path (or glob) of a source ``path``; raises :class:`SourceError` on traversal."""
    base = Path(base_dir if base_dir is not None else os.getcwd()).resolve()
    if path.startswith(SAMPLES_PREFIX):
        rel = path[len(SAMPLES_PREFIX):].lstrip("/")
        full = SAMPLES_DIR / rel
    elif Path(path).expanduser().is_absolute():
        return str(Path(path).expanduser())
    else:
        full = base / path
    # the fixed part (before any wildcard) must stay inside base_dir or the samples folder
    parts = full.parts
    first = next((i for i, s in enumerate(parts) if glob.has_magic(s)), len(parts))
    fixed = Path(os.path.normpath(Path(*parts[:first]))) if first else Path("/")
    if any(s == ".." for s in parts[first:]):
        raise SourceError(f"source path {path!r}: '..' after a wildcard is not allowed")
    if not (_inside(fixed, base) or _inside(fixed, SAMPLES_DIR)):
        raise SourceError(f"source path {path!r} resolves to {fixed}, outside the recipe's source folder ({base}) "
                          f"and the bundled samples ({SAMPLES_DIR}); use an absolute path or move the data")
    return str(Path(fixed, *parts[first:]))


def _spec_for_reader(spec: dict, base_dir) -> dict:
    """A recipe source dict -> the dict ``banklm.corpora.sources`` reads (absolute path, no recipe-only keys)."""
    out = {k: v for k, v in spec.items() if k not in ("licence",) and v is not None}
    out["path"] = resolve_source_path(spec["path"], base_dir)
    if not out.get("name"):
        out["name"] = _default_name(spec["path"])
    if out.get("field_map") == {}:
        out.pop("field_map")
    return out


def _default_name(path: str) -> str:
    p = path[len(SAMPLES_PREFIX):] if path.startswith(SAMPLES_PREFIX) else path
    parts = [s for s in Path(p).parts if not glob.has_magic(s) and s not in ("..", ".", "/")]
    if not parts:
        return "source"
    last = Path(parts[-1])
    return (last.stem if last.suffix else last.name) or "source"


def source_files(specs: Sequence[dict], base_dir=None) -> list[Path]:
    """Every file the sources read (for the ledger); raises :class:`SourceError` naming the source."""

    files: list[Path] = []
    for spec in specs:
        rs = _spec_for_reader(spec, base_dir)
        try:
            _, fs = expand_paths(rs["path"], rs.get("format", "auto"))
        except ValueError as e:
            raise SourceError(f"source {spec['path']!r}: {e}") from None
        files += [f for f in fs if path_problem(f) is None]  # the others are quarantined, never read
    return files


def check_sources(specs: Sequence[dict], base_dir=None) -> None:
    """Cheap checks before a build, raising :class:`SourceError` (naming file and line) for inputs no
    build can use: paths, files whose first records all lack the expected fields (set ``field_map``),
    sources of which no file is readable (empty, binary, undecodable).
    Problems of single records or files (bad JSON, binary, encodings) are left to the quarantine.
    """

    for spec in specs:
        rs = _spec_for_reader(spec, base_dir)
        try:
            rs = _check_spec(rs)
            fmt = rs.get("format", "auto")
            _, files = expand_paths(rs["path"], fmt)
        except ValueError as e:
            raise SourceError(f"source {spec['path']!r}: {e}") from None
        schema = fmt if fmt in SCHEMAS else None
        keep = tuple(rs.get("keep", ("label",)))
        readable, first_bad = 0, None
        for f in files:
            problem = path_problem(f)
            if problem is not None:
                first_bad = first_bad or (display_path(f), problem.reason)
                continue
            try:
                ffmt = _file_format(f, fmt)
            except ValueError as e:
                raise SourceError(str(e)) from None
            if ffmt == "hf":
                readable += 1
                continue
            if ffmt in ("txt", "md", "html"):
                try:
                    if f.stat().st_size == 0:
                        raise Bad("empty_file")
                    detect_encoding(f)
                    readable += 1
                except Bad as b:
                    first_bad = first_bad or (f, b.reason)
                continue
            seen, first_missing = 0, None
            try:
                for line, item in _raw_items(f, ffmt, rs, MAX_RECORD_BYTES, {}):
                    if isinstance(item, Bad):
                        if item.category in FILE_LEVEL:
                            raise item
                        continue
                    seen += 1
                    try:
                        to_record(item, schema, rs.get("field_map"), keep)
                        first_missing = None
                        break
                    except Bad as b:
                        if b.category != "missing_field":
                            first_missing = None
                            break
                        if first_missing is None:
                            first_missing = (line, b.reason)
                    if seen >= PEEK_RECORDS:
                        break
            except Bad as b:  # a whole bad file: quarantined by the build, unless no file is readable
                first_bad = first_bad or (f, b.reason)
                continue
            except ValueError as e:
                raise SourceError(str(e)) from None
            if first_missing is not None:
                line, reason = first_missing
                raise SourceError(f"{f}:{line}: {reason}; the first {seen} record(s) of this file lack the "
                                  f"expected fields: set field_map in the source (e.g. field_map: "
                                  f"{{text: <your field>}})")
            readable += 1
        if not readable and first_bad:
            raise SourceError(f"{first_bad[0]}: {first_bad[1]}; no readable file in source {spec['path']!r}")


def resolve_table_path(path: str, base_dir=None) -> Path:
    p = Path(resolve_source_path(path, base_dir))
    if glob.has_magic(str(p)):
        raise SourceError(f"scenario table {path!r}: one file, not a pattern")
    if not p.is_file():
        raise SourceError(f"scenario table {path!r}: no such file ({p})")
    return p


# ---------------------------------------------------------------------------------------------------
# steps


def step_list(steps: Sequence) -> list[tuple[str, dict]]:
    """``["normalize", {"near_dedup": {...}}, {"step": "quality", "params": {...}}]`` -> [(name, params)]."""
    out = []
    for s in steps:
        if isinstance(s, str):
            out.append((s, {}))
        elif isinstance(s, dict) and "step" in s:
            out.append((s["step"], dict(s.get("params") or {})))
        elif isinstance(s, dict) and len(s) == 1:
            (name, params), = s.items()
            out.append((name, dict(params or {})))
        elif isinstance(s, (tuple, list)) and len(s) == 2:
            out.append((s[0], dict(s[1] or {})))
        else:
            raise ValueError(f"bad step {s!r}: expected a name or {{name: params}}")
    return out


def make_steps(steps: Sequence, pii: dict | None = None, eval_prompts: Sequence[str] | None = None,
               decontam_n: int | None = None) -> list:
    """Step objects for ``steps``. ``pii`` configures the ``pii`` step (mode, key_env, types); the
    ``decontam`` step is built from ``eval_prompts`` and ``decontam_n`` (default: the step's ``n``), and is left
    out, by the caller, when there are no prompts."""

    pii = dict(pii or {})
    out = []
    for name, params in step_list(steps):
        if name == "pii":
            mode = pii.get("mode", "placeholder")
            out.append(ScrubPII(mode=mode, types=pii.get("types"),
                                key_env=pii.get("key_env") if mode == "pseudonym" else None))
        elif name == "decontam":
            n = {} if decontam_n is None else {"n": decontam_n}
            out.append(Decontaminate({"scenario_test": list(eval_prompts or [])}, **n))
        elif name in STEPS:
            try:
                out.append(STEPS[name](**params))
            except TypeError as e:
                raise ValueError(f"step {name}: {e}") from None
        else:
            raise ValueError(f"unknown step {name!r} (allowed: {', '.join(STEPS)})")
    return out


def private_steps_problem(names: Sequence[str]) -> str | None:
    """Why the step ``names`` (in order) cannot clean a private corpus, or None: ``pii`` is required and only
    ``normalize`` may precede it, so that no example of a removed record (stats, card) shows raw PII."""
    if "pii" not in names:
        return "the private corpus needs the 'pii' step"
    before = [n for n in names[: list(names).index("pii")] if n != "normalize"]
    if before:
        return (f"only 'normalize' may come before 'pii' in the private corpus (found '{before[0]}': its removed "
                "examples would show raw PII)")
    return None


# ---------------------------------------------------------------------------------------------------
# stats helpers


def _save(dd, folder: Path) -> None:
    """Save a DatasetDict and load it back (a folder that cannot be read must never be swapped in)."""
    from datasets import load_from_disk

    dd.save_to_disk(str(folder))
    back = load_from_disk(str(folder))
    if {k: len(v) for k, v in back.items()} != {k: len(v) for k, v in dd.items()}:
        raise AssertionError(f"{folder}: saved splits do not load back with the same sizes")


def _length_summary(values: list[int]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)
    return {"n": len(v), "min": v[0], "p50": v[len(v) // 2], "p95": v[int(len(v) * 0.95) - 1 if len(v) > 1 else 0],
            "max": v[-1], "mean": round(sum(v) / len(v), 1)}


def length_histogram(values: Sequence[int], bins: Sequence[int] = LENGTH_BINS) -> dict[str, int]:
    """Counts per character-length bin, labelled ``"lo-hi"`` (the last ``"lo+"``)."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(bins, bins[1:], strict=False)] + [f"{bins[-1]}+"]
    counts = Counter()
    import bisect

    for v in values:
        counts[labels[bisect.bisect_right(bins, v) - 1]] += 1
    return {lab: counts.get(lab, 0) for lab in labels}


def _lengths(stats_values: list[int]) -> dict:
    return {**_length_summary(stats_values), "histogram": length_histogram(stats_values)}


def _scrub_examples(step_stats: list[dict]) -> None:
    """Replace PII in the examples (and boilerplate/poison strings) of steps that ran before ``pii``."""

    def clean(t):
        return scrub_text(t, mode="placeholder")[0] if isinstance(t, str) else t

    for st in step_stats:
        for exs in st.get("examples", {}).values():
            for ex in exs:
                ex["text"] = clean(ex.get("text"))
        if "top_lines" in st:
            st["top_lines"] = [clean(t) for t in st["top_lines"]]
        for s in st.get("suspects", []) or []:
            s["string"] = clean(s["string"])


# ---------------------------------------------------------------------------------------------------
# raw-text / instruction corpora: general, vertical, private


def _texts(ds, field: str) -> list[str]:

    cols = {k: ds[k] for k in (field, "completion") if k in ds.column_names}
    return [text_of({k: v[i] for k, v in cols.items()}, field) for i in range(len(ds))]


def _token_stats(dd, field: str, count_tokens, tokenizer: str) -> dict:
    if count_tokens is None:
        return {"available": False, "reason": tokenizer or "no tokenizer given"}
    by_split, per_record = {}, []
    for name, ds in dd.items():
        counts = list(count_tokens(_texts(ds, field))) if len(ds) else []
        by_split[name] = int(sum(counts))
        per_record += counts
    return {"available": True, "tokenizer": tokenizer, "by_split": by_split, "total": int(sum(by_split.values())),
            "per_record": _length_summary(per_record)}


def _check_invariant(steps: list[dict]) -> None:
    for st in steps:
        if st["in"] != st["kept"] + st["dropped"] + st["quarantined"]:
            raise AssertionError(f"step {st['step']}: in={st['in']} != kept {st['kept']} + dropped {st['dropped']} "
                                 f"+ quarantined {st['quarantined']}")


def build_text_corpus(kind: str, sources: Sequence[dict], out_dir: str | Path, *, steps: Sequence | None = None,
                      pii: dict | None = None, splits: dict | None = None, seed: int = 0, base_dir=None,
                      eval_prompts: Sequence[str] | None = None, decontaminate: bool = True,
                      decontam_n: int | None = None, licence: str = "", on_error: str = "quarantine",
                      num_proc: int = 1, count_tokens: Callable[[list[str]], list[int]] | None = None, tokenizer: str = "") -> dict:
    """Read ``sources``, run ``steps`` (default: ``DEFAULT_STEPS[kind]``), split, write ``out_dir``.

    ``sources``: recipe source dicts (``path`` as in :func:`resolve_source_path`, plus the keys of
    ``banklm.corpora.sources``, plus ``licence``). ``eval_prompts``: the run's scenario test prompts; a
    ``decontam`` step against them (n-grams of ``decontam_n`` characters, default the step's ``n``) is appended
    unless ``decontaminate`` is false or there are none (the stats say which). ``count_tokens(texts) -> [n]`` adds token counts; otherwise ``tokenizer`` says why
    there are none. Returns the stats (also written to ``stats.json``).
    """
    t0 = time.perf_counter()
    if decontam_n is None:
        decontam_n = step_params(Decontaminate)["n"].default
    if kind not in DEFAULT_STEPS:
        raise ValueError(f"unknown corpus kind {kind!r} (allowed: {', '.join(DEFAULT_STEPS)})")
    named = step_list(DEFAULT_STEPS[kind] if steps is None else steps)
    names = [n for n, _ in named]
    decon = {"enabled": bool(decontaminate or "decontam" in names), "n": decontam_n,
             "eval_prompts": len(eval_prompts or [])}
    if decontaminate and "decontam" not in names:
        named.append(("decontam", {}))
    if any(n == "decontam" for n, _ in named) and not eval_prompts:
        named = [s for s in named if s[0] != "decontam"]
        decon["status"] = "skipped: no scenario test prompts in this run"
    elif any(n == "decontam" for n, _ in named):
        decon["status"] = "applied against the user prompts of the scenario test split"
    else:
        decon["status"] = "disabled in the recipe"
    names = [n for n, _ in named]
    step_objs = make_steps(named, pii=pii, eval_prompts=eval_prompts, decontam_n=decontam_n)

    check_sources(sources, base_dir)
    reader_specs = [_spec_for_reader(s, base_dir) for s in sources]
    try:
        ds, rstats, src_q = read_sources(reader_specs, seed=seed, on_error=on_error)
    except ValueError as e:
        raise SourceError(str(e)) from None
    for st, spec in zip(rstats["sources"], sources, strict=True):
        st["path"] = spec["path"]
        st["licence"] = spec.get("licence") or licence or "not given in the recipe"
    field = resolve_field(ds, None)
    read_step = {"step": "read", "params": {"sources": len(sources), "on_error": on_error},
                 "in": rstats["records_read"], "kept": rstats["valid"], "dropped": 0,
                 "quarantined": rstats["quarantined_records"], "reasons": {},
                 "quarantine_reasons": rstats["reasons"], "bad_files": rstats["bad_files"], "examples": {},
                 "sampled_by_weight": len(ds)}
    lengths_in = [len(t) for t in _texts(ds, field)]
    step_q: list[dict] = []
    ds, step_stats = run_steps(ds, step_objs, num_proc=num_proc, quarantine=step_q)
    if "pii" in names:
        _scrub_examples(step_stats[: names.index("pii")])
    sp = dict(splits or {})
    fractions = {k: float(sp.get(k, d)) for k, d in DEFAULT_SPLITS.items()}
    fractions = {k: v for k, v in fractions.items() if v > 0}
    split_seed = seed if sp.get("seed") is None else int(sp["seed"])
    if len(ds) == 0:
        left = ", ".join(f"{s['step']} kept {s['kept']}" for s in step_stats)
        raise SourceError(f"{kind} corpus: no record is left after the steps ({left})")
    dd, split_stats = split_ds(ds, fractions, seed=split_seed, stratify=sp.get("stratify", "label"))
    # an empty split cannot be saved and loaded back by datasets: leave it out, and say so
    empty = [k for k, v in dd.items() if len(v) == 0]
    for k in empty:
        del dd[k]
    all_steps = [read_step, *step_stats]
    _check_invariant(all_steps)
    by = {s["step"]: s for s in step_stats}
    stats = {
        "kind": kind,
        "content": field,
        "seed": seed,
        "licence": licence or "not given in the recipe",
        "sources": rstats["sources"],
        "files": rstats["files"],
        "bad_files": rstats["bad_files"],
        "records_read": rstats["records_read"],
        "records_after_weights": read_step["sampled_by_weight"],
        "steps": all_steps,
        "counts": {"in": rstats["records_read"], "kept": len(ds),
                   "dropped": sum(s["dropped"] for s in all_steps),
                   "quarantined": sum(s["quarantined"] for s in all_steps)},
        "splits": {k: len(v) for k, v in dd.items()},
        "empty_splits": empty,
        "split": split_stats,
        "pii": ({"mode": (pii or {}).get("mode", "placeholder"), "counts": by["pii"].get("pii_counts", {}),
                 "records_with_pii": by["pii"].get("records_with_pii", 0)} if "pii" in by else None),
        "dedup": {"exact_duplicate_groups": by.get("exact_dedup", {}).get("duplicate_groups"),
                  "exact_removed": by.get("exact_dedup", {}).get("dropped"),
                  "near_cluster_size_histogram": by.get("near_dedup", {}).get("cluster_size_histogram"),
                  "near_removed": by.get("near_dedup", {}).get("dropped")},
        "decontamination": {**decon, "removed": by.get("decontam", {}).get("dropped", 0)},
        "lengths": {"unit": "characters", "in": _lengths(lengths_in),
                    "out": {k: _lengths([len(t) for t in _texts(v, field)]) for k, v in dd.items()}},
        "encodings": rstats["encodings"],
        "encoding_notes": rstats["encoding_notes"],
        "tokens": _token_stats(dd, field, count_tokens, tokenizer),
        "quarantined": len(src_q) + len(step_q),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    quarantine = [{"stage": "read", **q} for q in src_q] + step_q
    with atomic_dir(out_dir) as tmp:
        _save(dd, tmp / "data")
        atomic_write_json(tmp / "stats.json", stats)
        atomic_write_jsonl(tmp / "quarantine.jsonl", quarantine)
        atomic_write_text(tmp / "card.md", text_card(stats))
    return stats


def build_general(sources: Sequence[dict], out_dir, **kw) -> dict:
    """Broad instruction/chat data (alpaca, sharegpt, messages...): default steps normalize, exact_dedup, quality."""
    return build_text_corpus("general", sources, out_dir, **kw)


def build_vertical(sources: Sequence[dict], out_dir, **kw) -> dict:
    """Finance text: default steps normalize, boilerplate, exact_dedup, near_dedup, quality."""
    return build_text_corpus("vertical", sources, out_dir, **kw)


def build_private(sources: Sequence[dict], out_dir, **kw) -> dict:
    """The bank's own documents: default steps normalize, pii, exact_dedup, near_dedup, quality.

    The ``pii`` step is required and only ``normalize`` may precede it, so that no example of a removed
    record (stats, card) shows raw PII; the quarantine holds file, line and reason, never content.
    """
    steps = kw.get("steps")
    problem = private_steps_problem([n for n, _ in step_list(DEFAULT_STEPS["private"] if steps is None else steps)])
    if problem:
        raise ValueError(f"steps: {problem}")
    return build_text_corpus("private", sources, out_dir, **kw)


# ---------------------------------------------------------------------------------------------------
# scenario: generators + the bank's own labelled tables


def _prompt_key(record: dict) -> str:
    user = "".join(m["content"] for m in record["messages"] if m["role"] == "user")
    return hashlib.sha256(" ".join(user.split()).encode("utf-8")).hexdigest()


def _table_name(table: dict, i: int, n: int) -> str:
    return table.get("name") or ("bank" if n == 1 else f"bank{i + 1}")


def _table_where(table: dict) -> str:
    return f"scenario table {table['path']!r}" + (f" (sheet {table['sheet']!r})" if table.get("sheet") else "")


def _read_bank_table(table: dict, i: int, n: int, base_dir, seed: int, scrub=None) -> tuple[Path, TableRecords]:
    p = resolve_table_path(table["path"], base_dir)
    try:
        res = read_task_table(table["task"], p, table.get("column_map") or None, split=_table_name(table, i, n),
                              seed=seed, limit=table.get("limit"), sheet=table.get("sheet"), scrub=scrub)
    except (ValueError, KeyError, OSError) as e:
        raise SourceError(f"{_table_where(table)}: {e}") from None
    for q in res.quarantine:
        q.update({"stage": "table", "task": table["task"], "file": table["path"]})
    return p, res


def _auto_fractions(tables: Sequence[dict], table: dict, splits: dict | None) -> dict[str, float]:
    """The fractions a ``split: auto`` table is cut by: no test part when a table of the same task is the test
    split (the recommended way: the bank's own held-out table)."""
    sp = dict(splits or {})
    fr = {k: float(sp.get(k, d)) for k, d in DEFAULT_SPLITS.items()}
    if any(t.get("split") == "test" and t["task"] == table["task"] for t in tables):
        fr["test"] = 0.0
    return {k: v for k, v in fr.items() if v > 0}


def _split_sizes(n: int, fractions: dict[str, float], min_test: int) -> dict[str, int]:
    total = sum(fractions.values())
    n_test = max(min_test, round(n * fractions.get("test", 0.0) / total)) if fractions.get("test") else 0
    n_val = round(n * fractions.get("validation", 0.0) / total) if fractions.get("validation") else 0
    return {"test": n_test, "validation": n_val, "train": n - n_test - n_val}


def stratified_split(labels: Sequence[str], fractions: dict[str, float], seed: int, min_test: int,
                     where: str) -> dict[str, list[int]]:
    """Indices per split, cut label by label (each shuffled with ``seed``): at least ``min_test`` rows of every
    label in test (when there is a test part) and as many left for training; SourceError naming the label and
    the shortfall when a label has too few rows."""
    import numpy as np

    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(str(lab), []).append(i)
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {k: [] for k in ("train", "validation", "test")}
    for lab in sorted(groups):
        idx = groups[lab]
        n = len(idx)
        sizes = _split_sizes(n, fractions, min_test)
        if sizes["test"] and sizes["train"] < min_test:
            need = n
            while _split_sizes(need, fractions, min_test)["train"] < min_test:
                need += 1
            nv = _split_sizes(need, fractions, min_test)["validation"]
            raise SourceError(f"{where}: label {lab} has {n} rows; a test split with {min_test} per label needs at "
                              f"least {need} rows of it ({min_test} test, {nv} validation, {min_test} train), or "
                              "give a separate test table (split: test), or lower min_test_per_label")
        order = [idx[j] for j in rng.permutation(n)]
        out["test"] += order[: sizes["test"]]
        out["validation"] += order[sizes["test"]: sizes["test"] + sizes["validation"]]
        out["train"] += order[sizes["test"] + sizes["validation"]:]
    return {k: sorted(v) for k, v in out.items()}


def _split_seed(splits: dict | None, seed: int) -> int:
    sp = dict(splits or {})
    return seed if sp.get("seed") is None else int(sp["seed"])


def check_tables(tables: Sequence[dict], base_dir=None, *, seed: int = 0, splits: dict | None = None) -> list[Path]:
    """Read every table as the build will (without the PII step) and raise :class:`SourceError` for what no
    build can use: a missing file or sheet, missing columns, a label column mostly outside the label set, mostly
    bad rows, an automatic split that cannot hold ``min_test_per_label`` rows of each label in test."""

    paths = []
    for i, t in enumerate(tables):
        p, res = _read_bank_table(t, i, len(tables), base_dir, seed)
        if t.get("split", "auto") == "auto":
            labelled = [r["label"] for r in res.records if r["target"] != TARGET_NONE]
            stratified_split(labelled, _auto_fractions(tables, t, splits), _split_seed(splits, seed),
                             int(t.get("min_test_per_label") or MIN_TEST_PER_LABEL), _table_where(t))
        paths.append(p)
    return paths


def _table_scrub(pii: dict | None):
    """Free-text values of a bank table -> the PII step's ``scrub_text`` with the corpus's settings."""
    pii = dict(pii or {})
    mode = pii.get("mode") or "placeholder"
    types, key_env = pii.get("types"), pii.get("key_env") or "BANKLM_PII_KEY"
    if mode in ("pseudonym", "hash") and not os.environ.get(key_env):
        raise SourceError(f"corpora.scenario.pii: environment variable {key_env} (key_env) is not set or empty")

    def scrub(text: str):
        return scrub_text(text, mode=mode, types=types, key_env=key_env)

    return scrub


def _table_records(tables: Sequence[dict], seed: int, base_dir, steps, pii, splits, num_proc):
    """(records per split, unlabelled records, step stats, source entries, quarantine) of the bank tables."""
    from datasets import Dataset

    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    unlabelled: list[dict] = []
    sources, q = [], []
    step_stats: list[dict] = []
    scrub = _table_scrub(pii) if any(t.get("pii", True) for t in tables) else None
    for i, t in enumerate(tables):
        _, res = _read_bank_table(t, i, len(tables), base_dir, seed, scrub if t.get("pii", True) else None)
        q += res.quarantine
        recs = res.records
        if steps and recs:
            ds, st = run_steps(Dataset.from_list(recs), make_steps(steps, pii=pii), num_proc=num_proc, quarantine=q)
            for one in st:
                one["step"] = f"tables:{one['step']}"
            step_stats += st
            recs = ds.to_list()
        labelled = [r for r in recs if r["target"] != TARGET_NONE]
        unlabelled += [r for r in recs if r["target"] == TARGET_NONE]
        where = t.get("split", "auto")
        if where == "auto":
            parts = stratified_split([r["label"] for r in labelled], _auto_fractions(tables, t, splits),
                                     _split_seed(splits, seed), int(t.get("min_test_per_label") or MIN_TEST_PER_LABEL),
                                     _table_where(t))
            for s, idx in parts.items():
                out[s] += [labelled[j] for j in idx]
        else:
            out[where] += labelled
        sources.append({"type": "table", "task": t["task"], "path": t["path"], "name": _table_name(t, i, len(tables)),
                        "sheet": t.get("sheet"), "records": len(labelled),
                        "unlabelled": sum(1 for r in recs if r["target"] == TARGET_NONE), "split": where,
                        "licence": t.get("licence") or "not given in the recipe", **{
                            k: res.stats[k] for k in ("rows", "quarantined", "targets", "label_source",
                                                      "missing_values")},
                        "pii": res.stats["pii"] if t.get("pii", True) else "off for this table (pii: false)"})
    return out, unlabelled, step_stats, sources, q


def build_scenario(synth: dict[str, dict], seed: int, out_dir: Path, licence: str = "", *,
                   tables: Sequence[dict] | None = None, steps: Sequence | None = None, pii: dict | None = None,
                   splits: dict | None = None, base_dir=None, num_proc: int = 1,
                   count_tokens: Callable[[list[str]], list[int]] | None = None, tokenizer: str = "") -> dict:
    """Generate the scenario corpus from the task generators (and the bank's tables) and write ``out_dir``.

    ``synth`` maps a task name to ``{train, validation, test, difficulty}``. ``tables``: dicts of
    ``{path, task, column_map, split (auto|train|validation|test), limit, name, licence, sheet, pii,
    min_test_per_label}`` read with ``banklm.tasks.tables.read_task_table``: their free-text values pass the PII
    step (``pii`` settings, placeholder by default; a table's ``pii: false`` turns it off), bad rows are
    quarantined, rows with an empty label go to the split ``unlabelled`` (the distillation teacher's prompts,
    never trained or evaluated on). ``steps`` (e.g. ``["normalize"]``) run on the table records only, and
    ``split: auto`` tables are cut by ``splits`` fractions, label by label, with at least ``min_test_per_label``
    rows of each label in test (no test part when a table of the task is the test split). Training, validation
    and unlabelled records whose prompt also appears in the test split are dropped (exact decontamination).
    """
    from datasets import Dataset, DatasetDict

    splits_out: dict[str, list[dict]] = {s: [] for s in ALL_SPLITS}
    for task, spec in synth.items():
        for split in SPLITS:
            n = int(spec.get(split, 0))
            if n:
                splits_out[split].extend(generate_records(task, n, seed=seed, split=split,
                                                          difficulty=float(spec.get("difficulty", 0.0))))
        if int(spec.get("test_prevalence", 0)):  # at the spec's real-world label shares
            splits_out["test_prevalence"].extend(generate_records(
                task, int(spec["test_prevalence"]), seed=seed, split="test_prevalence",
                difficulty=float(spec.get("difficulty", 0.0)), prevalence=get_task(task).prevalence))
    table_stats, table_sources, table_q = [], [], []
    if tables:
        per, splits_out["unlabelled"], table_stats, table_sources, table_q = _table_records(
            tables, seed, base_dir, steps, pii, splits, num_proc)
        for s in SPLITS:
            splits_out[s].extend(per[s])
    steps_stats = list(table_stats)
    test_keys = {_prompt_key(r) for s in ("test", "test_prevalence") for r in splits_out[s]}
    for split in ("train", "validation", "unlabelled"):
        if split == "unlabelled" and not splits_out[split]:
            continue
        before = len(splits_out[split])
        kept, dropped = [], 0
        seen: set[str] = set()
        for r in splits_out[split]:
            k = _prompt_key(r)
            if k in test_keys or k in seen:
                dropped += 1
                continue
            seen.add(k)
            kept.append(r)
        splits_out[split] = kept
        steps_stats.append({"step": f"exact_dedup_and_decontam[{split}]", "in": before, "kept": len(kept),
                            "dropped": dropped, "quarantined": 0,
                            "reason": "prompt duplicates another record or a test prompt"})
    ids = Counter(r["id"] for s in ALL_SPLITS for r in splits_out[s])
    dup_ids = [i for i, c in ids.items() if c > 1]
    if dup_ids:
        raise ValueError(f"scenario corpus has duplicate ids, e.g. {dup_ids[0]} (give each table a distinct name)")
    _check_invariant(steps_stats)
    present = [s for s in ALL_SPLITS if s in SPLITS or splits_out[s]]
    tasks = sorted({r["task"] for s in present for r in splits_out[s]} | set(synth))
    stats = {
        "kind": "scenario",
        "sources": [{"type": "synth", "task": t, **spec} for t, spec in synth.items()] + table_sources,
        "splits": {s: len(splits_out[s]) for s in present},
        "by_task": {s: dict(Counter(r["task"] for r in splits_out[s])) for s in present},
        "by_label": {s: {t: dict(Counter(r["label"] for r in splits_out[s] if r["task"] == t)) for t in tasks}
                     for s in present if s != "unlabelled"},
        "by_source": {s: dict(Counter(_record_source(r) for r in splits_out[s])) for s in present},
        "targets": {s: dict(Counter(r.get("target", "answer") for r in splits_out[s])) for s in present},
        "steps": steps_stats,
        "chars": {s: _length_summary([_chars(r) for r in splits_out[s]]) for s in present},
        "lengths": {"unit": "characters",
                    "out": {s: _lengths([_chars(r) for r in splits_out[s]]) for s in present}},
        "encoding": {"utf-8": sum(len(v) for v in splits_out.values())},
        "quarantined": len(table_q),
    }
    if tables:
        pii_counts: Counter = Counter()
        for src in table_sources:
            if isinstance(src["pii"], dict):
                pii_counts.update(src["pii"]["counts"])
        stats["pii"] = {"mode": (pii or {}).get("mode") or "placeholder", "applied_to": "free-text values of the "
                        "bank tables (text fields, prompt and reason columns), before rendering; not the synthetic "
                        "records", "counts": dict(sorted(pii_counts.items())),
                        "values_scrubbed": sum(s["pii"]["values_scrubbed"] for s in table_sources
                                               if isinstance(s["pii"], dict))}
    dd = DatasetDict({s: Dataset.from_list(splits_out[s]) for s in ALL_SPLITS if splits_out[s]})
    if count_tokens is not None:
        stats["tokens"] = _token_stats(dd, "messages", count_tokens, tokenizer)
    else:
        stats["tokens"] = {"available": False, "reason": tokenizer or "no tokenizer given"}
    with atomic_dir(out_dir) as tmp:
        _save(dd, tmp / "data")
        atomic_write_json(tmp / "stats.json", stats)
        atomic_write_jsonl(tmp / "quarantine.jsonl", table_q)
        atomic_write_text(tmp / "card.md", scenario_card(stats, licence))
    return stats


def _record_source(record: dict) -> str:
    """``synthetic`` or the bank table a record came from (its file name, as the evaluation groups them)."""
    meta = record.get("meta")
    if isinstance(meta, str) and '"source"' in meta:
        return str(json.loads(meta).get("source") or "synthetic")
    return "synthetic"


def _chars(record: dict) -> int:
    return sum(len(m["content"]) for m in record["messages"])


# ---------------------------------------------------------------------------------------------------
# mix


def build_mix(corpus_dirs: dict[str, str | Path], proportions: dict[str, float], out_dir: str | Path,
              total: int | None = None, seed: int = 0) -> dict:
    """Mix the ``train`` (to ``total`` records) and ``validation`` splits of built corpora by target
    ``proportions`` (``banklm.corpora.mix.mix``: up/down-sampling, copies get ``#2``... ids) into ``out_dir``.

    When all corpora hold the same content (``text`` or ``messages``) the mix has that column; when raw
    text and instruction corpora are mixed, every record has both ``text`` (None for instruction records)
    and ``messages`` (empty for raw text) so the trainer renders each row by what it holds. ``source``
    names the corpus kind of every record.
    """
    from datasets import DatasetDict, Features, Value, load_from_disk


    loaded = {k: load_from_disk(str(Path(d) / "data")) for k, d in corpus_dirs.items() if proportions.get(k)}
    content = {k: ("messages" if "messages" in dd[next(iter(dd))].column_names else "text")
               for k, dd in loaded.items()}
    both = len(set(content.values())) > 1
    msg_feature = [{"role": Value("string"), "content": Value("string")}]

    def project(ds, kind):
        col = content[kind]
        ds = ds.select_columns(["id", col])
        if not both:
            return ds
        n = len(ds)
        if col == "text":
            ds = ds.add_column("messages", [[] for _ in range(n)], feature=msg_feature)
        else:
            ds = ds.add_column("text", [None] * n, feature=Value("string"))
        return ds.cast(Features({"id": Value("string"), "text": Value("string"), "messages": msg_feature}))

    out, stats = {}, {"proportions": dict(proportions), "seed": seed, "content": sorted(set(content.values())),
                      "both_columns": both, "splits": {}}
    for split, want in (("train", total), ("validation", None)):
        parts = {k: project(dd[split], k) for k, dd in loaded.items() if split in dd and len(dd[split])}
        missing = [k for k in loaded if k not in parts]
        if missing:
            if split == "train":
                raise ValueError(f"mix: corpus {missing[0]} has no train records")
            stats["splits"][split] = {"skipped": f"no {split} split in {', '.join(missing)}"}
            continue
        ds, st = mix(parts, {k: proportions[k] for k in parts}, total=want, seed=seed)
        out[split] = ds
        stats["splits"][split] = st
    dd = DatasetDict(out)
    with atomic_dir(out_dir) as tmp:
        _save(dd, tmp / "data")
        atomic_write_json(tmp / "stats.json", stats)
        atomic_write_jsonl(tmp / "quarantine.jsonl", [])
        atomic_write_text(tmp / "card.md", mix_card(stats))
    return stats
