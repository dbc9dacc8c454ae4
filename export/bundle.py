"""The export bundle: convert, verify, evaluate and checksum everything a serving host needs, in one folder.

::

    export/
      gguf/<name>-<type>.gguf + <name>-<type>.Modelfile   (one Ollama Modelfile per GGUF)
      onnx/<type>/model.onnx + config, generation config, tokenizer, chat template
      eval/<artefact>/results.json + predictions.jsonl    (task evaluation of each artefact, and of PyTorch)
      eval/<artefact>/<decoding>/results.json + ...        (the same records decoded the other way: free or
                                                            constrained, when both are asked for)
      verify.json                                          (every check and figure, see docs/export.md)
      tasks/<name>.yaml                                    (the specs of its tasks: evaluated and served without
                                                            the recipe; banklm.tasks.resolve_task finds them)
      grammar/<name>.gbnf                                  (each task's answer grammar, static part: a serving
                                                            host adds the request's numbers, docs/export.md)
      operating_point.json                                 (each task's abstention threshold and temperature,
                                                            when given: applied wherever the bundle is scored)
      MODEL_CARD.md                                        (when given)
      SHA256SUMS                                           (``cd export && sha256sum -c SHA256SUMS``)

:func:`build_export` writes the folder atomically (a failed conversion leaves the previous bundle in
place) and returns the verification summary; a failed *check* still writes the bundle, so
``verify.json`` shows what failed, and the caller decides the exit code. :func:`verify_export`
re-checks an existing folder (checksums, then every artefact against the model) without writing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from banklm.finetune.tokenizer import load_tokenizer

from banklm.evaluation.confidence import OPERATING_POINT_FILE, save_operating_point
from banklm.evaluation.evaluate import DECODINGS, evaluate_artefact, evaluate_model_dir
from banklm.evaluation.evidence import paired_comparison
from banklm.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    sha256_file,
)
from banklm.runtime import OnnxCausalLM, context_length, open_gguf, stop_token_ids
from banklm.tasks import SPECS_FOLDER, Task, carried_specs, carry_specs
from banklm.tasks.base import iter_user_messages
from banklm.tasks.grammar import task_grammar
from banklm.tasks.registry import task_from_spec

from .gguf import export_gguf
from .ollama import UNCONSTRAINED_NOTE, write_modelfile
from .onnx import DEFAULT_OPSET, export_onnx
from .verify import verify_gguf, verify_onnx

log = logging.getLogger(__name__)

SUMS_FILE = "SHA256SUMS"
VERIFY_FILE = "verify.json"
GRAMMAR_FOLDER = "grammar"


# --------------------------------------------------------------------------------------------------
# checksums
# --------------------------------------------------------------------------------------------------


def _bundle_files(folder: Path) -> list[Path]:
    return sorted((f for f in folder.rglob("*") if f.is_file() and f.name != SUMS_FILE),
                  key=lambda f: f.relative_to(folder).as_posix())


def write_sha256sums(folder: str | os.PathLike) -> Path:
    """``SHA256SUMS`` for every file under ``folder`` (``sha256sum -c`` format, paths relative)."""
    folder = Path(folder)
    lines = [f"{sha256_file(f)}  {f.relative_to(folder).as_posix()}" for f in _bundle_files(folder)]
    return atomic_write_text(folder / SUMS_FILE, "\n".join(lines) + "\n")


def check_sha256sums(folder: str | os.PathLike) -> list[str]:
    """Problems found re-hashing ``folder`` against its ``SHA256SUMS`` (empty list: intact)."""
    folder = Path(folder)
    sums = folder / SUMS_FILE
    if not sums.is_file():
        return [f"{sums}: missing"]
    problems, listed = [], set()
    for n, line in enumerate(sums.read_text(encoding="utf-8").splitlines(), 1):
        m = re.fullmatch(r"([0-9a-f]{64})  (.+)", line)
        if not m:
            problems.append(f"{SUMS_FILE} line {n}: not '<sha256>  <path>'")
            continue
        digest, rel = m.groups()
        listed.add(rel)
        f = folder / rel
        if ".." in Path(rel).parts or not f.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(f) != digest:
            problems.append(f"{rel}: sha256 differs from {SUMS_FILE} (file changed after export)")
    for f in _bundle_files(folder):
        rel = f.relative_to(folder).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: not listed in {SUMS_FILE}")
    return problems


# --------------------------------------------------------------------------------------------------
# task evaluation of an artefact
# --------------------------------------------------------------------------------------------------


#: per task, per decoding (coverage and accuracy on the answered cases at the bundle's operating point, when the
#: decoding has label scores)
TASK_FIGURES = ("accuracy", "format_compliance", "unsupported_number_rate", "coverage", "answered_accuracy")


def _paired(a_dir: Path, b_dir: Path, names: tuple[str, str]) -> dict:
    """Accuracy difference of two scorings of the same records (a - b) with its paired 95% interval and McNemar's
    p-value, overall and per task (banklm.evaluation.evidence)."""
    res = paired_comparison(list(read_jsonl(a_dir / "predictions.jsonl")), list(read_jsonl(b_dir / "predictions.jsonl")),
                            names)

    def brief(r: dict) -> dict:
        d = r["difference"]
        return {"difference": d["difference"], "low": d["low"], "high": d["high"], "p_value": r["mcnemar"]["p_value"],
                "n": d["n"]}

    return {"names": list(names), **(brief(res["overall"]) if "overall" in res else {"n": 0}),
            "tasks": {t: brief(r) for t, r in res["tasks"].items()}}


def task_summary(results: dict, where: str) -> dict:
    """The figures verify.json and the report show for one evaluated model (and decoding)."""
    ov = results.get("overall", {})
    tasks = results.get("tasks", {})
    return {"results": where, "decoding": results.get("decoding", "free"), "n": ov.get("n"),
            "accuracy": ov.get("accuracy"), "per_task": {t: r.get("accuracy") for t, r in tasks.items()},
            "tasks": {t: {k: r.get(k) for k in TASK_FIGURES} for t, r in tasks.items()},
            "format_compliance": ov.get("format_compliance"), "tokens_per_s": ov.get("tokens_per_s")}


# --------------------------------------------------------------------------------------------------
# the bundle
# --------------------------------------------------------------------------------------------------


def build_export(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str,
    prompts: Sequence[str],
    gguf_quant: Sequence[str] = (),
    onnx_quant: Sequence[str] = (),
    opset: int = DEFAULT_OPSET,
    records: Sequence[dict] | None = None,
    eval_batch_size: int = 32,
    eval_max_new_tokens: int = 128,
    max_accuracy_drop: float | None = None,
    device: str = "cpu",
    system: str | None = None,
    num_ctx: int | None = None,
    tasks: Sequence[str | Task] = (),
    model_card: str | Callable[[dict], str] | None = None,
    decodings: Sequence[str] = ("free",),
    operating_point: dict | None = None,
) -> dict:
    """Export ``model_dir`` to ``out_dir`` as GGUF (``gguf_quant``) and ONNX (``onnx_quant``), verify every
    artefact on ``prompts``, evaluate each (and the PyTorch model) on ``records`` when given, write the
    Modelfiles, ``verify.json``, the task specs, the model card (text, or a function of the summary) and
    ``SHA256SUMS``.

    The bundle carries ``tasks/<name>.yaml``: the specs ``model_dir`` carries, plus those of ``tasks`` and of
    the records' tasks (these as registered now, which is what the records were scored with), and each one's
    answer grammar ``grammar/<name>.gbnf``.

    ``decodings``: how the records are answered (``free``, ``constrained``), the first being the one the
    accuracy check and ``task_eval`` report; each further one is scored into ``eval/<artefact>/<decoding>/``,
    every one summarised under ``task_eval.by_decoding``.

    ``operating_point`` (:mod:`banklm.evaluation.confidence`: each task's abstention threshold and temperature,
    chosen on the validation split) is written to ``operating_point.json`` and applied to every scoring: each
    artefact's coverage and accuracy on the answered cases at that threshold (quantization shifts confidences).

    Returns the summary written to ``verify.json``: ``passed``, ``failures`` (each naming the artefact
    and the check), and one entry per artefact under ``gguf`` / ``onnx``. Conversion errors raise (the
    previous bundle stays); check failures do not.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not gguf_quant and not onnx_quant:
        raise ValueError("build_export: nothing to export (no GGUF and no ONNX quant)")
    decodings = list(dict.fromkeys(decodings))
    if not decodings or not set(decodings) <= set(DECODINGS):
        raise ValueError(f"build_export: decodings must be among {', '.join(DECODINGS)}, got {decodings}")
    tok = load_tokenizer(model_dir)
    eos_ids = stop_token_ids(model_dir)
    num_ctx = int(num_ctx or context_length(model_dir))
    prompts = list(prompts)
    try:  # the model as the run folder (the bundle's parent) sees it, when it lives there
        model_ref = model_dir.resolve().relative_to(out_dir.resolve().parent).as_posix()
    except ValueError:
        model_ref = str(model_dir.resolve())
    summary: dict = {"model_dir": model_ref, "prompts": len(prompts), "gguf": [], "onnx": [],
                     "export_seconds": {}, "failures": []}

    with atomic_dir(out_dir) as tmp:
        def rel(p: Path) -> str:  # as the run folder (the bundle's parent) sees it
            return f"{out_dir.name}/{p.relative_to(tmp).as_posix()}"

        artefacts: list[tuple[str, str, Path]] = []  # (kind, quant, path)
        if gguf_quant:
            t0 = time.perf_counter()
            files = export_gguf(model_dir, tmp / "gguf", quant=tuple(gguf_quant), name=name)
            summary["export_seconds"]["gguf"] = round(time.perf_counter() - t0, 3)
            stops = [t for t in tok.convert_ids_to_tokens(eos_ids) if t]
            for f, q in zip(files, gguf_quant, strict=True):
                write_modelfile(f, tok.chat_template, f.with_suffix(".Modelfile"), system=system,
                                stop_tokens=stops, num_ctx=num_ctx, parameters={"temperature": 0},
                                comments=[UNCONSTRAINED_NOTE])
                artefacts.append(("gguf", q, f))
        if onnx_quant:
            t0 = time.perf_counter()
            folders = export_onnx(model_dir, tmp / "onnx", quant=tuple(onnx_quant), opset=opset)
            summary["export_seconds"]["onnx"] = round(time.perf_counter() - t0, 3)
            artefacts += [("onnx", q, d / "model.onnx") for d, q in zip(folders, onnx_quant, strict=True)]

        for kind, q, path in artefacts:
            if kind == "gguf":
                check = verify_gguf(model_dir, path, prompts, q)
            else:
                check = verify_onnx(model_dir, path.parent, prompts, q)
            for key in (kind, "model_dir", "quant"):  # the entry's file and type say them
                check.pop(key, None)
            # verify.json keeps its field name "type" (read by the report and the model card)
            summary[kind].append({"file": rel(path), "type": q, **check})

        if operating_point is not None:
            save_operating_point(tmp, operating_point)
            summary["operating_point"] = {"file": rel(tmp / OPERATING_POINT_FILE), **{
                k: operating_point.get(k) for k in ("target_accuracy", "min_confidence", "fitted_on")},
                "tasks": {t: {k: v.get(k) for k in ("threshold", "temperature", "abstain_value")}
                          for t, v in operating_point["tasks"].items()}}
        if records:
            _evaluate_bundle(summary, model_dir, tok, list(records), artefacts, tmp, rel, decodings=decodings,
                             device=device, batch_size=eval_batch_size, max_new_tokens=eval_max_new_tokens,
                             eos_ids=eos_ids, num_ctx=num_ctx, max_accuracy_drop=max_accuracy_drop,
                             operating_point=operating_point)

        for kind in ("gguf", "onnx"):
            for c in summary[kind]:
                summary["failures"] += [f"{kind} {c['type']} ({c['file']}): {f}" for f in c["failures"]]
        summary["passed"] = not summary["failures"]
        summary["tasks"] = _carry_task_specs(model_dir, tmp, [*tasks, *(r["task"] for r in records or ())])
        summary["grammars"] = _write_grammars(tmp, rel)
        atomic_write_json(tmp / VERIFY_FILE, summary)
        card = model_card(summary) if callable(model_card) else model_card
        if card:
            atomic_write_text(tmp / "MODEL_CARD.md", card)
        write_sha256sums(tmp)
    return summary


