"""Export a Hugging Face Llama / Qwen2 model folder to ONNX: a decoder with KV cache, fp32/fp16, plus int8.

One folder per quant (``out_dir/fp32``, ``out_dir/int8``, ...: :data:`ONNX_QUANTS`, default
:data:`DEFAULT_ONNX_QUANT`, the names of the recipe key ``export.onnx.quant``), each self-contained the way
onnxruntime-genai and optimum lay models out: ``model.onnx``, ``config.json``,
``generation_config.json`` and the training tokenizer files with its chat template. A chat template that
reaches Python internals is refused before anything is written (:func:`check_templates`), as for GGUF.

The graph is traced with ``torch.onnx.export`` (TorchScript path, ``dynamo=False``; optimum-onnx would
pin transformers < 5, see ../shared/STACK.md) around a small wrapper that takes and returns the KV
cache as flat tensors, with the names onnxruntime-genai / optimum use::

    inputs:  input_ids [batch, seq], attention_mask [batch, past + seq], position_ids [batch, seq],
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
    outputs: logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]

Prefill feeds empty past tensors (``past = 0``); every later step feeds the ``present`` tensors back.
Left padding works through ``attention_mask`` (0 = padding) with ``position_ids = cumsum(mask) - 1``.
``int8`` is onnxruntime's dynamic quantization (``quantize_dynamic``: int8 weights, activations
quantized per call) of the fp32 graph; ``fp16`` is the model cast to half precision before tracing
(meant for GPUs; onnxruntime's CPU provider runs it too, slowly).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from banklm.finetune.tokenizer import check_chat_template

from banklm.io import atomic_dir
from banklm.runtime import onnx_file_bytes

from .gguf import read_export_config

log = logging.getLogger(__name__)

#: Every ONNX quant (recipe ``export.onnx.quant``, ``banklm export --format onnx --quant``), and the default.
ONNX_QUANTS = ("fp32", "fp16", "int8")
DEFAULT_ONNX_QUANT = ("fp32", "int8")
#: Opsets the export supports (scaled_dot_product_attention needs >= 14), and the default.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 14, 21, 17
MODEL_FILE = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"  # weights of graphs over protobuf's 2 GB limit
_INLINE_LIMIT = 1_800_000_000
#: Files copied from the model folder next to ``model.onnx`` (those that exist).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
# Shapes of the example inputs the graph is traced with: a batch of 2, 3 new tokens after 4 cached ones, so
# that neither the batch nor the sequence dimensions can be specialised into constants.
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 4


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids",
            *[f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]]


def output_names(n_layers: int) -> list[str]:
    return ["logits", *[f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]]


def dynamic_axes(n_layers: int) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    for name in input_names(n_layers)[3:]:
        axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in output_names(n_layers)[1:]:
        axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    return axes


def read_config(model_dir: str | os.PathLike) -> dict:
    """``config.json`` of ``model_dir``; refuses architectures other than Llama / Qwen2."""
    return read_export_config(model_dir, "ONNX")


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def export_onnx(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    quant: Sequence[str] = DEFAULT_ONNX_QUANT,
    opset: int = DEFAULT_OPSET,
) -> list[Path]:
    """Export ``model_dir`` to one ONNX folder per quant (``out_dir/<quant>/model.onnx`` + side files).

    ``quant``: any of :data:`ONNX_QUANTS` (``fp32``, ``fp16``, ``int8``; int8 is quantized from an fp32 graph,
    which is traced into a temporary folder when ``fp32`` itself is not requested). Each folder is written
    atomically. Returns the folders in the order of ``quant``. Raises ``ValueError`` for an
    unsupported architecture or quant before writing anything.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    quant = [q.lower() for q in quant]
    unknown = [q for q in quant if q not in ONNX_QUANTS]
    if unknown or not quant:
        raise ValueError(f"export_onnx: unknown quant(s) {unknown or quant}; supported: {', '.join(ONNX_QUANTS)}")
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ValueError(f"export_onnx: opset {opset} outside the supported range {MIN_OPSET}-{MAX_OPSET} "
                         "(scaled_dot_product_attention needs >= 14)")
    read_config(model_dir)
    check_templates(model_dir)  # before tracing: refused up front, nothing written
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for q in dict.fromkeys(q for q in quant if q in ("fp32", "fp16")):
        written[q] = _export_float_folder(model_dir, out_dir / q, q, opset)
    if "int8" in quant:
        if "fp32" in written:
            written["int8"] = quantize_int8(written["fp32"], out_dir / "int8")
        else:
            with tempfile.TemporaryDirectory(prefix=".fp32-src-", dir=out_dir) as tmp:
                src = _export_float_folder(model_dir, Path(tmp) / "fp32", "fp32", opset)
                written["int8"] = quantize_int8(src, out_dir / "int8")
    return [written[q] for q in quant]


# --------------------------------------------------------------------------------------------------
# tracing
# --------------------------------------------------------------------------------------------------


