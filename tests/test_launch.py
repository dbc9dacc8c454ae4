"""recipes/accelerate/*.yaml parse with accelerate's own loaders; scripts/run_recipe.sh builds the launch command."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "run_recipe.sh"
CONFIGS = {"ddp": ("MULTI_GPU", "multi_gpu"), "fsdp": ("FSDP", "use_fsdp"),
           "deepspeed_zero2": ("DEEPSPEED", "use_deepspeed")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_configs_load_and_validate(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = REPO / "recipes" / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))   # raises on unknown keys
    dist_type, flag = CONFIGS[name]
    assert cfg.distributed_type.value == dist_type and cfg.num_processes == 2 and cfg.mixed_precision == "bf16"
    if name == "fsdp":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if name == "deepspeed_zero2":
        assert cfg.deepspeed_config["zero_stage"] == 2
    # what `accelerate launch --config_file ... -m banklm.cli run ...` resolves the file into
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "banklm.cli", "run", "r.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert getattr(args, flag) and args.num_processes == 2 and args.module
    assert args.training_script == "banklm.cli" and args.training_script_args == ["run", "r.yaml"]


def _script(*argv, cwd):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_run_recipe_builds_the_accelerate_command(tmp_path):
    recipe = REPO / "recipes" / "credit_qlora_qwen2.5-1.5b.yaml"
    config = REPO / "recipes" / "accelerate" / "ddp.yaml"
    out = _script("--launch", "accelerate", "--config", str(config), "--dry-run", str(recipe), "train.lr=1e-4",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout.strip())
    assert cmd[:6] == ["accelerate", "launch", "--config_file", str(config), "-m", "banklm.cli"]
    assert cmd[6:9] == ["run", str(recipe), "train.lr=1e-4"]
    # one run folder, chosen once, for every process
    assert cmd[9] == "--run-dir" and cmd[10].startswith("runs/credit_qlora_qwen2.5-1.5b/")
    # a run folder given by the caller is kept as it is
    out = _script("--launch", "accelerate", "--config", str(config), "--dry-run", str(recipe), "--run-dir",
                  "/tmp/r1", cwd=tmp_path)
    assert shlex.split(out.stdout.strip())[6:] == ["run", str(recipe), "--run-dir", "/tmp/r1"]


def test_run_recipe_without_launch_is_unchanged(tmp_path):
    out = _script("--dry-run", str(REPO / "recipes" / "quickstart.yaml"), "train.lr=1e-3", cwd=tmp_path)
    assert out.returncode == 0
    assert shlex.split(out.stdout.strip()) == ["banklm", "run", str(REPO / "recipes" / "quickstart.yaml"),
                                               "train.lr=1e-3"]


@pytest.mark.parametrize("argv, message", [
    (["--launch", "torchrun", "--config", "x.yaml", "r.yaml"], "only 'accelerate'"),
    (["--launch", "accelerate", "r.yaml"], "needs --config"),
    (["--launch", "accelerate", "--config", "/nonexistent.yaml", "r.yaml"], "file not found"),
    (["--config", "recipes/accelerate/ddp.yaml", "r.yaml"], "give --launch accelerate"),
    (["--launch", "accelerate", "--config", "recipes/accelerate/ddp.yaml", "--dry-run", "/nonexistent.yaml"],
     "recipe file not found"),
])
def test_run_recipe_bad_usage_exit_2(argv, message):
    out = _script(*argv, cwd=REPO)
    assert out.returncode == 2 and message in out.stderr


SMALL_RUN = ["corpora.scenario.synth.credit.train=200", "corpora.scenario.synth.aml.train=200",
             "corpora.scenario.synth.audit.train=200", "corpora.scenario.synth.credit.test=4",
             "corpora.scenario.synth.aml.test=4", "corpora.scenario.synth.audit.test=4", "tokenizer.vocab_size=1500",
             "corpora.scenario.synth.credit.validation=20", "corpora.scenario.synth.aml.validation=20",
             "corpora.scenario.synth.audit.validation=20", "corpora.scenario.synth.aml.test_prevalence=0",
             "cpt.enabled=false", "train.method=lora", "train.lr=3e-3", "train.max_steps=4",
             "train.time_budget_s=null", "distill.enabled=false", "eval.limit=4", "eval.robustness=[]",
             "eval.compare=[]", "export.gguf.enabled=false", "export.onnx.enabled=false"]


def _launch(tmp_path, *overrides):
    """The command run_recipe.sh builds for recipes/accelerate/ddp.yaml, run with this venv's accelerate."""
    dry = _script("--launch", "accelerate", "--config", str(REPO / "recipes" / "accelerate" / "ddp.yaml"),
                  "--dry-run", str(REPO / "recipes" / "quickstart.yaml"), *overrides, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    cmd = shlex.split(dry.stdout.strip())
    assert cmd[0] == "accelerate"
    cmd[0] = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


@pytest.mark.slow
def test_banklm_run_under_accelerate_launch_trains_on_every_rank_and_records_once(tmp_path):
    """Two processes (gloo on CPU; NCCL on GPUs): rank 0 builds, evaluates and reports; both train."""
    import json

    from banklm.ledger import Ledger, verify_run

    out = _launch(tmp_path, *SMALL_RUN)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("run folder: ") == 1      # rank 0 speaks for the run
    run_dir = Path(out.stdout.split("run folder: ")[1].split()[0])
    assert run_dir.parent == tmp_path / "runs" / "quickstart"
    entries = Ledger(run_dir).entries()
    assert [(e["stage"], e["status"]) for e in entries] == [
        ("corpus", "done"), ("tokenizer", "done"), ("base", "done"), ("train", "done"), ("eval", "done"),
        ("report", "done")]
    assert entries[3]["params"]["processes"] == 2 and entries[0]["params"].get("processes") is None
    summary = json.loads((run_dir / "sft" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert "[train] rank 1 joins" in out.stderr and out.stderr.count("[eval] running") == 1
    assert (run_dir / "eval" / "sft" / "results.json").is_file() and verify_run(run_dir, check_unrecorded=True) == []


@pytest.mark.slow
def test_a_failure_on_rank_0_stops_every_rank(tmp_path):
    """The tokenizer stage fails on rank 0 (vocabulary too small): rank 1, waiting for its word, exits too."""
    out = _launch(tmp_path, *SMALL_RUN, "tokenizer.vocab_size=1000")
    assert out.returncode != 0
    assert "raise tokenizer.vocab_size" in out.stderr and "rank 0 stopped the run (StageError)" in out.stderr
