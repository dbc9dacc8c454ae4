"""The open task registry wired through banklm (issue 16): a recipe's own task specs (``tasks: {name: path}``)
accepted wherever a task name is, recorded in recipe.yaml and the stage keys; model folders and export bundles
carrying ``tasks/<name>.yaml``; ``--tasks`` resolution outside a recipe; ``banklm task check``; a spec task
evaluated from a model folder / an export bundle without its recipe, end to end on a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from banklm.cli import main
from banklm.io import sha256_file
from banklm.ledger import file_records
from banklm.pipeline import RunContext, stage_key
from banklm.recipe import RecipeError, dump_recipe, load_recipe
from banklm.stages import STAGES
from banklm.stages.common import carry_tasks
from banklm.tasks import TASKS, carry_specs, get_task, unregister
from tests.helpers import run_banklm
from tests.test_task_spec import POST_LOAN, TABLE, WITH_GENDER

# a valid ID card number (check digit) and a mobile number, planted in the tables task check prints from
ID_NUMBER = "110101199003071233"
PHONE = "13812345678"

RECIPE = """\
name: t
tasks:
  post_loan: specs/post_loan.yaml
base: {path: /nonexistent/model}
corpora:
  scenario:
    synth: {credit: {train: 6, validation: 3, test: 3}}
    tables: [{path: post_loan.csv, task: post_loan, split: train}]  # 20 rows: too few for a test split
"""


@pytest.fixture(autouse=True)
def _forget_post_loan():
    """Loading a recipe registers its specs in the process: leave no registered task behind."""
    yield
    unregister("post_loan")


@pytest.fixture
def bank(tmp_path, monkeypatch):
    """A recipe folder, the current one (tables are relative to it): ``r.yaml``, ``specs/post_loan.yaml`` and a
    clean table ``post_loan.csv``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "post_loan.yaml").write_text(POST_LOAN, encoding="utf-8")
    (tmp_path / "post_loan.csv").write_text(clean_table(20), encoding="utf-8")
    (tmp_path / "r.yaml").write_text(RECIPE, encoding="utf-8")
    return tmp_path


def clean_table(n: int) -> str:
    head = "客户名称,客户类型,贷款余额,逾期天数,五级分类,经营状况,是否涉诉,借款人年龄,借款人性别\n"
    levels, kinds = ["正常", "关注", "次级", "正常"], ["个人", "个体工商户", "企业"]
    rows = [f"客户{i},{kinds[i % 3]},{10 + i},{(i * 37) % 150},{levels[i % 4]},{'停业' if i % 5 == 4 else '正常'},"
            f"{'是' if i % 6 == 5 else '否'},{25 + i},{'男女'[i % 2]}\n" for i in range(n)]
    return head + "".join(rows)


# ------------------------------------------------------------------------------------------------- recipe

