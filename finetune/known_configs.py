"""The ``config.json`` shape values of real base models, bundled so ``banklm plan`` works offline.

Values are the published Hugging Face ``config.json`` fields (hidden_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings); the
``-Instruct`` variants share their base model's shape. ``lookup`` matches a name or a model folder's
basename loosely: ``/models/Qwen2.5-1.5B-Instruct``, ``qwen2.5-1.5b`` and ``Qwen2.5-1.5B`` are the same.
"""

from __future__ import annotations

import re

KNOWN_CONFIGS: dict[str, dict] = {
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                     "tie_word_embeddings": True, "max_position_embeddings": 32768},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
                     "tie_word_embeddings": True, "max_position_embeddings": 32768},
    "qwen2.5-3b": {"model_type": "qwen2", "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                   "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936,
                   "tie_word_embeddings": True, "max_position_embeddings": 32768},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "tie_word_embeddings": False, "max_position_embeddings": 32768},
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256, "head_dim": 64,
                     "tie_word_embeddings": True, "max_position_embeddings": 131072},
    "llama-3.2-3b": {"model_type": "llama", "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
                     "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256, "head_dim": 128,
                     "tie_word_embeddings": True, "max_position_embeddings": 131072},
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "head_dim": 128,
                     "tie_word_embeddings": False, "max_position_embeddings": 131072},
    "mistral-7b-v0.3": {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                        "vocab_size": 32768, "tie_word_embeddings": False, "max_position_embeddings": 32768},
}

_SUFFIXES = ("-instruct", "-chat", "-hf", "-base")


def _key(name: str) -> str:
    name = name.strip().rstrip("/").split("/")[-1].lower()
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name, changed = name[: -len(suffix)], True
    name = name.removeprefix("meta-")
    return re.sub(r"[^a-z0-9.]", "", name)


_BY_KEY = {_key(k): k for k in KNOWN_CONFIGS}


def lookup(name: str) -> str | None:
    """The bundled config name matching ``name`` (a name or a folder path), or None."""
    return _BY_KEY.get(_key(name))


def known_config(name: str) -> dict:
    """A copy of the bundled ``config.json`` fields for ``name``; KeyError listing the known names."""
    key = lookup(name)
    if key is None:
        raise KeyError(f"no bundled config for {name!r} (known: {', '.join(KNOWN_CONFIGS)})")
    return {"_name": key, **KNOWN_CONFIGS[key]}
