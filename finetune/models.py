"""Devices, dtypes, building tiny from-scratch models, and loading/saving model folders safely.

Model folders follow docs/ARCHITECTURE.md: HF ``save_pretrained`` layout, safetensors only, tokenizer
files copied in, ``generation_config.json`` whose ``eos_token_id`` lists ``<|im_end|>`` (and ``</s>``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from banklm.io import atomic_dir

from .tokenizer import EOS, IM_END, PAD, copy_tokenizer_files, load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class ModelFolderError(ValueError):
    """A model folder is missing or unusable (message names the folder and the problem)."""


# --------------------------------------------------------------------------- devices and dtypes


def pick_device(pref: str = "auto") -> str:
    """``"auto"`` -> ``cuda`` if available, else ``mps``, else ``cpu``. Explicit choices are validated."""
    import torch

    pref = (pref or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    base = pref.split(":")[0]
    if base == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {pref!r} requested but CUDA is not available")
    if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {pref!r} requested but MPS is not available")
    if base not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device {pref!r} (expected auto, cuda[:N], mps or cpu)")
    return pref


def pick_dtype(device: str):
    """bf16 on CUDA when supported, else fp16 on CUDA; fp16 on MPS; fp32 on CPU."""
    import torch

    base = device.split(":")[0]
    if base == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if base == "mps":
        return torch.float16
    return torch.float32


def resolve_dtype(dtype: Any, device: str):
    """``"auto"``/None -> :func:`pick_dtype`; strings ``bf16``/``bfloat16``/``fp16``/``float16``/``fp32``/``float32``."""
    import torch

    if dtype is None or dtype == "auto":
        return pick_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (expected auto, bf16, fp16 or fp32)") from None


def pick_attn_implementation(device: str) -> str:
    """``flash_attention_2`` on CUDA when the ``flash_attn`` package is installed, else ``sdpa``."""
    if device.split(":")[0] == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# --------------------------------------------------------------------------- tiny models


def build_tiny_model(
    arch: str,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    intermediate_size: int = 768,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = True,
    rope_theta: float = 10000.0,
    seed: int = 0,
) -> Path:
    """Build a randomly initialised (seeded) ``llama`` or ``qwen2`` model sized for the tokenizer.

    Writes ``out_dir`` atomically: ``config.json``, ``model.safetensors``, tokenizer files and
    ``generation_config.json`` (eos ``[<|im_end|>, </s>]``, pad ``<pad>``). Returns ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} / num_kv_heads {num_kv_heads} "
                         "must divide evenly")
    tok = load_tokenizer(tokenizer_dir)
    vocab = len(tok)
    special = _special_ids(tok)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=special["bos"],
        eos_token_id=special["eos"][0],
        pad_token_id=special["pad"],
        rms_norm_eps=1e-6,
        use_cache=True,
    )
    if arch == "llama":
        config = LlamaConfig(**common, rope_theta=rope_theta)
    elif arch == "qwen2":
        config = Qwen2Config(**common, rope_theta=rope_theta, use_sliding_window=False)
    else:
        raise ValueError(f"unknown arch {arch!r} (expected 'llama' or 'qwen2')")
    if getattr(config, "rope_parameters", None) is not None:  # transformers 5 keeps rope_theta here
        config.rope_parameters = {**config.rope_parameters, "rope_type": "default", "rope_theta": rope_theta}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    set_generation_config(model, tok)
    return save_model_folder(model, out_dir, tokenizer_dir)


def _special_ids(tok) -> dict:
    """bos/pad ids and generation eos ids (``<|im_end|>`` first, then ``</s>``) of a tokenizer."""
    vocab = tok.get_vocab()
    eos = []
    for t in (IM_END, tok.eos_token, EOS):
        if t is not None and t in vocab and vocab[t] not in eos:
            eos.append(vocab[t])
    pad = tok.pad_token_id
    if pad is None:
        pad = vocab.get(PAD)
    return {"bos": tok.bos_token_id, "eos": eos, "pad": pad}


def set_generation_config(model, tok) -> None:
    """Make ``generate`` stop at ``<|im_end|>`` (and ``</s>``), pad with the tokenizer's pad id."""
    ids = _special_ids(tok)
    gc = model.generation_config
    if ids["eos"]:
        gc.eos_token_id = ids["eos"] if len(ids["eos"]) > 1 else ids["eos"][0]
    if ids["pad"] is not None:
        gc.pad_token_id = ids["pad"]
    if ids["bos"] is not None:
        gc.bos_token_id = ids["bos"]
    gc.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc, k):
            setattr(gc, k, None)


