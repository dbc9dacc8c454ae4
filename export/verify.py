"""Check a GGUF file against the PyTorch model it was converted from.

The GGUF is read back by two readers that share no code with :mod:`export.gguf`:

* ``gguf.GGUFReader`` for the metadata (architecture, file type, chat template, special token ids,
  token types of the chat tokens, ``add_bos_token``, vocabulary size);
* ``transformers`` GGUF loading (de-quantizes every tensor to fp32 and undoes llama.cpp's q/k row
  order) for the tokenizer and the weights: token ids on the prompts must equal the training
  tokenizer's, next-token logits must stay within a per-type threshold of the PyTorch model's, and
  for lossless-ish types (f32/f16) a few greedy tokens must be identical.

:func:`verify_gguf` never raises on a mismatch; it returns a dict with ``passed``, every figure and
the list of ``failures``.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Max |logit_gguf - logit_torch| on the next-token logits, per unit of logit scale, where the
#: scale is ``max(1, std of the reference logits)`` (small models are judged in absolute terms,
#: large-logit models relative to their spread). Measured with the transformers reader on tiny
#: 2-layer Llama/Qwen2 models (docs/export.md), default init (weights std 0.02) / sharpened weights
#: (std 0.08, the tests): f16 2.5e-4 / 2.0e-3 (STACK: ~5e-4), bf16 2.4e-3 / 1.6e-2,
#: q8_0 6.1e-3 / 4.9e-2 (STACK: 1.6e-2), q4_0 7.8e-2 / 0.71. Each threshold is >= 2x the worst
#: figure measured. Conversion bugs are far larger on a model whose attention is not uniform: a
#: Llama GGUF without the q/k row permutation is off by 0.79 (sharpened weights), but only 5.4e-3 at
#: default init, which is why the tests sharpen their random models. K-quant thresholds sit between
#: q8_0 and q4_0 by bits per weight; they are not measured here (llama_cpp is not installed).
LOGIT_THRESHOLDS: dict[str, float] = {
    "f32": 1e-4,
    "f16": 5e-3,
    "bf16": 5e-2,
    "q8_0": 1e-1,
    "q6_k": 2e-1,
    "q5_k_m": 4e-1,
    "q4_k_m": 1.0,
    "q4_0": 1.5,
}
#: Types whose greedy continuation must equal the PyTorch model's token for token.
GREEDY_EXACT_TYPES = ("f32", "f16")
#: New tokens compared in the greedy check.
GREEDY_TOKENS = 8
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def verify_gguf(
    model_dir: str | os.PathLike,
    gguf_path: str | os.PathLike,
    prompts: list[str],
    qtype: str,
) -> dict:
    """Compare ``gguf_path`` (of type ``qtype``) with the PyTorch model in ``model_dir`` on ``prompts``.

    Returns ``{"passed": bool, "failures": [...], "metadata": {...}, "tokenizer": {...},
    "logits": {...}, "generation": {...}, ...}``; never raises for a mismatch or a reader error
    (those become failures).
    """
    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    qtype = qtype.lower()
    res: dict = {
        "gguf": str(gguf_path),
        "model_dir": str(model_dir),
        "qtype": qtype,
        "bytes": gguf_path.stat().st_size if gguf_path.is_file() else None,
        "threshold": LOGIT_THRESHOLDS.get(qtype),
        "failures": [],
    }
    fails: list[str] = res["failures"]
    if res["threshold"] is None:
        fails.append(f"no logit threshold for type {qtype!r} (known: {', '.join(LOGIT_THRESHOLDS)})")
    if not gguf_path.is_file():
        fails.append(f"GGUF file not found: {gguf_path}")
        res["passed"] = False
        return res
    if not prompts:
        fails.append("no prompts given")

    ref_tok = _section(res, "training_tokenizer", lambda: _load_training_tokenizer(model_dir))
    res.pop("training_tokenizer", None)
    res["metadata"] = _section(res, "metadata", lambda: _check_metadata(model_dir, gguf_path, qtype, ref_tok)) or {}
    gguf_tok = _section(res, "gguf_tokenizer", lambda: _load_gguf_tokenizer(gguf_path, res))
    res.pop("gguf_tokenizer", None)
    res["tokenizer"] = _section(res, "tokenizer", lambda: _compare_tokenizers(ref_tok, gguf_tok, prompts)) or {}
    if ref_tok is not None and prompts:
        out = _section(res, "model", lambda: _compare_models(model_dir, gguf_path, ref_tok, prompts, qtype))
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
    from finetune.tokenizer import load_tokenizer

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


def _check_metadata(model_dir: Path, gguf_path: Path, qtype: str, ref_tok) -> dict:
    import gguf

    from .gguf import KQUANT_TYPES, NATIVE_TYPES, SUPPORTED_ARCHITECTURES

    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    f = _fields(gguf_path)
    fails: list[str] = []
    out: dict = {"failures": fails}
    arch = f.get("general.architecture")
    out["architecture"] = arch
    hf_arch = (cfg.get("architectures") or [""])[0]
    want_arch = SUPPORTED_ARCHITECTURES.get(hf_arch)
    if want_arch is None or arch != gguf.MODEL_ARCH_NAMES[want_arch]:
        fails.append(f"architecture {arch!r} does not match config {hf_arch!r}")
    ftype = f.get("general.file_type")
    out["file_type"] = ftype
    want_ft = NATIVE_TYPES[qtype][1] if qtype in NATIVE_TYPES else KQUANT_TYPES.get(qtype)
    if want_ft is not None and ftype != int(want_ft):
        fails.append(f"general.file_type {ftype} != {int(want_ft)} ({qtype})")
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
        want_bos = bool(getattr(ref_tok, "add_bos_token", False))
        if out["add_bos_token"] is not None and bool(out["add_bos_token"]) != want_bos:
            fails.append(f"add_bos_token {out['add_bos_token']} != training tokenizer's {want_bos}")
        for t in CHAT_TOKENS:
            if t in ref_tok.get_vocab() and index.get(t) != ref_tok.convert_tokens_to_ids(t):
                fails.append(f"{t} id {index.get(t)} != training id {ref_tok.convert_tokens_to_ids(t)}")
    out["tensor_types"] = {}
    for _name, (tname, _shape) in f["__tensors__"].items():
        out["tensor_types"][tname] = out["tensor_types"].get(tname, 0) + 1
    return out


def _compare_tokenizers(ref_tok, gguf_tok, prompts: list[str]) -> dict:
    per = []
    for p in prompts:
        a = ref_tok.encode(p, add_special_tokens=False)
        b = gguf_tok.encode(p, add_special_tokens=False)
        per.append({"n_tokens": len(a), "equal": a == b, **({} if a == b else {"training": a, "gguf": b})})
    eq = all(x["equal"] for x in per)
    fails = [] if eq else [f"token ids differ on {sum(not x['equal'] for x in per)} of {len(per)} prompts"]
    return {"ids_equal": eq, "per_prompt": per, "failures": fails}


def _compare_models(model_dir: Path, gguf_path: Path, ref_tok, prompts: list[str], qtype: str):
    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True).eval()
    got = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    thr = LOGIT_THRESHOLDS.get(qtype, 0.0)
    last_max, last_mean, all_max, agree, n_pos, scale, norm = [], [], [], 0, 0, [], []
    encoded = []
    with torch.no_grad():
        for p in prompts:
            ids = ref_tok.encode(p, add_special_tokens=False) or [ref_tok.bos_token_id or 0]
            encoded.append(ids)
            x = torch.tensor([ids])
            a = ref(x).logits[0].float()
            b = got(x).logits[0].float()
            d = (a - b).abs()
            last_max.append(d[-1].max().item())
            last_mean.append(d[-1].mean().item())
            all_max.append(d.max().item())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            n_pos += a.shape[0]
            s = max(1.0, a[-1].std().item())
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
            f"next-token logit max-abs diff {max(last_max):.3g} (normalized {max(norm):.3g}) > {thr:g} for {qtype}")
    gen: dict = {"checked": qtype in GREEDY_EXACT_TYPES, "n_new_tokens": GREEDY_TOKENS, "failures": []}
    same = []
    with torch.no_grad():
        for ids in encoded:
            x = torch.tensor([ids])
            kw = dict(max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=ref_tok.pad_token_id or 0,
                      eos_token_id=ref.generation_config.eos_token_id)
            a = ref.generate(x, **kw)[0, len(ids):].tolist()
            b = got.generate(x, **kw)[0, len(ids):].tolist()
            same.append(a == b)
    gen["equal"] = all(same)
    gen["equal_per_prompt"] = same
    if gen["checked"] and not gen["equal"]:
        gen["failures"].append(f"greedy continuation differs on {same.count(False)} of {len(same)} prompts")
    return logits, gen
