"""finetune.merge: a QLoRA adapter merged into the de-quantized 4-bit base (CPU, tiny model, seconds)."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from banklm.finetune.merge import merge_adapter  # noqa: E402
from banklm.finetune.models import build_tiny_model, load_model  # noqa: E402
from banklm.finetune.tokenizer import train_tokenizer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.export_models import texts  # noqa: E402

TARGETS = ("q_proj", "v_proj", "down_proj")
R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A tiny Llama and a LoRA adapter on it with random (non-zero) A and B, as a QLoRA run would save."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("merge")
    tok = train_tokenizer(texts(600), root / "tok", vocab_size=600)
    base = build_tiny_model("llama", tok, root / "base", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=128, max_position_embeddings=128, seed=0)
    model = get_peft_model(load_model(base, device="cpu"),
                           LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # B starts at zero: give the delta a size comparable to the weights
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(root / "adapter"))
    return base, root / "adapter"


def _weights(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _lora_deltas(adapter) -> dict:
    """``{module name: scaling * B @ A}`` computed by hand from the saved adapter tensors."""
    t = _weights(adapter)
    out = {}
    for key, a in t.items():
        if key.endswith("lora_A.weight"):
            mod = key[len("base_model.model."):-len(".lora_A.weight")]
            out[mod] = (ALPHA / R) * (t[key.replace("lora_A", "lora_B")].float() @ a.float())
    return out


def test_qlora_merge_uses_dequantized_base(base_and_adapter, tmp_path):
    """merge_adapter(dequantize_from="4bit") == NF4-de-quantized base + LoRA delta; it differs from the
    full-precision merge by exactly the quantization error of the base."""
    base, adapter = base_and_adapter
    # the reference: the base loaded 4-bit as in QLoRA training, de-quantized with bitsandbytes' functional API
    qmodel = load_model(base, device="cpu", quantization="4bit")
    dq = {name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
          for name, m in qmodel.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(dq) == 2 * 7  # q, k, v, o, gate, up, down per layer really were 4-bit
    deltas = _lora_deltas(adapter)
    assert sorted({k.rsplit(".", 1)[1] for k in deltas}) == sorted(TARGETS) and len(deltas) == 2 * len(TARGETS)

    q_dir = merge_adapter(base, adapter, tmp_path / "q", "fp32", dequantize_from="4bit")
    f_dir = merge_adapter(base, adapter, tmp_path / "f", "fp32")
    mq, mf, w = _weights(q_dir), _weights(f_dir), _weights(base)
    assert set(mq) == set(mf) == set(w)
    assert all(v.dtype == torch.float32 for v in mq.values())
    assert "quantization_config" not in json.loads((q_dir / "config.json").read_text())

    for name, wdq in dq.items():
        key = f"{name}.weight"
        delta = deltas.get(name, torch.zeros_like(wdq))
        quant_err = wdq - w[key].float()
        assert 0 < quant_err.abs().max() < 0.25 * w[key].abs().max()  # NF4 rounding: present, and bounded
        torch.testing.assert_close(mq[key], wdq + delta, rtol=0, atol=1e-6)
        torch.testing.assert_close(mf[key], w[key] + delta, rtol=0, atol=1e-6)
        # the two merges differ by the base's quantization error only (the adapter delta cancels)
        torch.testing.assert_close(mq[key] - mf[key], quant_err, rtol=0, atol=1e-6)
    # tensors bitsandbytes does not quantize (embeddings, norms) come through both merges unchanged
    for key in set(w) - {f"{n}.weight" for n in dq}:
        assert torch.equal(mq[key], w[key]) and torch.equal(mf[key], w[key]), key


def test_merge_refuses_a_folder_without_adapter(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_adapter(base, base, tmp_path / "x", dequantize_from="4bit")
    assert not (tmp_path / "x").exists()
