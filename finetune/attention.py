"""Attention within each example of a flattened batch, for sdpa/eager (flash-attention 2 has its own).

A batch of examples concatenated into one row (``[1, tokens]``, position ids restarting per example, the
example boundaries in ``cu_seq_lens_q`` as TRL's padding-free collator and
:class:`banklm.finetune.sft.PackedRowsCollator` give them) lets every linear layer, norm and the LM head run on
real tokens only. Only attention needs the examples apart: :func:`varlen_attention` scatters queries, keys
and values into ``[examples, heads, longest, dim]``, runs plain causal attention (no mask: right padding
is never attended by a causal token) and gathers the real tokens back. Padding is paid in attention alone.

Registered with transformers as ``"banklm_varlen"`` (:func:`register`). Every call without example
boundaries (generation, batches with an attention mask, a KV cache) is plain sdpa, so a model set to it
still generates and evaluates as before.
"""

from __future__ import annotations

import functools

NAME = "banklm_varlen"
EAGER_MAX_ROW = 256  # CPU, bf16: eager attention beats sdpa's flash kernel up to rows of this length


def prefers_eager(device_type: str, bf16: bool, longest: int) -> bool:
    """Eager attention (matmul + softmax) over sdpa: on CPU in bf16 for rows of at most
    :data:`EAGER_MAX_ROW` tokens. Measured (fwd + bwd, 4 heads of 64, 4,096 tokens): sdpa's CPU flash
    kernel in bf16 takes 1.7x eager's time at 128 tokens, the same at 256, and wins from 512 on (3-4x at
    1-2k tokens, where eager's L x L scores also cost memory)."""
    return device_type == "cpu" and bf16 and longest <= EAGER_MAX_ROW


def _pad_index(cu_seq_lens, longest: int, tokens: int):
    """Where each of the ``tokens`` flat tokens goes in the padded ``[examples * longest]`` layout."""
    import torch

    lengths = cu_seq_lens.diff()
    n = lengths.numel()
    starts = torch.repeat_interleave(cu_seq_lens[:-1], lengths, output_size=tokens)
    rows = torch.repeat_interleave(torch.arange(n, device=cu_seq_lens.device) * longest, lengths, output_size=tokens)
    return torch.arange(tokens, device=cu_seq_lens.device) - starts + rows, n


def _causal_attention(module, q, k, v, scaling, dropout: float):
    """Causal attention on padded ``[n, heads, longest, dim]`` tensors, output ``[n, longest, heads, dim]``:
    eager where :func:`prefers_eager`, sdpa otherwise."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    longest = q.shape[2]
    # bf16: the tensors' dtype, or autocast's (a full fine-tune's fp32 residual stream makes the rotated q/k fp32)
    bf16 = q.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu") and
                                         torch.get_autocast_dtype("cpu") == torch.bfloat16)
    if prefers_eager(q.device.type, bf16, longest):
        groups = getattr(module, "num_key_value_groups", 1)
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        scores = torch.matmul(q, k.transpose(2, 3)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
        future = torch.ones(longest, longest, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
        return torch.matmul(probs, v).transpose(1, 2)
    out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)
    return out


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers attention interface: ``query`` ``[1, heads, tokens, dim]`` holding several examples
    (``cu_seq_lens_q``) attends within each one; anything else goes to sdpa unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    tokens = query.shape[2]
    if cu is None or attention_mask is not None or query.shape[0] != 1 or key.shape[2] != tokens:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    longest = int(kwargs.get("max_length_q") or cu.diff().max())
    window = kwargs.get("sliding_window")
    if window is not None and longest > window:
        raise ValueError(f"an example of {longest} tokens exceeds the model's sliding window ({window}); "
                         "banklm's varlen attention does not apply windows: set train.packing: false")
    index, n = _pad_index(cu.to(query.device, non_blocking=True), longest, tokens)

    def pad(x):  # [1, heads, tokens, dim] -> [n, heads, longest, dim]
        flat = x[0].transpose(0, 1)
        out = flat.new_zeros(n * longest, *flat.shape[1:]).index_copy(0, index, flat)
        return out.view(n, longest, *flat.shape[1:]).transpose(1, 2)

    out = _causal_attention(module, pad(query), pad(key), pad(value), scaling, dropout)
    out = out.reshape(n * longest, *out.shape[2:]).index_select(0, index)
    return out.unsqueeze(0), None


def varlen_mask(*args, attention_mask=None, **kwargs):
    """Mask interface for :data:`NAME`: no mask when the batch has none (causality is the kernel's), else
    sdpa's (generation with left padding)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


@functools.cache
def register() -> str:
    """Make :data:`NAME` a valid ``attn_implementation`` in this process; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, varlen_mask)
    return NAME
