"""export: GGUF and ONNX files, verified against PyTorch and scored (banklm.export), free and constrained decoding
side by side; the bundle carries each task's answer grammar."""

from __future__ import annotations

from pathlib import Path

from banklm.corpora.ops.pii import scrub_text
from banklm.corpora.splits import load_split
from banklm.evaluation.confidence import OPERATING_POINT_FILE, load_operating_point
from banklm.evaluation.evaluate import DECODINGS
from banklm.export.bundle import build_export, verify_export
from banklm.export.verify import DEFAULT_PROMPTS
from banklm.finetune.tokenizer import load_tokenizer
from banklm.modelcard import render_model_card
from banklm.pipeline import CheckFailed, RunContext
from banklm.recipe import Recipe, section_params
from banklm.results import collect
from banklm.stages.common import SCENARIO, final_model_dir, run_device
from banklm.stages.evaluate import final_model_name
from banklm.stages.training import model_and_corpus_inputs


def run_export(ctx: RunContext) -> list[Path]:
    """GGUF and/or ONNX of the final model, each verified against it and scored on the tasks, bundled in export/."""

    x = ctx.recipe.export
    model_dir = final_model_dir(ctx)
    tok = load_tokenizer(model_dir)
    scenario = ctx.path(SCENARIO).exists()
    out = ctx.path("export")
    summary = build_export(
        model_dir, out, name=ctx.recipe.name, prompts=_verify_prompts(ctx, tok) if scenario else _default_prompts(tok),
        gguf_quant=x.gguf.quant if x.gguf.enabled else (), onnx_quant=x.onnx.quant if x.onnx.enabled else (),
        opset=x.onnx.opset, records=_export_eval_records(ctx) if (x.evaluate and scenario) else None,
        eval_batch_size=ctx.recipe.eval.batch_size, eval_max_new_tokens=ctx.recipe.eval.max_new_tokens,
        decodings=export_decodings(ctx.recipe),
        max_accuracy_drop=x.max_accuracy_drop, device=run_device(ctx), system=x.gguf.system, num_ctx=x.gguf.num_ctx,
        tasks=ctx.recipe.task_names(), model_card=lambda verify: _bundle_card(ctx, verify),
        operating_point=_operating_point(ctx))
    if not summary["passed"]:
        raise CheckFailed(f"export verification failed ({len(summary['failures'])} check(s)): "
                          + "; ".join(summary["failures"][:3]) + f"; see {out / 'verify.json'}")
    return [out]


def operating_point_file(ctx: RunContext) -> Path:
    """Where the eval stage wrote the final model's operating point (threshold and temperature per task)."""
    return ctx.path("eval", final_model_name(ctx.recipe), OPERATING_POINT_FILE)


def _operating_point(ctx: RunContext) -> dict | None:
    f = operating_point_file(ctx)
    return load_operating_point(f) if ctx.recipe.eval.enabled and f.is_file() else None


def export_inputs(ctx: RunContext) -> list[Path]:
    """The final model, the scenario corpus and the operating point the bundle carries (when eval wrote one)."""
    f = operating_point_file(ctx)
    return [*model_and_corpus_inputs("eval")(ctx), *([f] if f.is_file() else [])]


def export_params(r: Recipe) -> dict:
    """The export's reuse key: its section, plus the eval settings its task evaluation uses."""
    p = section_params(r, "export")
    if r.export.evaluate:
        p["eval"] = {"tasks": r.eval.tasks, "limit": r.export.eval_limit or r.eval.limit,
                     "max_new_tokens": r.eval.max_new_tokens, "batch_size": r.eval.batch_size,
                     "decodings": list(export_decodings(r))}
    return p


def export_decodings(r: Recipe) -> tuple[str, ...]:
    """The recipe's decoding first (the artefacts' accuracy check), then the other: on the export's few records
    per task (``export.eval_limit``) free and constrained decoding are both scored, so the effect of decoding is
    seen apart from training at a bounded cost."""
    return (r.eval.decoding, *(d for d in DECODINGS if d != r.eval.decoding))


def _export_eval_records(ctx: RunContext) -> list[dict]:

    e = ctx.recipe.eval
    return load_split(ctx.path(SCENARIO), "test", tasks=e.tasks,
                      limit_per_task=ctx.recipe.export.eval_limit or e.limit).to_list()


def _bundle_card(ctx: RunContext, verify: dict) -> str:
    """The model card shipped inside export/: the run's card as it stands, with this export's checks."""

    return render_model_card({**collect(ctx.run_dir), "export": verify}, ctx.recipe,
                             mask_pii=lambda text: scrub_text(text)[0])


def _default_prompts(tok) -> list[str]:

    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in DEFAULT_PROMPTS]


def _verify_prompts(ctx: RunContext, tok, n: int = 6) -> list[str]:
    """Chat-rendered prompts from the test split: what the exported model will actually be asked."""

    ds = load_split(ctx.path(SCENARIO), "test", limit_per_task=max(1, n // 3))
    return [tok.apply_chat_template([m for m in msgs if m["role"] != "assistant"], tokenize=False,
                                    add_generation_prompt=True) for msgs in ds["messages"]][:n]


def export_dir_check(ctx: RunContext, export_dir: Path | None = None) -> dict:
    """``banklm export --verify-only``: re-check an existing export folder against the final model."""

    model_dir = final_model_dir(ctx)
    tok = load_tokenizer(model_dir)
    prompts = _verify_prompts(ctx, tok) if ctx.path(SCENARIO).exists() else _default_prompts(tok)
    return verify_export(model_dir, export_dir or ctx.path("export"), prompts)
