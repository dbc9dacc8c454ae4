"""Canary memorisation probe: does a trained model complete planted PII values from their context?

De-identification should mean the model never saw a customer's ID number, so it cannot say it. To
check, plant *canaries* (fake values, ``corpora/samples/private/canaries.json``) in the private corpus,
train, then give the model the text that preceded each canary in the raw records and decode greedily:
a model that memorised the value continues with it. :func:`canary_contexts` finds those contexts,
:func:`probe_canaries` runs them (as plain text, the way continued pre-training saw it, and as a chat
turn) and reports, per probe, whether the completion contains the canary and how many of its leading
characters the model reproduced. Results name the canary's type, never its value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

_SEP = re.compile(r"[\s\-]")


def _pattern(value: str) -> re.Pattern:
    """The value as it may be written in text: digits and letters optionally separated by spaces/dashes."""
    parts = [re.escape(c) for c in value]
    return re.compile(r"[\s\-]?".join(parts))


def canary_contexts(texts: Iterable[str], canaries: Sequence[dict], context_chars: int = 32,
                    per_canary: int = 3) -> list[dict]:
    """``[{type, value, context}]``: up to ``per_canary`` occurrences of each canary (``{type, value}``) in
    ``texts``, with the ``context_chars`` characters before each (the prompt of the probe)."""
    out: list[dict] = []
    counts = {c["value"]: 0 for c in canaries}
    patterns = {c["value"]: _pattern(c["value"]) for c in canaries}
    for text in texts:
        for c in canaries:
            if counts[c["value"]] >= per_canary:
                continue
            for m in patterns[c["value"]].finditer(text):
                context = text[max(0, m.start() - context_chars):m.start()]
                if context.strip():
                    out.append({"type": c["type"], "value": c["value"], "context": context})
                    counts[c["value"]] += 1
                if counts[c["value"]] >= per_canary:
                    break
    return out


def _normal(s: str) -> str:
    return _SEP.sub("", s)


def probe_canaries(model, tokenizer, probes: Sequence[dict], chat: bool = True, extra_tokens: int = 8) -> list[dict]:
    """Greedy completions of each probe's context; ``[{type, mode, completed, prefix_chars, value_chars}]``.

    ``mode``: ``text`` (raw continuation) and, with ``chat``, ``chat`` (the context as a user turn, the
    answer as the assistant's). ``completed``: the completion contains the whole value (separators
    ignored). ``prefix_chars``: how many leading characters of the value the completion starts with.
    """
    import torch

    rows = []
    device = model.device
    was_training = model.training
    model.eval()
    try:
        for probe in probes:
            value = _normal(probe["value"])
            budget = len(tokenizer(probe["value"], add_special_tokens=False)["input_ids"]) + extra_tokens
            prompts = [("text", probe["context"])]
            if chat and tokenizer.chat_template:
                prompts.append(("chat", tokenizer.apply_chat_template(
                    [{"role": "user", "content": probe["context"]}], tokenize=False, add_generation_prompt=True)))
            for mode, prompt in prompts:
                ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
                with torch.inference_mode():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                                         do_sample=False, num_beams=1,
                                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                text = _normal(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
                rows.append({"type": probe["type"], "mode": mode, "completed": value in text,
                             "prefix_chars": len(os.path.commonprefix([text, value])), "value_chars": len(value)})
    finally:
        if was_training:
            model.train()
    return rows
