"""distill: the fine-tuned teacher into a smaller student (banklm.distill)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from banklm.corpora.splits import corpus_splits, load_split
from banklm.distill.seqkd import generate_and_filter, load_prompt_records
from banklm.distill.student import student_from_config, student_from_path, student_from_teacher_layers
from banklm.finetune.models import convert_pickled_model
from banklm.finetune.sft import train_causal_lm
from banklm.io import atomic_write_json, read_jsonl
from banklm.ledger import run_relative
from banklm.pipeline import RunContext
from banklm.stages.common import (
    PICKLE_RISK,
    SCENARIO,
    carry_tasks,
    corpus_dirs,
    model_dir_after,
    train_options,
)
from banklm.stages.corpus import corpus_base_dir


def teacher_dir(ctx: RunContext) -> Path:
    t = ctx.recipe.distill.teacher
    return Path(t.path).expanduser() if t.path else model_dir_after(ctx, "distill")


def _init_student(ctx: RunContext, teacher: Path) -> tuple[Path, dict]:
    """The student's starting model folder and how it was made."""

    s = ctx.recipe.distill.student
    out = ctx.path("distill", "init")
    if s.from_ == "path":
        info = student_from_path(s.path, allow_pickle=s.allow_pickle)
        src = Path(info["path"])
        if s.allow_pickle and not any(src.glob("*.safetensors")):
            # pickled weights (allowed by the recipe): unpickled once, here; training loads safetensors only

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
    """The sequence-level prompt pool: scenario train records, the scenario corpus's unlabelled split (a bank's rows
    without label: the teacher answers them, the checks filter), unlabelled prompt files; and bad lines."""

    q = ctx.recipe.distill.seq
    records = train.to_list() if q.train_prompts else []
    unlabelled = []
    if q.unlabelled_prompts and "unlabelled" in corpus_splits(ctx.path(SCENARIO)):
        unlabelled = load_split(ctx.path(SCENARIO), "unlabelled", limit_per_task=ctx.recipe.distill.limit).to_list()
    pool = {"train": len(records), "unlabelled": len(unlabelled)}
    records += unlabelled
    problems = []
    for f in q.extra_prompts:
        recs, bad = load_prompt_records(corpus_base_dir(ctx.recipe) / Path(f).expanduser(),
                                        tasks=ctx.recipe.allowed_tasks())
        records += recs
        problems += [{"file": f, **b} for b in bad]
    ctx.notes["distill_pool"] = {**pool, "extra": len(records) - pool["train"] - pool["unlabelled"]}
    return records, problems


def run_distill(ctx: RunContext) -> list[Path]:
    """Teacher -> student (logit or sequence-level KD), plus the baseline: the same student, same data and
    the same number of optimizer steps, without the teacher."""
    from banklm.distill.logit import train_logit_kd

    d = ctx.recipe.distill
    config, options = d.train.to_config(), train_options(ctx, d.train)
    device = options["device"]
    teacher = teacher_dir(ctx)
    start, init_info = _init_student(ctx, teacher)
    keep = ["id", "messages", "target"]  # target: "labels" rows learn no end of turn (banklm.finetune.sft)
    labelled = load_split(ctx.path(SCENARIO), "train", limit_per_task=d.limit)
    val = load_split(ctx.path(SCENARIO), "validation")
    train, val = (ds.remove_columns([c for c in ds.column_names if c not in keep]) for ds in (labelled, val))
    out = ctx.path("distill")
    stats: dict = {"method": d.method, "teacher": run_relative(teacher, ctx.run_dir), "student_init": init_info}
    if d.method == "logit":
        summary = train_logit_kd(start, teacher, train, val, out / "student_train", config, **d.kd.model_dump(),
                                 teacher_quantization=d.teacher.quantization, teacher_dtype=d.teacher.dtype,
                                 cache_dir=out / "teacher_cache", **options)
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

        kept = [{"id": x["id"], "messages": x["messages"]} for x in read_jsonl(out / "seqkd" / "kept.jsonl")]
        if not kept:
            raise ValueError(f"sequence-level distillation kept none of {seq_stats['prompts']} teacher answers "
                             f"(rejections: {seq_stats['rejected']}); see {out / 'seqkd' / 'rejected.jsonl'}")
        summary = train_causal_lm(start, Dataset.from_list(kept), val, out / "student_train", config, mode="sft",
                                  **options)
    _move_model(out / "student_train" / "merged", out / "student")
    carry_tasks(ctx, out / "student")
    stats["student"] = _summary_brief(summary)
    outputs = [out / "student", out / "student_train"]
    if d.baseline:
        same_steps = dataclasses.replace(config, time_budget_s=None, max_steps=int(summary["steps"]))
        # the gold answers of the same train prompts (logit KD: the very records the student saw)
        base_summary = train_causal_lm(start, train, val, out / "baseline_train", same_steps, mode="sft", **options)
        _move_model(out / "baseline_train" / "merged", out / "baseline")
        carry_tasks(ctx, out / "baseline")
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


def distill_inputs(ctx: RunContext) -> list[Path]:
    r = ctx.recipe
    paths = [teacher_dir(ctx), *corpus_dirs(ctx, ["scenario"])]
    if r.distill.student.from_ == "path":
        paths.append(Path(r.distill.student.path).expanduser())
    if r.distill.method == "seq":
        paths += [corpus_base_dir(r) / Path(f).expanduser() for f in r.distill.seq.extra_prompts]
    return paths
