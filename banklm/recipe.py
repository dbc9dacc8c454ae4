"""Recipes: one YAML file per job, validated by a schema, overridable from the command line.

Precedence, lowest first: schema defaults < the YAML file < ``key.sub=value`` overrides.
Every validation error names the file, the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from banklm.corpora.build import DEFAULT_STEPS, MIN_TEST_PER_LABEL, STEPS, private_steps_problem
from banklm.corpora.mix import DEFAULT_SPLITS
from banklm.corpora.ops.base import step_params
from banklm.corpora.ops.pii import ALL_TYPES as PII_TYPES
from banklm.corpora.ops.pii import DEFAULT_KEY_ENV as PII_KEY_ENV
from banklm.corpora.ops.pii import MODES as PII_MODES
from banklm.corpora.sources import FORMATS
from banklm.export.gguf import DEFAULT_GGUF_QUANT, GGUF_QUANTS
from banklm.export.onnx import DEFAULT_ONNX_QUANT, DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ONNX_QUANTS
from banklm.finetune.config import Method, TrainConfig
from banklm.schema import model_at, short_repr
from banklm.tasks import TASKS, SpecError, Task, all_tasks, register_spec, task_from_spec

CorpusKind = Literal["general", "vertical", "private", "scenario"]
GgufQuant = Literal[GGUF_QUANTS]  # quant names and defaults are owned by export, steps by corpora
OnnxQuant = Literal[ONNX_QUANTS]

MAX_OVERRIDE_CHARS = 10_000


class RecipeError(ValueError):
    """A recipe (file or override) is invalid; the message is one line a user can act on."""


# ---- tasks: the built-ins plus the recipe's own specs (``tasks: {name: path}``), known while validating

def _known_tasks(info: ValidationInfo) -> dict[str, Task]:
    """The tasks a recipe may name: the built-ins and its own specs (the validation context), or, outside a
    recipe's validation (an assignment, a direct ``model_validate``), the built-in and registered tasks."""
    known = (info.context or {}).get("tasks") if isinstance(info.context, dict) else None
    return known if known is not None else all_tasks()


def _task_name(v: str, info: ValidationInfo) -> str:
    known = _known_tasks(info)
    if v not in known:
        raise ValueError(f"unknown task {v!r} (allowed: {', '.join(known)}; a bank's own task is a spec "
                         "named in the recipe's tasks: {name: path})")
    return v


def _synth_task_name(v: str, info: ValidationInfo) -> str:
    _task_name(v, info)
    if not _known_tasks(info)[v].has_sampler:
        raise ValueError(f"the task {v!r} has no synthetic sampler (a spec task cannot be generated): its data "
                         "comes from the bank's tables (corpora.scenario.tables)")
    return v


TaskName = Annotated[str, AfterValidator(_task_name)]
SynthTaskName = Annotated[str, AfterValidator(_synth_task_name)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SynthSpec(Section):
    """How many generated examples of one task go into each split."""

    train: int = Field(2000, ge=0, le=5_000_000)
    validation: int = Field(100, ge=0, le=1_000_000)
    test: int = Field(200, ge=0, le=1_000_000)
    # a second test split at the spec's real-world label shares (evaluation.prevalence): operating points
    test_prevalence: int = Field(0, ge=0, le=1_000_000)
    difficulty: float = Field(0.0, ge=0.0, le=1.0)


class TaskRef(Section):
    """A bank's task spec named by the recipe (``tasks: {post_loan: specs/post_loan.yaml}``): resolved when the
    recipe is loaded to the file's absolute path and the spec's sha256 (what recipe.yaml and the ledger record;
    a resolved recipe re-loaded after the spec changed is an error)."""

    path: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data


class ScenarioTable(Section):
    """A bank's own labelled table (CSV/TSV, JSONL, Parquet, Excel) turned into scenario records by
    ``banklm.tasks.tables`` (docs/tasks.md, "A bank's own labelled table"). ``split: auto`` cuts it label by label
    with at least ``min_test_per_label`` rows of each label in test (a separate ``split: test`` table of the task
    is recommended: then the auto tables give train and validation only); ``sheet``: the worksheet of a workbook;
    ``pii``: its free-text values pass the PII step (``corpora.scenario.pii``) before rendering."""

    path: str
    task: TaskName
    column_map: dict[str, str] = Field(default_factory=dict)
    split: Literal["auto", "train", "validation", "test"] = "auto"
    limit: int | None = Field(None, ge=1)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
    licence: str = ""
    sheet: str | None = Field(None, min_length=1)
    pii: bool = True
    min_test_per_label: int = Field(MIN_TEST_PER_LABEL, ge=1, le=100_000)


# ---- corpora: sources, steps, options (the builders live in corpora/build.py; docs/corpora.md)

SourceFormat = Literal[FORMATS]
StepName = Literal[tuple(STEPS)]
PiiType = Literal[PII_TYPES]


class SourceSpec(Section):
    """One input of a corpus. ``path``: a file, folder or glob; relative to ``corpora.root`` (default: the
    current folder), or ``samples:<path>`` for the bundled ``corpora/samples``; ``..`` may not leave them."""

    path: str = Field(min_length=1)
    format: SourceFormat = "auto"
    weight: float = Field(1.0, gt=0, le=1000)
    field_map: dict[str, str] = Field(default_factory=dict)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    licence: str = ""
    unit: Literal["file", "block"] = "file"
    split: str | None = None
    records_key: str | None = None
    keep: list[str] = Field(default_factory=lambda: ["label"])

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"path": data}
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown source key '{unknown[0]}' (allowed: {', '.join(cls.model_fields)})")
        return data


