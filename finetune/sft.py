"""Supervised fine-tuning and continued pre-training with TRL ``SFTTrainer`` + PEFT, one function.

:func:`train_causal_lm` trains ``mode="sft"`` (instruction pairs, loss on the answer only) or
``mode="cpt"`` (raw text, plain language-model loss) with ``method`` ``"lora"``, ``"qlora"`` or
``"full"``, and writes into ``out_dir``::

    adapter/              PEFT adapter + tokenizer files (lora/qlora)
    merged/               standalone model: safetensors, tokenizer files, generation_config.json
    metrics.jsonl         one line per log step: step, epoch, loss, learning_rate, tokens_per_s, eval_loss, ...
    train_summary.json    steps, tokens seen, seconds, losses, method, parameter counts, device

Data
----
* SFT: a ``datasets.Dataset`` with ``messages`` (``[user..., assistant]``) becomes TRL's conversational
  prompt/completion form (``prompt`` = all turns but the last, ``completion`` = the last assistant
  turn). TRL renders both with the tokenizer's ChatML template, so the completion tokens are
  ``answer<|im_end|>\\n``: the loss covers the answer *and* the ``<|im_end|>`` that stops generation,
  and nothing of the prompt (``completion_only_loss``). ``prompt``/``completion`` string columns are
  accepted as they are (TRL appends the EOS).
* CPT: a ``text`` column (``messages`` are rendered to text) is tokenized here and ``</s>`` (the
  document separator, not the chat EOS) is appended; every token is a label.
* Padding and EOS: ``pad`` is ``<pad>`` (id 3) and never a label, so no mask hides the EOS.
* Packing uses TRL's best-fit-decreasing packing with ``padding_free``: no attention mask, position
  ids restart at each example, so sdpa/eager attention stays within each example (``use_cache`` is
  off during training; packed batches must never be run with the cache on).

Time budget
-----------
With ``time_budget_s`` the learning-rate schedule runs on *progress* = max(step / planned steps,
elapsed / budget): warmup and cosine/linear decay complete when the budget is spent, and a callback
stops training cleanly then, so a budgeted run ends at a low learning rate instead of being cut at the
peak. Without a budget the schedule is the usual step-based one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from banklm.io import atomic_dir, atomic_write_json, atomic_write_jsonl

from .merge import merge_adapter
from .models import count_parameters, load_model, pick_device, save_model_folder, set_generation_config
from .tokenizer import EOS, copy_tokenizer_files, load_tokenizer, render_chat

MODES = ("sft", "cpt")
METHODS = ("lora", "qlora", "full")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


# --------------------------------------------------------------------------- data


def prepare_sft_dataset(ds, tokenizer=None):
    """Map a ``messages`` dataset to TRL's conversational ``prompt``/``completion`` columns.

    Keeps ``prompt``/``completion`` datasets as they are; every other column is dropped.
    Raises ``ValueError`` naming the row when a conversation does not end with an assistant turn.
    """
    cols = ds.column_names
    if "prompt" in cols and "completion" in cols:
        return ds.select_columns(["prompt", "completion"])
    if "messages" not in cols:
        raise ValueError(f"SFT data needs a 'messages' column (or 'prompt' and 'completion'); got {cols}")

    def split(example, idx):
        msgs = example["messages"]
        if not msgs or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            rid = example.get("id", idx)
            raise ValueError(f"SFT record {rid}: 'messages' must end with an assistant turn after a prompt")
        clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return {"prompt": clean[:-1], "completion": clean[-1:]}

    return ds.map(split, with_indices=True, remove_columns=cols)


def prepare_cpt_dataset(ds, tokenizer, eos_token: str = EOS):
    """Tokenize a ``text`` (or ``messages``) dataset for language-model loss, appending ``eos_token``."""
    cols = ds.column_names
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise ValueError(f"CPT eos_token {eos_token!r} is not in the tokenizer vocabulary")

    if "text" in cols:
        def tok(batch):
            enc = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            return {"input_ids": [ids + [eos_id] for ids in enc]}
    elif "messages" in cols:
        def tok(batch):
            texts = [render_chat(m) for m in batch["messages"]]
            enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
            return {"input_ids": [ids + [eos_id] for ids in enc]}
    else:
        raise ValueError(f"CPT data needs a 'text' (or 'messages') column; got {cols}")
    out = ds.map(tok, batched=True, remove_columns=cols)
    return out.filter(lambda ex: len(ex["input_ids"]) > 1)


# --------------------------------------------------------------------------- collator


class PackedRowsCollator:
    """Batch packed rows as ``[batch, longest]`` with per-example position-id resets and no attention mask.

    TRL's padding-free collator concatenates the whole batch into ONE row, which is ideal for
    flash-attention varlen kernels but costs O((batch*len)^2) with sdpa/eager on CPU. Keeping rows
    separate costs O(batch*len^2); transformers derives a block-diagonal mask from the position ids
    (``find_packed_sequence_indices``) whenever ``attention_mask`` is None, so examples never see each
    other. The first token of each example gets label -100 (it must not be predicted from the previous
    example).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        longest = max(len(ex["input_ids"]) for ex in examples)
        n = len(examples)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), -100, dtype=torch.long)
        position_ids = torch.zeros((n, longest), dtype=torch.long)
        for i, ex in enumerate(examples):
            ids = ex["input_ids"]
            k = len(ids)
            input_ids[i, :k] = torch.as_tensor(ids)
            labels[i, :k] = torch.as_tensor(ex.get("labels", ids))
            lengths = ex.get("seq_lengths") or [k]
            pos = torch.cat([torch.arange(m) for m in lengths])
            position_ids[i, :k] = pos[:k]
            # pad positions: 0 each, so every pad token is its own one-token "sequence"
        labels[position_ids == 0] = -100
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


