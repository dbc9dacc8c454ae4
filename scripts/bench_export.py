"""Benchmark the exports: file size, export time, CPU decode speed and task accuracy per runtime.

    python scripts/bench_export.py runs/quickstart/latest/sft/merged --size-100m [--records 100] [--json out.json]

For each model (a model folder; test records are read from the run folder it sits in, when there is
one) and, with ``--size-100m``, a ~100M-parameter Llama built from a config (random weights: its speed
and size are real, its accuracy is meaningless and not measured):

* PyTorch fp32 (transformers, the safetensors folder);
* ONNX fp32 and ONNX int8 (``banklm.export.onnx``, onnxruntime CPU provider);
* GGUF f16, q8_0 and q4_k_m run by llama.cpp (llama-cpp-python; without it, sizes and export times only).

Decode speed: one sequence, a prompt of ``--prompt-tokens`` tokens fed once (not timed), then
``--new-tokens`` greedy single-token steps through the KV cache, timed; median of three runs after a
warm-up; every runtime gets ``--threads`` threads. Task accuracy: the runtime answers the run's scenario
test records (``--records`` per task) through the same code the export stage uses
(``banklm.evaluation.evaluate.evaluate_artefact``, PyTorch through ``banklm.evaluation``), scored by the task parsers.
Export time: converting from the safetensors folder (int8: quantizing the fp32 ONNX; q4_k_m:
re-quantizing the f16 GGUF with llama.cpp). The load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ~100M parameters: hidden 768, 12 layers, 12 heads, FFN 2048, 32k vocabulary (tied): 24.6M + 12 x 7.1M.
CONFIG_100M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                   intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048)
CONFIG_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=2000, max_position_embeddings=512)  # smoke test


# ----------------------------------------------------------------------------------------- models


def build_random_llama(out: Path, tokenizer_dir: Path, cfg: dict) -> Path:
    """A randomly initialised Llama of ``cfg`` with the tokenizer of ``tokenizer_dir`` (the vocabulary is
    padded to ``cfg['vocab_size']`` rows: ids past the tokenizer's are never produced by it)."""
    import torch
    from banklm.finetune.models import save_model_folder, set_generation_config
    from banklm.finetune.tokenizer import load_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(tokenizer_dir)
    vocab = max(cfg["vocab_size"], len(tok))
    config = LlamaConfig(**{**cfg, "vocab_size": vocab}, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    set_generation_config(model, tok)
    return save_model_folder(model, out, tokenizer_dir)


def scenario_records(model_dir: Path, per_task: int) -> list[dict] | None:
    """The test records of the run folder the model sits in (None when it is not inside a run)."""
    from banklm.corpora.splits import load_split

    for parent in model_dir.resolve().parents:
        if (parent / "corpora" / "scenario" / "data").is_dir():
            return load_split(parent / "corpora" / "scenario", "test", limit_per_task=per_task).to_list()
    return None


# ----------------------------------------------------------------------------------------- decode speed


def _timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(repeats))


def decode_torch(model, ids: list[int], n: int) -> float:
    import torch

    def run() -> float:
        with torch.inference_mode():
            out = model(torch.tensor([ids]), use_cache=True)
            past, tok = out.past_key_values, out.logits[0, -1].argmax()
            t0 = time.perf_counter()
            for _ in range(n):
                out = model(tok.view(1, 1), past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[0, -1].argmax()
            return time.perf_counter() - t0
    return n / _timed(run)


def decode_onnx(lm, ids: list[int], n: int) -> float:
    import numpy as np

    def run() -> float:
        x = np.array([ids], dtype=np.int64)
        logits, past = lm.forward(x, np.ones_like(x), np.arange(len(ids))[None], lm.empty_past(1))
        mask = np.ones((1, len(ids)), dtype=np.int64)
        t0 = time.perf_counter()
        for i in range(n):
            tok = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            logits, past = lm.forward(tok, mask, np.array([[len(ids) + i]]), past)
        return time.perf_counter() - t0
    return n / _timed(run)


def decode_llama_cpp(lm, ids: list[int], n: int) -> float:
    def run() -> float:
        lm.llm.reset()
        lm.llm.eval(ids)
        t0 = time.perf_counter()
        for _ in range(n):
            lm.llm.eval([int(lm.last_logits().argmax())])
        return time.perf_counter() - t0
    return n / _timed(run)


# ----------------------------------------------------------------------------------------- one model


def bench_model(model_dir: Path, name: str, work: Path, records: list[dict] | None, args) -> list[dict]:
    import torch
    from banklm.export.gguf import export_gguf, requantize_with_llamacpp
    from banklm.export.onnx import export_onnx, quantize_int8
    from banklm.finetune.tokenizer import load_tokenizer
    from transformers import AutoModelForCausalLM

    from banklm.evaluation.evaluate import evaluate_artefact, evaluate_model_dir
    from banklm.runtime import LlamaCppLM, OnnxCausalLM, llama_cpp_available, onnx_file_bytes

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(model_dir)
    gen = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    if records:
        text = tok.apply_chat_template([m for m in records[0]["messages"] if m["role"] != "assistant"],
                                       tokenize=False, add_generation_prompt=True)
        ids = (tok.encode(text, add_special_tokens=False) * 4)[: args.prompt_tokens]
    else:
        ids = [(7 * i) % (len(tok) - 10) + 6 for i in range(args.prompt_tokens)]
    n_params = None
    rows: list[dict] = []

    def row(runtime, fmt, size, export_s, tok_s, acc, extra=None):
        r = {"model": name, "runtime": runtime, "format": fmt, "bytes": size, "export_s": export_s,
             "decode_tok_s": tok_s, "accuracy": acc, "parameters": n_params, **(extra or {})}
        rows.append(r)
        print(json.dumps(r, ensure_ascii=False), flush=True)

    def accuracy(lm_or_none, aid):
        if not records:
            return None
        if lm_or_none is None:
            res = evaluate_model_dir(model_dir, records, work / "eval" / aid, device="cpu",
                                     batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, model_name=aid)
        else:
            res = evaluate_artefact(lm_or_none, tok, records, work / "eval" / aid, eos_ids=eos,
                                    batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, model_name=aid)
        return res["overall"]["accuracy"]

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True).eval()
    n_params = sum(p.numel() for p in model.parameters())
    st_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    row("PyTorch (transformers)", "safetensors fp32", st_bytes, None, decode_torch(model, ids, args.new_tokens),
        accuracy(None, "pytorch"))
    del model

    t0 = time.perf_counter()
    (fp32,) = export_onnx(model_dir, work / "onnx", quant=("fp32",))
    t_fp32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    int8 = quantize_int8(fp32, work / "onnx" / "int8")
    t_int8 = time.perf_counter() - t0
    for folder, fmt, t in ((fp32, "ONNX fp32", t_fp32), (int8, "ONNX int8", t_int8)):
        lm = OnnxCausalLM(folder, threads=args.threads)
        row("onnxruntime", fmt, onnx_file_bytes(folder / "model.onnx"), round(t, 2),
            decode_onnx(lm, ids, args.new_tokens), accuracy(lm, f"onnx-{folder.name}"))
        del lm

    have_llama = llama_cpp_available()
    ggufs = {}
    for t in ("f16", "q8_0"):
        t0 = time.perf_counter()
        (ggufs[t],) = export_gguf(model_dir, work / "gguf", quant=(t,), name=name)
        ggufs[t] = (ggufs[t], time.perf_counter() - t0)
    if have_llama:
        t0 = time.perf_counter()
        p = requantize_with_llamacpp(ggufs["f16"][0], work / "gguf" / f"{name}-q4_k_m.gguf", "q4_k_m")
        ggufs["q4_k_m"] = (p, time.perf_counter() - t0)
    n_ctx = max(512, len(ids) + args.new_tokens + 8)
    if records:
        n_ctx = max(n_ctx, max(len(tok.apply_chat_template([m for m in r["messages"] if m["role"] != "assistant"],
                                                           add_generation_prompt=True, tokenize=True,
                                                           return_dict=False)) for r in records)
                    + args.max_new_tokens + 8)
    for t, (path, secs) in ggufs.items():
        if have_llama:
            with LlamaCppLM(path, n_ctx=n_ctx, threads=args.threads) as lm:
                row("llama.cpp", f"GGUF {t}", path.stat().st_size, round(secs, 2),
                    decode_llama_cpp(lm, ids, args.new_tokens), accuracy(lm, f"gguf-{t}"))
        else:
            row("llama.cpp (not installed)", f"GGUF {t}", path.stat().st_size, round(secs, 2), None, None)
    base = rows[0]["decode_tok_s"]
    for r in rows:
        r["speedup_vs_pytorch"] = r["decode_tok_s"] / base if r["decode_tok_s"] else None
        r["accuracy_vs_pytorch"] = (r["accuracy"] - rows[0]["accuracy"]) if r["accuracy"] is not None and \
            rows[0]["accuracy"] is not None else None
    return rows


# ----------------------------------------------------------------------------------------- output


def markdown(rows: list[dict]) -> str:
    def mb(b):
        return f"{b / 1e6:,.1f}" if b else "–"

    def f(v, fmt):
        return fmt.format(v) if v is not None else "–"

    lines = ["| model | runtime | format | size (MB) | export (s) | decode tokens/s | vs PyTorch | task accuracy | "
             "Δ accuracy (points) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['format']} | {mb(r['bytes'])} | {f(r['export_s'], '{}')} | "
                     f"{f(r['decode_tok_s'], '{:,.1f}')} | {f(r['speedup_vs_pytorch'], '{:.2f}x')} | "
                     f"{f(r['accuracy'], '{:.3f}')} | {f(r['accuracy_vs_pytorch'] * 100 if r['accuracy_vs_pytorch'] is not None else None, '{:+.1f}')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", type=Path, help="model folders (e.g. runs/quickstart/latest/sft/merged)")
    ap.add_argument("--size-100m", action="store_true", help="also a ~100M-parameter Llama from a config (random weights)")
    ap.add_argument("--tiny-config", action="store_true", help="a tiny random Llama instead (smoke test)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer folder for the config-built model (default: the first "
                                                  "model's)")
    ap.add_argument("--records", type=int, default=100, help="test records per task for the accuracy (default 100)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=100, help="batch size of the PyTorch / ONNX task evaluation")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="answer length cap in the task evaluation")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.models and not (args.size_100m or args.tiny_config):
        ap.error("give a model folder and/or --size-100m")
    tok_dir = args.tokenizer or (args.models[0] if args.models else None)
    if (args.size_100m or args.tiny_config) and tok_dir is None:
        ap.error("--size-100m needs --tokenizer DIR (or a model folder to take it from)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_export_"))
    load_before = os.getloadavg()
    rows = []
    for m in args.models:
        name = "-".join(m.resolve().parts[-2:])  # e.g. sft-merged, distill-student
        rows += bench_model(m, name, work / name, scenario_records(m, args.records), args)
    for flag, cfg, name in ((args.size_100m, CONFIG_100M, "llama-100m-random"),
                            (args.tiny_config, CONFIG_TINY, "llama-tiny-random")):
        if flag:
            d = build_random_llama(work / name / "model", tok_dir, cfg)
            rows += bench_model(d, name, work / name, None, args)
    result = {"rows": rows, "threads": args.threads, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
              "records_per_task": args.records, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "cpu_count": os.cpu_count()}
    print(markdown(rows))
    print(f"load average before/after (1 min): {load_before[0]:.2f} / {result['loadavg_after'][0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