_STEP_PARAMS_ELSEWHERE = {"pii": "corpora.<kind>.pii", "decontam": "corpora.<kind>.decontaminate"}


def _step_field(step: str, name: str) -> Any:
    """The schema field of one step parameter, from its declaration on the step (``banklm.corpora.ops.base.param``)."""
    p = step_params(STEPS[step])[name]
    return Field(p.default, **p.bounds)


def _step_params_model(step: str) -> type[Section]:
    """The keys a recipe may give a step in ``steps:``: the parameters the step class declares."""
    declared = {} if step in _STEP_PARAMS_ELSEWHERE else step_params(STEPS[step])
    fields = {n: (p.type, _step_field(step, n)) for n, p in declared.items()}
    return create_model(f"{STEPS[step].__name__}Params", __base__=Section, __module__=__name__, **fields)


STEP_PARAMS: dict[str, type[Section]] = {name: _step_params_model(name) for name in STEPS}


class StepSpec(Section):
    """One cleaning step: ``normalize`` or ``{near_dedup: {threshold: 0.85}}`` (or ``{step:, params:}``)."""

    step: StepName
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"step": data}
        elif isinstance(data, dict) and "step" not in data and len(data) == 1:
            (name, params), = data.items()
            data = {"step": name, "params": params if params is not None else {}}
        if isinstance(data, dict) and data.get("params") is None:
            data = {**data, "params": {}}
        if isinstance(data, dict) and isinstance(data.get("params"), dict) and data.get("step") in STEP_PARAMS:
            name = data["step"]
            if data["params"] and name in _STEP_PARAMS_ELSEWHERE:
                raise ValueError(f"step {name} takes no parameters here: set them under {_STEP_PARAMS_ELSEWHERE[name]}")
            try:
                data = {**data, "params": STEP_PARAMS[name].model_validate(data["params"]).model_dump()}
            except ValidationError as e:
                err = e.errors()[0]
                key = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    allowed = ", ".join(STEP_PARAMS[name].model_fields) or "none"
                    raise ValueError(f"step {name}: unknown parameter '{key}' (allowed: {allowed})") from None
                raise ValueError(f"step {name}: {key} = {err.get('input')!r}: {err['msg']}") from None
        return data


def _steps(*items: str | dict):
    return lambda: [StepSpec.model_validate(i) for i in items]


class PiiOptions(Section):
    """PII de-identification for the ``pii`` step (rules in docs/pii.md)."""

    mode: Literal[PII_MODES] = "placeholder"
    key_env: str = Field(PII_KEY_ENV, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    types: list[PiiType] | None = None


class SplitSpec(Section):
    """Seeded train/validation/test fractions (normalised), stratified by ``stratify`` when that column exists."""

    train: float = Field(DEFAULT_SPLITS["train"], ge=0.0, le=1.0)
    validation: float = Field(DEFAULT_SPLITS["validation"], ge=0.0, le=1.0)
    test: float = Field(DEFAULT_SPLITS["test"], ge=0.0, le=1.0)
    seed: int | None = None
    stratify: str | None = "label"

    @model_validator(mode="after")
    def _positive(self) -> SplitSpec:
        if self.train + self.validation + self.test <= 0:
            raise ValueError("split fractions are all zero")
        return self


class DecontamSpec(Section):
    """Drop records sharing an ``n``-character n-gram with the run's scenario test prompts (user turns)."""

    enabled: bool = True
    n: int = _step_field("decontam", "n")


class TextCorpus(Section):
    sources: list[SourceSpec] = Field(min_length=1)
    steps: list[StepSpec]
    pii: PiiOptions = Field(default_factory=PiiOptions)
    splits: SplitSpec = Field(default_factory=SplitSpec)
    decontaminate: DecontamSpec = Field(default_factory=DecontamSpec)
    licence: str = ""
    on_error: Literal["quarantine", "raise"] = "quarantine"

    @model_validator(mode="after")
    def _no_repeats(self) -> TextCorpus:
        names = [s.step for s in self.steps]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"step '{dup}' is listed twice in steps")
        return self


