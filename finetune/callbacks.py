"""Trainer callbacks banklm adds to TRL's ``SFTTrainer``.

* :class:`TrainClock` + :class:`BudgetCallback`: elapsed training time (agreed across processes) and tokens
  trained, the time-budget learning-rate schedule and the clean stop when the budget is spent.
* :class:`MetricsRecorder`: one ``metrics.jsonl`` row per log (loss, LR, real tokens/s, eval loss, ...),
  and a tqdm progress bar with tokens/s and ETA.
* :class:`CheckpointState`: writes ``banklm_state.json`` last into each checkpoint (what makes it
  complete, see :mod:`banklm.finetune.checkpoints`) and keeps the newest K.
* :class:`TaskEvalCallback`: every N steps, greedy answers on a small validation slice per task, scored
  with ``banklm.evaluation`` (parsed like the final evaluation), logged as ``task_accuracy*``.

Under DDP every rank runs the callbacks; only the main process writes files, and every decision that
changes training (stop, learning rate) uses values all ranks agree on.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from banklm.corpora.splits import first_per_task
from transformers import TrainerCallback

from banklm.evaluation.evaluate import score_records
from banklm.evaluation.generate import generate
from banklm.io import atomic_write_json
from banklm.tasks.base import fold_fullwidth, iter_user_messages

from .checkpoints import STATE_FILE, rotate

log = logging.getLogger("banklm")

# log keys copied into metrics.jsonl rows (besides step/epoch/seconds/loss/learning_rate/tokens)
ROW_KEYS = ("eval_loss", "grad_norm", "mean_token_accuracy", "eval_mean_token_accuracy", "train_loss",
            "train_runtime", "kd_loss", "ce_loss")


def _world() -> tuple[int, Any]:
    """(world size, torch.distributed or None)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist
    return 1, None


def agree_max(value: float) -> float:
    """The largest ``value`` over all processes (itself when not distributed)."""
    world, dist = _world()
    if world == 1:
        return value
    import torch

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def agree_sum(value: int) -> int:
    """Sum of an integer over all processes."""
    world, dist = _world()
    if world == 1:
        return int(value)
    import torch

    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


# --------------------------------------------------------------------------- time budget


def lr_factor(progress: float, warmup: float, scheduler: str) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] (linear warmup, then cosine/linear/constant)."""
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


class TrainClock:
    """Training time across attempts, tokens trained, and the schedule's progress.

    ``elapsed`` = time trained before this attempt (``offset``, restored from the checkpoint) + time in
    this attempt, updated after each optimizer step (before the scheduler step) with the maximum over
    all ranks, so every process computes the same learning rate and stops at the same step. With a budget, progress is
    max(step / planned steps, elapsed / budget). ``tokens``: real (non-pad) tokens this process trained in this
    attempt, counted by the trainer (:class:`MetricsRecorder` sums them over ranks).
    """

    def __init__(self, budget_s: float | None, warmup_ratio: float, scheduler: str):
        self.budget_s = budget_s
        self.warmup_ratio = warmup_ratio
        self.scheduler = scheduler
        self.offset = 0.0
        self.elapsed = 0.0
        self.t0: float | None = None
        self.stopped = False
        self.tokens = 0

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.elapsed = self.offset

    def now(self) -> float:
        """This process's own reading (for logs): not agreed across ranks."""
        return self.offset + (time.perf_counter() - self.t0 if self.t0 is not None else 0.0)

    def progress(self, step: int, total_steps: int) -> float:
        p = step / max(1, total_steps)
        if self.budget_s:
            p = max(p, self.elapsed / self.budget_s)
        return p

    def lr_lambda(self, total_steps: int):
        return lambda step: lr_factor(self.progress(step, total_steps), self.warmup_ratio, self.scheduler)


class BudgetCallback(TrainerCallback):
    """Advances the clock after each optimizer step (agreed across ranks), before the scheduler computes the
    next learning rate from it, and stops training when the budget is spent."""

    def __init__(self, clock: TrainClock):
        self.clock = clock

    def on_train_begin(self, args, state, control, **kw):
        self.clock.start()

    def on_optimizer_step(self, args, state, control, **kw):
        c = self.clock
        c.elapsed = c.now() if c.budget_s is None else agree_max(c.now())

    def on_step_end(self, args, state, control, **kw):
        c = self.clock
        if c.budget_s is not None and c.elapsed >= c.budget_s:
            control.should_training_stop = True
            control.should_log = True
            c.stopped = True
        return control


# --------------------------------------------------------------------------- metrics + progress


