"""eval: every model of the run scored on the scenario tasks (decoded as ``eval.decoding`` says: free or under
the answer grammar), and on the held-out instruction records of the general and private corpora (answer loss,
short-answer exact match), with banklm.evaluation."""

from __future__ import annotations

from pathlib import Path

from banklm.corpora.splits import corpus_splits, load_split
from banklm.evaluation import evidence as EV
from banklm.evaluation import metrics as M
from banklm.evaluation import uncertainty as U
from banklm.evaluation.constrained import GrammarCache
from banklm.evaluation.counterfactual import flip_rates
from banklm.evaluation.evaluate import (
    ConfidenceCheck,
    evaluate_model_dir,
    label_decisions,
    load_model_dir,
)
from banklm.evaluation.instructions import EXACT_MATCH_MAX_CHARS, score_instructions
from banklm.evaluation.perplexity import perplexity
from banklm.io import atomic_write_json, read_jsonl
from banklm.ledger import run_relative
from banklm.pipeline import RunContext
from banklm.recipe import Recipe
from banklm.results import read_json
from banklm.stages.common import (
    SCENARIO,
    base_model_dir,
    corpus_dirs,
    final_model_dir,
    model_dir_after,
    run_device,
)
from banklm.stages.distill import teacher_dir


def final_model_name(r: Recipe) -> str:
    if r.distill.enabled:
        return "student"
    return _undistilled_name(r)


def _undistilled_name(r: Recipe) -> str:
    return "sft" if r.train.enabled else ("cpt" if r.cpt.enabled else "base")


def _eval_models(ctx: RunContext) -> dict[str, Path]:
    """The final model plus the earlier ones the recipe asks to compare, by name (with distillation: the
    student, its teacher and the student trained without the teacher)."""
    r = ctx.recipe
    earlier = {"base": base_model_dir(ctx), "cpt": ctx.path("cpt", "merged")}
    models = {final_model_name(r): final_model_dir(ctx)}
    if r.distill.enabled:
        models["teacher" if r.distill.teacher.path else _undistilled_name(r)] = teacher_dir(ctx)
        if r.distill.baseline:
            models["baseline"] = ctx.path("distill", "baseline")
    for name in ctx.recipe.eval.compare:
        if name == "cpt" and not ctx.recipe.cpt.enabled:
            continue
        models.setdefault(name, earlier[name])
    return models


def run_eval(ctx: RunContext) -> list[Path]:

    e = ctx.recipe.eval
    records = load_split(ctx.path(SCENARIO), "test", tasks=e.tasks, limit_per_task=e.limit).to_list()
    outputs = []
    final = final_model_name(ctx.recipe)
    grammars = GrammarCache() if e.decoding == "constrained" else None  # every model answers the same requests
    for name, model_dir in _eval_models(ctx).items():
        out = ctx.path("eval", name)
        # perturbed prompts and the confidence check only for the final model (the one export ships): the
        # comparison rows need the clean scores alone
        results = evaluate_model_dir(model_dir, records, out, device=run_device(ctx), batch_size=e.batch_size,
                                     max_new_tokens=e.max_new_tokens, model_name=name,
                                     robustness=tuple(e.robustness) if name == final else (), decoding=e.decoding,
                                     grammar_cache=grammars,
                                     confidence=_confidence_check(ctx) if name == final else None)
        if name == final and "operating_point" in results:
            ctx.notes["eval"] = {"operating_point": {
                t: {"temperature": v["temperature"], "threshold": v["threshold"]}
                for t, v in results["operating_point"]["tasks"].items()}}
        outputs.append(out)
    outputs.append(_evidence(ctx, records))
    held_out = _held_out_instructions(ctx)
    if held_out:
        for name, model_dir in _eval_models(ctx).items():
            _score_instructions(ctx, model_dir, ctx.path("eval", name), held_out)
    general = ctx.path("corpora", "general")
    if e.retention and general.exists():
        outputs.append(_retention(ctx, general))
    return outputs


