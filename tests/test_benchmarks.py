"""The benchmark scripts keep running (a smoke run on a tiny input; the figures live in BENCHMARKS.md)."""

import json
import subprocess
import sys


def test_bench_corpora_smoke(repo, tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "bench_corpora.py"), "--docs", "400",
                           "--num-proc", "1", "--baselines", "loop", "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text(encoding="utf-8"))
    kinds = {(r["kind"], r["procs"]) for r in res["results"]}
    assert kinds == {("banklm", 1), ("loop", 1)}
    banklm = next(r for r in res["results"] if r["kind"] == "banklm")
    loop = next(r for r in res["results"] if r["kind"] == "loop")
    assert banklm["kept"] == loop["kept"] > 0  # the same steps keep the same documents
    assert "| banklm | 1 |" in proc.stdout


def test_bench_export_smoke(repo, tmp_path):
    from banklm.runtime import llama_cpp_available
    from tests.export_models import spm_tokenizer

    tok = spm_tokenizer(tmp_path / "tok")
    out = tmp_path / "e.json"
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "bench_export.py"), "--tiny-config", "--tokenizer",
                           str(tok), "--new-tokens", "4", "--prompt-tokens", "16", "--threads", "1",
                           "--workdir", str(tmp_path / "w"), "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    want = ["safetensors fp32", "ONNX fp32", "ONNX int8", "GGUF f16", "GGUF q8_0"]
    if llama_cpp_available():
        want.append("GGUF q4_k_m")
    assert [r["format"] for r in rows] == want
    assert all(r["bytes"] > 0 for r in rows) and rows[2]["bytes"] < rows[1]["bytes"]  # int8 smaller than fp32
    timed = [r for r in rows if r["runtime"] != "llama.cpp (not installed)"]
    assert all(r["decode_tok_s"] > 0 for r in timed) and rows[0]["speedup_vs_pytorch"] == 1.0
    assert all(r["accuracy"] is None for r in rows)  # random weights: accuracy is not measured
    assert "| llama-tiny-random | onnxruntime | ONNX int8 |" in proc.stdout


def test_bench_train_smoke(repo, tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "bench_train.py"), "--models", "tiny", "--configs",
                           "banklm", "banklm-packed", "baseline", "--steps", "4", "--warmup", "1", "--batch", "4",
                           "--per-task", "20", "--repeats", "2", "--time-budget", "60", "--workdir", str(tmp_path / "w"), "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text(encoding="utf-8"))
    rows = {r["config"]: r for r in res["results"]}
    assert set(rows) == {"banklm", "banklm-packed", "baseline"} and rows["baseline"]["speedup_vs_baseline"] == 1.0
    assert len(res["runs"]) == 6 and all(len(r["rounds"]) == 2 for r in rows.values())  # 2 rounds, medians
    assert res["peak_flops"]["fp32"] > 0 and res["inputs"]["records"] == 60
    for r in rows.values():
        assert r["timed_steps"] == 3 and r["real_tokens"] > 0 and 0 < r["mfu"] < 1 and r["peak_rss_mb"] > 0
    # packed rows carry several examples: more real tokens per step than 4 padded examples
    assert rows["banklm-packed"]["tokens_per_step"] > rows["baseline"]["tokens_per_step"]
    assert rows["banklm"]["warmup_seconds"] > 0
    assert "| tiny | " in proc.stdout and "matmul peak" in proc.stdout


def test_bench_decoding_smoke(repo, tmp_path, quickstart_run):
    _, run_dir, _ = quickstart_run
    out = tmp_path / "d.json"
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "bench_decoding.py"), "--model",
                           str(run_dir / "sft" / "merged"), "--data", str(run_dir), "--limit", "3", "--rounds", "1",
                           "--max-new-tokens", "32", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["records"] == 9 and res["ratio"] > 0
    assert res["constrained"]["format_compliance"] == {"credit": 1.0, "aml": 1.0, "audit": 1.0}
    assert all(v == 0 for v in res["constrained"]["unsupported_number_rate"].values())
    assert "constrained / free records/s" in proc.stdout


def test_bench_eval_stage_smoke(repo, tmp_path, quickstart_run):
    _, run_dir, _ = quickstart_run
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "bench_eval_stage.py"), str(run_dir), "--limit", "2",
                           "--max-new-tokens", "24", "--robustness", "distractor", "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["models"][0] == "sft" and res["records"] == 6
    shared = res["constrained"]
    assert shared["matchers_copied"] > 0 and shared["matchers_built"] + shared["matchers_copied"] >= 6 * len(res["models"])
    assert "constrained - free" in proc.stdout