class MetricsRecorder(TrainerCallback):
    """Collects ``metrics.jsonl`` rows with real (non-pad) tokens/s; draws the progress bar.

    Token counts come from ``clock.tokens`` (this process, counted by the trainer) summed over ranks at each log.
    """

    def __init__(self, clock: TrainClock, progress: bool = False):
        self.clock = clock
        self.progress = progress
        self.rows: list[dict] = []
        self.tokens_offset = 0  # tokens trained before this attempt (resume)
        self.last_tokens = 0
        self.last_t: float | None = None
        self.last_train_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.last_eval_step = -1
        self.bar = None

    # `stopped_by_budget` kept for callers of the earlier Recorder
    @property
    def stopped_by_budget(self) -> bool:
        return self.clock.stopped

    def restore(self, saved: dict) -> None:
        """Continue from a checkpoint's banklm state: its rows and token count."""
        self.rows = list(saved.get("rows", []))
        self.tokens_offset = self.last_tokens = int(saved.get("tokens_seen", 0))
        for r in self.rows:
            if "loss" in r:
                self.last_train_loss = r["loss"]
            if "eval_loss" in r:
                self.last_eval_loss, self.last_eval_step = r["eval_loss"], r["step"]

    def global_tokens(self) -> int:
        """Tokens trained so far over all ranks and attempts (a collective call under DDP)."""
        return self.tokens_offset + agree_sum(self.clock.tokens)

    def on_train_begin(self, args, state, control, **kw):
        self.last_t = time.perf_counter()
        if self.progress and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", desc="train",
                            file=sys.stderr, dynamic_ncols=True, leave=True)
            self._bar_t0, self._bar_tokens0 = time.perf_counter(), self.clock.tokens

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            dt = time.perf_counter() - self._bar_t0
            world = max(1, args.world_size)
            post = {}
            if self.last_train_loss is not None:
                post["loss"] = f"{self.last_train_loss:.3f}"
            if dt > 0:  # this rank's tokens x ranks: the bar must not add a collective per step
                post["tok/s"] = f"{(self.clock.tokens - self._bar_tokens0) * world / dt:,.0f}"
            self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        now = time.perf_counter()
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                               "seconds": round(self.clock.now(), 3)}
        if "loss" in logs:
            row["loss"] = float(logs["loss"])
            self.last_train_loss = row["loss"]
            tokens = self.global_tokens()  # every rank logs "loss" at the same step: safe collective
            dt = now - (self.last_t or now)
            if dt > 0 and tokens > self.last_tokens:
                row["tokens_per_s"] = round((tokens - self.last_tokens) / dt, 1)
            row["tokens_seen"] = tokens
            self.last_tokens, self.last_t = tokens, now
        if "learning_rate" in logs:
            row["learning_rate"] = float(logs["learning_rate"])
        for k, v in logs.items():
            if (k in ROW_KEYS or k.startswith("task_")) and isinstance(v, (int, float)):
                row[k] = float(v)
        if "eval_loss" in logs:
            self.last_eval_loss = float(logs["eval_loss"])
            self.last_eval_step = state.global_step
        self.rows.append(row)


# --------------------------------------------------------------------------- checkpoints


class CheckpointState(TrainerCallback):
    """After the Trainer saved ``checkpoint-<step>``: write banklm's state into it last, then rotate.

    The state holds what the Trainer does not save: the run fingerprint, training time so far (the time
    budget continues from it), tokens seen and the metrics rows.
    """

    def __init__(self, fingerprint: str, keep: int, clock: TrainClock, recorder: MetricsRecorder):
        self.fingerprint = fingerprint
        self.keep = keep
        self.clock = clock
        self.recorder = recorder

    def on_save(self, args, state, control, **kw):
        tokens = self.recorder.global_tokens()  # on_save runs on every rank: safe collective
        if not state.is_world_process_zero:
            return control
        ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ck.is_dir():
            return control
        atomic_write_json(ck / STATE_FILE, {
            "fingerprint": self.fingerprint,
            "step": state.global_step,
            "elapsed_s": round(self.clock.elapsed, 3),
            "tokens_seen": tokens,
            "rows": [r for r in self.recorder.rows if r["step"] <= state.global_step],
        })
        rotate(args.output_dir, self.keep)
        return control


# --------------------------------------------------------------------------- task metrics


class TaskEvalCallback(TrainerCallback):
    """Every ``every`` steps: greedy answers to ``records`` (scenario records with ``task``/``gold``; the first
    ``per_task`` of each task), parsed and scored by ``banklm.evaluation``; logs ``task_accuracy``,
    ``task_format_compliance`` and ``task_accuracy_<task>`` with that step's training loss.

    The main process generates with the unwrapped model (no collectives) and leaves the figures in ``logs``,
    which the trainer adds to its next log (``BudgetTrainer(extra_logs=...)``); every rank asks for a log at
    that step, so the loss gather inside the Trainer's logging stays in step under DDP.
    """

    def __init__(self, records: list[dict], every: int, tokenizer, max_new_tokens: int = 96,
                 batch_size: int = 64, per_task: int | None = None):
        self.records = list(records) if per_task is None else [
            records[i] for i in first_per_task([r["task"] for r in records], per_task)]
        self.every = every
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.logs: dict = {}  # figures waiting for the trainer's next log
        self.history: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kw):
        if not self.records or state.global_step % self.every:
            return control
        control.should_log = True
        if state.is_world_process_zero:
            logs = self.evaluate(model)
            self.history.append({"step": state.global_step, **logs})
            self.logs.update(logs)
        return control

    def evaluate(self, model) -> dict:
        convs = [[{**m, "content": fold_fullwidth(m["content"])} if m["role"] == "user" else m
                  for m in iter_user_messages(r)] for r in self.records]
        import torch

        with torch.compiler.set_stance("force_eager"):  # compiled layers (compile=True) run eagerly here
            texts = generate(model, self.tokenizer, convs, self.max_new_tokens, self.batch_size)
        results, _ = score_records(self.records, list(texts))
        logs = {"task_accuracy": results["overall"]["accuracy"],
                "task_format_compliance": results["overall"]["format_compliance"]}
        for name, res in sorted(results["tasks"].items()):
            logs[f"task_accuracy_{name}"] = res["accuracy"]
        return logs
