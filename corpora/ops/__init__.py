"""Cleaning steps for corpora, each a small callable applied to a ``datasets.Dataset`` (see ``base``).

Typical order for raw text: Normalize -> ScrubPII -> ExactDedup -> NearDedup -> RemoveBoilerplate ->
QualityFilter -> Decontaminate; for instruction data add PoisonScreen. ``run_steps`` applies a list and
checks ``in == kept + dropped + quarantined`` for each.
"""

from .base import ScrubPII, Step, StepResult, run_steps
from .decontam import Decontaminate
from .dedup import ExactDedup, NearDedup
from .normalize import Normalize, RemoveBoilerplate, normalize_text
from .poison import PoisonScreen
from .quality import QualityFilter

__all__ = ["Decontaminate", "ExactDedup", "NearDedup", "Normalize", "PoisonScreen", "QualityFilter",
           "RemoveBoilerplate", "ScrubPII", "Step", "StepResult", "normalize_text", "run_steps"]
