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
  llama.cpp does not add a second one) and the training chat template: translated by
  :mod:`banklm.export.gguf_vocab`.

Quants are banklm's names (:data:`GGUF_QUANTS`, default :data:`DEFAULT_GGUF_QUANT`), one name from the recipe
key ``export.gguf.quant`` and ``banklm export --quant`` down to :func:`export_gguf`'s ``quant``; the ``gguf``
library's ``GGMLQuantizationType`` / ``LlamaFileType`` are looked up at the call (:func:`tensor_type`,
:func:`file_type`). The ``gguf`` library itself is imported inside the functions that use it, so the recipe
schema imports these names without it.

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
from typing import TYPE_CHECKING

import numpy as np

from banklm.io import atomic_open
from banklm.runtime import MissingDependency, import_llama_cpp

if TYPE_CHECKING:
    import gguf

    from .gguf_vocab import TokenizerData

log = logging.getLogger(__name__)

#: HF ``architectures[0]`` -> gguf architecture name (``general.architecture``).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}

#: Quants written directly with numpy (``gguf.quants``).
NATIVE_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
#: Quants that need llama.cpp's quantizer (``llama_cpp.llama_model_quantize``) on top of an F16 file.
KQUANTS = ("q4_k_m", "q5_k_m", "q6_k")
#: Every GGUF quant (recipe ``export.gguf.quant``, ``banklm export --format gguf --quant``), and the default.
GGUF_QUANTS = NATIVE_QUANTS + KQUANTS
DEFAULT_GGUF_QUANT = ("f16", "q8_0")

#: When a 2-D tensor cannot take the requested block quant (row size not a multiple of the block
#: size), use the next higher-precision quant that fits.
_FALLBACK: dict[str, tuple[str, ...]] = {"q4_0": ("q8_0", "f16"), "q8_0": ("f16",)}


def tensor_type(quant: str) -> gguf.GGMLQuantizationType:
    """The ``gguf`` library's tensor type of a native quant (``q8_0`` -> ``GGMLQuantizationType.Q8_0``)."""
    import gguf

    if quant not in NATIVE_QUANTS:
        raise ValueError(f"{quant!r} is not a native GGUF quant ({', '.join(NATIVE_QUANTS)})")
    return gguf.GGMLQuantizationType[quant.upper()]


def file_type(quant: str) -> gguf.LlamaFileType:
    """``general.file_type`` of a file of ``quant`` (``q4_k_m`` -> ``LlamaFileType.MOSTLY_Q4_K_M``)."""
    import gguf

    if quant not in GGUF_QUANTS:
        raise ValueError(f"{quant!r} is not a GGUF quant ({', '.join(GGUF_QUANTS)})")
    return gguf.LlamaFileType.ALL_F32 if quant == "f32" else gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def export_gguf(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    quant: Sequence[str] = DEFAULT_GGUF_QUANT,
    name: str | None = None,
) -> list[Path]:
    """Convert ``model_dir`` (HF Llama/Qwen2 folder with its tokenizer) into one GGUF per quant.

    ``quant``: any of :data:`NATIVE_QUANTS` (``f32, f16, bf16, q8_0, q4_0``: numpy path) and :data:`KQUANTS`
    (``q4_k_m, q5_k_m, q6_k``: through llama.cpp, needs ``pip install 'banklm[llamacpp]'``). Files are named
    ``<name>-<quant>.gguf`` in ``out_dir`` (``name`` defaults to the model folder's name).
    Returns the written paths in the order of ``quant``. Raises ``ValueError`` for an unsupported
    architecture, unknown quant, or a tokenizer that cannot be represented faithfully.
    """
    from .gguf_vocab import read_tokenizer  # the gguf library

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    quant = [q.lower() for q in quant]
    unknown = [q for q in quant if q not in GGUF_QUANTS]
    if unknown or not quant:
        raise ValueError(f"export_gguf: unknown quant(s) {unknown or quant}; supported: {', '.join(GGUF_QUANTS)}")
    kquants = [q for q in quant if q in KQUANTS]
    if kquants:
        import_llama_cpp()  # fail before writing anything

    model = read_model(model_dir)
    tok = read_tokenizer(model_dir, model.n_vocab)
    name = name or model_dir.resolve().name
    out_dir.mkdir(parents=True, exist_ok=True)

    written: dict[str, Path] = {}
    for q in dict.fromkeys(q for q in quant if q in NATIVE_QUANTS):
        dst = out_dir / f"{name}-{q}.gguf"
        write_gguf(model, tok, dst, q, name=name)
        written[q] = dst
    if kquants:
        src = written.get("f16")
        tmp_src = None
        if src is None:
            tmp_src = out_dir / f".{name}-f16.src-{os.getpid()}.gguf"
            write_gguf(model, tok, tmp_src, "f16", name=name)
            src = tmp_src
        try:
            for q in kquants:
                dst = out_dir / f"{name}-{q}.gguf"
                requantize_with_llamacpp(src, dst, q)
                written[q] = dst
        finally:
            if tmp_src is not None:
                tmp_src.unlink(missing_ok=True)
    return [written[q] for q in quant]


