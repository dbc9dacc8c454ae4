"""Check exported artefacts (GGUF, ONNX) against the PyTorch model they were converted from.

A GGUF is read back by readers that share no code with :mod:`banklm.export.gguf`:

* ``gguf.GGUFReader`` for the metadata (architecture, file type, chat template, special token ids,
  token types of the chat tokens, ``add_bos_token``, vocabulary size);
* ``transformers`` GGUF loading (de-quantizes every tensor to fp32 and undoes llama.cpp's q/k row
  order) for the tokenizer and the weights: token ids on the prompts must equal the training
  tokenizer's, next-token logits must stay within a per-type threshold of the PyTorch model's, and
  for lossless-ish types (f32/f16) a few greedy tokens must be identical; a rendered chat prompt,
  tokenized as llama.cpp does (BOS/EOS added per the file's ``add_bos_token``/``add_eos_token``), must
  give the ids training saw (``apply_chat_template(tokenize=True)``), in particular never two BOS;
* llama.cpp itself (``llama-cpp-python``, when installed): its tokenizer, its next-token logits and
  its greedy continuation, with their own thresholds (llama.cpp also quantizes activations).

An ONNX folder is run with onnxruntime (:class:`banklm.export.runtime.OnnxCausalLM`): graph inputs/outputs,
declared type, the tokenizer shipped beside it, logits at every position and a greedy continuation
through the KV cache (identical for fp32).

:func:`verify_gguf` and :func:`verify_onnx` never raise on a mismatch; they return a dict with
``passed``, every figure and the list of ``failures``.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from banklm.finetune.tokenizer import load_tokenizer

from banklm.runtime import (
    LLAMA_CPP_MISSING,
    LlamaCppLM,
    OnnxCausalLM,
    TorchLM,
    llama_cpp_available,
    onnx_file_bytes,
)

from .gguf import GGUF_QUANTS, SUPPORTED_ARCHITECTURES, file_type
from .onnx import input_names, onnx_metadata, output_names, read_config

log = logging.getLogger(__name__)

#: Max |logit_gguf - logit_torch| on the next-token logits, per unit of logit scale, where the
#: scale is ``max(1, std of the reference logits)`` (small models are judged in absolute terms,
#: large-logit models relative to their spread). Measured with the transformers reader on tiny
#: 2-layer Llama/Qwen2 models (docs/export.md), default init (weights std 0.02) / sharpened weights
#: (std 0.08, the tests): f16 2.5e-4 / 2.0e-3 (STACK: ~5e-4), bf16 2.4e-3 / 1.6e-2,
#: q8_0 6.1e-3 / 4.9e-2 (STACK: 1.6e-2), q4_0 7.8e-2 / 0.71. Each threshold is >= 2x the worst
#: figure measured. Conversion bugs are far larger on a model whose attention is not uniform: a
#: Llama GGUF without the q/k row permutation is off by 0.79 (sharpened weights), but only 5.4e-3 at
#: default init, which is why the tests sharpen their random models. K-quants (llama.cpp's quantizer),
#: sharpened tiny models / trained quickstart model: q6_k 4.7e-2 / 4.5e-2, q5_k_m 0.29 / 4.0e-2,
#: q4_k_m 0.36 / 6.9e-2 (rows of 64-128 values cannot take 256-value k-blocks, so llama.cpp falls
#: back to q5_0/q4_0-like types on the tiny models: q5_k_m is then no better than q4_k_m).
LOGIT_THRESHOLDS: dict[str, float] = {
    "f32": 1e-4,
    "f16": 5e-3,
    "bf16": 5e-2,
    "q8_0": 1e-1,
    "q6_k": 2e-1,
    "q5_k_m": 8e-1,
    "q4_k_m": 1.0,
    "q4_0": 1.5,
}
#: Quants whose greedy continuation must equal the PyTorch model's token for token.
GREEDY_EXACT_QUANTS = ("f32", "f16")
#: New tokens compared in the greedy check.
GREEDY_TOKENS = 8
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
#: User turns checked when no test split is at hand (``banklm export --model DIR``).
DEFAULT_PROMPTS = ("请审核这笔贷款申请。", "账户近7日有多笔现金存入。", "报销单金额超过标准。")
#: Conversation of the chat-prompt check (template rendered, then tokenized as a server does).
CHAT_CHECK = ({"role": "user", "content": DEFAULT_PROMPTS[0]},)

#: ONNX (onnxruntime vs PyTorch), same normalisation. Measured (docs/export.md), sharpened tiny
#: models / trained quickstart model: fp32 1.4e-6 / 5.4e-6, fp16 3.1e-3 / 3.8e-3, int8 (dynamic
#: quantization) 0.124 / 4.4e-2. Each threshold is >= 2x the worst figure measured.
ONNX_LOGIT_THRESHOLDS: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "int8": 0.3}
ONNX_GREEDY_EXACT_QUANTS = ("fp32",)
#: GGUF run by llama.cpp vs PyTorch, same normalisation. llama.cpp rounds more than the weights: its
#: KV cache is f16 (so even an f32 file is not exact) and quantized files multiply with 8-bit
#: activations. Measured, sharpened tiny models / trained quickstart model: f32 1.1e-3 / 1.2e-4,
#: f16 2.6e-3 / 8.3e-4, bf16 1.6e-2 / 6.4e-3, q8_0 6.8e-2 / 1.7e-2, q6_k 7.8e-2 / 5.4e-2,
#: q5_k_m 0.32 / 4.6e-2, q4_k_m 0.38 / 7.5e-2, q4_0 0.72 / 8.4e-2; each threshold >= 2x the worst.
LLAMACPP_LOGIT_THRESHOLDS: dict[str, float] = {
    "f32": 5e-3,
    "f16": 1e-2,
    "bf16": 5e-2,
    "q8_0": 1.5e-1,
    "q6_k": 2e-1,
    "q5_k_m": 8e-1,
    "q4_k_m": 1.0,
    "q4_0": 1.5,
}


def verify_gguf(
    model_dir: str | os.PathLike,
    gguf_path: str | os.PathLike,
    prompts: list[str],
    quant: str,
    llama_cpp: bool | None = None,
) -> dict:
    """Compare ``gguf_path`` (a file of ``quant``, e.g. ``q8_0``) with the PyTorch model in ``model_dir`` on ``prompts``.

    Returns ``{"passed": bool, "failures": [...], "metadata": {...}, "tokenizer": {...},
    "logits": {...}, "generation": {...}, "llama_cpp": {...}, ...}``; never raises for a mismatch or
    a reader error (those become failures). ``llama_cpp``: also run the file in llama.cpp (None:
    when ``llama-cpp-python`` is installed; ``res["llama_cpp"]["checked"]`` says whether it ran).
    """
    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    quant = quant.lower()
    res: dict = {
        "gguf": str(gguf_path),
        "model_dir": str(model_dir),
        "quant": quant,
        "bytes": gguf_path.stat().st_size if gguf_path.is_file() else None,
        "threshold": LOGIT_THRESHOLDS.get(quant),
        "failures": [],
    }
    fails: list[str] = res["failures"]
    if res["threshold"] is None:
        fails.append(f"no logit threshold for quant {quant!r} (known: {', '.join(LOGIT_THRESHOLDS)})")
    if not gguf_path.is_file():
        fails.append(f"GGUF file not found: {gguf_path}")
        res["passed"] = False
        return res
    if not prompts:
        fails.append("no prompts given")

    ref = _section(res, "reference", lambda: reference_outputs(model_dir, prompts))
    ref_tok = ref.tokenizer if ref is not None else None
    res["metadata"] = _section(res, "metadata", lambda: _check_metadata(model_dir, gguf_path, quant, ref_tok)) or {}
    gguf_tok = _section(res, "gguf_tokenizer", lambda: _load_gguf_tokenizer(gguf_path, res))
    res["tokenizer"] = _section(res, "tokenizer", lambda: _compare_tokenizers(
        ref_tok, gguf_tok, prompts, server_encode=_llama_cpp_style(gguf_tok, gguf_path))) or {}
    if ref is not None and prompts:
        out = _section(res, "model", lambda: _compare_lm(ref, _gguf_in_transformers(gguf_path), quant,
                                                           LOGIT_THRESHOLDS, GREEDY_EXACT_QUANTS))
        if out:
            res["logits"], res["generation"] = out

    if llama_cpp is None:
        llama_cpp = llama_cpp_available()
    if not llama_cpp:
        res["llama_cpp"] = {"checked": False, "note": LLAMA_CPP_MISSING}
    elif ref is not None and prompts:
        res["llama_cpp"] = _section(res, "llama_cpp", lambda: _check_llama_cpp(gguf_path, ref, quant)) or {}
    for part in ("metadata", "tokenizer", "logits", "generation", "llama_cpp"):
        fails.extend(f"{part}: {f}" for f in (res.get(part) or {}).get("failures", []))
    res["passed"] = not fails
    return res


def verify_onnx(
    model_dir: str | os.PathLike,
    onnx_dir: str | os.PathLike,
    prompts: list[str],
    quant: str,
) -> dict:
    """Compare the ONNX folder ``onnx_dir`` (quant ``fp32``/``fp16``/``int8``) with the PyTorch model.

    Checks: the graph (``onnx.checker``, the optimum / onnxruntime-genai input and output names for
    the model's layer count, the declared ``banklm.type``), the shipped tokenizer (same ids on every
    prompt, same chat template, same generation EOS ids), logits at every prompt position within
    :data:`ONNX_LOGIT_THRESHOLDS`, and a greedy continuation through the KV cache (identical to
    PyTorch's for fp32). Same result layout as :func:`verify_gguf`; never raises for a mismatch.
    """
    model_dir, onnx_dir = Path(model_dir), Path(onnx_dir)
    quant = quant.lower()
    path = onnx_dir / "model.onnx"
    res: dict = {
        "onnx": str(path),
        "model_dir": str(model_dir),
        "quant": quant,
        "bytes": None,
        "threshold": ONNX_LOGIT_THRESHOLDS.get(quant),
        "failures": [],
    }
    fails: list[str] = res["failures"]
    if res["threshold"] is None:
        fails.append(f"no logit threshold for ONNX quant {quant!r} (known: {', '.join(ONNX_LOGIT_THRESHOLDS)})")
    if not path.is_file():
        fails.append(f"ONNX model not found: {path}")
        res["passed"] = False
        return res

    res["bytes"] = _section(res, "bytes", lambda: onnx_file_bytes(path))
    if not prompts:
        fails.append("no prompts given")
    ref = _section(res, "reference", lambda: reference_outputs(model_dir, prompts))
    ref_tok = ref.tokenizer if ref is not None else None
    res["metadata"] = _section(res, "metadata", lambda: _check_onnx_metadata(model_dir, onnx_dir, quant, ref_tok)) or {}
    onnx_tok = _section(res, "onnx_tokenizer", lambda: _load_training_tokenizer(onnx_dir))
    res["tokenizer"] = _section(res, "tokenizer", lambda: _compare_tokenizers(ref_tok, onnx_tok, prompts)) or {}
    if ref is not None and prompts:

        out = _section(res, "model", lambda: _compare_lm(ref, OnnxCausalLM(onnx_dir), quant, ONNX_LOGIT_THRESHOLDS,
                                                           ONNX_GREEDY_EXACT_QUANTS))
        if out:
            res["logits"], res["generation"] = out
    for part in ("metadata", "tokenizer", "logits", "generation"):
        fails.extend(f"{part}: {f}" for f in (res.get(part) or {}).get("failures", []))
    res["passed"] = not fails
    return res


# --------------------------------------------------------------------------------------------------


def _section(res: dict, name: str, fn):
    try:
        return fn()
    except Exception as e:  # verify reports, it never raises
        res["failures"].append(f"{name}: {type(e).__name__}: {e}")
        log.debug("verify %s failed:\n%s", name, traceback.format_exc())
        return None


def _load_training_tokenizer(model_dir: Path):

    return load_tokenizer(model_dir)


def _load_gguf_tokenizer(gguf_path: Path, res: dict):
    """The tokenizer transformers builds from the GGUF metadata.

    transformers' GGUF reader drops ``tokenizer.ggml.add_space_prefix`` for SentencePiece vocabularies
    (it always prepends "▁" to the first word); llama.cpp honours the key. We apply the file's own
    value to the rebuilt tokenizer and record that in ``tokenizer_fixups``.
    """
    import transformers
    from tokenizers import pre_tokenizers

    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    fixups = []
    fields = _fields(gguf_path)
    if fields.get("tokenizer.ggml.model") == "llama" and fields.get("tokenizer.ggml.add_space_prefix") is False:
        pre = tok.backend_tokenizer.pre_tokenizer
        if isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme != "never":
            tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement=pre.replacement, prepend_scheme="never", split=pre.split)
            fixups.append("Metaspace prepend_scheme -> never (file says add_space_prefix=false)")
    res["tokenizer_fixups"] = fixups
    return tok


def _fields(gguf_path: Path) -> dict:
    """GGUF metadata as plain Python values (token arrays summarised by length)."""
    import gguf

    r = gguf.GGUFReader(str(gguf_path))
    out: dict = {}
    for k, f in r.fields.items():
        try:
            v = f.contents()
        except Exception:  # noqa: BLE001  (unusual field layouts: keep going)
            continue
        out[k] = v
    out["__tensors__"] = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in r.tensors}
    return out


def _check_metadata(model_dir: Path, gguf_path: Path, quant: str, ref_tok) -> dict:
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    f = _fields(gguf_path)
    fails: list[str] = []
    out: dict = {"failures": fails}
    arch = f.get("general.architecture")
    out["architecture"] = arch
    hf_arch = (cfg.get("architectures") or [""])[0]
    want_arch = SUPPORTED_ARCHITECTURES.get(hf_arch)
    if want_arch is None or arch != want_arch:
        fails.append(f"architecture {arch!r} does not match config {hf_arch!r}")
    ftype = f.get("general.file_type")
    out["file_type"] = ftype
    want_ft = file_type(quant) if quant in GGUF_QUANTS else None
    if want_ft is not None and ftype != int(want_ft):
        fails.append(f"general.file_type {ftype} != {int(want_ft)} ({quant})")
    tmpl = f.get("tokenizer.chat_template")
    out["chat_template_present"] = bool(tmpl)
    if not tmpl:
        fails.append("tokenizer.chat_template missing")
    elif ref_tok is not None and ref_tok.chat_template and tmpl != ref_tok.chat_template:
        fails.append("tokenizer.chat_template differs from the training tokenizer's template")
    for key in ("block_count", "embedding_length", "context_length"):
        out[key] = f.get(f"{arch}.{key}")
    if out["block_count"] != cfg.get("num_hidden_layers"):
        fails.append(f"{arch}.block_count {out['block_count']} != num_hidden_layers {cfg.get('num_hidden_layers')}")
    tokens = f.get("tokenizer.ggml.tokens") or []
    ttypes = f.get("tokenizer.ggml.token_type") or []
    out["n_tokens"] = len(tokens)
    emb = f["__tensors__"].get("token_embd.weight")
    if emb and emb[1][-1] != len(tokens):
        fails.append(f"{len(tokens)} tokens but token_embd has {emb[1][-1]} rows")
    ids = {k: f.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "unknown", "padding")}
    out["special_ids"] = ids
    out["add_bos_token"] = f.get("tokenizer.ggml.add_bos_token")
    out["add_eos_token"] = f.get("tokenizer.ggml.add_eos_token")
    out["chat_token_types"] = {}
    index = {t: i for i, t in enumerate(tokens)}
    for t in CHAT_TOKENS:
        if t in index:
            ty = int(ttypes[index[t]])
            out["chat_token_types"][t] = gguf.TokenType(ty).name
            if ty != gguf.TokenType.CONTROL:
                fails.append(f"{t} has token type {gguf.TokenType(ty).name}, expected CONTROL")
    if ref_tok is not None:
        want = {
            "bos": ref_tok.bos_token_id, "unknown": ref_tok.unk_token_id, "padding": ref_tok.pad_token_id,
            "eos": ref_tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in ref_tok.get_vocab()
            and "<|im_end|>" in (ref_tok.chat_template or "") else ref_tok.eos_token_id,
        }
        for k, v in want.items():
            if v is not None and ids.get(k) != v:
                fails.append(f"tokenizer.ggml.{k}_token_id {ids.get(k)} != training tokenizer's {v}")
        # a template that renders BOS itself already puts it in the prompt: the file must then say false
        renders_bos = _template_renders_bos(ref_tok)
        want_bos = bool(getattr(ref_tok, "add_bos_token", False)) and not renders_bos
        if out["add_bos_token"] is not None and bool(out["add_bos_token"]) != want_bos:
            why = "the chat template renders BOS itself" if renders_bos else "training tokenizer's"
            fails.append(f"add_bos_token {out['add_bos_token']} != {want_bos} ({why})")
        for t in CHAT_TOKENS:
            if t in ref_tok.get_vocab() and index.get(t) != ref_tok.convert_tokens_to_ids(t):
                fails.append(f"{t} id {index.get(t)} != training id {ref_tok.convert_tokens_to_ids(t)}")
    out["tensor_types"] = {}
    for _name, (tname, _shape) in f["__tensors__"].items():
        out["tensor_types"][tname] = out["tensor_types"].get(tname, 0) + 1
    return out


def _compare_tokenizers(ref_tok, gguf_tok, prompts: list[str], server_encode=None) -> dict:
    """Same ids on every prompt; with ``server_encode`` (text -> ids as the runtime tokenizes a rendered
    chat prompt) also the :func:`_check_chat_prompt` check, reported under ``chat_prompt``."""
    per = []
    for p in prompts:
        a = ref_tok.encode(p, add_special_tokens=False)
        b = gguf_tok.encode(p, add_special_tokens=False)
        per.append({"n_tokens": len(a), "equal": a == b, **({} if a == b else {"training": a, "gguf": b})})
    eq = all(x["equal"] for x in per)
    fails = [] if eq else [f"token ids differ on {sum(not x['equal'] for x in per)} of {len(per)} prompts"]
    out = {"ids_equal": eq, "per_prompt": per, "failures": fails}
    if server_encode is not None:
        out["chat_prompt"] = _check_chat_prompt(ref_tok, server_encode)
        fails += out["chat_prompt"].pop("failures")
    return out


def _llama_cpp_style(gguf_tok, gguf_path: Path):
    """``text -> ids`` the way llama.cpp tokenizes a rendered chat prompt (``llama_tokenize`` with
    ``add_special``): the text's own special tokens parsed, then BOS in front and EOS after exactly when
    the file's ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say so (absent: llama.cpp's default,
    BOS for SentencePiece and Llama-3 BPE vocabularies)."""
    f = _fields(gguf_path)
    bos_default = f.get("tokenizer.ggml.model") == "llama" or f.get("tokenizer.ggml.pre") == "llama-bpe"
    bos, eos = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.eos_token_id")
    head = [int(bos)] if bos is not None and f.get("tokenizer.ggml.add_bos_token", bos_default) else []
    tail = [int(eos)] if eos is not None and f.get("tokenizer.ggml.add_eos_token", False) else []
    return lambda text: head + list(gguf_tok.encode(text, add_special_tokens=False)) + tail


def _template_renders_bos(ref_tok) -> bool:
    """Whether the training chat template (as transformers renders it) starts with the BOS token."""
    bos = ref_tok.bos_token
    if not bos or not ref_tok.chat_template:
        return False
    text = ref_tok.apply_chat_template(list(CHAT_CHECK), add_generation_prompt=True, tokenize=False)
    return text.startswith(bos)


def _leading(ids: Sequence[int], tok_id: int | None) -> int:
    n = 0
    while tok_id is not None and n < len(ids) and ids[n] == tok_id:
        n += 1
    return n


def _check_chat_prompt(ref_tok, server_encode) -> dict:
    """The ids a server feeds the model for a chat prompt (template rendered to text, then tokenized
    with the file's BOS/EOS rule) vs the ids training saw (``apply_chat_template(tokenize=True)``).

    Two leading BOS (a template that renders ``bos_token`` plus ``add_bos_token=true``) fail, as does
    any difference after the leading BOS; one BOS the training prompts lacked (a BOS-free template with
    ``add_bos_token=true``, which the exporter keeps) is only reported in ``leading_bos``.
    """
    msgs = list(CHAT_CHECK)
    text = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    want = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    got = list(server_encode(text))
    bos = ref_tok.bos_token_id
    nb_want, nb_got = _leading(want, bos), _leading(got, bos)
    out: dict = {"equal": got == want, "leading_bos": {"training": nb_want, "served": nb_got}, "failures": []}
    if nb_got > 1:
        out["failures"].append(f"chat prompt starts with {nb_got} BOS tokens (training: {nb_want}): "
                               "the template renders bos_token and add_bos_token=true adds another")
    elif got[nb_got:] != want[nb_want:]:
        out["failures"].append(f"chat prompt token ids differ from apply_chat_template(tokenize=True): "
                               f"{got[:12]}... vs {want[:12]}...")
    return out


@dataclass
class Reference:
    """The PyTorch model's side of every comparison, computed once per (model, prompts)."""

    model_dir: Path
    tokenizer: object
    prompts: list[str]
    encoded: list[list[int]]
    logits: list[np.ndarray]  # [positions, vocab] per prompt
    greedy: list[list[int]]  # GREEDY_TOKENS new tokens (cut after an EOS) per prompt
    eos_ids: list[int]


_REFERENCE_CACHE: dict[tuple, Reference] = {}


def reference_outputs(model_dir: str | os.PathLike, prompts: list[str]) -> Reference:
    """Token ids, logits and greedy continuations of the PyTorch model on ``prompts`` (cached: every
    artefact of one export is compared with the same reference, computed once)."""
    import torch
    import transformers


    model_dir = Path(model_dir)
    weights = sorted(model_dir.glob("*.safetensors"))
    key = (str(model_dir.resolve()), tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in weights),
           tuple(prompts))
    if key in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[key]
    tok = _load_training_tokenizer(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                              use_safetensors=True).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    lm = TorchLM(model, pad_id=tok.pad_token_id or 0)
    encoded = [tok.encode(p, add_special_tokens=False) or [tok.bos_token_id or 0] for p in prompts]
    ref = Reference(model_dir=model_dir, tokenizer=tok, prompts=list(prompts), encoded=encoded, logits=[lm.logits(ids) for ids in encoded],
                    greedy=lm.greedy(encoded, GREEDY_TOKENS, eos_ids, batch_size=1), eos_ids=eos_ids)
    _REFERENCE_CACHE.clear()  # one model at a time: do not keep old models' logits alive
    _REFERENCE_CACHE[key] = ref
    return ref


