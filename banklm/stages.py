"""The pipeline's stages, in order, each mapping the recipe onto one stage package's library calls.

Read it top to bottom: corpus -> tokenizer -> base -> cpt -> train -> distill -> eval -> export -> report.
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
from banklm.pipeline import CheckFailed, RunContext, Stage, launched_world_size
from banklm.recipe import CorpusKind, Recipe, section_params

SCENARIO = Path("corpora") / "scenario"
CORPUS_KINDS = typing.get_args(CorpusKind)


# ----------------------------------------------------------------------------------------- helpers

def base_model_dir(ctx: RunContext) -> Path:
    b = ctx.recipe.base
    return Path(b.path).expanduser() if b.path and not converts_pickle(b) else ctx.path("base")


def converts_pickle(b) -> bool:
    """A ``base.path`` with pickled weights only that the recipe allows (``base.allow_pickle``): the base stage
    loads the pickle once and every later stage uses its safetensors copy in ``base/``."""
    return bool(b.path) and b.allow_pickle and not any(Path(b.path).expanduser().glob("*.safetensors"))


PICKLE_RISK = ("loading a pickle can run arbitrary code (torch.load's weights_only mode narrows but does not remove "
               "the risk): allowed only because the recipe sets allow_pickle; use checkpoints from sources you trust")


def check_models(r: Recipe) -> None:
    """The model folders a recipe names, checked before any stage runs (no weights loaded): a bad base is a
    clear error naming the key and the problem, not a failure after the corpus was built. Raises RecipeError."""
    import logging

    from banklm.recipe import RecipeError
    from finetune.models import ModelFolderError, check_model_folder

    d = r.distill
    folders = [("base.path", r.base.path, r.base.allow_pickle)]
    if d.enabled:
        folders += [("distill.teacher.path", d.teacher.path, False)]
        if d.student.from_ == "path":
            folders += [("distill.student.path", d.student.path, d.student.allow_pickle)]
    for key, path, allow_pickle in folders:
        if not path:
            continue
        try:
            info = check_model_folder(Path(path).expanduser(), allow_pickle=allow_pickle,
                                      trust_remote_code=r.base.trust_remote_code)
        except ModelFolderError as e:
            raise RecipeError(f"{key}: {e}" + ("; or set base.allow_pickle: true if you trust its source"
                                               if "pickle" in str(e) and key == "base.path" else "")) from None
        if info["pickled"]:
            logging.getLogger("banklm").warning("%s %s has pickled weights only: %s", key, path, PICKLE_RISK)


def model_dir_after(ctx: RunContext, stage: str) -> Path:
    """The model folder a stage starts from: the newest model produced before ``stage``."""
    r = ctx.recipe
    order = [("cpt", r.cpt.enabled, ctx.path("cpt", "merged")), ("train", r.train.enabled, ctx.path("sft", "merged")),
             ("distill", r.distill.enabled, ctx.path("distill", "student"))]
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
                use_dora=p.lora.dora, packing=p.packing, group_by_length=p.group_by_length,
                completion_only_loss=p.completion_only_loss,
                gradient_checkpointing=p.gradient_checkpointing, compile=p.compile, seed=seed, device=device,
                logging_steps=p.logging_steps, eval_steps=p.eval_steps,
                early_stopping_patience=p.early_stopping_patience, save_steps=p.save_steps,
                keep_checkpoints=p.keep_checkpoints, resume=True)  # resume: only a matching checkpoint


def _task_eval(ctx: RunContext, p) -> dict:
    """Validation records for the periodic task-accuracy check (``task_eval_steps``), if asked for."""
    if p.task_eval_steps is None:
        return {}
    from corpora.build import load_split

    records = load_split(ctx.path(SCENARIO), "validation", tasks=ctx.recipe.eval.tasks,
                         limit_per_task=p.task_eval_samples).to_list()
    return {"task_eval_records": records, "task_eval_steps": p.task_eval_steps,
            "task_eval_max_new_tokens": ctx.recipe.eval.max_new_tokens}


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
    ctx.notes["corpus"] = _corpus_lineage(outputs, r.seed)
    return outputs


def _corpus_lineage(corpus_dirs: list[Path], seed: int) -> dict:
    """The ledger's data record per corpus kind: sources, sampling, counts, PII counts by type."""
    from banklm.ledger import data_lineage

    return {d.name: data_lineage(json.loads((d / "stats.json").read_text(encoding="utf-8")), seed)
            for d in corpus_dirs if (d / "stats.json").is_file()}


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
    ctx.notes["tokenizer"] = {"training_texts": len(texts), "corpora": sorted(corpora), "vocab_size": vocab}
    return [out, ctx.path("corpora", "token_counts.json")]


