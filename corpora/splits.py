"""Split loaders: read the splits of a built corpus (``corpora/<kind>/data``) for training, evaluation and export.

Every reader of a built corpus goes through :func:`load_split` (or :func:`corpus_splits` / :func:`corpus_texts`),
which never writes cache files into the corpus folder: those would change the files the ledger recorded for it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def load_split(corpus_dir: Path, split: str, tasks: list[str] | None = None, limit_per_task: int | None = None):
    """Read one split of a built corpus as a ``datasets.Dataset`` (optionally some tasks, capped per task)."""
    import datasets
    from datasets import load_from_disk

    # Transforms of a loaded corpus (filters here, tokenisation in the trainers) must never write cache
    # files into the corpus folder: that would change the files the ledger recorded for it.
    datasets.disable_caching()
    dd = load_from_disk(str(Path(corpus_dir) / "data"))
    if split not in dd:
        raise KeyError(f"{corpus_dir}: no '{split}' split (this corpus has: {', '.join(dd)})")
    ds = dd[split]
    if tasks is not None:
        # keep_in_memory: a cache file written into the corpus folder would change its recorded hashes
        ds = ds.filter(lambda t: t in tasks, input_columns="task", keep_in_memory=True)
    if limit_per_task is not None:
        ds = ds.select(first_per_task(ds["task"], limit_per_task))
    return ds


def first_per_task(tasks, limit: int) -> list[int]:
    """Indices of the first ``limit`` records of each task, in order."""
    counts: Counter = Counter()
    keep = []
    for i, t in enumerate(tasks):
        if counts[t] < limit:
            counts[t] += 1
            keep.append(i)
    return keep


def corpus_splits(corpus_dir: Path) -> list[str]:
    """The splits a built corpus has (a split that received no records is not saved)."""
    from datasets import load_from_disk

    return list(load_from_disk(str(Path(corpus_dir) / "data")))


def corpus_texts(corpus_dir: Path, splits: tuple[str, ...] = ("train", "validation")) -> list[str]:
    """Every piece of text in some splits of a corpus: ``text``, or each message's content."""
    have = corpus_splits(corpus_dir)
    texts: list[str] = []
    for split in splits:
        if split not in have:
            continue
        ds = load_split(corpus_dir, split)
        if "messages" in ds.column_names:
            texts.extend(m["content"] for msgs in ds["messages"] if msgs for m in msgs)
        if "text" in ds.column_names:
            texts.extend(t for t in ds["text"] if t)
    return texts


def token_counts(corpus_dirs: dict[str, Path], tokenizer) -> dict:
    """Tokens per corpus kind and split with the run's tokenizer (for from-scratch runs, after it is trained)."""
    out: dict = {}
    for kind, d in corpus_dirs.items():
        out[kind] = {}
        for split in corpus_splits(d):
            texts = corpus_texts(d, (split,))
            n = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
            out[kind][split] = {"texts": len(texts), "tokens": n}
    return out


def user_prompts(records) -> list[str]:
    """The user turns of instruction records (what decontamination compares against)."""
    return ["\n".join(m["content"] for m in r["messages"] if m["role"] == "user") for r in records]


def scenario_test_prompts(corpus_dir: str | Path) -> list[str]:
    """User prompts of the test splits (``test``, and ``test_prevalence`` when built) of a built scenario corpus
    (``[]`` when there is none)."""
    from datasets import load_from_disk

    data = Path(corpus_dir) / "data"
    if not data.is_dir():
        return []
    dd = load_from_disk(str(data))
    return [p for split in ("test", "test_prevalence") if split in dd for p in user_prompts(dd[split])]