def test_recipe_tasks_resolve_register_and_are_recorded(bank, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # paths are relative to the recipe file, not the cwd
    r = load_recipe(bank / "r.yaml")
    spec = bank / "specs" / "post_loan.yaml"
    assert r.tasks["post_loan"].path == str(spec.resolve())
    assert r.tasks["post_loan"].sha256 == sha256_file(spec) == get_task("post_loan").spec.sha256
    assert r.corpora.scenario.tables[0].task == "post_loan"
    assert r.eval.tasks == ["credit", "aml", "audit", "post_loan"]  # the recipe's own tasks evaluated by default
    assert r.task_names() == ["credit", "post_loan"] and r.spec_files() == [spec.resolve()]
    # the resolved recipe (run/recipe.yaml) records path and sha256, and loads again from anywhere
    dumped = yaml.safe_load(dump_recipe(r))
    assert dumped["tasks"] == {"post_loan": {"path": str(spec.resolve()), "sha256": sha256_file(spec)}}
    again = tmp_path_factory.mktemp("run") / "recipe.yaml"
    again.write_text(dump_recipe(r), encoding="utf-8")
    assert load_recipe(again).tasks == r.tasks
    # ... but not once the spec changed: the resolved recipe pins it
    spec.write_text(POST_LOAN.replace("title: 贷后预警等级", "title: 贷后预警"), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"recipe.yaml: tasks.post_loan: .*post_loan.yaml changed since this "
                                          r"recipe was resolved"):
        load_recipe(again)
    assert load_recipe(bank / "r.yaml").tasks["post_loan"].sha256 == sha256_file(spec)  # the path alone: new spec


@pytest.mark.parametrize("override, message", [
    (["tasks.credit=specs/post_loan.yaml"], r"tasks.credit: 'credit' is a built-in task \(built-ins: credit, aml, "
                                            r"audit\); give the bank's task another name"),
    (["tasks.loan=specs/post_loan.yaml"], r"tasks.loan: the spec .*post_loan.yaml is called 'post_loan', not 'loan'"),
    (["tasks.post_loan=specs/nope.yaml"], r"tasks.post_loan: spec file not found: .*specs/nope.yaml"),
    (["tasks=[specs/post_loan.yaml]"], r"tasks: a mapping of task name -> spec file"),
    (["tasks.post_loan={path: specs/post_loan.yaml, shaa: x}"], r"tasks.post_loan: give the spec file's path"),
    (["corpora.scenario.synth.post_loan.train=5"],
     r"corpora.scenario.synth: key 'post_loan' is not allowed: the task 'post_loan' has no synthetic sampler .*"
     r"corpora.scenario.tables"),
    (["eval.tasks=[credit,loan]"], r"eval.tasks.1: unknown task 'loan' \(allowed: credit, aml, audit, post_loan;"),
    (["corpora.scenario.tables=[{path: t.csv, task: loan}]"],
     r"corpora.scenario.tables.0.task: unknown task 'loan' \(allowed: credit, aml, audit, post_loan;"),
    (["corpora.scenario.synth.loan.train=5"], r"synth: key 'loan' is not allowed: unknown task 'loan' \(allowed: "
                                              r"credit, aml, audit, post_loan;"),
])
def test_recipe_task_errors_are_one_line_naming_the_key(bank, override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(bank / "r.yaml", override)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(bank / "r.yaml") + ": ")
    assert re.search(message, str(e.value)), str(e.value)


def test_a_bad_spec_in_a_recipe_names_the_key_and_the_spec_error(bank):
    (bank / "specs" / "post_loan.yaml").write_text(POST_LOAN.replace("unit: 天, min: 0}", "unti: 天, min: 0}"),
                                                   encoding="utf-8")
    with pytest.raises(RecipeError, match=r"r.yaml: tasks.post_loan: .*post_loan.yaml: unknown key "
                                          r"'fields.逾期天数.unti'"):
        load_recipe(bank / "r.yaml")
    with pytest.raises(ValueError, match="unknown task 'post_loan'"):
        get_task("post_loan")  # nothing registered from a recipe that did not load


def test_the_quickstart_recipe_is_unchanged(repo):
    r = load_recipe(repo / "recipes" / "quickstart.yaml")
    assert r.tasks == {} and r.eval.tasks == ["credit", "aml", "audit"]
    assert r.task_names() == ["credit", "aml", "audit"] and r.spec_files() == []
    assert all("tasks" not in st.params(r) for st in STAGES)  # the stage keys' params as before


def test_stage_keys_include_the_spec(bank, tmp_path):
    r = load_recipe(bank / "r.yaml")
    ctx = RunContext(r, tmp_path / "run")
    spec = (bank / "specs" / "post_loan.yaml").resolve()
    using = {"corpus", "cpt", "train", "eval", "export"}
    for st in STAGES:
        if st.name in using:
            assert st.params(r)["tasks"]["post_loan"]["sha256"] == sha256_file(spec), st.name
            assert spec in [Path(p).resolve() for p in st.inputs(ctx)], st.name
    eval_stage = next(st for st in STAGES if st.name == "eval")
    before = stage_key("eval", eval_stage.params(r), file_records([spec], ctx.run_dir))
    spec.write_text(POST_LOAN.replace("max_length: 40", "max_length: 41"), encoding="utf-8")
    assert stage_key("eval", eval_stage.params(r), file_records([spec], ctx.run_dir)) != before


# ------------------------------------------------------------------------------------------------- corpus

def test_corpus_build_reads_a_spec_task_table_and_a_changed_spec_reruns_it(bank, capsys):
    run = bank / "run"
    for _ in range(2):
        assert main(["corpus", "build", str(bank / "r.yaml"), "--run-dir", str(run)]) == 0, capsys.readouterr().err
    stats = json.loads((run / "corpora" / "scenario" / "stats.json").read_text(encoding="utf-8"))
    assert {t for split in stats["by_task"].values() for t in split} == {"credit", "post_loan"}
    assert sum(split.get("post_loan", 0) for split in stats["by_task"].values()) == 20
    recorded = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))["tasks"]["post_loan"]
    assert recorded["sha256"] == sha256_file(bank / "specs" / "post_loan.yaml")
    (bank / "specs" / "post_loan.yaml").write_text(POST_LOAN.replace("请给出预警等级、风险标签和理由。", "请给出结论。"),
                                                   encoding="utf-8")
    assert main(["corpus", "build", str(bank / "r.yaml"), "--run-dir", str(run)]) == 0
    entries = [json.loads(x) for x in (run / "ledger.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["status"] for e in entries] == ["done", "reused", "done"]
    spec = str((bank / "specs" / "post_loan.yaml").resolve())
    assert spec in [i["path"] for i in entries[0]["inputs"]]
    assert entries[0]["params"]["tasks"]["post_loan"]["sha256"] != entries[2]["params"]["tasks"]["post_loan"]["sha256"]
    from banklm.corpora.splits import load_split

    prompts = [m["content"] for r in load_split(run / "corpora" / "scenario", "train", tasks=["post_loan"])
               for m in r["messages"] if m["role"] == "user"]
    assert prompts and all(p.endswith("请给出结论。") for p in prompts)


def test_seqkd_prompt_files_accept_the_recipe_tasks(bank):
    from banklm.distill.seqkd import load_prompt_records

    f = bank / "prompts.jsonl"
    f.write_text(json.dumps({"task": "post_loan", "prompt": "逾期120天"}, ensure_ascii=False) + "\n"
                 + json.dumps({"task": "loan", "prompt": "x"}) + "\n", encoding="utf-8")
    r = load_recipe(bank / "r.yaml")
    recs, problems = load_prompt_records(f, tasks=r.allowed_tasks())
    assert [x["task"] for x in recs] == ["post_loan"]
    assert problems == [{"line": 2, "reason": "task 'loan' is not one of credit, aml, audit, post_loan"}]


def test_a_spec_task_without_sampler_cannot_be_generated(bank):
    from banklm.corpora.synth import generate_records

    load_recipe(bank / "r.yaml")
    with pytest.raises(ValueError, match="task 'post_loan' has no synthetic sampler"):
        generate_records("post_loan", 0, seed=0, split="train")


# ------------------------------------------------------------------------------------------------- carried specs

def test_model_folders_carry_the_specs_of_the_run_tasks(bank, tmp_path, monkeypatch):
    r = load_recipe(bank / "r.yaml")
    ctx = RunContext(r, tmp_path / "run")
    merged, adapter = ctx.path("sft", "merged"), ctx.path("sft", "adapter")
    merged.mkdir(parents=True)
    carry_tasks(ctx, merged, adapter)  # adapter/ does not exist (full fine-tuning): skipped
    assert sorted(p.name for p in (merged / "tasks").iterdir()) == ["credit.yaml", "post_loan.yaml"]
    assert not adapter.exists()
    for name in ("credit", "post_loan"):
        assert sha256_file(merged / "tasks" / f"{name}.yaml") == get_task(name).spec.sha256
    assert (merged / "tasks" / "post_loan.yaml").read_bytes() == (bank / "specs" / "post_loan.yaml").read_bytes()
    monkeypatch.setenv("RANK", "1")  # another process of a multi-process launch writes nothing
    other = ctx.path("cpt", "merged")
    other.mkdir(parents=True)
    carry_tasks(ctx, other)
    assert not (other / "tasks").exists()


def test_the_bundle_carries_the_model_specs_and_the_records_tasks(tmp_path):
    from banklm.export.bundle import _carry_task_specs, check_sha256sums, write_sha256sums

    model, bundle = tmp_path / "model", tmp_path / "export"
    (model / "tasks").mkdir(parents=True)
    (model / "tasks" / "post_loan.yaml").write_text(POST_LOAN, encoding="utf-8")
    bundle.mkdir()
    got = _carry_task_specs(model, bundle, ["credit", "credit"])
    assert got == {"credit": TASKS["credit"].spec.sha256, "post_loan": sha256_file(model / "tasks" / "post_loan.yaml")}
    write_sha256sums(bundle)
    sums = (bundle / "SHA256SUMS").read_text(encoding="utf-8")
    assert f"{got['post_loan']}  tasks/post_loan.yaml" in sums and "tasks/credit.yaml" in sums
    assert check_sha256sums(bundle) == []


def test_the_model_card_lists_the_tasks_with_their_spec_sha256(bank, tmp_path):
    from banklm.modelcard import render_model_card
    from banklm.results import collect

    r = load_recipe(bank / "r.yaml")
    run = tmp_path / "run"
    run.mkdir()
    card = render_model_card(collect(run), r)
    section = card.split("## 任务 Tasks")[1].split("\n## ")[0]
    assert f"| `post_loan` | 贷后预警等级 | 本行自定义 | `{get_task('post_loan').spec.sha256}` |" in section
    assert f"| `credit` | 授信审批 | 内置 | `{TASKS['credit'].spec.sha256}` |" in section
    use = card.split("## 预期用途 Intended use")[1].split("\n## ")[0]
    assert "授信审批（credit）、贷后预警等级（post_loan）" in use  # the run's tasks, not the three built-ins
    en = render_model_card(collect(run), load_recipe(bank / "r.yaml", ["report.language=en"]))
    assert "| `post_loan` | 贷后预警等级 | bank's own |" in en


# ------------------------------------------------------------------------------------------------- task check

def _task_check(*args, capsys):
    rc = main(["task", "check", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_task_check_a_table_with_planted_errors_exit_1(tmp_path, capsys):
    spec = tmp_path / "post_loan.yaml"
    spec.write_text(POST_LOAN, encoding="utf-8")
    table = tmp_path / "贷后台账.csv"
    table.write_text(TABLE.replace("张三", f"张三{PHONE}"), encoding="utf-8")
    rc, out, err = _task_check(spec, table, capsys=capsys)
    assert rc == 1
    assert out.splitlines()[0] == f"{spec}: task 'post_loan' (贷后预警等级) is valid: 11 fields, 8 rules, answer " \
                                  "预警等级；风险标签；理由"
    assert f"{table}: 6 rows, 10 problems" in out
    assert f"{table}: column '客户类型': 2 values outside the category (rows 3, 7); e.g. '个体', '个体户'; " \
           "allowed: 个人, 个体工商户, 企业" in out
    assert f"{table}: column '贷款余额': 1 values that are not numbers (rows 4); e.g. 'abc'" in out
    assert f"{table}: column '逾期天数': 1 empty required cells (rows 6)" in out
    assert f"{table}: column '借款人性别': missing column" in out
    assert out.count("--- example ") == 3 and PHONE not in out
    assert err.strip() == (f"banklm: check failed: {table}: 10 problem(s) in 6 rows (missing_column 1, "
                           "outside_category 2, not_a_number 1, not_whole_number 1, not_yes_no 1, bad_label 1, "
                           "empty 1, reason_too_long 1, out_of_range 1, bad_records 1)")


def test_task_check_a_clean_table_exit_0_and_examples_hold_no_pii(tmp_path, capsys):
    spec = tmp_path / "post_loan.yaml"
    spec.write_text(POST_LOAN, encoding="utf-8")
    head, first, *_ = WITH_GENDER.splitlines()
    table = tmp_path / "t.csv"
    rows = [first.replace("张三", f"张三 身份证{ID_NUMBER} 电话{PHONE}"),
            "李四,企业,300,0,正常,正常,否,52,女,正常,各项监测指标正常,",
            f"王五{PHONE},个体工商户,80,45,关注,正常,是,33,男,预警,涉诉且逾期45天,"]
    table.write_text("\n".join([head, *rows]) + "\n", encoding="utf-8")
    rc, out, err = _task_check(spec, table, capsys=capsys)
    assert rc == 0, err
    assert f"{table}: 3 rows, no problems" in out
    assert out.count("--- example ") == 3 and "(t.csv row 2, rule 严重逾期)" in out
    assert "<ID_CARD>" in out and "<PHONE>" in out
    assert ID_NUMBER not in out and PHONE not in out
    assert "[answer] 预警等级：预警；风险标签：逾期、涉诉；理由：涉诉且逾期45天" in out


def test_task_check_column_map_and_bad_input(tmp_path, capsys):
    spec = tmp_path / "post_loan.yaml"
    spec.write_text(POST_LOAN, encoding="utf-8")
    head, first, *_ = WITH_GENDER.splitlines()
    table = tmp_path / "t.csv"
    table.write_text(head.replace("逾期天数", "逾期日数") + "\n" + first + "\n", encoding="utf-8")
    assert _task_check(spec, table, capsys=capsys)[0] == 1  # 逾期天数 missing
    rc, out, _ = _task_check(spec, table, "--column-map", "逾期天数=逾期日数", "--examples", "1", capsys=capsys)
    assert rc == 0 and out.count("--- example ") == 1
    rc, _, err = _task_check(spec, table, "--column-map", "逾期日=逾期日数", capsys=capsys)
    assert rc == 2 and "--column-map: '逾期日' is not a field or answer key of the task 'post_loan'" in err
    rc, _, err = _task_check(spec, tmp_path / "missing.csv", capsys=capsys)
    assert rc == 2 and "missing.csv: table not found" in err


@pytest.mark.parametrize("old, new, message", [
    ("unit: 天, min: 0}", "unti: 天, min: 0}", "unknown key 'fields.逾期天数.unti'"),
    ("values: [正常, 关注, 预警, 转人工]", "values: [正常, 关注, 关注, 转人工]", "duplicate label '关注'"),
    ("favourable: 正常", "favourable: 通过", "'通过' is not a label of '预警等级'"),
    ("name: post_loan", "name: credit", "'credit' is a built-in task"),
])
def test_task_check_a_bad_spec_is_one_line_exit_2(tmp_path, capsys, old, new, message):
    spec = tmp_path / "post_loan.yaml"
    spec.write_text(POST_LOAN.replace(old, new), encoding="utf-8")
    rc, out, err = _task_check(spec, capsys=capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"banklm: error: {spec}: ") and message in err


def test_task_check_a_builtin_and_help(capsys):
    rc, out, _ = _task_check("credit", "--examples", "2", capsys=capsys)
    assert rc == 0 and "task 'credit' (授信审批) is valid" in out and out.count("--- example ") == 2
    with pytest.raises(SystemExit):
        main(["task", "check", "--help"])
    assert "exit 1 when it has problems" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- --tasks outside a recipe

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny Llama (SentencePiece tokenizer, 1024 positions) whose folder carries ``tasks/post_loan.yaml``,
    and test records of post_loan read from a bank table."""
    from banklm.finetune.models import build_tiny_model

    from banklm.io import atomic_write_jsonl
    from banklm.tasks import from_table, task_from_spec
    from tests.export_models import spm_tokenizer

    w = tmp_path_factory.mktemp("spec_model")
    model = Path(build_tiny_model("llama", spm_tokenizer(w / "tok"), w / "model", hidden_size=64, num_layers=2,
                                  num_heads=4, num_kv_heads=2, intermediate_size=128, max_position_embeddings=1024,
                                  seed=1))
    (w / "post_loan.yaml").write_text(POST_LOAN, encoding="utf-8")
    carry_specs(model, [task_from_spec(w / "post_loan.yaml")])
    (w / "t.csv").write_text(clean_table(4), encoding="utf-8")
    records = from_table(task_from_spec(w / "post_loan.yaml"), w / "t.csv", split="test")
    atomic_write_jsonl(w / "records.jsonl", records)
    return w, model


def test_eval_a_spec_task_from_a_model_folder_without_its_recipe(tiny_model):
    w, model = tiny_model
    out = run_banklm("eval", "--model", str(model), "--tasks", "post_loan", "--data", str(w / "records.jsonl"),
                     "--out", str(w / "ev"), "--device", "cpu", "--max-new-tokens", "24", cwd=w)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((w / "ev" / "results.json").read_text(encoding="utf-8"))
    assert list(res["tasks"]) == ["post_loan"] and res["tasks"]["post_loan"]["n"] == 4
    t = res["tasks"]["post_loan"]
    assert {"accuracy", "format_compliance", "per_class", "multi_label"} <= set(t)
    preds = [json.loads(x) for x in (w / "ev" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {p["task"] for p in preds} == {"post_loan"} and all(p["gold"]["预警等级"] for p in preds)
    assert "post_loan: accuracy" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--tasks", "post_loan"], "--tasks post_loan: the task has no synthetic sampler"),  # no --data
    (["--tasks", "loan", "--data", "records.jsonl"],
     "--tasks: unknown task 'loan'; allowed: credit, aml, audit; specs carried by"),
])
def test_tasks_resolution_errors_exit_2(tiny_model, capsys, monkeypatch, args, message):
    w, model = tiny_model
    monkeypatch.chdir(w)
    assert main(["eval", "--model", str(model), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_tasks_name_eq_path_outside_a_recipe(tiny_model, capsys, monkeypatch, tmp_path):
    from banklm.cli import _tasks_arg

    w, model = tiny_model
    assert _tasks_arg(f"credit,post_loan={w / 'post_loan.yaml'}") == ["credit", "post_loan"]
    unregister("post_loan")
    assert _tasks_arg("post_loan", [model]) == ["post_loan"]  # the spec the folder carries
    assert _tasks_arg(None, [model]) == ["credit", "aml", "audit", "post_loan"]
    assert _tasks_arg(None, [model], generated=True) == ["credit", "aml", "audit"]


@pytest.mark.slow
def test_eval_a_spec_task_from_an_export_bundle_without_its_recipe(tiny_model):
    pytest.importorskip("onnxruntime")
    w, model = tiny_model
    bundle = w / "bundle"
    out = run_banklm("export", "--model", str(model), "--format", "onnx", "--quant", "fp32", "--out", str(bundle),
                     "--device", "cpu", "--eval-limit", "2", "--tasks", "post_loan", "--data", str(w / "records.jsonl"),
                     cwd=w)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (bundle / "tasks" / "post_loan.yaml").read_bytes() == (model / "tasks" / "post_loan.yaml").read_bytes()
    sums = (bundle / "SHA256SUMS").read_text(encoding="utf-8")
    assert f"{sha256_file(bundle / 'tasks' / 'post_loan.yaml')}  tasks/post_loan.yaml" in sums
    verify = json.loads((bundle / "verify.json").read_text(encoding="utf-8"))
    assert verify["tasks"] == {"post_loan": sha256_file(bundle / "tasks" / "post_loan.yaml")}
    assert verify["task_eval"]["tasks"] == ["post_loan"]
    # the ONNX artefact alone (its folder has no spec): the bundle around it carries it
    onnx = bundle / "onnx" / "fp32"
    assert not (onnx / "tasks").exists()
    out = run_banklm("eval", "--model", str(onnx), "--tasks", "post_loan", "--data", str(w / "records.jsonl"),
                     "--out", str(w / "ev_onnx"), "--max-new-tokens", "24", cwd=w)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((w / "ev_onnx" / "results.json").read_text(encoding="utf-8"))
    assert list(res["tasks"]) == ["post_loan"] and res["tasks"]["post_loan"]["n"] == 4


RUN_RECIPE = """\
name: postloan
seed: 0
device: cpu
tasks: {{post_loan: specs/post_loan.yaml}}
corpora:
  root: {root}
  scenario:
    synth: {{credit: {{train: 40, validation: 4, test: 4}}}}
    tables: [{{path: post_loan.csv, task: post_loan, min_test_per_label: 2}}]
tokenizer: {{train: true, vocab_size: 800}}
base:
  build: {{arch: llama, hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 4, intermediate_size: 128}}
train: {{method: full, lr: 1.0e-3, epochs: 1, batch_size: 8, max_length: 384, compile: false}}
eval: {{limit: 4, max_new_tokens: 24, batch_size: 8}}
export: {{gguf: {{enabled: false}}, onnx: {{enabled: true, quant: [fp32]}}, eval_limit: 2}}
"""


@pytest.mark.slow
def test_a_recipe_with_a_spec_task_runs_end_to_end_and_its_export_is_evaluated_without_it(bank):
    """corpus (a post_loan table) -> tokenizer -> base -> train -> eval -> export -> report; the model folder and
    the bundle carry the spec, the card lists it, the run verifies; then the bundle's ONNX model is scored on the
    run's post_loan test records by `banklm eval` without the recipe."""
    pytest.importorskip("onnxruntime")
    from banklm.ledger import Ledger, verify_run

    (bank / "post_loan.csv").write_text(clean_table(60), encoding="utf-8")
    (bank / "r.yaml").write_text(RUN_RECIPE.format(root=bank), encoding="utf-8")
    run = bank / "run"
    out = run_banklm("run", str(bank / "r.yaml"), "--run-dir", str(run), cwd=bank)
    assert out.returncode == 0, out.stderr[-3000:]
    spec_bytes = (bank / "specs" / "post_loan.yaml").read_bytes()
    assert (run / "sft" / "merged" / "tasks" / "post_loan.yaml").read_bytes() == spec_bytes
    assert sorted(p.name for p in (run / "sft" / "merged" / "tasks").iterdir()) == ["credit.yaml", "post_loan.yaml"]
    assert (run / "export" / "tasks" / "post_loan.yaml").read_bytes() == spec_bytes
    assert "tasks/post_loan.yaml" in (run / "export" / "SHA256SUMS").read_text(encoding="utf-8")
    res = json.loads((run / "eval" / "sft" / "results.json").read_text(encoding="utf-8"))
    assert set(res["tasks"]) == {"credit", "post_loan"}
    digest = sha256_file(bank / "specs" / "post_loan.yaml")
    for card in (run / "MODEL_CARD.md", run / "export" / "MODEL_CARD.md"):
        assert f"| `post_loan` | 贷后预警等级 | 本行自定义 | `{digest}` |" in card.read_text(encoding="utf-8")
    entries = {e["stage"]: e for e in Ledger(run).entries()}
    for stage in ("corpus", "train", "eval", "export"):
        assert entries[stage]["params"]["tasks"]["post_loan"]["sha256"] == digest, stage
    assert verify_run(run) == []  # the carried specs are recorded outputs of the stages that wrote them
    out = run_banklm("eval", "--model", str(run / "export" / "onnx" / "fp32"), "--tasks", "post_loan", "--data",
                     str(run), "--out", str(bank / "ev"), "--max-new-tokens", "24", cwd=bank.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    scored = json.loads((bank / "ev" / "results.json").read_text(encoding="utf-8"))
    assert list(scored["tasks"]) == ["post_loan"] and scored["tasks"]["post_loan"]["n"] >= 1