class GeneralCorpus(TextCorpus):
    """Broad instruction/chat data that keeps general ability."""

    steps: list[StepSpec] = Field(default_factory=_steps(*DEFAULT_STEPS["general"]))


class VerticalCorpus(TextCorpus):
    """Finance text: regulations, manuals, reports."""

    steps: list[StepSpec] = Field(default_factory=_steps(*DEFAULT_STEPS["vertical"]))


class PrivateCorpus(TextCorpus):
    """The bank's own documents: must be de-identified before anything else sees them."""

    steps: list[StepSpec] = Field(default_factory=_steps(*DEFAULT_STEPS["private"]))

    @model_validator(mode="after")
    def _pii_first(self) -> PrivateCorpus:
        problem = private_steps_problem([s.step for s in self.steps])
        if problem:
            raise ValueError(f"steps: {problem}")
        return self


class ScenarioCorpus(Section):
    synth: dict[SynthTaskName, SynthSpec] = Field(default_factory=dict)
    tables: list[ScenarioTable] = Field(default_factory=list)
    steps: list[StepSpec] = Field(default_factory=_steps(*DEFAULT_STEPS["scenario"]))  # table records only
    pii: PiiOptions = Field(default_factory=PiiOptions)
    splits: SplitSpec = Field(default_factory=SplitSpec)  # for tables with split: auto
    licence: str = "generated by banklm (synthetic, no real customer data)"

    @model_validator(mode="after")
    def _prevalence_declared(self, info: ValidationInfo) -> ScenarioCorpus:
        known = _known_tasks(info)
        for name, spec in self.synth.items():
            if spec.test_prevalence and name in known and not known[name].prevalence:
                raise ValueError(f"synth.{name}.test_prevalence: the task {name!r} declares no real-world label "
                                 "shares (its spec's evaluation.prevalence, e.g. {无: 0.9}); set test_prevalence: 0")
        return self


class MixSpec(Section):
    """Target proportions per corpus kind (normalised) for ``corpora/mix/``; ``total`` training records."""

    general: float | None = Field(None, ge=0.0)
    vertical: float | None = Field(None, ge=0.0)
    private: float | None = Field(None, ge=0.0)
    scenario: float | None = Field(None, ge=0.0)
    total: int | None = Field(None, ge=1, le=100_000_000)
    seed: int | None = None

    def proportions(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("general", "vertical", "private", "scenario")
                if getattr(self, k) is not None and getattr(self, k) > 0}

    @model_validator(mode="after")
    def _some(self) -> MixSpec:
        if not self.proportions():
            raise ValueError("mix: give a proportion > 0 for at least one of general, vertical, private, scenario")
        return self


class CorporaSection(Section):
    root: str | None = None  # folder relative source paths are resolved against (default: the current one)
    num_proc: int = Field(1, ge=1, le=256)
    general: GeneralCorpus | None = None
    vertical: VerticalCorpus | None = None
    private: PrivateCorpus | None = None
    scenario: ScenarioCorpus | None = None
    mix: MixSpec | None = None

    @model_validator(mode="after")
    def _mix_kinds(self) -> CorporaSection:
        if self.mix is not None:
            for kind in self.mix.proportions():
                if getattr(self, kind) is None:
                    raise ValueError(f"mix: {kind} has a proportion but corpora.{kind} is not configured")
        return self

    def kinds(self) -> list[str]:
        """The configured corpus kinds, in build order (scenario first: its test prompts decontaminate)."""
        out = []
        sc = self.scenario
        if sc is not None and (sc.synth or sc.tables):
            out.append("scenario")
        return out + [k for k in ("general", "vertical", "private") if getattr(self, k) is not None]


class TokenizerSection(Section):
    train: bool = False
    vocab_size: int = Field(2000, ge=300, le=200_000)


