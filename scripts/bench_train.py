"""Benchmark LoRA SFT throughput: banklm's defaults against a plain transformers ``Trainer`` + PEFT baseline.

    python scripts/bench_train.py [--models quickstart 100m] [--configs banklm baseline ...] [--repeats 3]
                                  [--json out.json]

1. Builds the scenario mix (credit, AML and audit records from ``banklm.corpora.synth``, the generators behind the
   scenario corpus and ``banklm.tasks``' rules), trains a SentencePiece tokenizer on it (vocab 2000, as the
   quickstart) and builds the models from configs (``banklm.finetune.models.build_tiny_model``):
   ``quickstart`` (hidden 256, 4 layers, FFN 768, tied embeddings) and ``100m`` (hidden 768, 12 layers,
   FFN 2560: about 100M parameters). None of this is timed.
2. Times a large ``torch.matmul`` (fp32 and bf16, n=2048, best of 5) for this CPU's dense-matmul peak.
3. Runs every (model, configuration) in a fresh child process (clean peak memory, same threads):
   - ``banklm``: ``banklm.finetune.sft.train_causal_lm`` with the recipe defaults: LoRA r=16, alpha 32, dropout 0
     on all linear layers, completion-only loss (LM head on the label positions), ``packing: auto`` (for SFT:
     each batch's examples, in random order, concatenated into one row without padding, attention within
     each example by ``banklm.finetune.attention``'s varlen kernel; max_length 512), bf16 autocast with the frozen
     base in bf16 (CPU ``mixed_precision: auto``), ``compile: auto``. The run is given a 1-hour time budget,
     as a user's real run would have, and cut by ``--steps``: ``auto`` then compiles each decoder layer
     with ``torch.compile`` (a budget of 5 minutes or more). The compiling happens in the warm-up steps,
     whose time the table shows;
   - ``banklm-eager``: the same with ``compile: false`` (what runs shorter than 5 minutes get);
   - ``banklm-packed``: the same with ``packing: true`` (examples packed into rows of 512 by TRL's best-fit
     decreasing, the rows flattened the same way: batch = rows);
   - ``banklm-padded``: the same with ``packing: false`` (one example per row, right-padded, no mask; eager
     attention for rows up to 256 tokens);
   - ``banklm-fp32``: the same as ``banklm`` with ``mixed_precision: no`` (fp32 base, no autocast, sdpa);
   - ``baseline``: ``transformers.Trainer`` + PEFT (the same LoRA), each example padded to the longest in its
     batch, no packing, the Trainer's default fp32, the same completion-only labels;
   - ``baseline-bf16``: the baseline with bf16 autocast (fp32 weights, as ``Trainer(bf16=True)`` does).
   Same per-device batch size for all (examples; packed rows for ``banklm-packed``), AdamW, LR 2e-4; every
   configuration logs every step.
   With ``--repeats N`` the whole set runs N times, round-robin (a slow spell of a shared machine hits every
   configuration alike), and each figure is the median over the N runs; the speed-up is the median of
   the per-round ratios to ``baseline`` in the same round, with its range.
4. Reports real (non-pad) tokens per second in the steady state (from the end of the warm-up steps to the
   last step), the speed-up over ``baseline`` measured in the same run, peak resident memory, and model
   FLOPs utilisation: useful FLOPs per real token = 4 x matmul weights (forward + input gradients; frozen
   weights need no weight gradients) + 6 x LoRA weights + 12 x layers x hidden x mean attended context,
   times real tokens/s, over the measured peak of the run's compute dtype. Padding (of rows, or of
   examples inside the varlen attention) is work the hardware does but the model did not need: not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {
    "quickstart": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=768),
    "100m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2560),
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64),  # smoke test
}
CONFIGS = ("banklm", "banklm-eager", "banklm-packed", "banklm-padded", "banklm-fp32", "baseline", "baseline-bf16")
PACKING = {"banklm-packed": True, "banklm-padded": False}  # the others: packing auto
LORA = dict(r=16, alpha=32, dropout=0.0)  # banklm.finetune.config.LoraSettings defaults (--lora-dropout to change)
LR = 2e-4
MAX_LENGTH = 512
LONG_RUN_S = 3600


# --------------------------------------------------------------------------- setup (not timed)


def build_inputs(workdir: Path, models: list[str], n_per_task: int, seed: int) -> dict:
    from banklm.corpora.synth import generate_all
    from banklm.finetune.models import build_tiny_model
    from banklm.finetune.tokenizer import render_chat, train_tokenizer

    records = generate_all(n_per_task, seed, "train")
    data = workdir / "train.jsonl"
    data.write_text("\n".join(json.dumps({"id": r["id"], "messages": r["messages"]}, ensure_ascii=False)
                              for r in records) + "\n", encoding="utf-8")
    tok = train_tokenizer([render_chat(r["messages"]) for r in records], workdir / "tokenizer", vocab_size=2000,
                          seed=seed)
    dirs = {}
    for name in models:
        dirs[name] = str(build_tiny_model("llama", tok, workdir / f"model-{name}", max_position_embeddings=1024,
                                          seed=seed, **MODELS[name]))
    return {"data": str(data), "models": dirs, "records": len(records)}


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
    """Best-of-``repeats`` FLOP/s of an n x n x n matmul, fp32 and bf16."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n**3 / best
    return out