# --------------------------------------------------------------------------- schedule + callbacks


def _mixed_precision(choice: str, device: str) -> tuple[bool, bool]:
    """(bf16, fp16) autocast flags for the Trainer."""
    import torch

    base = device.split(":")[0]
    if choice == "auto":
        if base == "cuda":
            return (True, False) if torch.cuda.is_bf16_supported() else (False, True)
        return (base == "cpu", False)
    if choice == "bf16":
        return True, False
    if choice == "fp16":
        if base != "cuda":
            raise ValueError("mixed_precision='fp16' needs CUDA; use 'bf16' or 'no'")
        return False, True
    if choice in ("no", "fp32", None):
        return False, False
    raise ValueError(f"mixed_precision must be auto, bf16, fp16 or no, got {choice!r}")


def _lr_factor(progress: float, warmup: float, scheduler: str) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if scheduler == "constant":
        return 1.0
    if warmup > 0 and progress < warmup:
        return progress / warmup
    if scheduler == "constant_with_warmup":
        return 1.0
    rest = (progress - warmup) / max(1e-9, 1.0 - warmup)
    if scheduler == "linear":
        return max(0.0, 1.0 - rest)
    return 0.5 * (1.0 + math.cos(math.pi * rest))


def _make_trainer_class():
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class BudgetTrainer(SFTTrainer):
        """SFTTrainer whose LR schedule follows max(step, time) progress when a time budget is set."""

        banklm_budget: dict | None = None
        banklm_tokens: int = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            if "attention_mask" in inputs:
                self.banklm_tokens += int(inputs["attention_mask"].sum())
            else:
                self.banklm_tokens += int((inputs["input_ids"] != self.processing_class.pad_token_id).sum())
            return super().training_step(model, inputs, num_items_in_batch)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            b = self.banklm_budget
            if b is None or b.get("time_budget_s") is None:
                return super().create_scheduler(num_training_steps, optimizer)
            optimizer = optimizer or self.optimizer
            total = max(1, num_training_steps)

            def factor(step: int) -> float:
                t0 = b.get("t0")
                tfrac = 0.0 if t0 is None else (time.perf_counter() - t0) / b["time_budget_s"]
                return _lr_factor(max(step / total, tfrac), b["warmup_ratio"], b["scheduler"])

            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return self.lr_scheduler

    class Recorder(TrainerCallback):
        """Collects log lines (with tokens/s) and enforces the time budget."""

        def __init__(self, budget: dict):
            self.budget = budget
            self.rows: list[dict] = []
            self.t0: float | None = None
            self.last_t: float | None = None
            self.last_tokens = 0
            self.stopped_by_budget = False
            self.last_train_loss: float | None = None
            self.last_eval_loss: float | None = None
            self.last_eval_step = -1
            self.trainer = None

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last_t = time.perf_counter()
            self.budget["t0"] = self.t0

        def on_step_end(self, args, state, control, **kw):
            lim = self.budget.get("time_budget_s")
            if lim is not None and time.perf_counter() - self.t0 >= lim:
                control.should_training_stop = True
                control.should_log = True
                self.stopped_by_budget = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            now = time.perf_counter()
            row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                                   "seconds": round(now - (self.t0 or now), 3)}
            if "loss" in logs:
                row["loss"] = float(logs["loss"])
                self.last_train_loss = row["loss"]
            if "learning_rate" in logs:
                row["learning_rate"] = float(logs["learning_rate"])
            if "loss" in logs and self.trainer is not None:
                tokens = int(self.trainer.banklm_tokens)
                dt = now - (self.last_t or now)
                if dt > 0 and tokens > self.last_tokens:
                    row["tokens_per_s"] = round((tokens - self.last_tokens) / dt, 1)
                row["tokens_seen"] = tokens
                self.last_tokens, self.last_t = tokens, now
            for k in ("eval_loss", "grad_norm", "mean_token_accuracy", "eval_mean_token_accuracy",
                      "train_loss", "train_runtime"):
                if k in logs:
                    row[k] = float(logs[k])
            if "eval_loss" in logs:
                self.last_eval_loss = float(logs["eval_loss"])
                self.last_eval_step = state.global_step
            self.rows.append(row)

    return BudgetTrainer, Recorder


