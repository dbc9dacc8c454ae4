"""What several stages share: where a stage finds its model, the device, the training options."""

from __future__ import annotations

import typing
from pathlib import Path

from banklm.corpora.splits import load_split
from banklm.finetune.config import TaskEval
from banklm.finetune.models import ModelFolderError, check_model_folder, pick_device
from banklm.pipeline import RunContext, launched_rank
from banklm.recipe import CorpusKind, Recipe, RecipeError, section_params
from banklm.tasks import carry_specs

SCENARIO = Path("corpora") / "scenario"
CORPUS_KINDS = typing.get_args(CorpusKind)


def base_model_dir(ctx: RunContext) -> Path:
    b = ctx.recipe.base
    return Path(b.path).expanduser() if b.path and not converts_pickle(b) else ctx.path("base")


def converts_pickle(b) -> bool:
    """A ``base.path`` with pickled weights only that the recipe allows (``base.allow_pickle``): the base stage
    loads the pickle once and every later stage uses its safetensors copy in ``base/``."""
    return bool(b.path) and b.allow_pickle and not any(Path(b.path).expanduser().glob("*.safetensors"))


PICKLE_RISK = ("loading a pickle can run arbitrary code (torch.load's weights_only mode narrows but does not remove "
               "the risk): allowed only because the recipe sets allow_pickle; use checkpoints from sources you trust")


def check_models(r: Recipe) -> None:
    """The model folders a recipe names, checked before any stage runs (no weights loaded): a bad base is a
    clear error naming the key and the problem, not a failure after the corpus was built. Raises RecipeError."""
    import logging


    d = r.distill
    folders = [("base.path", r.base.path, r.base.allow_pickle)]
    if d.enabled:
        folders += [("distill.teacher.path", d.teacher.path, False)]
        if d.student.from_ == "path":
            folders += [("distill.student.path", d.student.path, d.student.allow_pickle)]
    for key, path, allow_pickle in folders:
        if not path:
            continue
        try:
            info = check_model_folder(Path(path).expanduser(), allow_pickle=allow_pickle,
                                      trust_remote_code=r.base.trust_remote_code)
        except ModelFolderError as e:
            raise RecipeError(f"{key}: {e}" + ("; or set base.allow_pickle: true if you trust its source"
                                               if "pickle" in str(e) and key == "base.path" else "")) from None
        if info["pickled"]:
            logging.getLogger("banklm").warning("%s %s has pickled weights only: %s", key, path, PICKLE_RISK)


def model_dir_after(ctx: RunContext, stage: str) -> Path:
    """The model folder a stage starts from: the newest model produced before ``stage``."""
    r = ctx.recipe
    order = [("cpt", r.cpt.enabled, ctx.path("cpt", "merged")), ("train", r.train.enabled, ctx.path("sft", "merged")),
             ("distill", r.distill.enabled, ctx.path("distill", "student"))]
    current = base_model_dir(ctx)
    for name, enabled, path in order:
        if name == stage:
            break
        if enabled:
            current = path
    return current


def final_model_dir(ctx: RunContext) -> Path:
    return model_dir_after(ctx, "eval")


def run_device(ctx: RunContext) -> str:

    dev = pick_device(ctx.recipe.device)
    ctx.notes["device"] = dev
    return dev


def train_options(ctx: RunContext, p) -> dict:
    """What ``train_causal_lm`` takes besides the section's config (``p.to_config()``): the recipe's seed and
    device, ``resume`` (only from a checkpoint whose fingerprint matches) and the task-eval records."""
    return dict(seed=ctx.recipe.seed, device=run_device(ctx), resume=True, task_eval=task_eval(ctx, p))


def task_eval(ctx: RunContext, p) -> TaskEval | None:
    """Validation records for the periodic task-accuracy check (``task_eval_steps``), if asked for; the trainer
    keeps the first ``task_eval_samples`` of each task."""
    if p.task_eval_steps is None:
        return None
    records = load_split(ctx.path(SCENARIO), "validation", tasks=ctx.recipe.eval.tasks).to_list()
    return TaskEval(records, max_new_tokens=ctx.recipe.eval.max_new_tokens)


def corpus_dirs(ctx: RunContext, kinds: list[str]) -> list[Path]:
    return [ctx.path("corpora", k) for k in kinds if ctx.path("corpora", k).exists()]


# ----------------------------------------------------------------------------------------- task specs

def task_params(r: Recipe) -> dict:
    """The recipe's own task specs (path and sha256) for the key of a stage that uses them (nothing when the
    recipe names none: the built-in specs are part of banklm's source)."""
    return section_params(r, "tasks") if r.tasks else {}


def task_inputs(ctx: RunContext) -> list[Path]:
    """The recipe's own spec files, as inputs of the stages that use them (a changed spec re-runs them)."""
    return ctx.recipe.spec_files()


def carry_tasks(ctx: RunContext, *folders: Path) -> None:
    """Write the specs of the run's tasks (``Recipe.task_names``) into each model folder that exists, as
    ``tasks/<name>.yaml``, so it can be evaluated and served without its recipe. Rank 0 writes."""
    names = ctx.recipe.task_names()
    if not names or launched_rank() != 0:
        return
    for folder in folders:
        if folder.is_dir():
            carry_specs(folder, names)