# --------------------------------------------------------------------------- one configuration (child process)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _completion_rows(tok, records: list[dict]) -> list[dict]:
    """input_ids + labels with the prompt masked: what TRL's completion-only loss trains, built by hand."""
    rows = []
    for r in records:
        prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(r["messages"], tokenize=False)
        p_ids = tok.encode(prompt, add_special_tokens=False)
        ids = tok.encode(full, add_special_tokens=False)[:MAX_LENGTH]
        rows.append({"input_ids": ids, "labels": [-100] * len(p_ids) + ids[len(p_ids):]})
    return rows


def run_banklm(model_dir: str, records: list[dict], out: Path, steps: int, batch: int, bf16: bool, probe,
               packing: bool | str = "auto", compile: bool | str = "auto", time_budget_s: float = LONG_RUN_S) -> list:
    from banklm.finetune.config import TrainConfig
    from banklm.finetune.sft import train_causal_lm
    from datasets import Dataset

    # a long run (a 1-hour budget, as a user's run would have) cut after ``steps`` steps: what compile: auto sees
    config = TrainConfig(method="lora", lr=LR, max_steps=steps, time_budget_s=time_budget_s, batch_size=batch,
                         max_length=MAX_LENGTH, lora=LORA, logging_steps=1, packing=packing, compile=compile)
    train_causal_lm(model_dir, Dataset.from_list(records), None, out, config, device="cpu", merge=False,
                    progress=False, tensorboard=False, mixed_precision="auto" if bf16 else "no", callbacks=[probe])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["step"], r["seconds"], r["tokens_seen"]) for r in rows if "tokens_seen" in r]


