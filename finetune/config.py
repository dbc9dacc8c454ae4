"""The settings of one fine-tuning run, as one frozen, typed object: :class:`TrainConfig`.

Its fields are the recipe's ``train:`` keys (the same schema serves ``cpt:`` and ``distill.train:``), by the
same names, and :class:`LoraSettings` is ``train.lora:``. ``banklm.recipe`` builds those sections from these
classes (names, types, defaults and the bounds each field declares), so a setting is declared once, here.
:func:`banklm.finetune.sft.train_causal_lm` takes the object; names change to TRL's and PEFT's only at their
calls (``epochs`` -> ``SFTConfig(num_train_epochs=)``, ``lora.r`` -> ``peft.LoraConfig(r=)``). The checkpoint
fingerprint and ``train_summary.json`` are derived from it, field by field.

What is not a ``train:`` key (the seed, the device, resuming, the model folders) stays an argument of
``train_causal_lm``; so do :class:`TaskEval`'s validation records. From a notebook::

    TrainConfig(method="lora", lr=3e-3, max_steps=200, lora=LoraSettings(r=8))   # or lora={"r": 8}
    dataclasses.replace(config, lr=1e-3)                                         # a changed copy
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from banklm.settings import bound_problem, setting

Method = Literal["lora", "qlora", "full"]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
Auto = Literal[True, False, "auto"]

@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj: Any) -> None:
    """Check a settings dataclass field by field: a nested settings class given as a mapping is built from it,
    a ``Literal`` value must be one of its choices and a bounded number within its bounds. ``ValueError``
    names the field."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        kind, value = hints[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = kind(**value)
            object.__setattr__(obj, f.name, value)  # frozen: the one assignment, while building
        if typing.get_origin(kind) is Literal and value not in typing.get_args(kind):
            choices = ", ".join(repr(c) for c in typing.get_args(kind))
            raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")
        problem = None if value is None else bound_problem(f.name, value, f.metadata.get("bounds", {}))
        if problem:
            raise ValueError(problem)


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter of ``method: lora`` / ``qlora`` (the recipe's ``train.lora:``)."""

    r: int = setting(16, ge=1, le=1024)
    alpha: int = setting(32, ge=1)
    dropout: float = setting(0.0, ge=0.0, lt=1.0)  # as PEFT, torchtune: masks took 44-60% of a CPU LoRA step
    targets: str | list[str] = "all-linear"
    rslora: bool = False
    dora: bool = False

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run: the recipe's ``train:`` keys (also ``cpt:`` and ``distill.train:``)."""

    method: Method = "lora"
    lr: float = setting(2e-4, gt=0, lt=1)
    epochs: float = setting(1.0, gt=0, le=10_000)
    max_steps: int = setting(-1, ge=-1, le=1_000_000_000)  # -1: epochs decide
    time_budget_s: float | None = setting(None, gt=0, le=31_536_000)  # at most a year
    batch_size: int = setting(16, ge=1, le=65_536)  # per process
    grad_accum: int = setting(1, ge=1, le=65_536)
    max_length: int = setting(512, ge=16, le=1_048_576)
    warmup_ratio: float = setting(0.05, ge=0, lt=1)
    scheduler: Scheduler = "cosine"
    weight_decay: float = setting(0.0, ge=0)
    lora: LoraSettings = field(default_factory=LoraSettings)
    # auto: SFT batches of examples in random order, concatenated into one row without padding (varlen
    # attention), CPT packed rows (finetune.sft.batch_layout); true: always packed rows; false: padded rows
    packing: Auto = "auto"
    # unpacked batches of similar-length examples: less padding, but where length goes with the task (the
    # scenario mix) it cost the quickstart 0.81 -> 0.59 accuracy (finetune.sft.length_grouped_sampler)
    group_by_length: bool = False
    completion_only_loss: bool = True
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer (finetune.sft.wants_compile): auto = runs with a time budget of 5 min or
    # more (without one: 300+ steps); faster after compiling in the first steps (BENCHMARKS.md)
    compile: Auto = "auto"
    logging_steps: int = setting(10, ge=1)
    eval_steps: int | None = setting(None, ge=1)  # validation loss every N steps (default: each epoch end)
    early_stopping_patience: int | None = setting(None, ge=1)  # stop after N evaluations without a lower loss
    task_eval_steps: int | None = setting(None, ge=1)  # greedy task accuracy on validation records every N steps
    task_eval_samples: int = setting(20, ge=1)  # validation records per task for task_eval_steps
    save_steps: int | None = setting(None, ge=1)  # checkpoint every N steps: an interrupted run resumes there
    keep_checkpoints: int = setting(2, ge=1)  # newest checkpoints kept while training (removed at the end)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ValueError("early_stopping_patience needs eval_steps (evaluate every N steps)")


@dataclass(frozen=True)
class TaskEval:
    """Validation records (``task``, ``gold``, ``messages``) answered greedily every ``TrainConfig.task_eval_steps``
    steps, at most ``task_eval_samples`` per task, and scored with ``banklm.evaluation`` (the stages take
    ``max_new_tokens`` from the recipe's ``eval:``)."""

    records: list[dict]
    max_new_tokens: int = 96
