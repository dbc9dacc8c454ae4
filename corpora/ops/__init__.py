"""Cleaning steps for corpora, each a small callable applied to a ``datasets.Dataset`` (see ``base``).

Typical order for raw text: Normalize -> ScrubPII -> ExactDedup -> NearDedup -> RemoveBoilerplate ->
QualityFilter -> Decontaminate; for instruction data add PoisonScreen. ``run_steps`` applies a list and
checks ``in == kept + dropped + quarantined`` for each.
"""

from corpora.ops.base import ScrubPII, Step, StepResult, run_steps
from corpora.ops.decontam import Decontaminate
from corpora.ops.dedup import ExactDedup, NearDedup
from corpora.ops.normalize import Normalize, RemoveBoilerplate, normalize_text
from corpora.ops.poison import PoisonScreen
from corpora.ops.quality import QualityFilter

__all__ = ["Decontaminate", "ExactDedup", "NearDedup", "Normalize", "PoisonScreen", "QualityFilter",
           "RemoveBoilerplate", "ScrubPII", "Step", "StepResult", "normalize_text", "run_steps"]