INSTRUCTION_CORPORA = ("general", "private")


def _confidence_check(ctx: RunContext) -> ConfidenceCheck:
    """The final model's confidence check: the first ``eval.calibration.validation_limit`` validation records
    per task and the whole ``test_prevalence`` split (when the scenario corpus has one), label-scored."""
    e, scenario = ctx.recipe.eval, ctx.path(SCENARIO)
    have = corpus_splits(scenario)
    split = {s: load_split(scenario, s, tasks=e.tasks, limit_per_task=e.calibration.validation_limit
                           if s == "validation" else None).to_list() if s in have else []
             for s in ("validation", "test_prevalence")}
    return ConfidenceCheck(validation=split["validation"], test_prevalence=split["test_prevalence"],
                           target_accuracy=e.abstain.target_accuracy, min_confidence=e.abstain.min_confidence,
                           temperature=e.calibration.temperature, bins=e.calibration.bins)


def _comparisons(ctx: RunContext, names: list[str]) -> list[tuple[str, str, str]]:
    """The pairs the report compares: ``(what, a, b)``: the final model against each earlier model of the run."""
    final, out = final_model_name(ctx.recipe), []
    for other in names:
        if other == final:
            continue
        what = {"baseline": "student vs the same student trained without the teacher",
                "cpt": "after vs before fine-tuning", "base": "after fine-tuning vs the base model"}.get(
            other, f"student vs its teacher ({other})" if ctx.recipe.distill.enabled else f"{final} vs {other}")
        out.append((what, final, other))
    return out


def _evidence(ctx: RunContext, records: list[dict]) -> Path:
    """``eval/evidence.json``: what a model-risk reviewer asks for beyond the scores (banklm.evaluation.evidence):
    intervals for every model, paired tests between them, the final model by segment, a confusion matrix per
    categorical key, ordinal error, the baselines side by side, counterfactual flip rates."""
    e, final = ctx.recipe.eval, final_model_name(ctx.recipe)
    names = list(_eval_models(ctx))
    preds = {n: list(read_jsonl(ctx.path("eval", n, "predictions.jsonl"))) for n in names}
    mine = preds[final]
    out: dict = {"final": final, "test_records": len(records), "method": "percentile bootstrap, 2000 resamples, "
                 "seed 0; McNemar (exact below 25 discordant pairs); Wilson for segment shares",
                 "intervals": {n: EV.task_intervals(p) for n, p in preds.items()},
                 "comparisons": [{"what": what, **EV.paired_comparison(preds[a], preds[b], (a, b))}
                                 for what, a, b in _comparisons(ctx, names)],
                 "segments": {}, "confusions": {}, "ordinal": {}}
    final_res = read_json(ctx.path("eval", final, "results.json")) or {}
    for task, r in final_res.get("tasks", {}).items():  # coverage and accuracy answered at the threshold
        ab = (r.get("confidence") or {}).get("abstention")
        if ab and ab.get("n"):
            out["intervals"][final].setdefault(task, {}).update(
                coverage=U.proportion_interval(ab["answered"], ab["n"]),
                answered_accuracy=U.proportion_interval(ab["answered_right"], ab["answered"]))
    for task, rows in M.by_task(mine).items():
        out["segments"][task] = EV.segment_results(task, rows, records)
        out["confusions"][task] = EV.key_confusions(task, rows)
        out["ordinal"][task] = EV.ordinal_errors(task, rows)
    if e.baselines:
        from banklm.evaluation.baselines import baselines  # scikit-learn: seconds to import, not at start-up

        train = M.by_task(load_split(ctx.path(SCENARIO), "train", tasks=e.tasks).to_list())
        out["baselines"] = EV.baseline_comparison(mine, {
            task: baselines(task, train.get(task, []), test, seed=ctx.recipe.seed)
            for task, test in sorted(M.by_task(records).items())})
    if e.counterfactual.enabled:
        out["counterfactual"] = _counterfactual(ctx, records)
    path = ctx.path("eval", "evidence.json")
    atomic_write_json(path, out)
    return path


