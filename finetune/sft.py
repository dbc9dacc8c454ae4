"""Supervised fine-tuning and continued pre-training with TRL ``SFTTrainer`` + PEFT, one function.

:func:`train_causal_lm` trains ``mode="sft"`` (instruction pairs, loss on the answer only) or
``mode="cpt"`` (raw text, plain language-model loss) with the settings of a
:class:`banklm.finetune.config.TrainConfig` (``method`` ``"lora"``, ``"qlora"`` or ``"full"``, ``lr``,
``epochs``, ...: the recipe's ``train:`` keys), and writes into ``out_dir``::

    adapter/              PEFT adapter + tokenizer files (lora/qlora)
    merged/               standalone model: safetensors, tokenizer files, generation_config.json
    metrics.jsonl         one line per log step: step, epoch, seconds, loss, learning_rate, tokens_per_s,
                          tokens_seen, eval_loss, task_accuracy*, ...
    train_summary.json    the config's fields, then steps, tokens seen, seconds, losses, parameter counts, device
    tensorboard/          event files (when the ``tensorboard`` package is installed)
    checkpoints/          only while training (``save_steps``); removed when the stage completes

Data
----
* SFT: a ``datasets.Dataset`` with ``messages`` (``[user..., assistant]``) is tokenized here
  (:func:`prepare_sft_dataset`) exactly as TRL tokenizes conversational prompt/completion data (``prompt`` =
  all turns but the last, ``completion`` = the last assistant turn, both rendered with the tokenizer's ChatML
  template), so the completion tokens are ``answer<|im_end|>\\n``: the loss covers the answer *and* the
  ``<|im_end|>`` that stops generation, and nothing of the prompt (``completion_only_loss``). A record whose
  ``target`` is ``"labels"`` (its answer holds only the labelled keys) learns its content tokens only, not
  the end of turn. ``prompt``/``completion`` string columns are accepted as they are (TRL appends the EOS).
* CPT: a ``text`` column (``messages`` are rendered to text) is tokenized here and ``</s>`` (the
  document separator, not the chat EOS) is appended; every token is a label.
* Padding and EOS: ``pad`` is ``<pad>`` (id 3) and never a label, so no mask hides the EOS.
* Batches (``packing``, :func:`batch_layout`): ``"auto"`` concatenates each SFT batch's examples (random
  order) into one row without padding, attention kept within each example by a varlen kernel
  (flash-attention 2's, or :mod:`banklm.finetune.attention` on sdpa/eager); for CPT it packs examples into rows
  of ``max_length`` with TRL's best-fit decreasing. ``True`` always packs; ``False`` pads one example per
  row (``group_by_length``: batches of similar length). ``use_cache`` is off during training: flat and
  packed batches must never run with the cache on.

Time budget
-----------
With ``time_budget_s`` the learning-rate schedule runs on *progress* = max(step / planned steps,
elapsed / budget): warmup and cosine/linear decay complete when the budget is spent, and a callback
stops training cleanly then, so a budgeted run ends at a low learning rate instead of being cut at the
peak. Without a budget the schedule is the usual step-based one. Under DDP the elapsed time is the
maximum over ranks, agreed every step, so all ranks use the same learning rate and stop together.

Checkpoints and resume
----------------------
With ``save_steps`` the Trainer saves ``checkpoints/checkpoint-<step>/`` (weights or adapter, optimizer,
scheduler, RNG states, trainer state); banklm then writes ``banklm_state.json`` into it, last and
atomically, which is what makes a checkpoint complete (:mod:`banklm.finetune.checkpoints`); the newest
``keep_checkpoints`` complete ones are kept. ``resume=True`` continues from the newest complete
checkpoint whose fingerprint (every config field, seed, device, precision, base model files, data content,
world size: :func:`banklm.finetune.checkpoints.training_fingerprint`) matches this call:
same weights, optimizer and scheduler state, RNG states, and the same data order mid-epoch (the
Trainer's seeded sampler skips the batches already trained). Incomplete or foreign checkpoints are
deleted and training starts over. The stage removes ``checkpoints/`` once its outputs are written.

Resuming a *time-budgeted* run: the budget is the total training time over all attempts, counted up to
the last complete checkpoint (time trained after it, and loading/startup time, are not counted). The
resumed run starts its clock at the checkpoint's elapsed time, so the schedule continues from the
progress it had there and training stops when the total reaches the budget. The first step after the
resume uses exactly the learning rate the uninterrupted run used; later steps follow wall time, as any
budgeted run does.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from banklm.evaluation.instructions import answer_tokens, check_conversation
from banklm.io import atomic_dir, atomic_write_json, atomic_write_jsonl

from .attention import prefers_eager, register
from .checkpoints import find_resumable, training_fingerprint
from .config import TaskEval, TrainConfig
from .merge import merge_adapter
from .models import (
    count_parameters,
    load_model,
    pick_attn_implementation,
    pick_device,
    resolve_dtype,
    save_model_folder,
    set_generation_config,
)
from .tokenizer import EOS, copy_tokenizer_files, load_tokenizer, render_chat

log = logging.getLogger("banklm")

MODES = ("sft", "cpt")


# --------------------------------------------------------------------------- data


def prepare_sft_dataset(ds, tokenizer=None, completion_only_loss: bool = True):
    """SFT data as the trainer takes it.

    With ``tokenizer`` (what :func:`train_causal_lm` passes), a ``messages`` dataset becomes tokenized rows,
    ``input_ids`` and ``labels`` (-100 = not learnt), from
    :func:`banklm.evaluation.instructions.answer_tokens`: the same tokens and completion TRL builds from
    conversational prompt/completion data, with the prompt masked (``completion_only_loss``), plus the
    record's ``target``: ``"answer"`` (also when the column is missing or empty) learns the answer and the
    end-of-turn that stops generation; ``"labels"`` (only the labelled keys, ``结论：拒绝；风险等级：C``)
    learns the content tokens and nothing after them, so the model is not taught to stop after the labels.
    TRL keeps a given ``labels`` column as it is (then truncates, drops rows left without a label, packs).
    Without ``tokenizer``: TRL's conversational ``prompt``/``completion`` columns (TRL tokenizes them; every
    target must then be ``"answer"``). ``prompt``/``completion`` datasets are kept as they are (TRL appends the
    EOS); every other column is dropped. Raises ``ValueError`` naming the row when a conversation does not
    end with an assistant turn or a target is unknown.
    """
    cols = ds.column_names
    if "prompt" in cols and "completion" in cols:
        return ds.select_columns(["prompt", "completion"])
    if "messages" not in cols:
        raise ValueError(f"SFT data needs a 'messages' column (or 'prompt' and 'completion'); got {cols}")
    ids = ds["id"] if "id" in cols else list(range(len(ds)))
    targets = [t or "answer" for t in ds["target"]] if "target" in cols else ["answer"] * len(ds)
    if tokenizer is None:
        labelled = next((i for i, t in zip(ids, targets, strict=True) if t != "answer"), None)
        if labelled is not None:
            raise ValueError(f"SFT record {labelled}: target {targets[ids.index(labelled)]!r} needs the tokenizer "
                             "(prepare_sft_dataset(ds, tokenizer))")

        def split(example, idx):
            msgs = example["messages"]
            check_conversation(msgs, f"SFT record {example.get('id', idx)}")
            clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
            return {"prompt": clean[:-1], "completion": clean[-1:]}

        return ds.map(split, with_indices=True, remove_columns=cols)
    from datasets import Dataset

    spans = answer_tokens(tokenizer, ds["messages"], targets, names=[str(i) for i in ids])
    labels = []
    for s in spans:
        first = s.start if completion_only_loss else 0
        labels.append([-100] * first + s.ids[first:s.end] + [-100] * (len(s.ids) - s.end))
    return Dataset.from_dict({"input_ids": [s.ids for s in spans], "labels": labels})


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
    """Batch rows (single examples, or several packed by TRL) for the trainer; never an attention mask.

    ``flat=True`` (the ``unpadded`` and ``packed`` layouts): every example of the batch goes into ONE row,
    position ids restarting per example, with the example boundaries as TRL's padding-free collator gives
    them (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``). Linear layers then see real tokens only, and
    the varlen attention (flash-attention 2's, or :func:`banklm.finetune.attention.varlen_attention` on sdpa/eager)
    keeps each example to itself.

    ``flat=False`` (``padded``, ``grouped`` and the teacher cache): right-padded ``[rows, longest]``
    tensors. A row of one example gets the plain positions ``0..longest-1``: a causal token never attends
    to the pads after it, so plain causal attention is exact and no mask is built. Packed rows get position
    ids restarting per example, from which transformers derives a block-diagonal mask.

    Either way the first token of each example gets label -100: it must not be predicted from the previous
    example.
    """

    def __init__(self, pad_token_id: int, flat: bool = False):
        self.pad_token_id = pad_token_id
        self.flat = flat

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        lengths = [ex.get("seq_lengths") or [len(ex["input_ids"])] for ex in examples]
        for ex, lens in zip(examples, lengths, strict=True):
            if sum(lens) != len(ex["input_ids"]):
                raise ValueError(f"a packed row of {len(ex['input_ids'])} tokens lists examples of {sum(lens)}")
        positions = [torch.cat([torch.arange(m) for m in lens]) for lens in lengths]
        if self.flat:
            input_ids = torch.as_tensor([t for ex in examples for t in ex["input_ids"]]).unsqueeze(0)
            labels = torch.as_tensor([t for ex in examples for t in ex.get("labels", ex["input_ids"])]).unsqueeze(0)
            position_ids = torch.cat(positions).unsqueeze(0)
            labels[position_ids == 0] = -100
            seq_lens = torch.as_tensor([m for lens in lengths for m in lens])
            cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
            cu[1:] = seq_lens.cumsum(0)
            longest = int(seq_lens.max())
            return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                    "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}

        longest = max(len(ex["input_ids"]) for ex in examples)
        n = len(examples)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), -100, dtype=torch.long)
        position_ids = torch.arange(longest).repeat(n, 1)
        for i, ex in enumerate(examples):
            k = len(ex["input_ids"])
            input_ids[i, :k] = torch.as_tensor(ex["input_ids"])
            labels[i, :k] = torch.as_tensor(ex.get("labels", ex["input_ids"]))
            if len(lengths[i]) > 1:  # packed: positions restart per example; each pad its own "sequence"
                position_ids[i, :k] = positions[i]
                position_ids[i, k:] = 0
        labels[position_ids == 0] = -100
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")  # what a batch hands the model's forward (the rest is labels and loss inputs)


def forward_inputs(batch: dict, device=None) -> dict:
    """The model inputs of a collated batch, tensors moved to ``device`` (the distillation teacher's)."""
    import torch

    return {k: (v.to(device) if device is not None and isinstance(v, torch.Tensor) else v)
            for k, v in batch.items() if k in FORWARD_KEYS}


# --------------------------------------------------------------------------- devices and precision


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


def precision_plan(device: str, method: str, mixed_precision: str = "auto") -> dict:
    """How a run computes on ``device``: autocast flags, the dtype the base is loaded in, attention kernel.

    CUDA: bf16 autocast where the GPU supports it, else fp16 (the Trainer then scales the loss with a
    GradScaler). CPU: bf16 autocast (``"auto"``). MPS: fp32, no autocast. Under autocast a LoRA base is
    loaded in that half dtype (frozen weights: nothing to accumulate; PEFT keeps the adapter weights fp32;
    on CPU measured 1.6x tokens/s over fp32 weights + autocast, which casts every weight at every step);
    full fine-tuning keeps fp32 master weights; QLoRA loads NF4 with bf16/fp16 compute (``bnb_config``).
    Attention: flash-attention 2 on CUDA when the ``flash_attn`` package is installed, else sdpa.
    """
    import torch

    bf16, fp16 = _mixed_precision(mixed_precision, device)
    if method == "qlora":
        dtype: Any = "auto"
    elif method == "full" or not (bf16 or fp16):
        dtype = torch.float32
    else:
        dtype = torch.bfloat16 if bf16 else torch.float16
    return {"bf16": bf16, "fp16": fp16, "model_dtype": dtype,
            "attn_implementation": pick_attn_implementation(device),
            "quantization": "4bit" if method == "qlora" else None}


def cpu_attention(device: str, plan: dict, longest_row: int) -> str:
    """The attention kernel for training padded rows: ``plan``'s, except eager where
    :func:`banklm.finetune.attention.prefers_eager` (CPU, bf16 autocast, rows of at most 256 tokens)."""

    if plan["attn_implementation"] == "sdpa" and prefers_eager(device.split(":")[0], plan["bf16"], longest_row):
        return "eager"
    return plan["attn_implementation"]


COMPILE_MIN_SECONDS = 300  # compile: auto compiles runs planned for at least this long (time budget) ...
COMPILE_MIN_STEPS = 300  # ... or, without a budget, for at least this many optimizer steps


def wants_compile(choice: bool | str, time_budget_s: float | None, planned_steps: int) -> bool:
    """``compile`` (True, False or ``"auto"``) for a run: ``auto`` compiles a long run only, one whose time
    budget is at least :data:`COMPILE_MIN_SECONDS` (or, without a budget, of at least
    :data:`COMPILE_MIN_STEPS` steps). Measured on CPU at quickstart size: the first step takes 44 s with
    inductor's cache empty (8-22 s with it warm), the steps after it +20-28% tokens/s (BENCHMARKS.md); short
    runs would lose."""
    if choice not in (True, False, "auto"):
        raise ValueError(f"compile must be true, false or 'auto', got {choice!r}")
    if choice != "auto":
        return bool(choice)
    if time_budget_s:
        return time_budget_s >= COMPILE_MIN_SECONDS
    return planned_steps >= COMPILE_MIN_STEPS


def compile_decoder_layers(model, device: str, quiet: bool = False) -> str | None:
    """Compile each decoder layer in place (regional compilation: one graph reused by every layer, dynamic
    sequence lengths; the state dict keeps its names, so saving and merging are unchanged). Returns
    ``"decoder layers"``, or None where inductor cannot build kernels here (with a warning, or an info line
    when ``quiet``: ``compile: auto`` on a machine without the toolchain).
    """
    import shutil

    import torch

    if device.startswith("cuda"):
        missing = None if importlib.util.find_spec("triton") is not None else "the triton package"
    elif device == "cpu":
        missing = None if any(shutil.which(c) for c in ("g++", "c++", "clang++")) else "a C++ compiler (g++)"
    else:
        missing = f"inductor kernels for {device}"
    if missing:
        (log.info if quiet else log.warning)("compile: skipped, %s is not available; training runs uncompiled",
                                             missing)
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"compile: no decoder layers found in {type(base).__name__} (expected model.layers)")
    for layer in layers:
        layer.compile(dynamic=True)
    return "decoder layers"


# --------------------------------------------------------------------------- trainer


@functools.cache
def make_trainer_classes():
    """``(BudgetTrainer, MetricsRecorder)``: the SFTTrainer subclass with the time-budget schedule and the
    logging callback. Built on first use (keeps torch/trl imports lazy) and cached, so other packages can
    subclass ``BudgetTrainer`` (e.g. ``distill`` adds a distillation term) and pass it as ``trainer_class``."""
    import torch
    from peft.helpers import disable_input_dtype_casting
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    from .callbacks import MetricsRecorder, TrainClock

    class BudgetTrainer(SFTTrainer):
        """SFTTrainer that counts real (non-pad) tokens and, with a time budget, schedules the LR on
        max(step, time) progress (:class:`banklm.finetune.callbacks.TrainClock`).

        banklm's extras are keyword arguments; everything else goes to ``SFTTrainer``:

        * ``clock``: the run's :class:`~banklm.finetune.callbacks.TrainClock` (time budget, schedule, tokens
          trained); default: a clock without budget (the step-based schedule).
        * ``collator``: replaces TRL's collator once TRL has prepared the data (TRL refuses a custom collator
          for padding-free rows, which the ``packed`` layout is).
        * ``grouped``: ``group_by_length`` batches (:func:`length_grouped_sampler`).
        * ``autocast_lora``: LoRA on a 16-bit base under autocast: PEFT would cast each adapter's input to
          fp32 (the adapter dtype) only for autocast to cast it back; the training forward skips that round trip.
        * ``sparse_head``: the LM head on label positions only (:meth:`compute_loss`); default: without triton.
        * ``extra_logs``: a dict whose figures join the next training-loss log (task accuracy), then cleared.
        """

        def __init__(self, *args, clock: TrainClock | None = None, collator=None, grouped: bool = False,
                     autocast_lora: bool = False, sparse_head: bool | None = None, extra_logs: dict | None = None,
                     **kwargs):
            self.banklm_clock = clock if clock is not None else TrainClock(None, 0.0, "constant")
            self.banklm_grouped = grouped
            self.banklm_autocast_lora = autocast_lora
            self.banklm_sparse_head = (importlib.util.find_spec("triton") is None if sparse_head is None
                                       else sparse_head)
            self.banklm_extra_logs = {} if extra_logs is None else extra_logs
            super().__init__(*args, **kwargs)
            if collator is not None:
                self.data_collator = collator
            for quiet in (PrinterCallback, ProgressCallback):  # metrics.jsonl + our bar replace the printed dicts
                self.remove_callback(quiet)

        def log(self, logs, *args, **kwargs):
            extra = self.banklm_extra_logs
            if extra and "loss" in logs:
                logs.update(extra)
                extra.clear()
            return super().log(logs, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Without triton (CPU, Apple): cross-entropy on the positions that have a label only, the LM head
            run on the answer tokens instead of every position. Same loss as TRL's (sum over label tokens /
            ``num_items_in_batch``); measured +28% tokens/s for LoRA SFT of the quickstart model on CPU, where
            TRL's fused LM head falls back to a slow chunked loop. With triton (CUDA) TRL's fused head is kept:
            it never materialises the logits of a large vocabulary. Evaluation with outputs uses TRL's path."""
            labels = inputs.get("labels")
            head = _output_head(self.model) if self.banklm_sparse_head else None
            if labels is None or return_outputs or head is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            keep = labels[:, 1:] != -100  # position t predicts label t+1
            rows = torch.zeros_like(labels, dtype=torch.bool)
            rows[:, :-1] = keep
            hook = head.register_forward_pre_hook(lambda module, args: (args[0][rows],))
            try:
                out = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
            finally:
                hook.remove()
            targets = labels[:, 1:][keep]
            n = targets.numel() if num_items_in_batch is None else num_items_in_batch
            loss = torch.nn.functional.cross_entropy(out.logits.float(), targets, reduction="sum")
            loss = loss / torch.as_tensor(n, device=loss.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients over ranks
            with torch.no_grad():  # the metric TRL logs, from the logits already computed
                correct = self.accelerator.gather_for_metrics((out.logits.argmax(-1) == targets).sum()).sum()
                valid = self.accelerator.gather_for_metrics(torch.as_tensor(targets.numel())).sum()
            mode = "train" if model.training else "eval"
            self._metrics[mode]["mean_token_accuracy"].append((correct / valid.clamp(min=1)).item())
            return loss

        def _get_train_sampler(self, train_dataset=None):
            """``group_by_length``: :func:`length_grouped_sampler`, seeded per epoch (a resumed run draws the same
            order) and grouping global batches (batch x accumulation x processes), so N processes train the
            examples one process with N times the batch trains."""
            if not self.banklm_grouped:
                return super()._get_train_sampler(train_dataset)
            ds = self.train_dataset if train_dataset is None else train_dataset
            a = self.args
            return length_grouped_sampler(
                [len(ids) for ids in ds["input_ids"]],
                a.train_batch_size * a.gradient_accumulation_steps * max(1, a.world_size),
                seed=a.data_seed if a.data_seed is not None else a.seed)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if "attention_mask" in inputs:
                self.banklm_clock.tokens += int(inputs["attention_mask"].sum())
            else:
                self.banklm_clock.tokens += int((inputs["input_ids"] != self.processing_class.pad_token_id).sum())
            with disable_input_dtype_casting(model, active=self.banklm_autocast_lora):
                return super().training_step(model, inputs, num_items_in_batch)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            clock = self.banklm_clock
            if clock.budget_s is None:
                return super().create_scheduler(num_training_steps, optimizer)
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                                      clock.lr_lambda(num_training_steps))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return BudgetTrainer, MetricsRecorder


def answerless_examples(prepared, n_examples: int) -> int:
    """Examples with no label left after the cut at max_length (a prompt that fills it alone). Unpacked, TRL
    leaves them out of ``prepared``; packed rows keep them, all positions masked (no loss either way)."""
    import numpy as np

    if "seq_lengths" not in prepared.column_names:
        return n_examples - len(prepared)
    count = 0
    for labels, lengths in zip(prepared["labels"], prepared["seq_lengths"], strict=True):
        labelled = np.asarray(labels) != -100
        starts = np.cumsum([0, *lengths[:-1]])
        count += int((np.add.reduceat(labelled, starts) == 0).sum())
    return count


def length_grouped_sampler(lengths: list[int], batch_size: int, seed: int):
    """transformers' ``LengthGroupedSampler`` (megabatches of 50 batches, each sorted by length) with the
    batches then drawn in random order, its order depending only on (seed, epoch): accelerate calls
    ``set_epoch`` at each epoch, also on resume.

    Why the batch order is shuffled: the plain sampler runs each megabatch from its longest batch to its
    shortest, and where length goes with the task (the scenario mix: audit records are shorter) that is a
    run of one task after another. Measured on the quickstart (full SFT, 675 steps of 40): 0.49 accuracy
    with the plain order, 0.59 with batches shuffled, 0.81 with random batches (no grouping)."""
    return _epoch_length_sampler_class()(lengths, batch_size, seed)


@functools.cache
def _epoch_length_sampler_class():
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochLengthGroupedSampler(LengthGroupedSampler):
        def __init__(self, lengths: list[int], batch_size: int, seed: int):
            super().__init__(batch_size, lengths=lengths)
            self.seed = seed
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            self.generator = torch.Generator().manual_seed(self.seed + int(epoch))

        def __iter__(self):
            order = list(super().__iter__())
            b = self.batch_size
            batches = [order[i:i + b] for i in range(0, len(order), b)]
            return iter([i for k in torch.randperm(len(batches), generator=self.generator).tolist()
                         for i in batches[k]])

    return EpochLengthGroupedSampler


def _output_head(model):
    """The LM head (``lm_head``) of a causal LM, PEFT-wrapped or not; None when there is none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(base, "get_output_embeddings", None)
    return get() if get is not None else None


def token_lengths(data, tokenizer, mode: str) -> list[int]:
    """Tokens per prepared example (prompt + completion + EOS, or the tokenized SFT / CPT ids), as the trainer
    will see them."""
    if mode == "cpt" or "input_ids" in data.column_names:
        return [len(ids) for ids in data["input_ids"]]
    prompts, completions = data["prompt"], data["completion"]
    if prompts and isinstance(prompts[0], str):
        texts, extra = [p + c for p, c in zip(prompts, completions, strict=True)], 1  # TRL appends the EOS
    else:
        texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions,
                                                                                       strict=True)]
        extra = 0
    return [len(ids) + extra for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def batch_layout(packing: bool | str, mode: str, group_by_length: bool = False) -> str:
    """How examples become batches, from ``packing`` (True, False or ``"auto"``).

    * ``unpadded``: the batch's examples (random order) concatenated into one row; linear layers see no
      padding, attention stays within each example (varlen: flash-attention 2's kernel, or
      :mod:`banklm.finetune.attention` on sdpa/eager, which pads inside attention only). Batch = examples.
    * ``packed``: examples packed by TRL's best-fit decreasing into rows of ``max_length``, the rows of a
      batch concatenated the same way. Batch = rows.
    * ``padded``: one example per row, in random order, right-padded, no mask (batch = examples);
      ``grouped`` with ``group_by_length``: the same, batches drawn from examples of similar length.

    ``"auto"``: ``unpadded`` for SFT (``grouped`` with ``group_by_length``), ``packed`` for CPT (raw
    documents of any length, best cut into full rows). ``True``: ``packed``; ``False``: ``padded`` or
    ``grouped``. On the scenario mix on CPU, ``unpadded`` is the fastest (``scripts/bench_train.py``).
    """
    if packing not in (True, False, "auto"):
        raise ValueError(f"packing must be true, false or 'auto', got {packing!r}")
    if packing is True or (packing == "auto" and mode == "cpt"):
        return "packed"
    if group_by_length:
        return "grouped"
    return "unpadded" if packing == "auto" else "padded"


FLAT_LAYOUTS = ("unpadded", "packed")  # one row per batch, varlen attention


def training_attention(device: str, plan: dict, layout: str, longest_row: int) -> str:
    """The attention kernel for training: flash-attention 2 when the plan has it; for a flat layout on
    sdpa/eager banklm's varlen attention (:mod:`banklm.finetune.attention`, registered here); for padded rows
    :func:`cpu_attention`."""
    if "flash" in str(plan["attn_implementation"]):
        return plan["attn_implementation"]
    if layout in FLAT_LAYOUTS:

        return register()
    return cpu_attention(device, plan, longest_row)


# --------------------------------------------------------------------------- training


def train_causal_lm(
    model_dir: str | os.PathLike,
    train_ds,
    eval_ds,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    mode: str = "sft",
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    merge: bool = True,
    merged_dtype: Any = "auto",
    cpt_eos_token: str = EOS,
    num_threads: int | None = None,
    mixed_precision: str = "auto",
    task_eval: TaskEval | None = None,
    progress: bool | None = None,
    tensorboard: bool | None = None,
    callbacks: list | None = None,
    trainer_class=None,
    trainer_kwargs: dict | None = None,
    **settings,
) -> dict:
    """Train ``model_dir`` on ``train_ds`` (SFT or CPT; LoRA, QLoRA or full) and write ``out_dir``.

    ``config`` (:class:`banklm.finetune.config.TrainConfig`; default: the recipe's defaults) holds the training
    settings under the recipe's ``train:`` names; ``settings`` given as keywords replace fields of it
    (``train_causal_lm(..., lr=1e-3, max_steps=100, lora={"r": 8})``). Returns the training summary (also
    written to ``out_dir/train_summary.json``): the config's fields, then what the run did. See the module
    docstring for data formats, packing, the time-budget schedule, checkpoints and resume. ``eval_ds`` may be
    None; ``config.eval_steps`` evaluates it every N steps (else at each epoch end) and always at the end.

    ``config.save_steps``/``keep_checkpoints``: a checkpoint every N optimizer steps, the newest K kept, in
    ``out_dir/checkpoints/``; ``resume=True`` continues from the newest matching one.
    ``config.early_stopping_patience``: stop after that many evaluations without a lower eval loss (needs
    ``eval_ds`` and ``eval_steps``; the patience counter restarts on resume).
    ``task_eval`` (:class:`~banklm.finetune.config.TaskEval`) with ``config.task_eval_steps``: scenario records
    (``task``, ``gold``, ``messages``) answered greedily every N steps and scored with ``banklm.evaluation``
    (``task_accuracy*`` in metrics.jsonl).
    ``progress``: tqdm bar with tokens/s and ETA (default: when stderr is a terminal).
    ``tensorboard``: event files in ``out_dir/tensorboard`` (default: when the package is installed).
    ``callbacks``: extra ``TrainerCallback`` objects.

    ``config.compile``: compile each decoder layer with ``torch.compile`` (:func:`compile_decoder_layers`):
    True, False, or ``"auto"`` (long runs only, :func:`wants_compile`); skipped where the backend cannot build
    kernels (no C++ compiler on CPU, no triton on CUDA).

    ``mixed_precision``: ``"auto"`` = bf16 autocast on CUDA (fp16 where bf16 is unsupported) and on
    CPU (measured 1.7-2x faster than fp32 for the tiny models here; weights and optimizer stay fp32),
    none on MPS; or ``"bf16"``, ``"fp16"``, ``"no"`` (:func:`precision_plan`).

    Distributed (``torchrun``/``accelerate launch``): ``batch_size`` is per process; every rank trains,
    only the main process writes files; the summary's ``tokens_seen`` counts all ranks. Within an epoch,
    N processes x batch B train exactly what one process with batch N x B trains (tested); at an epoch's
    end accelerate fills the last, short batch of each rank by repeating examples (``even_batches``).

    Extension point (used by ``distill``): ``trainer_class``, a subclass of ``make_trainer_classes()[0]``,
    is built with ``trainer_kwargs`` as its own extras (keyword arguments of its constructor, as TRL's trainers
    take theirs).

    The phases, in order: :func:`_start_run` (checks, device, precision, tokenizer), :func:`_prepare_data`,
    :func:`_prepare_model`, :func:`_build_trainer`, :func:`_resume_point`, :func:`_train`, :func:`_outputs`.
    """
    config = dataclasses.replace(config or TrainConfig(), **settings)
    run = _start_run(model_dir, out_dir, config, mode, seed=seed, device=device, num_threads=num_threads,
                     mixed_precision=mixed_precision, cpt_eos_token=cpt_eos_token, merge=merge,
                     merged_dtype=merged_dtype, has_eval=eval_ds is not None and len(eval_ds) > 0,
                     train_examples=len(train_ds), task_eval=task_eval)
    data = _prepare_data(run, train_ds, eval_ds)
    model = _prepare_model(run, data)
    training = _build_trainer(run, data, model, fingerprint_data=(train_ds, eval_ds if run.has_eval else None),
                              task_eval=task_eval, progress=progress, tensorboard=tensorboard,
                              callbacks=callbacks, trainer_class=trainer_class, trainer_kwargs=trainer_kwargs)
    checkpoint = _resume_point(run, training, resume)
    outcome = _train(training, checkpoint)
    return _outputs(run, data, model, training, outcome)


@dataclasses.dataclass
class _Run:
    """One call of :func:`train_causal_lm`: its settings and options, resolved (device, precision plan,
    tokenizer), shared by the phases."""

    config: TrainConfig
    mode: str
    model_dir: Path
    out_dir: Path
    seed: int
    device: str
    plan: dict  # precision_plan(): autocast flags, dtype of the base, attention kernel, quantization
    tokenizer: Any
    has_eval: bool
    cpt_eos_token: str
    merge: bool
    merged_dtype: Any

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


@dataclasses.dataclass
class _Data:
    train: Any  # prompt/completion (SFT) or input_ids (CPT) dataset, before TRL tokenizes/packs it
    eval: Any
    lengths: list[int]  # tokens per training example
    truncated: int  # training examples longer than max_length
    layout: str  # batch_layout()
    by_source: dict | None  # training examples per ``source`` (the SFT mix), when the data names them


@dataclasses.dataclass
class _Model:
    model: Any
    peft: bool  # a LoRA/QLoRA adapter on a frozen base
    trainable: int
    total: int
    compile_run: bool  # wants_compile()
    compiled: str | None  # compile_decoder_layers(): what was compiled


@dataclasses.dataclass
class _Training:
    trainer: Any
    clock: Any  # callbacks.TrainClock
    recorder: Any  # callbacks.MetricsRecorder
    task_cb: Any  # callbacks.TaskEvalCallback or None
    fingerprint: str  # identity of the run's checkpoints (training_fingerprint)
    answerless: int  # examples with no answer token left after the cut at max_length


@dataclasses.dataclass
class _Outcome:
    result: Any  # Trainer.train()'s TrainOutput
    seconds: float  # this attempt's trainer.train(), wall time
    final_eval: dict | None
    tokens_seen: int
    resumed_from: int | None


def _start_run(model_dir, out_dir, config: TrainConfig, mode: str, *, seed: int, device: str,
               num_threads: int | None, mixed_precision: str, cpt_eos_token: str, merge: bool, merged_dtype: Any,
               has_eval: bool, train_examples: int, task_eval: TaskEval | None) -> _Run:
    """Check the arguments against each other (the config checked its own fields), then set up the process:
    device, threads, seed, precision plan, tokenizer."""
    import torch
    from transformers import set_seed

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = pick_device(device)
    if config.early_stopping_patience is not None and not (has_eval and config.eval_steps):
        raise ValueError("early_stopping_patience needs evaluation data and eval_steps (evaluate every N steps)")
    if config.task_eval_steps is not None and not (task_eval and task_eval.records):
        raise ValueError("task_eval_steps needs task_eval records (validation records with task and gold)")
    if train_examples == 0:
        raise ValueError("train_ds is empty")
    if config.method == "qlora" and device == "mps":
        raise ValueError("method=qlora needs bitsandbytes, which does not support MPS; use method=lora")

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if num_threads:
        torch.set_num_threads(num_threads)
    set_seed(seed)
    plan = precision_plan(device, config.method, mixed_precision)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{model_dir}: tokenizer has no pad token (banklm never pads with the EOS)")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{model_dir}: pad token equals the EOS {tokenizer.eos_token!r}; the EOS would be "
                         "masked out of the labels. Give the tokenizer a distinct pad token.")
    return _Run(config=config, mode=mode, model_dir=model_dir, out_dir=out_dir, seed=seed, device=device,
                plan=plan, tokenizer=tokenizer, has_eval=has_eval,
                cpt_eos_token=cpt_eos_token, merge=merge, merged_dtype=merged_dtype)


def _prepare_data(run: _Run, train_ds, eval_ds) -> _Data:
    """SFT: prompt/completion columns; CPT: token ids with the document separator. Counts what the cut at
    ``max_length`` truncates and picks the batch layout."""
    tok, cfg = run.tokenizer, run.config
    if run.mode == "sft":
        train = prepare_sft_dataset(train_ds, tok, cfg.completion_only_loss)
        ev = prepare_sft_dataset(eval_ds, tok, cfg.completion_only_loss) if run.has_eval else None
    else:
        train = prepare_cpt_dataset(train_ds, tok, run.cpt_eos_token)
        ev = prepare_cpt_dataset(eval_ds, tok, run.cpt_eos_token) if run.has_eval else None
    lengths = token_lengths(train, tok, run.mode)
    truncated = sum(n > cfg.max_length for n in lengths)
    if truncated:
        log.warning("%d of %d training examples are longer than max_length=%d tokens and are truncated",
                    truncated, len(lengths), cfg.max_length)
    by_source = None
    if "source" in train_ds.column_names:
        by_source = {str(k): n for k, n in sorted(Counter(train_ds["source"]).items(), key=lambda kv: str(kv[0]))}
    return _Data(train=train, eval=ev, lengths=lengths, truncated=truncated,
                 layout=batch_layout(cfg.packing, run.mode, cfg.group_by_length), by_source=by_source)


def _prepare_model(run: _Run, data: _Data) -> _Model:
    """Load the base as the precision plan says, add the LoRA adapter (``config.lora``), pick the attention
    kernel for the batch layout and compile the decoder layers when :func:`wants_compile`."""
    from accelerate import PartialState

    cfg, plan = run.config, run.plan
    model = load_model(run.model_dir, device=run.device, dtype=plan["model_dtype"],
                       quantization=plan["quantization"], attn_implementation=plan["attn_implementation"])
    model.config.use_cache = False
    model.train()
    if cfg.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if cfg.method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        lora = cfg.lora  # the recipe's train.lora names, mapped to PEFT's here only
        targets = lora.targets if isinstance(lora.targets, str) else list(lora.targets)
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM",
                                                 use_rslora=lora.rslora, use_dora=lora.dora, bias="none"))
    trainable, total = count_parameters(model)
    eval_lengths = token_lengths(data.eval, run.tokenizer, run.mode) if data.eval is not None else []
    longest_row = min(max([*data.lengths, *eval_lengths]), cfg.max_length)
    attn = training_attention(run.device, plan, data.layout, longest_row)
    if attn != plan["attn_implementation"]:
        (model.get_base_model() if cfg.method != "full" else model).set_attn_implementation(attn)
        plan["attn_implementation"] = attn
    processes = PartialState().num_processes
    planned_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * -(
        -len(data.train) // (cfg.batch_size * cfg.grad_accum * processes))
    compile_run = wants_compile(cfg.compile, cfg.time_budget_s, planned_steps)
    compiled = compile_decoder_layers(model, run.device, quiet=cfg.compile == "auto") if compile_run else None
    return _Model(model=model, peft=cfg.method != "full", trainable=trainable, total=total,
                  compile_run=compile_run, compiled=compiled)


def _sft_args(run: _Run, data: _Data):
    """TRL's ``SFTConfig`` for this run: the one place the recipe's names become TRL's (``epochs`` ->
    ``num_train_epochs``, ``lr`` -> ``learning_rate``, ...)."""
    from trl import SFTConfig

    cfg, plan = run.config, run.plan
    eval_strategy = "no"
    if run.has_eval:
        eval_strategy = "steps" if cfg.eval_steps else "epoch"
    # transformers 5 renamed gradient_checkpointing -> activation_checkpointing (TRL defaults it to True)
    ckpt_field = "activation_checkpointing" if "activation_checkpointing" in {
        f.name for f in dataclasses.fields(SFTConfig)} else "gradient_checkpointing"
    return SFTConfig(
        output_dir=str(run.ckpt_dir),
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs if cfg.max_steps < 0 else 1,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.scheduler,
        weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=None,  # CheckpointState rotates, after a checkpoint is complete
        metric_for_best_model="eval_loss" if cfg.early_stopping_patience else None,
        greater_is_better=False if cfg.early_stopping_patience else None,
        seed=run.seed,
        data_seed=run.seed,
        bf16=plan["bf16"],
        fp16=plan["fp16"],
        use_cpu=(run.device == "cpu"),
        dataloader_pin_memory=run.device.startswith("cuda"),
        report_to="none",  # TensorBoard is added by _callbacks with an explicit folder
        torch_compile=False,
        max_length=cfg.max_length,
        packing=data.layout == "packed",
        packing_strategy="bfd",
        train_sampling_strategy="group_by_length" if data.layout == "grouped" else "random",
        completion_only_loss=cfg.completion_only_loss if run.mode == "sft" else None,
        dataset_num_proc=None,
        remove_unused_columns=True,
        # every trainable parameter takes part in each forward (LoRA, full): skip DDP's extra graph walk
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        save_only_model=False,
        **{ckpt_field: cfg.gradient_checkpointing},
    )


def _callbacks(run: _Run, clock, recorder, fingerprint: str, task_cb, tensorboard: bool | None,
               is_main: bool) -> list:
    """banklm's trainer callbacks: time budget, metrics, checkpoint state, early stopping, task eval, TensorBoard."""
    from transformers import EarlyStoppingCallback

    from .callbacks import BudgetCallback, CheckpointState

    cfg = run.config
    cbs: list = [BudgetCallback(clock), recorder]
    if cfg.save_steps:
        cbs.append(CheckpointState(fingerprint, cfg.keep_checkpoints, clock, recorder))
    if cfg.early_stopping_patience:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    if task_cb is not None:
        cbs.append(task_cb)
    use_tb = importlib.util.find_spec("tensorboard") is not None if tensorboard is None else tensorboard
    if use_tb and is_main:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        cbs.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run.out_dir / "tensorboard"))))
    return cbs


