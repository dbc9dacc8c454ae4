"""Logit distillation: the student learns the teacher's next-token distribution on the answers.

Why our own trainer and not TRL's: ``trl.experimental.gkd.GKDTrainer`` (and the on-policy
``trl.DistillationTrainer``) need the teacher live in memory next to the student, use their own
padding collator (no packing) and offer neither a top-k cache, a cross-entropy mix nor our time-budget
schedule. So :func:`train_logit_kd` runs the normal fine-tuning path
(:func:`banklm.finetune.sft.train_causal_lm`: data preparation, packing, LR schedule on a time budget, metrics,
saving) with a small subclass of its trainer whose ``compute_loss`` adds the distillation term
(:func:`banklm.distill.losses.kd_loss`); the divergences follow GKD's definitions (tested against TRL's
``generalized_jsd_loss``).

Two teacher modes:

* live (``top_k=None``): the teacher (bf16/fp32, or 4-bit/8-bit with bitsandbytes on CUDA) runs on each
  training batch; full-vocabulary logits.
* cached (``top_k=k``): before training, the teacher computes top-k logits over the prepared training rows
  (:mod:`banklm.distill.teacher_cache`, reused when teacher, data, ``k`` and temperature are unchanged) while the
  student waits on the CPU; the teacher is then freed, so teacher and student never share the GPU.

Eval loss (``eval_ds``) is the plain cross-entropy, comparable with a student trained without a teacher.
"""

from __future__ import annotations

import functools
import gc
import json
import os
from pathlib import Path

from banklm.finetune.attention import NAME as VARLEN_ATTENTION
from banklm.finetune.config import TrainConfig
from banklm.finetune.models import load_model, pick_device
from banklm.finetune.sft import PackedRowsCollator, forward_inputs, make_trainer_classes, train_causal_lm
from banklm.finetune.tokenizer import load_tokenizer

from banklm.io import atomic_write_json, sha256_file

from .losses import DIVERGENCES, TAILS, kd_loss
from .teacher_cache import CACHE_BATCH_ROWS, build_teacher_cache, data_fingerprint, open_teacher_cache

TEACHER_KEYS = ("teacher_values", "teacher_indices", "teacher_lse")


class TeacherCacheCollator(PackedRowsCollator):
    """The trainer's packed-rows collator plus the cached teacher top-k of every row in the batch.

    Adds ``teacher_values``/``teacher_indices``/``teacher_lse`` (completion positions, row-major) when
    every row is in the cache; a batch with an unknown row (the eval set) gets none.
    """

    def __init__(self, pad_token_id: int, cache, flat: bool = False):
        super().__init__(pad_token_id, flat)
        self.cache = cache

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch = super().__call__(examples)
        found = [self.cache.lookup(ex) for ex in examples]
        if all(f is not None for f in found):
            for i, name in enumerate(TEACHER_KEYS):
                batch[name] = torch.cat([f[i] for f in found])
        return batch


