"""Student initialisation: a smaller local model, a tiny model from a config, or the teacher cut down.

Cutting the teacher down needs no second base model: keep ``m`` of its ``n`` decoder layers (evenly
spaced, always the first and the last: they map embeddings into and out of the residual stream, and
dropping them hurts most), copy embeddings, final norm and LM head, and optionally keep only the most
important MLP neurons (``intermediate_size``), ranked by ``|up_proj row| * |down_proj column|`` (how much
a neuron can write into the residual stream). Attention heads are kept whole. Works for Llama-style
decoders (Llama, Qwen2, Mistral: ``model.layers.N.{self_attn,mlp,...}``).

Every student is a normal model folder (safetensors, the teacher's tokenizer files and chat template,
``generation_config.json`` stopping at ``<|im_end|>``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from banklm.finetune.models import (
    build_tiny_model,
    resolve_dtype,
    save_model_folder,
    set_generation_config,
    validate_model_folder,
)
from banklm.finetune.tokenizer import load_tokenizer

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def pick_layers(num_layers: int, every: int = 2, keep: list[int] | None = None) -> list[int]:
    """The teacher layers a student keeps: ``keep`` as given, else ``ceil(n / every)`` layers evenly spaced
    from the first to the last (``n=4, every=2`` -> ``[0, 3]``; ``n=24, every=2`` -> 12 layers)."""
    if keep is not None:
        bad = [i for i in keep if not 0 <= i < num_layers]
        if bad or not keep or len(set(keep)) != len(keep):
            raise ValueError(f"layers {keep}: need distinct indices in 0..{num_layers - 1}")
        return sorted(keep)
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    m = max(1, -(-num_layers // every))
    if m == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (m - 1)) for i in range(m)})


def _load_state_dict(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def student_from_teacher_layers(teacher_dir: str | os.PathLike, out_dir: str | os.PathLike, *, every: int = 2,
                                layers: list[int] | None = None, intermediate_size: int | None = None,
                                dtype: str | None = None) -> dict:
    """Write a student made of some of the teacher's layers (see the module docstring) into ``out_dir``.

    Returns ``{"layers": kept teacher layer indices, "num_layers", "intermediate_size", "parameters"}``.
    The student's kept tensors are copies of the teacher's (narrowed MLPs: the chosen neurons' slices).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    validate_model_folder(teacher_dir)
    config = AutoConfig.from_pretrained(str(teacher_dir))
    n = int(config.num_hidden_layers)
    kept = pick_layers(n, every, layers)
    full_ffn = int(config.intermediate_size)
    ffn = full_ffn if intermediate_size is None else int(intermediate_size)
    if not 1 <= ffn <= full_ffn:
        raise ValueError(f"intermediate_size {ffn}: must be between 1 and the teacher's {full_ffn}")

    config.num_hidden_layers = len(kept)
    config.intermediate_size = ffn
    for attr in ("layer_types",):  # per-layer lists (sliding/full attention) follow the kept layers
        val = getattr(config, attr, None)
        if isinstance(val, list) and len(val) == n:
            setattr(config, attr, [val[i] for i in kept])
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(int(config.max_window_layers), len(kept))

    teacher_state = _load_state_dict(teacher_dir)
    state = {}
    for name, tensor in teacher_state.items():
        m = _LAYER_RE.match(name)
        if m is None:
            state[name] = tensor
            continue
        i = int(m.group(1))
        if i in kept:
            state[f"model.layers.{kept.index(i)}.{m.group(2)}"] = tensor
    if ffn < full_ffn:
        for j in range(len(kept)):
            _narrow_mlp(state, f"model.layers.{j}.mlp", ffn)

    src_dtype = next(iter(teacher_state.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=src_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{teacher_dir}: cannot map the teacher's weights onto the student "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}); "
                         "layer dropping supports Llama-style decoders (model.layers.N.*)")
    model.tie_weights()
    if dtype:

        model = model.to(resolve_dtype(dtype, "cpu"))
    set_generation_config(model, load_tokenizer(teacher_dir))
    save_model_folder(model, out_dir, teacher_dir)
    return {"from": "teacher_layers", "layers": kept, "num_layers": len(kept), "teacher_layers": n,
            "intermediate_size": ffn, "parameters": sum(p.numel() for p in model.parameters())}


def _narrow_mlp(state: dict, prefix: str, width: int) -> None:
    """Keep the ``width`` MLP neurons with the largest ``|up row| * |down column|`` (in their original order)."""
    import torch

    up, gate, down = (state[f"{prefix}.{p}_proj.weight"] for p in ("up", "gate", "down"))
    score = up.float().norm(dim=1) * down.float().norm(dim=0)
    keep = torch.topk(score, width).indices.sort().values
    state[f"{prefix}.up_proj.weight"] = up[keep].clone()
    state[f"{prefix}.gate_proj.weight"] = gate[keep].clone()
    state[f"{prefix}.down_proj.weight"] = down[:, keep].clone()
    for p in ("up", "gate"):
        bias = state.get(f"{prefix}.{p}_proj.bias")
        if bias is not None:
            state[f"{prefix}.{p}_proj.bias"] = bias[keep].clone()


def student_from_path(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
    """A smaller local model folder as the student's starting point (used in place, not copied)."""
    path = validate_model_folder(Path(path).expanduser(), allow_pickle=allow_pickle)
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return {"from": "path", "path": str(path), "num_layers": cfg.get("num_hidden_layers"),
            "intermediate_size": cfg.get("intermediate_size")}


def student_from_config(teacher_dir: str | os.PathLike, out_dir: str | os.PathLike, *, arch: str = "llama",
                        seed: int = 0, **sizes) -> dict:
    """A randomly initialised model of the given sizes with the teacher's tokenizer (same vocabulary)."""
    build_tiny_model(arch, teacher_dir, out_dir, seed=seed, **sizes)
    return {"from": "build", "arch": arch, **sizes}