def _build_trainer(run: _Run, data: _Data, model: _Model, *, fingerprint_data: tuple, task_eval: TaskEval | None,
                   progress: bool | None, tensorboard: bool | None, callbacks: list | None, trainer_class,
                   trainer_kwargs: dict | None) -> _Training:
    """The trainer with its extras (clock, collator, layout, callbacks) and the run's checkpoint fingerprint:
    every field of the config plus what else decides the weights (:func:`training_fingerprint`)."""
    import torch
    from accelerate import PartialState

    from .callbacks import TaskEvalCallback, TrainClock

    cfg, plan = run.config, run.plan
    BudgetTrainer, Recorder = make_trainer_classes()
    trainer_class = trainer_class or BudgetTrainer
    if not issubclass(trainer_class, BudgetTrainer):
        raise TypeError("trainer_class must subclass banklm.finetune.sft.make_trainer_classes()[0]")
    args = _sft_args(run, data)
    fingerprint = training_fingerprint(
        cfg, run.model_dir, *fingerprint_data, mode=run.mode, seed=run.seed, device=run.device,
        precision=[plan["bf16"], plan["fp16"], str(plan["model_dtype"])], cpt_eos_token=run.cpt_eos_token,
        world_size=int(args.world_size), compile=model.compile_run, trainer=trainer_class.__name__)
    is_main = PartialState().is_main_process
    clock = TrainClock(cfg.time_budget_s, cfg.warmup_ratio, cfg.scheduler)
    show_progress = sys.stderr.isatty() if progress is None else progress
    recorder = Recorder(clock, progress=show_progress and is_main)
    task_cb = None
    if cfg.task_eval_steps:
        task_cb = TaskEvalCallback(task_eval.records, cfg.task_eval_steps, run.tokenizer, task_eval.max_new_tokens,
                                   per_task=cfg.task_eval_samples)
    cbs = _callbacks(run, clock, recorder, fingerprint, task_cb, tensorboard, is_main) + list(callbacks or [])
    trainer = trainer_class(
        model=model.model, args=args, train_dataset=data.train, eval_dataset=data.eval,
        processing_class=run.tokenizer, callbacks=cbs,
        clock=clock, collator=PackedRowsCollator(run.tokenizer.pad_token_id, flat=data.layout in FLAT_LAYOUTS),
        grouped=data.layout == "grouped", extra_logs=task_cb.logs if task_cb is not None else None,
        autocast_lora=(cfg.method == "lora" and not cfg.lora.dora and (plan["bf16"] or plan["fp16"])
                       and plan["model_dtype"] in (torch.bfloat16, torch.float16)),
        **(trainer_kwargs or {}))
    n = len(data.train)
    answerless = answerless_examples(trainer.train_dataset, n) if run.mode == "sft" else 0
    if answerless:
        log.warning("%d of %d training examples lose their whole answer at max_length=%d: nothing to learn "
                    "from them", answerless, n, cfg.max_length)
    if answerless == n:
        raise ValueError(f"no training example is left: all {answerless} lose their whole answer when cut at "
                         f"max_length={cfg.max_length} tokens (the longest has {max(data.lengths)}); raise "
                         "max_length")
    return _Training(trainer=trainer, clock=clock, recorder=recorder, task_cb=task_cb, fingerprint=fingerprint,
                     answerless=answerless)


