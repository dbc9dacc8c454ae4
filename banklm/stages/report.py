"""report: the HTML report and the model card."""

from __future__ import annotations

from pathlib import Path

from banklm.corpora.ops.pii import scrub_text
from banklm.pipeline import RunContext
from banklm.report import write_report


def run_report(ctx: RunContext) -> list[Path]:

    # model outputs quoted in the card pass the PII detector first (placeholders, never values)
    return write_report(ctx.run_dir, ctx.recipe, mask_pii=lambda text: scrub_text(text)[0])
