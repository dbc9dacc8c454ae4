"""Evaluation: batched generation, parsing with the task parsers, metrics, result files.

Heavy imports (torch, transformers) happen only when generating.
"""

from __future__ import annotations

from banklm.evaluation.evaluate import evaluate_model_dir, evaluate_records, load_model_dir, score_records
from banklm.evaluation.generate import GenerationResult, generate
from banklm.evaluation.metrics import (
    INVALID,
    accuracy,
    aml_metrics,
    confusion_matrix,
    extract_numbers,
    fairness,
    faithfulness,
    format_compliance,
    macro_f1,
    mcc,
)
from banklm.tasks.base import PERTURBATIONS, perturb

__all__ = [
    "evaluate_records",
    "evaluate_model_dir",
    "load_model_dir",
    "score_records",
    "generate",
    "GenerationResult",
    "INVALID",
    "accuracy",
    "aml_metrics",
    "confusion_matrix",
    "extract_numbers",
    "fairness",
    "faithfulness",
    "format_compliance",
    "macro_f1",
    "mcc",
    "perturb",
    "PERTURBATIONS",
]
