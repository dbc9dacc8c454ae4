"""tokenizer and base: a SentencePiece tokenizer and a tiny base model, for bases built from scratch."""

from __future__ import annotations

import re
from pathlib import Path

from banklm.corpora.splits import corpus_texts, token_counts
from banklm.finetune.models import build_tiny_model, convert_pickled_model
from banklm.finetune.tokenizer import load_tokenizer, train_tokenizer
from banklm.io import atomic_write_json
from banklm.pipeline import RunContext
from banklm.stages.common import CORPUS_KINDS, PICKLE_RISK, converts_pickle, corpus_dirs


def run_tokenizer(ctx: RunContext) -> list[Path]:
    """Train SentencePiece on every corpus of the run, then count each corpus's tokens with it."""

    corpora = {d.name: d for d in corpus_dirs(ctx, list(CORPUS_KINDS))}
    texts = [t for d in corpora.values() for t in corpus_texts(d)]
    out = ctx.path("tokenizer")
    vocab = ctx.recipe.tokenizer.vocab_size
    try:
        train_tokenizer(texts, out, vocab_size=vocab, seed=ctx.recipe.data_seed_used)
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


def base_inputs(ctx: RunContext) -> list[Path]:
    if converts_pickle(ctx.recipe.base):
        return [Path(ctx.recipe.base.path).expanduser()]
    return [ctx.path("tokenizer")]
