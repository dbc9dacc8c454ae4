"""Score a model on scenario records: generate, parse with the task's parser, compute metrics, write files.

``evaluate_records`` writes ``out_dir/results.json`` and ``out_dir/predictions.jsonl`` (atomically)
and returns the results dict::

    {"model": str, "n": int,
     "tasks": {task: {"n", "accuracy", "macro_f1", "mcc", "confusion", "format_compliance",
                      "parse_rate", "exact_match", "field_accuracy", "hallucination_rate",
                      "unsupported_number_rate", "field_binding_error_rate", "n_bound_numbers",
                      "n_binding_skipped", "mean_answer_chars", "per_branch",
                      "per_class" (every categorical key), "multi_label" (multi-label keys),
                      "positive" (a spec with answer.positive, aml: recall, false_positive_rate, ...),
                      "fairness" or "fairness_skipped" (the spec's protected attributes and favourable
                      value), "by_source" (records from several sources: synthetic, each bank table)
                      }},
                      }},
     "overall": {"n", "accuracy", "macro_accuracy", "format_compliance", "tokens_per_s",
                 "seconds", "new_tokens"},
     "robustness": {kind: {"n", "skipped", "accuracy", "clean_accuracy", "drop", "per_task"}}}  # if asked

``results["decoding"]`` says how the answers were decoded: ``free`` (plain greedy) or ``constrained`` (greedy
under each request's answer grammar, :func:`banklm.tasks.grammar.answer_grammar`: the task's layout and labels,
a bounded reason citing only numbers of the prompt; the labels chosen beforehand by label scoring,
:func:`scored_label_prefixes`, or given as ``label_prefixes``). Under label scoring every prediction row also holds
``scored`` (the chosen keys), ``scored_label``, ``scored_confidence`` and ``label_scores`` (every allowed
combination's probability, per-key confidences) and ``results["label_scoring"]`` says it was used. On a
transformers model each prompt runs through the model once: generation continues from label scoring's KV cache
(:func:`_scored_generation`), and a worker thread prepares the next batch's grammars meanwhile.

``accuracy`` is primary-label accuracy (credit decision, aml typology, audit category); an
unparseable output is wrong. ``exact_match`` additionally needs every categorical field (grade,
conclusion, severity) right. ``format_compliance`` is the share accepted by the strict parser.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from banklm.evaluation import confidence as C
from banklm.evaluation import faithfulness as F
from banklm.evaluation import metrics as M
from banklm.evaluation.constrained import GrammarCache, PreparedGrammar
from banklm.evaluation.generate import GenerationResult, eos_token_ids, generate
from banklm.evaluation.labelscore import label_scores_record, score_label_batches, score_labels
from banklm.finetune.tokenizer import load_tokenizer
from banklm.io import atomic_write_json, atomic_write_jsonl
from banklm.runtime import OnnxCausalLM, generate_chat, onnx_file_bytes, open_gguf, stop_token_ids
from banklm.tasks import get_task
from banklm.tasks.base import fold_fullwidth, iter_user_messages
from banklm.tasks.grammar import (
    answer_grammar,
    binding_names,
    binding_values,
    citable_values,
    support_texts,
    task_units,
)
from banklm.tasks.perturb import PERTURBATIONS, can_perturb, perturb

__all__ = ["score_records", "evaluate_records", "evaluate_model_dir", "load_model_dir", "export_kind",
           "evaluate_export", "DECODINGS", "answer_prefix", "decoding_inputs"]

#: how answers are decoded: plain greedy, or greedy under each request's answer grammar
DECODINGS = ("free", "constrained")

#: per record, the answer's forced start: a prefix text, the chosen labels (``{key: value}``, rendered by
#: :func:`answer_prefix`) or None; a list, or a function of the records as the model sees them (messages folded)
LabelPrefixes = Sequence[str | Mapping | None] | Callable[[list[dict]], Sequence[str | Mapping | None]]


def _loads(x) -> dict:
    if isinstance(x, dict):
        return x
    return json.loads(x) if x else {}


def _support_text(rec: dict) -> str:
    """What a reason may cite numbers from: every message the model saw (system/policy text included), as the
    answer grammar (:mod:`banklm.tasks.grammar`) allows."""
    return "\n".join(support_texts(rec["messages"]))


def score_records(
    records: Sequence[dict], outputs: Sequence[str], *, model_name: str = "model"
) -> tuple[dict, list[dict]]:
    """Metrics for given model outputs (no generation): ``(results, predictions)``."""
    records = list(records)
    if len(records) != len(outputs):
        raise ValueError(f"{len(records)} records but {len(outputs)} outputs")
    preds: list[dict] = []
    by_task: dict[str, list[int]] = {}
    for i, (rec, out) in enumerate(zip(records, outputs, strict=True)):
        task = get_task(rec["task"])
        gold = _loads(rec["gold"])
        parsed = task.parse(out)
        if parsed is None and set(gold) < set(task.answer_keys):
            # a bank's row without reason (target "labels"): scored on the keys its gold has, so an answer that
            # stops after them is not a failure
            parsed = task.parse(out, keys=list(gold))
        g_lab, p_lab = task.primary_label(gold), task.primary_label(parsed)
        cat_keys = task.categorical_keys
        preds.append(
            {
                "id": rec.get("id", str(i)),
                "task": task.name,
                "output": out,
                "parsed": parsed,
                "gold": gold,
                "label": g_lab,
                "pred_label": p_lab,
                "correct": parsed is not None and p_lab == g_lab,
                "exact": parsed is not None and all(parsed.get(k) == gold[k] for k in cat_keys if k in gold),
                "strict_format": task.parse(out, strict=True) is not None,
            }
        )
        by_task.setdefault(task.name, []).append(i)

    tasks_res = {name: _task_metrics(get_task(name), [preds[i] for i in ix], [records[i] for i in ix])
                 for name, ix in by_task.items()}
    n = len(preds)
    results = {
        "model": model_name,
        "n": n,
        "tasks": tasks_res,
        "overall": {
            "n": n,
            "accuracy": sum(p["correct"] for p in preds) / n if n else 0.0,
            "macro_accuracy": (sum(t["accuracy"] for t in tasks_res.values()) / len(tasks_res))
            if tasks_res
            else 0.0,
            "format_compliance": sum(p["strict_format"] for p in preds) / n if n else 0.0,
        },
    }
    return results, preds


def _task_metrics(task, P: list[dict], R: list[dict], *, split_sources: bool = True) -> dict:
    """One task's metrics, each chosen by what its spec declares (never by the task's name); with records from
    several sources (synthetic, each bank table) the same metrics again per source under ``by_source``."""
    gold_l = [p["label"] for p in P]
    pred_l = [p["pred_label"] for p in P]
    cat_keys = task.categorical_keys
    inputs = [_support_text(r) for r in R]
    reasons = [p["parsed"].get(task.reason_key) if p["parsed"] and task.reason_key else None for p in P]
    fa = F.faithfulness(inputs, reasons, allowed=citable_values(task))  # the spec's citable constants too
    for p, bad in zip(P, fa["per_answer"], strict=True):
        p["unsupported_numbers"] = bad
    metas = [_loads(r.get("meta")) for r in R]
    fields = [task.fields_from_meta(m) for m in metas]  # a table row in prompt mode has none: skipped
    fb = F.field_binding(reasons, [None if f is None else binding_values(task, f) for f in fields],
                         binding_names(task), task_units(task))
    for p, bad in zip(P, fb["per_answer"], strict=True):
        p["binding_errors"] = bad
    rl = F.reason_label_consistency(task, reasons, pred_l, fields)
    for p, verdict in zip(P, rl["per_answer"], strict=True):
        p["reason_label"] = verdict["status"] if verdict else None
    res = {
        "n": len(P),
        "accuracy": M.accuracy(gold_l, pred_l),
        "macro_f1": M.macro_f1(gold_l, pred_l, task.label_values),
        "mcc": M.mcc(gold_l, pred_l, task.label_values),
        "confusion": M.confusion_matrix(gold_l, pred_l, task.label_values),
        "format_compliance": sum(p["strict_format"] for p in P) / len(P),
        "parse_rate": sum(p["parsed"] is not None for p in P) / len(P),
        "exact_match": sum(p["exact"] for p in P) / len(P),
        "field_accuracy": {k: _field_accuracy(P, k) for k in cat_keys},
        "per_class": {k: M.per_class_f1([p["gold"][k] for p in _with(P, k)],
                                        [p["parsed"].get(k) if p["parsed"] else None for p in _with(P, k)],
                                        task.values_of(k))
                      for k in cat_keys if k not in task.multi_label_keys},
        "hallucination_rate": fa["hallucination_rate"],
        "unsupported_number_rate": fa["unsupported_number_rate"],
        **{k: fb[k] for k in ("field_binding_error_rate", "n_bound_numbers", "n_binding_skipped")},
        "reasons_without_numbers": fa["n_without_numbers"],
        "reason_label": {k: v for k, v in rl.items() if k != "per_answer"},
        "reason_contradiction_rate": rl["contradiction_rate"],
        "mean_answer_chars": sum(len(p["output"] or "") for p in P) / len(P),
    }
    if task.multi_label_keys:
        res["multi_label"] = {k: M.multi_label_metrics([p["gold"][k] for p in _with(P, k)],
                                                       [p["parsed"].get(k) if p["parsed"] else None
                                                        for p in _with(P, k)],
                                                       task.values_of(k))
                              for k in task.multi_label_keys}
    branches: dict[str, list[bool]] = {}
    for p, m in zip(P, metas, strict=True):
        if "branch" in m:
            branches.setdefault(m["branch"], []).append(p["correct"])
    if branches:
        order = {b: i for i, b in enumerate(task.branches)}
        res["per_branch"] = {b: {"n": len(v), "accuracy": sum(v) / len(v)}
                             for b, v in sorted(branches.items(), key=lambda kv: order.get(kv[0], len(order)))}
    if task.positive is not None:
        res["positive"] = M.positive_class_metrics(
            [p["gold"] for p in P], [p["parsed"] for p in P], task.positive_key, task.positive,
            [k for k in cat_keys if k != task.positive_key])
    res.update(_fairness(task, metas, pred_l, gold_l))
    if split_sources:
        by_source = _by_source(task, P, R, metas)
        if len(by_source) > 1:
            res["by_source"] = by_source
    return res


def _with(P: list[dict], key: str) -> list[dict]:
    """The predictions whose gold has ``key`` (a bank's row without a value for it is not scored on it)."""
    return [p for p in P if key in p["gold"]]


def _field_accuracy(P: list[dict], key: str) -> float | None:
    scored = _with(P, key)
    if not scored:
        return None
    return sum(1 for p in scored if p["parsed"] and p["parsed"].get(key) == p["gold"][key]) / len(scored)


def _fairness(task, metas: list[dict], pred_l: list, gold_l: list) -> dict:
    """Fairness over the spec's protected attributes (numeric ones by their declared bands), for the spec's
    favourable value; when it cannot be computed, ``fairness_skipped`` says why."""
    if not task.protected:
        return {"fairness_skipped": "the task spec declares no protected attribute"}
    if task.favourable is None:
        return {"fairness_skipped": "the task spec declares no favourable value (answer.favourable)"}
    groups = {a: [m[a] for m in metas] for a in task.protected if all(a in m for m in metas)}
    missing = [a for a in task.protected if a not in groups]
    if not groups:
        return {"fairness_skipped": f"the records lack the protected attributes ({', '.join(missing)})"}
    return {"fairness": M.fairness(groups, pred_l, gold_l, favourable=task.favourable)}


def _by_source(task, P: list[dict], R: list[dict], metas: list[dict]) -> dict:
    """Every metric of :func:`_task_metrics` per data source (``synthetic``, or the bank table a record came
    from): a bank's rows are judged on their own, not averaged into the generated ones."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(metas):
        groups.setdefault(str(m.get("source") or "synthetic"), []).append(i)
    if len(groups) < 2:
        return {s: {"n": len(ix)} for s, ix in groups.items()}
    return {s: _task_metrics(task, [P[i] for i in ix], [R[i] for i in ix], split_sources=False)
            for s, ix in sorted(groups.items())}


def _messages(records: Sequence[dict], fold_inputs: bool = True) -> list[list[dict]]:
    """The conversations to generate from; user turns folded like the training corpora (see
    :func:`banklm.tasks.base.fold_fullwidth`) unless ``fold_inputs`` is off."""
    convs = [iter_user_messages(r) for r in records]
    if not fold_inputs:
        return convs
    return [[{**m, "content": fold_fullwidth(m["content"])} if m["role"] == "user" else m for m in c]
            for c in convs]


def answer_prefix(task, labels: Mapping) -> str:
    """The start of an answer with the given labels, in the layout of :meth:`Task.format_answer`: every answer
    key in order while ``labels`` has it, then the next key's name (``结论：拒绝；风险等级：C；理由：``), so
    the rest is generated under the grammar conditioned on the labels. A multi-label value is a list."""
    keys = list(itertools.takewhile(lambda k: k in labels, task.answer_keys))
    text = task.format_answer(labels, keys)
    if len(keys) == len(task.answer_fields):
        return text
    return text + ("；" if keys else "") + f"{task.answer_fields[len(keys)].zh}："


def request_grammar(record: Mapping, conv: Sequence[dict]) -> str:
    """The answer grammar of one record over the messages the model sees (its fields bind reason numbers)."""
    task = get_task(record["task"])
    return answer_grammar(task, conv, fields=task.fields_from_meta(_loads(record.get("meta"))))


def _request_key(record: Mapping, conv: Sequence[dict]) -> tuple:
    """What a request's grammar depends on: its task, the messages the model sees and its fields."""
    return (record["task"], json.dumps(list(conv), ensure_ascii=False, sort_keys=True),
            json.dumps(_loads(record.get("meta")), ensure_ascii=False, sort_keys=True, default=str))


def decoding_inputs(records: Sequence[dict], convs: Sequence[Sequence[dict]], decoding: str,
                    label_prefixes: LabelPrefixes | None = None) -> dict:
    """The keyword arguments the generation functions take for ``decoding``: nothing for free decoding; for
    constrained decoding each record's answer grammar over the messages the model sees (``convs``) and, when
    ``label_prefixes`` gives them, the answers' forced starts (the labels chosen by label scoring)."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    if decoding == "free":
        if label_prefixes is not None:
            raise ValueError("label_prefixes needs decoding='constrained' (labels are imposed under the grammar)")
        return {}
    tasks = [get_task(r["task"]) for r in records]
    out: dict = {"grammars": [request_grammar(r, c) for r, c in zip(records, convs, strict=True)]}
    if label_prefixes is not None:
        shown = [{**r, "messages": list(c)} for r, c in zip(records, convs, strict=True)]
        given = list(label_prefixes(shown) if callable(label_prefixes) else label_prefixes)
        if len(given) != len(records):
            raise ValueError(f"label_prefixes gave {len(given)} prefixes for {len(records)} records")
        out["prefixes"] = [answer_prefix(t, p) if isinstance(p, Mapping) else p
                           for t, p in zip(tasks, given, strict=True)]
    return out


def scored_label_prefixes(lm, tokenizer, records: Sequence[dict], convs: Sequence[Sequence[dict]], *,
                          batch_size: int = 16, eos_ids: Sequence[int] | None = None) -> tuple[list, list, dict]:
    """Label scoring (:func:`banklm.evaluation.labelscore.score_labels`) of every record, task by task, on the
    messages the model sees: ``(prefixes, prediction fields, skipped)``. The prefixes are what constrained
    decoding forces before generating the rest under the grammar; the fields (chosen labels, confidences) go
    into ``predictions.jsonl``. A task whose labels cannot be scored (too many combinations without rules) is
    decoded under the grammar from the start: ``skipped`` says why."""
    prefixes: list = [None] * len(records)
    fields: list = [None] * len(records)
    skipped: dict[str, str] = {}
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_task.setdefault(r["task"], []).append(i)
    for name, ix in by_task.items():
        task = get_task(name)
        try:
            scores = score_labels(lm, tokenizer, task, [convs[i] for i in ix], batch_size=batch_size,
                                  eos_ids=eos_ids, fold_inputs=False)
        except ValueError as e:
            skipped[name] = str(e)
            continue
        for i, sc in zip(ix, scores, strict=True):
            prefixes[i], fields[i] = sc["prefix"], label_scores_record(sc, task)
    return prefixes, fields, skipped


def _constrained_inputs(lm, tokenizer, records, convs, decoding, label_prefixes, *, batch_size: int,
                        eos_ids=None) -> tuple[dict, list | None, dict]:
    """:func:`decoding_inputs`, with the labels chosen by label scoring when constrained decoding is not given
    them (``label_prefixes``): ``(generation kwargs, prediction fields or None, skipped tasks)``."""
    if decoding != "constrained" or label_prefixes is not None or not records:
        return decoding_inputs(records, convs, decoding, label_prefixes), None, {}
    prefixes, fields, skipped = scored_label_prefixes(lm, tokenizer, records, convs, batch_size=batch_size,
                                                      eos_ids=eos_ids)
    return decoding_inputs(records, convs, decoding, prefixes), fields, skipped


def _scored_generation(model, tokenizer, records, convs, max_new_tokens: int, batch_size: int,
                       grammar_cache: GrammarCache | None = None) -> tuple[GenerationResult, list, dict]:
    """Constrained decoding on a transformers model: per task, per batch of prompts of similar length, label scoring
    then generation under the grammar from the chosen labels, continuing from label scoring's prefill (each prompt
    runs through the model once). A worker thread prepares the next batch's grammars (GBNF, matchers) while the
    model runs. ``(generation, prediction fields, skipped tasks)`` as :func:`_constrained_inputs`;
    ``generation.seconds`` counts generation only. ``grammar_cache``: grammars already made for these requests
    (another model scored on the same records), reused."""
    eos = eos_token_ids(model, tokenizer)
    texts: list = [None] * len(records)
    fields: list = [None] * len(records)
    skipped: dict[str, str] = {}
    totals = {"seconds": 0.0, "new_tokens": 0, "prompt_tokens": 0}

    cache = grammar_cache or GrammarCache(max_matchers=0)  # without one: texts for this call, matchers built

    def prepare(rows: list[int]) -> list[PreparedGrammar]:
        return [PreparedGrammar(tokenizer, cache.text(_request_key(records[i], convs[i]),
                                                      lambda i=i: request_grammar(records[i], convs[i])),
                                eos, cache=cache) for i in rows]

    def run(rows, grammars, prefixes=None, prefilled=None, size=batch_size):
        gen = generate(model, tokenizer, [convs[i] for i in rows], max_new_tokens, size, grammars=grammars,
                       prefixes=prefixes, prompt_cache=prefilled)
        for i, t in zip(rows, gen, strict=True):
            texts[i] = t
        for k in totals:
            totals[k] += getattr(gen, k)

    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_task.setdefault(r["task"], []).append(i)
    prepare([])  # the tokenizer's matcher view, built once in this thread
    with ThreadPoolExecutor(1) as worker:
        for name, ix in by_task.items():
            order = sorted(range(len(ix)), key=lambda j: -sum(len(m["content"]) for m in convs[ix[j]]))
            chunks = [[ix[j] for j in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
            task = get_task(name)
            try:
                batches = score_label_batches(model, tokenizer, task, [convs[i] for i in ix],
                                              batch_size=batch_size, fold_inputs=False, order=order, eos_ids=eos)
            except ValueError as e:  # labels that cannot be scored: the whole answer decoded under the grammar
                skipped[name] = str(e)
                run(ix, [request_grammar(records[i], convs[i]) for i in ix])
                continue
            ready = worker.submit(prepare, chunks[0])
            for b, (sub, scores, prefilled) in enumerate(batches):
                rows = [ix[j] for j in sub]
                grammars = ready.result()
                if rows != chunks[b]:  # batched otherwise than planned: the prepared grammars are for other rows
                    grammars = [request_grammar(records[i], convs[i]) for i in rows]
                if b + 1 < len(chunks):
                    ready = worker.submit(prepare, chunks[b + 1])
                for i, sc in zip(rows, scores, strict=True):
                    fields[i] = label_scores_record(sc, task)
                run(rows, grammars, [sc["prefix"] for sc in scores], prefilled, len(rows))
    return GenerationResult(texts, **totals), fields, skipped


def _attach(results: dict, preds: list[dict], fields: list | None, skipped: dict) -> None:
    """Label scores into the prediction rows; tasks decoded without them named in the results."""
    for p, f in zip(preds, fields or [], strict=False):
        if f:
            p.update(f)
    if fields is not None:
        results["label_scoring"] = {"used": True, **({"skipped": skipped} if skipped else {})}


@dataclass(frozen=True)
class ConfidenceCheck:
    """What :func:`evaluate_records` checks about a model's confidences beside the test split
    (:mod:`banklm.evaluation.confidence`): ``validation`` records, label-scored, where the operating point is
    fitted (temperature when ``temperature``; the threshold for ``target_accuracy`` or a fixed
    ``min_confidence``), and ``test_prevalence`` records (a test split at the spec's real-world label shares),
    label-scored for the operating points. ``bins``: the reliability diagram's equal-width bins."""

    validation: Sequence[dict] = ()
    test_prevalence: Sequence[dict] = ()
    target_accuracy: float | None = 0.97
    min_confidence: float | None = None
    temperature: bool = True
    bins: int = 10


def label_score_predictions(lm, tokenizer, records: Sequence[dict], *, batch_size: int = 16,
                            eos_ids: Sequence[int] | None = None, fold_inputs: bool = True) -> list[dict]:
    """Prediction rows from label scoring alone (no generation; the answer is the scored labels): the validation
    and prevalence splits of a :class:`ConfidenceCheck`, cheap because only the labels' tokens are scored. A
    task whose labels cannot be scored has no rows."""
    records = list(records)
    convs = _messages(records, fold_inputs)
    _, fields, _ = scored_label_prefixes(lm, tokenizer, records, convs, batch_size=batch_size, eos_ids=eos_ids)
    rows = []
    for i, (rec, f) in enumerate(zip(records, fields, strict=True)):
        if not f:
            continue
        task, gold = get_task(rec["task"]), _loads(rec["gold"])
        rows.append({"id": rec.get("id", str(i)), "task": task.name, "gold": gold, "label": task.primary_label(gold),
                     "parsed": f["scored"], "pred_label": f["scored_label"],
                     "correct": f["scored_label"] == task.primary_label(gold), **f})
    return rows


def label_decisions(lm, tokenizer, records: Sequence[dict], *, batch_size: int = 16) -> list[str | None]:
    """The primary label label scoring chooses for each record, in order (None where its task cannot be scored):
    the decision a counterfactual test compares."""
    chosen = {r["id"]: r["pred_label"] for r in label_score_predictions(lm, tokenizer, records, batch_size=batch_size)}
    return [chosen.get(r.get("id", str(i))) for i, r in enumerate(records)]


def _confidence_results(results: dict, preds: Sequence[dict], point: Mapping | None, bins: int) -> None:
    """Per task: the confidence statistics at the operating point (``confidence``), and its headline figures
    (``coverage``, ``answered_accuracy``, ``ece``) beside accuracy; a task without label scores says why."""
    by = M.by_task(C.confidence_rows(preds))
    for name, res in results["tasks"].items():
        if name not in by:
            res["confidence_skipped"] = "no label scores (free decoding, or labels that cannot be scored)"
            continue
        entry = (point or {}).get("tasks", {}).get(name)
        conf = C.confidence_metrics(by[name], name, entry, bins=bins)
        res["confidence"] = conf
        res.update({"coverage": conf["abstention"]["coverage"], "answered_accuracy": conf["abstention"]["accuracy"],
                    "ece": conf["calibration"]["ece"]})


def evaluate_records(
    model,
    tokenizer,
    records: Iterable[dict],
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 128,
    model_name: str = "model",
    robustness: Sequence[str] = (),
    robustness_seed: int = 0,
    size: dict | None = None,
    fold_inputs: bool = True,
    decoding: str = "free",
    label_prefixes: LabelPrefixes | None = None,
    grammar_cache: GrammarCache | None = None,
    confidence: ConfidenceCheck | None = None,
    operating_point: Mapping | None = None,
) -> dict:
    """Generate for each record's user turn(s), score, write results.json + predictions.jsonl.

    ``confidence`` (:class:`ConfidenceCheck`): label-score its validation records first
    (``out_dir/validation/predictions.jsonl``), fit the operating point there (``out_dir/operating_point.json``),
    and score its prevalence records (``out_dir/test_prevalence/``, ``results["test_prevalence"]``).
    ``operating_point``: one given instead (read from a model folder or an export bundle). With either, every task's
    results hold ``confidence`` (:func:`banklm.evaluation.confidence.confidence_metrics`): calibration, abstention,
    risk-coverage, operating points, costs; free decoding label-scores the test records for it.

    ``decoding``: ``free`` or ``constrained`` (see the module docstring; :func:`decoding_inputs`);
    ``label_prefixes`` (constrained only): the labels chosen beforehand, per record (e.g. by label scoring),
    imposed as the answer's start, the rest generated under the grammar. ``grammar_cache``: constrained decoding's
    grammars kept for the next model scored on the same records (:class:`GrammarCache`).

    ``fold_inputs`` applies the corpora's input canonicalisation (full-width ASCII to half-width) to the
    prompts, as a serving stack must; turn it off to measure the bare model.

    ``robustness`` lists perturbation kinds (``shuffle_fields``, ``fullwidth_digits``,
    ``distractor``); for each the records are perturbed (gold kept), re-generated and scored, and
    ``results["robustness"][kind] = {"n", "skipped", "accuracy", "clean_accuracy", "drop", "per_task"}``.
    Records the kind cannot perturb (prompt-only rows have no fields to re-render) are skipped and
    counted; ``drop`` = clean accuracy on the perturbed subset - perturbed accuracy (None when every
    record was skipped).
    ``size`` (model bytes on disk, parameter count) is copied into ``results["overall"]``.
    """
    records = list(records)
    for r in records:
        get_task(r.get("task"))  # clear error for an unknown task before spending time generating
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    point = operating_point
    if confidence is not None and confidence.validation:
        val = label_score_predictions(model, tokenizer, confidence.validation, batch_size=batch_size,
                                      fold_inputs=fold_inputs)
        atomic_write_jsonl(out_dir / "validation" / "predictions.jsonl", val)
        point = C.fit_operating_point(C.confidence_rows(val), target_accuracy=confidence.target_accuracy,
                                      min_confidence=confidence.min_confidence, temperature=confidence.temperature)
    convs = _messages(records, fold_inputs)
    if decoding == "constrained" and label_prefixes is None and records:
        gen, scored, skipped = _scored_generation(model, tokenizer, records, convs, max_new_tokens, batch_size,
                                                  grammar_cache)
    else:
        kwargs, scored, skipped = _constrained_inputs(model, tokenizer, records, convs, decoding, label_prefixes,
                                                      batch_size=batch_size)
        gen = generate(model, tokenizer, convs, max_new_tokens, batch_size, **kwargs)
    results, preds = score_records(records, list(gen), model_name=model_name)
    results["decoding"] = decoding
    _attach(results, preds, scored, skipped)
    results["overall"].update(
        {"tokens_per_s": gen.tokens_per_s, "new_tokens": gen.new_tokens, "generation_seconds": gen.seconds}
    )
    if point is not None or confidence is not None:
        bins = confidence.bins if confidence is not None else 10
        if scored is None and records and confidence is not None:  # free decoding: confidences by label scoring
            _, extra, _ = scored_label_prefixes(model, tokenizer, records, convs, batch_size=batch_size)
            for p, f in zip(preds, extra, strict=True):
                if f:
                    p.update({k: v for k, v in f.items() if k != "scored"})
        _confidence_results(results, preds, point, bins)
        if confidence is not None and confidence.test_prevalence:
            rows = label_score_predictions(model, tokenizer, confidence.test_prevalence, batch_size=batch_size,
                                           fold_inputs=fold_inputs)
            atomic_write_jsonl(out_dir / "test_prevalence" / "predictions.jsonl", rows)
            prev = {"n": len(rows), "tasks": {name: {"n": 0} for name in
                                              sorted({r["task"] for r in confidence.test_prevalence})}}
            _confidence_results(prev, rows, point, bins)
            results["test_prevalence"] = prev
        if point is not None:
            results["operating_point"] = point
            if confidence is not None:
                C.save_operating_point(out_dir, point)
    if robustness:
        rob = {}
        for kind in robustness:
            if kind not in PERTURBATIONS:
                raise ValueError(f"unknown perturbation {kind!r}; allowed: {', '.join(PERTURBATIONS)}")
            rng = random.Random(f"robustness|{kind}|{robustness_seed}")
            # prompt-only records (a bank's table in prompt mode) have no fields to re-render: skipped, and
            # the drop compares like with like (clean accuracy on the same perturbable subset)
            ok = [i for i, r in enumerate(records) if can_perturb(r["task"], r, kind)]
            entry: dict = {"n": len(ok), "skipped": len(records) - len(ok)}
            if ok:
                pert = [perturb(records[i]["task"], records[i], rng, kind) for i in ok]
                pconv = _messages(pert, fold_inputs)
                # decoded as the clean prompts were, on the perturbed prompts' own grammars and label scores
                if decoding == "constrained" and label_prefixes is None:
                    out, _, _ = _scored_generation(model, tokenizer, pert, pconv, max_new_tokens, batch_size,
                                                   grammar_cache)
                else:
                    out = generate(model, tokenizer, pconv, max_new_tokens, batch_size,
                                   **decoding_inputs(pert, pconv, decoding))
                res_k, _ = score_records(pert, list(out), model_name=model_name)
                acc = res_k["overall"]["accuracy"]
                clean = sum(preds[i]["correct"] for i in ok) / len(ok)
                entry.update({"accuracy": acc, "clean_accuracy": clean, "drop": clean - acc,
                              "per_task": {t: v["accuracy"] for t, v in res_k["tasks"].items()}})
            else:  # nothing to perturb: no score rather than a made-up 0
                entry.update({"accuracy": None, "clean_accuracy": None, "drop": None, "per_task": {}})
            rob[kind] = entry
        results["robustness"] = rob
    results["overall"]["inputs_folded"] = bool(fold_inputs)
    results["overall"]["seconds"] = time.perf_counter() - t0
    results["overall"].update(size or {})
    atomic_write_jsonl(out_dir / "predictions.jsonl", preds)
    atomic_write_json(out_dir / "results.json", results)
    return results


def load_model_dir(model_dir: str | Path, device: str = "auto", dtype=None):
    """Load an HF model folder (safetensors only) and its tokenizer; returns ``(model, tokenizer)``.

    The tokenizer comes from ``banklm.finetune.tokenizer.load_tokenizer`` (safe for SentencePiece vocabularies).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model folder not found")
    tokenizer = load_tokenizer(model_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), output_loading_info=True, **kwargs)
    for kind, what in (("missing_keys", "missing from the checkpoint (would be randomly initialised)"),
                       ("unexpected_keys", "in the checkpoint but not in config.json")):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:  # transformers only prints a report: scoring a half-random model would be silently wrong
            raise ValueError(f"{model_dir}: weights do not match config.json: {keys[0]} is {what} ({len(keys)} tensors)")
    model.to(device)
    model.eval()
    return model, tokenizer


def evaluate_model_dir(
    model_dir: str | Path,
    records: Iterable[dict],
    out_dir: str | Path,
    device: str = "auto",
    *,
    batch_size: int = 64,
    max_new_tokens: int = 128,
    model_name: str | None = None,
    robustness: Sequence[str] = (),
    dtype=None,
    decoding: str = "free",
    label_prefixes: LabelPrefixes | None = None,
    grammar_cache: GrammarCache | None = None,
    confidence: ConfidenceCheck | None = None,
    operating_point: Mapping | None = None,
) -> dict:
    """:func:`evaluate_records` for a saved model folder (see :func:`load_model_dir`); the operating point is
    ``operating_point``, else the folder's own ``operating_point.json`` when it has one."""
    decoding_inputs([], [], decoding)  # a bad decoding fails before the model loads
    model, tokenizer = load_model_dir(model_dir, device=device, dtype=dtype)
    results = evaluate_records(
        model,
        tokenizer,
        records,
        out_dir,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        model_name=model_name or Path(model_dir).name,
        robustness=robustness,
        size={"model_bytes": sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")),
              "parameters": sum(p.numel() for p in model.parameters())},
        decoding=decoding,
        label_prefixes=label_prefixes,
        grammar_cache=grammar_cache,
        confidence=confidence,
        operating_point=operating_point if operating_point is not None else C.find_operating_point(model_dir),
    )
    return results


def export_kind(path: str | Path) -> str | None:
    """``"gguf"`` for a ``.gguf`` file, ``"onnx"`` for a folder holding ``model.onnx``, else None."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "model.onnx").is_file():
        return "onnx"
    return None


def evaluate_export(
    path: str | Path,
    records: Iterable[dict],
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 128,
    model_name: str | None = None,
    fold_inputs: bool = True,
    decoding: str = "free",
    label_prefixes: LabelPrefixes | None = None,
    operating_point: Mapping | None = None,
) -> dict:
    """:func:`evaluate_records` for an exported artefact: a GGUF file (llama.cpp, else transformers' GGUF
    reader) or an ONNX export folder (onnxruntime, CPU), run through :func:`evaluate_artefact`. The operating
    point is ``operating_point``, else the one the artefact's bundle carries (``operating_point.json``).

    A GGUF file carries its own tokenizer and chat template (read by transformers) and stops at the
    EOS/EOT ids it declares, as a llama.cpp or Ollama server would; an ONNX folder is read like a model
    folder (tokenizer files, ``generation_config.json``). Prompts are folded like :func:`evaluate_records`
    folds them, so the scores compare with the PyTorch models'. Robustness is not run here.
    """

    path = Path(path)
    decoding_inputs([], [], decoding)
    kind = export_kind(path)
    if kind is None:
        raise ValueError(f"{path}: not a .gguf file or an ONNX export folder (a folder with model.onnx)")
    records = list(records)
    for r in records:
        get_task(r.get("task"))
    convs = _messages(records, fold_inputs)
    shown = [{**r, "messages": c} for r, c in zip(records, convs, strict=True)]  # user turns as the model sees them
    if kind == "gguf":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if not tok.chat_template:
            raise ValueError(f"{path}: the GGUF file has no tokenizer.chat_template; cannot render the prompts")
        longest = max((len(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
                       for c in convs), default=0)
        lm, runtime = open_gguf(path, max(512, longest + max_new_tokens + 8))  # llama.cpp refuses over-long prompts
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        meta = getattr(getattr(lm, "llm", None), "metadata", None) or {}
        eos |= {int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta}
        size = {"model_bytes": path.stat().st_size}
    else:
        tok = load_tokenizer(path)
        lm, runtime = OnnxCausalLM(path), "onnxruntime (CPU)"
        eos = set(stop_token_ids(path))
        size = {"model_bytes": onnx_file_bytes(path / "model.onnx")}
    try:
        if not eos:
            raise ValueError(f"{path}: no EOS token id found; generation would never stop")
        results = evaluate_artefact(lm, tok, shown, out_dir, eos_ids=sorted(eos), batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, model_name=model_name or path.stem,
                                    size={**size, "format": kind, "runtime": runtime,
                                          "inputs_folded": bool(fold_inputs)},
                                    decoding=decoding, label_prefixes=label_prefixes,
                                    operating_point=operating_point if operating_point is not None
                                    else C.find_operating_point(path))
    finally:
        if hasattr(lm, "close"):
            lm.close()
    return results


def evaluate_artefact(lm, tokenizer, records: Sequence[dict], out_dir: str | os.PathLike, *, eos_ids: Sequence[int],
                      batch_size: int = 32, max_new_tokens: int = 128, model_name: str = "model",
                      size: dict | None = None, decoding: str = "free",
                      label_prefixes: LabelPrefixes | None = None, operating_point: Mapping | None = None) -> dict:
    """Answer ``records`` with an exported model (:mod:`banklm.runtime`), score them with the task parsers
    and metrics of :mod:`banklm.evaluation`, write ``results.json`` + ``predictions.jsonl``. ``decoding``,
    ``label_prefixes`` and ``operating_point`` as in :func:`evaluate_records` (the records' messages are taken as
    the model sees them; confidences come from constrained decoding's label scores: free decoding reports none)."""

    records = list(records)
    convs = [iter_user_messages(r) for r in records]
    kwargs, scored, skipped = _constrained_inputs(lm, tokenizer, records, convs, decoding, label_prefixes,
                                                  batch_size=batch_size, eos_ids=eos_ids)
    gen = generate_chat(lm, tokenizer, convs, eos_ids, max_new_tokens=max_new_tokens, batch_size=batch_size, **kwargs)
    results, preds = score_records(records, list(gen), model_name=model_name)
    results["decoding"] = decoding
    _attach(results, preds, scored, skipped)
    results["overall"].update({"tokens_per_s": gen.tokens_per_s, "new_tokens": gen.new_tokens,
                               "generation_seconds": gen.seconds, **(size or {})})
    if operating_point is not None:
        _confidence_results(results, preds, operating_point, 10)
        results["operating_point"] = dict(operating_point)
    out_dir = Path(out_dir)
    atomic_write_jsonl(out_dir / "predictions.jsonl", preds)
    atomic_write_json(out_dir / "results.json", results)
    return results