def _gguf_in_transformers(gguf_path: Path):
    import torch
    import transformers


    return TorchLM(transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval())


def _compare_lm(ref: Reference, lm, quant: str, thresholds: dict[str, float], exact_quants: Sequence[str]):
    """Logit figures and greedy equality of ``lm`` (any :mod:`banklm.export.runtime` model) vs the reference.

    Rows ``lm`` does not compute (NaN: llama.cpp keeps only the last position) are left out of the
    all-positions figures.
    """
    thr = thresholds.get(quant, 0.0)
    last_max, last_mean, all_max, agree, n_pos, scale, norm = [], [], [], 0, 0, [], []
    for ids, a in zip(ref.encoded, ref.logits, strict=True):
        b = lm.logits(ids)
        rows = ~np.isnan(b).any(axis=1)
        d = np.abs(a - b)
        last_max.append(float(d[-1].max()))
        last_mean.append(float(d[-1].mean()))
        all_max.append(float(d[rows].max()))
        agree += int((a[rows].argmax(-1) == b[rows].argmax(-1)).sum())
        n_pos += int(rows.sum())
        s = max(1.0, float(a[-1].std()))
        scale.append(s)
        norm.append(last_max[-1] / s)
    logits = {
        "max_abs": max(last_max), "mean_abs": float(np.mean(last_mean)),
        "all_positions_max_abs": max(all_max), "top1_agreement": agree / max(1, n_pos),
        "logit_scale": max(scale), "normalized_max_abs": max(norm), "threshold": thr,
        "per_prompt_max_abs": last_max, "failures": [],
    }
    if max(norm) > thr:
        logits["failures"].append(
            f"next-token logit max-abs diff {max(last_max):.3g} (normalized {max(norm):.3g}) > {thr:g} for {quant}")
    # one prompt at a time, as the reference: no padding, so fp32 must agree token for token
    got = lm.greedy(ref.encoded, GREEDY_TOKENS, ref.eos_ids, batch_size=1)
    same = [a == b for a, b in zip(ref.greedy, got, strict=True)]
    gen: dict = {"checked": quant in exact_quants, "n_new_tokens": GREEDY_TOKENS, "equal": all(same),
                 "equal_per_prompt": same, "failures": []}
    if gen["checked"] and not gen["equal"]:
        gen["failures"].append(f"greedy continuation differs on {same.count(False)} of {len(same)} prompts")
    return logits, gen


