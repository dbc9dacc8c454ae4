"""ONNX export (KV cache, fp32/fp16/int8), the onnxruntime generation helper, verification, and the export bundle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from banklm.export.bundle import build_export, check_sha256sums  # noqa: E402
from banklm.export.ollama import read_modelfile_template, render_ollama_template  # noqa: E402
from banklm.export.onnx import ONNX_QUANTS, export_onnx, input_names, onnx_metadata, output_names  # noqa: E402
from banklm.export.verify import ONNX_LOGIT_THRESHOLDS, verify_onnx  # noqa: E402
from banklm.finetune.tokenizer import CHAT_TEMPLATE, load_tokenizer  # noqa: E402

from banklm.runtime import OnnxCausalLM, TorchLM, llama_cpp_available, onnx_file_bytes  # noqa: E402
from tests.export_models import CONVERSATION, PROMPTS, bpe_model, spm_model, spm_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def models(work):
    tok = spm_tokenizer(work / "tok")
    return {"llama": spm_model("llama", tok, work / "m_llama", tie=True),
            "qwen2": spm_model("qwen2", tok, work / "m_qwen2", tie=False)}


@pytest.fixture(scope="module")
def exported(work, models):
    return {arch: export_onnx(d, work / f"onnx_{arch}", quant=("fp32", "int8")) for arch, d in models.items()}


def _torch(model_dir):
    return TorchLM(transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval())


# ------------------------------------------------------------------------------ export + independent read-back


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_graph_names_files_and_template(arch, exported, models):
    fp32, int8 = exported[arch]
    assert (fp32.name, int8.name) == ("fp32", "int8")
    cfg = json.loads((models[arch] / "config.json").read_text())
    for folder, t in ((fp32, "fp32"), (int8, "int8")):
        onnx.checker.check_model(str(folder / "model.onnx"))
        m = onnx.load(str(folder / "model.onnx"))
        assert [i.name for i in m.graph.input] == input_names(2)
        assert [i.name for i in m.graph.input][:5] == ["input_ids", "attention_mask", "position_ids",
                                                       "past_key_values.0.key", "past_key_values.0.value"]
        assert [o.name for o in m.graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                                    "present.1.value"] == output_names(2)
        past = m.graph.input[3].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in past] == ["batch_size", 2, "past_sequence_length", 16]
        assert onnx_metadata(folder / "model.onnx")["banklm.type"] == t
        assert onnx_metadata(folder / "model.onnx")["banklm.architecture"] == cfg["architectures"][0]
        # everything a runtime needs sits beside the graph: tokenizer, chat template, generation config
        assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE
        assert load_tokenizer(folder).chat_template == CHAT_TEMPLATE
        assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [5, 2]
    ops = {n.op_type for n in onnx.load(str(int8 / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert (int8 / "model.onnx").stat().st_size < 0.6 * (fp32 / "model.onnx").stat().st_size


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_verify_roundtrip(arch, quant, exported, models):
    folder = exported[arch][0 if quant == "fp32" else 1]
    res = verify_onnx(models[arch], folder, PROMPTS, quant)
    assert res["passed"], res["failures"]
    assert res["tokenizer"]["ids_equal"] and res["metadata"]["chat_template_present"]
    lg = res["logits"]
    assert lg["normalized_max_abs"] <= ONNX_LOGIT_THRESHOLDS[quant]
    if quant == "fp32":
        assert lg["max_abs"] < 1e-4 and lg["top1_agreement"] == 1.0
        assert res["generation"]["checked"] and res["generation"]["equal"]
    else:
        assert lg["max_abs"] > 1e-3  # really quantized
        assert res["metadata"]["quantized_matmuls"] >= 2 * 7  # q, k, v, o, gate, up, down per layer
    json.dumps(res)


def test_fp16_export_runs_on_cpu(work, models):
    (folder,) = export_onnx(models["qwen2"], work / "onnx_fp16", quant=("fp16",))
    lm = OnnxCausalLM(folder)
    assert lm.float_type == np.float16
    res = verify_onnx(models["qwen2"], folder, PROMPTS[:2], "fp16")
    assert res["passed"], res["failures"]
    assert 0 < res["logits"]["normalized_max_abs"] <= ONNX_LOGIT_THRESHOLDS["fp16"]


# ------------------------------------------------------------------------------ the generation helper


def test_kv_cache_prefill_and_decode_match_full_forward(exported, models):
    """Feeding a prompt in two pieces through the cache gives the logits of one full forward pass."""
    lm = OnnxCausalLM(exported["llama"][0])
    ids = load_tokenizer(models["llama"]).encode(PROMPTS[0], add_special_tokens=False)
    full = _torch(models["llama"]).logits(ids)
    n = len(ids) - 3
    x = np.array([ids[:n]])
    logits1, past = lm.forward(x, np.ones_like(x), np.arange(n)[None], lm.empty_past(1))
    x2 = np.array([ids[n:]])
    logits2, _ = lm.forward(x2, np.ones((1, len(ids)), dtype=np.int64), np.arange(n, len(ids))[None], past)
    got = np.concatenate([logits1[0], logits2[0]])
    assert np.abs(got - full).max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_left_padded_greedy_equals_per_prompt_and_pytorch(arch, exported, models):
    tok = load_tokenizer(models[arch])
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS] + [[4, 40, 41]]
    lm = OnnxCausalLM(exported[arch][0])
    ref = _torch(models[arch]).greedy(prompts, 6, [5], batch_size=1)
    assert lm.greedy(prompts, 6, [5], batch_size=1) == ref
    assert lm.greedy(prompts, 6, [5], batch_size=4, pad_id=3) == ref  # different lengths in one batch
    # stops at EOS: a prompt whose greedy continuation is cut there keeps the EOS as its last token
    stop_at = ref[0][2]
    cut = lm.greedy(prompts[:1], 6, [stop_at])[0]
    assert cut == ref[0][: ref[0].index(stop_at) + 1]


# ------------------------------------------------------------------------------ tokenizers, refusals, mismatches


def test_bpe_tokenizer_model(work):
    d = bpe_model(work)
    (folder,) = export_onnx(d, work / "onnx_bpe", quant=("fp32",))
    assert (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").exists()
    res = verify_onnx(d, folder, PROMPTS, "fp32")
    assert res["passed"], res["failures"]
    assert res["tokenizer"]["ids_equal"] and res["generation"]["equal"]


def test_refuses_unsupported_architecture_and_bad_options(work, models):
    d = work / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)
                                 ).save_pretrained(str(d))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported: LlamaForCausalLM, Qwen2ForCausalLM"):
        export_onnx(d, work / "gpt2_out")
    assert not (work / "gpt2_out").exists()
    with pytest.raises(ValueError, match="int4"):
        export_onnx(models["llama"], work / "bad", quant=("int4",))
    with pytest.raises(ValueError, match="opset 11"):
        export_onnx(models["llama"], work / "bad", opset=11)
    assert set(ONNX_QUANTS) == {"fp32", "fp16", "int8"}


def test_verify_reports_mismatches_without_raising(work, exported, models):
    # a qwen2 graph checked against the llama folder: logits far off
    res = verify_onnx(models["llama"], exported["qwen2"][0], PROMPTS[:1], "fp32")
    assert res["passed"] is False and any(f.startswith("logits:") for f in res["failures"])
    # the declared type is checked
    res = verify_onnx(models["llama"], exported["llama"][1], PROMPTS[:1], "fp32")
    assert any("declared type 'int8'" in f for f in res["failures"])
    # a chat template edited beside the graph is caught
    bad = work / "bad_template"
    shutil.copytree(exported["llama"][0], bad)
    (bad / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("<|im_start|>", "<|im_start|> "))
    res = verify_onnx(models["llama"], bad, PROMPTS[:1], "fp32")
    assert any("chat template differs" in f for f in res["failures"])
    res = verify_onnx(models["llama"], work / "nowhere", PROMPTS, "fp32")
    assert res["passed"] is False and "not found" in res["failures"][0]


# ------------------------------------------------------------------------------ bundle, checksums, CLI


def _records(n_per_task=2):
    from banklm.corpora.synth import generate_records

    return [r for t in ("credit", "aml", "audit") for r in generate_records(t, n_per_task, seed=7, split="test")]


def _banklm(*args, cwd):
    return subprocess.run([sys.executable, "-m", "banklm.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def bundle(work, models):
    out = work / "bundle" / "export"
    tok = load_tokenizer(models["llama"])
    prompts = [tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True), PROMPTS[1]]
    summary = build_export(models["llama"], out, name="tiny", prompts=prompts, gguf_quant=("f16", "q8_0"),
                           onnx_quant=("fp32", "int8"), records=_records(), eval_max_new_tokens=24,
                           system="你是银行审计助手。", model_card=lambda s: f"# card\n\npassed: {s['passed']}\n")
    return out, summary


@pytest.mark.slow
def test_bundle_layout_checks_and_task_accuracy(bundle):
    out, summary = bundle
    assert summary["passed"], summary["failures"]
    names = sorted(f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file())
    for must in ("gguf/tiny-f16.gguf", "gguf/tiny-f16.Modelfile", "gguf/tiny-q8_0.gguf", "gguf/tiny-q8_0.Modelfile",
                 "onnx/fp32/model.onnx", "onnx/int8/model.onnx", "onnx/int8/tokenizer.model",
                 "eval/pytorch/results.json", "eval/onnx-int8/predictions.jsonl", "eval/gguf-q8_0/results.json",
                 "verify.json", "MODEL_CARD.md", "SHA256SUMS"):
        assert must in names, must
    assert not [n for n in names if "/." in n or n.startswith(".")]  # no temporary files
    verify = json.loads((out / "verify.json").read_text())
    assert [c["type"] for c in verify["gguf"]] == ["f16", "q8_0"]
    assert [c["type"] for c in verify["onnx"]] == ["fp32", "int8"]
    assert verify["onnx"][0]["file"] == "export/onnx/fp32/model.onnx"  # relative to the run folder
    assert (out / "MODEL_CARD.md").read_text() == "# card\n\npassed: True\n"
    base = json.loads((out / "eval" / "pytorch" / "results.json").read_text())
    assert verify["task_eval"]["pytorch"]["accuracy"] == base["overall"]["accuracy"]
    for kind in ("gguf", "onnx"):
        for c in verify[kind]:
            te = c["task_eval"]
            res = json.loads((out.parent / te["results"]).read_text())
            preds = [json.loads(x) for x in (out.parent / te["results"]).with_name("predictions.jsonl").read_text()
                     .splitlines()]
            assert te["n"] == len(preds) == 6 and set(te["per_task"]) == {"credit", "aml", "audit"}
            assert te["accuracy"] == res["overall"]["accuracy"] == sum(p["correct"] for p in preds) / 6
            assert te["accuracy_drop"] == pytest.approx(base["overall"]["accuracy"] - te["accuracy"])
            assert c["bytes"] == (out.parent / c["file"]).stat().st_size
    gg = verify["gguf"][0]
    assert gg["task_eval"]["runtime"].startswith("llama.cpp" if llama_cpp_available() else "transformers GGUF")
    assert gg["llama_cpp"]["checked"] is llama_cpp_available()


@pytest.mark.slow
def test_bundle_modelfiles_render_the_training_template(bundle, models):
    out, _ = bundle
    tok = load_tokenizer(models["llama"])
    want = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    for t in ("f16", "q8_0"):
        mf = out / "gguf" / f"tiny-{t}.Modelfile"
        text = mf.read_text()
        assert text.startswith(f"FROM ./tiny-{t}.gguf\n")
        assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "</s>"' in text  # every end token
        template, system = read_modelfile_template(mf)
        assert system == "你是银行审计助手。"
        assert render_ollama_template(template, CONVERSATION, system=system) == want  # multi-turn, same text
        assert render_ollama_template(template, CONVERSATION[1:], system=system) == want  # SYSTEM fills in


@pytest.mark.slow
def test_sha256sums_and_verify_only_cli(bundle, models, work):
    out, _ = bundle
    assert check_sha256sums(out) == []
    if shutil.which("sha256sum"):
        ok = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    r = _banklm("export", "--model", str(models["llama"]), "--out", str(out), "--verify-only", cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok: SHA256SUMS intact, 4 artefact(s) match the model" in r.stdout
    copy = work / "tampered" / "export"
    shutil.copytree(out, copy)
    f = copy / "onnx" / "int8" / "model.onnx"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    f.write_bytes(bytes(data))
    r = _banklm("export", "--model", str(models["llama"]), "--out", str(copy), "--verify-only", cwd=work)
    assert r.returncode == 1
    assert "check failed" in r.stderr and "onnx/int8/model.onnx: sha256 differs" in r.stderr
    assert check_sha256sums(copy) == ["onnx/int8/model.onnx: sha256 differs from SHA256SUMS (file changed after export)"]
    (copy / "stray.txt").write_text("x")
    assert "stray.txt: not listed in SHA256SUMS" in check_sha256sums(copy)


@pytest.mark.slow
def test_cli_exports_onnx_from_a_model_folder(models, work):
    out = work / "cli_onnx"
    r = _banklm("export", "--model", str(models["qwen2"]), "--format", "onnx", "--quant", "fp32,int8",
                "--out", str(out), cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    verify = json.loads((out / "verify.json").read_text())
    assert [c["type"] for c in verify["onnx"]] == ["fp32", "int8"] and verify["passed"]
    assert verify["gguf"] == [] and "task_eval" not in verify
    assert check_sha256sums(out) == []
    bad = _banklm("export", "--model", str(models["qwen2"]), "--format", "onnx", "--quant", "int4", "--out",
                  str(work / "x"), cwd=work)
    assert bad.returncode == 2 and "int4" in bad.stderr
    bad = _banklm("export", "--model", str(models["qwen2"]), cwd=work)
    assert bad.returncode == 2 and "--format" in bad.stderr


def test_cli_refuses_unsupported_architecture_with_exit_2(work, models):
    d = work / "gpt2_cli"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=600)
                                 ).save_pretrained(str(d))
    for f in (work / "tok").iterdir():
        shutil.copy(f, d / f.name)
    r = _banklm("export", "--model", str(d), "--format", "onnx", "--out", str(work / "gpt2_cli_out"), cwd=work)
    assert r.returncode == 2, r.stderr[-1000:]
    assert "architecture GPT2LMHeadModel is not supported for ONNX export" in r.stderr
    assert not Path(work / "gpt2_cli_out").exists()


@pytest.mark.slow
def test_report_export_section_shows_onnx_rows_and_accuracy(bundle):
    from banklm.report import render_export_section

    out, summary = bundle
    page = render_export_section({"export": json.loads((out / "verify.json").read_text()), "run_dir": out.parent})
    for c in summary["gguf"] + summary["onnx"]:
        assert f"<td>{c['file']}</td>" in page and f"<td>{c['bytes']}</td>" in page
        assert f"<td>{c['task_eval']['accuracy']:.3f}</td>" in page
    assert "<td>onnx</td><td>int8</td>" in page
    assert f"<td>{summary['task_eval']['pytorch']['accuracy']:.3f}</td>" in page
    assert "Task accuracy before and after export (6 test records)" in page


# ------------------------------------------------------------------------------ through the pipeline


def _copy_run(quickstart_run, dst: Path) -> Path:
    _, run_dir, _ = quickstart_run
    shutil.copytree(run_dir, dst, symlinks=True)
    return dst


@pytest.mark.slow
def test_failed_check_makes_export_exit_1_naming_it(quickstart_run, repo, tmp_path, monkeypatch, capsys):
    from banklm.export import verify

    from banklm.cli import main
    from tests.helpers import QUICKSTART_SMALL

    run = _copy_run(quickstart_run, tmp_path / "runs" / "quickstart" / "c1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(verify.ONNX_LOGIT_THRESHOLDS, "int8", 1e-9)  # int8 differs more than that
    rc = main(["export", str(repo / "recipes" / "quickstart.yaml"), *QUICKSTART_SMALL, "export.evaluate=false",
               "--format", "onnx", "--quant", "fp32,int8", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert rc == 1, err[-2000:]
    assert "check failed: export verification failed" in err
    assert "onnx int8 (export/onnx/int8/model.onnx): logits: next-token logit max-abs diff" in err
    verify_json = json.loads((run / "export" / "verify.json").read_text())  # written, to show what failed
    assert [c["passed"] for c in verify_json["onnx"]] == [True, False] and verify_json["gguf"] == []


@pytest.mark.slow
def test_verify_only_of_a_run_folder(quickstart_run, repo, tmp_path):
    from tests.helpers import QUICKSTART_SMALL, run_banklm

    run = _copy_run(quickstart_run, tmp_path / "runs" / "quickstart" / "v1")
    args = ["export", str(repo / "recipes" / "quickstart.yaml"), *QUICKSTART_SMALL, "--run-dir", str(run),
            "--verify-only"]
    r = run_banklm(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok: SHA256SUMS intact, 4 artefact(s) match the model" in r.stdout
    f = run / "export" / "gguf" / "quickstart-q8_0.gguf"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x01
    f.write_bytes(bytes(data))
    r = run_banklm(*args, cwd=tmp_path)
    assert r.returncode == 1
    assert "gguf/quickstart-q8_0.gguf: sha256 differs from SHA256SUMS" in r.stderr


def test_weights_over_the_protobuf_limit_go_to_one_external_file(work, models, monkeypatch):
    """Graphs over 2 GB (e.g. Qwen2.5-0.5B in fp32 with its tied 152k vocabulary) keep their weights in
    model.onnx.data; the limit is lowered here so a tiny model takes that path."""
    from banklm.export import onnx as eo

    monkeypatch.setattr(eo, "_INLINE_LIMIT", 10_000)
    fp32, int8 = export_onnx(models["qwen2"], work / "onnx_external", quant=("fp32", "int8"))
    assert sorted(f.name for f in fp32.iterdir() if f.name.startswith("model.")) == ["model.onnx", "model.onnx.data"]
    assert not (fp32 / ".trace").exists()
    graph, data = (fp32 / "model.onnx").stat().st_size, (fp32 / "model.onnx.data").stat().st_size
    assert data > 3 * graph and onnx_file_bytes(fp32 / "model.onnx") == graph + data
    for folder, t in ((fp32, "fp32"), (int8, "int8")):
        res = verify_onnx(models["qwen2"], folder, PROMPTS[:2], t)
        assert res["passed"], res["failures"]
        assert res["bytes"] == onnx_file_bytes(folder / "model.onnx")