def requantize_with_llamacpp(src_f16: str | os.PathLike, dst: str | os.PathLike, quant: str) -> Path:
    """Re-quantize an F16/F32 GGUF to a k-quant (``q4_k_m``, ``q5_k_m``, ``q6_k``) with llama.cpp.

    Uses ``llama_cpp.llama_model_quantize`` (C API of the llama.cpp library bundled by
    llama-cpp-python); writes ``dst`` via a temporary sibling renamed on success.
    Raises ``RuntimeError`` when ``llama_cpp`` is not installed or quantization fails.
    """
    import ctypes

    t = quant.lower()
    if t not in KQUANTS:
        raise ValueError(f"requantize_with_llamacpp: quant {quant!r} not one of {', '.join(KQUANTS)}")
    llama_cpp = import_llama_cpp()
    src_f16, dst = Path(src_f16), Path(dst)
    if not src_f16.is_file():
        raise FileNotFoundError(f"requantize_with_llamacpp: source GGUF not found: {src_f16}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(t))
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
    arch: str  # gguf architecture name
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
    import gguf

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
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == m.arch)
    tmap = gguf.get_tensor_name_map(arch, int(m.config["num_hidden_layers"]))
    tied = bool(m.config.get("tie_word_embeddings", False))
    plan = []
    for hf in m.shapes:
        if hf.endswith(".rotary_emb.inv_freq"):
            continue
        if hf == "lm_head.weight" and tied:
            continue  # llama.cpp re-uses token_embd as the output head when output.weight is absent
        gname = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"{m.folder}: tensor {hf} has no GGUF name for {m.arch}")
        fn: Callable[[np.ndarray], np.ndarray] = _identity
        if m.arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
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


def choose_quant(gname: str, shape: Sequence[int], quant: str, tied: bool) -> str:
    """Quant of the tensor ``gname`` in a file of ``quant``: 1-D tensors (norms, biases) stay f32; the output
    head (and the tied embedding that serves as it) keeps q8_0 under q4_0; rows that do not fill whole blocks
    fall back to a higher-precision quant (logged)."""
    import gguf

    if len(shape) < 2 or quant == "f32":
        return "f32"
    want = quant
    if want == "q4_0" and (gname == "output.weight" or (tied and gname == "token_embd.weight")):
        want = "q8_0"
    for q in (want, *_FALLBACK.get(want, ())):
        block = gguf.GGML_QUANT_SIZES[tensor_type(q)][0]
        if shape[-1] % block == 0:
            if q != want:
                log.info("gguf: %s %s: row size %d not a multiple of %s block %d, stored as %s", gname,
                         tuple(shape), shape[-1], want, gguf.GGML_QUANT_SIZES[tensor_type(want)][0], q)
            return q
    return "f32"


