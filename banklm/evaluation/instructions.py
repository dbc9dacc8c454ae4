"""Instruction data (``messages``: prompt turns, then the assistant's answer): which tokens are the answer, and
how well a model answers held-out records.

:func:`answer_tokens` is the one definition of an instruction record's answer tokens, shared by SFT
(``banklm.finetune.sft`` trains on exactly these) and :func:`score_instructions` (scores exactly these): the
conversation rendered with the tokenizer's chat template as TRL renders conversational prompt/completion data
(the prompt alone with the generation prompt, prompt and answer together; the answer starts where the two
token sequences part). An ``answer`` target is learnt to the end of the turn (the end-of-turn token that
stops generation included); a ``labels`` target (an assistant message holding only the labelled keys,
``结论：拒绝；风险等级：C``) ends with its last content token, so the model is not taught to stop after the
labels.

:func:`score_instructions` gives the mean answer loss (per-token negative log-likelihood of the answer tokens,
through :func:`banklm.evaluation.perplexity.token_nll`) and the exact match of the greedy answer for records
whose reference answer has at most :data:`EXACT_MATCH_MAX_CHARS` characters (longer free answers cannot be
judged by string equality).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

from banklm.evaluation.generate import generate
from banklm.evaluation.perplexity import token_nll

TARGETS = ("answer", "labels")  # a scenario record's ``target``; records without one are "answer"
EXACT_MATCH_MAX_CHARS = 32


@dataclasses.dataclass(frozen=True)
class AnswerTokens:
    """A conversation's token ids; ``ids[start:end]`` are the tokens learnt and scored (``end`` is ``len(ids)``
    for an ``answer`` target: the end-of-turn tokens included)."""

    ids: list[int]
    start: int
    end: int


def check_conversation(messages, where: str) -> None:
    """A conversation SFT can learn from: at least one prompt turn, then an assistant answer. ValueError naming
    ``where`` (the record) otherwise."""
    if not messages or len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise ValueError(f"{where}: 'messages' must end with an assistant turn after a prompt")


def answer_tokens(tokenizer, conversations: Sequence[Sequence[dict]], targets: Sequence[str] | None = None,
                  names: Sequence[str] | None = None) -> list[AnswerTokens]:
    """The tokens of each conversation and where its answer starts and ends (see the module docstring).

    ``targets``: ``"answer"`` (default) or ``"labels"`` per conversation; ``names`` (record ids) for error
    lines. ValueError naming the record for a conversation without a final assistant turn, an unknown target,
    or a ``labels`` answer whose end cannot be found among the tokens (a template that rewrites the content)."""
    n = len(conversations)
    targets = list(targets) if targets is not None else ["answer"] * n
    names = list(names) if names is not None else [f"record {i}" for i in range(n)]
    convs = []
    for msgs, target, name in zip(conversations, targets, names, strict=True):
        check_conversation(msgs, f"SFT record {name}")
        if target not in TARGETS:
            raise ValueError(f"SFT record {name}: target must be one of {', '.join(TARGETS)}, got {target!r}")
        convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    prompts = [tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in convs]
    fulls = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if n else []
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"] if n else []
    starts = [len(os.path.commonprefix([p, f])) for p, f in zip(prompt_ids, full_ids, strict=True)]
    ends = [len(f) for f in full_ids]
    labelled = [i for i in range(n) if targets[i] == "labels"]
    cuts = []
    for i in labelled:  # the rendered text up to the end of the answer's content
        content = convs[i][-1]["content"]
        pos = fulls[i].find(content, len(os.path.commonprefix([prompts[i], fulls[i]])))
        if not content.strip() or pos < 0:
            raise ValueError(f"SFT record {names[i]}: labels target, but its answer text is empty or not found in "
                             "the chat-rendered conversation")
        cuts.append(fulls[i][: pos + len(content)])
    for i, pre in zip(labelled, tokenizer(cuts, add_special_tokens=False)["input_ids"] if cuts else [], strict=True):
        if full_ids[i][: len(pre)] != pre or len(pre) <= starts[i]:
            raise ValueError(f"SFT record {names[i]}: labels target, but the tokens of its answer do not end where "
                             "its text ends (the tokenizer merges the answer with the end of the turn)")
        ends[i] = len(pre)
    return [AnswerTokens(f, s, e) for f, s, e in zip(full_ids, starts, ends, strict=True)]


def score_instructions(model, tokenizer, records: Sequence[dict], *, batch_size: int = 16, loss_batch_size: int = 8,
                       max_new_tokens: int = 128, max_length: int | None = None,
                       exact_match_max_chars: int = EXACT_MATCH_MAX_CHARS) -> dict:
    """Answer loss and short-answer exact match of ``model`` on instruction ``records`` (``id``, ``messages``).

    Returns ``{"n", "answer_loss", "answer_tokens", "n_exact_match", "exact_match", "exact_match_hits",
    "skipped", "records"}``: ``answer_loss`` = summed NLL of every scored answer token / their count (a mean per
    token, as the SFT loss); ``exact_match`` = share of the ``n_exact_match`` records (reference answer of at
    most ``exact_match_max_chars`` characters, whitespace at either end ignored) whose greedy answer equals the
    reference, None when no record is that short. ``skipped``: records not scored, by reason (no final
    assistant turn; longer than ``max_length`` tokens, default the model's context). ``records``: per record
    ``{"id", "loss", "tokens", "exact_match"}`` (None when not eligible). ``batch_size``: conversations per
    generation batch; ``loss_batch_size``: per forward pass of the loss (full logits: keep it small for a large
    vocabulary)."""
    max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 10**9
    skipped: dict[str, int] = {}
    usable = []
    for i, r in enumerate(records):
        try:
            check_conversation(r.get("messages"), str(r.get("id", i)))
        except ValueError:
            skipped["no final assistant turn"] = skipped.get("no final assistant turn", 0) + 1
            continue
        usable.append(r)
    spans = answer_tokens(tokenizer, [r["messages"] for r in usable], names=[str(r.get("id")) for r in usable])
    kept = [(r, s) for r, s in zip(usable, spans, strict=True) if len(s.ids) <= max_length]
    if len(kept) < len(usable):
        skipped[f"longer than {max_length} tokens"] = len(usable) - len(kept)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = token_nll(model, [s.ids for _, s in kept], [(s.start, s.end) for _, s in kept], pad_id=pad,
                     batch_size=loss_batch_size)
    refs = [r["messages"][-1]["content"].strip() for r, _ in kept]
    eligible = [i for i, ref in enumerate(refs) if len(ref) <= exact_match_max_chars]
    hits: dict[int, bool] = {}
    if eligible:
        longest = max(kept[i][1].end - kept[i][1].start for i in eligible)
        answers = generate(model, tokenizer, [kept[i][0]["messages"][:-1] for i in eligible],
                           max_new_tokens=min(max_new_tokens, 2 * longest + 8), batch_size=batch_size)
        hits = {i: a.strip() == refs[i] for i, a in zip(eligible, answers, strict=True)}
    total, tokens = sum(s for s, _ in sums), sum(n for _, n in sums)
    return {
        "n": len(kept),
        "answer_loss": total / tokens if tokens else None,
        "answer_perplexity": math.exp(total / tokens) if tokens else None,
        "answer_tokens": tokens,
        "n_exact_match": len(eligible),
        "exact_match": sum(hits.values()) / len(hits) if hits else None,
        "exact_match_hits": sum(hits.values()),
        "exact_match_max_chars": exact_match_max_chars,
        "skipped": skipped,
        "records": [{"id": r.get("id"), "loss": s / n if n else None, "tokens": n, "exact_match": hits.get(i)}
                    for i, ((r, _), (s, n)) in enumerate(zip(kept, sums, strict=True))],
    }
