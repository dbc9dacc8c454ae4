"""The pipeline's stages, in order: corpus -> tokenizer -> base -> cpt -> train -> distill -> eval -> export
-> report. Each maps the recipe onto one stage package's library calls (one module per stage, read top to
bottom); this registry lists them, with what decides whether a stage runs, its parameters and its inputs."""

from __future__ import annotations

from banklm.pipeline import Stage, launched_world_size
from banklm.recipe import section_params
from banklm.stages.common import (
    CORPUS_KINDS,
    converts_pickle,
    corpus_dirs,
    model_dir_after,
    task_inputs,
    task_params,
)
from banklm.stages.corpus import corpus_inputs, run_corpus
from banklm.stages.distill import distill_inputs, run_distill
from banklm.stages.evaluate import eval_inputs, run_eval
from banklm.stages.export import export_inputs, export_params, run_export
from banklm.stages.model import base_inputs, run_base, run_tokenizer
from banklm.stages.report import run_report
from banklm.stages.training import model_and_corpus_inputs, run_cpt, run_train

STAGES: list[Stage] = [
    Stage("corpus", lambda r: bool(r.corpora.kinds()),
          lambda r: {**section_params(r, "corpora"), "seed": r.data_seed_used, **task_params(r)},
          lambda ctx: sorted({*corpus_inputs(ctx), *task_inputs(ctx)}), run_corpus),
    Stage("tokenizer", lambda r: r.tokenizer.train,
          lambda r: {**section_params(r, "tokenizer"), "seed": r.data_seed_used},
          lambda ctx: corpus_dirs(ctx, list(CORPUS_KINDS)), run_tokenizer),
    Stage("base", lambda r: r.base.build is not None or converts_pickle(r.base),
          lambda r: {**section_params(r, "base"), "seed": r.seed},
          base_inputs, run_base),
    Stage("cpt", lambda r: r.cpt.enabled, lambda r: {**section_params(r, "cpt", "device"), "seed": r.seed,
                                                     "processes": launched_world_size(), **task_params(r)},
          lambda ctx: [model_dir_after(ctx, "cpt"), *corpus_dirs(ctx, ctx.recipe.cpt.corpora), *task_inputs(ctx)],
          run_cpt, distributed=True),
    Stage("train", lambda r: r.train.enabled, lambda r: {**section_params(r, "train", "device"), "seed": r.seed,
                                                         "data_seed": r.data_seed_used,  # the mix's draw
                                                         "processes": launched_world_size(), **task_params(r)},
          lambda ctx: [*model_and_corpus_inputs("train")(ctx), *task_inputs(ctx)], run_train, distributed=True),
    Stage("distill", lambda r: r.distill.enabled,
          lambda r: {**section_params(r, "distill", "device"), "seed": r.seed, **task_params(r)},
          lambda ctx: [*distill_inputs(ctx), *task_inputs(ctx)], run_distill),
    Stage("eval", lambda r: r.eval.enabled, lambda r: {**section_params(r, "eval", "device"), **task_params(r)},
          lambda ctx: [*eval_inputs(ctx), *task_inputs(ctx)], run_eval),
    Stage("export", lambda r: r.export.gguf.enabled or r.export.onnx.enabled,
          lambda r: {**export_params(r), **task_params(r)},
          lambda ctx: [*export_inputs(ctx), *task_inputs(ctx)], run_export),
    Stage("report", lambda r: r.report.enabled, lambda r: {}, lambda ctx: [], run_report, cacheable=False),
]

STAGE_NAMES = [s.name for s in STAGES]