def _resume_point(run: _Run, training: _Training, resume: bool) -> tuple[Path, dict] | None:
    """With ``resume``, the newest complete checkpoint of this fingerprint, its clock and metrics restored;
    foreign or incomplete checkpoints are deleted (without ``resume``, all of them). The main process cleans up
    first, the others then read the same folder."""
    from accelerate import PartialState

    state = PartialState()
    point = None
    with state.main_process_first():
        if resume:
            point = find_resumable(run.ckpt_dir, training.fingerprint, clean=state.is_main_process)
        elif state.is_main_process and run.ckpt_dir.exists():
            shutil.rmtree(run.ckpt_dir)
    if point is not None:
        ck, saved = point
        training.clock.offset = float(saved.get("elapsed_s", 0.0))
        training.recorder.restore(saved)
        log.info("resuming training from %s (step %d, %.0f s trained)", ck, int(saved["step"]),
                 training.clock.offset)
    return point


def _train(training: _Training, checkpoint: tuple[Path, dict] | None) -> _Outcome:
    """Train (from ``checkpoint`` when resuming), then the final evaluation unless the last step had one."""
    trainer, recorder = training.trainer, training.recorder
    t_start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint[0]) if checkpoint else None)
    seconds = time.perf_counter() - t_start
    final_eval = None
    if trainer.eval_dataset is not None:
        if recorder.last_eval_step == trainer.state.global_step:
            final_eval = {"eval_loss": recorder.last_eval_loss}
        else:
            final_eval = trainer.evaluate()  # on_log records it (a collective under DDP: every rank)
    return _Outcome(result=result, seconds=seconds, final_eval=final_eval, tokens_seen=recorder.global_tokens(),
                    resumed_from=int(checkpoint[1]["step"]) if checkpoint else None)


