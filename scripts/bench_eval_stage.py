"""Benchmark the eval stage's scoring on a finished run: free decoding against constrained decoding.

    python scripts/bench_eval_stage.py RUN_DIR [--limit 200] [--batch-size 100] [--max-new-tokens 96]
                                       [--robustness shuffle_fields,fullwidth_digits,distractor] [--json out.json]

Scores the run's models as the eval stage does (``evaluate_model_dir`` on the test split's first ``--limit``
records per task; the final model, the distilled student if there is one, else the fine-tuned model, also on
the ``--robustness`` perturbations; then the fine-tuned teacher, the no-teacher baseline and the model before
fine-tuning, those the run folder holds), three ways in one process: ``free``; ``constrained`` with the
models sharing their grammars (``GrammarCache``, as the stage does); ``constrained_unshared`` (each model
building its own). Reported: seconds per way and ``growth_s`` = constrained - free (the issue's budget: 30 s on
the quickstart). The stage's ledger, instruction scoring and retention are left out: they do not depend on the
decoding. The load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODELS = {"student": ("distill", "student"), "sft": ("sft", "merged"), "baseline": ("distill", "baseline"),
          "cpt": ("cpt", "merged")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--robustness", default="shuffle_fields,fullwidth_digits,distractor")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from banklm.corpora.splits import load_split

    from banklm.evaluation.constrained import GrammarCache
    from banklm.evaluation.evaluate import evaluate_model_dir

    run = args.run_dir
    records = load_split(run / "corpora" / "scenario", "test", limit_per_task=args.limit).to_list()
    models = {name: run.joinpath(*parts) for name, parts in MODELS.items() if run.joinpath(*parts).is_dir()}
    if not models:
        raise SystemExit(f"{run}: no model folders ({', '.join('/'.join(p) for p in MODELS.values())})")
    final = next(iter(models))
    kinds = tuple(k for k in args.robustness.split(",") if k)
    out: dict = {"command": "python scripts/bench_eval_stage.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "records": len(records), "models": list(models), "loadavg": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        for way in ("free", "constrained", "constrained_unshared"):
            cache = GrammarCache() if way == "constrained" else None
            t0 = time.perf_counter()
            for name, folder in models.items():
                evaluate_model_dir(folder, records, Path(tmp) / way / name, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, model_name=name,
                                   robustness=kinds if name == final else (), decoding=way.split("_")[0],
                                   grammar_cache=cache)
            out[way] = {"seconds": time.perf_counter() - t0}
            if cache is not None:
                out[way].update({"matchers_built": cache.built, "matchers_copied": cache.copied})
            print(f"{way}: {out[way]['seconds']:.1f} s", flush=True)
    out["growth_s"] = out["constrained"]["seconds"] - out["free"]["seconds"]
    print(f"constrained - free: {out['growth_s']:+.1f} s ({len(models)} models, {len(records)} records)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