def run_base(ctx: RunContext) -> list[Path]:
    from finetune.models import build_tiny_model, convert_pickled_model

    out = ctx.path("base")
    if converts_pickle(ctx.recipe.base):
        src = Path(ctx.recipe.base.path).expanduser()
        ctx.notes["base"] = {"converted_from_pickle": str(src), "risk": PICKLE_RISK}
        convert_pickled_model(src, out, trust_remote_code=ctx.recipe.base.trust_remote_code)
        return [out]
    b = ctx.recipe.base.build
    build_tiny_model(b.arch, ctx.path("tokenizer"), out, hidden_size=b.hidden_size, num_layers=b.num_layers,
                     num_heads=b.num_heads, num_kv_heads=b.num_kv_heads, intermediate_size=b.intermediate_size,
                     max_position_embeddings=b.max_position_embeddings,
                     tie_word_embeddings=b.tie_word_embeddings, seed=ctx.recipe.seed)
    return [out]


def _base_inputs(ctx: RunContext) -> list[Path]:
    if converts_pickle(ctx.recipe.base):
        return [Path(ctx.recipe.base.path).expanduser()]
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
                              **_train_kwargs(ctx.recipe.cpt, ctx.recipe.seed, _device(ctx)),
                              **_task_eval(ctx, ctx.recipe.cpt))
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
                              **_train_kwargs(ctx.recipe.train, ctx.recipe.seed, _device(ctx)),
                              **_task_eval(ctx, ctx.recipe.train))
    ctx.notes["train"] = {k: summary.get(k) for k in ("steps", "tokens", "seconds", "final_loss")}
    return [out]


def _model_and_corpus_inputs(stage: str):
    def inputs(ctx: RunContext) -> list[Path]:
        return [model_dir_after(ctx, stage), *_corpus_dirs(ctx, ["scenario"])]
    return inputs


# ----------------------------------------------------------------------------------------- distill

def _teacher_dir(ctx: RunContext) -> Path:
    t = ctx.recipe.distill.teacher
    return Path(t.path).expanduser() if t.path else model_dir_after(ctx, "distill")


def _init_student(ctx: RunContext, teacher: Path) -> tuple[Path, dict]:
    """The student's starting model folder and how it was made."""
    from distill.student import student_from_config, student_from_path, student_from_teacher_layers

    s = ctx.recipe.distill.student
    out = ctx.path("distill", "init")
    if s.from_ == "path":
        info = student_from_path(s.path, allow_pickle=s.allow_pickle)
        src = Path(info["path"])
        if s.allow_pickle and not any(src.glob("*.safetensors")):
            # pickled weights (allowed by the recipe): unpickled once, here; training loads safetensors only
            from finetune.models import convert_pickled_model

            convert_pickled_model(src, out)
            info.update(converted_from_pickle=str(src), risk=PICKLE_RISK)
            return out, info
        return src, info
    if s.from_ == "build":
        b = s.build
        return out, student_from_config(teacher, out, arch=b.arch, seed=ctx.recipe.seed, hidden_size=b.hidden_size,
                                        num_layers=b.num_layers, num_heads=b.num_heads, num_kv_heads=b.num_kv_heads,
                                        intermediate_size=b.intermediate_size,
                                        max_position_embeddings=b.max_position_embeddings,
                                        tie_word_embeddings=b.tie_word_embeddings)
    return out, student_from_teacher_layers(teacher, out, every=s.every, layers=s.layers,
                                            intermediate_size=s.intermediate_size)