def save_model_folder(model, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None,
                      tokenizer=None) -> Path:
    """Atomically write ``model`` (safetensors) + tokenizer files + generation config into ``out_dir``.

    Tokenizer files are copied verbatim from ``tokenizer_dir`` (our SentencePiece folders keep their
    ``tokenizer.model``); when only a tokenizer object is given it is ``save_pretrained``-ed.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for bad in tmp.glob("*.bin"):
            bad.unlink()
    return out_dir


# --------------------------------------------------------------------------- loading


def validate_model_folder(folder: str | os.PathLike, *, allow_pickle: bool = False,
                          require_tokenizer: bool = True) -> Path:
    """Check that ``folder`` is a loadable model folder; raise :class:`ModelFolderError` saying why not."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder not found")
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelFolderError(f"{folder}/config.json: invalid JSON ({e})") from None
    has_st = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if not has_st:
        if pickles and not allow_pickle:
            raise ModelFolderError(
                f"{folder}: only pickled weights ({', '.join(pickles[:3])}); loading a pickle can execute "
                "arbitrary code, so banklm refuses it. Convert the checkpoint to safetensors, or pass "
                "allow_pickle=True if you trust its source.")
        if not pickles:
            raise ModelFolderError(f"{folder}: no weights (*.safetensors) found")
    if require_tokenizer and not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise ModelFolderError(
            f"{folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    return folder


def check_model_folder(folder: str | os.PathLike, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                       need_chat_template: bool = True) -> dict:
    """Check a base model folder without loading its weights, before any stage uses it.

    Raises :class:`ModelFolderError` naming the folder and the problem: not a model folder, pickled
    weights only (unless ``allow_pickle``), a truncated or corrupt safetensors file, weights that do not
    match ``config.json`` (missing, extra or differently shaped tensors: transformers would silently
    re-initialise missing ones), no tokenizer, a tokenizer without a chat template (SFT and evaluation
    render every prompt with it), or a chat template that reaches for Python internals. Cheap even for
    a 7B base: reads safetensors headers and builds the model on the ``meta`` device.
    Returns ``{"pickled": bool, "tensors": int}``.
    """

    folder = validate_model_folder(folder, allow_pickle=allow_pickle)
    pickled = not any(folder.glob("*.safetensors"))
    header_shapes = {} if pickled else safetensors_shapes(folder)
    if header_shapes:
        _check_against_config(folder, header_shapes, trust_remote_code)
    try:
        tok = load_tokenizer(folder)
    except ValueError as e:  # an unsafe chat template
        raise ModelFolderError(str(e)) from None
    except Exception as e:  # noqa: BLE001 (any tokenizer that does not load is a folder problem)
        raise ModelFolderError(f"{folder}: the tokenizer does not load ({type(e).__name__}: {e})") from None
    if need_chat_template and not tok.chat_template:
        raise ModelFolderError(f"{folder}: the tokenizer has no chat template (training and evaluation render "
                               "prompts with it); add chat_template to tokenizer_config.json or a "
                               "chat_template.jinja file")
    return {"pickled": pickled, "tensors": len(header_shapes)}


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from every ``*.safetensors`` header of ``folder``, checking each file is whole.

    A file is complete when its 8-byte header length, the JSON header and the last tensor's end offset
    account for exactly the file's size; shards named by ``model.safetensors.index.json`` must exist.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as e:
            raise ModelFolderError(f"{index}: not a valid safetensors index ({e})") from None
        missing = sorted(n for n in shards if not (folder / n).is_file())
        if missing:
            raise ModelFolderError(f"{folder}: weight shard {missing[0]} listed in {index.name} is missing "
                                   f"({len(missing)} of {len(shards)} missing)")
    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise ModelFolderError(f"{f}: truncated or not a safetensors file ({size} bytes; the header "
                                       "alone needs more): re-copy or re-download it")
            try:
                header = json.loads(fh.read(n))
            except ValueError:
                raise ModelFolderError(f"{f}: corrupt safetensors header (not JSON)") from None
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        need = 8 + n + max(ends, default=0)
        if need != size:
            raise ModelFolderError(f"{f}: truncated: its tensors need {need} bytes, the file has {size} "
                                   "(an interrupted copy or download?)")
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def _check_against_config(folder: Path, have: dict[str, tuple[int, ...]], trust_remote_code: bool) -> None:
    """The tensors config.json describes (built on the meta device) against the checkpoint's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelFolderError(f"{folder}/config.json: cannot build the model it describes "
                               f"({type(e).__name__}: {e})") from None
    groups: dict[int, list[str]] = {}
    expected: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
        expected[name] = tuple(param.shape)
    persistent = {n for n, _ in model.named_buffers()} - {
        f"{m}.{b}".lstrip(".") for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    expected.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in persistent})
    if not set(expected) & set(have):
        return  # another naming scheme (transformers converts some checkpoints on load): load_model checks
    missing = [n for names in groups.values() if not any(x in have for x in names) for n in names[:1]]
    missing += [n for n in expected if n in persistent and n not in have]
    extra = sorted(set(have) - set(expected))
    shaped = sorted(n for n in set(have) & set(expected) if have[n] != expected[n])
    if shaped:
        n = shaped[0]
        raise ModelFolderError(f"{folder}: weights do not match config.json: {n} has shape {list(have[n])} in "
                               f"the checkpoint but {list(expected[n])} in the config ({len(shaped)} tensors differ)")
    if missing:
        raise ModelFolderError(f"{folder}: weights do not match config.json: {sorted(missing)[0]} is missing from "
                               f"the checkpoint ({len(missing)} tensors missing; they would be randomly initialised)")
    if extra:
        raise ModelFolderError(f"{folder}: weights do not match config.json: the checkpoint has {extra[0]}, which "
                               f"the config does not describe ({len(extra)} extra tensors)")


def load_model(
    folder: str | os.PathLike,
    device: str = "auto",
    dtype: Any = "auto",
    quantization: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
    require_tokenizer: bool = True,
):
    """Load a causal LM from a validated local folder (safetensors only unless ``allow_pickle``).

    ``quantization``: None, ``"4bit"`` (bitsandbytes NF4, double quant, bf16 compute) or ``"8bit"``.
    bitsandbytes 0.50 runs both on CPU. Returns the model in eval mode; load the tokenizer with
    :func:`banklm.finetune.tokenizer.load_tokenizer` (or use :func:`load_model_and_tokenizer`).
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    folder = validate_model_folder(folder, allow_pickle=allow_pickle, require_tokenizer=require_tokenizer)
    device = pick_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    has_st = any(folder.glob("*.safetensors"))
    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype,
        use_safetensors=has_st,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation or pick_attn_implementation(device),
    )
    if quantization:
        kwargs["quantization_config"] = bnb_config(quantization, device)
        kwargs["device_map"] = {"": 0 if device == "cuda" else device}
        if device == "cpu":
            kwargs["dtype"] = torch.float32 if dtype in (None, "auto") else torch_dtype
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except ImportError as e:
        if quantization:
            raise ModelFolderError(f"quantization={quantization!r} needs bitsandbytes: {e}") from e
        raise
    except (OSError, RuntimeError, SafetensorError) as e:  # truncated file, size mismatch
        raise ModelFolderError(f"{folder}: the weights do not load ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:300]})") from None
    for kind, what in (("missing_keys", "missing from the checkpoint (would be randomly initialised)"),
                       ("unexpected_keys", "in the checkpoint but not in config.json"),
                       ("mismatched_keys", "shaped differently in the checkpoint and config.json")):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            raise ModelFolderError(f"{folder}: weights do not match config.json: {keys[0]} is {what} "
                                   f"({len(keys)} tensors)")
    if not quantization:
        model.to(device)
    model.eval()
    return model


