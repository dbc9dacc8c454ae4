"""cpt and train: continued pre-training and supervised fine-tuning (banklm.finetune)."""

from __future__ import annotations

from pathlib import Path

from banklm.corpora.mix import mix
from banklm.corpora.splits import corpus_splits, load_split
from banklm.finetune.sft import train_causal_lm
from banklm.finetune.tokenizer import load_tokenizer
from banklm.pipeline import RunContext
from banklm.recipe import RecipeError
from banklm.stages.common import SCENARIO, carry_tasks, corpus_dirs, model_dir_after, train_options


def run_cpt(ctx: RunContext) -> list[Path]:
    """Continued pre-training on ``cpt.corpora`` (``mix``: corpora/mix, built by ``corpora.mix``)."""
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
            # corpora/mix of raw text and instruction corpora has both columns (messages empty on raw text rows)
            raw = ds["text"] if "text" in ds.column_names else [None] * len(ds)
            convs = ds["messages"] if "messages" in ds.column_names else [None] * len(ds)
            texts += [tok.apply_chat_template(m, tokenize=False) if m else t for t, m in zip(raw, convs, strict=True)]
        splits[split] = Dataset.from_dict({"text": texts})
    out = ctx.path("cpt")
    p = ctx.recipe.cpt
    summary = train_causal_lm(model_dir, splits["train"], splits["validation"], out, p.to_config(), mode="cpt",
                              **train_options(ctx, p))
    carry_tasks(ctx, out / "merged", out / "adapter")
    ctx.notes["cpt"] = {k: summary.get(k) for k in ("steps", "tokens_seen", "seconds", "final_loss")}
    return [out]


def run_train(ctx: RunContext) -> list[Path]:
    """SFT on the scenario train split plus the instruction data of ``train.mix`` (:func:`sft_data`)."""
    train, val, by_source = sft_data(ctx)
    out = ctx.path("sft")
    p = ctx.recipe.train
    summary = train_causal_lm(model_dir_after(ctx, "train"), train, val, out, p.to_config(), mode="sft",
                              **train_options(ctx, p))
    carry_tasks(ctx, out / "merged", out / "adapter")
    ctx.notes["train"] = {**{k: summary.get(k) for k in ("steps", "tokens_seen", "seconds", "final_loss")},
                          "examples_by_source": by_source}
    return [out]


SFT_COLUMNS = ("id", "messages", "target")  # what SFT reads of a record (target: "answer" or "labels")


def sft_data(ctx: RunContext):
    """``(train, validation, counts)``: the SFT datasets and, per split, the records taken from each source
    (``{"train": {"scenario": n, "general": m, ...}, "validation": {...}}``, plus ``repeated``: the sources of a
    split that were repeated to reach their share).

    The scenario split is used whole. ``train.mix`` gives the share of the SFT examples drawn from the general
    and private corpora's instruction records (``general: 0.1`` -> 10% of the training examples), taken from the
    same split of those corpora with ``banklm.corpora.mix.mix`` (seeded by the recipe's seed; a corpus smaller
    than its share is repeated, copies get ``#2``... ids); a corpus without a validation split adds none there.
    Every record gets a ``target`` (general and private instruction records: ``answer``) and a ``source``.
    RecipeError naming the key when a corpus of the mix holds raw text only or has no train records."""
    from datasets import Features, Value

    shares = ctx.recipe.train.mix.shares()
    features = Features({"id": Value("string"), "target": Value("string"),
                         "messages": [{"role": Value("string"), "content": Value("string")}]})
    data, counts = {}, {}
    for split in ("train", "validation"):
        scenario = _sft_columns(load_split(ctx.path(SCENARIO), split))
        if not shares:
            data[split], counts[split] = scenario, {"scenario": len(scenario)}
            continue
        parts = {"scenario": scenario.cast(features)}
        for kind in shares:
            ds = _instruction_split(ctx, kind, split)
            if ds is not None:
                parts[kind] = _sft_columns(ds).cast(features)
        rest = 1.0 - sum(shares[k] for k in parts if k != "scenario")
        want = {"scenario": len(scenario), **{k: round(shares[k] * len(scenario) / rest) for k in parts
                                               if k != "scenario"}}
        want = {k: n for k, n in want.items() if n > 0}
        mixed, stats = mix({k: parts[k] for k in want}, want, total=sum(want.values()), seed=ctx.recipe.data_seed_used)
        data[split] = mixed
        counts[split] = {k: want.get(k, 0) for k in ["scenario", *shares]}
        repeated = sorted(k for k, v in stats["sources"].items() if v["upsampled"])
        if repeated:
            counts.setdefault("repeated", {})[split] = repeated  # smaller than their share: records repeated
    return data["train"], data["validation"], counts


def _sft_columns(ds):
    """The columns SFT reads; a record without a ``target`` is an ``answer``."""
    ds = ds.select_columns([c for c in SFT_COLUMNS if c in ds.column_names])
    if "target" not in ds.column_names:
        ds = ds.add_column("target", ["answer"] * len(ds))
    return ds


def _instruction_split(ctx: RunContext, kind: str, split: str):
    """One split of corpora/<kind>'s instruction records for ``train.mix``; None when the corpus has no such
    split (validation, test)."""
    folder = ctx.path("corpora", kind)
    key = f"train.mix.{kind}"
    if not folder.exists():
        raise RecipeError(f"{key}: corpora/{kind} was not built in this run (configure corpora.{kind})")
    if split not in corpus_splits(folder):
        if split == "train":
            raise RecipeError(f"{key}: corpora/{kind} has no train records to mix into SFT")
        return None
    ds = load_split(folder, split)
    if "messages" not in ds.column_names:
        raise RecipeError(f"{key}: corpora/{kind} holds raw text only (no instruction records with messages): SFT "
                          f"mixes in instruction data only; raw text belongs in cpt.corpora")
    return ds if len(ds) else None


def model_and_corpus_inputs(stage: str):
    """A stage's model folder and the corpora it reads: the scenario corpus, and for SFT those of ``train.mix``."""
    def inputs(ctx: RunContext) -> list[Path]:
        kinds = ["scenario", *(ctx.recipe.train.mix.shares() if stage == "train" else [])]
        return [model_dir_after(ctx, stage), *corpus_dirs(ctx, kinds)]
    return inputs
