"""General-ability retention: perplexity of a model on held-out general text, before and after tuning.

A fine-tune that wins the bank tasks but forgets how to write ordinary Chinese shows up here as a
rise in perplexity on the general corpus's test split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16, max_length: int = 512) -> dict:
    """Token-weighted perplexity over ``texts`` (each truncated to ``max_length`` tokens).

    Returns ``{"perplexity", "nll_per_token", "tokens", "texts"}``; padding never counts.
    """
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_nll, total_tokens = 0.0, 0
    encoded = [tokenizer.encode(t, add_special_tokens=False)[:max_length] for t in texts]
    encoded = [e for e in encoded if len(e) >= 2]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[start:start + batch_size]]
            width = max(len(b) for b in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, b in enumerate(batch):
                ids[row, : len(b)] = torch.tensor(b)
                mask[row, : len(b)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = ids[:, 1:]
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            valid = mask[:, 1:].bool()
            total_nll += float(nll[valid].sum())
            total_tokens += int(valid.sum())
    if total_tokens == 0:
        raise ValueError("perplexity needs at least one text of two or more tokens")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": total_tokens, "texts": len(encoded)}