def convert_pickled_model(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                          trust_remote_code: bool = False) -> Path:
    """Load a folder of pickled weights once (``torch.load(weights_only=True)`` through transformers) and write
    it as a safetensors model folder (same dtype, tokenizer files copied), so nothing later unpickles.

    Only for checkpoints the user trusts (the recipe's ``allow_pickle``): the caller states the risk.
    """
    from transformers import AutoModelForCausalLM

    src = validate_model_folder(src, allow_pickle=True)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto", use_safetensors=False,
                                                 trust_remote_code=trust_remote_code)
    return save_model_folder(model, out_dir, src)


def load_model_and_tokenizer(folder, **kwargs):
    """:func:`load_model` plus :func:`banklm.finetune.tokenizer.load_tokenizer` of the same folder."""
    model = load_model(folder, **kwargs)
    return model, load_tokenizer(folder)


def bnb_config(quantization: str, device: str = "cpu"):
    """BitsAndBytesConfig for ``"4bit"`` (NF4, double quant, bf16 compute; fp16 on old GPUs) or ``"8bit"``."""
    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelFolderError(f"quantization={quantization!r} needs the bitsandbytes package (not installed)")
    if device.split(":")[0] == "mps":
        raise ModelFolderError("bitsandbytes quantization is not supported on MPS; use method=lora or full")
    if quantization in ("4bit", "nf4", "qlora"):
        compute = torch.bfloat16
        if device.split(":")[0] == "cuda" and not torch.cuda.is_bf16_supported():
            compute = torch.float16
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    if quantization in ("8bit", "int8"):
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantization!r} (expected None, '4bit' or '8bit')")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted at their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n = int(getattr(p, "quant_state", None).shape.numel()) if getattr(p, "quant_state", None) else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
