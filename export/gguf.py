"""Convert a Hugging Face Llama / Qwen2 model folder into GGUF files for llama.cpp and Ollama.

Written from the GGUF format and the ``gguf`` library's API (``GGUFWriter``, ``TensorNameMap``,
``gguf.quants``); no llama.cpp code is involved in the F32/F16/BF16/Q8_0/Q4_0 path. K-quants
(q4_k_m, q5_k_m, q6_k) need llama.cpp's own quantizer and go through ``llama_cpp`` (optional extra).

What a file holds (see docs/export.md for the full list):

* hyper-parameters under ``{arch}.*`` keys (context/embedding/FFN length, block and head counts,
  rope base, dimension count and scaling, RMS-norm epsilon, vocabulary size);
* tensors renamed with ``gguf.get_tensor_name_map``; Llama's ``q_proj``/``k_proj`` rows are permuted
  from Hugging Face's "rotate half" rotary layout to the interleaved-pair layout llama.cpp's Llama
  graph applies rope to (Qwen2 runs with the NeoX/rotate-half rope in llama.cpp: no permutation);
* the tokenizer (SentencePiece ``tokenizer.model`` -> ``tokenizer.ggml.model = "llama"``; byte-level
  BPE ``tokenizer.json`` -> ``"gpt2"`` with a ``tokenizer.ggml.pre`` derived from its pre-tokenizer
  regex), special token ids, ``add_bos_token`` (false when the chat template renders BOS itself, so
  llama.cpp does not add a second one) and the training chat template.

Every file is streamed into a temporary sibling (``banklm.io.atomic_open``) and renamed only once
complete: a conversion that fails half-way leaves no ``*.gguf`` behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from banklm.finetune.tokenizer import check_chat_template
from gguf import MODEL_ARCH, LlamaFileType, TokenType
from gguf import GGMLQuantizationType as QT

from banklm.io import atomic_open
from banklm.runtime import MissingDependency, import_llama_cpp

from .ollama import render_jinja_chat

log = logging.getLogger(__name__)

#: HF ``architectures[0]`` -> gguf architecture.
SUPPORTED_ARCHITECTURES: dict[str, MODEL_ARCH] = {
    "LlamaForCausalLM": MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": MODEL_ARCH.QWEN2,
}

#: Types written directly with numpy (``gguf.quants``): name -> (tensor type, file type).
NATIVE_TYPES: dict[str, tuple[QT, LlamaFileType]] = {
    "f32": (QT.F32, LlamaFileType.ALL_F32),
    "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}

#: Types that need llama.cpp's quantizer (``llama_cpp.llama_model_quantize``) on top of an F16 file.
KQUANT_TYPES: dict[str, LlamaFileType] = {
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}

#: When a 2-D tensor cannot take the requested block type (row size not a multiple of the block
#: size), use the next higher-precision type that fits.
_FALLBACK: dict[QT, tuple[QT, ...]] = {
    QT.Q4_0: (QT.Q8_0, QT.F16),
    QT.Q8_0: (QT.F16,),
    QT.BF16: (),
    QT.F16: (),
    QT.F32: (),
}

# Known byte-level BPE pre-tokenizer split regexes -> the name llama.cpp knows them by.
# Qwen2 (same as transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_PRE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3 ("llama-bpe" in llama.cpp): digits in groups of up to three.
LLAMA3_PRE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (QWEN2_PRE_REGEX,): "qwen2",
    (LLAMA3_PRE_REGEX,): "llama-bpe",
}

#: Chat special tokens always stored as CONTROL (llama.cpp then parses them only as specials and
#: never prints them; the ChatML end-of-turn is an end-of-generation token).
CHAT_SPECIAL_RE = re.compile(r"^<\|[^|\s]+\|>$")
IM_END = "<|im_end|>"


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def export_gguf(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    types: Sequence[str] = ("f16", "q8_0"),
    name: str | None = None,
) -> list[Path]:
    """Convert ``model_dir`` (HF Llama/Qwen2 folder with its tokenizer) into one GGUF per type.

    ``types``: any of ``f32, f16, bf16, q8_0, q4_0`` (numpy path) and ``q4_k_m, q5_k_m, q6_k``
    (through llama.cpp, needs ``pip install 'banklm[llamacpp]'``). Files are named
    ``<name>-<type>.gguf`` in ``out_dir`` (``name`` defaults to the model folder's name).
    Returns the written paths in the order of ``types``. Raises ``ValueError`` for an unsupported
    architecture, unknown type, or a tokenizer that cannot be represented faithfully.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    types = [t.lower() for t in types]
    unknown = [t for t in types if t not in NATIVE_TYPES and t not in KQUANT_TYPES]
    if unknown or not types:
        raise ValueError(
            f"export_gguf: unknown type(s) {unknown or types}; supported: "
            f"{', '.join([*NATIVE_TYPES, *KQUANT_TYPES])}"
        )
    kquants = [t for t in types if t in KQUANT_TYPES]
    if kquants:
        import_llama_cpp()  # fail before writing anything

    model = read_model(model_dir)
    tok = read_tokenizer(model_dir, model.n_vocab)
    name = name or model_dir.resolve().name
    out_dir.mkdir(parents=True, exist_ok=True)

    written: dict[str, Path] = {}
    for t in dict.fromkeys(t for t in types if t in NATIVE_TYPES):
        dst = out_dir / f"{name}-{t}.gguf"
        write_gguf(model, tok, dst, t, name=name)
        written[t] = dst
    if kquants:
        src = written.get("f16")
        tmp_src = None
        if src is None:
            tmp_src = out_dir / f".{name}-f16.src-{os.getpid()}.gguf"
            write_gguf(model, tok, tmp_src, "f16", name=name)
            src = tmp_src
        try:
            for t in kquants:
                dst = out_dir / f"{name}-{t}.gguf"
                requantize_with_llamacpp(src, dst, t)
                written[t] = dst
        finally:
            if tmp_src is not None:
                tmp_src.unlink(missing_ok=True)
    return [written[t] for t in types]


def requantize_with_llamacpp(src_f16: str | os.PathLike, dst: str | os.PathLike, type: str) -> Path:
    """Re-quantize an F16/F32 GGUF to a k-quant (``q4_k_m``, ``q5_k_m``, ``q6_k``) with llama.cpp.

    Uses ``llama_cpp.llama_model_quantize`` (C API of the llama.cpp library bundled by
    llama-cpp-python); writes ``dst`` via a temporary sibling renamed on success.
    Raises ``RuntimeError`` when ``llama_cpp`` is not installed or quantization fails.
    """
    import ctypes

    t = type.lower()
    if t not in KQUANT_TYPES:
        raise ValueError(f"requantize_with_llamacpp: type {type!r} not one of {', '.join(KQUANT_TYPES)}")
    llama_cpp = import_llama_cpp()
    src_f16, dst = Path(src_f16), Path(dst)
    if not src_f16.is_file():
        raise FileNotFoundError(f"requantize_with_llamacpp: source GGUF not found: {src_f16}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(KQUANT_TYPES[t])
    try:
        rc = llama_cpp.llama_model_quantize(str(src_f16).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise RuntimeError(f"llama_model_quantize({src_f16} -> {t}) failed with code {rc}")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


# --------------------------------------------------------------------------------------------------
# model side
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """What the converter needs from a HF model folder (weights are read lazily)."""

    folder: Path
    config: dict
    hf_arch: str
    arch: MODEL_ARCH
    n_vocab: int
    n_head: int
    n_head_kv: int
    head_dim: int
    tensor_files: dict[str, Path]  # HF tensor name -> safetensors file
    shapes: dict[str, tuple[int, ...]]

    def tensor(self, hf_name: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(self.tensor_files[hf_name]), framework="pt") as f:
            return f.get_tensor(hf_name).float().numpy()


def read_export_config(model_dir: str | os.PathLike, target: str = "GGUF") -> dict:
    """``config.json`` of ``model_dir``; refuses architectures the exporters do not handle (GGUF and ONNX
    support the same two)."""
    folder = Path(model_dir)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    hf_arch = archs[0] if archs else f"<model_type={config.get('model_type')}>"
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{cfg_path}: architecture {hf_arch} is not supported for {target} export; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config


def read_model(model_dir: str | os.PathLike) -> ModelSource:
    """Read ``config.json`` and the safetensors index of ``model_dir`` (no weights loaded yet)."""
    from safetensors import safe_open

    folder = Path(model_dir)
    config = read_export_config(folder)
    hf_arch = config["architectures"][0]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (save with safe_serialization)")
    tensor_files: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for fp in files:
        with safe_open(str(fp), framework="pt") as f:
            for k in f.keys():
                tensor_files[k] = fp
                shapes[k] = tuple(f.get_slice(k).get_shape())
    emb = "model.embed_tokens.weight"
    if emb not in shapes:
        raise ValueError(f"{folder}: weights have no {emb}")
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    return ModelSource(
        folder=folder, config=config, hf_arch=hf_arch, arch=SUPPORTED_ARCHITECTURES[hf_arch],
        n_vocab=shapes[emb][0], n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        tensor_files=tensor_files, shapes=shapes,
    )


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotate-half rope layout to llama.cpp's interleaved one.

    HF rotates the pair (x[i], x[i + d/2]) of each head; llama.cpp's Llama graph rotates adjacent
    pairs (x[2i], x[2i+1]). Putting row ``i`` at ``2i`` and row ``i + d/2`` at ``2i + 1`` inside each
    head makes both compute the same attention scores (q.k is invariant under a shared permutation).
    Works for weights (rows x in) and biases (rows).
    """
    rows = w.shape[0]
    d = rows // n_head
    if d * n_head != rows or d % 2:
        raise ValueError(f"cannot split {rows} rows into {n_head} heads of even size")
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_parameters(cfg: dict) -> dict:
    rp = dict(cfg.get("rope_parameters") or {})
    rs = cfg.get("rope_scaling") or {}
    for k, v in rs.items():
        rp.setdefault(k, v)
    if "rope_theta" not in rp and "rope_theta" in cfg:
        rp["rope_theta"] = cfg["rope_theta"]
    if "rope_type" not in rp and "type" in rp:
        rp["rope_type"] = rp["type"]
    return rp


def _llama3_rope_factors(rp: dict, head_dim: int, base: float) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies through ``rope_freqs.weight`` for Llama-3 scaling."""
    factor = float(rp["factor"])
    low = float(rp.get("low_freq_factor", 1.0))
    high = float(rp.get("high_freq_factor", 4.0))
    old_ctx = float(rp["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (base ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _write_hparams(w: gguf.GGUFWriter, m: ModelSource) -> np.ndarray | None:
    """Hyper-parameters; returns a ``rope_freqs`` tensor when the rope scaling needs one."""
    c = m.config
    w.add_vocab_size(m.n_vocab)
    w.add_context_length(int(c.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.n_head_kv)
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    if m.head_dim != int(c["hidden_size"]) // m.n_head:
        w.add_key_length(m.head_dim)
        w.add_value_length(m.head_dim)
    w.add_rope_dimension_count(m.head_dim)
    rp = _rope_parameters(c)
    base = float(rp.get("rope_theta", 10000.0))
    w.add_rope_freq_base(base)
    kind = rp.get("rope_type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
        return None
    if kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        orig = rp.get("original_max_position_embeddings")
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))
        return None
    if kind == "llama3":
        # llama.cpp has no "llama3" scaling type: the per-frequency factors travel as a tensor.
        return _llama3_rope_factors(rp, m.head_dim, base)
    raise ValueError(
        f"{m.folder / 'config.json'}: rope scaling type {kind!r} has no GGUF equivalent here "
        "(supported: default, linear, yarn, llama3)"
    )


def _tensor_plan(m: ModelSource) -> list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]]:
    """``(gguf name, hf name, transform)`` for every tensor to write, in file order."""
    tmap = gguf.get_tensor_name_map(m.arch, int(m.config["num_hidden_layers"]))
    tied = bool(m.config.get("tie_word_embeddings", False))
    plan = []
    for hf in m.shapes:
        if hf.endswith(".rotary_emb.inv_freq"):
            continue
        if hf == "lm_head.weight" and tied:
            continue  # llama.cpp re-uses token_embd as the output head when output.weight is absent
        gname = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"{m.folder}: tensor {hf} has no GGUF name for {m.arch.name.lower()}")
        fn: Callable[[np.ndarray], np.ndarray] = _identity
        if m.arch == MODEL_ARCH.LLAMA and (".attn_q." in gname or ".attn_k." in gname):
            heads = m.n_head if ".attn_q." in gname else m.n_head_kv
            fn = _permuter(heads)
        plan.append((gname, hf, fn))
    if not tied and "lm_head.weight" not in m.shapes:
        raise ValueError(f"{m.folder}: tie_word_embeddings is false but lm_head.weight is missing")
    order = {"token_embd": 0, "output_norm": 2, "output": 3, "rope_freqs": -1}
    plan.sort(key=lambda p: (order.get(p[0].split(".")[0], 1), _block_index(p[0]), p[0]))
    return plan


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _permuter(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: permute_rope_rows(x, n_head)


def _block_index(gname: str) -> int:
    mt = re.match(r"blk\.(\d+)\.", gname)
    return int(mt.group(1)) if mt else -1


def choose_type(gname: str, shape: Sequence[int], want: QT, tied: bool) -> QT:
    """Tensor type for ``gname``: 1-D tensors (norms, biases) stay F32; the output head (and the
    tied embedding that serves as it) keeps Q8_0 under Q4_0; rows that do not fill whole blocks
    fall back to a higher-precision type (logged)."""
    if len(shape) < 2 or want == QT.F32:
        return QT.F32
    if want == QT.Q4_0 and (gname == "output.weight" or (tied and gname == "token_embd.weight")):
        want = QT.Q8_0
    for t in (want, *_FALLBACK[want]):
        block = gguf.GGML_QUANT_SIZES[t][0]
        if shape[-1] % block == 0:
            if t != want:
                log.info("gguf: %s %s: row size %d not a multiple of %s block %d, stored as %s",
                         gname, tuple(shape), shape[-1], want.name, gguf.GGML_QUANT_SIZES[want][0], t.name)
            return t
    return QT.F32


def quantize_tensor(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Encode an fp32 array as ``qtype`` (F32/F16 as float arrays, others as raw uint8 blocks)."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    return gguf.quants.quantize(data, qtype)


def _nbytes(shape: Sequence[int], qtype: QT) -> int:
    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))


def write_gguf(m: ModelSource, tok: TokenizerData, dst: str | os.PathLike, type: str,
               name: str | None = None) -> Path:
    """Write one GGUF of ``type`` (a :data:`NATIVE_TYPES` key) to ``dst``, atomically, streaming
    one tensor at a time (peak memory is about one fp32 tensor, not the whole model)."""
    dst = Path(dst)
    want, ftype = NATIVE_TYPES[type]
    arch_name = gguf.MODEL_ARCH_NAMES[m.arch]
    w = gguf.GGUFWriter(path=None, arch=arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or m.folder.name)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope_freqs = _write_hparams(w, m)
    tok.write(w)

    tied = bool(m.config.get("tie_word_embeddings", False))
    plan = _tensor_plan(m)
    entries: list[tuple[str, str | None, Callable[[np.ndarray], np.ndarray], QT]] = []
    if rope_freqs is not None:
        w.add_tensor_info("rope_freqs.weight", rope_freqs.shape, np.dtype(np.float32), rope_freqs.nbytes)
        entries.append(("rope_freqs.weight", None, lambda _x: rope_freqs, QT.F32))
    counts: dict[str, int] = {}
    for gname, hf, fn in plan:
        shape = m.shapes[hf]
        qt = choose_type(gname, shape, want, tied)
        counts[qt.name] = counts.get(qt.name, 0) + 1
        if qt in (QT.F32, QT.F16):
            dt = np.dtype(np.float32 if qt == QT.F32 else np.float16)
            w.add_tensor_info(gname, shape, dt, int(np.prod(shape)) * dt.itemsize)
        else:
            w.add_tensor_info(gname, shape, np.dtype(np.float32), _nbytes(shape, qt), raw_dtype=qt)
        entries.append((gname, hf, fn, qt))

    with atomic_open(dst, "wb") as fh:
        # The writer streams into our temporary file handle: open_output_file() accepts an
        # already-open output in state EMPTY, so no path of its own is ever created.
        w.fout = [fh]
        w.state = gguf.gguf_writer.WriterState.EMPTY
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, hf, fn, qt in entries:
            data = fn(m.tensor(hf)) if hf is not None else fn(None)
            if tuple(data.shape) != tuple(m.shapes.get(hf, data.shape)):
                raise ValueError(f"{gname}: transformed shape {data.shape} != {m.shapes[hf]}")
            w.write_tensor_data(quantize_tensor(data, qt))
        w.flush()
        w.fout = None  # atomic_open closes the handle
    log.info("gguf: wrote %s (%s, %d tensors: %s, %.1f MB)", dst, type, len(entries),
             ", ".join(f"{k}={v}" for k, v in sorted(counts.items())), dst.stat().st_size / 1e6)
    return dst


# --------------------------------------------------------------------------------------------------
# tokenizer side
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizerData:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    chat_template: str | list | None = None

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        for fn, val in ((w.add_bos_token_id, self.bos_id), (w.add_eos_token_id, self.eos_id),
                        (w.add_eot_token_id, self.eot_id), (w.add_eom_token_id, self.eom_id),
                        (w.add_unk_token_id, self.unk_id), (w.add_pad_token_id, self.pad_id)):
            if val is not None:
                fn(int(val))
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.remove_extra_whitespaces is not None:
            w.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def read_tokenizer(folder: str | os.PathLike, n_vocab: int | None = None) -> TokenizerData:
    """Read the tokenizer files of ``folder`` into GGUF form.

    ``tokenizer.model`` (SentencePiece) wins over ``tokenizer.json``; the vocabulary is padded with
    ``[PAD<i>]`` UNUSED entries up to ``n_vocab`` (the embedding rows) when the model is larger.
    """
    folder = Path(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    if (folder / "tokenizer.model").is_file():
        tok = _read_spm(folder, cfg)
    elif (folder / "tokenizer.json").is_file():
        tok = _read_hf_bpe(folder, cfg)
    else:
        raise ValueError(f"{folder}: no tokenizer.model or tokenizer.json (the tokenizer must live in the model folder)")
    n = len(tok.tokens)
    if n_vocab is not None:
        if n > n_vocab:
            raise ValueError(f"{folder}: tokenizer has {n} tokens but the embedding only {n_vocab} rows")
        for i in range(n, n_vocab):
            tok.tokens.append(f"[PAD{i}]")
            tok.types.append(int(TokenType.UNUSED))
            if tok.scores is not None:
                tok.scores.append(-1000.0)
    tok.chat_template = _chat_template(folder, cfg)
    _set_special_ids(tok, cfg, folder)
    bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
    if tok.add_bos and chat_template_renders_bos(tok.chat_template, bos):
        # training tokenized the rendered template without adding specials: its one BOS came from the
        # template, and llama.cpp would put a second one in front of it
        log.info("gguf: %s: the chat template renders the BOS token itself; writing add_bos_token=false",
                 folder)
        tok.add_bos = False
    return tok


def chat_template_renders_bos(template: str | list | dict | None, bos_token: str | None) -> bool:
    """Whether ``template`` (the default one of a named list) starts its output with ``bos_token``, as
    Llama-3 templates do (``{{ bos_token }}...``): llama.cpp must then not add BOS again.

    Rendered (sandboxed, as transformers does) for a one-user-message conversation; raises ``ValueError``
    when the template cannot render that, since the GGUF's readers could not render it either.
    """

    if isinstance(template, dict):
        template = template.get("default")
    elif isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not template or not bos_token:
        return False
    try:
        text = render_jinja_chat(template, [{"role": "user", "content": "x"}], add_generation_prompt=True,
                                 bos_token=bos_token, eos_token="", unk_token="", pad_token="")
    except Exception as e:  # noqa: BLE001  (any Jinja error: say which template)
        raise ValueError(f"chat template does not render a one-user-message conversation "
                         f"({type(e).__name__}: {e}); cannot tell whether it emits the BOS token") from e
    return text.startswith(bos_token)


def _chat_template(folder: Path, cfg: dict) -> str | list | None:
    """The folder's chat template; one that reaches Python internals is refused, never written to the GGUF
    (its readers render it, and not all of them sandbox Jinja)."""

    jinja = folder / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else cfg.get("chat_template")
    check_chat_template(template, folder)
    return template


def _special_strings(cfg: dict) -> set[str]:
    """Token strings the tokenizer config declares special."""
    out: set[str] = set()
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out.add(v)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        vals = cfg.get(key) or []
        if isinstance(vals, dict):
            vals = list(vals.values())
        for v in vals:
            out.add(v.get("content") if isinstance(v, dict) else v)
    for v in (cfg.get("added_tokens_decoder") or {}).values():
        if v.get("special"):
            out.add(v["content"])
    return out


def _read_spm(folder: Path, cfg: dict) -> TokenizerData:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = folder / "tokenizer.model"
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type not in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM):
        raise ValueError(f"{path}: SentencePiece model type {proto.trainer_spec.model_type} not supported")
    if proto.normalizer_spec.precompiled_charsmap:
        raise ValueError(
            f"{path}: the SentencePiece normalizer has a precompiled char map (e.g. NFKC); llama.cpp's "
            "'llama' tokenizer does not apply it, so GGUF tokenization would differ. Train with "
            "normalization_rule_name='identity'."
        )
    sp = spm.SentencePieceProcessor(model_file=str(path))
    special = _special_strings(cfg)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece)
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            t = TokenType.UNKNOWN
        elif sp.is_control(i):
            t = TokenType.CONTROL
        elif sp.is_byte(i):
            t = TokenType.BYTE
        elif sp.is_unused(i):
            t = TokenType.UNUSED
        elif proto.pieces[i].type == pb.ModelProto.SentencePiece.USER_DEFINED:
            t = TokenType.CONTROL if (piece in special or CHAT_SPECIAL_RE.match(piece)) else TokenType.USER_DEFINED
        else:
            t = TokenType.NORMAL
        types.append(int(t))
    ts = proto.trainer_spec
    tok = TokenizerData(
        model="llama", tokens=tokens, types=types, scores=scores,
        bos_id=ts.bos_id if ts.bos_id >= 0 else None,
        eos_id=ts.eos_id if ts.eos_id >= 0 else None,
        unk_id=ts.unk_id if ts.unk_id >= 0 else None,
        pad_id=ts.pad_id if ts.pad_id >= 0 else None,
        add_bos=bool(cfg.get("add_bos_token", True)),  # HF's LlamaTokenizer default is True
        add_eos=bool(cfg.get("add_eos_token", False)),
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
        remove_extra_whitespaces=bool(proto.normalizer_spec.remove_extra_whitespaces),
    )
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def derive_bpe_pre(pre_tokenizer: dict | None, where: str = "tokenizer.json") -> str:
    """Name of the llama.cpp pre-tokenizer matching a ``tokenizer.json`` ``pre_tokenizer`` config.

    Collects the ``Split`` regexes (and checks the ``ByteLevel`` step) and compares them with the
    known Qwen2 / Llama-3 patterns; raises ``ValueError`` when they match none (llama.cpp would
    otherwise refuse the file or, worse, split text differently from training).
    """
    if not pre_tokenizer:
        raise ValueError(f"{where}: byte-level BPE without a pre_tokenizer; cannot name a llama.cpp pre-tokenizer")
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    regexes: list[str] = []
    byte_level = None
    for s in steps:
        if s.get("type") == "Split":
            pat = s.get("pattern") or {}
            if "Regex" not in pat or s.get("invert") or s.get("behavior", "Isolated").lower() != "isolated":
                raise ValueError(f"{where}: unsupported Split pre-tokenizer step {json.dumps(s)[:200]}")
            regexes.append(pat["Regex"])
        elif s.get("type") == "ByteLevel":
            byte_level = s
        else:
            raise ValueError(f"{where}: unsupported pre-tokenizer step {s.get('type')!r}")
    if byte_level is None:
        raise ValueError(f"{where}: pre_tokenizer has no ByteLevel step: not a byte-level BPE tokenizer")
    if byte_level.get("add_prefix_space"):
        raise ValueError(f"{where}: ByteLevel add_prefix_space=true is not supported by llama.cpp's BPE")
    if not regexes and byte_level.get("use_regex", True):
        return "gpt-2"
    if byte_level.get("use_regex", True) and regexes:
        raise ValueError(f"{where}: ByteLevel use_regex=true after a Split regex: unknown combination")
    name = KNOWN_PRE_TOKENIZERS.get(tuple(regexes))
    if name is None:
        raise ValueError(
            f"{where}: unknown pre-tokenizer regex {regexes!r}; known: "
            + "; ".join(f"{v} = {k[0]!r}" for k, v in KNOWN_PRE_TOKENIZERS.items())
        )
    return name


def _read_hf_bpe(folder: Path, cfg: dict) -> TokenizerData:
    path = folder / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer model {model.get('type')!r} not supported (byte-level BPE or SentencePiece)")
    pre = derive_bpe_pre(tj.get("pre_tokenizer"), str(path))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens") or []}
    for content, a in added.items():
        vocab[content] = int(a["id"])
    n = max(vocab.values()) + 1
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    alphabet = set(_bytes_to_unicode().values())
    special = _special_strings(cfg)
    tokens, types = [], []
    for i in range(n):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        tokens.append(t)
        if t in added:
            is_special = added[t].get("special") or t in special
            types.append(int(TokenType.CONTROL if is_special else TokenType.USER_DEFINED))
        elif not set(t) <= alphabet:
            raise ValueError(f"{path}: vocabulary token {t!r} (id {i}) is not byte-level encoded")
        else:
            types.append(int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return TokenizerData(
        model="gpt2", tokens=tokens, types=types, merges=merges, pre=pre,
        add_bos=bool(cfg.get("add_bos_token", False)), add_eos=bool(cfg.get("add_eos_token", False)),
    )


def _set_special_ids(tok: TokenizerData, cfg: dict, folder: Path) -> None:
    index = {t: i for i, t in enumerate(tok.tokens)}

    def tid(key: str) -> int | None:
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return index.get(v) if isinstance(v, str) else None

    for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token"), ("unk_id", "unk_token"),
                      ("pad_id", "pad_token")):
        v = tid(key)
        if v is not None:
            setattr(tok, attr, v)
    # Chat models stop at the end of an assistant turn: EOS (and EOT) = <|im_end|> when the chat
    # template uses it, whatever the tokenizer config calls eos.
    tmpl = tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(tok.chat_template or "")
    if IM_END in index and IM_END in tmpl:
        tok.eos_id = index[IM_END]
        tok.eot_id = index[IM_END]
        tok.types[index[IM_END]] = int(TokenType.CONTROL)
    if "<|eot_id|>" in index:
        tok.eot_id = index["<|eot_id|>"]
    if "<|eom_id|>" in index:
        tok.eom_id = index["<|eom_id|>"]
    for attr in ("bos_id", "eos_id", "unk_id", "pad_id"):
        v = getattr(tok, attr)
        if v is not None and tok.types[v] == TokenType.NORMAL:
            tok.types[v] = int(TokenType.CONTROL)


def gguf_summary(path: str | os.PathLike) -> dict:
    """Small metadata summary of a GGUF (architecture, file type, tensor types, size)."""
    r = gguf.GGUFReader(str(path))
    f = r.fields
    arch = bytes(f["general.architecture"].parts[-1]).decode()
    ttypes: dict[str, int] = {}
    for t in r.tensors:
        ttypes[t.tensor_type.name] = ttypes.get(t.tensor_type.name, 0) + 1
    return {
        "path": str(path),
        "architecture": arch,
        "file_type": int(f["general.file_type"].parts[-1][0]) if "general.file_type" in f else None,
        "tensor_types": ttypes,
        "n_tensors": len(r.tensors),
        "bytes": Path(path).stat().st_size,
    }


__all__ = [
    "SUPPORTED_ARCHITECTURES", "NATIVE_TYPES", "KQUANT_TYPES", "KNOWN_PRE_TOKENIZERS",
    "export_gguf", "requantize_with_llamacpp", "MissingDependency", "read_model", "read_tokenizer", "derive_bpe_pre",
    "chat_template_renders_bos",
    "permute_rope_rows", "choose_type", "write_gguf", "gguf_summary", "TokenizerData", "ModelSource",
]