def _check_llama_cpp(gguf_path: Path, ref: Reference, quant: str) -> dict:
    """Tokenizer, next-token logits and greedy continuation of the GGUF in llama.cpp itself."""

    n_ctx = max(len(ids) for ids in ref.encoded) + GREEDY_TOKENS + 16
    with LlamaCppLM(gguf_path, n_ctx=max(128, n_ctx)) as lm:
        prompts_ids = [lm.tokenize(p) for p in ref.prompts]
        chat = _check_chat_prompt(ref.tokenizer, lambda text: lm.tokenize(text, add_special=True))
        tok_equal = [a == b for a, b in zip(ref.encoded, prompts_ids, strict=True)]
        # the text a server returns: llama.cpp's detokenizer on the prompts and the reference answers (those
        # that are valid UTF-8: random models emit lone bytes, whose replacement characters differ by library)
        eos = set(ref.eos_ids)
        pieces = ref.encoded + [[t for t in g if t not in eos] for g in ref.greedy]
        want = [ref.tokenizer.decode(ids, skip_special_tokens=True) for ids in pieces]
        text_equal = [lm.detokenize(ids) == w for ids, w in zip(pieces, want, strict=True) if "\ufffd" not in w]
        out: dict = {"checked": True, "tokenizer": {"ids_equal": all(tok_equal), "equal_per_prompt": tok_equal,
                                                    "text_equal": all(text_equal)}, "failures": []}
        if not all(tok_equal):
            out["failures"].append(f"llama.cpp token ids differ on {tok_equal.count(False)} of {len(tok_equal)} prompts")
        out["failures"] += [f"llama.cpp {f}" for f in chat.pop("failures")]
        out["tokenizer"]["chat_prompt"] = chat
        if not all(text_equal):
            out["failures"].append(f"llama.cpp detokenized text differs on {text_equal.count(False)} of "
                                   f"{len(text_equal)} token sequences")
        logits, gen = _compare_lm(ref, lm, quant, LLAMACPP_LOGIT_THRESHOLDS, GREEDY_EXACT_QUANTS)
    out["logits"], out["generation"] = logits, gen
    out["failures"] += logits.pop("failures") + gen.pop("failures")
    return out


