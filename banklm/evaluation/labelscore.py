"""Label scoring: the probability of every allowed label combination of a task's answer, read from the model's
token probabilities instead of decoded, on PyTorch, ONNX (banklm's own loop) and llama.cpp.

**What is scored.** The *label keys* are the leading run of single-valued category keys of the answer layout
(:meth:`~banklm.tasks.base.Task.format_answer`), up to the reason or the first multi-label key: credit
``decision, grade``, aml ``conclusion, typology``, audit ``category, severity``. A candidate is one allowed
combination of their values, written exactly as the answer writes it, **in context**: the chat prompt rendered as
banklm's generation renders it (:func:`banklm.evaluation.generate._chat_text`), then the answer prefix with its
separators, ``结论：拒绝；风险等级：D；`` (the ``；`` closes the last value, so ``高`` is not confused with a value
``高风险``). The prompt and the candidate are tokenized together (the model's own merges across the boundary); the
tokens every candidate shares (the prompt, the answer's first key) are the context and cancel out. A candidate
also ends well when the model stops right after it (a model trained on labels only): its probability is
``P(prefix + "；") + P(prefix + EOS)`` (EOS alone when nothing follows the label keys in the answer). The
candidates' probabilities are normalised over the allowed ones: ``combos``. ``chosen`` takes the keys in answer
order, each its most probable value given the values chosen before it (:func:`choose_combo`: the leading decision
by its marginal, as the answer is written; the single most probable combination can hold a less probable
decision); each key's ``confidence`` is the marginal probability of its chosen value.

**Allowed combinations (pruning).** With rules, a combination is allowed when some rule outcome produces it (a
key an outcome leaves unset takes every value): aml gives 正常 with 无 only and 可疑 with each typology, credit the
5 (decision, grade) pairs of its rules. Without rules (a bank's labels from its table) every combination is
allowed. The primary key's abstain value (e.g. 转人工) is always a candidate: with the other keys as the rules set
them with it, or with every value when no rule produces it.

**Multi-label keys** directly after the label keys (before the reason) are scored per value, given the chosen
combination: the candidates are the lists the answer may write there (values in declared order joined by ``、``,
each list closed like a combination), namely the rule outcomes' lists for the chosen combination, else every
non-empty subset of the values (at most :data:`MAX_LISTS`: beyond that the subsets of at most ``k`` values, the
largest ``k`` that fits). ``multi[key][v]`` is the probability that the list contains ``v`` (the sum of the
normalised probabilities of the lists holding ``v``): exact for those candidates, with one more batched pass.
``chosen[key]`` is the most probable list and its ``confidence`` that list's probability.

**Cost.** Per batch of prompts one forward pass over the prompts (left-padded), then one more over the
candidates on the prompts' KV cache. PyTorch puts a prompt's candidates in one row as their token trie (each token
once, attending the prompt and its ancestors through a 4D mask, positions by depth; attention implementations
outside :data:`TREE_ATTENTION` get one row per candidate). ONNX (a 2D mask only) scores one row per candidate on
the ``past`` tensors indexed by candidate. llama.cpp (one sequence per context) evaluates the prompt once and
walks the trie, rewinding its KV cache to the shared prefix, one token per node (no multi-token batches: those
stall on a loaded CPU).
``prefix`` in each result is the chosen answer prefix (labels and lists, with the ``；`` that follows them): what a
constrained decoder forces before generating the rest.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from banklm.evaluation.generate import PromptCache, _chat_text
from banklm.tasks.base import Task, fold_fullwidth, iter_user_messages
from banklm.tasks.registry import get_task

__all__ = ["score_labels", "score_label_batches", "choose_combo", "label_space", "LabelSpace", "label_scores_record", "MAX_LISTS", "MAX_COMBOS"]

#: the most candidate lists of one multi-label key (a key of up to 8 values: every non-empty subset)
MAX_LISTS = 256
#: the most label combinations scored per prompt when no rules prune them
MAX_COMBOS = 512
#: attention implementations that read a 4D mask (PyTorch scores a prompt's candidates as one trie row on them)
TREE_ATTENTION = ("sdpa", "eager")
#: logits kept in memory at once per suffix pass (rows x tokens x vocabulary), about 64 MB of float32
_LOGIT_BUDGET = 1 << 24


# --------------------------------------------------------------------------------------------------
# what is scored


@dataclass(frozen=True)
class LabelSpace:
    """The label keys of a task, their allowed combinations and the multi-label keys scored after them."""

    task: Task
    keys: tuple[str, ...]
    combos: tuple[dict, ...]
    multi: tuple[str, ...]
    outcomes: tuple[dict, ...]  # the rule outcomes over keys + multi (lists as tuples); empty without rules

    def lists(self, key: str, chosen: Mapping[str, Any]) -> list[tuple[str, ...]]:
        """The candidate lists of multi-label ``key`` given the values ``chosen`` for the keys before it."""
        got = [o[key] for o in self.outcomes if key in o and all(o.get(k, v) == v for k, v in chosen.items())]
        if got:
            return list(dict.fromkeys(got))
        values = self.task.values_of(key)
        size, total = 0, 0
        while size < len(values) and total + math.comb(len(values), size + 1) <= MAX_LISTS:
            size += 1
            total += math.comb(len(values), size)
        return [c for k in range(1, max(size, 1) + 1) for c in itertools.combinations(values, k)]


def label_space(task: Task | str) -> LabelSpace:
    """The label keys, allowed combinations and multi-label keys of ``task`` (see the module docstring)."""
    task = get_task(task) if isinstance(task, str) else task
    fields = task.answer_fields
    keys: list[str] = []
    for f in fields:
        if f.kind != "category":
            break
        keys.append(f.key)
    if task.primary_key not in keys:
        raise ValueError(f"{task.name}: label scoring needs the primary key {task.primary_key!r} among the category "
                         f"keys before the reason or a multi-label key (answer order: "
                         f"{', '.join(f.key for f in fields)})")
    multi = []
    for f in fields[len(keys):]:
        if f.kind != "multi":
            break
        multi.append(f.key)
    scored = keys + multi
    outcomes = tuple({k: tuple(v) if isinstance(v, list) else v for k, v in r.outcome.items() if k in scored}
                     for r in task.spec.rules)
    values = {k: task.values_of(k) for k in keys}
    if math.prod(len(v) for v in values.values()) > MAX_COMBOS and not outcomes:
        raise ValueError(f"{task.name}: {' x '.join(str(len(v)) for v in values.values())} label combinations of "
                         f"{', '.join(keys)} are more than label scoring scores ({MAX_COMBOS}); give the spec rules "
                         "(their outcomes are the allowed combinations)")
    every = [dict(zip(keys, vs, strict=True)) for vs in itertools.product(*(values[k] for k in keys))]
    if outcomes:
        allowed = [c for c in every if any(all(o.get(k, c[k]) == c[k] for k in keys) for o in outcomes)]
        if task.abstain is not None and not any(c[task.primary_key] == task.abstain for c in allowed):
            allowed += [c for c in every if c[task.primary_key] == task.abstain]
        every = [c for c in every if c in allowed]  # declared value order
    return LabelSpace(task, tuple(keys), tuple(every), tuple(multi), outcomes)


def _text(task: Task, answer: Mapping[str, Any]) -> str:
    """``answer`` (a leading run of the answer's keys) as :meth:`Task.format_answer` writes it."""
    return task.format_answer(answer, _leading(task, answer))


def _leading(task: Task, answer: Mapping[str, Any]) -> list[str]:
    """The answer's keys in order up to the first one ``answer`` does not give."""
    return list(itertools.takewhile(lambda k: k in answer, task.answer_keys))


def _followed(task: Task, key: str) -> bool:
    """Whether another answer field comes after ``key`` (its value is then closed by ``；``)."""
    return task.answer_keys.index(key) < len(task.answer_keys) - 1


# --------------------------------------------------------------------------------------------------
# runtimes: prefill a batch of contexts, then score token suffixes on their KV caches


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


class _KVBackend:
    """PyTorch and ONNX: batched prefill, then suffix passes over the prompts' caches indexed by candidate."""

    sequential = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []

    def encode_joined(self, prompts: Sequence[str], suffixes: Sequence[Sequence[str]]) -> list[list[list[int]]]:
        """Per prompt, ``encode([prompt + s for s in its suffixes])``, without tokenizing each long prompt once per
        suffix: the text up to a prompt's last special token (``<|im_start|>``) tokenizes on its own, so only the
        rest is joined to the suffixes (checked per prompt against one full tokenization, else tokenized whole).
        Three tokenizer calls for the batch: the per-call overhead, not the length, is what costs."""
        specials = getattr(self, "_specials", None)
        if specials is None:
            decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
            specials = self._specials = [t.content for t in decoder.values() if getattr(t, "special", False)]
        cuts = [max((p.rfind(t) for t in specials), default=-1) if sfx else -1
                for p, sfx in zip(prompts, suffixes, strict=True)]
        split = [i for i, c in enumerate(cuts) if c > 0]
        heads = self.encode([prompts[i][:cuts[i]] for i in split] + [prompts[i] + suffixes[i][0] for i in split])
        tails = self.encode([prompts[i][cuts[i]:] + x for i in split for x in suffixes[i]])
        out: list[list[list[int]] | None] = [None] * len(prompts)
        at = 0
        for j, i in enumerate(split):
            got = [heads[j] + t for t in tails[at:at + len(suffixes[i])]]
            at += len(suffixes[i])
            if got[0] == heads[len(split) + j]:
                out[i] = got
        whole = [i for i in range(len(prompts)) if out[i] is None]
        flat = self.encode([prompts[i] + x for i in whole for x in suffixes[i]])
        at = 0
        for i in whole:
            out[i] = flat[at:at + len(suffixes[i])]
            at += len(suffixes[i])
        return out

    def prefill(self, ctxs: Sequence[Sequence[int]]) -> dict:
        width = max(len(c) for c in ctxs)
        ids = np.full((len(ctxs), width), self.pad, dtype=np.int64)
        mask = np.zeros((len(ctxs), width), dtype=np.int64)
        for r, c in enumerate(ctxs):
            ids[r, width - len(c):] = c
            mask[r, width - len(c):] = 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        past, last = self._prefill(ids, mask, pos)
        return {"past": past, "mask": mask, "lens": np.array([len(c) for c in ctxs]), "last": _log_softmax(last)}

    def score(self, state: dict, reqs: Sequence[tuple[int, tuple[int, ...], Sequence[int]]]):
        """``(log p(body), log p(finals | body))`` per request ``(row, body, finals)`` on row ``row``'s cache."""
        out: list[tuple[float, np.ndarray] | None] = [None] * len(reqs)
        todo = []
        for i, (row, body, finals) in enumerate(reqs):
            if body:
                todo.append(i)
            else:
                out[i] = (0.0, state["last"][row, list(finals)])
        todo.sort(key=lambda i: len(reqs[i][1]))
        chunks: list[list[int]] = []
        for i in todo:  # rows of one pass: their logits (rows x longest body x vocabulary) fit the budget
            if not chunks or (len(chunks[-1]) + 1) * len(reqs[i][1]) * self.vocab > _LOGIT_BUDGET:
                chunks.append([])
            chunks[-1].append(i)
        for chunk in chunks:
            width = len(reqs[chunk[-1]][1])
            rows = np.array([reqs[i][0] for i in chunk])
            ids = np.full((len(chunk), width), self.pad, dtype=np.int64)
            smask = np.zeros((len(chunk), width), dtype=np.int64)
            for r, i in enumerate(chunk):
                body = reqs[i][1]
                ids[r, :len(body)] = body
                smask[r, :len(body)] = 1
            mask = np.concatenate([state["mask"][rows], smask], axis=1)
            pos = state["lens"][rows][:, None] + np.arange(width)[None]
            lp = self._suffix(state["past"], rows, ids, mask, pos)  # log-probs [rows, width, vocabulary]
            for r, i in enumerate(chunk):
                _, body, finals = reqs[i]
                n = len(body)
                steps = lp[r, np.arange(n - 1), list(body[1:])].astype(np.float64).sum()
                out[i] = (float(state["last"][rows[r], body[0]] + steps), lp[r, n - 1, list(finals)])
        return out


class _TorchBackend(_KVBackend):
    def __init__(self, model, tokenizer):
        super().__init__(tokenizer)
        self.model = model
        head = model.get_output_embeddings()
        self.vocab = int(head.weight.shape[0]) if head is not None else int(model.config.get_text_config().vocab_size)

    def _prefill(self, ids, mask, pos):
        import torch
        from transformers import DynamicCache

        dev = self.model.device
        t = {k: torch.as_tensor(v, device=dev) for k, v in (("input_ids", ids), ("attention_mask", mask),
                                                              ("position_ids", pos))}
        with torch.inference_mode():
            try:  # logits of the last position only (a model without the argument computes them all)
                out = self.model(**t, past_key_values=DynamicCache(config=self.model.config), use_cache=True,
                                 logits_to_keep=1)
            except TypeError:
                out = self.model(**t, past_key_values=DynamicCache(config=self.model.config), use_cache=True)
        past = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return past, out.logits[:, -1].float().cpu().numpy()

    def score(self, state: dict, reqs):
        """The candidates of a prompt share one row: their token trie, each node attending the prompt and its
        ancestors (a 4D mask, positions by depth), on the prompt's cache as it is (no copy per candidate)."""
        if getattr(self.model.config, "_attn_implementation", None) not in TREE_ATTENTION:
            return super().score(state, reqs)  # an attention that may not read 4D masks: one row per candidate
        tries: list[dict[tuple[int, ...], int]] = [{} for _ in state["lens"]]
        for row, body, _ in reqs:
            for t in range(1, len(body) + 1):
                tries[row].setdefault(tuple(body[:t]), len(tries[row]))
        out: list[tuple[float, np.ndarray] | None] = [None] * len(reqs)
        chunks: list[list[int]] = []
        for r in sorted((r for r, tr in enumerate(tries) if tr), key=lambda r: len(tries[r])):
            if not chunks or (len(chunks[-1]) + 1) * len(tries[r]) * self.vocab > _LOGIT_BUDGET:
                chunks.append([])
            chunks[-1].append(r)
        lps = {}
        for chunk in chunks:
            lp = self._tree(state, chunk, [tries[r] for r in chunk])
            lps.update({r: lp[i] for i, r in enumerate(chunk)})
        for i, (row, body, finals) in enumerate(reqs):
            if not body:
                out[i] = (0.0, state["last"][row, list(finals)])
                continue
            node, lp = tries[row], lps[row]
            steps = sum(float(lp[node[tuple(body[:t])], body[t]]) for t in range(1, len(body)))
            out[i] = (float(state["last"][row, body[0]]) + steps, lp[node[tuple(body)], list(finals)])
        return out

    def _tree(self, state, rows, tries) -> np.ndarray:
        """Log-probs ``[rows, nodes, vocabulary]`` after each trie node of each row."""
        import torch
        from transformers import DynamicCache

        n, width, dev = len(rows), max(len(t) for t in tries), self.model.device
        ids = np.full((n, width), self.pad, dtype=np.int64)
        pos = np.zeros((n, width), dtype=np.int64)
        sees = np.zeros((n, width, width), dtype=bool)
        for r, trie in enumerate(tries):
            sees[r, np.arange(width), np.arange(width)] = True  # padding nodes see themselves only
            for path, k in trie.items():
                ids[r, k], pos[r, k] = path[-1], state["lens"][rows[r]] + len(path) - 1
                sees[r, k, [trie[path[:j]] for j in range(1, len(path) + 1)]] = True
        ctx = np.broadcast_to(state["mask"][rows][:, None, :].astype(bool), (n, width, state["mask"].shape[1]))
        dtype = next(self.model.parameters()).dtype
        allowed = torch.as_tensor(np.concatenate([ctx, sees], axis=2)[:, None], device=dev)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        idx = torch.as_tensor(np.asarray(rows), device=dev)
        cache = DynamicCache([(k[idx], v[idx]) for k, v in state["past"]], config=self.model.config)
        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(ids, device=dev), attention_mask=mask,
                             position_ids=torch.as_tensor(pos, device=dev), past_key_values=cache, use_cache=True)
        return torch.log_softmax(out.logits.float(), dim=-1).cpu().numpy()

    def _suffix(self, past, rows, ids, mask, pos):
        import torch
        from transformers import DynamicCache

        dev = self.model.device
        idx = torch.as_tensor(rows, device=dev)
        cache = DynamicCache([(k[idx], v[idx]) for k, v in past], config=self.model.config)
        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(ids, device=dev), attention_mask=torch.as_tensor(mask, device=dev),
                             position_ids=torch.as_tensor(pos, device=dev), past_key_values=cache, use_cache=True)
        return torch.log_softmax(out.logits.float(), dim=-1).cpu().numpy()


