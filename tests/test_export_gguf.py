"""GGUF export, verification and Ollama Modelfile (CPU, tiny models, about a minute)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from banklm.export import gguf as eg  # noqa: E402
from banklm.export import gguf_vocab as ev  # noqa: E402
from banklm.export.ollama import (  # noqa: E402
    jinja_to_ollama_template,
    read_modelfile_template,
    render_jinja_chat,
    render_ollama_template,
    write_modelfile,
)
from banklm.export.verify import LLAMACPP_LOGIT_THRESHOLDS, LOGIT_THRESHOLDS, verify_gguf  # noqa: E402
from banklm.finetune.models import build_tiny_model  # noqa: E402
from banklm.finetune.tokenizer import CHAT_TEMPLATE, load_tokenizer, train_tokenizer  # noqa: E402

from banklm.runtime import LLAMA_CPP_MISSING, llama_cpp_available  # noqa: E402
from tests.export_models import CONVERSATION, PROMPTS  # noqa: E402
from tests.export_models import bpe_model as make_bpe_model  # noqa: E402
from tests.export_models import sharpen as _sharpen  # noqa: E402
from tests.export_models import texts as _texts  # noqa: E402
from tests.helpers import require_llama_cpp  # noqa: E402

HAVE_LLAMA_CPP = llama_cpp_available()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def spm_tok(work):
    return train_tokenizer(_texts(), work / "tok", vocab_size=600)


@pytest.fixture(scope="module")
def models(work, spm_tok):
    out = {}
    for arch, tie in (("llama", True), ("qwen2", False)):
        d = build_tiny_model(arch, spm_tok, work / f"m_{arch}", hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=128, max_position_embeddings=256,
                             tie_word_embeddings=tie, seed=1)
        _sharpen(Path(d), seed=2)
        out[arch] = Path(d)
    return out


@pytest.fixture(scope="module")
def exported(work, models):
    return {arch: eg.export_gguf(d, work / f"out_{arch}", quant=("f16", "q8_0", "q4_0"), name=f"tiny-{arch}")
            for arch, d in models.items()}


# ------------------------------------------------------------------------------ conversion + metadata


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_metadata(arch, exported, models):
    paths = exported[arch]
    assert [p.name for p in paths] == [f"tiny-{arch}-f16.gguf", f"tiny-{arch}-q8_0.gguf", f"tiny-{arch}-q4_0.gguf"]
    tok = load_tokenizer(models[arch])
    cfg = json.loads((models[arch] / "config.json").read_text())
    for p, ftype in zip(paths, (1, 7, 2), strict=True):
        r = gguf.GGUFReader(str(p))
        f = {k: v.contents() for k, v in r.fields.items()}
        assert f["general.architecture"] == arch
        assert f["general.name"] == f"tiny-{arch}"
        assert f["general.file_type"] == ftype
        assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
        assert f[f"{arch}.block_count"] == 2
        assert f[f"{arch}.embedding_length"] == 64
        assert f[f"{arch}.feed_forward_length"] == 128
        assert f[f"{arch}.context_length"] == 256
        assert f[f"{arch}.attention.head_count"] == 4
        assert f[f"{arch}.attention.head_count_kv"] == 2
        assert f[f"{arch}.rope.freq_base"] == pytest.approx(10000.0)
        assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
        assert f[f"{arch}.vocab_size"] == cfg["vocab_size"]
        assert f["tokenizer.ggml.model"] == "llama"
        assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
        tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
        assert len(tokens) == cfg["vocab_size"] == len(tok)
        assert tokens[:6] == ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
        T = gguf.TokenType
        assert types[:6] == [T.UNKNOWN, T.CONTROL, T.CONTROL, T.CONTROL, T.CONTROL, T.CONTROL]
        assert types[tokens.index("<0x0A>")] == T.BYTE
        assert f["tokenizer.ggml.bos_token_id"] == 1
        assert f["tokenizer.ggml.eos_token_id"] == 5  # <|im_end|>: chat models stop at end of turn
        assert f["tokenizer.ggml.eot_token_id"] == 5
        assert f["tokenizer.ggml.unknown_token_id"] == 0
        assert f["tokenizer.ggml.padding_token_id"] == 3
        assert f["tokenizer.ggml.add_bos_token"] is False  # no double BOS with the ChatML template
        assert f["tokenizer.ggml.add_space_prefix"] is False
        names = {t.name: t for t in r.tensors}
        assert ("output.weight" in names) == (arch == "qwen2")  # llama model has tied embeddings
        assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
        assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        assert names["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        want = {1: "F16", 7: "Q8_0", 2: "Q4_0"}[ftype]
        assert names["blk.1.ffn_down.weight"].tensor_type.name == want
        assert list(names["blk.0.attn_k.weight"].shape) == [64, 32]  # ggml order: (in, out)


def test_q4_0_keeps_output_head_at_q8_0(exported):
    for arch, head in (("llama", "token_embd.weight"), ("qwen2", "output.weight")):
        r = gguf.GGUFReader(str(exported[arch][2]))
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types[head] == "Q8_0"
        assert types["blk.0.attn_q.weight"] == "Q4_0"


# ------------------------------------------------------------------------------ read back + parity


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("idx,quant", [(0, "f16"), (1, "q8_0"), (2, "q4_0")])
def test_verify_roundtrip(arch, idx, quant, exported, models):
    res = verify_gguf(models[arch], exported[arch][idx], PROMPTS, quant)
    assert res["passed"], res["failures"]
    assert res["tokenizer"]["ids_equal"]
    assert res["metadata"]["chat_template_present"]
    assert res["metadata"]["chat_token_types"] == {"<|im_start|>": "CONTROL", "<|im_end|>": "CONTROL"}
    # ChatML renders no BOS and the file adds none: the served chat prompt is exactly the training one
    assert res["tokenizer"]["chat_prompt"] == {"equal": True, "leading_bos": {"training": 0, "served": 0}}
    lg = res["logits"]
    assert lg["max_abs"] <= LOGIT_THRESHOLDS[quant] * lg["logit_scale"]
    assert lg["max_abs"] > 0  # really quantized
    if quant == "f16":
        assert res["generation"]["checked"] and res["generation"]["equal"]
        assert lg["max_abs"] < 5e-3
    lc = res["llama_cpp"]
    assert lc["checked"] is HAVE_LLAMA_CPP
    if HAVE_LLAMA_CPP:  # the runtime banks serve with: same tokens, logits within its threshold
        assert lc["tokenizer"]["ids_equal"]
        assert lc["tokenizer"]["chat_prompt"]["equal"]
        assert lc["logits"]["normalized_max_abs"] <= LLAMACPP_LOGIT_THRESHOLDS[quant]
        assert lc["logits"]["max_abs"] > 0
        if quant == "f16":
            assert lc["generation"]["checked"] and lc["generation"]["equal"]
    else:
        assert "pip install 'banklm[llamacpp]'" in lc["note"]
    json.dumps(res)  # serialisable for export/verify.json


def test_f32_is_exact_and_transformers_reads_config(work, models):
    (p,) = eg.export_gguf(models["llama"], work / "f32", quant=("f32",))
    res = verify_gguf(models["llama"], p, PROMPTS[:2], "f32")
    assert res["passed"], res["failures"]
    assert res["logits"]["max_abs"] < 1e-5
    cfg = transformers.AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.tie_word_embeddings) == (2, 4, True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_roundtrip(arch, work, models):
    """bf16 files hold torch's bf16 rounding of every matrix (1-D tensors stay F32) and pass verification
    within the bf16 thresholds, in transformers' reader and in llama.cpp."""
    (p,) = eg.export_gguf(models[arch], work / f"bf16_{arch}", quant=("bf16",), name=f"tiny-{arch}")
    assert p.name == f"tiny-{arch}-bf16.gguf"
    r = gguf.GGUFReader(str(p))
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_BF16) == 32
    tensors = {t.name: t for t in r.tensors}
    for name, t in tensors.items():
        want = gguf.GGMLQuantizationType.BF16 if len(t.shape) == 2 else gguf.GGMLQuantizationType.F32
        assert t.tensor_type == want, name
    # the stored bits, decoded by hand (bf16 = top half of an fp32), equal torch's round-to-nearest-even
    # bf16 of the PyTorch weight (ffn_down: no rope permutation, so rows are in HF order)
    from safetensors.torch import load_file

    hf = load_file(str(models[arch] / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    raw = np.asarray(tensors["blk.0.ffn_down.weight"].data).view(np.uint16)
    got = (raw.astype(np.uint32) << 16).view(np.float32)
    assert got.shape == tuple(hf.shape)
    np.testing.assert_array_equal(got, hf.to(torch.bfloat16).float().numpy())
    assert not np.array_equal(got, hf.numpy())  # really rounded, not fp32 bits in disguise
    res = verify_gguf(models[arch], p, PROMPTS, "bf16")
    assert res["passed"], res["failures"]
    assert res["metadata"]["tensor_types"]["BF16"] == sum(len(t.shape) == 2 for t in r.tensors)
    assert 0 < res["logits"]["normalized_max_abs"] <= LOGIT_THRESHOLDS["bf16"]
    if HAVE_LLAMA_CPP:  # llama.cpp runs BF16 tensors on CPU
        assert 0 < res["llama_cpp"]["logits"]["normalized_max_abs"] <= LLAMACPP_LOGIT_THRESHOLDS["bf16"]


# ------------------------------------------------------------------------------ BOS rendered by the template

BOS_TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE  # Llama-3 style: the template itself starts with BOS


@pytest.fixture(scope="module")
def bos_model(work, spm_tok):
    """A tiny Llama whose chat template renders BOS and whose tokenizer config says add_bos_token=true."""
    d = Path(build_tiny_model("llama", spm_tok, work / "m_bos", hidden_size=64, num_layers=1, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, max_position_embeddings=256, seed=5))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(chat_template=BOS_TEMPLATE, add_bos_token=True)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(BOS_TEMPLATE)
    return d


def test_chat_template_renders_bos():
    assert ev.chat_template_renders_bos(BOS_TEMPLATE, "<s>")
    assert not ev.chat_template_renders_bos(CHAT_TEMPLATE, "<s>")
    assert not ev.chat_template_renders_bos(CHAT_TEMPLATE + "{{ bos_token }}", "<s>")  # not at the start
    assert not ev.chat_template_renders_bos(BOS_TEMPLATE, None)
    assert ev.chat_template_renders_bos([{"name": "tool_use", "template": CHAT_TEMPLATE},
                                         {"name": "default", "template": BOS_TEMPLATE}], "<s>")
    with pytest.raises(ValueError, match="does not render a one-user-message conversation"):
        ev.chat_template_renders_bos("{{ raise_exception('system message required') }}", "<s>")


def test_template_bos_is_not_doubled(work, bos_model):
    """The template's BOS is the only one: the GGUF says add_bos_token=false, and verification catches a
    file that would make llama.cpp put a second BOS in front of the rendered chat prompt."""
    tok = load_tokenizer(bos_model)
    assert tok.add_bos_token  # the premise: the training config asks for BOS...
    ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == tok.bos_token_id != ids[1]  # ...and training saw exactly one, from the template
    (p,) = eg.export_gguf(bos_model, work / "bos_out", quant=("f16",))
    f = {k: v.contents() for k, v in gguf.GGUFReader(str(p)).fields.items()}
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id == 1
    assert f["tokenizer.chat_template"] == BOS_TEMPLATE
    one = {"equal": True, "leading_bos": {"training": 1, "served": 1}}
    res = verify_gguf(bos_model, p, PROMPTS[:1], "f16")
    assert res["passed"], res["failures"]
    assert res["metadata"]["add_bos_token"] is False and res["tokenizer"]["chat_prompt"] == one
    if HAVE_LLAMA_CPP:
        from banklm.runtime import LlamaCppLM

        assert res["llama_cpp"]["tokenizer"]["chat_prompt"] == one
        text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
        with LlamaCppLM(p, n_ctx=128) as lm:
            assert lm.tokenize(text, add_special=True) == ids  # what llama-server feeds the model

    # planted: the same model written with add_bos_token=true (what the exporter did before)
    m = eg.read_model(bos_model)
    t = ev.read_tokenizer(bos_model, m.n_vocab)
    t.add_bos = True
    bad = eg.write_gguf(m, t, work / "bos_out" / "planted-f16.gguf", "f16")
    res = verify_gguf(bos_model, bad, PROMPTS[:1], "f16")
    assert res["passed"] is False
    assert res["tokenizer"]["chat_prompt"] == {"equal": False, "leading_bos": {"training": 1, "served": 2}}
    fails = res["failures"]
    assert any(x.startswith("tokenizer: chat prompt starts with 2 BOS tokens") for x in fails), fails
    assert "metadata: add_bos_token True != False (the chat template renders BOS itself)" in fails
    if HAVE_LLAMA_CPP:  # llama.cpp itself, not only our emulation of it, doubles the BOS
        assert res["llama_cpp"]["tokenizer"]["chat_prompt"]["leading_bos"] == {"training": 1, "served": 2}
        assert any(x.startswith("llama_cpp: llama.cpp chat prompt starts with 2 BOS") for x in fails), fails


def test_verify_reports_mismatch_without_raising(work, models, exported):
    # a qwen2 GGUF checked against the llama folder: wrong architecture, logits far off
    res = verify_gguf(models["llama"], exported["qwen2"][0], PROMPTS[:1], "f16")
    assert res["passed"] is False
    assert any("architecture" in f for f in res["failures"])
    # a wrong declared type is caught by the file type check
    res = verify_gguf(models["llama"], exported["llama"][2], PROMPTS[:1], "f16")
    assert res["passed"] is False and any("file_type" in f for f in res["failures"])
    res = verify_gguf(models["llama"], work / "missing.gguf", PROMPTS, "f16")
    assert res["passed"] is False


def test_rope_permutation_matches_interleaved_rotary():
    """HF rotate-half rope on (q, k) == interleaved-pair rope (llama.cpp's Llama graph) on permuted rows."""
    rng = torch.Generator().manual_seed(0)
    n_head, d, pos_q, pos_k = 2, 8, 5, 2
    q, k = torch.randn(n_head * d, generator=rng), torch.randn(n_head * d, generator=rng)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))

    def hf_rope(x, pos):  # x: (d,)
        ang = pos * inv
        cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
        rot = torch.cat([-x[d // 2:], x[: d // 2]])
        return x * cos + rot * sin

    def interleaved_rope(x, pos):
        ang = pos * inv
        a, b = x[0::2], x[1::2]
        out = torch.empty_like(x)
        out[0::2] = a * ang.cos() - b * ang.sin()
        out[1::2] = a * ang.sin() + b * ang.cos()
        return out

    qp = torch.from_numpy(eg.permute_rope_rows(q.numpy(), n_head))
    kp = torch.from_numpy(eg.permute_rope_rows(k.numpy(), n_head))
    for h in range(n_head):
        s = slice(h * d, (h + 1) * d)
        ref = hf_rope(q[s], pos_q) @ hf_rope(k[s], pos_k)
        got = interleaved_rope(qp[s], pos_q) @ interleaved_rope(kp[s], pos_k)
        assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    # and it is a true permutation of a weight matrix's rows
    w = torch.arange(16 * 3).reshape(16, 3).float().numpy()
    assert sorted(map(tuple, eg.permute_rope_rows(w, 2))) == sorted(map(tuple, w))


# ------------------------------------------------------------------------------ refusals, fallbacks, atomicity


def test_refuses_unsupported_architecture(work, spm_tok):
    d = work / "gpt2"
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(d))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM, Qwen2ForCausalLM"):
        eg.export_gguf(d, work / "gpt2_out")
    assert not (work / "gpt2_out").exists() or not list((work / "gpt2_out").iterdir())


def test_unknown_type_and_kquant_without_llama_cpp(work, models, monkeypatch):
    with pytest.raises(ValueError, match="q3_x"):
        eg.export_gguf(models["llama"], work / "bad", quant=("q3_x",))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    out = work / "kq"
    with pytest.raises(RuntimeError, match=r"banklm\[llamacpp\]"):
        eg.export_gguf(models["llama"], out, quant=("f16", "q4_k_m"))
    assert not out.exists() or not list(out.glob("*.gguf"))  # refused before writing anything
    with pytest.raises(RuntimeError, match=r"banklm\[llamacpp\]"):
        eg.requantize_with_llamacpp(work / "x.gguf", work / "y.gguf", "q4_k_m")
    (p,) = eg.export_gguf(models["llama"], work / "no_llamacpp", quant=("q8_0",))
    res = verify_gguf(models["llama"], p, PROMPTS[:1], "q8_0")
    assert res["passed"] and res["llama_cpp"] == {"checked": False, "note": LLAMA_CPP_MISSING}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kquants_through_llama_cpp(arch, work, models):
    """q4_k_m / q5_k_m / q6_k come from llama.cpp's own quantizer and are checked in llama.cpp."""
    require_llama_cpp()
    quants = eg.KQUANTS
    paths = eg.export_gguf(models[arch], work / f"kq_{arch}", quant=quants, name=f"tiny-{arch}")
    assert [p.name for p in paths] == [f"tiny-{arch}-{t}.gguf" for t in quants]
    assert not [f for f in (work / f"kq_{arch}").iterdir() if f.name.startswith(".")]  # no temporary left
    for p, t in zip(paths, quants, strict=True):
        assert gguf.GGUFReader(str(p)).fields["general.file_type"].contents() == int(eg.file_type(t))
        res = verify_gguf(models[arch], p, PROMPTS, t)
        assert res["passed"], res["failures"]
        assert res["llama_cpp"]["checked"] and res["llama_cpp"]["tokenizer"]["ids_equal"]
        assert 0 < res["llama_cpp"]["logits"]["normalized_max_abs"] <= LLAMACPP_LOGIT_THRESHOLDS[t]


def test_block_size_fallback(work, spm_tok, caplog):
    d = build_tiny_model("llama", spm_tok, work / "m_odd", hidden_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=4, intermediate_size=80, max_position_embeddings=128)
    _sharpen(Path(d))
    with caplog.at_level("INFO", logger="banklm.export.gguf"):
        (p,) = eg.export_gguf(d, work / "odd", quant=("q4_0",))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(p)).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80: not a multiple of 32
    assert types["blk.0.ffn_up.weight"] == "Q4_0"
    assert "blk.0.ffn_down.weight" in caplog.text and "stored as f16" in caplog.text  # logged in quant names
    res = verify_gguf(d, p, PROMPTS[1:], "q4_0")
    assert res["passed"], res["failures"]


def test_atomic_write_leaves_nothing_on_failure(work, models, monkeypatch):
    out = work / "atomic"
    out.mkdir()
    calls = {"n": 0}
    real = eg.quantize_tensor

    def flaky(data, quant):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return real(data, quant)

    monkeypatch.setattr(eg, "quantize_tensor", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        eg.export_gguf(models["qwen2"], out, quant=("q8_0",))
    assert list(out.iterdir()) == []  # neither a final nor a temporary file
    # an existing good file survives a failed re-export
    monkeypatch.setattr(eg, "quantize_tensor", real)
    (good,) = eg.export_gguf(models["qwen2"], out, quant=("q8_0",))
    before = good.read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(eg, "quantize_tensor", flaky)
    with pytest.raises(RuntimeError):
        eg.export_gguf(models["qwen2"], out, quant=("q8_0",))
    assert good.read_bytes() == before and [x.name for x in out.iterdir()] == [good.name]


# ------------------------------------------------------------------------------ byte-level BPE tokenizer


@pytest.fixture(scope="module")
def bpe_model(work):
    return make_bpe_model(work)


def test_bpe_tokenizer_export(work, bpe_model):
    p16, p8 = eg.export_gguf(bpe_model, work / "bpe_out", quant=("f16", "q8_0"))
    f = {k: v.contents() for k, v in gguf.GGUFReader(str(p16)).fields.items()}
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "qwen2"
    assert len(f["tokenizer.ggml.merges"]) > 100 and " " in f["tokenizer.ggml.merges"][0]
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert types[tokens.index(t)] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.eos_token_id"] == tokens.index("<|im_end|>")
    assert f["tokenizer.ggml.padding_token_id"] == tokens.index("<|endoftext|>")
    assert "tokenizer.ggml.bos_token_id" not in f
    assert f["tokenizer.ggml.add_bos_token"] is False
    for p, q in ((p16, "f16"), (p8, "q8_0")):
        res = verify_gguf(bpe_model, p, PROMPTS, q)
        assert res["passed"], res["failures"]
        assert res["tokenizer"]["ids_equal"] and res["tokenizer_fixups"] == []
        if HAVE_LLAMA_CPP:  # llama.cpp recognises the derived pre-tokenizer and splits text the same way
            assert res["llama_cpp"]["tokenizer"]["ids_equal"]


def test_pre_tokenizer_derivation():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert ev.QWEN2_PRE_REGEX == PRETOKENIZE_REGEX and ev.LLAMA3_PRE_REGEX == _LLAMA3_SPLIT

    def seq(regex, use_regex=False):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": use_regex}]}

    assert ev.derive_bpe_pre(seq(ev.QWEN2_PRE_REGEX)) == "qwen2"
    assert ev.derive_bpe_pre(seq(ev.LLAMA3_PRE_REGEX)) == "llama-bpe"
    assert ev.derive_bpe_pre({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    with pytest.raises(ValueError, match="unknown pre-tokenizer regex"):
        ev.derive_bpe_pre(seq(r"\p{N}{1,5}|\s+"))
    with pytest.raises(ValueError, match="Whitespace"):
        ev.derive_bpe_pre({"type": "Whitespace"})


def test_unknown_bpe_pre_tokenizer_refused(work, bpe_model):
    d = work / "m_bpe_odd"
    shutil.copytree(bpe_model, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,2}|\S+|\s+"
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="unknown pre-tokenizer regex"):
        eg.export_gguf(d, work / "bpe_odd_out", quant=("f16",))
    assert not list((work / "bpe_odd_out").glob("*.gguf")) if (work / "bpe_odd_out").exists() else True


# ------------------------------------------------------------------------------ Ollama Modelfile


def test_ollama_template_matches_jinja(work, models, exported):
    tok = load_tokenizer(models["llama"])
    go = jinja_to_ollama_template(CHAT_TEMPLATE)
    assert go.startswith("{{ range .Messages }}") and "{{ .Role }}" in go and "{{ .Content }}" in go
    mf = write_modelfile(exported["llama"][1], CHAT_TEMPLATE, exported["llama"][1].parent / "Modelfile",
                         num_ctx=256, parameters={"temperature": 0})
    text = mf.read_text()
    assert text.startswith(f"FROM ./{exported['llama'][1].name}\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 256" in text
    assert "PARAMETER temperature 0" in text
    template, system = read_modelfile_template(mf)
    assert system is None
    want = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert render_jinja_chat(CHAT_TEMPLATE, CONVERSATION, add_generation_prompt=True) == want
    assert render_ollama_template(template, CONVERSATION) == want
    # the Modelfile SYSTEM prompt goes first when the conversation has none, as in Ollama
    mf2 = write_modelfile(exported["llama"][1], CHAT_TEMPLATE, work / "elsewhere" / "Modelfile",
                          system="你是银行审计助手。")
    template2, system2 = read_modelfile_template(mf2)
    assert mf2.read_text().startswith(f"FROM {exported['llama'][1].resolve()}")
    assert render_ollama_template(template2, CONVERSATION[1:], system=system2) == want


def test_ollama_template_per_role_and_refusal():
    per_role = ("{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
                "{% elif m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}</s>"
                "{% endif %}{% endfor %}")
    go = jinja_to_ollama_template(per_role)
    assert '{{ if eq .Role "system" }}' in go
    want = render_jinja_chat(per_role, CONVERSATION, add_generation_prompt=True)
    assert render_ollama_template(go, CONVERSATION) == want
    odd = "{% for m in messages %}{% if loop.first %}FIRST{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="concatenation"):
        jinja_to_ollama_template(odd)


def test_llama_cpp_detokenizes_long_pieces(work):
    """A 14-character Chinese piece is 42 bytes: llama.cpp's text must still equal the tokenizer's
    (llama-cpp-python's own Llama.detokenize drops pieces over 32 bytes; export.runtime does not use it)."""
    require_llama_cpp()
    from banklm.runtime import LlamaCppLM

    phrase = "与缅甸的境外对手方有资金往来"
    tokdir = train_tokenizer([f"{phrase}，结论：可疑 {i}" for i in range(800)] + _texts(400), work / "tok_long",
                             vocab_size=600)
    tok = load_tokenizer(tokdir)
    ids = tok.encode(f"理由：{phrase}", add_special_tokens=False)
    assert max(len(tok.decode([i]).encode()) for i in ids) > 32  # the case under test
    d = build_tiny_model("llama", tokdir, work / "m_long", hidden_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=4, intermediate_size=128, max_position_embeddings=128)
    (p,) = eg.export_gguf(d, work / "long_out", quant=("f16",))
    with LlamaCppLM(p, n_ctx=128) as lm:
        assert lm.tokenize(f"理由：{phrase}") == ids
        assert lm.detokenize(ids) == f"理由：{phrase}" == tok.decode(ids, skip_special_tokens=True)
    res = verify_gguf(d, p, [f"<|im_start|>user\n{phrase}<|im_end|>\n"], "f16")
    assert res["passed"], res["failures"]
    assert res["llama_cpp"]["tokenizer"]["text_equal"]