def _seqkd_records(ctx: RunContext, train) -> tuple[list[dict], list[dict]]:
    """The sequence-level prompt pool: scenario train records (+ unlabelled prompt files), and bad lines."""
    from distill.seqkd import load_prompt_records

    q = ctx.recipe.distill.seq
    records = train.to_list() if q.train_prompts else []
    problems = []
    for f in q.extra_prompts:
        recs, bad = load_prompt_records(_corpus_base_dir(ctx.recipe) / Path(f).expanduser())
        records += recs
        problems += [{"file": f, **b} for b in bad]
    return records, problems


def run_distill(ctx: RunContext) -> list[Path]:
    """Teacher -> student (logit or sequence-level KD), plus the baseline: the same student, same data and
    the same number of optimizer steps, without the teacher."""
    from corpora.build import load_split
    from distill.logit import train_logit_kd
    from distill.seqkd import generate_and_filter
    from finetune.sft import train_causal_lm

    r, d = ctx.recipe, ctx.recipe.distill
    device = _device(ctx)
    teacher = _teacher_dir(ctx)
    start, init_info = _init_student(ctx, teacher)
    keep = ["id", "messages"]
    labelled = load_split(ctx.path(SCENARIO), "train", limit_per_task=d.limit)
    val = load_split(ctx.path(SCENARIO), "validation")
    train, val = (ds.remove_columns([c for c in ds.column_names if c not in keep]) for ds in (labelled, val))
    kwargs = {**_train_kwargs(d.train, r.seed, device), **_task_eval(ctx, d.train)}
    out = ctx.path("distill")
    stats: dict = {"method": d.method, "teacher": run_relative(teacher, ctx.run_dir), "student_init": init_info}
    if d.method == "logit":
        k = d.kd
        summary = train_logit_kd(start, teacher, train, val, out / "student_train", divergence=k.divergence,
                                 beta=k.beta, temperature=k.temperature, alpha=k.alpha, top_k=k.top_k, tail=k.tail,
                                 teacher_quantization=d.teacher.quantization, teacher_dtype=d.teacher.dtype,
                                 cache_dir=out / "teacher_cache", **kwargs)
    else:
        from datasets import Dataset

        pool, problems = _seqkd_records(ctx, labelled)
        q = d.seq
        seq_stats = generate_and_filter(teacher, pool, out / "seqkd", device=device, batch_size=q.batch_size,
                                        max_new_tokens=q.max_new_tokens, strict=q.strict, match=q.match,
                                        require_reference=q.require_reference, dtype=d.teacher.dtype,
                                        quantization=d.teacher.quantization)
        seq_stats["bad_prompt_lines"] = problems
        stats["seqkd"] = seq_stats
        from banklm.io import read_jsonl

        kept = [{"id": x["id"], "messages": x["messages"]} for x in read_jsonl(out / "seqkd" / "kept.jsonl")]
        if not kept:
            raise ValueError(f"sequence-level distillation kept none of {seq_stats['prompts']} teacher answers "
                             f"(rejections: {seq_stats['rejected']}); see {out / 'seqkd' / 'rejected.jsonl'}")
        summary = train_causal_lm(start, Dataset.from_list(kept), val, out / "student_train", mode="sft", **kwargs)
    _move_model(out / "student_train" / "merged", out / "student")
    stats["student"] = _summary_brief(summary)
    outputs = [out / "student", out / "student_train"]
    if d.baseline:
        base_kwargs = {**kwargs, "time_budget_s": None, "max_steps": int(summary["steps"])}
        # the gold answers of the same train prompts (logit KD: the very records the student saw)
        base_summary = train_causal_lm(start, train, val, out / "baseline_train", mode="sft", **base_kwargs)
        _move_model(out / "baseline_train" / "merged", out / "baseline")
        stats["baseline"] = _summary_brief(base_summary)
        outputs += [out / "baseline", out / "baseline_train"]
    if init_info.get("from") != "path" or init_info.get("converted_from_pickle"):
        outputs.append(out / "init")
    if d.method == "logit" and d.kd.top_k:
        outputs.append(out / "teacher_cache")
    if d.method == "seq":
        outputs.append(out / "seqkd")
    atomic_write_json(out / "stats.json", stats)
    ctx.notes["distill"] = {"student_steps": stats["student"]["steps"],
                            "baseline_steps": (stats.get("baseline") or {}).get("steps")}
    return [*outputs, out / "stats.json"]