def _evaluate_bundle(summary: dict, model_dir: Path, tok, records: list[dict], artefacts, tmp: Path, rel, *,
                     decodings: Sequence[str], device: str, batch_size: int, max_new_tokens: int, eos_ids,
                     num_ctx: int, max_accuracy_drop: float | None, operating_point: dict | None = None) -> None:
    """Score the PyTorch model and every artefact on ``records``, once per decoding; fill ``summary``."""
    ev = tmp / "eval"

    def where(aid: str, d: str) -> Path:  # the first decoding at eval/<aid>/, the others one folder down
        return ev / aid if d == decodings[0] else ev / aid / d

    by = {d: task_summary(evaluate_model_dir(model_dir, records, where("pytorch", d), device=device,
                                             batch_size=batch_size, max_new_tokens=max_new_tokens,
                                             model_name="pytorch", decoding=d, operating_point=operating_point),
                          rel(where("pytorch", d) / "results.json")) for d in decodings}
    summary["task_eval"] = {"records": len(records), "tasks": sorted({r["task"] for r in records}),
                            "max_new_tokens": max_new_tokens, "decoding": decodings[0],
                            "pytorch": {**by[decodings[0]], "by_decoding": by}}
    if len(decodings) > 1:  # the same records decoded both ways, paired
        summary["task_eval"]["pytorch"]["paired"] = {
            f"{d}_vs_{decodings[0]}": _paired(where("pytorch", d), where("pytorch", decodings[0]), (d, decodings[0]))
            for d in decodings[1:]}
    # llama.cpp refuses prompts longer than its context: size it for the longest record
    longest = max(len(tok.apply_chat_template(iter_user_messages(r), add_generation_prompt=True,
                                              tokenize=True, return_dict=False)) for r in records)
    eval_ctx = max(num_ctx, longest + max_new_tokens + 8)
    base = summary["task_eval"]["pytorch"]["accuracy"]
    for kind, q, path in artefacts:
        entry = next(c for c in summary[kind] if c["type"] == q)
        aid = f"{kind}-{q}"
        try:
            if kind == "gguf":
                lm, runtime = open_gguf(path, eval_ctx)
            else:
                lm, runtime = OnnxCausalLM(path), "onnxruntime (CPU)"
            try:
                by = {d: task_summary(evaluate_artefact(lm, tok, records, where(aid, d), eos_ids=eos_ids,
                                                        batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                        model_name=aid, size={"model_bytes": entry.get("bytes")},
                                                        decoding=d, operating_point=operating_point),
                                      rel(where(aid, d) / "results.json")) for d in decodings}
            finally:
                if hasattr(lm, "close"):
                    lm.close()
        except Exception as e:  # a runtime that cannot answer is a failed check, not a crash
            log.exception("task evaluation of %s failed", aid)
            entry["task_eval"] = {"failures": [f"{type(e).__name__}: {e}"]}
            entry["failures"].append(f"task_eval: {type(e).__name__}: {e}")
            entry["passed"] = False
            continue
        te = {"runtime": runtime, **by[decodings[0]], "by_decoding": by,
              "paired": {f"vs_pytorch_{d}": _paired(where(aid, d), where("pytorch", d), (aid, "pytorch"))
                         for d in decodings}}
        te["accuracy_drop"] = base - te["accuracy"]
        te["failures"] = []
        if max_accuracy_drop is not None and te["accuracy_drop"] > max_accuracy_drop:
            te["failures"].append(f"task accuracy {te['accuracy']:.3f} is {te['accuracy_drop']:.3f} below "
                                  f"PyTorch's {base:.3f} (allowed {max_accuracy_drop})")
        entry["task_eval"] = te
        entry["failures"] += [f"task_eval: {f}" for f in te["failures"]]
        entry["passed"] = entry["passed"] and not te["failures"]