class _OnnxBackend(_KVBackend):
    def __init__(self, lm, tokenizer):
        super().__init__(tokenizer)
        self.lm = lm
        self.vocab = None

    def _prefill(self, ids, mask, pos):
        logits, present = self.lm.forward(ids, mask, pos, self.lm.empty_past(len(ids)))
        self.vocab = int(logits.shape[-1])
        return present, logits[:, -1].astype(np.float32)

    def _suffix(self, past, rows, ids, mask, pos):
        logits, _ = self.lm.forward(ids, mask, pos, {n: a[rows] for n, a in past.items()})
        return _log_softmax(logits)


class _LlamaCppBackend:
    """llama.cpp: one prompt at a time; candidates walked as a token trie on the prompt's KV cache."""

    sequential = True

    def __init__(self, lm):
        self.lm = lm

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.lm.tokenize(t) for t in texts]

    def prefill(self, ctxs: Sequence[Sequence[int]]) -> dict:
        (ctx,) = ctxs
        if len(ctx) >= self.lm.n_ctx:
            raise ValueError(f"prompt of {len(ctx)} tokens does not fit llama.cpp's context of {self.lm.n_ctx}")
        self.lm.llm.reset()
        self.lm.llm.eval(list(ctx))
        self._holds = {"ctx": list(ctx), "base": len(ctx), "last": _log_softmax(self.lm.last_logits())[None]}
        return self._holds

    def score(self, state: dict, reqs):
        if state is not getattr(self, "_holds", None):  # the KV cache now holds another context: evaluate it again
            state = self.prefill([state["ctx"]])
        llm, base = self.lm.llm, state["base"]
        path: list[int] = []
        lps = [state["last"][0]]  # lps[d]: next-token log-probs after the first d body tokens of ``path``
        out: list[tuple[float, np.ndarray] | None] = [None] * len(reqs)
        for i in sorted(range(len(reqs)), key=lambda i: reqs[i][1]):  # depth-first over the trie
            _, body, finals = reqs[i]
            if base + len(body) >= self.lm.n_ctx:
                raise ValueError(f"prompt and answer prefix ({base + len(body)} tokens) do not fit llama.cpp's "
                                 f"context of {self.lm.n_ctx}")
            common = 0
            while common < min(len(path), len(body)) and path[common] == body[common]:
                common += 1
            del path[common:], lps[common + 1:]
            llm.n_tokens = base + common  # the next eval drops the KV cache from here on
            for tok in body[common:]:
                llm.eval([tok])
                path.append(tok)
                lps.append(_log_softmax(self.lm.last_logits()))
            out[i] = (float(sum(float(lps[t][body[t]]) for t in range(len(body)))), lps[len(body)][list(finals)])
        return out