def _move_model(src: Path, dst: Path) -> None:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    src.rename(dst)


def _summary_brief(s: dict) -> dict:
    keys = ("steps", "tokens_seen", "seconds", "final_loss", "eval_loss", "total_params", "stopped_by", "device",
            "train_examples", "distill")
    return {k: s.get(k) for k in keys if k in s}


def _distill_inputs(ctx: RunContext) -> list[Path]:
    r = ctx.recipe
    paths = [_teacher_dir(ctx), *_corpus_dirs(ctx, ["scenario"])]
    if r.distill.student.from_ == "path":
        paths.append(Path(r.distill.student.path).expanduser())
    if r.distill.method == "seq":
        paths += [_corpus_base_dir(r) / Path(f).expanduser() for f in r.distill.seq.extra_prompts]
    return paths


# ----------------------------------------------------------------------------------------- eval

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
        models["teacher" if r.distill.teacher.path else _undistilled_name(r)] = _teacher_dir(ctx)
        if r.distill.baseline:
            models["baseline"] = ctx.path("distill", "baseline")
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
    """GGUF and/or ONNX of the final model, each verified against it and scored on the tasks, bundled in export/."""
    from export.bundle import build_export
    from finetune.tokenizer import load_tokenizer

    x = ctx.recipe.export
    model_dir = final_model_dir(ctx)
    tok = load_tokenizer(model_dir)
    scenario = ctx.path(SCENARIO).exists()
    out = ctx.path("export")
    summary = build_export(
        model_dir, out, name=ctx.recipe.name, prompts=_verify_prompts(ctx, tok) if scenario else _default_prompts(tok),
        gguf_types=x.gguf.quant if x.gguf.enabled else (), onnx_types=x.onnx.quant if x.onnx.enabled else (),
        opset=x.onnx.opset, records=_export_eval_records(ctx) if (x.evaluate and scenario) else None,
        eval_batch_size=ctx.recipe.eval.batch_size, eval_max_new_tokens=ctx.recipe.eval.max_new_tokens,
        max_accuracy_drop=x.max_accuracy_drop, device=_device(ctx), system=x.gguf.system, num_ctx=x.gguf.num_ctx,
        model_card=lambda verify: _bundle_card(ctx, verify))
    if not summary["passed"]:
        raise CheckFailed(f"export verification failed ({len(summary['failures'])} check(s)): "
                          + "; ".join(summary["failures"][:3]) + f"; see {out / 'verify.json'}")
    return [out]


def _export_params(r: Recipe) -> dict:
    """The export's reuse key: its section, plus the eval settings its task evaluation uses."""
    p = section_params(r, "export")
    if r.export.evaluate:
        p["eval"] = {"tasks": r.eval.tasks, "limit": r.export.eval_limit or r.eval.limit,
                     "max_new_tokens": r.eval.max_new_tokens, "batch_size": r.eval.batch_size}
    return p


def _export_eval_records(ctx: RunContext) -> list[dict]:
    from corpora.build import load_split

    e = ctx.recipe.eval
    return load_split(ctx.path(SCENARIO), "test", tasks=e.tasks,
                      limit_per_task=ctx.recipe.export.eval_limit or e.limit).to_list()


def _bundle_card(ctx: RunContext, verify: dict) -> str:
    """The model card shipped inside export/: the run's card as it stands, with this export's checks."""
    from banklm.modelcard import render_model_card
    from banklm.report import collect
    from corpora.ops.pii import scrub_text

    return render_model_card({**collect(ctx.run_dir), "export": verify}, ctx.recipe,
                             mask_pii=lambda text: scrub_text(text)[0])


def _default_prompts(tok) -> list[str]:
    from export.verify import DEFAULT_PROMPTS

    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in DEFAULT_PROMPTS]