def _write_grammars(bundle: Path, rel) -> dict[str, str]:
    """``grammar/<task>.gbnf`` for every spec the bundle carries: the static answer grammar (layout, labels, a
    reason without digits), what a llama.cpp server is given per request once the request's numbers are
    added (:func:`banklm.tasks.grammar.answer_grammar`). ``{task: {"file" (as the run folder sees it), "bytes",
    "sha256"}}``."""
    out = {}
    for name, spec in carried_specs(bundle).items():
        path = atomic_write_text(bundle / GRAMMAR_FOLDER / f"{name}.gbnf", task_grammar(task_from_spec(spec)))
        out[name] = {"file": rel(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def _carry_task_specs(model_dir: Path, bundle: Path, tasks: Sequence[str | Task]) -> dict[str, str]:
    """Copy the specs ``model_dir`` carries into the bundle, then write those of ``tasks``; ``{name: sha256}``."""
    for name, path in carried_specs(model_dir).items():
        atomic_write_bytes(bundle / SPECS_FOLDER / f"{name}.yaml", path.read_bytes())
    carry_specs(bundle, tasks)
    return {name: sha256_file(path) for name, path in carried_specs(bundle).items()}


def _listed_artefacts(export_dir: Path) -> list[tuple[str, str, Path]]:
    """Artefacts ``verify.json`` declares (kind, type, path); paths are relative to the bundle's parent."""
    data = json.loads((export_dir / VERIFY_FILE).read_text(encoding="utf-8"))
    out = []
    for kind in ("gguf", "onnx"):
        for c in data.get(kind, []):
            rel = Path(c["file"])
            out.append((kind, c["type"], export_dir.joinpath(*rel.parts[1:])))
    return out


def verify_export(model_dir: str | os.PathLike, export_dir: str | os.PathLike, prompts: Sequence[str]) -> dict:
    """Re-check an export folder: ``SHA256SUMS``, then every artefact ``verify.json`` lists against
    ``model_dir`` (tokenizer, logits, greedy generation; no task evaluation). Writes nothing."""

    model_dir, export_dir = Path(model_dir), Path(export_dir)
    out: dict = {"export_dir": str(export_dir), "checksums": check_sha256sums(export_dir), "artefacts": [],
                 "failures": []}
    out["failures"] += [f"checksums: {p}" for p in out["checksums"]]
    if not (export_dir / VERIFY_FILE).is_file():
        out["failures"].append(f"{export_dir / VERIFY_FILE}: missing (not an export folder)")
        out["passed"] = False
        return out
    for kind, t, path in _listed_artefacts(export_dir):
        if kind == "gguf":
            check = verify_gguf(model_dir, path, list(prompts), t)
        else:
            check = verify_onnx(model_dir, path.parent, list(prompts), t)
        out["artefacts"].append({"kind": kind, "type": t, "file": str(path), "passed": check["passed"],
                                 "failures": check["failures"], "logits": check.get("logits"),
                                 "generation": check.get("generation"), "llama_cpp": check.get("llama_cpp")})
        out["failures"] += [f"{kind} {t} ({path.name}): {f}" for f in check["failures"]]
    out["passed"] = not out["failures"]
    return out


__all__ = ["build_export", "verify_export", "write_sha256sums", "check_sha256sums",
           "task_summary", "SUMS_FILE", "VERIFY_FILE", "GRAMMAR_FOLDER"]
