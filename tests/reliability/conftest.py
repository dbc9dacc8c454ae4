"""Fixtures of the reliability suite (helpers: relutil.py)."""

from __future__ import annotations

import pytest

from tests.reliability.relutil import banklm, tiny_recipe


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A model folder (tokenizer + 2-layer, 32-wide Llama, safetensors) built in-process in a few seconds.
    Tests copy it before changing anything."""
    from banklm.corpora.synth import generate_records
    from banklm.finetune.models import build_tiny_model
    from banklm.finetune.tokenizer import render_chat, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_model")
    texts = [render_chat(r["messages"]) for t in ("credit", "aml", "audit")
             for r in generate_records(t, 60, seed=0, split="train")]
    tok = train_tokenizer(texts, root / "tokenizer", vocab_size=800)
    return build_tiny_model("llama", tok, root / "model", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                            intermediate_size=64, max_position_embeddings=256)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """``(root, run_dir)`` of one uninterrupted run of the tiny recipe (every stage). Read-only for tests."""
    root = tmp_path_factory.mktemp("reference")
    recipe = tiny_recipe(root / "tiny.yaml")
    run_dir = root / "runs" / "tiny" / "ref"
    out = banklm("run", recipe, "--run-dir", run_dir, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, run_dir
