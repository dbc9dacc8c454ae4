"""Helpers of the reliability suite (plain functions; the fixtures are in conftest.py).

* :func:`tiny_recipe` writes a recipe that runs every stage (corpus -> tokenizer -> base -> train -> eval
  -> export -> report) in about a minute on two busy CPU cores.
* :func:`banklm` runs the real CLI in a subprocess; :func:`banklm_killed_at` runs it under
  ``killer.py``, which SIGKILLs the process at a named function call (a test-only harness: no fault
  hook lives in banklm itself).
* :func:`in_private_mount` runs a command in a private mount namespace (``unshare``) with a tiny tmpfs
  or a read-only bind mount, for real disk-full / read-only checks without touching the host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
KILLER = Path(__file__).with_name("killer.py")

# every stage, tiny: 32-wide 2-layer Llama, 8 optimizer steps with a checkpoint every 2
TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "corpora": {"scenario": {"synth": {t: {"train": 40, "validation": 4, "test": 4} for t in ("credit", "aml", "audit")}}},
    "tokenizer": {"train": True, "vocab_size": 1000},
    "base": {"build": {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
                       "intermediate_size": 64, "max_position_embeddings": 256}},
    "train": {"method": "full", "lr": 1.0e-3, "max_steps": 8, "batch_size": 4, "max_length": 128,
              "logging_steps": 1, "save_steps": 2, "keep_checkpoints": 2},
    "eval": {"limit": 2, "batch_size": 8, "max_new_tokens": 16, "retention": False},
    "export": {"gguf": {"quant": ["f16"]}},
}


def deep_update(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_recipe(path: Path, **over) -> Path:
    """Write the tiny recipe (sections in ``over`` merged into it; ``None`` removes a key) to ``path``."""
    data = deep_update(TINY, over)
    data = {k: v for k, v in data.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def base_path_recipe(path: Path, model_dir: Path, **over) -> Path:
    """The tiny recipe starting from a local model folder (``base.path``) instead of building one."""
    data = deep_update({k: v for k, v in TINY.items() if k not in ("tokenizer", "base")}, over)
    data["base"] = {"path": str(model_dir), **over.get("base", {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env.update(extra or {})
    return env


def banklm(*args, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``banklm ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "banklm.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=_env(env), timeout=timeout)


def banklm_killed_at(target: str, when: str, nth: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    """``banklm ARGS``, SIGKILLed ``when`` ("before"/"after") the ``nth`` call of ``target``
    (``package.module:function`` or ``package.module:Class.method``). See killer.py."""
    return subprocess.run([sys.executable, str(KILLER), target, when, str(nth), "--", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=_env(), timeout=900)


def banklm_frozen_at(target: str, when: str, nth: int, *args, cwd: Path) -> subprocess.Popen:
    """``banklm ARGS`` in the background, frozen (SIGSTOP) at a call of ``target``; the caller kills it."""
    return subprocess.Popen([sys.executable, str(KILLER), target, when, str(nth), "STOP", "--", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=_env())


# ----------------------------------------------------------------------------------------- temporaries

TEMP_RE = re.compile(r"^\.(.+?)\.(?:(tmp|old|src)-\d+(?:\.\w+)?|[^.]+\.tmp)$")


def temp_leftovers(root: Path) -> list[str]:
    """banklm.io temporaries (and checkpoints) under ``root``: none may survive a completed run."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if TEMP_RE.match(p.name) or re.match(r"^checkpoint-\d+$", p.name))


# ----------------------------------------------------------------------------------------- mounts

def _can(cmd: list[str]) -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def unshare_prefix() -> list[str] | None:
    """``unshare`` arguments giving a private mount namespace in which mounting is allowed, or None.

    Root: a mount namespace. Other users: a user namespace too (``-r``), where tmpfs and bind mounts
    are allowed when the kernel permits unprivileged user namespaces.
    """
    for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        if _can([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                                      "mount -t tmpfs -o size=64k tmpfs /tmp"]):
            return prefix
    return None


def in_private_mount(setup: str, args: list, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``setup`` (shell mount commands) then ``banklm ARGS`` in a private mount namespace."""
    prefix = unshare_prefix()
    assert prefix is not None
    cli = " ".join(_sh_quote(str(a)) for a in [sys.executable, "-m", "banklm.cli", *args])
    return subprocess.run([*prefix, "sh", "-c", f"{setup} && exec {cli}"], capture_output=True, text=True,
                          cwd=cwd, env=_env(), timeout=900)


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


# ----------------------------------------------------------------------------------------- ledger

def ledger_stages(run_dir: Path) -> list[tuple[str, str]]:
    import json

    path = run_dir / "ledger.jsonl"
    if not path.exists():
        return []
    return [(e["stage"], e["status"]) for e in map(json.loads, path.read_text(encoding="utf-8").splitlines())]
