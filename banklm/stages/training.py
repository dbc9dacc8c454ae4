"""cpt and train: continued pre-training and supervised fine-tuning (banklm.finetune)."""

from __future__ import annotations

from pathlib import Path

from banklm.corpora.splits import corpus_splits, load_split
from banklm.finetune.sft import train_causal_lm
from banklm.finetune.tokenizer import load_tokenizer
from banklm.pipeline import RunContext
from banklm.stages.common import SCENARIO, carry_tasks, corpus_dirs, model_dir_after, train_options


def run_cpt(ctx: RunContext) -> list[Path]:
    from datasets import Dataset


    model_dir = model_dir_after(ctx, "cpt")
    tok = load_tokenizer(model_dir)
    splits = {}
    for split in ("train", "validation"):
        texts = []
        for d in corpus_dirs(ctx, ctx.recipe.cpt.corpora):
            if split not in corpus_splits(d):
                continue
            ds = load_split(d, split)
            if "messages" in ds.column_names:
                texts += [tok.apply_chat_template(m, tokenize=False) for m in ds["messages"]]
            else:
                texts += list(ds["text"])
        splits[split] = Dataset.from_dict({"text": texts})
    out = ctx.path("cpt")
    p = ctx.recipe.cpt
    summary = train_causal_lm(model_dir, splits["train"], splits["validation"], out, p.to_config(), mode="cpt",
                              **train_options(ctx, p))
    carry_tasks(ctx, out / "merged", out / "adapter")
    ctx.notes["cpt"] = {k: summary.get(k) for k in ("steps", "tokens_seen", "seconds", "final_loss")}
    return [out]


def run_train(ctx: RunContext) -> list[Path]:

    keep = ["id", "messages"]
    train = load_split(ctx.path(SCENARIO), "train")
    val = load_split(ctx.path(SCENARIO), "validation")
    train = train.remove_columns([c for c in train.column_names if c not in keep])
    val = val.remove_columns([c for c in val.column_names if c not in keep])
    out = ctx.path("sft")
    p = ctx.recipe.train
    summary = train_causal_lm(model_dir_after(ctx, "train"), train, val, out, p.to_config(), mode="sft",
                              **train_options(ctx, p))
    carry_tasks(ctx, out / "merged", out / "adapter")
    ctx.notes["train"] = {k: summary.get(k) for k in ("steps", "tokens_seen", "seconds", "final_loss")}
    return [out]


def model_and_corpus_inputs(stage: str):
    def inputs(ctx: RunContext) -> list[Path]:
        return [model_dir_after(ctx, stage), *corpus_dirs(ctx, ["scenario"])]
    return inputs