@functools.cache
def kd_trainer_class():
    """``BudgetTrainer`` subclass whose training loss is :func:`banklm.distill.losses.kd_loss`.

    Its extras are keyword arguments of the constructor, under the recipe's ``distill.kd`` names
    (``divergence``, ``beta``, ``temperature``, ``alpha``, ``tail``), plus ``vocab_size`` (the logit width
    teacher and student share: either embedding may be padded beyond it), ``teacher`` (a live teacher model)
    or ``teacher_cache`` (``(rows, student, pad_token_id) -> TeacherCache``, called once TRL has prepared the
    rows, whose batches then carry the cached top-k); everything else goes to ``BudgetTrainer``."""
    import torch

    BudgetTrainer, _ = make_trainer_classes()

    class KDTrainer(BudgetTrainer):
        def __init__(self, *args, divergence: str = "forward", beta: float = 0.5, temperature: float = 1.0,
                     alpha: float = 0.5, tail: str = "bucket", vocab_size: int | None = None, teacher=None,
                     teacher_cache=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.kd = {"divergence": divergence, "beta": beta, "temperature": temperature, "alpha": alpha,
                       "tail": tail}
            self.vocab_size = vocab_size
            self.teacher = teacher
            self._kd_sums = [0.0, 0.0, 0]
            if teacher is not None and self.model.config._attn_implementation == VARLEN_ATTENTION:
                teacher.set_attn_implementation(VARLEN_ATTENTION)  # flat batches: the teacher needs the same kernel
            if teacher_cache is not None:  # fill (or reopen) the cache for the rows TRL has just prepared
                pad = self.processing_class.pad_token_id
                cache = teacher_cache(self.train_dataset, self.model, pad)
                self.data_collator = TeacherCacheCollator(pad, cache, flat=self.data_collator.flat)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            topk = [inputs.pop(k, None) for k in TEACHER_KEYS]
            if not model.training:  # evaluation: plain cross-entropy
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            fwd = forward_inputs(inputs)
            outputs = model(**fwd, use_cache=False)
            v = self.vocab_size
            student_logits = outputs.logits[..., :v] if v else outputs.logits
            teacher_logits = None
            if topk[0] is None:
                if self.teacher is None:
                    raise RuntimeError("a training batch has no cached teacher logits and there is no live "
                                       "teacher (the teacher cache does not match the training rows)")
                # the student's forward is wrapped in autocast by accelerate; the teacher is not prepared, so
                # give it the same mixed precision explicitly (bf16 on CPU: ~2x faster than fp32)
                with torch.no_grad(), self.accelerator.autocast():
                    t_dev = next(self.teacher.parameters()).device
                    t_out = self.teacher(**forward_inputs(fwd, t_dev), use_cache=False)
                    teacher_logits = t_out.logits[..., :v] if v else t_out.logits
                    teacher_logits = teacher_logits.to(student_logits.device)
            kd = self.kd  # the recipe's names; kd_loss calls the divergence ``kind``
            parts = kd_loss(student_logits, inputs["labels"], teacher_logits=teacher_logits,
                            teacher_topk=None if topk[0] is None else tuple(topk), num_items=num_items_in_batch,
                            kind=kd["divergence"], beta=kd["beta"], temperature=kd["temperature"],
                            alpha=kd["alpha"], tail=kd["tail"])
            self._kd_sums[0] += float(parts["kd"].detach())
            self._kd_sums[1] += float(parts["ce"].detach())
            self._kd_sums[2] += 1
            return (parts["loss"], outputs) if return_outputs else parts["loss"]

        def log(self, logs, *args, **kwargs):
            sums = self._kd_sums
            if "loss" in logs and sums[2]:
                # per micro-batch values, normalised like the loss (by the accumulation steps' token count)
                ga = max(1, self.args.gradient_accumulation_steps)
                logs["kd_loss"] = round(sums[0] / sums[2] * ga, 6)
                logs["ce_loss"] = round(sums[1] / sums[2] * ga, 6)
                self._kd_sums = [0.0, 0.0, 0]
            return super().log(logs, *args, **kwargs)

    return KDTrainer


def _folder_hashes(folder: Path) -> dict:
    """sha256 of the files that decide a model's logits (config + weights)."""
    files = sorted([folder / "config.json", *folder.glob("*.safetensors")])
    return {f.name: sha256_file(f) for f in files if f.is_file()}


def check_same_vocabulary(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike) -> int:
    """Logit KD compares distributions token by token: both tokenizers must map the same strings to the same
    ids. Returns the shared vocabulary size; raises ValueError naming both folders otherwise."""
    t_tok, s_tok = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    if t_tok.get_vocab() != s_tok.get_vocab():
        raise ValueError(f"logit distillation needs the same tokenizer for teacher ({teacher_dir}) and student "
                         f"({student_dir}); their vocabularies differ (use distill.method: seq for different "
                         "tokenizers)")
    t_cfg = json.loads((Path(teacher_dir) / "config.json").read_text(encoding="utf-8"))
    s_cfg = json.loads((Path(student_dir) / "config.json").read_text(encoding="utf-8"))
    return int(min(t_cfg.get("vocab_size") or len(t_tok), s_cfg.get("vocab_size") or len(s_tok)))


def load_teacher(teacher_dir, device: str, quantization: str | None = None, dtype="auto",
                 trust_remote_code: bool = False):
    """The teacher, frozen, in eval mode: 4-bit/8-bit (bitsandbytes) when asked, else ``dtype`` (auto: bf16
    on CUDA, fp32 on CPU)."""
    if quantization and not device.startswith("cuda"):
        # bitsandbytes runs on CPU too (slowly); a teacher quantized for GPU memory is pointless on CPU
        quantization = None
    teacher = load_model(teacher_dir, device=device, dtype=dtype, quantization=quantization,
                         trust_remote_code=trust_remote_code)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    return teacher


def _free(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_logit_kd(
    student_dir: str | os.PathLike,
    teacher_dir: str | os.PathLike,
    train_ds,
    eval_ds,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    divergence: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.5,
    top_k: int | None = None,
    tail: str = "bucket",
    teacher_quantization: str | None = None,
    teacher_dtype: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    cache_batch_rows: int = CACHE_BATCH_ROWS,
    device: str = "auto",
    **train_kwargs,
) -> dict:
    """Train the student in ``student_dir`` on ``train_ds`` (``messages`` records) with the KD loss.

    ``config`` (:class:`banklm.finetune.config.TrainConfig`) and ``train_kwargs`` go to
    :func:`banklm.finetune.sft.train_causal_lm` (``seed``, ``mixed_precision``, ... or config fields such as
    ``method``, ``lr``, ``time_budget_s``, ``batch_size``). ``alpha`` weighs the (``T**2``-scaled) divergence
    against the ground-truth cross-entropy; ``top_k`` switches to the on-disk teacher cache in ``cache_dir``
    (default ``out_dir/teacher_cache``). Returns the training summary with a ``distill`` block (also written to
    ``train_summary.json``).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    out_dir = Path(out_dir)
    device = pick_device(device)
    vocab = check_same_vocabulary(teacher_dir, student_dir)
    kd = {"divergence": divergence, "beta": beta, "temperature": temperature, "alpha": alpha, "tail": tail}
    # the summary's distill block keeps the key "kind" for the divergence: banklm.report reads it
    info: dict = {"teacher": str(teacher_dir), "mode": "live" if top_k is None else "topk_cache",
                  "kind": divergence, **{k: v for k, v in kd.items() if k != "divergence"}, "top_k": top_k, "teacher_quantization": teacher_quantization if device.startswith("cuda") else None,
                  "vocab_size": vocab}
    extras: dict = {**kd, "vocab_size": vocab}
    if top_k is None:
        extras["teacher"] = load_teacher(teacher_dir, device, teacher_quantization, teacher_dtype)
    else:
        key = {"teacher": _folder_hashes(Path(teacher_dir)), "top_k": top_k, "temperature": temperature,
               "vocab_size": vocab, "teacher_quantization": info["teacher_quantization"],
               "teacher_dtype": str(teacher_dtype)}
        extras["teacher_cache"] = functools.partial(
            _teacher_cache, folder=Path(cache_dir) if cache_dir else out_dir / "teacher_cache", key=key, info=info,
            teacher=functools.partial(load_teacher, teacher_dir, device, teacher_quantization, teacher_dtype),
            device=device, top_k=top_k, temperature=temperature, vocab_size=vocab, batch_rows=cache_batch_rows)
    try:
        summary = train_causal_lm(student_dir, train_ds, eval_ds, out_dir, config, mode="sft", device=device,
                                  trainer_class=kd_trainer_class(), trainer_kwargs=extras, **train_kwargs)
    finally:
        if "teacher" in extras:
            _free(extras.pop("teacher"))
    summary["distill"] = info
    atomic_write_json(out_dir / "train_summary.json", summary)
    return summary


def _teacher_cache(rows, student, pad_token_id: int, *, folder: Path, key: dict, info: dict, teacher, device: str,
                   top_k: int, temperature: float, vocab_size: int, batch_rows: int):
    """The top-k cache of ``rows`` (the student's prepared training rows) in ``folder``: reopened when ``key``
    and the rows match, else filled by the teacher (``teacher()`` loads it) while the student waits on the CPU;
    the teacher is freed afterwards. Notes what it did in ``info``."""
    fingerprint = data_fingerprint(rows)
    cache = open_teacher_cache(folder, key, fingerprint)
    info["cache_reused"] = cache is not None
    if cache is None:
        offload = device.startswith("cuda") and not getattr(student, "is_quantized", False)
        if offload:  # the teacher gets the GPU to itself
            student.to("cpu")
        model = teacher()
        cache = build_teacher_cache(model, rows, folder, vocab_size=vocab_size, pad_token_id=pad_token_id,
                                    top_k=top_k, temperature=temperature, key=key, batch_rows=batch_rows,
                                    fingerprint=fingerprint)
        _free(model)
        if offload:
            student.to(device)
    info["cache"] = {"folder": str(folder), "rows": cache.meta["rows"], "positions": cache.meta["positions"],
                     "bytes": sum(f.stat().st_size for f in folder.iterdir())}
    return cache
