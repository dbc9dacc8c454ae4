"""PII never leaves: the canaries planted in the private sample corpus appear in no file of a run (datasets,
logs, stats, cards, report, metrics, exports) nor in its console output, and the trained model does not
complete them from their context (a memorisation probe whose power is shown on a model that did memorise)."""

from __future__ import annotations

import json
import shutil

import pytest
from banklm.corpora.ops.pii import find_values_in_files, pii_values

from banklm.evaluation.memorization import canary_contexts, probe_canaries


def _samples(repo):
    folder = repo / "corpora" / "samples" / "private"
    canaries = json.loads((folder / "canaries.json").read_text(encoding="utf-8"))["canaries"]
    texts = [json.loads(line)["text"] for line in (folder / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    return canaries, texts


def test_canary_contexts_find_values_as_written(repo):
    canaries, texts = _samples(repo)
    probes = canary_contexts(texts, canaries, per_canary=2)
    by_type = {}
    for p in probes:
        by_type.setdefault(p["type"], []).append(p)
    assert set(by_type) == {c["type"] for c in canaries}  # every canary is planted, incl. "148-5864-1172"-style
    assert all(len(v) == 2 and all(x["context"].strip() for x in v) for v in by_type.values())


def test_probe_catches_a_model_that_memorised_a_canary(tiny_model, tmp_path):
    """Power of the probe: train the tiny model on text repeating one canary; the probe must flag it, and not
    flag a canary the model never saw."""
    from banklm.finetune.models import load_model_and_tokenizer
    from banklm.finetune.sft import train_causal_lm
    from datasets import Dataset

    seen = {"type": "PHONE", "value": "14858641172"}
    unseen = {"type": "PHONE", "value": "13912345678"}
    texts = [f"借款人上官婉清的手机号码是{seen['value']}，请核实。"] * 64
    base = shutil.copytree(tiny_model, tmp_path / "base")
    train_causal_lm(base, Dataset.from_dict({"text": texts}), None, tmp_path / "cpt", mode="cpt", method="full",
                    lr=1e-2, max_steps=60, batch_size=8, max_length=64, warmup_ratio=0.0, scheduler="constant",
                    packing=False, device="cpu", logging_steps=10, tensorboard=False)
    model, tok = load_model_and_tokenizer(tmp_path / "cpt" / "merged", device="cpu")
    probes = canary_contexts(texts[:1] + [f"借款人上官婉清的手机号码是{unseen['value']}，请核实。"], [seen, unseen],
                             per_canary=1)
    rows = probe_canaries(model, tok, probes, chat=False)
    assert [(r["completed"], r["prefix_chars"] == r["value_chars"]) for r in rows] == [(True, True), (False, False)]
    assert "value" not in rows[0] and "context" not in rows[0]  # results never repeat the value


@pytest.mark.slow
def test_no_canary_or_other_private_value_leaves_the_run(quickstart_run, repo):
    _, run_dir, out = quickstart_run
    canaries, texts = _samples(repo)
    values = pii_values(texts) | {c["value"] for c in canaries}
    assert len(values) > 1000
    assert find_values_in_files(run_dir, values) == []  # datasets, logs, stats, card, report, metrics, GGUF
    console = out.stdout + out.stderr
    assert [v[:2] for v in values if v in console] == []
    # the pipeline really carried the private corpus: placeholders where the values were
    data = b"".join(p.read_bytes() for p in (run_dir / "corpora" / "private" / "data").rglob("*.arrow"))
    assert b"<ID_CARD>" in data and b"<PHONE>" in data and b"<PERSON>" in data


@pytest.mark.slow
def test_trained_model_does_not_complete_canaries(quickstart_run, repo):
    """The quickstart trains on the de-identified private text (continued pre-training) then fine-tunes: given
    the text that preceded each canary in the raw records, neither model continues with the canary."""
    from banklm.finetune.models import load_model_and_tokenizer

    _, run_dir, _ = quickstart_run
    canaries, texts = _samples(repo)
    probes = canary_contexts(texts, canaries, per_canary=3)
    assert len(probes) == 3 * len(canaries)
    for model_dir in (run_dir / "cpt" / "merged", run_dir / "sft" / "merged"):
        model, tok = load_model_and_tokenizer(model_dir, device="cpu")
        rows = probe_canaries(model, tok, probes)
        assert len(rows) == 2 * len(probes)
        assert [r["type"] for r in rows if r["completed"]] == [], model_dir.name
        # not even half of any value (a region code or a phone prefix alone identifies no one)
        assert max(r["prefix_chars"] / r["value_chars"] for r in rows) < 0.5, model_dir.name


def test_quarantined_identifier_lines_cannot_be_recovered_by_enumeration(tmp_path, monkeypatch):
    """A quarantined line that is only a mobile number: an attacker who enumerates the number space and hashes
    each candidate finds it from a plain SHA-256 digest in a second, but not from the keyed digest the
    quarantine file holds (neither without the key nor with another run's per-run secret)."""
    import hashlib
    import hmac

    from banklm.corpora.ops.pii import QUARANTINE_DIGEST_CONTEXT, scrub_jsonl

    secret_line = b"13912345678"
    src = tmp_path / "in.jsonl"
    src.write_bytes(secret_line + b"\n")  # valid JSON, not an object: quarantined
    candidates = [f"139123{n:05d}".encode() for n in range(100_000)]

    def attack(digest: str, hash_fn) -> bytes | None:
        return next((c for c in candidates if hash_fn(c) == digest), None)

    assert attack(hashlib.sha256(secret_line).hexdigest(), lambda c: hashlib.sha256(c).hexdigest()) == secret_line

    monkeypatch.delenv("BANKLM_PII_KEY", raising=False)
    scrub_jsonl(src, tmp_path / "out.jsonl")
    digest = json.loads((tmp_path / "out.quarantine.jsonl").read_text(encoding="utf-8"))["line_hmac"]
    assert attack(digest, lambda c: hashlib.sha256(c).hexdigest()) is None
    assert attack(digest, lambda c: hmac.new(b"", c, hashlib.sha256).hexdigest()) is None

    monkeypatch.setenv("BANKLM_PII_KEY", "bank-secret")
    scrub_jsonl(src, tmp_path / "keyed.jsonl")
    keyed = json.loads((tmp_path / "keyed.quarantine.jsonl").read_text(encoding="utf-8"))["line_hmac"]
    wrong = hmac.new(b"guess", QUARANTINE_DIGEST_CONTEXT, hashlib.sha256).digest()
    assert attack(keyed, lambda c: hmac.new(wrong, c, hashlib.sha256).hexdigest()) is None
    right = hmac.new(b"bank-secret", QUARANTINE_DIGEST_CONTEXT, hashlib.sha256).digest()
    assert attack(keyed, lambda c: hmac.new(right, c, hashlib.sha256).hexdigest()) == secret_line  # the key holder can