class TinyModel(Section):
    """A small model built from a config: same classes as a real Llama / Qwen2."""

    arch: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = Field(256, ge=16, le=16384)
    num_layers: int = Field(4, ge=1, le=256)
    num_heads: int = Field(4, ge=1, le=256)
    num_kv_heads: int = Field(4, ge=1, le=256)
    intermediate_size: int = Field(768, ge=16, le=65536)
    max_position_embeddings: int = Field(1024, ge=64, le=1_048_576)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _small(self) -> TinyModel:
        # a model built from scratch here is trained here: beyond ~2B parameters it cannot even be allocated
        # on the machines banklm targets (a huge override must be an error, not an out-of-memory kill)
        h, f = self.hidden_size, self.intermediate_size
        n = self.num_layers * (4 * h * h + 3 * h * f)
        if n > 2_000_000_000:
            raise ValueError(f"these sizes give about {n / 1e9:.0f}B parameters per layer stack; a model built from "
                             "a config is for small models (at most 2B): use base.path for a large one")
        return self


class BaseSection(Section):
    """The model to start from: a local folder (``path``) or a tiny one built from a config (``build``)."""

    path: str | None = None
    build: TinyModel | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    licence: str = ""

    @model_validator(mode="after")
    def _one_source(self) -> BaseSection:
        if (self.path is None) == (self.build is None):
            raise ValueError("set exactly one of base.path (a local model folder) or base.build (a tiny config)")
        return self


def _section_of(config: type, name: str) -> type[Section]:
    """The recipe section of a stage's frozen settings dataclass: its fields by the same names, with their types,
    defaults and bounds (``metadata["bounds"]``, as pydantic constraints); a nested settings dataclass becomes a
    nested section. The setting is declared once, in the stage (banklm.finetune.config), and the recipe follows."""
    hints = typing.get_type_hints(config)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            nested = _section_of(kind, kind.__name__)
            fields[f.name] = (nested, Field(default_factory=nested))
        else:
            fields[f.name] = (kind, Field(f.default, **f.metadata.get("bounds", {})))
    return create_model(name, __base__=Section, __module__=__name__, __doc__=config.__doc__, **fields)


class TrainHyper(_section_of(TrainConfig, "TrainSettings")):
    """Optimisation settings shared by ``cpt``, ``train`` and ``distill.train``: the fields of
    ``banklm.finetune.config.TrainConfig`` (names, types, defaults, bounds and the comments that explain them)."""

    @model_validator(mode="after")
    def _valid_config(self) -> TrainHyper:
        self.to_config()  # the config's own checks, e.g. early_stopping_patience needs eval_steps
        return self

    def to_config(self) -> TrainConfig:
        """These settings as the object ``banklm.finetune.sft.train_causal_lm`` takes."""
        return TrainConfig(**self.model_dump(include={f.name for f in dataclasses.fields(TrainConfig)}))


class TrainParams(TrainHyper):
    enabled: bool = True


class SftMix(Section):
    """Instruction data mixed into SFT, as shares of the SFT training examples: ``general: 0.1`` = one training
    example in ten is an instruction record of corpora/general (replay against forgetting), ``private`` the
    same for the bank's own instruction records (corpora/private); the scenario train split, used whole, is
    the rest. Records are drawn from each corpus's train split (seeded; a small corpus is repeated, copies
    with ``#2``... ids), validation likewise from its validation split. Only records with ``messages`` can be
    mixed in: a corpus of raw text belongs in ``cpt.corpora``."""

    general: float = Field(0.0, ge=0.0, le=0.9)
    private: float = Field(0.0, ge=0.0, le=0.9)

    @model_validator(mode="after")
    def _room_for_tasks(self) -> SftMix:
        if self.general + self.private > 0.9:
            raise ValueError(f"general + private = {self.general + self.private:g}: the scenario tasks must keep at "
                             "least 0.1 of the SFT examples")
        return self

    def shares(self) -> dict[str, float]:
        """The corpora mixed in (share > 0), by kind."""
        return {k: getattr(self, k) for k in ("general", "private") if getattr(self, k) > 0}


class TrainSection(TrainParams):
    """Supervised fine-tuning: the scenario train split, plus the instruction data of ``mix``."""

    mix: SftMix = Field(default_factory=SftMix)


class CptSection(TrainParams):
    """Continued pre-training on raw text (instruction records are rendered with the chat template); ``mix`` in
    ``corpora`` reads corpora/mix (built by ``corpora.mix``)."""

    enabled: bool = False
    method: Method = "full"
    corpora: list[Literal["general", "vertical", "private", "scenario", "mix"]] = Field(
        default_factory=lambda: ["scenario"])


class CalibrationSpec(Section):
    """How the final model's confidences are checked (banklm.evaluation.confidence): label scoring of the first
    ``validation_limit`` validation records per task, where the temperature (``temperature: true``) and the
    abstention threshold are fitted; ``bins`` equal-width bins of the expected calibration error."""

    validation_limit: int = Field(300, ge=1, le=10_000_000)
    temperature: bool = True
    bins: int = Field(10, ge=2, le=100)