def _backend(lm, tokenizer):
    if hasattr(lm, "llm") and hasattr(lm, "last_logits"):
        return _LlamaCppBackend(lm)
    if hasattr(lm, "empty_past") and hasattr(lm, "forward"):
        return _OnnxBackend(lm, tokenizer)
    model = lm if hasattr(lm, "config") else getattr(lm, "model", None)  # a transformers model, or TorchLM's
    if hasattr(model, "config") and hasattr(model, "get_output_embeddings"):
        return _TorchBackend(model, tokenizer)
    raise TypeError(f"label scoring runs on TorchLM, OnnxCausalLM, LlamaCppLM or a transformers causal LM, "
                    f"not {type(lm).__name__}")


def _default_eos(lm, tokenizer) -> list[int]:
    from banklm.evaluation.generate import eos_token_ids

    model = lm if hasattr(lm, "config") else getattr(lm, "model", None)
    if model is not None and hasattr(model, "config"):
        return eos_token_ids(model, tokenizer)
    ids = []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != getattr(tokenizer, "unk_token_id", None):
        ids.append(im_end)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


# --------------------------------------------------------------------------------------------------
# scoring


def _variants(backend, prompts: Sequence[str], texts: Sequence[Sequence[str]], closed: bool,
              eos: Sequence[int]) -> list[list[list[list[int]]]]:
    """Per prompt, per candidate text, the token ids of prompt + candidate once per way the candidate may end:
    ``；`` (when a field follows) or an EOS id. Tokenized together (the model's merges across the boundary)."""
    ends = ("；", "") if closed else ("",)
    suffixes = [[t + end for t in per for end in ends] for per in texts]
    if hasattr(backend, "encode_joined"):
        ids = backend.encode_joined(prompts, suffixes)
    else:
        ids = [backend.encode([p + x for x in sfx]) for p, sfx in zip(prompts, suffixes, strict=True)]
    per = len(ends)
    out = []
    for got_p, texts_p in zip(ids, texts, strict=True):
        row = []
        for j in range(len(texts_p)):
            got = got_p[j * per:(j + 1) * per]
            row.append(got[:-1] + [got[-1] + [int(e)] for e in eos])
        out.append(row)
    return out


