"""Benchmark the answer-grammar token mask at a real model's vocabulary size.

    python scripts/bench_grammar.py [--vocab 150000] [--batch 1,8] [--records 20] [--hidden 896] [--json out.json]

Builds a byte-level BPE tokenizer of ``--vocab`` entries (a Qwen2-like mix: 1-3 character Chinese pieces, ASCII
words with and without a leading space, digit groups, punctuation; the 256 byte symbols first; no merges: only
the vocabulary matters to the mask), then decodes the built-in tasks' records under their per-request grammars
(``banklm.tasks.grammar.answer_grammar``) with random logits, so the mask meets multi-character pieces as a
model's choices would. Reported, per batch size:

* ``mask_ms_per_step``: computing the masks of every row and applying them to the logits (``GrammarMask.apply``)
  plus feeding the chosen tokens (``advance``), mean over the decoded steps;
* ``unmasked_ms_per_step``: the same loop's unmasked step: the LM-head matmul of a ``--hidden`` model at this
  vocabulary (896: Qwen2-0.5B) and the argmax, i.e. the part of a decode step that grows with the vocabulary;
* ``setup_ms_per_request``: GBNF text, its compilation and the matcher (per request), and the tokenizer view
  (once per tokenizer: ``tokenizer_view_s``).

The load average is recorded with the figures (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE vocabularies are written in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def build_tokenizer(folder: Path, size: int, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer folder (tokenizer.json + config) with ``size`` vocabulary entries."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = _byte_symbols()
    rng = random.Random(seed)
    vocab: dict[str, int] = {}
    for b in range(256):
        vocab.setdefault(b2u[b], len(vocab))
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 6000)] + list("：；，。、％元万亿笔次天个月年岁倍")
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < size - len(SPECIALS):
        r = rng.random()
        if r < 0.3:
            s = "".join(rng.choice(cjk) for _ in range(rng.randint(1, 3)))
        elif r < 0.8:
            s = (" " if rng.random() < 0.5 else "") + "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
        elif r < 0.85:
            s = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3)))
        else:
            s = "".join(rng.choice(letters + "".join(cjk[-20:]) + ".,%-") for _ in range(rng.randint(1, 4)))
        vocab.setdefault("".join(b2u[b] for b in s.encode()), len(vocab))
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "bos_token": None}), encoding="utf-8")
    return folder


def bench(tok, records: list[tuple], batch: int, hidden: int, seed: int = 0) -> dict:
    import torch

    from banklm.evaluation.constrained import GrammarMask, _compiled
    from banklm.tasks.grammar import answer_grammar

    _compiled.cache_clear()  # every request compiles its grammar, as in a real evaluation

    eos = tok.convert_tokens_to_ids("<|im_end|>")
    vocab = len(tok)
    gen = torch.Generator().manual_seed(seed)
    head = torch.randn(vocab, hidden, generator=gen) * 0.02
    mask_s, plain_s, setup_s, steps, requests = [], [], 0.0, 0, 0
    for start in range(0, len(records) - batch + 1, batch):
        rows = records[start: start + batch]
        t0 = time.perf_counter()
        mask = GrammarMask(tok, [answer_grammar(t, r["messages"]) for t, r in rows], [eos])
        setup_s += time.perf_counter() - t0
        requests += batch
        for _ in range(400):
            h = torch.randn(batch, hidden, generator=gen)
            t0 = time.perf_counter()
            logits = h @ head.T
            logits.argmax(-1)
            plain_s.append(time.perf_counter() - t0)
            logits = torch.randn(batch, vocab, generator=gen)  # the choices: random, so pieces of every length
            logits[:, eos] -= 4.0
            t0 = time.perf_counter()
            nxt = mask.apply(logits).argmax(-1).tolist()
            mask.advance(nxt)
            mask_s.append(time.perf_counter() - t0)
            steps += 1
            if all(mask.done):
                break
        if any(e for e in mask.errors):
            raise SystemExit(f"bench_grammar: a row failed under its own mask: {mask.errors}")
    return {"batch": batch, "steps": steps, "requests": requests,
            "mask_ms_per_step": 1000 * statistics.mean(mask_s),
            "mask_ms_per_step_p90": 1000 * statistics.quantiles(mask_s, n=10)[-1],
            "unmasked_ms_per_step": 1000 * statistics.mean(plain_s),
            "setup_ms_per_request": 1000 * setup_s / requests}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--records", type=int, default=16, help="records per built-in task")
    ap.add_argument("--hidden", type=int, default=896, help="hidden size of the LM head timed as the unmasked step")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    import torch
    from banklm.corpora.synth import generate_records
    from banklm.finetune.tokenizer import load_tokenizer

    from banklm.evaluation.constrained import _ll_tokenizer
    from banklm.tasks import get_task

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok = load_tokenizer(build_tokenizer(Path(tmp) / "tok", a.vocab))
        built = time.perf_counter() - t0
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        t0 = time.perf_counter()
        _ll_tokenizer(tok, len(tok), (eos,))
        view = time.perf_counter() - t0
        records = [(get_task(n), r) for n in ("credit", "aml", "audit")
                   for r in generate_records(n, a.records, 11, "test")]
        random.Random(0).shuffle(records)
        out = {"vocab": len(tok), "tokenizer_build_s": built, "tokenizer_view_s": view, "torch_threads":
               torch.get_num_threads(), "loadavg": os.getloadavg(),
               "runs": [bench(tok, records, int(b), a.hidden) for b in a.batch.split(",")]}
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
