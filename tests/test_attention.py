"""finetune.attention: a flat row of several examples attends within each example, exactly as each alone."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from banklm.finetune.attention import EAGER_MAX_ROW, NAME, register, varlen_attention  # noqa: E402
from banklm.finetune.sft import PackedRowsCollator  # noqa: E402

LENGTHS = [5, 17, 1, 40, 9]


class _Attn(torch.nn.Module):
    """What the attention interface reads off the calling module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _qkv(lengths, heads=4, kv_heads=2, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(1, heads, t, dim, generator=g, dtype=torch.float32)
    k = torch.randn(1, kv_heads, t, dim, generator=g, dtype=torch.float32)
    v = torch.randn(1, kv_heads, t, dim, generator=g, dtype=torch.float32)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def _reference(q, k, v, lengths):
    """Each example on its own: fp32 causal attention, output [1, tokens, heads, dim]."""
    groups = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[:, :, start:start + n].float() for x in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


def _kwargs(lengths):
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}


@pytest.mark.parametrize("dtype,lengths,tol", [
    (torch.float32, LENGTHS, 1e-5),                    # sdpa on the padded examples
    (torch.bfloat16, LENGTHS, 3e-2),                   # eager (CPU, bf16, short rows)
    (torch.bfloat16, [EAGER_MAX_ROW + 20, 7], 3e-2),   # sdpa again: a long example
])
def test_varlen_attention_equals_each_example_alone(dtype, lengths, tol):
    q, k, v = _qkv(lengths, dtype=dtype)
    module = _Attn(groups=2)
    out, weights = varlen_attention(module, q, k, v, None, scaling=q.shape[-1] ** -0.5, **_kwargs(lengths))
    assert weights is None and out.shape == (1, sum(lengths), 4, 16) and out.dtype == dtype
    ref = _reference(q, k, v, lengths)
    assert (out.float() - ref).abs().max().item() < tol
    # gradients flow back to every real token exactly as through the examples alone
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        assert (a.float() - b.float()).abs().max().item() < tol * 4


def test_varlen_attention_without_boundaries_is_sdpa():
    """Generation, masked batches, anything without cu_seq_lens: plain sdpa, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv([12])
    module = _Attn(groups=2)
    out, _ = varlen_attention(module, q, k, v, None, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    assert torch.equal(out, ref)


def test_sliding_window_shorter_than_an_example_is_refused():
    q, k, v = _qkv([30, 10])
    with pytest.raises(ValueError, match="sliding window"):
        varlen_attention(_Attn(2), q, k, v, None, sliding_window=16, **_kwargs([30, 10]))


def _tiny(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, attn_implementation="sdpa")
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common)).eval()  # GQA


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_flat_batch_through_the_model_equals_examples_alone(arch, tmp_path):
    """The ``unpadded`` layout end to end: the collator's flat row through a model set to banklm's varlen
    attention gives every example its logits alone and the same loss; generation is untouched; the saved
    config does not name the kernel (other processes and exporters could not load it)."""
    model = _tiny(arch)
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in LENGTHS[:4] + [3]:
        ids = torch.randint(4, 97, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    batch = PackedRowsCollator(pad_token_id=0, flat=True)(examples)
    assert batch["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    assert batch["cu_seq_lens_q"].tolist() == [0, *torch.tensor([len(e["input_ids"]) for e in examples]).cumsum(0)]
    with torch.no_grad():
        alone = [model(torch.tensor([e["input_ids"]])).logits[0] for e in examples]
        padded_loss = model(**PackedRowsCollator(pad_token_id=0)(examples)).loss
        model.set_attn_implementation(register())
        out = model(**batch)
    start = 0
    for e, ref in zip(examples, alone, strict=True):
        n = len(e["input_ids"])
        assert torch.allclose(out.logits[0, start:start + n], ref, atol=1e-5)
        start += n
    assert out.loss.item() == pytest.approx(padded_loss.item(), abs=1e-5)

    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # left-padded generation
    mask = (prompts != 0).long()
    with torch.no_grad():
        got = model.generate(prompts, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        model.set_attn_implementation("sdpa")
        want = model.generate(prompts, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)

    model.set_attn_implementation(NAME)
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["architectures"]


def test_short_examples_under_bf16_autocast_take_the_eager_kernel(monkeypatch):
    """A full fine-tune keeps an fp32 residual stream, so under bf16 autocast the rotated q/k reach attention
    in fp32: the kernel choice follows autocast too (sdpa's CPU flash kernel is the slow one for short rows)."""
    import transformers.integrations.sdpa_attention as sdpa

    def no_sdpa(*args, **kwargs):
        raise AssertionError("sdpa was called for short rows under bf16 autocast")

    q, k, v = _qkv(LENGTHS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(sdpa, "sdpa_attention_forward", no_sdpa)
        out, _ = varlen_attention(_Attn(groups=2), q, k, v, None, scaling=q.shape[-1] ** -0.5, **_kwargs(LENGTHS))
    assert (out.float() - _reference(q, k, v, LENGTHS)).abs().max().item() < 3e-2
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="sdpa was called"):  # the check itself bites: fp32, no autocast
        monkeypatch.setattr(sdpa, "sdpa_attention_forward", no_sdpa)
        varlen_attention(_Attn(groups=2), q, k, v, None, **_kwargs(LENGTHS))
