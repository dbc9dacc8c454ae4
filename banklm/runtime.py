"""Run exported models the way a serving host would: ONNX through onnxruntime, GGUF through llama.cpp.

Both runtimes offer the same small interface, used by the parity checks (:mod:`banklm.export.verify`) and
by the task evaluation of exported artefacts (:func:`generate_chat` returns the same
:class:`banklm.evaluation.generate.GenerationResult` as the PyTorch evaluation, so the same task
parsers and metrics score it):

* ``logits(ids) -> np.ndarray [len(ids), vocab]``: one forward pass over a prompt (llama.cpp: the
  last row only, the others are NaN);
* ``greedy(prompts, max_new_tokens, eos_ids, batch_size) -> list[list[int]]``: greedy continuation
  of each token-id prompt with the KV cache, cut after the first EOS (the EOS included). Optionally
  constrained: ``grammars`` (one GBNF text per prompt, :mod:`banklm.tasks.grammar`) keeps every token inside
  the prompt's answer grammar (PyTorch and ONNX through :class:`banklm.evaluation.constrained.GrammarMask`,
  llama.cpp through its own grammar sampler), and ``prefixes`` (token ids per prompt) force the answer's
  start (e.g. scored labels); the returned tokens then begin with the prefix, and ``max_new_tokens`` counts
  the tokens generated after it.

``LlamaCppLM`` also tokenizes and detokenizes with llama.cpp's own tokenizer (``tokenize`` /
``detokenize``), so evaluating a GGUF exercises the tokenizer the bank will serve with.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from banklm.evaluation.constrained import GrammarError, GrammarMask, grammar_logits_processor
from banklm.evaluation.generate import GenerationResult, continuation_ids

_ORT_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


# --------------------------------------------------------------------------------------------------
# ONNX (onnxruntime)
# --------------------------------------------------------------------------------------------------


class OnnxCausalLM:
    """A decoder-with-KV-cache ONNX model (as written by :func:`banklm.export.onnx.export_onnx`) in onnxruntime.

    Layer count, KV heads, head size and the float type are read from the graph's inputs, so any model
    with the optimum / onnxruntime-genai input names runs here.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        path = Path(path)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        self.path = path
        self.session = ort.InferenceSession(str(path), so, providers=list(providers or ["CPUExecutionProvider"]))
        inputs = {i.name: i for i in self.session.get_inputs()}
        for need in ("input_ids", "attention_mask", "position_ids"):
            if need not in inputs:
                raise ValueError(f"{path}: no input named {need!r} (inputs: {', '.join(inputs)})")
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.n_layers = len(self.past_names) // 2
        first = inputs["past_key_values.0.key"]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.float_type = _ORT_FLOAT[first.type]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past tensors of length 0: what a prompt's first (prefill) call is fed."""
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.float_type)
        return {n: z for n in self.past_names}

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: dict[str, np.ndarray]):
        """One call of the graph: ``(logits, present)`` with ``present`` keyed like ``past`` (feed it back)."""
        outs = self.session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
        present = dict(zip(self.past_names, outs[1:], strict=True))  # present.i.* in the order of past.i.*
        return outs[0], present

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of one prompt (no cache), as float32."""
        x = np.asarray([ids], dtype=np.int64)
        mask = np.ones_like(x)
        pos = np.arange(x.shape[1], dtype=np.int64)[None]
        logits, _ = self.forward(x, mask, pos, self.empty_past(1))
        return logits[0].astype(np.float32)

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int],
               batch_size: int = 32, pad_id: int = 0, *, grammars: Sequence[str] | None = None,
               prefixes: Sequence[Sequence[int]] | None = None, tokenizer=None) -> list[list[int]]:
        """Greedy continuation of each prompt; batches of left-padded prompts, KV cache, stop at EOS.
        ``grammars`` / ``prefixes``: see the module docstring (``tokenizer``, the HF tokenizer, builds the mask)."""
        eos = set(int(e) for e in eos_ids)
        grammars, prefixes = _constraints(len(prompts), grammars, prefixes, tokenizer)
        out: list[list[int] | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for start in range(0, len(order), max(1, int(batch_size))):
            idx = order[start:start + max(1, int(batch_size))]
            if grammars is None and prefixes is None:
                new = self._greedy_batch([prompts[i] for i in idx], max_new_tokens, eos, pad_id)
            else:
                pre = [list(prefixes[i]) if prefixes else [] for i in idx]
                mask = _mask(tokenizer, [grammars[i] for i in idx], pre, eos_ids) if grammars else None
                new = self._greedy_batch([[*prompts[i], *p] for i, p in zip(idx, pre, strict=True)], max_new_tokens,
                                         eos, pad_id, mask)
                new = [[*p, *toks] for p, toks in zip(pre, new, strict=True)]
            for i, toks in zip(idx, new, strict=True):
                out[i] = toks
        return out  # type: ignore[return-value]

    def _greedy_batch(self, prompts, max_new_tokens, eos, pad_id,
                      grammar: GrammarMask | None = None) -> list[list[int]]:
        b = len(prompts)
        width = max(1, max(len(p) for p in prompts))
        ids = np.full((b, width), pad_id, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        for r, p in enumerate(prompts):
            if len(p):
                ids[r, width - len(p):] = p
                mask[r, width - len(p):] = 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        past = self.empty_past(b)
        new: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, dtype=bool)
        for _ in range(int(max_new_tokens)):
            logits, past = self.forward(ids, mask, pos, past)
            if grammar is None:
                nxt = logits[:, -1].argmax(-1)
            else:
                nxt = grammar.choose(logits[:, -1])
                grammar.advance(nxt)
            for r in range(b):
                if not done[r]:
                    new[r].append(int(nxt[r]))
                    done[r] = int(nxt[r]) in eos
            if done.all():
                break
            ids = nxt.astype(np.int64)[:, None]
            pos = pos[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        return new


# --------------------------------------------------------------------------------------------------
# GGUF (llama.cpp through llama-cpp-python)
# --------------------------------------------------------------------------------------------------


LLAMA_CPP_MISSING = ("llama-cpp-python is not installed: GGUF files were checked with transformers' GGUF reader "
                     "only; pip install 'banklm[llamacpp]' to check them in llama.cpp itself")


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppLM:
    """A GGUF file in llama.cpp (CPU), with llama.cpp's own tokenizer."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 1024, threads: int | None = None):
        llama_cpp = self._llama_cpp = import_llama_cpp()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        # Prompt batches get the same thread count as single-token steps: llama-cpp-python's default for
        # batches (every core) busy-waits in OpenMP barriers when other work shares the CPU (measured here:
        # 2.5 s for any multi-token batch of a 4M-parameter model on a loaded 2-core machine, vs 10 ms).
        threads = int(threads or max(1, (os.cpu_count() or 2) // 2))
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=int(n_ctx), n_batch=min(512, int(n_ctx)),
                                   n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        self.n_ctx = int(n_ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def close(self) -> None:
        """Free the model now (left to interpreter shutdown, llama-cpp-python prints a TypeError)."""
        self.llm.close()

    def __enter__(self) -> LlamaCppLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """llama.cpp's tokenization of ``text``, special tokens parsed. ``add_special=True`` is what a
        server does with a rendered chat prompt: BOS (EOS) added only if the file's ``add_bos_token``
        (``add_eos_token``) says so; False adds nothing."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def detokenize(self, ids: Sequence[int]) -> str:
        """llama.cpp's own detokenizer (``llama_detokenize``), special tokens not rendered.

        Not ``Llama.detokenize``: llama-cpp-python 0.3.36 converts token by token into a 32-byte buffer
        and silently drops longer pieces (a 14-character Chinese piece is 42 bytes).
        """
        ll = self._llama_cpp
        arr = (ll.llama_token * len(ids))(*[int(i) for i in ids])
        size = 16 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = ll.llama_detokenize(self._vocab, arr, len(ids), buf, size, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n + 1  # too small: the call says how much it needs
        raise RuntimeError(f"llama_detokenize failed for {len(ids)} tokens")

    def last_logits(self) -> np.ndarray:
        """Next-token logits after the last ``llm.eval`` call."""
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # the only row kept without logits_all
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype(np.float32)

    def _eval(self, ids: Sequence[int]) -> np.ndarray:
        if len(ids) >= self.n_ctx:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit llama.cpp's context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))
        return self.last_logits()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits in the last row; earlier rows are NaN (llama.cpp keeps only the last)."""
        out = np.full((len(ids), self.llm.n_vocab()), np.nan, dtype=np.float32)
        out[-1] = self._eval(ids)
        return out

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int],
               batch_size: int = 1, pad_id: int = 0, *, grammars: Sequence[str] | None = None,
               prefixes: Sequence[Sequence[int]] | None = None, tokenizer=None) -> list[list[int]]:
        """Greedy continuation, one prompt at a time (llama-cpp-python has one sequence per context).
        ``grammars`` (GBNF) go to llama.cpp's grammar sampler, ``prefixes`` are forced (module docstring);
        ``tokenizer`` is not needed (llama.cpp reads the grammar against its own vocabulary)."""
        eos = set(int(e) for e in eos_ids)
        grammars, prefixes = _constraints(len(prompts), grammars, prefixes)
        out = []
        for k, p in enumerate(prompts):
            pre = [int(t) for t in prefixes[k]] if prefixes else []
            sampler = _LlamaCppGrammar(self, grammars[k], eos) if grammars else None
            try:
                if sampler is not None:
                    sampler.force(pre)
                new: list[int] = list(pre)
                row = self._eval([*p, *pre])
                for _ in range(int(max_new_tokens)):
                    tok = int(row.argmax()) if sampler is None else sampler.choose(row)
                    new.append(tok)
                    if tok in eos or self.llm.n_tokens + 1 >= self.n_ctx:
                        break
                    if sampler is not None:
                        sampler.accept(tok)
                    self.llm.eval([tok])
                    row = self.last_logits()
            finally:
                if sampler is not None:
                    sampler.close()
            out.append(new)
        return out

    def _not_answer_tokens(self) -> np.ndarray:
        """Ids llama.cpp's grammar would read as text but no answer may hold: control, unknown and unused tokens
        and end-of-generation ones (the grammar sampler renders a control token's text, ``<|im_start|>``, as a
        piece; llguidance never allows a special token): forbidden except the caller's EOS ids. Cached."""
        if getattr(self, "_special_ids", None) is None:
            ll = self._llama_cpp
            bad = ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_UNKNOWN | ll.LLAMA_TOKEN_ATTR_UNUSED
            self._special_ids = np.array([t for t in range(self.llm.n_vocab())
                                          if ll.llama_vocab_get_attr(self._vocab, t) & bad
                                          or ll.llama_vocab_is_eog(self._vocab, t)], dtype=np.int64)
        return self._special_ids


class _LlamaCppGrammar:
    """One request's GBNF in llama.cpp's grammar sampler (``llama_sampler_init_grammar``), stepped by banklm's
    greedy loop: the argmax of the raw logits is taken when the grammar allows it (what llama.cpp's server
    does first), else the argmax after the sampler masks the whole vocabulary. Tokens are accepted only after
    the sampler allowed them (llama.cpp aborts the process on a token outside the grammar). An EOS id the GGUF
    does not mark end-of-generation is allowed exactly when its end-of-generation token is (the sampler would
    read it as text)."""

    def __init__(self, lm: LlamaCppLM, gbnf: str, eos: set[int]):
        ll = self._ll = lm._llama_cpp
        self.eos = eos
        self._eos_text = [e for e in sorted(eos) if not ll.llama_vocab_is_eog(lm._vocab, e)]
        self._eog = int(ll.llama_vocab_eos(lm._vocab))
        if self._eos_text and (self._eog < 0 or not ll.llama_vocab_is_eog(lm._vocab, self._eog)):
            raise GrammarError(f"{lm.path.name}: EOS ids {self._eos_text} are no end-of-generation tokens in "
                               "llama.cpp and the GGUF declares none: a constrained answer could not end")
        self.smpl = ll.llama_sampler_init_grammar(lm._vocab, gbnf.encode("utf-8"), b"root")
        if not self.smpl:
            raise GrammarError("llama.cpp cannot parse the grammar (llama_sampler_init_grammar failed)")
        self.forbidden = np.setdiff1d(lm._not_answer_tokens(), np.fromiter(eos, dtype=np.int64, count=len(eos)))
        self._forbidden = set(self.forbidden.tolist())
        n = lm.llm.n_vocab()
        self._one = (ll.llama_token_data * 1)()
        self._one_arr = ll.llama_token_data_array(self._one, 1, -1, False)
        self._all = np.zeros(n, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        self._all["id"] = np.arange(n, dtype=np.int32)
        self._all_arr = ll.llama_token_data_array(self._all.ctypes.data_as(ctypes.POINTER(ll.llama_token_data)),
                                                  n, -1, False)

    def allowed(self, tok: int) -> bool:
        """Whether the grammar takes ``tok`` next."""
        if tok in self._forbidden:
            return False
        return self._sampler_allows(self._eog if tok in self._eos_text else tok)

    def _sampler_allows(self, tok: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = tok, 0.0, 0.0
        self._one_arr.size, self._one_arr.selected = 1, -1
        self._ll.llama_sampler_apply(self.smpl, ctypes.byref(self._one_arr))
        return self._one[0].logit != float("-inf")

    def choose(self, logits: np.ndarray) -> int:
        """The greedy token under the grammar."""
        tok = int(logits.argmax())
        if self.allowed(tok):
            return tok
        self._all["logit"] = logits
        self._all_arr.size, self._all_arr.selected = len(self._all), -1
        self._ll.llama_sampler_apply(self.smpl, ctypes.byref(self._all_arr))
        masked = self._all["logit"]
        masked[self.forbidden] = -np.inf
        if self._eos_text:
            masked[self._eos_text] = logits[self._eos_text] if self._sampler_allows(self._eog) else -np.inf
        tok = int(masked.argmax())
        if masked[tok] == -np.inf:
            raise GrammarError("llama.cpp's grammar sampler allows no token (the EOS ids are not end-of-generation "
                               "tokens in this GGUF?)")
        return tok

    def accept(self, tok: int) -> None:
        self._ll.llama_sampler_accept(self.smpl, int(tok))

    def force(self, ids: Sequence[int]) -> None:
        """Accept a forced prefix, each token checked first."""
        for t in ids:
            if t in self.eos or not self.allowed(int(t)):
                raise GrammarError(f"the forced prefix leaves the grammar at token {int(t)}")
            self.accept(int(t))

    def close(self) -> None:
        if self.smpl:
            self._ll.llama_sampler_free(self.smpl)
            self.smpl = None


# --------------------------------------------------------------------------------------------------
# chat generation (any of the above, or a transformers model wrapped by TorchLM)
# --------------------------------------------------------------------------------------------------


class TorchLM:
    """A transformers causal LM behind the same interface (the reference side of parity checks)."""

    def __init__(self, model, pad_id: int = 0):
        self.model = model.eval()
        self.pad_id = pad_id

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.tensor([list(ids)])).logits[0].float().numpy()

    def greedy(self, prompts, max_new_tokens, eos_ids, batch_size: int = 32, pad_id: int | None = None, *,
               grammars: Sequence[str] | None = None, prefixes: Sequence[Sequence[int]] | None = None,
               tokenizer=None):
        """``batch_size=1``: each prompt alone (the exact reference); larger: left-padded batches.
        ``grammars`` / ``prefixes``: see the module docstring (``tokenizer``, the HF tokenizer, builds the mask)."""
        import torch

        eos = [int(e) for e in eos_ids]
        pad = self.pad_id if pad_id is None else pad_id
        grammars, prefixes = _constraints(len(prompts), grammars, prefixes, tokenizer)
        out: list[list[int] | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        step = max(1, int(batch_size))
        with torch.inference_mode():
            for start in range(0, len(order), step):
                idx = order[start:start + step]
                pre = [list(prefixes[i]) if prefixes else [] for i in idx]
                seqs = [[*prompts[i], *p] for i, p in zip(idx, pre, strict=True)]
                width = max(len(q) for q in seqs)
                x = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros_like(x)
                for r, q in enumerate(seqs):
                    x[r, width - len(q):] = torch.tensor(q, dtype=torch.long)
                    mask[r, width - len(q):] = 1
                extra = {}
                if grammars:
                    extra["logits_processor"] = _processors(_mask(tokenizer, [grammars[i] for i in idx], pre, eos))
                y = self.model.generate(x, attention_mask=mask, max_new_tokens=int(max_new_tokens), do_sample=False,
                                        eos_token_id=eos or None, pad_token_id=pad, **extra)[:, width:].tolist()
                for r, i in enumerate(idx):
                    cut = next((j + 1 for j, t in enumerate(y[r]) if t in eos), len(y[r]))
                    out[i] = [*pre[r], *y[r][:cut]]
        return out


def _constraints(n: int, grammars, prefixes, tokenizer=False):
    """Checked per-prompt ``grammars`` and ``prefixes`` (each None or one per prompt). ``tokenizer``: the
    runtime masks with :class:`GrammarMask` and needs one (``False``: it does not)."""
    for what, v in (("grammars", grammars), ("prefixes", prefixes)):
        if v is not None and len(v) != n:
            raise ValueError(f"{len(v)} {what} for {n} prompts")
    if grammars is not None and tokenizer is None:
        raise ValueError("constrained decoding needs the tokenizer (tokenizer=) to build the grammar mask")
    return (list(grammars) if grammars is not None else None), (list(prefixes) if prefixes is not None else None)


def _mask(tokenizer, grammars: Sequence[str], prefixes: Sequence[Sequence[int]], eos_ids) -> GrammarMask:
    """A mask for one batch, each row already advanced over its forced prefix."""
    mask = GrammarMask(tokenizer, grammars, [int(e) for e in eos_ids])
    for r, p in enumerate(prefixes):
        if p:
            mask.force(r, p)
    return mask


def _processors(mask: GrammarMask):
    from transformers import LogitsProcessorList

    return LogitsProcessorList([grammar_logits_processor(mask, greedy=True)])  # callers decode greedily


def generate_chat(lm, tokenizer, messages_list: Sequence[Sequence[dict]], eos_ids: Sequence[int],
                  max_new_tokens: int = 128, batch_size: int = 32, *, grammars: Sequence[str] | None = None,
                  prefixes: Sequence[str | None] | None = None) -> GenerationResult:
    """Greedy answers of ``lm`` to each conversation, rendered with the training chat template.

    Token ids come from ``lm.tokenize`` when the runtime has its own tokenizer (llama.cpp), else from
    ``tokenizer``; answers are cut at the first EOS and decoded without special tokens, as in
    :func:`banklm.evaluation.generate.generate`. ``grammars`` (GBNF per conversation) constrain the answers;
    ``prefixes`` (text per conversation, or None) are forced at their start, tokenized as the continuation
    of the rendered prompt, and are part of the returned answers.
    """
    texts = [tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=False) for m in messages_list]
    encode = getattr(lm, "tokenize", None) or (lambda t: tokenizer.encode(t, add_special_tokens=False))
    prompts = [encode(t) for t in texts]
    eos = set(int(e) for e in eos_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    extra: dict = {}
    if grammars is not None or prefixes is not None:  # the free path calls greedy exactly as before
        pre = None if prefixes is None else [continuation_ids(encode, t, p, x or "")
                                             for t, p, x in zip(texts, prompts, prefixes, strict=True)]
        extra = {"grammars": grammars, "prefixes": pre, "tokenizer": tokenizer}
    t0 = time.perf_counter()
    new = lm.greedy(prompts, max_new_tokens, list(eos), batch_size=batch_size, pad_id=pad, **extra)
    seconds = time.perf_counter() - t0
    decode = getattr(lm, "detokenize", None) or (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    answers = [decode([t for t in toks if t not in eos]).strip() for toks in new]
    return GenerationResult(answers, seconds=seconds, new_tokens=sum(len(t) for t in new),
                            prompt_tokens=sum(len(p) for p in prompts))


__all__ = ["OnnxCausalLM", "LlamaCppLM", "TorchLM", "generate_chat", "llama_cpp_available", "LLAMA_CPP_MISSING"]


class MissingDependency(RuntimeError):
    """An optional package a requested feature needs is not installed (the message says which)."""


def import_llama_cpp():
    """The ``llama_cpp`` module, quiet, or :class:`MissingDependency` saying which extra to install."""
    try:
        import llama_cpp
    except ImportError as e:
        raise MissingDependency(
            "k-quant GGUF types (q4_k_m, q5_k_m, q6_k) need llama.cpp's quantizer: "
            "pip install 'banklm[llamacpp]'  (or export f16/q8_0/q4_0, which need nothing extra)"
        ) from e
    quiet = logging.getLogger("llama-cpp-python")  # llama.cpp's C log goes through this logger
    if quiet.level == logging.NOTSET:
        quiet.setLevel(logging.WARNING)  # not one line per tensor while quantizing
    return llama_cpp


def open_gguf(path: Path, n_ctx: int):
    """``(runtime model, runtime name)``: llama.cpp when installed, else transformers' GGUF reader."""
    if llama_cpp_available():
        return LlamaCppLM(path, n_ctx=n_ctx), "llama.cpp"
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return TorchLM(model), "transformers GGUF reader (de-quantized to fp32; llama-cpp-python not installed)"


def stop_token_ids(model_dir: Path) -> list[int]:
    """The ids generation stops at: ``generation_config.json``'s ``eos_token_id`` (one or a list), else config's."""
    gc = model_dir / "generation_config.json"
    eos = json.loads(gc.read_text(encoding="utf-8")).get("eos_token_id") if gc.is_file() else None
    if eos is None:
        eos = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("eos_token_id")
    return [eos] if isinstance(eos, int) else [int(e) for e in eos or []]


def context_length(model_dir: Path, cap: int = 8192) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return int(min(cfg.get("max_position_embeddings", 2048), cap))


def onnx_file_bytes(path: str | os.PathLike) -> int:
    """Size of an ONNX model: the graph file plus every external data file it references."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    m = onnx.load(str(path), load_external_data=False)
    files = {ExternalDataInfo(t).location for t in m.graph.initializer if uses_external_data(t)}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)
