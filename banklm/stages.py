"""The pipeline's stages, in order, each mapping the recipe onto one stage package's library calls.

Read it top to bottom: corpus -> tokenizer -> base -> cpt -> train -> eval -> export -> report.
Heavy imports (torch, transformers, datasets) happen inside the stage functions, so `banklm --help`
stays fast.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

from banklm.io import atomic_write_json
from banklm.ledger import run_relative
from banklm.pipeline import CheckFailed, RunContext, Stage
from banklm.recipe import CorpusKind, Recipe, section_params

SCENARIO = Path("corpora") / "scenario"
CORPUS_KINDS = typing.get_args(CorpusKind)


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

def _corpus_base_dir(r: Recipe) -> Path:
    """Folder relative source paths are resolved against: ``corpora.root``, else the current folder."""
    return Path(r.corpora.root).expanduser() if r.corpora.root else Path.cwd()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt")


def _tokenizer_files(r: Recipe) -> list[Path]:
    if not r.base.path:
        return []
    folder = Path(r.base.path).expanduser()
    return [folder / f for f in _TOKENIZER_FILES if (folder / f).is_file()]


def _token_counter(r: Recipe):
    """``(count_tokens(texts) -> [n] or None, tokenizer path or the reason there is none)``.

    The corpus stage runs before a from-scratch tokenizer is trained, so token counts exist only for
    ``base.path`` recipes whose model folder has a tokenizer.
    """
    if not r.base.path:
        return None, "the base model is built from scratch: its tokenizer is trained after the corpus stage"
    folder = Path(r.base.path).expanduser()
    if not _tokenizer_files(r):
        return None, f"no tokenizer files in {folder}"
    try:
        from finetune.tokenizer import load_tokenizer

        tok = load_tokenizer(folder)
    except Exception as e:  # counts are informative: a tokenizer that will not load must not stop the corpus
        return None, f"the tokenizer in {folder} could not be loaded ({type(e).__name__})"

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]

    return count, str(folder)


def _corpus_inputs(ctx: RunContext) -> list[Path]:
    """Source files, bank tables and the tokenizer the corpus stage reads (a changed file re-runs it).

    Checks the sources first: a missing file, a path outside the allowed folders or wrong field names
    raise a RecipeError (exit 2) naming the key and the file before anything is built.
    """
    from banklm.recipe import RecipeError
    from corpora.build import SourceError, check_sources, check_tables, source_files

    r = ctx.recipe
    c, base = r.corpora, _corpus_base_dir(r)
    files: list[Path] = []
    for kind in ("general", "vertical", "private"):
        spec = getattr(c, kind)
        if spec is None:
            continue
        specs = [s.model_dump() for s in spec.sources]
        try:
            files += source_files(specs, base)
            check_sources(specs, base)
        except SourceError as e:
            raise RecipeError(f"corpora.{kind}.sources: {e}") from None
    if c.scenario is not None and c.scenario.tables:
        try:
            files += check_tables([t.model_dump() for t in c.scenario.tables], base)
        except SourceError as e:
            raise RecipeError(f"corpora.scenario.tables: {e}") from None
    files += _tokenizer_files(r)
    return sorted({f.resolve() for f in files})


def run_corpus(ctx: RunContext) -> list[Path]:
    """Build every configured corpus kind (scenario first: its test prompts decontaminate the others),
    then the mix when ``corpora.mix`` is set."""
    from corpora.build import (
        build_general,
        build_mix,
        build_private,
        build_scenario,
        build_vertical,
        scenario_test_prompts,
    )

    r = ctx.recipe
    c, base = r.corpora, _corpus_base_dir(r)
    count_tokens, tokenizer = _token_counter(r)
    outputs: list[Path] = []
    prompts: list[str] = []
    if "scenario" in c.kinds():
        sc = c.scenario
        synth = {t: s.model_dump() for t, s in sc.synth.items()}
        build_scenario(synth, r.seed, ctx.path(SCENARIO), licence=sc.licence,
                       tables=[t.model_dump() for t in sc.tables], steps=[s.model_dump() for s in sc.steps],
                       pii=sc.pii.model_dump(), splits=sc.splits.model_dump(), base_dir=base, num_proc=c.num_proc,
                       count_tokens=count_tokens, tokenizer=tokenizer)
        outputs.append(ctx.path(SCENARIO))
        prompts = scenario_test_prompts(ctx.path(SCENARIO))
    builders = {"general": build_general, "vertical": build_vertical, "private": build_private}
    for kind, build in builders.items():
        spec = getattr(c, kind)
        if spec is None:
            continue
        out = ctx.path("corpora", kind)
        build([s.model_dump() for s in spec.sources], out, steps=[s.model_dump() for s in spec.steps],
              pii=spec.pii.model_dump(), splits=spec.splits.model_dump(), seed=r.seed, base_dir=base,
              eval_prompts=prompts, decontaminate=spec.decontaminate.enabled, decontam_n=spec.decontaminate.n,
              licence=spec.licence, on_error=spec.on_error, num_proc=c.num_proc, count_tokens=count_tokens,
              tokenizer=tokenizer)
        outputs.append(out)
    if c.mix is not None:
        props = c.mix.proportions()
        out = ctx.path("corpora", "mix")
        build_mix({k: ctx.path("corpora", k) for k in props}, props, out, total=c.mix.total,
                  seed=r.seed if c.mix.seed is None else c.mix.seed)
        outputs.append(out)
    return outputs


# ----------------------------------------------------------------------------------------- tokenizer / base

def run_tokenizer(ctx: RunContext) -> list[Path]:
    """Train SentencePiece on every corpus of the run, then count each corpus's tokens with it."""
    from corpora.build import corpus_texts, token_counts
    from finetune.tokenizer import load_tokenizer, train_tokenizer

    corpora = {d.name: d for d in _corpus_dirs(ctx, list(CORPUS_KINDS))}
    texts = [t for d in corpora.values() for t in corpus_texts(d)]
    out = ctx.path("tokenizer")
    vocab = ctx.recipe.tokenizer.vocab_size
    try:
        train_tokenizer(texts, out, vocab_size=vocab, seed=ctx.recipe.seed)
    except RuntimeError as e:
        m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if not m:
            raise
        raise ValueError(f"tokenizer.vocab_size = {vocab} is smaller than the {m.group(2)} distinct characters "
                         f"the corpora need (plus special pieces): raise tokenizer.vocab_size") from None
    counts = token_counts(corpora, load_tokenizer(out))
    atomic_write_json(ctx.path("corpora", "token_counts.json"), {"corpus_tokens": counts, "training_texts": len(texts)})
    return [out, ctx.path("corpora", "token_counts.json")]


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

    from corpora.build import corpus_splits, load_split
    from finetune.sft import train_causal_lm
    from finetune.tokenizer import load_tokenizer

    model_dir = model_dir_after(ctx, "cpt")
    tok = load_tokenizer(model_dir)
    splits = {}
    for split in ("train", "validation"):
        texts = []
        for d in _corpus_dirs(ctx, ctx.recipe.cpt.corpora):
            if split not in corpus_splits(d):
                continue
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

