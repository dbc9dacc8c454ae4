"""Batched greedy generation with transformers (CPU or CUDA: inputs follow ``model.device``).

``generate(...)`` returns a :class:`GenerationResult`: a ``list[str]`` of decoded completions (input
order, special tokens removed, cut at the first EOS) that also carries ``seconds``, ``new_tokens``
(generated tokens up to and including each EOS) and ``tokens_per_s``. With ``grammars`` (GBNF per
conversation, :mod:`banklm.tasks.grammar`) every token stays inside the answer grammar
(:func:`banklm.evaluation.constrained.grammar_logits_processor`); ``prefixes`` force each answer's start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from banklm.evaluation.constrained import GrammarMask, grammar_logits_processor

__all__ = ["GenerationResult", "PromptCache", "generate", "eos_token_ids", "continuation_ids"]


class GenerationResult(list):
    """Decoded texts (a list) plus throughput figures."""

    def __init__(self, texts=(), *, seconds: float = 0.0, new_tokens: int = 0, prompt_tokens: int = 0):
        super().__init__(texts)
        self.seconds = float(seconds)
        self.new_tokens = int(new_tokens)
        self.prompt_tokens = int(prompt_tokens)

    @property
    def texts(self) -> list[str]:
        return list(self)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def stats(self) -> dict:
        return {
            "seconds": self.seconds,
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "tokens_per_s": self.tokens_per_s,
        }


@dataclass
class PromptCache:
    """Tokens already run through the model, one row per conversation of a :func:`generate` call (label scoring's
    prefill): ``ids[r]`` the tokens of row ``r`` (the chat prompt, perhaps the answer's first key), right-aligned in
    a left-padded batch; ``past`` per layer ``(keys, values)`` of shape ``[rows, heads, width, head_dim]``.
    Generation continues from it where its own tokens agree with ``ids`` (the rest is run as usual)."""

    ids: list[list[int]]
    past: list

    def for_batch(self, rows: Sequence[int], seqs: Sequence[Sequence[int]], width: int, config):
        """A ``DynamicCache`` for a left-padded batch of width ``width`` holding ``seqs`` (row ``j`` of it is
        conversation ``rows[j]``), covering the leading positions every row shares with the prefilled tokens;
        None when nothing can be reused."""
        import numpy as np
        import torch
        from transformers import DynamicCache

        old = self.past[0][0].shape[2]
        usable = [len(os.path.commonprefix([list(self.ids[i]), list(seq)])) for i, seq in zip(rows, seqs, strict=True)]
        # positions [0, k) of the new layout: left padding, then tokens the prefill holds, for every row; at least
        # one token is left to run (generation needs the logits after it)
        k = min(min(width - len(seq) + u for seq, u in zip(seqs, usable, strict=True)), width - 1)
        if k <= 0 or min(usable) == 0:
            return None
        src = np.stack([np.clip(np.arange(k) - ((width - len(seq)) - (old - len(self.ids[i]))), 0, old - 1)
                        for i, seq in zip(rows, seqs, strict=True)])
        dev = self.past[0][0].device
        pick = torch.as_tensor(list(rows), device=dev)
        where = torch.as_tensor(src, device=dev)[:, None, :, None]
        layers = []
        for keys, values in self.past:
            at = where.expand(-1, keys.shape[1], -1, keys.shape[3])
            layers.append((keys[pick].gather(2, at), values[pick].gather(2, at)))
        return DynamicCache(layers, config=config)


def eos_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from ``model.generation_config`` (else ``<|im_end|>`` and the tokenizer's EOS)."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids = [eos]
    elif eos:
        ids = [int(e) for e in eos]
    if not ids:
        unk = getattr(tokenizer, "unk_token_id", None)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != unk:
            ids.append(im_end)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
    return ids


def continuation_ids(encode: Callable[[str], list[int]], prompt_text: str, prompt_ids: Sequence[int],
                     prefix: str) -> list[int]:
    """The token ids of ``prefix`` written right after a rendered prompt: the tail of the prompt and prefix
    tokenized together (so a SentencePiece or BPE merge across the boundary is the one the model saw in
    training), or ``prefix`` alone when the joint tokenization changes the prompt's own tokens."""
    if not prefix:
        return []
    joint = list(encode(prompt_text + prefix))
    n = len(prompt_ids)
    if joint[:n] == list(prompt_ids) and len(joint) > n:
        return joint[n:]
    return list(encode(prefix))


def _chat_text(tokenizer, messages: Sequence[dict]) -> str:
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):  # pragma: no cover - some versions return a list for batched input
        text = text[0]
    return text


