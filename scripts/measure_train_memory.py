"""Measure the peak memory of real training steps on CPU, to validate ``banklm plan`` (finetune/plan.py).

    python scripts/measure_train_memory.py --arch llama --hidden 64 --layers 2 --heads 4 --kv-heads 2 \
        --intermediate 128 --vocab 1000 --method lora --batch-size 4 --seq-len 128 [--grad-ckpt] [--json out.json]

A fresh process builds the model from a config (random weights: memory does not depend on their values),
applies the same pieces as banklm's trainer (finetune/sft.py): PEFT LoRA on all linear layers (QLoRA: bitsandbytes
NF4 + ``prepare_model_for_kbit_training``), TRL's fused
LM head (``add_fused_lm_head``, what ``SFTTrainer`` computes the loss with), rows packed by
``banklm.finetune.sft.PackedRowsCollator`` (position ids restart per example, labels only on completions),
transformers' activation checkpointing, and ``torch.optim.AdamW(fused=True)`` (the Trainer's default
``adamw_torch_fused``). It runs ``--steps`` optimizer steps of forward, backward, step, ``zero_grad``.

``--kd-teacher-layers N`` measures logit distillation with a live teacher instead (distill/logit.py,
``kd_trainer_class().compute_loss``): a frozen teacher (the student's config with ``N`` layers, optionally
wider; fp32, or bf16 with ``--precision bf16``; eval mode) is built next to the student; each step runs the
student's forward with its full logits (no fused LM head: KD compares whole distributions), the teacher's
forward under ``no_grad`` in the same autocast, ``banklm.distill.losses.kd_loss`` (``--kd-alpha``,
``--kd-divergence``, ``--kd-temperature``), backward, AdamW step. ``--prompt-fraction 0`` scores every token.

Memory is read from PyTorch's CPU allocator through the profiler: with ``profile_memory=True`` every
allocation event carries the allocator's running total of live tensor bytes (``total_allocated``), so the
peak is exact (the CPU analogue of ``torch.cuda.max_memory_allocated``) and free of malloc/RSS noise.
Profiling starts before the model is built, so the total includes the weights. The peak resident set size
(VmHWM, reset after the imports) is printed too, as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_model(args, tmp: Path):
    """The model as finetune/sft.py prepares it for ``--method`` and ``--precision`` (CUDA's choices for bf16)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  max_position_embeddings=max(1024, args.seq_len), tie_word_embeddings=args.tie, use_cache=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = (LlamaConfig(**common) if args.arch == "llama"
              else Qwen2Config(**common, use_sliding_window=False))
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=args.attn)
    if args.method == "qlora":   # NF4 needs a from_pretrained load: save the random weights, reload them 4-bit
        from banklm.finetune.models import bnb_config

        model.save_pretrained(tmp)
        del model
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=bnb_config("4bit", "cpu"),
                                                     device_map={"": "cpu"}, dtype=dtype, attn_implementation=args.attn)
    elif args.method == "lora" and args.precision == "bf16":
        model = model.to(torch.bfloat16)   # LoRA on CUDA: a bf16 base (adapters stay fp32, PEFT's default)
    return model