def run_baseline(model_dir: str, records: list[dict], out: Path, steps: int, batch: int, bf16: bool, probe) -> list:
    import torch
    from banklm.finetune.tokenizer import load_tokenizer
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    tok = load_tokenizer(model_dir)
    ds = Dataset.from_list(_completion_rows(tok, records))
    counted = {"tokens": 0}

    def pad_to_longest(examples):
        n = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), n), tok.pad_token_id)
        labels = torch.full((len(examples), n), -100)
        mask = torch.zeros((len(examples), n), dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
        counted["tokens"] += int(mask.sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    t0 = time.perf_counter()
    marks = []

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            nonlocal t0
            t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            marks.append((state.global_step, time.perf_counter() - t0, counted["tokens"]))

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=LR,
                             warmup_steps=0.05, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, bf16=bf16, dataloader_pin_memory=False,
                             remove_unused_columns=False, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=ds, data_collator=pad_to_longest,
            callbacks=[Marks(), probe]).train()
    return marks


def child(spec: dict) -> dict:
    import torch
    from banklm.finetune.models import count_parameters, load_model
    from transformers import TrainerCallback

    with open(spec["data"], encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    rss_train_begin = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rss_train_begin["mb"] = _rss_mb()

    bf16 = spec["config"] not in ("banklm-fp32", "baseline")
    args = (spec["model_dir"], records, Path(spec["out"]), spec["steps"], spec["batch"], bf16, Probe())
    if spec["config"].startswith("banklm"):
        marks = run_banklm(*args, packing=PACKING.get(spec["config"], "auto"),
                           compile=False if spec["config"] == "banklm-eager" else "auto",
                           time_budget_s=spec["time_budget_s"])
    else:
        marks = run_baseline(*args)
    summary = Path(spec["out"]) / "train_summary.json"
    compiled = json.loads(summary.read_text(encoding="utf-8")).get("compiled") if summary.is_file() else None
    (s0, t0, k0), (s1, t1, k1) = next(m for m in marks if m[0] == spec["warmup"]), marks[-1]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    model = load_model(spec["model_dir"], device="cpu")
    _, total = count_parameters(model)
    return {"model": spec["model"], "config": spec["config"], "batch": spec["batch"], "steps": s1,
            "timed_steps": s1 - s0, "seconds": t1 - t0, "warmup_seconds": t0, "real_tokens": k1 - k0, "tokens_per_s": (k1 - k0) / (t1 - t0),
            "tokens_per_step": (k1 - k0) / (s1 - s0), "params": total, "peak_rss_mb": peak_mb,
            "rss_at_train_begin_mb": rss_train_begin.get("mb"), "compute_dtype": "bf16" if bf16 else "fp32",
            "compiled": compiled, "step_seconds": [round(b[1] - a[1], 4) for a, b in zip(marks, marks[1:], strict=False)],
            "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- FLOPs


def flops_per_token(model_dir: str, data: str) -> float:
    """Useful training FLOPs per real token for LoRA SFT (see the module docstring)."""
    from banklm.finetune.tokenizer import load_tokenizer

    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    d, L, f, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    matmul = L * (d * d * 2 + d * kv * 2 + 3 * d * f) + V * d  # q,o + k,v + MLP, + the LM head
    r = LORA["r"]
    lora = L * r * ((d + d) * 2 + (d + kv) * 2 + 2 * (d + f) + (f + d))
    tok = load_tokenizer(model_dir)
    with open(data, encoding="utf-8") as fh:
        texts = [tok.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in fh]
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)  # mean keys a causal token attends to
    return 4 * matmul + 6 * lora + 12 * L * d * context


# --------------------------------------------------------------------------- summary


def summarise(runs: list[dict], peak: dict) -> dict:
    """One (model, config) over its rounds: medians, the speed-up's range, the largest peak memory."""
    from statistics import median

    out = dict(runs[0])
    for key in ("tokens_per_s", "tokens_per_step", "seconds", "warmup_seconds", "rss_at_train_begin_mb"):
        vals = [r[key] for r in runs if r[key] is not None]
        out[key] = median(vals) if vals else None
    out["mfu"] = out["tokens_per_s"] * out["flops_per_token"] / peak[out["compute_dtype"]]
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["load_avg_1min_after"] = max(r["load_avg_1min_after"] for r in runs)
    speedups = [r["speedup_vs_baseline"] for r in runs if r["speedup_vs_baseline"] is not None]
    out["speedup_vs_baseline"] = median(speedups) if speedups else None
    out["speedup_range"] = [min(speedups), max(speedups)] if speedups else None
    out["rounds"] = [r["tokens_per_s"] for r in runs]
    out.pop("round", None)
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["quickstart", "100m"], choices=list(MODELS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, nargs="+", default=[40, 8], help="optimizer steps per model (in order)")
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing")
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 4], help="per-device batch per model (in order)")
    ap.add_argument("--per-task", type=int, default=600, help="generated training records per task")
    ap.add_argument("--time-budget", type=float, default=LONG_RUN_S,
                    help="seconds of budget banklm's runs are given (the run is cut by --steps); compile: auto "
                         "compiles from 300 s on")
    ap.add_argument("--lora-dropout", type=float, default=LORA["dropout"], help="for banklm and the baseline")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all configurations; medians reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        LORA["dropout"] = spec["lora_dropout"]
        print("RESULT " + json.dumps(child(spec)), flush=True)
        return
    LORA["dropout"] = args.lora_dropout

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_"))
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(workdir, args.models, args.per_task, args.seed)
    peak = matmul_peak()
    import psutil

    load_before = os.getloadavg()
    runs = []  # one per (round, model, config)
    for rnd in range(args.repeats):
        for i, name in enumerate(args.models):
            steps = args.steps[min(i, len(args.steps) - 1)]
            batch = args.batch[min(i, len(args.batch) - 1)]
            fpt = flops_per_token(inputs["models"][name], inputs["data"])
            for config in args.configs:
                spec = {"model": name, "config": config, "model_dir": inputs["models"][name], "data": inputs["data"],
                        "out": str(workdir / f"out-{name}-{config}-{rnd}"), "steps": steps, "batch": batch,
                        "warmup": min(args.warmup, steps - 1), "lora_dropout": args.lora_dropout,
                        "time_budget_s": args.time_budget}
                cpu0 = psutil.cpu_times()
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                      text=True, cwd=workdir)
                if proc.returncode != 0:
                    sys.exit(f"{name}/{config} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
                res["round"] = rnd
                res["flops_per_token"] = fpt
                res["mfu"] = res["tokens_per_s"] * fpt / peak[res["compute_dtype"]]
                busy = psutil.cpu_times()
                res["load_avg_1min_after"] = os.getloadavg()[0]
                res["cpu_busy_share"] = 1 - (busy.idle - cpu0.idle) / max(1e-9, sum(busy) - sum(cpu0))
                runs.append(res)
                print(f"round {rnd + 1}/{args.repeats} {name:>10} {config:<14} {res['tokens_per_s']:9.0f} real tok/s  "
                      f"MFU {100 * res['mfu']:.1f}%  peak {res['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    for r in runs:
        base = next((b for b in runs if b["model"] == r["model"] and b["round"] == r["round"]
                     and b["config"] == "baseline"), None)
        r["speedup_vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
    results = [summarise([r for r in runs if r["model"] == m and r["config"] == c], peak)
               for m in args.models for c in args.configs]

    print(f"\nmatmul peak (n=2048): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s; "
          f"{psutil.cpu_count()} CPUs, load average before {load_before[0]:.2f}; LoRA r={LORA['r']} "
          f"alpha={LORA['alpha']} dropout={LORA['dropout']}; {args.repeats} round(s), medians\n")
    print("| model | params | config | batch | real tokens/step | real tokens/s | vs baseline (range) | MFU "
          "| warm-up (s) | peak RSS (MB) | RSS at train start (MB) | load avg after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        sp = "-"
        if r["speedup_vs_baseline"] is not None:
            lo, hi = r["speedup_range"]
            sp = f"{r['speedup_vs_baseline']:.2f}x" + (f" ({lo:.2f}-{hi:.2f})" if len(r["rounds"]) > 1 else "")
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['config']} | {r['batch']} | {r['tokens_per_step']:,.0f} "
              f"| {r['tokens_per_s']:,.0f} | {sp} | {100 * r['mfu']:.1f}% | {r['warmup_seconds']:.1f} "
              f"| {r['peak_rss_mb']:,.0f} "
              f"| {r['rss_at_train_begin_mb'] or 0:,.0f} | {r['load_avg_1min_after']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"peak_flops": peak, "inputs": inputs, "load_avg_before": load_before,
                                         "repeats": args.repeats, "results": results, "runs": runs}, indent=2),
                             encoding="utf-8")


if __name__ == "__main__":
    main()