def generate(
    model,
    tokenizer,
    messages_list: Sequence[Sequence[dict]],
    max_new_tokens: int = 128,
    batch_size: int = 64,
    *,
    grammars: Sequence[str] | None = None,
    prefixes: Sequence[str | None] | None = None,
    prompt_cache: PromptCache | None = None,
) -> GenerationResult:
    """Greedy-decode a completion for each conversation in ``messages_list``.

    Prompts come from ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` and are
    tokenised without adding special tokens again; batches are built from length-sorted prompts with
    LEFT padding and an attention mask, decoded with the KV cache, stopped at the model's
    ``generation_config`` EOS ids, and returned in the input order.

    ``grammars``: one GBNF text per conversation; each answer is decoded under its grammar (a
    :class:`~banklm.evaluation.constrained.GrammarMask` per batch). ``prefixes``: text each answer must start
    with (None: nothing forced), fed after the prompt (the mask advanced over it) and part of the returned
    text; ``max_new_tokens`` counts the tokens generated after it. ``prompt_cache``: the conversations' prompts as
    already prefilled (one batch: at most ``batch_size`` conversations), continued from instead of run again.
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    n = len(messages_list)
    if n == 0:
        return GenerationResult([])
    for what, v in (("grammars", grammars), ("prefixes", prefixes)):
        if v is not None and len(v) != n:
            raise ValueError(f"{len(v)} {what} for {n} conversations")
    if prompt_cache is not None and (n > batch_size or len(prompt_cache.ids) != n):
        raise ValueError(f"prompt_cache holds {len(prompt_cache.ids)} rows for {n} conversations in batches of "
                         f"{batch_size} (it serves exactly one batch)")
    texts = [_chat_text(tokenizer, m) for m in messages_list]
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(n), key=lambda i: -len(enc[i]))

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    forced = [continuation_ids(encode, texts[i], enc[i], prefixes[i] or "") if prefixes is not None else []
              for i in range(n)]
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0
    gen_cfg = GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_id,
    )
    device = model.device
    out_texts: list[str | None] = [None] * n
    new_tokens = 0
    prompt_tokens = 0
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for start in range(0, n, max(1, int(batch_size))):
                idx = order[start : start + batch_size]
                width = max(len(enc[i]) + len(forced[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    seq = enc[i] + forced[i]
                    if seq:
                        ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                        mask[r, width - len(seq) :] = 1
                    prompt_tokens += len(enc[i])
                ids, mask = ids.to(device), mask.to(device)
                extra = {}
                if prompt_cache is not None:
                    cache = prompt_cache.for_batch(idx, [enc[i] + forced[i] for i in idx], width, model.config)
                    if cache is not None:
                        extra["past_key_values"] = cache
                if grammars is not None:
                    gm = GrammarMask(tokenizer, [grammars[i] for i in idx], eos_ids)
                    for r, i in enumerate(idx):
                        if forced[i]:
                            gm.force(r, forced[i])
                    extra["logits_processor"] = LogitsProcessorList([grammar_logits_processor(gm, greedy=True)])
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, **extra)
                gen = out[:, width:].tolist()
                for r, i in enumerate(idx):
                    toks = gen[r]
                    cut = len(toks)
                    # without an EOS the row ran to max_new_tokens: every token is real
                    for j, tok in enumerate(toks):
                        if tok in eos_ids:
                            cut = j + 1
                            break
                    new_tokens += cut + len(forced[i])
                    body = [t for t in forced[i] + toks[:cut] if t not in eos_ids]
                    out_texts[i] = tokenizer.decode(body, skip_special_tokens=True).strip()
    finally:
        if was_training:
            model.train()
    seconds = time.perf_counter() - t0
    return GenerationResult(out_texts, seconds=seconds, new_tokens=new_tokens, prompt_tokens=prompt_tokens)