def _stopped_by(run: _Run, training: _Training) -> str:
    from transformers import EarlyStoppingCallback

    patience = run.config.early_stopping_patience
    if training.clock.stopped:
        return "time_budget"
    if any(isinstance(cb, EarlyStoppingCallback) and cb.early_stopping_patience_counter >= patience
           for cb in training.trainer.callback_handler.callbacks):
        return "early_stopping"
    return "max_steps" if run.config.max_steps > 0 else "epochs"


def _summary(run: _Run, data: _Data, model: _Model, training: _Training, outcome: _Outcome) -> dict:
    """``train_summary.json``: the mode and every config field (LoRA settings only where an adapter was
    trained), then what the run did."""
    trainer, clock, plan = training.trainer, training.clock, run.plan
    state, elapsed, task_cb = trainer.state, clock.elapsed, training.task_cb
    settings = dataclasses.asdict(run.config)
    if not model.peft:
        settings["lora"] = None
    return {
        "mode": run.mode,
        **settings,
        "seed": run.seed,
        "device": run.device,
        "steps": int(state.global_step),
        "planned_steps": int(state.max_steps),
        "trained_epochs": round(float(state.epoch or 0.0), 4),
        "tokens_seen": int(outcome.tokens_seen),
        "seconds": round(outcome.seconds, 2),
        "train_seconds_total": round(elapsed, 2),
        "tokens_per_s": round(outcome.tokens_seen / elapsed, 1) if elapsed > 0 else None,
        "final_loss": training.recorder.last_train_loss,
        "mean_train_loss": float(outcome.result.training_loss) if outcome.result.training_loss is not None else None,
        "eval_loss": (outcome.final_eval or {}).get("eval_loss"),
        "task_eval": task_cb.history[-1] if task_cb is not None and task_cb.history else None,
        "trainable_params": int(model.trainable),
        "total_params": int(model.total),
        "world_size": int(trainer.args.world_size),
        "mixed_precision": "bf16" if plan["bf16"] else ("fp16" if plan["fp16"] else "no"),
        "attn_implementation": plan["attn_implementation"],
        "compiled": model.compiled,
        "lm_head_loss": "label positions only" if trainer.banklm_sparse_head else "TRL fused",
        "stopped_by": _stopped_by(run, training),
        "resumed_from_step": outcome.resumed_from,
        "batch_layout": data.layout,
        "examples_truncated": int(data.truncated),
        "examples_without_answer": int(training.answerless),
        "train_examples": len(data.train),
        "train_examples_by_source": data.by_source,
    }