def quantize_tensor(data: np.ndarray, quant: str) -> np.ndarray:
    """Encode an fp32 array as ``quant`` (f32/f16 as float arrays, others as raw uint8 blocks)."""
    import gguf

    data = np.ascontiguousarray(data, dtype=np.float32)
    return gguf.quants.quantize(data, tensor_type(quant))


def _nbytes(shape: Sequence[int], quant: str) -> int:
    import gguf

    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, tensor_type(quant))))


def write_gguf(m: ModelSource, tok: TokenizerData, dst: str | os.PathLike, quant: str,
               name: str | None = None) -> Path:
    """Write one GGUF of ``quant`` (one of :data:`NATIVE_QUANTS`) to ``dst``, atomically, streaming
    one tensor at a time (peak memory is about one fp32 tensor, not the whole model)."""
    import gguf

    dst = Path(dst)
    tensor_type(quant)  # a native quant, or ValueError before anything is written
    w = gguf.GGUFWriter(path=None, arch=m.arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or m.folder.name)
    w.add_file_type(int(file_type(quant)))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope_freqs = _write_hparams(w, m)
    tok.write(w)

    tied = bool(m.config.get("tie_word_embeddings", False))
    plan = _tensor_plan(m)
    entries: list[tuple[str, str | None, Callable[[np.ndarray], np.ndarray], str]] = []
    if rope_freqs is not None:
        w.add_tensor_info("rope_freqs.weight", rope_freqs.shape, np.dtype(np.float32), rope_freqs.nbytes)
        entries.append(("rope_freqs.weight", None, lambda _x: rope_freqs, "f32"))
    counts: dict[str, int] = {}
    for gname, hf, fn in plan:
        shape = m.shapes[hf]
        q = choose_quant(gname, shape, quant, tied)
        counts[q] = counts.get(q, 0) + 1
        if q in ("f32", "f16"):
            dt = np.dtype(np.float32 if q == "f32" else np.float16)
            w.add_tensor_info(gname, shape, dt, int(np.prod(shape)) * dt.itemsize)
        else:
            w.add_tensor_info(gname, shape, np.dtype(np.float32), _nbytes(shape, q), raw_dtype=tensor_type(q))
        entries.append((gname, hf, fn, q))

    with atomic_open(dst, "wb") as fh:
        # The writer streams into our temporary file handle: open_output_file() accepts an
        # already-open output in state EMPTY, so no path of its own is ever created.
        w.fout = [fh]
        w.state = gguf.gguf_writer.WriterState.EMPTY
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, hf, fn, q in entries:
            data = fn(m.tensor(hf)) if hf is not None else fn(None)
            if tuple(data.shape) != tuple(m.shapes.get(hf, data.shape)):
                raise ValueError(f"{gname}: transformed shape {data.shape} != {m.shapes[hf]}")
            w.write_tensor_data(quantize_tensor(data, q))
        w.flush()
        w.fout = None  # atomic_open closes the handle
    log.info("gguf: wrote %s (%s, %d tensors: %s, %.1f MB)", dst, quant, len(entries),
             ", ".join(f"{k}={v}" for k, v in sorted(counts.items())), dst.stat().st_size / 1e6)
    return dst


def gguf_summary(path: str | os.PathLike) -> dict:
    """Small metadata summary of a GGUF (architecture, file type, tensor types, size)."""
    import gguf

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
    "SUPPORTED_ARCHITECTURES", "NATIVE_QUANTS", "KQUANTS", "GGUF_QUANTS", "DEFAULT_GGUF_QUANT", "tensor_type",
    "file_type", "export_gguf", "requantize_with_llamacpp", "MissingDependency", "read_model", "read_export_config",
    "permute_rope_rows", "choose_quant", "write_gguf", "gguf_summary", "ModelSource",
]