class AbstainSpec(Section):
    """When the final model hands a case to a person (转人工): below a confidence chosen on the validation split
    for ``target_accuracy`` on the answered cases, or below a fixed ``min_confidence``; one of the two."""

    target_accuracy: float | None = Field(0.97, gt=0.0, le=1.0)
    min_confidence: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _one_rule(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("min_confidence") is not None:
            if data.get("target_accuracy") is not None:
                raise ValueError("give target_accuracy (the threshold is chosen on the validation split) or "
                                 "min_confidence (a fixed threshold), not both")
            data = {**data, "target_accuracy": None}
        return data


class CounterfactualSpec(Section):
    """Counterfactual tests of the final model (banklm.evaluation.counterfactual), by label scoring: each
    protected attribute swapped, the deciding field moved across its rule's threshold, on the first ``limit``
    test records per task."""

    enabled: bool = True
    limit: int = Field(100, ge=1, le=1_000_000)


class EvalSection(Section):
    enabled: bool = True
    tasks: list[TaskName] = Field(default_factory=lambda: list(TASKS))  # a recipe with tasks: adds its own
    limit: int | None = Field(None, ge=1, le=10_000_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    max_new_tokens: int = Field(128, ge=1, le=4096)
    robustness: list[Literal["shuffle_fields", "fullwidth_digits", "distractor"]] = Field(default_factory=list)
    compare: list[Literal["base", "cpt"]] = Field(default_factory=list)  # earlier models scored side by side
    retention: bool = True  # perplexity on the general corpus's test split, before and after fine-tuning
    # constrained (the default): label scoring picks the labels, the reason is greedy under each request's answer
    # grammar (banklm.tasks.grammar: layout, labels, a bounded reason citing only the prompt's numbers): as
    # accurate as free decoding on the quickstart's 3 seeds, with no unsupported number (BENCHMARKS.md);
    # free: plain greedy. The export stage scores the other one too.
    decoding: Literal["free", "constrained"] = "constrained"
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    abstain: AbstainSpec = Field(default_factory=AbstainSpec)
    # the rule engine and scikit-learn scorecards (logistic regression, gradient boosting; TF-IDF for text) trained
    # on the scenario train split, scored on the same test records (banklm.evaluation.baselines)
    baselines: bool = True
    counterfactual: CounterfactualSpec = Field(default_factory=CounterfactualSpec)


def _no_duplicates(values: list[str]) -> list[str]:
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise ValueError(f"listed twice: {', '.join(dup)}")
    return values


class GgufSection(Section):
    """GGUF files for llama.cpp / Ollama (k-quants q4_k_m, q5_k_m, q6_k need ``banklm[llamacpp]``)."""

    enabled: bool = True
    quant: list[GgufQuant] = Field(default_factory=lambda: list(DEFAULT_GGUF_QUANT), min_length=1)
    system: str | None = None  # the Ollama Modelfile's SYSTEM prompt
    num_ctx: int | None = Field(None, ge=64)  # Modelfile num_ctx (default: the model's context, at most 8192)

    _unique = field_validator("quant")(_no_duplicates)


class OnnxSection(Section):
    """ONNX decoder with KV cache: fp32, fp16 (for GPUs) and int8 (dynamic quantization of fp32)."""

    enabled: bool = False
    opset: int = Field(DEFAULT_OPSET, ge=MIN_OPSET, le=MAX_OPSET)
    quant: list[OnnxQuant] = Field(default_factory=lambda: list(DEFAULT_ONNX_QUANT), min_length=1)

    _unique = field_validator("quant")(_no_duplicates)


class ExportSection(Section):
    gguf: GgufSection = Field(default_factory=GgufSection)
    onnx: OnnxSection = Field(default_factory=OnnxSection)
    evaluate: bool = True  # task evaluation (eval.tasks) of every artefact and of the PyTorch model
    eval_limit: int | None = Field(None, ge=1)  # records per task for that evaluation (default eval.limit)
    max_accuracy_drop: float | None = Field(None, ge=0, le=1)  # fail the export when an artefact loses more


class DistillTeacher(Section):
    """The teacher: ``path`` (a local model folder) or, by default, the run's own fine-tuned model."""

    path: str | None = None
    quantization: Literal["4bit", "8bit"] | None = None  # bitsandbytes, applied on CUDA (full precision on CPU)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"


class DistillStudent(Section):
    """Where the student starts: ``from: teacher_layers`` (every ``every``-th teacher layer, or ``layers``,
    optionally a narrower MLP), ``from: path`` (a smaller local model) or ``from: build`` (a tiny config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              serialize_by_alias=True)

    from_: Literal["teacher_layers", "path", "build"] = Field("teacher_layers", alias="from")
    every: int = Field(2, ge=1, le=64)
    layers: list[Annotated[int, Field(ge=0)]] | None = None
    intermediate_size: int | None = Field(None, ge=1)
    path: str | None = None
    build: TinyModel | None = None
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _source(self) -> DistillStudent:
        if (self.from_ == "path") != (self.path is not None):
            raise ValueError("set path exactly when from: path")
        if (self.from_ == "build") != (self.build is not None):
            raise ValueError("set build exactly when from: build")
        if self.from_ != "teacher_layers" and (self.layers is not None or self.intermediate_size is not None):
            raise ValueError("layers and intermediate_size apply only to from: teacher_layers")
        return self


class KdParams(Section):
    """Logit distillation loss: ``alpha * T^2 * divergence + (1 - alpha) * cross-entropy`` on answer tokens."""

    divergence: Literal["forward", "reverse", "jsd"] = "forward"
    beta: float = Field(0.5, gt=0, lt=1)  # jsd only: weight of the teacher in the mixture
    temperature: float = Field(1.0, gt=0, le=20)
    alpha: float = Field(0.5, ge=0, le=1)
    top_k: int | None = Field(None, ge=1, le=4096)  # None: live teacher, full logits; k: pre-computed top-k cache
    tail: Literal["bucket", "renorm"] = "bucket"  # top-k only: mass outside the k tokens as one bin, or renormalise


class SeqKdParams(Section):
    """Sequence-level distillation: the teacher answers the prompt pool, only checked answers are kept."""

    train_prompts: bool = True  # the scenario train split's prompts (distill.limit applies)
    unlabelled_prompts: bool = True  # the scenario corpus's unlabelled split (a bank's rows without label), when built
    extra_prompts: list[str] = Field(default_factory=list)  # JSONL files of unlabelled {task, prompt} records
    strict: bool = True  # answers must have exactly the documented layout
    match: Literal["label", "fields"] = "label"  # what must agree with the gold / rule answer
    require_reference: bool = False  # drop prompts without a gold or rule answer
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(128, ge=1, le=4096)


class DistillTrain(TrainHyper):
    method: Method = "full"


class DistillSection(Section):
    """Teacher -> smaller student (``method: logit`` or ``seq``), and with ``baseline`` the same student trained
    on the same data for the same number of steps without the teacher."""

    enabled: bool = False
    method: Literal["logit", "seq"] = "logit"
    teacher: DistillTeacher = Field(default_factory=DistillTeacher)
    student: DistillStudent = Field(default_factory=DistillStudent)
    kd: KdParams = Field(default_factory=KdParams)
    seq: SeqKdParams = Field(default_factory=SeqKdParams)
    train: DistillTrain = Field(default_factory=DistillTrain)
    limit: int | None = Field(None, ge=1)  # the transfer set: at most this many train records per task
    baseline: bool = True


TO_BE_FILLED = "（待填写 to be filled）"


class ReportSection(Section):
    """The run report and MODEL_CARD.md; ``owner``/``contact``/``intended_use``/``out_of_scope`` are the
    disclosure fields a bank fills in (defaults are marked to be filled)."""

    enabled: bool = True
    language: Literal["zh", "en"] = "zh"  # card body text; headings are always Chinese + English
    owner: str = TO_BE_FILLED          # responsible entity (e.g. the bank and department)
    contact: str = TO_BE_FILLED        # contact for questions about the model
    intended_use: str | None = None    # None: the default decision-support wording
    out_of_scope: str | None = None    # None: the default out-of-scope wording
    failure_examples: int = Field(5, ge=0, le=50)  # wrong predictions shown in the card


class PlanSection(Section):
    """Hints for ``banklm plan`` (training ignores them): the card the recipe is written for, and the bundled
    config to plan with when ``base.path`` is not on this machine (default: matched by the folder's name)."""

    gpu_mem: str | None = Field(None, pattern=r"^\d+(\.\d+)?\s*(GB|GiB|G)?$")  # e.g. 12GB
    config: str | None = None  # a name from finetune/known_configs.py, e.g. qwen2.5-1.5b
    student_config: str | None = None  # the same for distill.student.path (from: path), e.g. qwen2.5-0.5b


class Recipe(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    description: str = ""
    seed: int = Field(0, ge=0, lt=2**32)  # numpy and torch seeds are 32-bit
    # the data's seed (generated records, splits, the tokenizer, the SFT mix's draw): default the seed; set it to
    # vary training alone (banklm run --seeds sets it to the recipe's so every seed trains on the same data)
    data_seed: int | None = Field(None, ge=0, lt=2**32)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    tasks: dict[str, TaskRef] = Field(default_factory=dict)  # the bank's own task specs (docs/tasks.md)
    corpora: CorporaSection = Field(default_factory=CorporaSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    base: BaseSection
    cpt: CptSection = Field(default_factory=CptSection)
    train: TrainSection = Field(default_factory=TrainSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    export: ExportSection = Field(default_factory=ExportSection)
    report: ReportSection = Field(default_factory=ReportSection)
    plan: PlanSection = Field(default_factory=PlanSection)

    @property
    def data_seed_used(self) -> int:
        """The seed of the data: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.tokenizer.train and self.base.build is None:
            raise ValueError("tokenizer.train is only for bases built from scratch (base.build); "
                             "a local base model brings its own tokenizer")
        if self.base.build is not None and not self.tokenizer.train:
            raise ValueError("base.build needs tokenizer.train: true (a tiny base gets a tokenizer trained on the run's corpora)")
        self._mixes_read()
        d = self.distill
        if d.enabled and d.teacher.path is None and not (self.train.enabled or self.cpt.enabled):
            raise ValueError("distill: the default teacher is the run's fine-tuned model, but train and cpt are "
                             "disabled: enable train or set distill.teacher.path")
        if d.enabled and (self.corpora.scenario is None or not (self.corpora.scenario.synth
                                                                 or self.corpora.scenario.tables)):
            raise ValueError("distill needs scenario training data (corpora.scenario)")
        return self

    def _mixes_read(self) -> None:
        """``train.mix`` names configured corpora; corpora/mix (``corpora.mix``) is built only for CPT to read."""
        for kind in self.train.mix.shares():
            if getattr(self.corpora, kind) is None:
                raise ValueError(f"train.mix.{kind}: mixes corpora/{kind} into SFT, but corpora.{kind} is not "
                                 "configured")
        reads_mix = self.cpt.enabled and "mix" in self.cpt.corpora
        if self.corpora.mix is not None and not reads_mix:
            raise ValueError("corpora.mix: builds corpora/mix for continued pre-training, but no stage reads it: "
                             "add mix to cpt.corpora (cpt enabled), or drop it (instruction data for SFT: "
                             "train.mix)")
        if "mix" in self.cpt.corpora and self.corpora.mix is None:
            raise ValueError("cpt.corpora: lists mix, but corpora.mix is not configured")

    def task_names(self) -> list[str]:
        """The tasks of the run's models (what their folders and the export bundle carry as ``tasks/<name>.yaml``):
        the scenario corpus's (synth, then tables), then the recipe's own specs."""
        sc = self.corpora.scenario
        names = [*sc.synth, *(t.task for t in sc.tables)] if sc is not None else []
        return list(dict.fromkeys([*names, *self.tasks]))

    def allowed_tasks(self) -> list[str]:
        """The task names this recipe accepts: the built-ins and its own specs."""
        return [*TASKS, *self.tasks]

    def spec_files(self) -> list[Path]:
        """The recipe's own spec files (stage inputs: a changed spec re-runs the stages that use it)."""
        return [Path(ref.path) for ref in self.tasks.values()]


# ----------------------------------------------------------------------------------------- overrides

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_override(arg: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value), the value read as YAML (numbers, lists, booleans)."""
    if "=" not in arg:
        raise RecipeError(f"bad override {arg!r}: expected key.sub=value")
    key, raw = arg.split("=", 1)
    key = key.strip()
    if not _KEY_RE.match(key):
        raise RecipeError(f"bad override {arg!r}: key {key!r} must be dotted names like train.lr")
    if len(raw) > MAX_OVERRIDE_CHARS:
        raise RecipeError(f"override {key}: value is {len(raw)} characters, more than {MAX_OVERRIDE_CHARS}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"bad override {arg!r}: value is not valid YAML ({e.problem})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for arg in overrides:
        keys, value = parse_override(arg)
        node = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"bad override {arg!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return data


# ----------------------------------------------------------------------------------------- loading

class _NoAliasLoader(yaml.SafeLoader):
    """Safe loader that refuses anchors/aliases: they buy nothing in a recipe and enable 'billion laughs'."""

    def compose_node(self, parent, index):  # noqa: D401
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, "YAML aliases (*name) are not allowed in recipes",
                                                    event.start_mark)
        return super().compose_node(parent, index)


def _format_error(source: str, err: dict) -> str:
    loc = tuple(p for p in err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = model_at(Recipe, loc[:-1])
        allowed = ", ".join(f.alias or n for n, f in parent.model_fields.items()) if parent else "?"
        return f"{source}: unknown key '{key}' (allowed here: {allowed})"
    if kind == "missing":
        return f"{source}: missing required key '{key}'"
    value = err.get("input")
    if loc and loc[-1] == "[key]":
        key = ".".join(str(p) for p in loc[:-2])
        return f"{source}: {key}: key {value!r} is not allowed: {err['msg'].removeprefix('Value error, ')}"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return f"{source}: {key}: {msg}" if loc else f"{source}: {msg}"
    return f"{source}: {key} = {short_repr(value)}: {msg}"


def _recipe_tasks(data: dict, source: str, base_dir: Path) -> dict[str, Task]:
    """Load the specs of the recipe's ``tasks: {name: path}`` (paths relative to the recipe file's folder) and
    replace each entry in ``data`` by ``{path: <absolute>, sha256: <the spec's>}``. One RecipeError line naming
    the key: not a mapping, a built-in name, a missing file, a bad spec, a spec called otherwise, a changed spec."""
    raw = data.get("tasks")
    if raw is None:
        data.pop("tasks", None)  # `tasks:` left empty: none
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: tasks: a mapping of task name -> spec file (e.g. post_loan: "
                          f"specs/post_loan.yaml), got {type(raw).__name__}")
    tasks: dict[str, Task] = {}
    resolved: dict[str, dict] = {}
    for name, ref in raw.items():
        key = f"tasks.{name}"
        if name in TASKS:
            raise RecipeError(f"{source}: {key}: {name!r} is a built-in task (built-ins: {', '.join(TASKS)}); give "
                              "the bank's task another name")
        if (isinstance(ref, dict) and set(ref) <= {"path", "sha256"} and isinstance(ref.get("path"), str)
                and (ref.get("sha256") is None or re.fullmatch(r"[0-9a-f]{64}", str(ref["sha256"])))):
            path, pinned = ref["path"], ref.get("sha256")
        elif isinstance(ref, str) and ref.strip():
            path, pinned = ref, None
        else:
            raise RecipeError(f"{source}: {key}: give the spec file's path (or {{path: ..., sha256: <64 hex "
                              f"digits>}}), got {ref!r}")
        p = Path(path).expanduser()
        p = (p if p.is_absolute() else base_dir / p).resolve()
        if not p.is_file():
            raise RecipeError(f"{source}: {key}: spec file not found: {p}")
        try:
            task = task_from_spec(p)
        except SpecError as e:
            raise RecipeError(f"{source}: {key}: {e}") from None
        if task.name != name:
            raise RecipeError(f"{source}: {key}: the spec {p} is called {task.name!r}, not {name!r} (the key is the "
                              "spec's name)")
        if pinned is not None and pinned != task.spec.sha256:
            raise RecipeError(f"{source}: {key}: {p} changed since this recipe was resolved (sha256 {pinned[:12]}... "
                              f"recorded, {task.spec.sha256[:12]}... now); give the path alone to take the new spec")
        tasks[name] = task
        resolved[name] = {"path": str(p), "sha256": task.spec.sha256}
    data["tasks"] = resolved
    ev = data.get("eval")
    if tasks and (ev is None or isinstance(ev, dict)) and "tasks" not in (ev or {}):
        data["eval"] = {**(ev or {}), "tasks": [*TASKS, *tasks]}  # evaluate the recipe's own tasks by default
    return tasks


def validate_recipe(data: Any, source: str = "recipe", base_dir: str | Path | None = None) -> Recipe:
    """Validate a recipe's data. Its own task specs (``tasks:``, relative to ``base_dir``: the recipe file's
    folder, default the current one) are loaded first, so every task key accepts their names, and registered
    once the recipe is valid (``banklm.tasks.get_task`` then finds them)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of sections, got {type(data).__name__}")
    data = dict(data)
    own = _recipe_tasks(data, source, Path(base_dir) if base_dir is not None else Path.cwd())
    try:
        recipe = Recipe.model_validate(data, context={"tasks": {**TASKS, **own}})
    except ValidationError as e:
        errors = e.errors()
        first = _format_error(source, errors[0])
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise RecipeError(first + more) from None
    for task in own.values():
        register_spec(task, replace=True)  # the recipe's spec wins in this process
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: recipe is not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        raise RecipeError(f"{path}: recipe is empty")
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return validate_recipe(data, source=str(path), base_dir=path.resolve().parent)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), allow_unicode=True, sort_keys=False)


def section_params(recipe: Recipe, *names: str) -> dict:
    """The resolved values of some top-level sections: what a stage's reuse key is made of."""
    data = recipe.model_dump(mode="json")
    return {n: data[n] for n in names}