def _common(seqs: Sequence[list[int]]) -> int:
    """The length of the token prefix all ``seqs`` share."""
    return len(os.path.commonprefix(list(seqs)))


def _candidate_logps(backend, state, ctxs, cands) -> list[np.ndarray]:
    """Per record, the log-probability of each candidate (its variants summed) after the record's context."""
    reqs, where = [], {}
    for r, per in enumerate(cands):
        n = len(ctxs[r])
        for variants in per:
            for v in variants:
                key = (r, tuple(v[n:-1]))
                if key not in where:
                    where[key] = len(reqs)
                    reqs.append((r, key[1], []))
                reqs[where[key]][2].append(v[-1])
    scored = backend.score(state, reqs)
    out = []
    for r, per in enumerate(cands):
        n = len(ctxs[r])
        row = []
        for variants in per:
            lps = []
            for v in variants:
                i = where[(r, tuple(v[n:-1]))]
                body_lp, finals = scored[i]
                lps.append(body_lp + finals[reqs[i][2].index(v[-1])])
            row.append(np.logaddexp.reduce(lps))
        out.append(np.array(row))
    return out


def _normalise(logps: np.ndarray) -> np.ndarray:
    p = np.exp(logps - logps.max())
    return p / p.sum()


def choose_combo(combos: Sequence[Mapping[str, Any]], p: Sequence[float]) -> dict:
    """The chosen combination: the keys in answer order, each the value of highest probability (summed over the
    combinations that agree with the values chosen before it). The answer is written in this order and a bank
    acts on the leading decision: its marginal, not the single most probable pair, is the better choice (on the
    quickstart's models the pair lost 1.5-1.9 points of credit accuracy to greedy decoding; this rule none)."""
    rest = [(dict(c), float(q)) for c, q in zip(combos, p, strict=True)]
    chosen: dict = {}
    for key in (rest[0][0] if rest else {}):
        mass: dict = {}
        for c, q in rest:
            mass[c[key]] = mass.get(c[key], 0.0) + q
        chosen[key] = max(mass, key=lambda v: mass[v])  # ties: the value declared first
        rest = [(c, q) for c, q in rest if c[key] == chosen[key]]
    return chosen