def _counterfactual(ctx: RunContext, records: list[dict]) -> dict:
    """Flip rates of the final model (its label-scored decision) on protected-attribute swaps and deciding-field
    moves, on the first ``eval.counterfactual.limit`` test records per task."""
    e = ctx.recipe.eval
    model, tok = load_model_dir(final_model_dir(ctx), device=run_device(ctx))
    return {task: flip_rates(task, recs[: e.counterfactual.limit],
                             lambda rs: label_decisions(model, tok, rs, batch_size=e.batch_size), seed=ctx.recipe.seed)
            for task, recs in sorted(M.by_task(records).items())}


def _held_out_instructions(ctx: RunContext) -> dict[str, list[dict] | str]:
    """The test splits' instruction records of the general and private corpora (at most ``eval.limit`` each), by
    kind; a corpus with none says why (raw text only, no test split)."""
    out: dict[str, list[dict] | str] = {}
    for kind in INSTRUCTION_CORPORA:
        folder = ctx.path("corpora", kind)
        if not folder.exists():
            continue
        if "test" not in corpus_splits(folder):
            out[kind] = "no test split"
            continue
        ds = load_split(folder, "test")
        if "messages" not in ds.column_names:
            out[kind] = "raw text only (no instruction records)"
            continue
        limit = ctx.recipe.eval.limit
        out[kind] = ds.select_columns(["id", "messages"]).select(range(min(len(ds), limit or len(ds)))).to_list()
    return out


def _score_instructions(ctx: RunContext, model_dir: Path, out: Path, held_out: dict) -> Path:
    """``eval/<model>/instructions.json``: answer loss and short-answer exact match of one model on the held-out
    instruction records (banklm.evaluation.instructions), per corpus."""
    e = ctx.recipe.eval
    model, tok = load_model_dir(model_dir, device=run_device(ctx))
    result: dict = {"model": run_relative(model_dir, ctx.run_dir), "split": "test", "limit": e.limit,
                    "exact_match_max_chars": EXACT_MATCH_MAX_CHARS, "corpora": {}, "not_scored": {}}
    for kind, records in held_out.items():
        if isinstance(records, str):
            result["not_scored"][kind] = records
            continue
        scores = score_instructions(model, tok, records, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens)
        scores.pop("records")  # per-record figures stay in memory: the file holds the corpus figures
        result["corpora"][kind] = scores
    path = out / "instructions.json"
    atomic_write_json(path, result)
    return path


def _retention(ctx: RunContext, general: Path) -> Path:
    """Perplexity on held-out general text for the model before fine-tuning and the final model."""

    ds = load_split(general, "test")
    before_dir, after_dir = model_dir_after(ctx, "train"), final_model_dir(ctx)
    result = {"corpus": "corpora/general (test split)"}
    for key, model_dir in (("before", before_dir), ("after", after_dir)):
        model, tok = load_model_dir(model_dir, device=run_device(ctx))
        if "messages" in ds.column_names:
            texts = [tok.apply_chat_template(m, tokenize=False) for m in ds["messages"]]
        else:
            texts = list(ds["text"])
        result[key] = {"model": run_relative(model_dir, ctx.run_dir), **perplexity(model, tok, texts)}
    result["change_pct"] = 100.0 * (result["after"]["perplexity"] / result["before"]["perplexity"] - 1.0)
    path = ctx.path("eval", "retention.json")
    atomic_write_json(path, result)
    return path


def eval_inputs(ctx: RunContext) -> list[Path]:
    return [*_eval_models(ctx).values(), model_dir_after(ctx, "train"),
            *corpus_dirs(ctx, ["scenario", *INSTRUCTION_CORPORA])]
