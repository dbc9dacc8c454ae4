"""Merge a PEFT (LoRA/QLoRA/DoRA) adapter into its base and write a standalone model folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .models import load_model, resolve_dtype, save_model_folder, set_generation_config
from .tokenizer import load_tokenizer


def merge_adapter(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: Any = "auto",
    *,
    dequantize_from: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Load ``base_dir`` at full precision, apply ``adapter_dir``, merge, and save to ``out_dir`` atomically.

    ``dtype``: ``"auto"`` keeps the base's stored dtype (``config.json`` ``dtype``/``torch_dtype``; fp32
    if unknown), or ``fp32``/``bf16``/``fp16``. Merging runs on CPU in fp32, then casts.

    ``dequantize_from``: for a QLoRA adapter pass ``"4bit"`` (or ``"8bit"``): the base is loaded
    quantized exactly as in training and de-quantized to fp32 before merging, so the merged model
    computes what the trained (quantized base + adapter) model computed, without 4-bit kernels.
    Tokenizer files come from the adapter folder when present, else from the base.
    """
    import torch
    from peft import PeftModel

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    if not any(adapter_dir.glob("adapter_model*.safetensors")):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors")
    target_dtype = _target_dtype(base_dir, dtype)

    if dequantize_from:
        base = load_model(base_dir, device="cpu", quantization=dequantize_from, trust_remote_code=trust_remote_code)
        base = base.dequantize()
        base = base.to(torch.float32)
        # the de-quantized model keeps a quantization_config in its config; drop it so the saved folder is plain
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(base.config, attr):
                delattr(base.config, attr)
        base.is_quantized = False
        if hasattr(base, "hf_quantizer"):
            base.hf_quantizer = None
    else:
        base = load_model(base_dir, device="cpu", dtype=torch.float32, trust_remote_code=trust_remote_code)

    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    merged = model.merge_and_unload(safe_merge=True)
    merged = merged.to(target_dtype)
    merged.config.use_cache = True

    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    set_generation_config(merged, load_tokenizer(tok_src))
    return save_model_folder(merged, out_dir, tok_src)


def _target_dtype(base_dir: Path, dtype: Any):
    import torch

    if dtype not in (None, "auto"):
        return resolve_dtype(dtype, "cpu")
    try:
        cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    try:
        return resolve_dtype(str(name).replace("torch.", ""), "cpu")
    except ValueError:
        return torch.float32