def _score_batch(backend, space: LabelSpace, prompts: Sequence[str], eos: Sequence[int]) -> tuple[list[dict], dict, list]:
    """Results of a batch of rendered prompts, with the prefill state and the contexts it holds."""
    task = space.task
    closed = _followed(task, space.keys[-1])
    texts = [_text(task, c) for c in space.combos]
    cands = _variants(backend, prompts, [texts] * len(prompts), closed, eos)
    ctxs = []
    for per in cands:  # the context: every token the candidates share (the prompt and the answer's first key)
        seqs = [v for variants in per for v in variants]
        n = min(_common(seqs), min(len(s) for s in seqs) - 1)
        if n < 1:
            raise ValueError(f"{task.name}: the rendered prompt tokenizes to nothing the candidates share")
        ctxs.append(seqs[0][:n])
    state = backend.prefill(ctxs)
    results = []
    for lp in _candidate_logps(backend, state, ctxs, cands):
        p = _normalise(lp)
        best = choose_combo(space.combos, p)
        conf = {k: float(sum(pi for c, pi in zip(space.combos, p, strict=True) if c[k] == best[k])) for k in space.keys}
        results.append({"combos": [[dict(c), float(pi)] for c, pi in zip(space.combos, p, strict=True)],
                        "chosen": dict(best), "confidence": conf, "multi": {}})
    for key in space.multi:
        _score_multi(backend, space, key, prompts, ctxs, state, results, eos)
    for res in results:
        chosen = {k: list(v) if isinstance(v, tuple) else v for k, v in res["chosen"].items()}
        res["chosen"] = chosen
        last = list(chosen)[-1]
        res["prefix"] = _text(task, chosen) + ("；" if _followed(task, last) else "")
    return results, state, ctxs


