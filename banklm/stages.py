"""The pipeline's stages, in order, each mapping the recipe onto one stage package's library calls.

Read it top to bottom: corpus -> tokenizer -> base -> cpt -> train -> eval -> export -> report.
Heavy imports (torch, transformers, datasets) happen inside the stage functions, so `banklm --help`
stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

from banklm.io import atomic_write_json
from banklm.pipeline import CheckFailed, RunContext, Stage
from banklm.recipe import Recipe, section_params

SCENARIO = Path("corpora") / "scenario"


# ----------------------------------------------------------------------------------------- helpers

def base_model_dir(ctx: RunContext) -> Path:
    b = ctx.recipe.base
    return Path(b.path).expanduser() if b.path else ctx.path("base")


def model_dir_after(ctx: RunContext, stage: str) -> Path:
    """The model folder a stage starts from: the newest model produced before ``stage``."""
    r = ctx.recipe
    order = [("cpt", r.cpt.enabled, ctx.path("cpt", "merged")), ("train", r.train.enabled, ctx.path("sft", "merged"))]
    current = base_model_dir(ctx)
    for name, enabled, path in order:
        if name == stage:
            break
        if enabled:
            current = path
    return current


def final_model_dir(ctx: RunContext) -> Path:
    return model_dir_after(ctx, "eval")


def _device(ctx: RunContext) -> str:
    from finetune.models import pick_device

    dev = pick_device(ctx.recipe.device)
    ctx.notes["device"] = dev
    return dev


def _train_kwargs(p, seed: int, device: str) -> dict:
    return dict(method=p.method, lr=p.lr, num_epochs=p.epochs, max_steps=p.max_steps,
                time_budget_s=p.time_budget_s, batch_size=p.batch_size, grad_accum=p.grad_accum,
                max_length=p.max_length, warmup_ratio=p.warmup_ratio, scheduler=p.scheduler,
                weight_decay=p.weight_decay, lora_r=p.lora.r, lora_alpha=p.lora.alpha,
                lora_dropout=p.lora.dropout, lora_targets=p.lora.targets, use_rslora=p.lora.rslora,
                use_dora=p.lora.dora, packing=p.packing, completion_only_loss=p.completion_only_loss,
                gradient_checkpointing=p.gradient_checkpointing, seed=seed, device=device,
                logging_steps=p.logging_steps)


# ----------------------------------------------------------------------------------------- corpus

def run_corpus(ctx: RunContext) -> list[Path]:
    from corpora.build import build_scenario

    sc = ctx.recipe.corpora.scenario
    outputs = []
    if sc is not None and sc.synth:
        synth = {t: s.model_dump() for t, s in sc.synth.items()}
        build_scenario(synth, ctx.recipe.seed, ctx.path(SCENARIO), licence=sc.licence)
        outputs.append(ctx.path(SCENARIO))
    return outputs


# ----------------------------------------------------------------------------------------- tokenizer / base

def _scenario_texts(ctx: RunContext) -> list[str]:
    from corpora.build import load_split

    texts = []
    for split in ("train", "validation"):
        for msgs in load_split(ctx.path(SCENARIO), split)["messages"]:
            texts.extend(m["content"] for m in msgs)
    return texts


def run_tokenizer(ctx: RunContext) -> list[Path]:
    from finetune.tokenizer import train_tokenizer

    out = ctx.path("tokenizer")
    train_tokenizer(_scenario_texts(ctx), out, vocab_size=ctx.recipe.tokenizer.vocab_size, seed=ctx.recipe.seed)
    return [out]


def run_base(ctx: RunContext) -> list[Path]:
    from finetune.models import build_tiny_model

    b = ctx.recipe.base.build
    out = ctx.path("base")
    build_tiny_model(b.arch, ctx.path("tokenizer"), out, hidden_size=b.hidden_size, num_layers=b.num_layers,
                     num_heads=b.num_heads, num_kv_heads=b.num_kv_heads, intermediate_size=b.intermediate_size,
                     max_position_embeddings=b.max_position_embeddings,
                     tie_word_embeddings=b.tie_word_embeddings, seed=ctx.recipe.seed)
    return [out]


def _base_inputs(ctx: RunContext) -> list[Path]:
    return [ctx.path("tokenizer")]


# ----------------------------------------------------------------------------------------- training

def _corpus_dirs(ctx: RunContext, kinds: list[str]) -> list[Path]:
    return [ctx.path("corpora", k) for k in kinds if ctx.path("corpora", k).exists()]


def run_cpt(ctx: RunContext) -> list[Path]:
    from datasets import Dataset

    from corpora.build import load_split
    from finetune.sft import train_causal_lm
    from finetune.tokenizer import load_tokenizer

    model_dir = model_dir_after(ctx, "cpt")
    tok = load_tokenizer(model_dir)
    splits = {}
    for split in ("train", "validation"):
        texts = []
        for d in _corpus_dirs(ctx, ctx.recipe.cpt.corpora):
            ds = load_split(d, split)
            if "messages" in ds.column_names:
                texts += [tok.apply_chat_template(m, tokenize=False) for m in ds["messages"]]
            else:
                texts += list(ds["text"])
        splits[split] = Dataset.from_dict({"text": texts})
    out = ctx.path("cpt")
    summary = train_causal_lm(model_dir, splits["train"], splits["validation"], out, mode="cpt",
                              **_train_kwargs(ctx.recipe.cpt, ctx.recipe.seed, _device(ctx)))
    ctx.notes["cpt"] = {k: summary.get(k) for k in ("steps", "tokens", "seconds", "final_loss")}
    return [out]


def run_train(ctx: RunContext) -> list[Path]:
    from corpora.build import load_split
    from finetune.sft import train_causal_lm

    keep = ["id", "messages"]
    train = load_split(ctx.path(SCENARIO), "train")
    val = load_split(ctx.path(SCENARIO), "validation")
    train = train.remove_columns([c for c in train.column_names if c not in keep])
    val = val.remove_columns([c for c in val.column_names if c not in keep])
    out = ctx.path("sft")
    summary = train_causal_lm(model_dir_after(ctx, "train"), train, val, out, mode="sft",
                              **_train_kwargs(ctx.recipe.train, ctx.recipe.seed, _device(ctx)))
    ctx.notes["train"] = {k: summary.get(k) for k in ("steps", "tokens", "seconds", "final_loss")}
    return [out]


def _model_and_corpus_inputs(stage: str):
    def inputs(ctx: RunContext) -> list[Path]:
        return [model_dir_after(ctx, stage), *_corpus_dirs(ctx, ["scenario"])]
    return inputs


# ----------------------------------------------------------------------------------------- eval

def run_eval(ctx: RunContext) -> list[Path]:
    from banklm.evaluation.evaluate import evaluate_model_dir
    from corpora.build import load_split

    e = ctx.recipe.eval
    records = load_split(ctx.path(SCENARIO), "test", tasks=e.tasks, limit_per_task=e.limit).to_list()
    out = ctx.path("eval", "sft")
    evaluate_model_dir(final_model_dir(ctx), records, out, device=_device(ctx), batch_size=e.batch_size,
                       max_new_tokens=e.max_new_tokens, model_name="sft", robustness=tuple(e.robustness))
    return [out]


# ----------------------------------------------------------------------------------------- export

def run_export(ctx: RunContext) -> list[Path]:
    from export.gguf import export_gguf
    from export.ollama import write_modelfile
    from export.verify import verify_gguf
    from finetune.tokenizer import load_tokenizer

    g = ctx.recipe.export.gguf
    model_dir = final_model_dir(ctx)
    out = ctx.path("export", "gguf")
    files = export_gguf(model_dir, out, types=tuple(g.quant), name=ctx.recipe.name)
    tok = load_tokenizer(model_dir)
    prompts = _verify_prompts(ctx)
    checks = []
    for f, qtype in zip(files, g.quant, strict=True):
        checks.append({"file": f.relative_to(ctx.run_dir).as_posix(), "type": qtype,
                       **verify_gguf(model_dir, f, prompts, qtype)})
    modelfile = write_modelfile(files[-1].name, tok.chat_template, out / "Modelfile",
                                stop_tokens=["<|im_end|>"], num_ctx=_context_len(model_dir))
    verify_path = ctx.path("export", "verify.json")
    atomic_write_json(verify_path, {"gguf": checks})
    failed = [c for c in checks if not c.get("passed")]
    if failed:
        raise CheckFailed("export verification failed for " + ", ".join(f"{c['type']} ({c['file']})" for c in failed)
                          + f": see {verify_path}")
    return [*files, Path(modelfile), verify_path]


def _context_len(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(min(cfg.get("max_position_embeddings", 2048), 8192))


def _verify_prompts(ctx: RunContext, n: int = 6) -> list[str]:
    """Chat-rendered prompts from the test split: what the exported model will actually be asked."""
    from corpora.build import load_split
    from finetune.tokenizer import load_tokenizer

    tok = load_tokenizer(final_model_dir(ctx))
    ds = load_split(ctx.path(SCENARIO), "test", limit_per_task=max(1, n // 3))
    return [tok.apply_chat_template([m for m in msgs if m["role"] != "assistant"], tokenize=False,
                                    add_generation_prompt=True) for msgs in ds["messages"]][:n]


# ----------------------------------------------------------------------------------------- report

def run_report(ctx: RunContext) -> list[Path]:
    from banklm.report import write_report

    return write_report(ctx.run_dir, ctx.recipe)


# ----------------------------------------------------------------------------------------- registry

def _has_scenario(r: Recipe) -> bool:
    return r.corpora.scenario is not None and bool(r.corpora.scenario.synth)


STAGES: list[Stage] = [
    Stage("corpus", lambda r: _has_scenario(r), lambda r: {**section_params(r, "corpora"), "seed": r.seed},
          lambda ctx: [], run_corpus),
    Stage("tokenizer", lambda r: r.tokenizer.train, lambda r: {**section_params(r, "tokenizer"), "seed": r.seed},
          lambda ctx: _corpus_dirs(ctx, ["scenario"]), run_tokenizer),
    Stage("base", lambda r: r.base.build is not None, lambda r: {**section_params(r, "base"), "seed": r.seed},
          _base_inputs, run_base),
    Stage("cpt", lambda r: r.cpt.enabled, lambda r: {**section_params(r, "cpt", "device"), "seed": r.seed},
          lambda ctx: [model_dir_after(ctx, "cpt"), *_corpus_dirs(ctx, ctx.recipe.cpt.corpora)], run_cpt),
    Stage("train", lambda r: r.train.enabled, lambda r: {**section_params(r, "train", "device"), "seed": r.seed},
          _model_and_corpus_inputs("train"), run_train),
    Stage("eval", lambda r: r.eval.enabled, lambda r: section_params(r, "eval", "device"),
          _model_and_corpus_inputs("eval"), run_eval),
    Stage("export", lambda r: r.export.gguf.enabled, lambda r: section_params(r, "export"),
          _model_and_corpus_inputs("eval"), run_export),
    Stage("report", lambda r: r.report.enabled, lambda r: {}, lambda ctx: [], run_report, cacheable=False),
]

STAGE_NAMES = [s.name for s in STAGES]