def final_model_name(r: Recipe) -> str:
    return "sft" if r.train.enabled else ("cpt" if r.cpt.enabled else "base")


def _eval_models(ctx: RunContext) -> dict[str, Path]:
    """The final model plus the earlier ones the recipe asks to compare, by name."""
    earlier = {"base": base_model_dir(ctx), "cpt": ctx.path("cpt", "merged")}
    models = {final_model_name(ctx.recipe): final_model_dir(ctx)}
    for name in ctx.recipe.eval.compare:
        if name == "cpt" and not ctx.recipe.cpt.enabled:
            continue
        models.setdefault(name, earlier[name])
    return models


def run_eval(ctx: RunContext) -> list[Path]:
    from banklm.evaluation.evaluate import evaluate_model_dir
    from corpora.build import load_split

    e = ctx.recipe.eval
    records = load_split(ctx.path(SCENARIO), "test", tasks=e.tasks, limit_per_task=e.limit).to_list()
    outputs = []
    final = final_model_name(ctx.recipe)
    for name, model_dir in _eval_models(ctx).items():
        out = ctx.path("eval", name)
        # perturbed prompts only for the final model: the comparison rows need the clean scores alone
        evaluate_model_dir(model_dir, records, out, device=_device(ctx), batch_size=e.batch_size,
                           max_new_tokens=e.max_new_tokens, model_name=name,
                           robustness=tuple(e.robustness) if name == final else ())
        outputs.append(out)
    general = ctx.path("corpora", "general")
    if e.retention and general.exists():
        outputs.append(_retention(ctx, general))
    return outputs