def _verify_prompts(ctx: RunContext, tok, n: int = 6) -> list[str]:
    """Chat-rendered prompts from the test split: what the exported model will actually be asked."""
    from corpora.build import load_split

    ds = load_split(ctx.path(SCENARIO), "test", limit_per_task=max(1, n // 3))
    return [tok.apply_chat_template([m for m in msgs if m["role"] != "assistant"], tokenize=False,
                                    add_generation_prompt=True) for msgs in ds["messages"]][:n]


def export_dir_check(ctx: RunContext, export_dir: Path | None = None) -> dict:
    """``banklm export --verify-only``: re-check an existing export folder against the final model."""
    from export.bundle import verify_export
    from finetune.tokenizer import load_tokenizer

    model_dir = final_model_dir(ctx)
    tok = load_tokenizer(model_dir)
    prompts = _verify_prompts(ctx, tok) if ctx.path(SCENARIO).exists() else _default_prompts(tok)
    return verify_export(model_dir, export_dir or ctx.path("export"), prompts)


# ----------------------------------------------------------------------------------------- report

def run_report(ctx: RunContext) -> list[Path]:
    from banklm.report import write_report
    from corpora.ops.pii import scrub_text

    # model outputs quoted in the card pass the PII detector first (placeholders, never values)
    return write_report(ctx.run_dir, ctx.recipe, mask_pii=lambda text: scrub_text(text)[0])


# ----------------------------------------------------------------------------------------- registry

def _has_scenario(r: Recipe) -> bool:
    return r.corpora.scenario is not None and bool(r.corpora.scenario.synth)


STAGES: list[Stage] = [
    Stage("corpus", lambda r: bool(r.corpora.kinds()), lambda r: {**section_params(r, "corpora"), "seed": r.seed},
          _corpus_inputs, run_corpus),
    Stage("tokenizer", lambda r: r.tokenizer.train, lambda r: {**section_params(r, "tokenizer"), "seed": r.seed},
          lambda ctx: _corpus_dirs(ctx, list(CORPUS_KINDS)), run_tokenizer),
    Stage("base", lambda r: r.base.build is not None or converts_pickle(r.base),
          lambda r: {**section_params(r, "base"), "seed": r.seed},
          _base_inputs, run_base),
    Stage("cpt", lambda r: r.cpt.enabled, lambda r: {**section_params(r, "cpt", "device"), "seed": r.seed,
                                                     "processes": launched_world_size()},
          lambda ctx: [model_dir_after(ctx, "cpt"), *_corpus_dirs(ctx, ctx.recipe.cpt.corpora)], run_cpt,
          distributed=True),
    Stage("train", lambda r: r.train.enabled, lambda r: {**section_params(r, "train", "device"), "seed": r.seed,
                                                         "processes": launched_world_size()},
          _model_and_corpus_inputs("train"), run_train, distributed=True),
    Stage("distill", lambda r: r.distill.enabled, lambda r: {**section_params(r, "distill", "device"), "seed": r.seed},
          _distill_inputs, run_distill),
    Stage("eval", lambda r: r.eval.enabled, lambda r: section_params(r, "eval", "device"),
          _eval_inputs, run_eval),
    Stage("export", lambda r: r.export.gguf.enabled or r.export.onnx.enabled, _export_params,
          _model_and_corpus_inputs("eval"), run_export),
    Stage("report", lambda r: r.report.enabled, lambda r: {}, lambda ctx: [], run_report, cacheable=False),
]

STAGE_NAMES = [s.name for s in STAGES]


# ----------------------------------------------------------------------------------------- banklm plan

def _build_config(b, vocab_size: int) -> dict:
    return {"model_type": b.arch, "hidden_size": b.hidden_size, "num_hidden_layers": b.num_layers,
            "num_attention_heads": b.num_heads, "num_key_value_heads": b.num_kv_heads,
            "intermediate_size": b.intermediate_size, "vocab_size": vocab_size,
            "tie_word_embeddings": b.tie_word_embeddings}


def plan_request(r: Recipe, section: str | None = None) -> dict:
    """What ``banklm plan RECIPE`` plans, as plain values: the model, the section's settings (``train`` by
    default, ``cpt`` when only it is enabled, or ``distill``: the student's training) and the recipe's target
    card (``plan.gpu_mem``). For ``distill`` also the teacher: its model, bits, and whether it runs live next
    to the student (logit KD without a top-k cache) or in a pass of its own before the student trains."""
    section = section or ("cpt" if r.cpt.enabled and not r.train.enabled else "train")
    if section == "distill" and not r.distill.enabled:
        raise ValueError("--section distill: the recipe's distill.enabled is false")
    p = r.distill.train if section == "distill" else getattr(r, section)
    if r.base.build is not None:
        model = {"config": _build_config(r.base.build, r.tokenizer.vocab_size), "name": f"{r.name} base.build"}
    else:
        model = {"path": r.base.path, "config_name": r.plan.config}
    setup = {"method": p.method, "seq_len": p.max_length, "batch_size": p.batch_size, "grad_accum": p.grad_accum,
             "lora_r": p.lora.r, "lora_dropout": p.lora.dropout, "dora": p.lora.dora,
             "grad_ckpt": p.gradient_checkpointing,
             # no batch layout builds a mask: flat rows use varlen attention, padded rows plain causal
             "packing": False}
    req = {"section": section, "model": model, "setup": setup, "gpu_mem": r.plan.gpu_mem}
    if section == "distill":
        d = r.distill
        teacher = {"path": d.teacher.path, "config_name": None} if d.teacher.path else model
        st = d.student
        if st.from_ == "path":
            student = {"path": st.path, "config_name": r.plan.student_config}
        elif st.from_ == "build":
            student = {"config": _build_config(st.build, 0), "name": f"{r.name} distill.student.build",
                       "vocab_from_teacher": True}
        else:
            student = {"from_teacher": {"every": st.every, "layers": st.layers,
                                        "intermediate_size": st.intermediate_size}}
        from distill.teacher_cache import CACHE_BATCH_ROWS

        live = d.method == "logit" and d.kd.top_k is None
        if d.method == "logit":   # KD compares whole distributions: the student's full logits, no fused head
            setup["loss"] = "full"
        bits = {"4bit": 4, "8bit": 8}.get(d.teacher.quantization or "")
        req.update(model=student, teacher={"model": teacher, "bits": bits, "live": live,
                                           "pass_batch": d.seq.batch_size if d.method == "seq" else CACHE_BATCH_ROWS,
                                           "pass_seq": p.max_length, "generate": d.method == "seq"})
    return req


def _resolve_model(spec: dict, name: str):
    """``finetune.plan.resolve_base`` of a model spec from :func:`plan_request` -> (shape, source)."""
    from finetune.plan import resolve_base

    return resolve_base(path=spec.get("path"), config_name=spec.get("config_name"), config=spec.get("config"),
                        name=spec.get("name", name))


def plan_shape(req: dict):
    """The shape ``banklm plan`` plans for a recipe section: the base, or for ``distill`` the student."""
    from dataclasses import replace

    from finetune.plan import PlanError

    m = req["model"]
    teacher = req.get("teacher")
    if teacher is None:
        return _resolve_model(m, "model")
    t_shape, t_source = _resolve_model(teacher["model"], "teacher")
    if "from_teacher" in m:
        from distill.student import pick_layers

        f = m["from_teacher"]
        try:
            kept = len(pick_layers(t_shape.layers, f["every"], f["layers"]))
        except ValueError as e:
            raise PlanError(f"distill.student: {e}") from None
        shape = replace(t_shape, name=f"student: {kept} of {t_shape.name}'s {t_shape.layers} layers",
                        layers=kept, intermediate=f["intermediate_size"] or t_shape.intermediate)
        return shape, f"teacher {t_source}"
    if m.get("vocab_from_teacher"):
        m = {**m, "config": {**m["config"], "vocab_size": t_shape.vocab}}
    shape, source = _resolve_model(m, "student")
    return replace(shape, name=f"student {shape.name}"), source


def plan_teacher(teacher: dict, setup):
    """(setup with a live teacher's weights and logits, or the teacher's own pass: (bytes, what it is))."""
    from dataclasses import replace

    from finetune.plan import teacher_pass_bytes, teacher_weight_bytes

    shape, _ = _resolve_model(teacher["model"], "teacher")
    if teacher["live"]:
        return replace(setup, teacher_weight_bytes=teacher_weight_bytes(shape, teacher["bits"], setup.device),
                       teacher_vocab=shape.vocab), None
    what = "sequence-level answers" if teacher["generate"] else "top-k cache fill"
    return setup, (teacher_pass_bytes(shape, teacher["bits"], teacher["pass_batch"], teacher["pass_seq"],
                                      setup.device, generate=teacher["generate"]), what)
