import pytest

from banklm.recipe import RecipeError, apply_overrides, load_recipe, parse_override, validate_recipe

MINIMAL = """
name: t
tokenizer: {train: true}
base:
  build: {arch: llama, hidden_size: 64}
train:
  lr: 1.0e-3
  method: lora
"""


@pytest.fixture
def recipe_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(MINIMAL, encoding="utf-8")
    return p


def test_good_recipe_gets_defaults(recipe_file):
    r = load_recipe(recipe_file)
    assert r.name == "t"
    assert r.train.lr == 1e-3
    assert r.train.lora.r == 16  # schema default
    assert r.base.build.hidden_size == 64
    assert r.export.gguf.quant == ["f16", "q8_0"]


def test_every_shipped_recipe_validates(repo):
    recipes = sorted((repo / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for p in recipes:
        load_recipe(p)


def test_unknown_key_names_key_and_allowed(recipe_file):
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_file, ["train.lrr=0.1"])
    msg = str(e.value)
    assert "train.lrr" in msg and "lr" in msg and "method" in msg and str(recipe_file) in msg


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(MINIMAL + "exprot: {}\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"unknown key 'exprot'.*export"):
        load_recipe(p)


def test_wrong_type_names_value_and_expectation(recipe_file):
    with pytest.raises(RecipeError, match=r"train\.lr = 'fast': Input should be a valid number"):
        load_recipe(recipe_file, ["train.lr=fast"])


def test_bad_literal_lists_allowed_values(recipe_file):
    with pytest.raises(RecipeError, match=r"train\.method = 'qqlora'.*'lora', 'qlora' or 'full'"):
        load_recipe(recipe_file, ["train.method=qqlora"])


def test_out_of_range(recipe_file):
    with pytest.raises(RecipeError, match=r"train\.batch_size = 0"):
        load_recipe(recipe_file, ["train.batch_size=0"])


def test_bad_task_name_in_synth(recipe_file):
    with pytest.raises(RecipeError, match=r"corpora\.scenario\.synth: key 'loans' is not allowed.*credit"):
        load_recipe(recipe_file, ["corpora.scenario.synth.loans.train=5"])


def test_base_needs_exactly_one_source(tmp_path):
    with pytest.raises(RecipeError, match="exactly one of base.path"):
        validate_recipe({"name": "x", "base": {}}, "r.yaml")
    with pytest.raises(RecipeError, match="exactly one of base.path"):
        validate_recipe({"name": "x", "base": {"path": "/m", "build": {}}, "tokenizer": {"train": True}}, "r.yaml")


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1", "1train.lr=3", "train.lr[0]=1"])
def test_bad_override_syntax(recipe_file, bad):
    with pytest.raises(RecipeError, match="bad override"):
        load_recipe(recipe_file, [bad])


def test_override_into_a_value_is_an_error(recipe_file):
    with pytest.raises(RecipeError, match="train.lr is a value, not a section"):
        load_recipe(recipe_file, ["train.lr.x=1"])


def test_override_precedence_default_file_cli(recipe_file):
    r = load_recipe(recipe_file)
    assert r.train.batch_size == 16  # default
    assert r.train.lr == 1e-3  # file beats default
    r = load_recipe(recipe_file, ["train.lr=1e-4", "train.lr=2e-4", "train.batch_size=4"])
    assert r.train.lr == 2e-4  # command line beats file; the last override wins
    assert r.train.batch_size == 4


def test_override_values_are_yaml(recipe_file):
    r = load_recipe(recipe_file, ["export.gguf.quant=[q8_0,q4_0]", "train.packing=false",
                                  "corpora.scenario.synth.credit.train=7"])
    assert r.export.gguf.quant == ["q8_0", "q4_0"]
    assert r.train.packing is False
    assert r.corpora.scenario.synth["credit"].train == 7


def test_bad_quant_in_list(recipe_file):
    with pytest.raises(RecipeError, match=r"export\.gguf\.quant\.1 = 'q3'.*'q8_0'"):
        load_recipe(recipe_file, ["export.gguf.quant=[q8_0,q3]"])


def test_huge_override_refused(recipe_file):
    with pytest.raises(RecipeError, match="more than"):
        load_recipe(recipe_file, ["description=" + "x" * 20_000])


def test_yaml_aliases_refused(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text('a: &a ["x","x"]\nb: [*a,*a]\nname: t\n', encoding="utf-8")
    with pytest.raises(RecipeError, match="aliases"):
        load_recipe(p)


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: t\ntrain: [\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(p)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "e.yaml").write_text("", encoding="utf-8")
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(tmp_path / "e.yaml")


def test_parse_override_reads_numbers():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], "1e-4")  # YAML 1.1: a string pydantic coerces
    assert parse_override("seed=3") == (["seed"], 3)
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_recipes_in_readme_validate(repo):
    import re

    import yaml

    blocks = re.findall(r"```yaml\n(.*?)```", (repo / "README.md").read_text(encoding="utf-8"), re.S)
    assert blocks
    for block in blocks:
        validate_recipe(yaml.safe_load(block), "README.md")


def test_training_loop_keys(recipe_file):
    r = load_recipe(recipe_file, ["train.save_steps=50", "train.eval_steps=25", "train.early_stopping_patience=3",
                                  "train.task_eval_steps=100"])
    assert (r.train.save_steps, r.train.keep_checkpoints, r.train.eval_steps) == (50, 2, 25)
    assert (r.train.task_eval_steps, r.train.task_eval_samples, r.train.early_stopping_patience) == (100, 20, 3)
    with pytest.raises(RecipeError, match=r"train: early_stopping_patience needs eval_steps"):
        load_recipe(recipe_file, ["train.early_stopping_patience=3"])
    with pytest.raises(RecipeError, match=r"train\.keep_checkpoints = 0"):
        load_recipe(recipe_file, ["train.keep_checkpoints=0"])


def test_export_keys(recipe_file):
    r = load_recipe(recipe_file)
    assert (r.export.onnx.enabled, r.export.onnx.opset, r.export.onnx.quant) == (False, 17, ["fp32", "int8"])
    assert (r.export.evaluate, r.export.eval_limit, r.export.max_accuracy_drop) == (True, None, None)
    r = load_recipe(recipe_file, ["export.onnx.enabled=true", "export.onnx.quant=[fp16]", "export.onnx.opset=18",
                                  "export.eval_limit=50", "export.max_accuracy_drop=0.02",
                                  "export.gguf.system=你是银行信贷审批助手。", "export.gguf.quant=[q4_k_m]"])
    assert (r.export.onnx.quant, r.export.onnx.opset, r.export.eval_limit) == (["fp16"], 18, 50)
    assert r.export.gguf.system == "你是银行信贷审批助手。" and r.export.max_accuracy_drop == 0.02
    with pytest.raises(RecipeError, match=r"export\.onnx\.quant\.0 = 'int4'.*'fp32', 'fp16' or 'int8'"):
        load_recipe(recipe_file, ["export.onnx.quant=[int4]"])
    with pytest.raises(RecipeError, match=r"export\.onnx\.quant: listed twice: int8"):
        load_recipe(recipe_file, ["export.onnx.quant=[int8,fp32,int8]"])
    with pytest.raises(RecipeError, match=r"export\.onnx\.opset = 12"):
        load_recipe(recipe_file, ["export.onnx.opset=12"])
    with pytest.raises(RecipeError, match=r"export\.gguf\.quant = \[\]"):
        load_recipe(recipe_file, ["export.gguf.quant=[]"])
    with pytest.raises(RecipeError, match=r"export\.max_accuracy_drop = 2"):
        load_recipe(recipe_file, ["export.max_accuracy_drop=2"])
    with pytest.raises(RecipeError, match=r"unknown key 'export.onnx.dtype' \(allowed here: enabled, opset, quant\)"):
        load_recipe(recipe_file, ["export.onnx.dtype=fp16"])


# ------------------------------------------------------------- one definition: export's quants, the steps' parameters

def test_quant_names_and_defaults_are_exports(recipe_file):
    import typing

    from banklm.export.gguf import DEFAULT_GGUF_QUANT, GGUF_QUANTS
    from banklm.export.onnx import DEFAULT_ONNX_QUANT, DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ONNX_QUANTS

    from banklm.recipe import ExportSection, GgufQuant, OnnxQuant

    assert typing.get_args(GgufQuant) == GGUF_QUANTS and typing.get_args(OnnxQuant) == ONNX_QUANTS
    x = ExportSection()
    assert (x.gguf.quant, x.onnx.quant, x.onnx.opset) == (list(DEFAULT_GGUF_QUANT), list(DEFAULT_ONNX_QUANT),
                                                          DEFAULT_OPSET)
    # the error names the key and lists export's own tuple
    with pytest.raises(RecipeError, match=r"export\.gguf\.quant\.0 = 'q3_k'.*" + "'" + GGUF_QUANTS[-1] + "'"):
        load_recipe(recipe_file, ["export.gguf.quant=[q3_k]"])
    for bad in (MIN_OPSET - 1, MAX_OPSET + 1):
        with pytest.raises(RecipeError, match=rf"export\.onnx\.opset = {bad}"):
            load_recipe(recipe_file, [f"export.onnx.opset={bad}"])


def _out_of_bounds(bounds: dict) -> list:
    return ([bounds["ge"] - 1] if "ge" in bounds else []) + ([bounds["gt"]] if "gt" in bounds else []) + \
        ([bounds["le"] + 1] if "le" in bounds else []) + ([bounds["lt"]] if "lt" in bounds else [])


def test_every_step_parameter_comes_from_the_step():
    """The recipe's step names, parameters (names, types, defaults, bounds) and default steps are the corpora's."""
    import typing

    from banklm.corpora.build import DEFAULT_STEPS, STEPS
    from banklm.corpora.ops.base import step_params
    from banklm.corpora.sources import FORMATS

    from banklm.recipe import (
        STEP_PARAMS,
        DecontamSpec,
        GeneralCorpus,
        PrivateCorpus,
        ScenarioCorpus,
        SourceFormat,
        StepName,
        StepSpec,
        VerticalCorpus,
    )

    assert typing.get_args(StepName) == tuple(STEPS) and typing.get_args(SourceFormat) == FORMATS
    checked = 0
    for name, cls in STEPS.items():
        declared = step_params(cls) if name not in ("pii", "decontam") else {}
        fields = STEP_PARAMS[name].model_fields
        assert list(fields) == list(declared), name
        assert StepSpec.model_validate(name).params == {k: p.default for k, p in declared.items()}
        for k, p in declared.items():
            assert fields[k].annotation is p.type and fields[k].default == p.default, (name, k)
            for bad in _out_of_bounds(p.bounds):  # both the step and the recipe refuse it, naming the parameter
                with pytest.raises(ValueError, match=rf"{name}: {k}"):
                    cls(**{k: bad})
                with pytest.raises(ValueError, match=rf"step {name}: {k} = {bad!r}"):
                    StepSpec.model_validate({name: {k: bad}})
                checked += 1
    assert checked >= 20
    n = step_params(STEPS["decontam"])["n"]
    assert DecontamSpec().n == n.default and DecontamSpec.model_fields["n"].metadata  # bounds come along
    with pytest.raises(ValueError, match="decontam: n must be >= 5"):
        STEPS["decontam"](["x"], n=4)
    for kind, cls in (("general", GeneralCorpus), ("vertical", VerticalCorpus), ("private", PrivateCorpus)):
        got = [s.model_dump() for s in cls(sources=["x"]).steps]
        assert got == [StepSpec.model_validate(s).model_dump() for s in DEFAULT_STEPS[kind]], kind
    assert ScenarioCorpus().steps == [] == DEFAULT_STEPS["scenario"]


def test_step_parameter_errors_keep_their_wording():
    from banklm.recipe import StepSpec

    with pytest.raises(ValueError, match=r"step near_dedup: unknown parameter 'k' \(allowed: ngram, threshold, "
                                         r"num_perm, seed\)"):
        StepSpec.model_validate({"near_dedup": {"k": 1}})
    with pytest.raises(ValueError, match=r"step exact_dedup: unknown parameter 'x' \(allowed: none\)"):
        StepSpec.model_validate({"exact_dedup": {"x": 1}})
    with pytest.raises(ValueError, match=r"step pii takes no parameters here: set them under corpora.<kind>.pii"):
        StepSpec.model_validate({"pii": {"mode": "drop"}})
