"""eval: every model of the run scored on the scenario tasks (banklm.evaluation)."""

from __future__ import annotations

from pathlib import Path

from banklm.corpora.splits import load_split
from banklm.evaluation.evaluate import evaluate_model_dir, load_model_dir
from banklm.evaluation.perplexity import perplexity
from banklm.io import atomic_write_json
from banklm.ledger import run_relative
from banklm.pipeline import RunContext
from banklm.recipe import Recipe
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
    for name, model_dir in _eval_models(ctx).items():
        out = ctx.path("eval", name)
        # perturbed prompts only for the final model: the comparison rows need the clean scores alone
        evaluate_model_dir(model_dir, records, out, device=run_device(ctx), batch_size=e.batch_size,
                           max_new_tokens=e.max_new_tokens, model_name=name,
                           robustness=tuple(e.robustness) if name == final else ())
        outputs.append(out)
    general = ctx.path("corpora", "general")
    if e.retention and general.exists():
        outputs.append(_retention(ctx, general))
    return outputs


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
    return [*_eval_models(ctx).values(), model_dir_after(ctx, "train"), *corpus_dirs(ctx, ["scenario", "general"])]