def _outputs(run: _Run, data: _Data, model: _Model, training: _Training, outcome: _Outcome) -> dict:
    """The main process writes ``adapter/`` (LoRA/QLoRA), ``merged/``, ``metrics.jsonl`` and
    ``train_summary.json``, then removes the checkpoints; every rank returns the summary."""
    summary = _summary(run, data, model, training, outcome)
    trainer, out_dir = training.trainer, run.out_dir
    if trainer.is_world_process_zero():
        trained = trainer.model
        trained.config.use_cache = True
        if model.peft:
            with atomic_dir(out_dir / "adapter") as tmp:
                trained.save_pretrained(tmp, safe_serialization=True)
                copy_tokenizer_files(run.model_dir, tmp)
            _fix_adapter_base_path(out_dir / "adapter", run.model_dir)
            if run.merge:
                merge_adapter(run.model_dir, out_dir / "adapter", out_dir / "merged", run.merged_dtype,
                              dequantize_from=run.plan["quantization"])
        else:
            set_generation_config(trained, run.tokenizer)
            if run.merged_dtype not in (None, "auto"):
                trained = trained.to(resolve_dtype(run.merged_dtype, "cpu"))
            save_model_folder(trained, out_dir / "merged", run.model_dir)
        names = {p.name for p in out_dir.iterdir() if not p.name.startswith(".")} - {"checkpoints"}
        summary["outputs"] = sorted(names | {"metrics.jsonl", "train_summary.json"})
        atomic_write_jsonl(out_dir / "metrics.jsonl", training.recorder.rows)
        atomic_write_json(out_dir / "train_summary.json", summary)
        shutil.rmtree(run.ckpt_dir, ignore_errors=True)  # outputs are complete: checkpoints are no longer needed
    trainer.accelerator.wait_for_everyone()
    return summary


def _fix_adapter_base_path(adapter_dir: Path, model_dir: Path) -> None:
    """Record the base folder (absolute) in adapter_config.json so the adapter reloads on its own."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = str(model_dir.resolve())
    atomic_write_json(cfg_path, cfg)