def _score_multi(backend, space: LabelSpace, key: str, prompts, ctxs, state, results, eos) -> None:
    """Score multi-label ``key`` given each record's chosen values; fills ``multi``, ``chosen`` and ``confidence``."""
    task = space.task
    closed = _followed(task, key)
    lists = [space.lists(key, res["chosen"]) for res in results]
    cands = _variants(backend, prompts, [[_text(task, {**res["chosen"], key: lst}) for lst in lists[r]]
                                         for r, res in enumerate(results)], closed, eos)
    # the prompt's cache serves when every candidate starts with the record's context (a joint tokenization that
    # moved the prompt's own tokens, rare, puts the record on a fresh context)
    reuse = [all(v[:len(ctxs[r])] == ctxs[r] and len(v) > len(ctxs[r]) for per in cands[r] for v in per)
             for r in range(len(prompts))]
    logps = _candidate_logps(backend, state, ctxs, [c if ok else [] for c, ok in zip(cands, reuse, strict=True)])
    for r in (r for r in range(len(prompts)) if not reuse[r]):
        seqs = [v for per in cands[r] for v in per]
        ctx = seqs[0][:min(_common(seqs), min(len(s) for s in seqs) - 1)]
        logps[r] = _candidate_logps(backend, backend.prefill([ctx]), [ctx], [cands[r]])[0]
    for r, res in enumerate(results):
        p = _normalise(logps[r])
        best = int(p.argmax())
        res["chosen"][key] = lists[r][best]
        res["confidence"][key] = float(p[best])
        res["multi"][key] = {v: float(sum(pi for lst, pi in zip(lists[r], p, strict=True) if v in lst))
                             for v in task.values_of(key)}