# --------------------------------------------------------------------------- training


def train_causal_lm(
    model_dir: str | os.PathLike,
    train_ds,
    eval_ds,
    out_dir: str | os.PathLike,
    *,
    mode: str = "sft",
    method: str = "lora",
    lr: float = 2e-4,
    num_epochs: float = 1,
    max_steps: int = -1,
    time_budget_s: float | None = None,
    batch_size: int = 16,
    grad_accum: int = 1,
    max_length: int = 512,
    warmup_ratio: float = 0.05,
    scheduler: str = "cosine",
    weight_decay: float = 0.0,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_targets: str | list[str] = "all-linear",
    use_rslora: bool = False,
    use_dora: bool = False,
    packing: bool = True,
    completion_only_loss: bool = True,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    device: str = "auto",
    logging_steps: int = 10,
    eval_steps: int | None = None,
    save_steps: int | None = None,
    resume: bool = False,
    merge: bool = True,
    merged_dtype: Any = "auto",
    cpt_eos_token: str = EOS,
    num_threads: int | None = None,
    mixed_precision: str = "auto",
) -> dict:
    """Train ``model_dir`` on ``train_ds`` (SFT or CPT; LoRA, QLoRA or full) and write ``out_dir``.

    Returns the training summary (also written to ``out_dir/train_summary.json``). See the module
    docstring for data formats, packing and the time-budget schedule. ``eval_ds`` may be None.
    Intermediate checkpoints (``save_steps``) go to ``out_dir/checkpoints/``; ``resume=True`` continues
    from the latest one.

    ``mixed_precision``: ``"auto"`` = bf16 autocast on CUDA (fp16 where bf16 is unsupported) and on
    CPU (measured 1.7-2x faster than fp32 for the tiny models here; weights and optimizer stay fp32),
    none on MPS; or ``"bf16"``, ``"fp16"``, ``"no"``.
    """
    import torch
    from transformers import set_seed
    from trl import SFTConfig

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if time_budget_s is not None and time_budget_s <= 0:
        raise ValueError(f"time_budget_s must be positive, got {time_budget_s}")
    if len(train_ds) == 0:
        raise ValueError("train_ds is empty")

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(device)
    if num_threads:
        torch.set_num_threads(num_threads)
    set_seed(seed)
    on_cuda = device.startswith("cuda")
    use_bf16, use_fp16 = _mixed_precision(mixed_precision, device)

    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{model_dir}: tokenizer has no pad token (banklm never pads with the EOS)")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{model_dir}: pad token equals the EOS {tokenizer.eos_token!r}; the EOS would be "
                         "masked out of the labels. Give the tokenizer a distinct pad token.")

    # ---- data
    if mode == "sft":
        train_data = prepare_sft_dataset(train_ds, tokenizer)
        eval_data = prepare_sft_dataset(eval_ds, tokenizer) if eval_ds is not None and len(eval_ds) else None
    else:
        train_data = prepare_cpt_dataset(train_ds, tokenizer, cpt_eos_token)
        eval_data = prepare_cpt_dataset(eval_ds, tokenizer, cpt_eos_token) if eval_ds is not None and len(eval_ds) else None

    # ---- model
    quant = "4bit" if method == "qlora" else None
    if method == "qlora" and device == "mps":
        raise ValueError("method=qlora needs bitsandbytes, which does not support MPS; use method=lora")
    model_dtype = torch.float32 if (method == "full" or not on_cuda) else ("bf16" if use_bf16 else "fp16")
    if on_cuda and method != "full" and not (use_bf16 or use_fp16):
        model_dtype = torch.float32
    model = load_model(model_dir, device=device, dtype="auto" if method == "qlora" else model_dtype,
                       quantization=quant)
    model.config.use_cache = False
    model.train()

    peft_model = None
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        targets = lora_targets if isinstance(lora_targets, str) else list(lora_targets)
        peft_cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                              task_type="CAUSAL_LM", use_rslora=use_rslora, use_dora=use_dora, bias="none")
        model = get_peft_model(model, peft_cfg)
        peft_model = model
    trainable, total = count_parameters(model)

    # ---- trainer
    ckpt_dir = out_dir / "checkpoints"
    eval_strategy = "no"
    if eval_data is not None:
        eval_strategy = "steps" if eval_steps else "epoch"
    # transformers 5 renamed gradient_checkpointing -> activation_checkpointing (TRL defaults it to True)
    ckpt_field = "activation_checkpointing" if "activation_checkpointing" in {
        f.name for f in dataclasses.fields(SFTConfig)} else "gradient_checkpointing"
    budget = {"time_budget_s": time_budget_s, "warmup_ratio": warmup_ratio, "scheduler": scheduler}
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        learning_rate=lr,
        num_train_epochs=num_epochs if max_steps is None or max_steps < 0 else 1,
        max_steps=max_steps if max_steps is not None else -1,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        warmup_steps=warmup_ratio,
        lr_scheduler_type=scheduler,
        weight_decay=weight_decay,
        logging_steps=logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        bf16=use_bf16,
        fp16=use_fp16,
        use_cpu=(device == "cpu"),
        dataloader_pin_memory=on_cuda,
        report_to="none",
        torch_compile=False,
        max_length=max_length,
        packing=packing,
        packing_strategy="bfd",
        completion_only_loss=completion_only_loss if mode == "sft" else None,
        dataset_num_proc=None,
        remove_unused_columns=True,
        disable_tqdm=True,
        save_only_model=False,
        **{ckpt_field: gradient_checkpointing},
    )
    BudgetTrainer, Recorder = _make_trainer_class()
    recorder = Recorder(budget)
    trainer = BudgetTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    trainer.banklm_budget = budget
    row_collator = None
    attn = getattr(getattr(trainer.model, "config", None), "_attn_implementation", None)
    if packing and (attn is None or "flash" not in str(attn)):
        row_collator = PackedRowsCollator(tokenizer.pad_token_id)
        trainer.data_collator = row_collator
    recorder.trainer = trainer

    resume_from = None
    if resume and ckpt_dir.is_dir() and any(ckpt_dir.glob("checkpoint-*")):
        resume_from = True
    t_start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - t_start

    final_eval = None
    if eval_data is not None:
        if recorder.last_eval_step == trainer.state.global_step:
            final_eval = {"eval_loss": recorder.last_eval_loss}
        else:
            final_eval = trainer.evaluate()  # on_log records it

    # ---- outputs
    trained = trainer.model
    trained.config.use_cache = True
    if peft_model is not None:
        with atomic_dir(out_dir / "adapter") as tmp:
            trained.save_pretrained(tmp, safe_serialization=True)
            copy_tokenizer_files(model_dir, tmp)
        _fix_adapter_base_path(out_dir / "adapter", model_dir)
        if merge:
            merge_adapter(model_dir, out_dir / "adapter", out_dir / "merged", merged_dtype,
                          dequantize_from=quant)
    else:
        set_generation_config(trained, tokenizer)
        if merged_dtype not in (None, "auto"):
            from .models import resolve_dtype

            trained = trained.to(resolve_dtype(merged_dtype, "cpu"))
        save_model_folder(trained, out_dir / "merged", model_dir)
    if not save_steps and ckpt_dir.is_dir():
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    tokens_seen = int(trainer.banklm_tokens)
    stopped_by = "time_budget" if recorder.stopped_by_budget else ("max_steps" if max_steps and max_steps > 0
                                                                    else "epochs")
    summary = {
        "mode": mode,
        "method": method,
        "steps": int(trainer.state.global_step),
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "tokens_seen": int(tokens_seen),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens_seen / seconds, 1) if seconds > 0 else None,
        "final_loss": recorder.last_train_loss,
        "mean_train_loss": float(result.training_loss) if result.training_loss is not None else None,
        "eval_loss": (final_eval or {}).get("eval_loss"),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "device": device,
        "mixed_precision": "bf16" if use_bf16 else ("fp16" if use_fp16 else "no"),
        "stopped_by": stopped_by,
        "lr": lr,
        "scheduler": scheduler,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "max_length": max_length,
        "packing": packing,
        "lora": ({"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "targets": lora_targets,
                  "rslora": use_rslora, "dora": use_dora} if peft_model is not None else None),
        "train_examples": len(train_data),
        "seed": seed,
        "outputs": sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".")) + ["train_summary.json"],
    }
    summary["outputs"] = sorted(set(summary["outputs"]) | {"metrics.jsonl"})
    atomic_write_jsonl(out_dir / "metrics.jsonl", recorder.rows)
    atomic_write_json(out_dir / "train_summary.json", summary)
    return summary


def _fix_adapter_base_path(adapter_dir: Path, model_dir: Path) -> None:
    """Record the base folder (absolute) in adapter_config.json so the adapter reloads on its own."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = str(model_dir.resolve())
    atomic_write_json(cfg_path, cfg)
