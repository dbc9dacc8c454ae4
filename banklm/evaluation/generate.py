"""Batched greedy generation with transformers (CPU or CUDA: inputs follow ``model.device``).

``generate(...)`` returns a :class:`GenerationResult`: a ``list[str]`` of decoded completions (input
order, special tokens removed, cut at the first EOS) that also carries ``seconds``, ``new_tokens``
(generated tokens up to and including each EOS) and ``tokens_per_s``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

__all__ = ["GenerationResult", "generate", "eos_token_ids"]


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
) -> GenerationResult:
    """Greedy-decode a completion for each conversation in ``messages_list``.

    Prompts come from ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` and are
    tokenised without adding special tokens again; batches are built from length-sorted prompts with
    LEFT padding and an attention mask, decoded with the KV cache, stopped at the model's
    ``generation_config`` EOS ids, and returned in the input order.
    """
    import torch
    from transformers import GenerationConfig

    n = len(messages_list)
    if n == 0:
        return GenerationResult([])
    texts = [_chat_text(tokenizer, m) for m in messages_list]
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(n), key=lambda i: -len(enc[i]))
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
                width = max(len(enc[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    seq = enc[i]
                    if seq:
                        ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                        mask[r, width - len(seq) :] = 1
                    prompt_tokens += len(seq)
                ids, mask = ids.to(device), mask.to(device)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
                gen = out[:, width:].tolist()
                for r, i in enumerate(idx):
                    toks = gen[r]
                    cut = len(toks)
                    # without an EOS the row ran to max_new_tokens: every token is real
                    for j, tok in enumerate(toks):
                        if tok in eos_ids:
                            cut = j + 1
                            break
                    new_tokens += cut
                    body = [t for t in toks[:cut] if t not in eos_ids]
                    out_texts[i] = tokenizer.decode(body, skip_special_tokens=True).strip()
    finally:
        if was_training:
            model.train()
    seconds = time.perf_counter() - t0
    return GenerationResult(out_texts, seconds=seconds, new_tokens=new_tokens, prompt_tokens=prompt_tokens)
