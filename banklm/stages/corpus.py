"""corpus: the four corpora built from the recipe's sources (banklm.corpora)."""

from __future__ import annotations

import json
from pathlib import Path

from banklm.corpora.build import (
    SourceError,
    build_general,
    build_mix,
    build_private,
    build_scenario,
    build_vertical,
    check_sources,
    check_tables,
    source_files,
)
from banklm.corpora.splits import scenario_test_prompts
from banklm.finetune.tokenizer import load_tokenizer
from banklm.ledger import data_lineage
from banklm.pipeline import RunContext
from banklm.recipe import Recipe, RecipeError
from banklm.stages.common import SCENARIO


def corpus_base_dir(r: Recipe) -> Path:
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

        tok = load_tokenizer(folder)
    except Exception as e:  # counts are informative: a tokenizer that will not load must not stop the corpus
        return None, f"the tokenizer in {folder} could not be loaded ({type(e).__name__})"

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]

    return count, str(folder)


def corpus_inputs(ctx: RunContext) -> list[Path]:
    """Source files, bank tables and the tokenizer the corpus stage reads (a changed file re-runs it).

    Checks the sources first: a missing file, a path outside the allowed folders or wrong field names
    raise a RecipeError (exit 2) naming the key and the file before anything is built.
    """

    r = ctx.recipe
    c, base = r.corpora, corpus_base_dir(r)
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
            files += check_tables([t.model_dump() for t in c.scenario.tables], base, seed=r.data_seed_used,
                                  splits=c.scenario.splits.model_dump())
        except SourceError as e:
            raise RecipeError(f"corpora.scenario.tables: {e}") from None
    files += _tokenizer_files(r)
    return sorted({f.resolve() for f in files})


def run_corpus(ctx: RunContext) -> list[Path]:
    """Build every configured corpus kind (scenario first: its test prompts decontaminate the others),
    then the mix when ``banklm.corpora.mix`` is set."""

    r = ctx.recipe
    c, base = r.corpora, corpus_base_dir(r)
    count_tokens, tokenizer = _token_counter(r)
    outputs: list[Path] = []
    prompts: list[str] = []
    if "scenario" in c.kinds():
        sc = c.scenario
        synth = {t: s.model_dump() for t, s in sc.synth.items()}
        build_scenario(synth, r.data_seed_used, ctx.path(SCENARIO), licence=sc.licence,
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
              pii=spec.pii.model_dump(), splits=spec.splits.model_dump(), seed=r.data_seed_used, base_dir=base,
              eval_prompts=prompts, decontaminate=spec.decontaminate.enabled, decontam_n=spec.decontaminate.n,
              licence=spec.licence, on_error=spec.on_error, num_proc=c.num_proc, count_tokens=count_tokens,
              tokenizer=tokenizer)
        outputs.append(out)
    if c.mix is not None:
        props = c.mix.proportions()
        out = ctx.path("corpora", "mix")
        build_mix({k: ctx.path("corpora", k) for k in props}, props, out, total=c.mix.total,
                  seed=r.data_seed_used if c.mix.seed is None else c.mix.seed)
        outputs.append(out)
    ctx.notes["corpus"] = _corpus_lineage(outputs, r.data_seed_used)
    return outputs


def _corpus_lineage(corpus_dirs: list[Path], seed: int) -> dict:
    """The ledger's data record per corpus kind: sources, sampling, counts, PII counts by type."""

    return {d.name: data_lineage(json.loads((d / "stats.json").read_text(encoding="utf-8")), seed)
            for d in corpus_dirs if (d / "stats.json").is_file()}
