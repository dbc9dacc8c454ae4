"""The `banklm` command. Exit codes: 0 success, 1 a failed check or stage, 2 bad usage or input."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import unicodedata
from pathlib import Path

from banklm import __version__
from banklm.chain import ChainError
from banklm.compare import NotARun, compare_runs, format_comparison
from banklm.corpora.draft_spec import DraftError, draft_examples, draft_spec
from banklm.corpora.ops.pii import ALL_TYPES, PIIError, scrub_jsonl, scrub_text
from banklm.corpora.splits import first_per_task, load_split
from banklm.corpora.synth import generate_records
from banklm.evaluation.comparison import write_comparison
from banklm.evaluation.confidence import load_operating_point
from banklm.evaluation.evaluate import evaluate_export, evaluate_model_dir, export_kind
from banklm.export.bundle import SUMS_FILE, VERIFY_FILE, build_export, verify_export
from banklm.export.gguf import DEFAULT_GGUF_QUANT, KQUANTS, NATIVE_QUANTS
from banklm.export.onnx import DEFAULT_ONNX_QUANT, DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ONNX_QUANTS
from banklm.export.verify import DEFAULT_PROMPTS
from banklm.finetune.models import ModelFolderError, check_model_folder
from banklm.finetune.plan import (
    GIB,
    PlanError,
    Setup,
    card_budget,
    estimate,
    format_plan,
    load_shape,
    parse_gpu_mem,
    plan_cards,
    propose,
)
from banklm.finetune.tokenizer import load_tokenizer
from banklm.io import atomic_write_text, read_jsonl
from banklm.ledger import verify_run
from banklm.pipeline import (
    CheckFailed,
    FollowerStopped,
    LaunchError,
    RunContext,
    RunDirError,
    RunLocked,
    StageError,
    default_run_dir,
    launched_rank,
    new_run_id,
    run_stages,
)
from banklm.recipe import RecipeError, load_recipe
from banklm.runtime import MissingDependency
from banklm.seeds import parse_seeds, seed_run_dir, write_seed_table
from banklm.stages import STAGES
from banklm.stages.common import check_models
from banklm.stages.export import export_dir_check
from banklm.stages.plan import plan_request, plan_shape, plan_teacher
from banklm.tasks import TASKS, carried_specs, resolve_tasks
from banklm.tasks.check import check_spec, check_table, example_prompts, format_examples
from banklm.tasks.table_files import read_table

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

    return load_recipe(args.recipe, args.overrides)


def _run_pipeline(args, upto: str | None = None, only: set[str] | None = None) -> int:

    recipe = _load(args)
    if only != {"corpus"}:
        check_models(recipe)  # bad model folders are refused before anything runs
    run_dir = run_stages(recipe, STAGES, run_dir=args.run_dir, upto=upto, only=only)
    if launched_rank() != 0:
        return EXIT_OK  # one process of a multi-process launch: rank 0 reports the run
    report = run_dir / "report" / "index.html"
    print(f"run folder: {run_dir}")
    if report.exists():
        print(f"report: {report}")
    return EXIT_OK


def cmd_run(args) -> int:
    if getattr(args, "seeds", None):
        return _run_seeds(args)
    return _run_pipeline(args)


def _run_seeds(args) -> int:
    """``--seeds 0,1,2``: one run folder per seed (``runs/<name>/<id>-s<seed>``), the data's seed fixed, then the
    table of their scores (``runs/<name>/seeds-<id>.md``; banklm.seeds)."""
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.run_dir is not None:
        raise UsageError("--run-dir names one run; with --seeds each seed runs in runs/<name>/<id>-s<seed>")
    recipe = _load(args)
    check_models(recipe)
    parent = default_run_dir(recipe).parent
    run_id = new_run_id()
    fixed = [f"data_seed={recipe.data_seed_used}"]  # every seed trains on the same data
    run_dirs = {}
    for seed in seeds:
        r = load_recipe(args.recipe, [*args.overrides, f"seed={seed}", *fixed])
        run_dirs[seed] = run_stages(r, STAGES, run_dir=seed_run_dir(parent, run_id, seed))
        print(f"seed {seed}: run folder {run_dirs[seed]}", flush=True)
    if launched_rank() != 0:
        return EXIT_OK
    md, js = write_seed_table(parent, run_id, run_dirs)
    print(md.read_text(encoding="utf-8"), end="")
    print(f"seeds table: {md} ({js.name})")
    return EXIT_OK


def cmd_corpus_build(args) -> int:
    return _run_pipeline(args, only={"corpus"})


def cmd_corpus_scrub(args) -> int:

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

    if not load_recipe(args.recipe, args.overrides).distill.enabled:
        raise UsageError(f"{args.recipe}: distill.enabled is false (set it in the recipe or pass distill.enabled=true)")
    return _run_pipeline(args, upto="distill")


def cmd_plan(args) -> int:
    import json
    from dataclasses import replace


    if bool(args.recipe) == bool(args.model):
        raise UsageError("banklm plan needs --model DIR|CONFIG|NAME or a RECIPE.yaml (not both)")
    gpu = args.gpu_mem
    setup = Setup()
    try:
        if args.recipe:

            try:
                req = plan_request(_load(args), args.section)
            except ValueError as e:
                raise UsageError(str(e)) from None
            shape, source = plan_shape(req)
            source += f", {req['section']} section"
            setup = Setup(**req["setup"])
            gpu = gpu or req["gpu_mem"]
        else:
            shape, source = load_shape(args.model)
        flags = {"method": args.method, "seq_len": args.seq_len, "batch_size": args.batch_size,
                 "grad_accum": args.grad_accum, "lora_r": args.lora_r, "lora_dropout": args.lora_dropout,
                 "grad_ckpt": args.grad_ckpt, "attn": args.attn, "loss": args.loss, "device": args.device,
                 "bits": args.bits,
                 "precision": args.precision or ("fp32" if args.device == "cpu" else None)}
        setup = replace(setup, **{k: v for k, v in flags.items() if v is not None})
        teacher_pass = None
        if args.recipe and req.get("teacher"):
            setup, teacher_pass = plan_teacher(req["teacher"], setup)
        gpu_gib = parse_gpu_mem(gpu) if gpu else None
        if args.check and gpu_gib is None:
            raise UsageError("--check needs --gpu-mem (or plan.gpu_mem in the recipe)")
        est = estimate(shape, setup)
        cards = plan_cards(shape, setup)
        target = propose(shape, setup, gpu_gib) if gpu_gib is not None else None
    except PlanError as e:
        raise UsageError(str(e)) from None
    if target is not None and all(abs(c.gpu_gib - gpu_gib) > 1e-9 for c in cards):
        cards = sorted([*cards, target], key=lambda c: c.gpu_gib)
    if args.json:
        print(json.dumps({"source": source, "estimate": est.to_dict(), "cards": [c.to_dict() for c in cards],
                          "target": target.to_dict() if target else None,
                          "teacher_pass_gib": round(teacher_pass[0] / GIB, 4) if teacher_pass else None},
                         ensure_ascii=False, indent=1))
    else:
        print(format_plan(est, cards, source, gpu_gib))
        if teacher_pass:
            print(f"teacher pass before the student trains ({teacher_pass[1]}): {teacher_pass[0] / GIB:.2f} GiB "
                  "(the teacher alone on the card; then freed)")
    if args.check:
        if not target.fits_as_requested:
            print(f"banklm: check failed: {est.total_gib:.2f} GiB does not fit a {gpu_gib:g} GB card as set",
                  file=sys.stderr)
            return EXIT_FAILED
        if teacher_pass and teacher_pass[0] > card_budget(gpu_gib):
            print(f"banklm: check failed: the teacher pass needs {teacher_pass[0] / GIB:.2f} GiB, more than a "
                  f"{gpu_gib:g} GB card holds (lower distill.train.batch_size / distill.seq.batch_size or "
                  "quantize the teacher)", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK


def cmd_eval(args) -> int:
    if args.recipe:
        if args.model:
            raise UsageError("give either RECIPE or --model, not both")
        if args.decoding:  # the recipe's eval.decoding, recorded in the ledger like any override
            args.overrides = [*args.overrides, f"eval.decoding={args.decoding}"]
        return _run_pipeline(args, upto="eval")
    if not args.model:
        raise UsageError("banklm eval needs RECIPE.yaml or --model DIR")
    models = _eval_models_arg(args.model)  # every model checked before any is scored
    tasks = _tasks_arg(args.tasks, [f for _, path, _ in models for f in _task_folders(path)],
                       generated=args.data is None)
    records = _eval_records(args.data, tasks, args.limit, args.seed)
    if len(models) == 1:
        name, path, kind = models[0]
        out = Path(args.out) if args.out else Path("eval") / name
        results = _evaluate_one(args, name, path, kind, records, out)
        for task, res in results.get("tasks", {}).items():
            at = (f"  coverage {res['coverage']:.3f} (accuracy answered "
                  f"{'–' if res['answered_accuracy'] is None else format(res['answered_accuracy'], '.3f')})"
                  if res.get("coverage") is not None else "")
            print(f"{task}: accuracy {res['accuracy']:.3f}  macro-F1 {res['macro_f1']:.3f}  n={res['n']}{at}")
        print(f"results: {out / 'results.json'}")
        return EXIT_OK

    root = Path(args.out) if args.out else Path("eval")
    all_results = {}
    for name, path, kind in models:  # the same records for every model
        all_results[name] = _evaluate_one(args, name, path, kind, records, root / name)
        print(f"{name}: results: {root / name / 'results.json'}", flush=True)
    md, png, table = write_comparison(all_results, root, sources={n: str(p) for n, p, _ in models})
    print(table, end="")
    print(f"comparison: {md}" + (f"; chart: {png}" if png else ""))
    return EXIT_OK


_MODEL_NAME_RE = r"[^\s/\\=]+"  # a display name becomes a folder name under --out


def _eval_models_arg(specs: list[str]) -> list[tuple[str, Path, str]]:
    """``(name, path, kind)`` per ``--model [NAME=]PATH``; kind is ``folder``, ``gguf`` or ``onnx``.

    A path that exists is taken whole (it may contain ``=``); otherwise ``NAME=PATH`` names the model.
    Checked up front so a bad fourth model does not surface after three have been scored."""
    import re


    out: list[tuple[str, Path, str]] = []
    seen: dict[str, Path] = {}
    for spec in specs:
        name, path = None, Path(spec)
        if not path.exists() and "=" in spec:
            name, rest = spec.split("=", 1)
            if not re.fullmatch(_MODEL_NAME_RE, name) or name in (".", ".."):
                raise UsageError(f"--model {spec}: {name!r} is not a usable model name (no spaces, '/' or '=')")
            path = Path(rest)
        kind = export_kind(path) or "folder"
        if name is None:
            name = path.stem if kind == "gguf" else path.resolve().name
        if name in seen:
            raise UsageError(f"--model: two models are named {name!r} ({seen[name]} and {path}); "
                             "name them with --model NAME=PATH")
        seen[name] = path
        out.append((name, path, kind))
    for _, path, kind in out:
        if kind != "folder":
            continue
        if path.is_file():
            raise UsageError(f"--model {path}: a file must be a .gguf export (or give a model folder, "
                             "or an ONNX export folder holding model.onnx)")
        try:
            check_model_folder(path)  # a truncated or mismatched folder would be scored half random
        except ModelFolderError as e:
            raise UsageError(f"--model {e}") from None
    return out


def _evaluate_one(args, name: str, path: Path, kind: str, records: list[dict], out: Path) -> dict:
    """Score one model folder (PyTorch) or exported artefact (llama.cpp / onnxruntime) into ``out``."""

    decoding = args.decoding or "constrained"
    point = None
    if getattr(args, "operating_point", None):
        try:
            point = load_operating_point(args.operating_point)
        except ValueError as e:
            raise UsageError(f"--operating-point {e}") from None
    if kind == "folder":
        return evaluate_model_dir(path, records, out, device=args.device, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens, model_name=name, decoding=decoding,
                                  operating_point=point)
    try:
        return evaluate_export(path, records, out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               model_name=name, decoding=decoding, operating_point=point)
    except (ValueError, FileNotFoundError) as e:  # an artefact without tokenizer, template or EOS
        raise UsageError(f"--model {path}: {e}") from None


def _task_folders(path: Path) -> list[Path]:
    """Where a model's task specs are (``tasks/<name>.yaml``): its folder (a .gguf file's folder) and the export
    bundle holding it (``export/gguf/x.gguf``, ``export/onnx/fp32`` -> ``export/``)."""
    folder = path.parent if path.is_file() else path
    out = [folder]
    for parent in list(folder.parents)[:2]:
        if (parent / SUMS_FILE).is_file() or (parent / VERIFY_FILE).is_file():
            out.append(parent)
            break
    return out


def _tasks_arg(value: str | None, folders: list[Path] = (), generated: bool = False) -> list[str]:
    """``--tasks``, each name resolved (``banklm.tasks.resolve_tasks``): a built-in, a spec the model folder or
    export bundle carries, or ``NAME=PATH``. Default: the built-ins, plus (records given with --data) every spec
    the models carry. Generated records (no --data) need tasks with a synthetic sampler."""
    try:
        if value:
            tasks = resolve_tasks([t.strip() for t in value.split(",") if t.strip()], folders)
        else:
            carried = [] if generated else [n for f in folders for n in carried_specs(f) if n not in TASKS]
            tasks = [*TASKS.values(), *resolve_tasks(carried, folders)]
    except ValueError as e:  # SpecError too: one line naming the spec file
        raise UsageError(f"--tasks: {e}") from None
    if not tasks:
        raise UsageError("--tasks: no task given")
    if generated:
        for t in tasks:
            if not t.has_sampler:
                raise UsageError(f"--tasks {t.name}: the task has no synthetic sampler (its records come from the "
                                 "bank's tables): give its test records with --data (a JSONL file, a built corpus "
                                 "folder or a run folder)")
    return [t.name for t in tasks]


def _eval_records(data: str | None, tasks: list[str], limit: int | None, seed: int) -> list[dict]:
    """Test records: from a built corpus folder, a run folder, a JSONL file, or freshly generated."""
    if data is None:

        return [r for t in tasks for r in generate_records(t, limit or 200, seed=seed, split="test")]
    p = Path(data)
    if p.is_file():

        recs = [r for r in read_jsonl(p) if r.get("task") in tasks]
    elif (p / "data").is_dir() or (p / "corpora" / "scenario" / "data").is_dir():

        corpus = p if (p / "data").is_dir() else p / "corpora" / "scenario"
        recs = load_split(corpus, "test", tasks=tasks).to_list()
    else:
        raise UsageError(f"--data {data}: not a JSONL file, a built corpus folder or a run folder")
    if limit:

        recs = [recs[i] for i in first_per_task([r["task"] for r in recs], limit)]
    if not recs:
        raise UsageError(f"--data {data}: no test records for tasks {','.join(tasks)}")
    return recs


_DEFAULT_QUANT = {"gguf": DEFAULT_GGUF_QUANT, "onnx": DEFAULT_ONNX_QUANT}


def cmd_export(args) -> int:
    if args.recipe and args.model:
        raise UsageError("give either RECIPE or --model, not both")
    if not args.recipe and not args.model:
        raise UsageError("banklm export needs RECIPE.yaml or --model DIR")
    if args.quant and not args.format:
        raise UsageError("--quant needs --format gguf|onnx (the quants differ per format)")
    if args.recipe:
        if args.out:
            raise UsageError("--out is for --model; a recipe exports into its run folder (--run-dir)")
        if args.verify_only:
            return _verify_export_of_run(args)
        if args.format:
            other = "onnx" if args.format == "gguf" else "gguf"
            args.overrides = [*args.overrides, f"export.{args.format}.enabled=true", f"export.{other}.enabled=false"]
            if args.quant:
                args.overrides.append(f"export.{args.format}.quant=[{args.quant}]")
        return _run_pipeline(args, upto="export")
    model = Path(args.model)
    out = Path(args.out) if args.out else Path("export") / model.resolve().name
    if args.verify_only:
        return _verify_export_folder(model, out)
    if not args.format:
        raise UsageError("banklm export --model DIR needs --format gguf|onnx")
    return _export_model_folder(args, model, out)


def _export_model_folder(args, model: Path, out: Path) -> int:

    quant = ([q.strip().lower() for q in args.quant.split(",") if q.strip()] if args.quant
             else list(_DEFAULT_QUANT[args.format]))
    if not model.is_dir():
        raise UsageError(f"--model {model}: model folder not found")
    try:
        tok = load_tokenizer(model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model}: tokenizer does not load ({e})") from None
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in DEFAULT_PROMPTS]
    records = _eval_records(args.data, _tasks_arg(args.tasks, [model], generated=args.data is None),
                            args.eval_limit, 12345) if args.eval_limit else None
    card = model / "MODEL_CARD.md"
    try:
        summary = build_export(model, out, name=model.resolve().name, prompts=prompts,
                               gguf_quant=quant if args.format == "gguf" else (),
                               onnx_quant=quant if args.format == "onnx" else (), opset=args.opset, records=records,
                               device=args.device, model_card=card.read_text(encoding="utf-8") if card.is_file() else None,
                               decodings=("constrained", "free"))  # as the export stage with a recipe's default
    except (ValueError, FileNotFoundError, MissingDependency) as e:
        raise UsageError(str(e)) from None
    for c in summary[args.format]:
        te = c.get("task_eval") or {}
        print(f"{c['type']:<7} {'pass' if c['passed'] else 'FAIL'}  {c['file']}  {c.get('bytes')} bytes  "
              f"max |dlogit| {_num((c.get('logits') or {}).get('max_abs'))}"
              + (f"  accuracy {_num(te.get('accuracy'))} (PyTorch {_num(summary['task_eval']['pytorch']['accuracy'])})"
                 if "accuracy" in te else ""))
    print(f"verification: {out / 'verify.json'}; checksums: {out / 'SHA256SUMS'}")
    if not summary["passed"]:
        raise _check_failed("export verification failed: " + "; ".join(summary["failures"][:3]))
    return EXIT_OK


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _check_failed(msg: str):

    return CheckFailed(msg)


def _verify_export_folder(model: Path, out: Path) -> int:

    if not out.is_dir():
        raise UsageError(f"{out}: export folder not found (give it with --out)")
    tok = load_tokenizer(model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in DEFAULT_PROMPTS]
    return _print_export_check(verify_export(model, out, prompts))


def _verify_export_of_run(args) -> int:

    recipe = _load(args)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / recipe.name / "latest"
    if not (run_dir / "export").is_dir():
        raise UsageError(f"{run_dir / 'export'}: no export folder to verify (give the run with --run-dir)")
    return _print_export_check(export_dir_check(RunContext(recipe, run_dir.resolve())))


def _print_export_check(res: dict) -> int:
    for a in res["artefacts"]:
        print(f"{a['kind']} {a['type']:<7} {'pass' if a['passed'] else 'FAIL'}  {a['file']}")
    if res["passed"]:
        print(f"ok: SHA256SUMS intact, {len(res['artefacts'])} artefact(s) match the model")
        return EXIT_OK
    raise _check_failed(f"{len(res['failures'])} check(s) failed: " + "; ".join(res["failures"][:5]))


def cmd_verify(args) -> int:

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a folder")
    problems = verify_run(run_dir, check_external=args.external, check_unrecorded=True)
    if not problems:
        n = sum(1 for line in (run_dir / "ledger.jsonl").read_text(encoding="utf-8").splitlines() if line.strip())
        print(f"ok: {n} ledger entries, chain intact, every recorded file matches, no unrecorded file"
              + (", MODEL_CARD.md names the recorded exports" if (run_dir / "MODEL_CARD.md").is_file() else ""))
        return EXIT_OK
    print(f"TAMPERED: {problems[0]}", file=sys.stderr)
    for p in problems[1:]:
        print(f"  also: {p}", file=sys.stderr)
    return EXIT_FAILED


def cmd_compare(args) -> int:
    import json


    for d in (args.run_a, args.run_b):
        if not Path(d).is_dir():
            raise UsageError(f"{d}: not a folder")
    try:
        diff = compare_runs(args.run_a, args.run_b)
    except NotARun as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(diff, ensure_ascii=False, indent=1))
    else:
        print(format_comparison(diff), end="")
    return EXIT_OK


def cmd_task_check(args) -> int:
    """Validate a spec (exit 2 on a bad one), check a table against it (exit 1 on problems), print examples
    with their answers; whatever is printed from the table or the examples is PII-scrubbed."""

    spec = Path(args.spec)
    try:
        res = check_spec(spec if spec.exists() or spec.suffix.lower() in (".yaml", ".yml") else args.spec)
    except ValueError as e:  # SpecError (one line: file, key, value, allowed) or an unknown task name
        raise UsageError(str(e)) from None
    task = res.task
    cmap = _column_map_arg(args.column_map, task)
    if args.examples < 0:
        raise UsageError("--examples: give a number >= 0")

    def scrub(text: str) -> str:
        return scrub_text(text)[0]

    for line in res.lines():
        print(line)
    table = None
    if args.table:
        try:
            table = check_table(task, args.table, cmap, scrub=scrub, sheet=args.sheet)
        except (ValueError, OSError) as e:
            raise UsageError(f"{args.table}: {e}" if str(args.table) not in str(e) else str(e)) from None
        for line in table.lines():
            print(line)
    if args.examples:
        for line in format_examples(example_prompts(task, n=args.examples, table=args.table, column_map=cmap,
                                                    scrub=scrub, sheet=args.sheet)):
            print(line)
    if table is not None and not table.ok:
        counts = ", ".join(f"{k} {v}" for k, v in table.counts().items())
        raise _check_failed(f"{args.table}: {len(table.problems)} problem(s) in {table.rows} rows ({counts})")
    return EXIT_OK


def cmd_task_init(args) -> int:
    """Draft a task spec from a labelled table: print what each column became and three example prompts
    (personal information scrubbed), write the spec (never over an existing file without --force)."""
    table = Path(args.table)
    out = Path(args.out) if args.out else Path.cwd() / f"{table.stem}.yaml"
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise UsageError(f"--out {out}: a spec file ends in .yaml")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give the spec file's path")
    if out.exists() and not args.force:
        raise UsageError(f"{out}: exists; give --force to overwrite it, or another --out")
    if args.max_labels < 2:
        raise UsageError("--max-labels: give a number >= 2")
    protected = [p.strip() for v in args.protected or [] for p in v.split(",") if p.strip()]
    try:
        rows = read_table(table, sheet=args.sheet)
        text, summary = draft_spec(rows, label=args.label, id_col=args.id, protected=protected, reason=args.reason,
                                   max_labels=args.max_labels, source_name=table.name, name=args.name)
    except (DraftError, ValueError) as e:  # the drafter's and the reader's errors: one line
        msg = str(e)
        raise UsageError(msg if msg.startswith((str(table), table.name)) else f"{table}: {msg}") from None
    for line in _init_summary_lines(summary, getattr(rows, "where", "") or str(table)):
        print(line)

    def scrub(s: str) -> str:
        return scrub_text(s)[0]

    print("example prompts (personal information scrubbed):")
    for line in format_examples(draft_examples(text, rows, 3, source_name=table.name, scrub=scrub)):
        print(line)
    atomic_write_text(out, text)
    print(f"wrote {out} (task {summary['task']!r}): review it, then: banklm task check {out} {table}")
    return EXIT_OK


def _init_summary_lines(s: dict, where: str) -> list[str]:
    """What ``banklm task init`` prints about a draft: rows, labels, each column and why it became what it is."""
    lines = [f"{where}: {s['rows']} rows: {s['labelled']} labelled, {s['unlabelled']} unlabelled "
             f"(empty {s['label']!r}: kept as unlabelled data)",
             f"labels ({s['label']}): " + ", ".join(f"{v} {n}" for v, n in s["label_counts"].items()),
             "columns:"]
    def cols(text: str) -> int:  # terminal columns: CJK characters take two
        return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)

    width = max((cols(c["column"]) for c in s["columns"]), default=4)
    for c in s["columns"]:
        name = c["column"] + " " * (width - cols(c["column"]))
        if c["field"] is None:
            lines.append(f"  {name}  {'-':<8}  {'-':<6}  {c['why']}")
            continue
        why = "; ".join(x for x in (c["why"], f"PII {c['pii']}" if c["pii"] and c["pii"] not in c["why"] else "") if x)
        lines.append(f"  {name}  {c['type']:<8}  {'shown' if c['shown'] else 'hidden':<6}  {why}".rstrip())
    if s["favourable"]:
        lines.append(f"favourable label (guessed, for fairness): {s['favourable']}")
    if s["segments"]:
        lines.append("evaluation segments: " + ", ".join(s["segments"]))
    lines += [f"warning: {w}" for w in s["warnings"]]
    return lines


def _column_map_arg(values: list[str] | None, task) -> dict[str, str]:
    """``--column-map NAME=COLUMN[,NAME=COLUMN]`` (repeatable), or a JSON/YAML file of ``{name: column}``."""
    import yaml

    out: dict[str, str] = {}
    for v in values or []:
        if Path(v).suffix.lower() in (".json", ".yaml", ".yml") and Path(v).is_file():
            try:
                data = yaml.safe_load(Path(v).read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise UsageError(f"--column-map {v}: not a JSON/YAML mapping ({e})") from None
            if not isinstance(data, dict) or not all(isinstance(x, str) for kv in data.items() for x in kv):
                raise UsageError(f"--column-map {v}: give a mapping of task names to column names")
            out.update(data)
            continue
        for part in v.split(","):
            name, sep, col = (x.strip() for x in part.partition("="))
            if not part.strip():
                continue
            if not sep or not name or not col:
                raise UsageError(f"--column-map {part.strip()!r}: write NAME=COLUMN (a field or answer key of the "
                                 "task = the table's column), e.g. 逾期天数=逾期日数")
            out[name] = col
    known = [*task.field_names, *task.answer_keys, "prompt"]
    for name in out:
        if name not in known:
            raise UsageError(f"--column-map: {name!r} is not a field or answer key of the task {task.name!r} "
                             f"(allowed: {', '.join(known)})")
    return out


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

    run = recipe_cmd("run", "run every stage the recipe enables, in order, reusing unchanged stages", cmd_run)
    run.add_argument("--seeds", metavar="S1,S2,...",
                     help="train and score once per seed, each in runs/<name>/<id>-s<seed> on the same data "
                          "(data_seed fixed), then write runs/<name>/seeds-<id>.md/.json: mean ± sd per task")

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

    recipe_cmd("distill", "teacher -> smaller student (logit or sequence-level distillation, plus a baseline "
               "student trained without the teacher); runs the stages up to distill", cmd_distill)

    ev = sub.add_parser("eval", help="evaluate a model on its tasks (credit, aml, audit or a bank's own spec)",
                        description="evaluate a model on its tasks (the built-in credit / aml / audit, or a bank's own "
                                    "task spec): from a recipe (runs the stages up to eval), a model folder or a GGUF / "
                                    "ONNX export; several --model are scored on the same records and compared side by "
                                    "side")
    ev.add_argument("recipe", nargs="?", metavar="RECIPE.yaml")
    ev.add_argument("overrides", nargs="*", metavar="key.sub=value")
    ev.add_argument("--model", action="append", metavar="[NAME=]PATH",
                    help="a model folder (safetensors), a .gguf file or an ONNX export folder, instead of a "
                         "recipe; repeat it to compare models on the same records (each into OUT/NAME/, plus "
                         "OUT/comparison.md and OUT/comparison.png); NAME defaults to the folder or file name")
    ev.add_argument("--tasks", help="comma-separated: built-in names (credit,aml,audit), specs the model folder or "
                                    "export bundle carries (tasks/<name>.yaml), or NAME=PATH for a spec file "
                                    "(default: the built-ins, and with --data also the carried specs)")
    ev.add_argument("--data", help="test records: a JSONL file, a built corpus folder or a run folder "
                                   "(default: freshly generated test records)")
    ev.add_argument("--limit", type=int, help="at most N records per task")
    ev.add_argument("--out", help="output folder (default eval/<model name>; with several --model: eval, "
                                  "one sub-folder per model)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                    help="device of model folders (GGUF and ONNX exports run on CPU)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--decoding", choices=["free", "constrained"],
                    help="constrained (default): label scoring picks the labels, the reason is greedy under each "
                         "request's answer grammar (layout, labels, a bounded reason citing only the prompt's "
                         "numbers); free: plain greedy; with a recipe: its eval.decoding (default constrained), "
                         "recorded in results.json and the ledger")
    ev.add_argument("--operating-point", type=Path,
                    help="an operating_point.json (per task: abstention threshold and temperature) to score at; "
                         "default: the model folder's own, or the export bundle's (docs/evaluation.md)")
    ev.add_argument("--seed", type=int, default=12345, help="seed for generated test records")
    ev.add_argument("--run-dir", type=Path, default=None)
    ev.set_defaults(func=cmd_eval)

    _add_export_parser(sub)

    _add_plan_parser(sub)

    _add_task_parser(sub)

    v = sub.add_parser("verify", help="re-hash a run folder's files and check its ledger chain (exit 1 on tamper)",
                       description="re-hash a run folder's files and check its ledger chain (exit 1 on tamper)")
    v.add_argument("run_dir", metavar="RUN_DIR")
    v.add_argument("--external", action="store_true", help="also re-hash inputs outside the run folder")
    v.set_defaults(func=cmd_verify)

    cmp_help = "what changed between two runs: recipe keys, records per corpus, scores"
    c = sub.add_parser("compare", help=cmp_help, description=cmp_help + " (B - A)")
    c.add_argument("run_a", metavar="RUN_A")
    c.add_argument("run_b", metavar="RUN_B")
    c.add_argument("--json", action="store_true", help="print the differences as JSON")
    c.set_defaults(func=cmd_compare)
    return p


def _add_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="export GGUF (llama.cpp / Ollama) or ONNX, verified against PyTorch",
                        description="export GGUF (llama.cpp / Ollama) or ONNX, verified against PyTorch")
    ex.add_argument("recipe", nargs="?", metavar="RECIPE.yaml")
    ex.add_argument("overrides", nargs="*", metavar="key.sub=value")
    ex.add_argument("--model", help="a model folder instead of a recipe")
    ex.add_argument("--format", choices=["gguf", "onnx"],
                    help="the format to export (required with --model; with a recipe: only this format)")
    ex.add_argument("--quant", help=f"comma-separated quants. GGUF: {','.join(NATIVE_QUANTS)} and, with "
                                    f"banklm[llamacpp], {','.join(KQUANTS)} (default {','.join(DEFAULT_GGUF_QUANT)}); "
                                    f"ONNX: {','.join(ONNX_QUANTS)} (default {','.join(DEFAULT_ONNX_QUANT)})")
    ex.add_argument("--out", help="export folder for --model (default export/<model folder name>)")
    ex.add_argument("--verify-only", action="store_true",
                    help="re-check an existing export folder (SHA256SUMS, then every artefact against the model); "
                         "exit 1 naming the failed check")
    ex.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                    help=f"ONNX opset for --model ({MIN_OPSET}-{MAX_OPSET}, default {DEFAULT_OPSET})")
    ex.add_argument("--eval-limit", type=int, default=0,
                    help="with --model: score each artefact and the PyTorch model on N records per task (default 0: off)")
    ex.add_argument("--tasks", help="with --eval-limit: comma-separated tasks, resolved like banklm eval's "
                                    "(built-ins, specs the model folder carries, NAME=PATH; default the built-ins)")
    ex.add_argument("--data", help="with --eval-limit: test records (JSONL, corpus or run folder; default generated)")
    ex.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                    help="device of the PyTorch side of the task evaluation")
    ex.add_argument("--run-dir", type=Path, default=None)
    ex.set_defaults(func=cmd_export)


def _add_task_parser(sub) -> None:
    task_help = "task specs: draft one from a labelled table, validate a spec (YAML) and a bank's table against it"
    tk = sub.add_parser("task", help=task_help, description=task_help + " (format: docs/tasks.md)")
    tsub = tk.add_subparsers(dest="task_command", metavar="ACTION")
    check_help = ("validate a task spec (exit 2 with one error line when it is invalid), check a table against it "
                  "(missing columns, empty required cells, values outside a category, numbers / yes-no / dates that "
                  "do not parse, labels outside the label set, over-long reasons: counts and row numbers; exit 1 "
                  "when it has problems, 0 when clean) and print example prompts with their answers, personal "
                  "information scrubbed")
    tc = tsub.add_parser("check", help="validate a spec (and a table against it); print example prompts",
                         description=check_help)
    tc.add_argument("spec", metavar="SPEC.yaml", help="a task spec file (or a built-in task name: credit, aml, audit)")
    tc.add_argument("table", nargs="?", metavar="TABLE", help="a CSV/TSV, JSONL, Parquet or Excel .xlsx table to "
                                                              "check against the spec (columns named like the "
                                                              "fields, their labels, or mapped)")
    tc.add_argument("--sheet", metavar="NAME", help="the worksheet of an .xlsx workbook (default: the first)")
    tc.add_argument("--column-map", action="append", metavar="NAME=COLUMN[,...]",
                    help="the table's column of a field or answer key (repeatable; or a JSON/YAML file of the "
                         "mapping), e.g. 逾期天数=逾期日数,预警等级=等级")
    tc.add_argument("--examples", type=int, default=3, metavar="N",
                    help="example prompts to print (default 3; from the table's first clean rows, else the sampler "
                         "or the spec's examples)")
    tc.set_defaults(func=cmd_task_check)
    init_help = ("draft a task spec (YAML) from a labelled table (CSV/TSV, JSONL, Parquet, Excel .xlsx): a field per "
                 "column typed from its values, the label column's values as the labels; identifiers, personal "
                 "information (PII detectors on a sample) and protected attributes hidden; numeric protected "
                 "attributes banded. Prints what each column became and three example prompts (PII scrubbed)")
    ti = tsub.add_parser("init", help="draft a task spec from a labelled table", description=init_help)
    ti.add_argument("table", metavar="TABLE", help="the bank's labelled table (.csv .tsv .jsonl .parquet .xlsx)")
    ti.add_argument("--label", required=True, metavar="COL", help="the column holding the labels (empty: unlabelled)")
    ti.add_argument("--id", metavar="COL", help="the identifier column (default: a text column unique per row)")
    ti.add_argument("--reason", metavar="COL", help="the column of the bank's reasons for its labels: an answer key, "
                                                   "never an input (default: a column named 理由, 原因, 依据, "
                                                   "<label>理由...; 'none': no reason column)")
    ti.add_argument("--protected", action="append", metavar="COL[,COL...]",
                    help="fairness attributes (hidden; numeric ones get draft bands), e.g. 年龄,性别")
    ti.add_argument("--max-labels", type=int, default=20, metavar="N",
                    help="refuse a label column with more distinct values (default 20)")
    ti.add_argument("--sheet", metavar="NAME", help="the worksheet of an .xlsx workbook (default: the first)")
    ti.add_argument("--name", help="the task's name (default: from the table's file name)")
    ti.add_argument("--out", metavar="SPEC.yaml", help="where to write the spec (default: <table stem>.yaml here)")
    ti.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    ti.set_defaults(func=cmd_task_init)
    tk.set_defaults(func=lambda a: (tk.print_help(), EXIT_USAGE)[1])


def _add_plan_parser(sub) -> None:
    plan_help = ("estimate the peak GPU memory of a fine-tuning run by component and propose settings that fit "
                 "8 / 12 / 16 / 24 GB cards (formulas and their validation: docs/memory.md)")
    pl = sub.add_parser("plan", help=plan_help, description=plan_help)
    pl.add_argument("recipe", nargs="?", metavar="RECIPE.yaml", help="plan a recipe's train (or cpt) section")
    pl.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    pl.add_argument("--model", help="model folder, config.json, or a bundled name (qwen2.5-0.5b/1.5b/3b/7b, "
                                    "llama-3.2-1b/3b, llama-3.1-8b, mistral-7b-v0.3)")
    pl.add_argument("--section", choices=["train", "cpt", "distill"],
                    help="recipe section to plan (default train; distill: the student's training and the teacher)")
    pl.add_argument("--method", choices=["lora", "qlora", "full", "cpt"], help="default qlora (or the recipe's)")
    pl.add_argument("--seq-len", type=int, help="tokens per packed row (default 2048, or the recipe's max_length)")
    pl.add_argument("--batch-size", type=int, help="micro-batch (default 1, or the recipe's)")
    pl.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1, or the recipe's)")
    pl.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    pl.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.0, as the recipe)")
    pl.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                    help="activation (gradient) checkpointing")
    pl.add_argument("--bits", type=int, choices=[4, 8], help="qlora base: 4 (NF4, default) or 8 (LLM.int8)")
    pl.add_argument("--gpu-mem", help="the card to plan for, e.g. 12GB (default: the recipe's plan.gpu_mem)")
    pl.add_argument("--attn", choices=["sdpa", "flash", "eager"],
                    help="attention: sdpa (default), flash (flash-attn 2 installed), eager")
    pl.add_argument("--loss", choices=["fused", "full"],
                    help="fused: TRL's chunked LM head (banklm's trainer, default); full: full logits + fp32 upcast")
    pl.add_argument("--device", choices=["cuda", "cpu"], help="cuda (default) or cpu (fp32, no CUDA overhead)")
    pl.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="default bf16 on cuda, fp32 on cpu")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--check", action="store_true", help="exit 1 when the settings do not fit the --gpu-mem card")
    pl.set_defaults(func=cmd_plan)


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

    try:
        return int(args.func(args))
    except (UsageError, RecipeError, RunLocked, RunDirError, LaunchError) as e:
        print(f"banklm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CheckFailed as e:
        print(f"banklm: check failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_OK
    except (StageError, ChainError, FollowerStopped) as e:
        print(f"banklm: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # outside a stage (e.g. a read-only --out folder): name the path, no traceback
        print(f"banklm: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("banklm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