def _conversation(item, fold_inputs: bool) -> list[dict]:
    if isinstance(item, Mapping):
        msgs = iter_user_messages(item)
    else:
        msgs = iter_user_messages({"messages": list(item)})
    if fold_inputs:
        msgs = [{**m, "content": fold_fullwidth(m["content"])} if m["role"] == "user" else dict(m) for m in msgs]
    return msgs


def score_label_batches(lm, tokenizer, task: Task | str, records_or_messages: Sequence, *, batch_size: int = 16,
                        eos_ids: Sequence[int] | None = None, fold_inputs: bool = True,
                        order: Sequence[int] | None = None):
    """:func:`score_labels` batch by batch, prompts of similar length together (less padding): yields
    ``(indices, results, cache)`` per batch, ``indices`` into ``records_or_messages``. On PyTorch ``cache`` is the
    batch's prompts as prefilled (:class:`~banklm.evaluation.generate.PromptCache`), which generation continues
    from instead of running the prompts through the model again; None on the other runtimes. ``order``: the
    order prompts are batched in (default: longest first). Raises ``ValueError`` (a task whose labels cannot be
    scored) before yielding anything."""
    task = get_task(task) if isinstance(task, str) else task
    space = label_space(task)
    backend = _backend(lm, tokenizer)
    eos = list(dict.fromkeys(int(e) for e in (eos_ids if eos_ids is not None else _default_eos(lm, tokenizer))))
    if not eos:
        raise ValueError("label scoring needs the model's EOS ids (eos_ids is empty and none were found)")
    prompts = [_chat_text(tokenizer, _conversation(x, fold_inputs)) for x in records_or_messages]
    if order is None:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    elif sorted(order) != list(range(len(prompts))):
        raise ValueError(f"order must list each of the {len(prompts)} prompts once")
    return _batches(backend, space, prompts, eos, 1 if backend.sequential else max(1, int(batch_size)), list(order))