def build_teacher(args):
    """The live KD teacher: the student's config (same vocabulary and heads) with ``--kd-teacher-layers`` layers
    and optionally a wider ``--kd-teacher-hidden`` / ``--kd-teacher-intermediate``; fp32 (bf16 for
    ``--precision bf16``), frozen, eval mode (what ``banklm.distill.logit.load_teacher`` returns)."""
    import torch

    keys = ("layers", "hidden", "intermediate", "method")
    saved = {k: getattr(args, k) for k in keys}
    args.layers, args.method = args.kd_teacher_layers, "full"
    args.hidden = args.kd_teacher_hidden or args.hidden
    args.intermediate = args.kd_teacher_intermediate or args.intermediate
    try:
        with tempfile.TemporaryDirectory() as tmp:
            teacher = build_model(args, Path(tmp))
    finally:
        for k, v in saved.items():
            setattr(args, k, v)
    if args.precision == "bf16":   # the CUDA regime: load_teacher(dtype="auto") gives a bf16 teacher
        teacher = teacher.to(torch.bfloat16)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def make_batches(args, n: int):
    """Packed rows of ``seq_len`` tokens: examples of 40-120 tokens, the first ``--prompt-fraction`` (60%) of each
    a prompt (label -100)."""
    import torch
    from banklm.finetune.sft import PackedRowsCollator

    rng = random.Random(0)
    collate = PackedRowsCollator(pad_token_id=3)
    batches = []
    for _ in range(n):
        rows = []
        for _ in range(args.batch_size):
            ids, labels, lengths = [], [], []
            while len(ids) < args.seq_len:
                k = min(rng.randint(40, 120), args.seq_len - len(ids))
                toks = [rng.randrange(4, args.vocab) for _ in range(k)]
                cut = int(args.prompt_fraction * k)
                ids += toks
                labels += [-100] * cut + toks[cut:]
                lengths.append(k)
            rows.append({"input_ids": ids, "labels": labels, "seq_lengths": lengths})
        batches.append(collate(rows))
    assert all(b["input_ids"].shape == (args.batch_size, args.seq_len) for b in batches)
    return batches, torch


def run(args) -> dict:
    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    from trl.trainer.utils import add_fused_lm_head

    torch.set_num_threads(args.threads)
    batches, _ = make_batches(args, args.steps)
    hwm_reset = _reset_hwm()
    rss0 = _status_kb("VmRSS") * 1024
    marks: dict[str, int] = {}
    phases: list[tuple[str, int]] = []  # (name, time) at the end of each phase of each step

    with tempfile.TemporaryDirectory() as tmp, \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        marks["build"] = time.time_ns()
        model = build_model(args, Path(tmp))
        kd = args.kd_teacher_layers > 0
        teacher = build_teacher(args) if kd else None
        if not kd:   # KD's compute_loss calls the model without fused_lm_head: plain full logits
            add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does, before PEFT
        peft = args.method in ("lora", "qlora")
        if peft:
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

            if args.method == "qlora":
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.grad_ckpt)
            cfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=args.lora_dropout,
                             target_modules="all-linear", task_type="CAUSAL_LM", bias="none")
            model = get_peft_model(model, cfg)
            if args.method == "qlora" and args.precision == "bf16":   # SFTTrainer casts QLoRA adapters to bf16
                for p in model.parameters():
                    if p.requires_grad:
                        p.data = p.data.to(torch.bfloat16)
        if args.grad_ckpt:
            model.gradient_checkpointing_enable()
            if peft:
                model.enable_input_require_grads()
        model.train()
        backbone_done: list[int] = []   # when the final norm ran: activations are all saved, the loss not begun
        final_norm = (model.get_base_model() if peft else model).model.norm
        final_norm.register_forward_hook(lambda *_: backbone_done.append(time.time_ns()))
        head_done: list[int] = []       # when the loss and the final norm have back-propagated
        final_norm.register_full_backward_hook(lambda *_: head_done.append(time.time_ns()))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        weights += sum(b.numel() * b.element_size() for b in model.buffers())
        trainable = sum(p.numel() for p in params)
        teacher_bytes = 0 if teacher is None else sum(
            t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
        marks["train"] = time.time_ns()
        losses = []
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
        for i, batch in enumerate(batches):
            if kd:
                loss = _kd_step(args, model, teacher, batch, autocast)
            else:
                with autocast:   # the Trainer autocasts forward and loss (bf16=True), not the backward
                    out = model(**batch, fused_lm_head=True)
                    n = out.label_mask.sum().clamp(min=1)
                    loss = -out.log_probs.sum() / n
                _ = (out.entropy.detach().sum() / n).item(), out.is_top1.sum().item()  # the trainer's metrics
                del out
            phases.append((f"step{i}.forward", time.time_ns()))
            loss.backward()
            phases.append((f"step{i}.loss_backward", head_done[-1]))
            phases.append((f"step{i}.layer_backward", time.time_ns()))
            opt.step()
            opt.zero_grad(set_to_none=True)
            phases.append((f"step{i}.optimizer", time.time_ns()))
            losses.append(float(loss))
            del loss
        marks["end"] = time.time_ns()
    peak_rss = _status_kb("VmHWM") * 1024

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    allocs = sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if n.tag == _EventType.Allocation and str(n.extra_fields.device) == "cpu"),
                    key=lambda n: n.start_time_ns)
    totals = [(n.start_time_ns, n.extra_fields.total_allocated) for n in allocs]
    # the profiler's clock is the wall clock in ns: split the events by the marks taken during the run
    peak = max(t for ts, t in totals if ts >= marks["train"])
    def at(t_ns: int) -> int:
        before = [t for ts, t in totals if ts <= t_ns]
        return int(before[-1]) if before else 0

    # bytes held when the backbone's forward ends, minus those held before the step (weights, optimizer)
    starts = [marks["train"]] + [t for name, t in phases if name.endswith(".optimizer")][:-1]
    activations = [at(done) - at(start) for start, done in zip(starts, backbone_done, strict=True)]
    by_phase, start = {}, marks["train"]
    for name, end in phases:
        inside = [t for ts, t in totals if start <= ts < end]
        by_phase[name] = int(max(inside)) if inside else None
        start = end
    return {
        "peak_bytes": int(peak),
        "weights_bytes": int(weights),
        "trainable_params": int(trainable),
        "total_params": int(sum(p.numel() for p in model.parameters())),
        "teacher_params": 0 if teacher is None else int(sum(p.numel() for p in teacher.parameters())),
        "teacher_bytes": int(teacher_bytes),
        "scored_positions": [int((b["labels"][:, 1:] != -100).sum()) for b in batches],   # kd_loss's rows
        "peak_by_phase": by_phase,
        "activation_bytes": activations[-1],
        "peak_rss_delta_bytes": int(peak_rss - rss0) if hwm_reset else None,
        "losses": losses,
        "seconds": round((marks["end"] - marks["train"]) / 1e9, 2),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }


def _kd_step(args, model, teacher, batch, autocast):
    """One KD loss as ``banklm.distill.logit.kd_trainer_class().compute_loss`` computes it (live teacher): the
    student's and the teacher's outputs (with their full logits) live until the loss is built, then only
    what autograd saved is left for the backward."""
    import torch
    from banklm.distill.losses import kd_loss

    fwd = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    num_items = (batch["labels"][:, 1:] != -100).sum()   # the Trainer's num_items_in_batch (shifted labels)
    with autocast:   # accelerate's autocast around compute_loss
        outputs = model(**fwd, use_cache=False)
        with torch.no_grad():   # compute_loss enters the same autocast again (already active here)
            t_out = teacher(**fwd, use_cache=False)
            teacher_logits = t_out.logits
        parts = kd_loss(outputs.logits, batch["labels"], teacher_logits=teacher_logits, num_items=num_items,
                        kind=args.kd_divergence, temperature=args.kd_temperature, alpha=args.kd_alpha)
    _ = float(parts["kd"].detach()), float(parts["ce"].detach())   # the trainer's kd_loss / ce_loss metrics
    return parts["loss"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: what banklm does on CUDA (bf16 base for LoRA, NF4 + fp32 upcasts for QLoRA, fp32 "
                        "master weights for full), with bf16 autocast")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--prompt-fraction", type=float, default=0.6,
                   help="share of each packed example that is prompt (label -100); 0: every token is scored")
    p.add_argument("--kd-teacher-layers", type=int, default=0,
                   help="> 0: logit distillation from a live frozen teacher with this many layers")
    p.add_argument("--kd-teacher-hidden", type=int, default=0, help="teacher hidden size (default: the student's)")
    p.add_argument("--kd-teacher-intermediate", type=int, default=0,
                   help="teacher MLP width (default: the student's)")
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--kd-divergence", choices=["forward", "reverse", "jsd"], default="forward")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the result here too")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