def _kv_decoder(model):
    """Wrap a causal LM so the KV cache goes in and out as flat tensors (traceable by TorchScript)."""
    import torch
    from transformers import DynamicCache

    n_layers = model.config.num_hidden_layers

    class KVCacheDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.model.config)
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers[:n_layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return KVCacheDecoder().eval()


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _export_float_folder(model_dir: Path, dst: Path, quant: str, opset: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if quant == "fp32" else torch.float16
    t0 = time.perf_counter()
    # sdpa: the attention the model is evaluated with; its masks trace without data-dependent branches
    # when an attention_mask is given (transformers skips the "mask can be dropped" shortcut under tracing).
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True,
                                                 attn_implementation="sdpa").eval()
    cfg = model.config
    n_layers, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, _head_dim(cfg)
    g = torch.Generator().manual_seed(0)
    b, s, p = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).unsqueeze(0).expand(b, s).contiguous()
    past = [torch.randn(b, kv_heads, p, head_dim, generator=g).to(dtype) for _ in range(2 * n_layers)]
    with atomic_dir(dst) as tmp:
        trace = tmp / ".trace"  # torch writes graphs over 2 GB as one external file per tensor: regroup them
        trace.mkdir()
        with warnings.catch_warnings(), torch.no_grad():
            # TracerWarnings about shape-derived Python values: checked safe by the parity tests (prefill
            # with an empty cache, left padding, single-token decode steps all match PyTorch).
            warnings.simplefilter("ignore")
            torch.onnx.export(_kv_decoder(model), (ids, mask, pos, *past), str(trace / MODEL_FILE),
                              input_names=input_names(n_layers), output_names=output_names(n_layers),
                              dynamic_axes=dynamic_axes(n_layers), opset_version=int(opset),
                              do_constant_folding=True, dynamo=False)
        del model
        _resave(trace / MODEL_FILE, tmp / MODEL_FILE, {"banklm.type": quant, "banklm.architecture":
                                                       cfg.architectures[0], "banklm.opset": str(opset)})
        shutil.rmtree(trace)
        _copy_side_files(model_dir, tmp)
    log.info("onnx: wrote %s (%s, opset %d, %.1f MB, %.1f s)", dst / MODEL_FILE, quant, opset,
             onnx_file_bytes(dst / MODEL_FILE) / 1e6, time.perf_counter() - t0)
    return dst


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """int8 dynamic quantization of the fp32 folder ``src`` into the folder ``dst`` (written atomically):
    8-bit weights for every MatMul and the embedding Gather, activations quantized per call."""
    src, dst = Path(src), Path(dst)
    check_templates(src)  # its side files are copied into dst
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    with atomic_dir(dst) as tmp:
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "consider pre-processing" advice on every call
        try:
            quantize_dynamic(str(src / MODEL_FILE), str(tmp / MODEL_FILE), weight_type=QuantType.QInt8,
                             use_external_data_format=(src / EXTERNAL_DATA).is_file())
        finally:
            quiet.setLevel(level)
        _set_metadata(tmp / MODEL_FILE, {"banklm.type": "int8"})
        for f in src.iterdir():
            if f.name in SIDE_FILES:
                shutil.copyfile(f, tmp / f.name)
    log.info("onnx: wrote %s (int8, %.1f MB, %.1f s)", dst / MODEL_FILE, onnx_file_bytes(dst / MODEL_FILE) / 1e6,
             time.perf_counter() - t0)
    return dst


def _resave(src: Path, dst: Path, props: dict[str, str]) -> None:
    """Save the traced graph as ``model.onnx`` with ``props`` as metadata: weights inline, or in one
    ``model.onnx.data`` file beside it when they exceed protobuf's 2 GB limit (the optimum layout)."""
    import onnx

    m = onnx.load(str(src))  # with any external data torch wrote
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    if sum(len(t.raw_data) for t in m.graph.initializer) > _INLINE_LIMIT:
        onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA, size_threshold=1024)
    else:
        onnx.save_model(m, str(dst))


def _set_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    have = {p.key: p for p in m.metadata_props}
    for k, v in props.items():
        if k in have:
            have[k].value = v
        else:
            m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


def check_templates(folder: str | os.PathLike) -> None:
    """Refuse a folder whose chat template reaches Python internals (``banklm.finetune.tokenizer.UnsafeTemplate``,
    naming the file): the ONNX folders ship ``chat_template.jinja`` and ``tokenizer_config.json`` to runtimes
    that render the template, not all in a sandbox. Both files are checked, since a runtime may read either."""

    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        check_chat_template(_read_text(jinja), jinja)
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(_read_text(cfg_path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
        check_chat_template(cfg.get("chat_template"), cfg_path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def _copy_side_files(model_dir: Path, dst: Path) -> None:
    """The tokenizer files and chat template next to the graph (callers ran :func:`check_templates` first)."""
    for name in SIDE_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, dst / name)
    if not any((dst / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        raise ValueError(f"{model_dir}: no tokenizer.model or tokenizer.json to ship with the ONNX model")


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """``metadata_props`` of an ONNX file (``banklm.type`` etc.), without loading weights."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


__all__ = ["ONNX_QUANTS", "DEFAULT_ONNX_QUANT", "MIN_OPSET", "MAX_OPSET", "DEFAULT_OPSET", "MODEL_FILE", "export_onnx", "read_config", "check_templates",
           "input_names", "output_names", "onnx_metadata",
           "quantize_int8", "EXTERNAL_DATA"]