def _batches(backend, space, prompts, eos, step, order):
    model = getattr(backend, "model", None)
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        for start in range(0, len(order), step):
            idx = order[start:start + step]
            results, state, ctxs = _score_batch(backend, space, [prompts[i] for i in idx], eos)
            cache = PromptCache(ctxs, state["past"]) if isinstance(backend, _TorchBackend) else None
            yield idx, results, cache
    finally:
        if was_training:
            model.train()


def score_labels(lm, tokenizer, task: Task | str, records_or_messages: Sequence, *, batch_size: int = 16,
                 eos_ids: Sequence[int] | None = None, fold_inputs: bool = True) -> list[dict]:
    """Label scores of each record (a record with ``messages``, or a list of chat messages; a final assistant turn
    is dropped) for ``task`` on ``lm``: a :class:`~banklm.runtime.TorchLM` (or a transformers causal LM), an
    :class:`~banklm.runtime.OnnxCausalLM` or a :class:`~banklm.runtime.LlamaCppLM` (which tokenizes itself).

    Returns one dict per record: ``combos`` ``[[{key: value}, p], ...]`` (normalised over the allowed
    combinations), ``chosen`` ``{key: value}`` (multi-label keys: the most probable list), ``confidence``
    ``{key: marginal probability of the chosen value}``, ``multi`` ``{key: {value: p_yes}}`` and ``prefix`` (the
    chosen answer prefix). ``batch_size``: prompts per prefill (PyTorch/ONNX; llama.cpp takes one at a time);
    ``eos_ids``: the ids generation stops at (default: the model's, else the tokenizer's); ``fold_inputs``: fold
    full-width digits in user turns as the evaluation does.
    """
    out: list[dict | None] = [None] * len(records_or_messages)
    for idx, results, _ in score_label_batches(lm, tokenizer, task, records_or_messages, batch_size=batch_size,
                                               eos_ids=eos_ids, fold_inputs=fold_inputs):
        for i, res in zip(idx, results, strict=True):
            out[i] = res
    return out


def label_scores_record(score: Mapping, task: Task | str, digits: int = 6) -> dict:
    """The fields a prediction row (``predictions.jsonl``) stores from one :func:`score_labels` result:
    ``scored`` (the chosen answer keys), ``scored_label`` (its primary value), ``scored_confidence`` (that
    value's marginal) and ``label_scores`` (combinations, confidences and multi-label values, rounded)."""
    task = get_task(task) if isinstance(task, str) else task
    rnd = lambda x: round(float(x), digits)  # noqa: E731
    return {
        "scored": dict(score["chosen"]),
        "scored_label": score["chosen"][task.primary_key],
        "scored_confidence": rnd(score["confidence"][task.primary_key]),
        "label_scores": {
            "combos": [[dict(c), rnd(p)] for c, p in score["combos"]],
            "confidence": {k: rnd(v) for k, v in score["confidence"].items()},
            "multi": {k: {v: rnd(p) for v, p in vals.items()} for k, vals in score["multi"].items()},
        },
    }
