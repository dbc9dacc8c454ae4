"""The `banklm` command. Exit codes: 0 success, 1 a failed check or stage, 2 bad usage or input."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from banklm import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or input: exit 2."""


class NotImplementedYet(UsageError):
    pass


def _offline_env() -> None:
    """Nothing here may reach a model hub; fail fast instead of hanging on a network call."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


# ----------------------------------------------------------------------------------------- commands

def _load(args) -> tuple:
    from banklm.recipe import load_recipe

    return load_recipe(args.recipe, args.overrides)


def _run_pipeline(args, upto: str | None = None, only: set[str] | None = None) -> int:
    from banklm.pipeline import run_stages
    from banklm.stages import STAGES

    recipe = _load(args)
    run_dir = run_stages(recipe, STAGES, run_dir=args.run_dir, upto=upto, only=only)
    report = run_dir / "report" / "index.html"
    print(f"run folder: {run_dir}")
    if report.exists():
        print(f"report: {report}")
    return EXIT_OK


def cmd_run(args) -> int:
    return _run_pipeline(args)


def cmd_corpus_build(args) -> int:
    return _run_pipeline(args, only={"corpus"})


def cmd_corpus_scrub(args) -> int:
    from corpora.ops.pii import ALL_TYPES, PIIError, scrub_jsonl

    src, out = Path(args.input), Path(args.output)
    if not src.is_file():
        raise UsageError(f"{src}: input file not found")
    if not os.access(src, os.R_OK):
        raise UsageError(f"{src}: input file not readable")
    quarantine = Path(args.quarantine) if args.quarantine else None
    try:
        stats = scrub_jsonl(src, out, field=args.field, mode=args.mode, quarantine_path=quarantine,
                            types=args.types)
    except PIIError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"{e.filename or out}: {e.strerror}") from None
    print(f"{stats['records_in']} records ({stats['encoding']}): kept {stats['kept']}, dropped {stats['dropped']}, "
          f"quarantined {stats['quarantined']} -> {out}")
    for t in ALL_TYPES:
        if stats["counts"].get(t):
            print(f"  {t:<10} {stats['counts'][t]}")
    if not stats["counts"]:
        print("  no PII found")
    if stats["quarantined"]:
        print(f"quarantine: {stats['quarantine_file']}")
    return EXIT_OK


def cmd_train(args) -> int:
    return _run_pipeline(args, upto="train")


def cmd_distill(args) -> int:
    raise NotImplementedYet("banklm distill: not implemented yet (distillation is planned)")


def cmd_plan(args) -> int:
    raise NotImplementedYet("banklm plan: not implemented yet (the memory planner is planned)")


def cmd_eval(args) -> int:
    if args.recipe:
        if args.model:
            raise UsageError("give either RECIPE or --model, not both")
        return _run_pipeline(args, upto="eval")
    if not args.model:
        raise UsageError("banklm eval needs RECIPE.yaml or --model DIR")
    from banklm.evaluation.evaluate import evaluate_model_dir

    tasks = _tasks_arg(args.tasks)
    model = Path(args.model)
    records = _eval_records(args.data, tasks, args.limit, args.seed)
    out = Path(args.out) if args.out else Path("eval") / model.resolve().name
    results = evaluate_model_dir(model, records, out, device=args.device, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, model_name=model.resolve().name)
    for task, res in results.get("tasks", {}).items():
        print(f"{task}: accuracy {res['accuracy']:.3f}  macro-F1 {res['macro_f1']:.3f}  n={res['n']}")
    print(f"results: {out / 'results.json'}")
    return EXIT_OK


def _tasks_arg(value: str | None) -> list[str]:
    from banklm.tasks import TASKS

    if not value:
        return list(TASKS)
    tasks = [t.strip() for t in value.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UsageError(f"--tasks: unknown task {bad[0]!r} (allowed: {', '.join(TASKS)})")
    return tasks


def _eval_records(data: str | None, tasks: list[str], limit: int | None, seed: int) -> list[dict]:
    """Test records: from a built corpus folder, a run folder, a JSONL file, or freshly generated."""
    if data is None:
        from corpora.synth import generate_records

        return [r for t in tasks for r in generate_records(t, limit or 200, seed=seed, split="test")]
    p = Path(data)
    if p.is_file():
        from banklm.io import read_jsonl

        recs = [r for r in read_jsonl(p) if r.get("task") in tasks]
    elif (p / "data").is_dir() or (p / "corpora" / "scenario" / "data").is_dir():
        from corpora.build import load_split

        corpus = p if (p / "data").is_dir() else p / "corpora" / "scenario"
        recs = load_split(corpus, "test", tasks=tasks).to_list()
    else:
        raise UsageError(f"--data {data}: not a JSONL file, a built corpus folder or a run folder")
    if limit:
        from corpora.build import first_per_task

        recs = [recs[i] for i in first_per_task([r["task"] for r in recs], limit)]
    if not recs:
        raise UsageError(f"--data {data}: no test records for tasks {','.join(tasks)}")
    return recs


def cmd_export(args) -> int:
    if args.format == "onnx":
        raise NotImplementedYet("banklm export --format onnx: not implemented yet (GGUF export works)")
    if args.recipe:
        if args.model:
            raise UsageError("give either RECIPE or --model, not both")
        if args.quant:
            args.overrides = [*args.overrides, f"export.gguf.quant=[{args.quant}]"]
        return _run_pipeline(args, upto="export")
    if not args.model:
        raise UsageError("banklm export needs RECIPE.yaml or --model DIR")
    import json

    from banklm.io import atomic_write_json
    from export.gguf import export_gguf
    from export.verify import verify_gguf
    from finetune.tokenizer import load_tokenizer

    model = Path(args.model)
    quant = [q.strip() for q in (args.quant or "f16,q8_0").split(",") if q.strip()]
    out = Path(args.out) if args.out else model / "gguf"
    files = export_gguf(model, out, types=tuple(quant))
    tok = load_tokenizer(model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in ("请审核这笔贷款申请。", "账户近7日有多笔现金存入。", "报销单金额超过标准。")]
    checks = [{"file": str(f), "type": q, **verify_gguf(model, f, prompts, q)} for f, q in zip(files, quant, strict=True)]
    atomic_write_json(out / "verify.json", {"gguf": checks})
    for c in checks:
        print(json.dumps({"file": c["file"], "type": c["type"], "passed": c.get("passed"),
                          "max_abs_logit_diff": (c.get("logits") or {}).get("max_abs"),
                          "failures": c.get("failures", [])}, ensure_ascii=False))
    return EXIT_OK if all(c.get("passed") for c in checks) else EXIT_FAILED


def cmd_verify(args) -> int:
    from banklm.ledger import verify_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a folder")
    problems = verify_run(run_dir, check_external=args.external)
    if not problems:
        n = sum(1 for line in (run_dir / "ledger.jsonl").read_text(encoding="utf-8").splitlines() if line.strip())
        print(f"ok: {n} ledger entries, chain intact, every recorded file matches")
        return EXIT_OK
    print(f"TAMPERED: {problems[0]}", file=sys.stderr)
    for p in problems[1:]:
        print(f"  also: {p}", file=sys.stderr)
    return EXIT_FAILED


# ----------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="banklm", description="Small, precise models for credit, audit and AML work: "
                                "corpora -> fine-tuning -> distillation -> evaluation -> verified GGUF/ONNX export.")
    p.add_argument("--version", action="version", version=f"banklm {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details to the console")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def recipe_cmd(name: str, help_: str, func, recipe_required: bool = True):
        sp = sub.add_parser(name, help=help_, description=help_)
        if recipe_required:
            sp.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe to run")
        sp.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override recipe values, e.g. train.lr=1e-4 export.gguf.quant=[q8_0,q4_0]")
        sp.add_argument("--run-dir", type=Path, default=None,
                        help="run folder (default runs/<recipe name>/<new run id>; an existing one resumes in place)")
        sp.set_defaults(func=func)
        return sp

    recipe_cmd("run", "run every stage the recipe enables, in order, reusing unchanged stages", cmd_run)

    corpus = sub.add_parser("corpus", help="build corpora or scrub PII from a JSONL file",
                            description="build corpora or scrub PII from a JSONL file")
    csub = corpus.add_subparsers(dest="corpus_command", metavar="ACTION")
    cb = csub.add_parser("build", help="build the recipe's corpora into the run folder",
                         description="build the recipe's corpora into the run folder")
    cb.add_argument("recipe", metavar="RECIPE.yaml")
    cb.add_argument("overrides", nargs="*", metavar="key.sub=value")
    cb.add_argument("--run-dir", type=Path, default=None)
    cb.set_defaults(func=cmd_corpus_build)
    cs = csub.add_parser("scrub", help="de-identify PII in one JSONL file",
                         description="de-identify PII in one JSONL file (UTF-8, UTF-8 BOM or GBK/GB18030 in, "
                                     "UTF-8 out): ID cards, phones, bank cards, accounts, USCC, passports, "
                                     "plates, emails, person names and addresses")
    cs.add_argument("input", metavar="IN.jsonl")
    cs.add_argument("output", metavar="OUT.jsonl")
    cs.add_argument("--field", default="text", help="field(s) to scrub, comma-separated: text (default), messages, prompt, "
                                                  "instruction,input,output ...")
    cs.add_argument("--mode", default="placeholder", choices=["placeholder", "pseudonym", "drop"],
                    help="placeholder: <ID_CARD>; pseudonym: <ID_CARD_1a2b3c4d> keyed by $BANKLM_PII_KEY; "
                         "drop: drop records with PII")
    cs.add_argument("--quarantine", metavar="PATH", default=None,
                    help="where malformed lines are recorded (line, reason, hash; default OUT.quarantine.jsonl)")
    cs.add_argument("--types", default=None,
                    help="comma-separated PII types to replace (default all), e.g. to keep company USCCs")
    cs.set_defaults(func=cmd_corpus_scrub)
    corpus.set_defaults(func=lambda a: (corpus.print_help(), EXIT_USAGE)[1])

    recipe_cmd("train", "SFT / CPT with LoRA, QLoRA or full fine-tuning (runs the stages up to train)", cmd_train)

    d = sub.add_parser("distill", help="teacher -> student distillation (not implemented yet)",
                       description="teacher -> student distillation (not implemented yet)")
    d.add_argument("recipe", metavar="RECIPE.yaml")
    d.add_argument("overrides", nargs="*", metavar="key.sub=value")
    d.set_defaults(func=cmd_distill)

    ev = sub.add_parser("eval", help="evaluate a model on the credit / aml / audit tasks",
                        description="evaluate a model on the credit / aml / audit tasks: from a recipe (runs the "
                                    "stages up to eval) or a model folder")
    ev.add_argument("recipe", nargs="?", metavar="RECIPE.yaml")
    ev.add_argument("overrides", nargs="*", metavar="key.sub=value")
    ev.add_argument("--model", help="a model folder (safetensors) instead of a recipe")
    ev.add_argument("--tasks", help="comma-separated: credit,aml,audit (default all)")
    ev.add_argument("--data", help="test records: a JSONL file, a built corpus folder or a run folder "
                                   "(default: freshly generated test records)")
    ev.add_argument("--limit", type=int, help="at most N records per task")
    ev.add_argument("--out", help="output folder (default eval/<model folder name>)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--seed", type=int, default=12345, help="seed for generated test records")
    ev.add_argument("--run-dir", type=Path, default=None)
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="export GGUF (llama.cpp / Ollama) or ONNX, verified against PyTorch",
                        description="export GGUF (llama.cpp / Ollama) or ONNX, verified against PyTorch")
    ex.add_argument("recipe", nargs="?", metavar="RECIPE.yaml")
    ex.add_argument("overrides", nargs="*", metavar="key.sub=value")
    ex.add_argument("--model", help="a model folder instead of a recipe")
    ex.add_argument("--format", choices=["gguf", "onnx"], required=True)
    ex.add_argument("--quant", help="comma-separated GGUF types: f16,bf16,q8_0,q4_0 (default f16,q8_0)")
    ex.add_argument("--out", help="output folder (with --model; default <model>/gguf)")
    ex.add_argument("--run-dir", type=Path, default=None)
    ex.set_defaults(func=cmd_export)

    pl = sub.add_parser("plan", help="estimate GPU memory for a fine-tuning method (not implemented yet)",
                        description="estimate GPU memory for a fine-tuning method (not implemented yet)")
    pl.add_argument("--model", required=True, help="model folder or config.json")
    pl.add_argument("--method", default="qlora", choices=["lora", "qlora", "full"])
    pl.add_argument("--seq-len", type=int, default=2048)
    pl.add_argument("--gpu-mem", default="12GB")
    pl.set_defaults(func=cmd_plan)

    v = sub.add_parser("verify", help="re-hash a run folder's files and check its ledger chain (exit 1 on tamper)",
                       description="re-hash a run folder's files and check its ledger chain (exit 1 on tamper)")
    v.add_argument("run_dir", metavar="RUN_DIR")
    v.add_argument("--external", action="store_true", help="also re-hash inputs outside the run folder")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    _offline_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("banklm").setLevel(logging.INFO if not args.verbose else logging.DEBUG)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    from banklm.ledger import LedgerError
    from banklm.pipeline import CheckFailed, RunLocked, StageError
    from banklm.recipe import RecipeError

    try:
        return int(args.func(args))
    except (UsageError, RecipeError, RunLocked) as e:
        print(f"banklm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckFailed as e:
        print(f"banklm: check failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (StageError, LedgerError) as e:
        print(f"banklm: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("banklm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
