"""Run exported models the way a serving host would: ONNX through onnxruntime, GGUF through llama.cpp.

Both runtimes offer the same small interface, used by the parity checks (:mod:`banklm.export.verify`) and
by the task evaluation of exported artefacts (:func:`generate_chat` returns the same
:class:`banklm.evaluation.generate.GenerationResult` as the PyTorch evaluation, so the same task
parsers and metrics score it):

* ``logits(ids) -> np.ndarray [len(ids), vocab]``: one forward pass over a prompt (llama.cpp: the
  last row only, the others are NaN);
* ``greedy(prompts, max_new_tokens, eos_ids, batch_size) -> list[list[int]]``: greedy continuation
  of each token-id prompt with the KV cache, cut after the first EOS (the EOS included).

``LlamaCppLM`` also tokenizes and detokenizes with llama.cpp's own tokenizer (``tokenize`` /
``detokenize``), so evaluating a GGUF exercises the tokenizer the bank will serve with.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from banklm.evaluation.generate import GenerationResult

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
               batch_size: int = 32, pad_id: int = 0) -> list[list[int]]:
        """Greedy continuation of each prompt; batches of left-padded prompts, KV cache, stop at EOS."""
        eos = set(int(e) for e in eos_ids)
        out: list[list[int] | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for start in range(0, len(order), max(1, int(batch_size))):
            idx = order[start:start + max(1, int(batch_size))]
            for i, toks in zip(idx, self._greedy_batch([prompts[i] for i in idx], max_new_tokens, eos, pad_id),
                               strict=True):
                out[i] = toks
        return out  # type: ignore[return-value]

    def _greedy_batch(self, prompts, max_new_tokens, eos, pad_id) -> list[list[int]]:
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
            nxt = logits[:, -1].argmax(-1)
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
        import ctypes

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
               batch_size: int = 1, pad_id: int = 0) -> list[list[int]]:
        """Greedy continuation, one prompt at a time (llama-cpp-python has one sequence per context)."""
        eos = set(int(e) for e in eos_ids)
        out = []
        for p in prompts:
            new: list[int] = []
            row = self._eval(p)
            for _ in range(int(max_new_tokens)):
                tok = int(row.argmax())
                new.append(tok)
                if tok in eos or self.llm.n_tokens + 1 >= self.n_ctx:
                    break
                self.llm.eval([tok])
                row = self.last_logits()
            out.append(new)
        return out


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

    def greedy(self, prompts, max_new_tokens, eos_ids, batch_size: int = 32, pad_id: int | None = None):
        """``batch_size=1``: each prompt alone (the exact reference); larger: left-padded batches."""
        import torch

        eos = [int(e) for e in eos_ids]
        pad = self.pad_id if pad_id is None else pad_id
        out: list[list[int] | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        step = max(1, int(batch_size))
        with torch.inference_mode():
            for start in range(0, len(order), step):
                idx = order[start:start + step]
                width = max(len(prompts[i]) for i in idx)
                x = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros_like(x)
                for r, i in enumerate(idx):
                    x[r, width - len(prompts[i]):] = torch.tensor(list(prompts[i]), dtype=torch.long)
                    mask[r, width - len(prompts[i]):] = 1
                y = self.model.generate(x, attention_mask=mask, max_new_tokens=int(max_new_tokens), do_sample=False,
                                        eos_token_id=eos or None, pad_token_id=pad)[:, width:].tolist()
                for r, i in enumerate(idx):
                    cut = next((j + 1 for j, t in enumerate(y[r]) if t in eos), len(y[r]))
                    out[i] = y[r][:cut]
        return out


def generate_chat(lm, tokenizer, messages_list: Sequence[Sequence[dict]], eos_ids: Sequence[int],
                  max_new_tokens: int = 128, batch_size: int = 32) -> GenerationResult:
    """Greedy answers of ``lm`` to each conversation, rendered with the training chat template.

    Token ids come from ``lm.tokenize`` when the runtime has its own tokenizer (llama.cpp), else from
    ``tokenizer``; answers are cut at the first EOS and decoded without special tokens, as in
    :func:`banklm.evaluation.generate.generate`.
    """
    texts = [tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=False) for m in messages_list]
    encode = getattr(lm, "tokenize", None) or (lambda t: tokenizer.encode(t, add_special_tokens=False))
    prompts = [encode(t) for t in texts]
    eos = set(int(e) for e in eos_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    t0 = time.perf_counter()
    new = lm.greedy(prompts, max_new_tokens, list(eos), batch_size=batch_size, pad_id=pad)
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