def _check_onnx_metadata(model_dir: Path, onnx_dir: Path, quant: str, ref_tok) -> dict:
    import onnx


    cfg = read_config(model_dir)
    fails: list[str] = []
    path = onnx_dir / "model.onnx"
    onnx.checker.check_model(str(path))
    m = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in m.graph.input]
    got_out = [o.name for o in m.graph.output]
    n = int(cfg["num_hidden_layers"])
    if got_in != input_names(n):
        fails.append(f"graph inputs {got_in[:5]}... != the {len(input_names(n))} expected (input_ids, attention_mask, "
                     "position_ids, past_key_values.i.key/value)")
    if got_out != output_names(n):
        fails.append(f"graph outputs {got_out[:3]}... != logits + present.i.key/value for {n} layers")
    meta = onnx_metadata(path)
    if meta.get("banklm.type") != quant:
        fails.append(f"declared type {meta.get('banklm.type')!r} != {quant!r}")
    out: dict = {"opset": max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None),
                 "type": meta.get("banklm.type"), "architecture": meta.get("banklm.architecture"),
                 "n_layers": n, "failures": fails}
    op_types: dict[str, int] = {}
    for node in m.graph.node:
        op_types[node.op_type] = op_types.get(node.op_type, 0) + 1
    out["quantized_matmuls"] = op_types.get("MatMulInteger", 0) + op_types.get("DynamicQuantizeMatMul", 0)
    if quant == "int8" and not out["quantized_matmuls"]:
        fails.append("int8 model has no quantized MatMul")
    for name in ("config.json", "generation_config.json"):
        if not (onnx_dir / name).is_file():
            fails.append(f"{name} missing beside model.onnx")
    gen_path = onnx_dir / "generation_config.json"
    ref_gen = model_dir / "generation_config.json"
    if gen_path.is_file() and ref_gen.is_file():
        a = json.loads(ref_gen.read_text(encoding="utf-8")).get("eos_token_id")
        b = json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id")
        out["eos_token_id"] = b
        if a != b:
            fails.append(f"generation_config eos_token_id {b} != the model's {a}")
    tmpl = None
    try:
        tmpl = _load_training_tokenizer(onnx_dir).chat_template
    except Exception as e:  # noqa: BLE001  (reported as a failure)
        fails.append(f"tokenizer beside model.onnx does not load: {type(e).__name__}: {e}")
    out["chat_template_present"] = bool(tmpl)
    if not tmpl:
        fails.append("chat template missing beside model.onnx")
    elif ref_tok is not None and ref_tok.chat_template and tmpl != ref_tok.chat_template:
        fails.append("chat template differs from the training tokenizer's template")
    return out
