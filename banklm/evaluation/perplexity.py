"""General-ability retention: perplexity of a model on held-out general text, before and after tuning.

A fine-tune that wins the bank tasks but forgets how to write ordinary Chinese shows up here as a
rise in perplexity on the general corpus's test split. :func:`token_nll` is the one loss loop: perplexity
scores every token of a text, :mod:`banklm.evaluation.instructions` the answer tokens of a conversation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def token_nll(model, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], *, pad_id: int = 0,
              batch_size: int = 16) -> list[tuple[float, int]]:
    """``(summed negative log-likelihood, tokens)`` per sequence over the tokens ``spans[i] = (start, end)``
    (token ``t`` scored from the logits at ``t - 1``, so ``start >= 1``), in input order. Rows are batched by
    length, right-padded with an attention mask; padding never counts."""
    import torch

    for (start, end), seq in zip(spans, sequences, strict=True):
        if not 1 <= start <= end <= len(seq):
            raise ValueError(f"token_nll: span ({start}, {end}) does not fit a sequence of {len(seq)} tokens")
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    with torch.no_grad():
        for first in range(0, len(order), batch_size):
            idx = order[first:first + batch_size]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            scored = torch.zeros((len(idx), width), dtype=torch.bool)
            for row, i in enumerate(idx):
                seq, (start, end) = sequences[i], spans[i]
                ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
                mask[row, : len(seq)] = 1
                scored[row, start:end] = True
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
            keep = scored[:, 1:]
            for row, i in enumerate(idx):
                out[i] = (float(nll[row][keep[row]].sum()), int(keep[row].sum()))
    return out


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16, max_length: int = 512) -> dict:
    """Token-weighted perplexity over ``texts`` (each truncated to ``max_length`` tokens).

    Returns ``{"perplexity", "nll_per_token", "tokens", "texts"}``; padding never counts.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer.encode(t, add_special_tokens=False)[:max_length] for t in texts]
    encoded = [e for e in encoded if len(e) >= 2]
    sums = token_nll(model, encoded, [(1, len(e)) for e in encoded], pad_id=pad, batch_size=batch_size)
    total_nll, total_tokens = sum(s for s, _ in sums), sum(n for _, n in sums)
    if total_tokens == 0:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": total_tokens, "texts": len(encoded)}
