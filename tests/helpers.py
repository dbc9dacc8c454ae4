"""What several test modules share: the repository path, the small quickstart, the CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from banklm.runtime import llama_cpp_available

REPO = Path(__file__).resolve().parent.parent

# The quickstart recipe sized down to about two minutes on CPU (same code path; LoRA so that the
# adapter -> merge -> export path runs end to end). Built once per session by `quickstart_run`.
QUICKSTART_SMALL = [
    "corpora.scenario.synth.credit.train=400", "corpora.scenario.synth.aml.train=400",
    "corpora.scenario.synth.audit.train=400", "corpora.scenario.synth.credit.test=20",
    "corpora.scenario.synth.aml.test=20", "corpora.scenario.synth.audit.test=20",
    "corpora.scenario.synth.credit.validation=40", "corpora.scenario.synth.aml.validation=40",
    "corpora.scenario.synth.audit.validation=40", "corpora.scenario.synth.aml.test_prevalence=100",
    "export.eval_limit=10",  # each artefact scored on 10 records per task, both decodings
    "cpt.time_budget_s=15", "train.time_budget_s=20", "eval.limit=20", "tokenizer.vocab_size=1500",
    "train.method=lora", "train.lr=3e-3", "eval.robustness=[distractor]",
    "distill.enabled=false",  # the sft model stays the final one here; distillation: tests/test_distill.py
]


def run_banklm(*args, cwd):
    """The real CLI in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "banklm.cli", *args], capture_output=True, text=True, cwd=cwd)


def require_llama_cpp() -> None:
    """scripts/test.sh installs llama-cpp-python and sets BANKLM_REQUIRE_LLAMACPP=1: there, a missing
    binding fails the llama.cpp tests instead of skipping them."""
    if not llama_cpp_available():
        if os.environ.get("BANKLM_REQUIRE_LLAMACPP") == "1":
            pytest.fail("llama-cpp-python is not installed but BANKLM_REQUIRE_LLAMACPP=1 (pip install 'banklm[llamacpp]')")
        pytest.skip("llama-cpp-python not installed (scripts/test.sh installs it)")


def sharpened_tiny_model(work: Path, texts: list[str], *, vocab_size: int = 1000, seed: int = 3):
    """``(folder, model, tokenizer)``: a sharpened 2-layer Llama (hidden 64) with a SentencePiece tokenizer trained
    on ``texts``: far from uniform, so label probabilities differ and a wrong position or cache shows."""
    import torch
    import transformers
    from banklm.finetune.models import build_tiny_model
    from banklm.finetune.tokenizer import load_tokenizer, train_tokenizer

    from tests.export_models import sharpen

    tok_dir = train_tokenizer(texts, work / "tok", vocab_size=vocab_size)
    d = build_tiny_model("llama", tok_dir, work / "model", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, max_position_embeddings=1024, tie_word_embeddings=True, seed=seed)
    sharpen(d, seed=5)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    return d, model, load_tokenizer(d)


def train_on_answers(model, tok, records: list[dict], *, steps: int, batch: int = 16, lr: float = 5e-3, seed: int = 0):
    """Train ``model`` in place on the records' answers (loss on the assistant turn only; warm-up then cosine),
    a plain loop for tests that need a model which learnt something specific. Returns it in eval mode."""
    import random

    import numpy as np
    import torch

    data = []
    for rec in records:
        prompt = tok(tok.apply_chat_template(rec["messages"][:-1], add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
        full = tok(tok.apply_chat_template(rec["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
        data.append((full, len(prompt)))
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + np.cos(np.pi * s / steps)))
    model.train()
    for _ in range(steps):
        rows = rng.sample(data, batch)
        width = max(len(f) for f, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for i, (f, n) in enumerate(rows):
            ids[i, :len(f)], mask[i, :len(f)], labels[i, n:len(f)] = torch.tensor(f), 1, torch.tensor(f[n:])
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model.eval()


def post_loan_records(task, n: int) -> list[dict]:
    """``n`` records of the POST_LOAN spec (tests/test_task_spec.py) covering its rules."""
    import random

    from tests.test_task_spec import fields

    out = []
    for i in range(n):
        f = fields(逾期天数=[0, 120, 40, 0][i % 4], 是否涉诉=i % 3 == 0, 五级分类=["正常", "次级"][i % 2])
        task.derive(f)
        out.append(task.make_record(f"post_loan-{i}", f, random.Random(i)))
    return out