def _retention(ctx: RunContext, general: Path) -> Path:
    """Perplexity on held-out general text for the model before fine-tuning and the final model."""
    from banklm.evaluation.evaluate import load_model_dir
    from banklm.evaluation.perplexity import perplexity
    from corpora.build import load_split

    ds = load_split(general, "test")
    before_dir, after_dir = model_dir_after(ctx, "train"), final_model_dir(ctx)
    result = {"corpus": "corpora/general (test split)"}
    for key, model_dir in (("before", before_dir), ("after", after_dir)):
        model, tok = load_model_dir(model_dir, device=_device(ctx))
        if "messages" in ds.column_names:
            texts = [tok.apply_chat_template(m, tokenize=False) for m in ds["messages"]]
        else:
            texts = list(ds["text"])
        result[key] = {"model": run_relative(model_dir, ctx.run_dir), **perplexity(model, tok, texts)}
    result["change_pct"] = 100.0 * (result["after"]["perplexity"] / result["before"]["perplexity"] - 1.0)
    path = ctx.path("eval", "retention.json")
    atomic_write_json(path, result)
    return path


def _eval_inputs(ctx: RunContext) -> list[Path]:
    return [*_eval_models(ctx).values(), model_dir_after(ctx, "train"), *_corpus_dirs(ctx, ["scenario", "general"])]


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
    prompts = _verify_prompts(ctx, tok)
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


def _verify_prompts(ctx: RunContext, tok, n: int = 6) -> list[str]:
    """Chat-rendered prompts from the test split: what the exported model will actually be asked."""
    from corpora.build import load_split

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
    Stage("corpus", lambda r: bool(r.corpora.kinds()), lambda r: {**section_params(r, "corpora"), "seed": r.seed},
          _corpus_inputs, run_corpus),
    Stage("tokenizer", lambda r: r.tokenizer.train, lambda r: {**section_params(r, "tokenizer"), "seed": r.seed},
          lambda ctx: _corpus_dirs(ctx, list(CORPUS_KINDS)), run_tokenizer),
    Stage("base", lambda r: r.base.build is not None, lambda r: {**section_params(r, "base"), "seed": r.seed},
          _base_inputs, run_base),
    Stage("cpt", lambda r: r.cpt.enabled, lambda r: {**section_params(r, "cpt", "device"), "seed": r.seed},
          lambda ctx: [model_dir_after(ctx, "cpt"), *_corpus_dirs(ctx, ctx.recipe.cpt.corpora)], run_cpt),
    Stage("train", lambda r: r.train.enabled, lambda r: {**section_params(r, "train", "device"), "seed": r.seed},
          _model_and_corpus_inputs("train"), run_train),
    Stage("eval", lambda r: r.eval.enabled, lambda r: section_params(r, "eval", "device"),
          _eval_inputs, run_eval),
    Stage("export", lambda r: r.export.gguf.enabled, lambda r: section_params(r, "export"),
          _model_and_corpus_inputs("eval"), run_export),
    Stage("report", lambda r: r.report.enabled, lambda r: {}, lambda ctx: [], run_report, cacheable=False),
]

STAGE_NAMES = [s.name for s in STAGES]
