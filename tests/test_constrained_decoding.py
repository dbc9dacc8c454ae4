"""Constrained decoding on every runtime: PyTorch (``model.generate`` with the grammar's logits processor, and
banklm's greedy loops), ONNX (banklm's loop) and llama.cpp (its own grammar sampler on the same GBNF) give the
same tokens; a random tiny model writes garbage freely but only well-formed answers citing the prompt's numbers
under the grammar; forced answer prefixes (scored labels) are kept; the decoding is recorded in results, the
stage parameters and verify.json; the export bundle carries each task's grammar, checksummed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from banklm.corpora.synth import generate_records
from banklm.export.bundle import build_export, check_sha256sums
from banklm.export.gguf import export_gguf
from banklm.export.ollama import UNCONSTRAINED_NOTE
from banklm.export.onnx import export_onnx
from banklm.finetune.models import build_tiny_model
from banklm.finetune.tokenizer import IM_END, load_tokenizer

from banklm.evaluation.constrained import GrammarError, GrammarMask
from banklm.evaluation.evaluate import answer_prefix, evaluate_records
from banklm.evaluation.generate import generate
from banklm.modelcard import _artefacts, _Lang, decoding_rows
from banklm.recipe import load_recipe
from banklm.report import render_export_section
from banklm.runtime import LlamaCppLM, OnnxCausalLM, TorchLM, generate_chat, llama_cpp_available
from banklm.stages import STAGES
from banklm.tasks import get_task
from banklm.tasks.base import iter_user_messages
from banklm.tasks.formats import read_numbers
from banklm.tasks.grammar import answer_grammar, citable_values, task_grammar, task_units
from tests.export_models import sharpen, spm_tokenizer
from tests.helpers import require_llama_cpp

TASKS = ("credit", "aml", "audit")
STEPS = 48  # tokens compared per prompt across runtimes


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("constrained")


@pytest.fixture(scope="module")
def model_dir(work):
    """A sharpened random 2-layer Llama (SentencePiece with byte fallback: most Chinese characters of the task
    prompts are byte tokens), with room for the long task prompts."""
    tok = spm_tokenizer(work / "tok")
    d = Path(build_tiny_model("llama", tok, work / "m", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=128, max_position_embeddings=1024, tie_word_embeddings=True, seed=1))
    sharpen(d, seed=2)
    return d


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def torch_lm(model_dir, tok):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return TorchLM(m, pad_id=tok.pad_token_id or 0)


@pytest.fixture(scope="module")
def records():
    return [r for t in TASKS for r in generate_records(t, 17, 5, "test", difficulty=0.5)][:50]


@pytest.fixture(scope="module")
def prompts(records, tok):
    """(conversations, grammars, HF prompt ids, EOS ids) of the 50 records."""
    convs = [iter_user_messages(r) for r in records]
    grammars = [answer_grammar(get_task(r["task"]), c) for r, c in zip(records, convs, strict=True)]
    ids = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in convs]
    return convs, grammars, ids, [tok.convert_tokens_to_ids(IM_END)]


@pytest.fixture(scope="module")
def torch_constrained(torch_lm, prompts, tok):
    _, grammars, ids, eos = prompts
    return torch_lm.greedy(ids, STEPS, eos, batch_size=50, grammars=grammars, tokenizer=tok)


@pytest.fixture(scope="module")
def ggufs(work, model_dir):
    files = export_gguf(model_dir, work / "gguf", quant=("f32", "f16"), name="tiny")
    return dict(zip(("f32", "f16"), files, strict=True))


@pytest.fixture(scope="module")
def gguf(ggufs):
    return ggufs["f16"]


def _divergence(torch_lm, tok, prompt, grammar, eos, a, b) -> tuple[int, float]:
    """Where two constrained outputs first differ, and PyTorch's logit gap there between its token and the other
    (which must be one the grammar allows)."""
    k = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    mask = GrammarMask(tok, [grammar], eos)
    mask.force(0, a[:k])
    logits = torch.from_numpy(torch_lm.logits([*prompt, *a[:k]])[-1:].copy())
    masked = mask.apply(logits)[0]
    assert torch.isfinite(masked[b[k]]), f"llama.cpp took token {b[k]}, which the grammar mask forbids"
    return k, float(masked[a[k]] - masked[b[k]])


def _ties(torch_lm, tok, ids, grammars, eos, ref, got) -> list[int]:
    """Where ``got`` differs from ``ref`` (PyTorch's), each difference checked to be a numerical tie."""
    ties = []
    for p, g, a, b in zip(ids, grammars, ref, got, strict=True):
        if a != b:
            k, gap = _divergence(torch_lm, tok, p, g, eos, a, b)
            assert abs(gap) < 1e-2, f"outputs differ at token {k} with a logit gap of {gap:.4f}"
            ties.append(k)
    return ties


def test_pytorch_masked_greedy_equals_llama_cpp_grammar_sampler(torch_lm, tok, prompts, torch_constrained, ggufs):
    """50 prompts, token ids compared: the GBNF in llama.cpp's sampler and llguidance's mask decode alike. A prompt
    may differ only where llama.cpp's arithmetic (f16 weights, its f16 KV cache) flips a numerical tie: a logit
    gap under 0.01 between two tokens the grammar allows (1-2 of 50 prompts here; a grammar that means something
    else in llama.cpp differs in nearly every prompt, within its first tokens)."""
    require_llama_cpp()
    _, grammars, ids, eos = prompts
    for t, path in ggufs.items():
        with LlamaCppLM(path, n_ctx=1024) as lm:
            assert [lm.tokenize(tok.decode(p, skip_special_tokens=False)) for p in ids[:5]] == ids[:5]
            got = lm.greedy(ids, STEPS, eos, grammars=grammars)
        assert len(_ties(torch_lm, tok, ids, grammars, eos, torch_constrained, got)) <= 5, t
    assert all(len(a) > 10 for a in torch_constrained)
    # a stop id llama.cpp does not take for end-of-generation (a control token) ends an answer only once it is
    # complete, as the mask's EOS ids do
    stop = [*eos, tok.convert_tokens_to_ids("<|im_start|>")]
    ref = torch_lm.greedy(ids[:10], STEPS, stop, batch_size=10, grammars=grammars[:10], tokenizer=tok)
    with LlamaCppLM(ggufs["f32"], n_ctx=1024) as lm:
        got = lm.greedy(ids[:10], STEPS, stop, grammars=grammars[:10])
        with pytest.raises(GrammarError):  # a malformed grammar fails in llama.cpp
            lm.greedy(ids[:1], 4, eos, grammars=['root ::= "a" | ('])
    assert len(_ties(torch_lm, tok, ids[:10], grammars[:10], stop, ref, got)) <= 1


@pytest.fixture(scope="module")
def onnx_fp32(work, model_dir):
    return export_onnx(model_dir, work / "onnx", quant=("fp32",))[0]


def test_onnx_masked_greedy_equals_pytorch(onnx_fp32, tok, prompts, torch_constrained):
    _, grammars, ids, eos = prompts
    lm = OnnxCausalLM(onnx_fp32)
    assert lm.greedy(ids, STEPS, eos, batch_size=16, grammars=grammars, tokenizer=tok) == torch_constrained
    with pytest.raises(ValueError, match="tokenizer"):
        lm.greedy(ids[:1], 4, eos, grammars=grammars[:1])


def test_constrained_answers_are_well_formed_and_cite_only_the_prompt(work, model_dir, tok, records):
    """A random model that favours digits writes garbage full of numbers when free; under the grammar every answer
    parses strictly and cites numbers only as its prompt writes them (unit included)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    digits = [i for i in range(len(tok)) if any(c.isdigit() for c in tok.decode([i]))]

    class NumberHappy(type(model)):  # every digit token 8 logits up: the model wants to write numbers
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits[..., digits] += 8.0
            return out

    model.__class__ = NumberHappy
    recs = [r for t in TASKS for r in [x for x in records if x["task"] == t][:5]]
    free = evaluate_records(model, tok, recs, work / "free", max_new_tokens=24, batch_size=16)
    res = evaluate_records(model, tok, recs, work / "constrained", max_new_tokens=256, batch_size=16,
                           decoding="constrained")
    assert free["decoding"] == "free" and res["decoding"] == "constrained"
    assert free["overall"]["format_compliance"] == 0.0
    assert json.loads((work / "constrained" / "results.json").read_text())["decoding"] == "constrained"
    for task, r in res["tasks"].items():
        assert r["format_compliance"] == 1.0 and r["parse_rate"] == 1.0, task
        assert r["unsupported_number_rate"] == 0.0, task
    preds = [json.loads(x) for x in (work / "constrained" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["strict_format"] and not p["unsupported_numbers"] for p in preds)
    # the labels are label scoring's choice (the most probable allowed combination), the rest generated after them
    assert res["label_scoring"] == {"used": True}
    for p in preds:
        assert p["pred_label"] == p["scored_label"] and 0.0 < p["scored_confidence"] <= 1.0
        combos = p["label_scores"]["combos"]
        assert abs(sum(pr for _, pr in combos) - 1.0) < 1e-4
        assert max(combos, key=lambda c: c[1])[0] == {k: p["parsed"][k] for k in combos[0][0]}
    cited = 0
    for p, r in zip(preds, recs, strict=True):
        reason = p["parsed"][get_task(p["task"]).reason_key]
        prompt = "\n".join(m["content"] for m in iter_user_messages(r))
        for m in read_numbers(reason, task_units(get_task(p["task"]))):
            cited += 1
            assert m.text in prompt or m.value in citable_values(get_task(p["task"])), (m.text, reason)
    assert cited >= len(recs)


def test_forced_prefix_is_kept_on_every_runtime(work, onnx_fp32, tok, torch_lm, records, gguf):
    """Labels imposed as the answer's start (label scoring's hook): the answer begins with them, the rest is
    generated under the grammar, and parses to exactly those labels."""
    recs = [next(r for r in records if r["task"] == t) for t in TASKS]
    convs = [iter_user_messages(r) for r in recs]
    grammars = [answer_grammar(get_task(r["task"]), c) for r, c in zip(recs, convs, strict=True)]
    labels = [{k: get_task(r["task"]).values_of(k)[-1] for k in get_task(r["task"]).categorical_keys} for r in recs]
    prefixes = [answer_prefix(get_task(r["task"]), lab) for r, lab in zip(recs, labels, strict=True)]
    assert prefixes[0].endswith("；理由：")
    eos = [tok.convert_tokens_to_ids(IM_END)]
    outs = {"generate": list(generate(torch_lm.model, tok, convs, 256, 8, grammars=grammars, prefixes=prefixes)),
            "torch": list(generate_chat(torch_lm, tok, convs, eos, 256, grammars=grammars, prefixes=prefixes)),
            "onnx": list(generate_chat(OnnxCausalLM(onnx_fp32), tok, convs, eos, 256,
                                       grammars=grammars, prefixes=prefixes))}
    if llama_cpp_available():
        with LlamaCppLM(gguf, n_ctx=1024) as lm:
            outs["llama.cpp"] = list(generate_chat(lm, tok, convs, eos, 256, grammars=grammars, prefixes=prefixes))
    for runtime, answers in outs.items():
        for r, lab, pre, ans in zip(recs, labels, prefixes, answers, strict=True):
            assert ans.startswith(pre), (runtime, ans)
            parsed = get_task(r["task"]).parse(ans, strict=True)
            assert parsed and all(parsed[k] == v for k, v in lab.items()), (runtime, ans)
    assert outs["torch"] == outs["onnx"] == outs["generate"]
    bad = [prefixes[0].replace(labels[0]["decision"], "同意")]  # not a declared value
    with pytest.raises(GrammarError):
        generate_chat(torch_lm, tok, convs[:1], eos, 8, grammars=grammars[:1], prefixes=bad)
    if llama_cpp_available():
        with LlamaCppLM(gguf, n_ctx=1024) as lm, pytest.raises(GrammarError):
            generate_chat(lm, tok, convs[:1], eos, 8, grammars=grammars[:1], prefixes=bad)
    # the evaluation's hook: labels per record (a dict is rendered as the answer's start)
    res = evaluate_records(torch_lm.model, tok, recs, work / "prefixed", max_new_tokens=256, fold_inputs=False,
                           decoding="constrained", label_prefixes=lambda shown: labels)
    preds = [json.loads(x) for x in (work / "prefixed" / "predictions.jsonl").read_text().splitlines()]
    assert [p["output"] for p in preds] == outs["torch"] and res["overall"]["format_compliance"] == 1.0
    with pytest.raises(ValueError, match="constrained"):
        evaluate_records(torch_lm.model, tok, recs, work / "x", label_prefixes=labels)


def test_generation_continues_from_label_scorings_prefill(work, torch_lm, tok, records):
    """Constrained evaluation on PyTorch runs each prompt through the model once: generation continues from label
    scoring's KV cache. Its answers equal decoding the scored prefixes from scratch, and a cache whose tokens
    disagree with the generated sequence (a row re-tokenized differently) is reused only where they agree."""
    from banklm.evaluation.generate import PromptCache
    from banklm.evaluation.labelscore import score_label_batches

    model = torch_lm.model
    recs = [r for r in records if r["task"] == "credit"][:6]
    convs = [iter_user_messages(r) for r in recs]
    grammars = [answer_grammar(get_task("credit"), c) for c in convs]
    ((idx, scores, cache),) = list(score_label_batches(model, tok, "credit", convs, batch_size=8, fold_inputs=False))
    assert sorted(idx) == list(range(6)) and isinstance(cache, PromptCache) and len(cache.ids) == 6
    order = [convs[i] for i in idx]
    prefixes = [s["prefix"] for s in scores]
    kw = {"grammars": [grammars[i] for i in idx], "prefixes": prefixes}
    widths: list[int] = []  # tokens the first forward pass of each generate call runs

    def first_pass(module, args, kwargs):
        if not widths or widths[-1] is None:
            widths[-1:] = [kwargs["input_ids"].shape[1]]

    hook = model.register_forward_pre_hook(first_pass, with_kwargs=True)
    try:
        runs = []
        for c in (None, cache):
            widths.append(None)
            runs.append(list(generate(model, tok, order, 64, 6, prompt_cache=c, **kw)))
        # row 0's cached tokens changed after its fourth token: only positions every row agrees on are reused
        broken = PromptCache([cache.ids[0][:4] + [t + 1 for t in cache.ids[0][4:]], *cache.ids[1:]], cache.past)
        widths.append(None)
        runs.append(list(generate(model, tok, order, 64, 6, prompt_cache=broken, **kw)))
    finally:
        hook.remove()
    fresh = runs[0]
    assert runs[1] == fresh and runs[2] == fresh
    longest_ctx = max(len(x) for x in cache.ids)
    assert widths[1] < widths[0] - min(len(x) for x in cache.ids) + 8  # the prompts were not run again
    assert widths[1] < widths[2] < widths[0] and widths[0] > longest_ctx
    with pytest.raises(ValueError, match="one batch"):
        generate(model, tok, order, 64, 3, prompt_cache=cache, **kw)
    # the evaluation: one pass per prompt gives the answers of label scoring then decoding from scratch
    res = evaluate_records(model, tok, recs, work / "once", max_new_tokens=64, fold_inputs=False,
                           decoding="constrained", robustness=("shuffle_fields",))
    shuffled = res["robustness"]["shuffle_fields"]  # the perturbed prompts are label-scored too
    assert shuffled["n"] == 6 and shuffled["accuracy"] is not None
    got = [json.loads(x) for x in (work / "once" / "predictions.jsonl").read_text().splitlines()]
    assert res["label_scoring"] == {"used": True}
    by_row = dict(zip(idx, fresh, strict=True))
    assert [p["output"] for p in got] == [by_row[i] for i in range(6)]
    assert [p["scored"] for p in got] == [dict(scores[idx.index(i)]["chosen"]) for i in range(6)]


def test_a_task_whose_labels_cannot_be_scored_is_decoded_under_its_grammar(work, torch_lm, tok, records,
                                                                           monkeypatch):
    """Label scoring refuses a task (too many combinations without rules): its answers are decoded under the
    grammar from the start, the others scored as usual, and the results say which task was skipped and why."""
    import banklm.evaluation.evaluate as ev

    real = ev.score_label_batches

    def refuse_aml(model, tokenizer, task, *a, **kw):
        if task.name == "aml":
            raise ValueError("aml: too many label combinations")
        return real(model, tokenizer, task, *a, **kw)

    monkeypatch.setattr(ev, "score_label_batches", refuse_aml)
    recs = [r for t in ("credit", "aml") for r in [x for x in records if x["task"] == t][:4]]
    res = evaluate_records(torch_lm.model, tok, recs, work / "skip", max_new_tokens=96, fold_inputs=False,
                           decoding="constrained")
    assert res["label_scoring"] == {"used": True, "skipped": {"aml": "aml: too many label combinations"}}
    preds = [json.loads(x) for x in (work / "skip" / "predictions.jsonl").read_text().splitlines()]
    assert {p["task"] for p in preds} == {"credit", "aml"}
    assert all(("scored" in p) == (p["task"] == "credit") for p in preds)
    assert all(p["strict_format"] for p in preds)


def test_models_scored_on_the_same_records_share_their_grammars(work, model_dir, torch_lm, records):
    """The eval stage scores several models on the same records: the second copies the grammars' fresh matchers
    the first built (tokenizers loaded from the same files share one matcher view) and answers exactly as
    without the cache; a full cache builds the rest each time."""
    from banklm.evaluation.constrained import GrammarCache, _ll_tokenizer

    recs = [r for t in TASKS for r in [x for x in records if x["task"] == t][:3]]
    tok_a, tok_b = load_tokenizer(model_dir), load_tokenizer(model_dir)
    assert _ll_tokenizer(tok_a, len(tok_a), (5,)) is _ll_tokenizer(tok_b, len(tok_b), (5,))
    plain = evaluate_records(torch_lm.model, tok_a, recs, work / "plain", max_new_tokens=48, fold_inputs=False,
                             decoding="constrained")
    cache = GrammarCache()
    runs = [evaluate_records(torch_lm.model, t, recs, work / f"cached{i}", max_new_tokens=48, fold_inputs=False,
                             decoding="constrained", grammar_cache=cache) for i, t in enumerate((tok_a, tok_b))]
    assert cache.built == len(recs) and cache.copied == len(recs) and len(cache.texts) == len(recs)
    outs = [[json.loads(x)["output"] for x in (work / d / "predictions.jsonl").read_text().splitlines()]
            for d in ("plain", "cached0", "cached1")]
    assert outs[0] == outs[1] == outs[2] and all(r["tasks"] == plain["tasks"] for r in runs)
    small = GrammarCache(max_matchers=2)
    evaluate_records(torch_lm.model, tok_a, recs, work / "small", max_new_tokens=48, fold_inputs=False,
                     decoding="constrained", grammar_cache=small)
    evaluate_records(torch_lm.model, tok_a, recs, work / "small", max_new_tokens=48, fold_inputs=False,
                     decoding="constrained", grammar_cache=small)
    assert small.copied == 2 and small.built == 2 * len(recs) - 2


def test_a_prepared_grammar_masks_as_its_text_and_serves_once(tok, prompts):
    """Grammars prepared ahead (a worker thread builds them while the model runs) mask exactly as their GBNF text;
    a prepared matcher serves one mask, a mask for another vocabulary size builds its own."""
    from banklm.evaluation.constrained import PreparedGrammar

    _, grammars, _, eos = prompts
    ready = [PreparedGrammar(tok, g, eos) for g in grammars[:3]]
    a, b = GrammarMask(tok, ready, eos), GrammarMask(tok, grammars[:3], eos)
    assert all(r.matcher is None for r in ready)
    assert (a.allowed() == b.allowed()).all()
    wide = PreparedGrammar(tok, grammars[0], eos, vocab_size=len(tok) + 64)
    c = GrammarMask(tok, [wide], eos)
    assert wide.matcher is not None and (c.allowed() == b.allowed()[:1]).all()  # c: the tokenizer's own size
    a.reset()  # new matchers from the prepared texts
    assert (a.allowed() == b.allowed()).all()


def test_decoding_is_a_recorded_eval_param(repo, monkeypatch):
    r = load_recipe(repo / "recipes" / "quickstart.yaml", ["eval.decoding=free"])
    stages = {s.name: s for s in STAGES}
    assert stages["eval"].params(r)["eval"]["decoding"] == "free"  # the ledger's params: the reuse key
    assert stages["export"].params(r)["eval"]["decodings"] == ["free", "constrained"]
    default = load_recipe(repo / "recipes" / "quickstart.yaml")
    assert default.eval.decoding == "constrained"  # the default: as accurate as free decoding, no invented numbers
    assert stages["export"].params(default)["eval"]["decodings"] == ["constrained", "free"]
    from banklm import cli

    seen = {}
    monkeypatch.setattr(cli, "_run_pipeline", lambda args, upto=None: seen.setdefault("o", args.overrides) and 0)
    assert cli.main(["eval", str(repo / "recipes" / "quickstart.yaml"), "--decoding", "free"]) == 0
    assert seen["o"] == ["eval.decoding=free"]


def test_bundle_grammars_checksums_and_both_decodings(work, model_dir, tok, records):
    out = work / "bundle" / "export"
    recs = [next(r for r in records if r["task"] == t) for t in TASKS]
    prompt = tok.apply_chat_template(iter_user_messages(recs[0]), tokenize=False, add_generation_prompt=True)
    summary = build_export(model_dir, out, name="tiny", prompts=[prompt], gguf_quant=("f16",), records=recs,
                           eval_max_new_tokens=24, tasks=list(TASKS), decodings=("constrained", "free"))
    for t in TASKS:
        assert (out / "grammar" / f"{t}.gbnf").read_text() == task_grammar(get_task(t))
        assert summary["grammars"][t]["file"] == f"export/grammar/{t}.gbnf"
    sums = (out / "SHA256SUMS").read_text()
    assert all(f"  grammar/{t}.gbnf\n" in sums for t in TASKS) and check_sha256sums(out) == []
    mf = (out / "gguf" / "tiny-f16.Modelfile").read_text()
    assert mf.startswith("FROM ./tiny-f16.gguf\n# Answers served by Ollama are NOT grammar-constrained")
    assert all(f"# {line}" in mf for line in UNCONSTRAINED_NOTE.splitlines())
    verify = json.loads((out / "verify.json").read_text())
    assert verify["task_eval"]["decoding"] == "constrained"
    for where in ("eval/pytorch", "eval/gguf-f16"):
        assert json.loads((out / where / "results.json").read_text())["decoding"] == "constrained"
        assert json.loads((out / where / "free" / "results.json").read_text())["decoding"] == "free"
    te = verify["gguf"][0]["task_eval"]
    assert set(te["by_decoding"]) == {"constrained", "free"} and te["decoding"] == "constrained"
    assert te["by_decoding"]["free"]["results"] == "export/eval/gguf-f16/free/results.json"
    headers, rows = decoding_rows({"export": verify})
    assert [r[:2] for r in rows] == [[m, t] for m in ("PyTorch", "gguf f16") for t in sorted(TASKS)]
    assert headers[2:4] == ["accuracy (free)", "accuracy (constrained)"]
    by = verify["task_eval"]["pytorch"]["by_decoding"]
    for r in rows[:3]:  # accuracy, format compliance, unsupported-number rate: free then constrained
        assert r[2:] == [by[d]["tasks"][r[1]][k] for k in ("accuracy", "format_compliance", "unsupported_number_rate")
                         for d in ("free", "constrained")]
    html = render_export_section({"export": verify, "run_dir": out.parent})
    assert "Free vs constrained decoding (3 test records)" in html
    card = "\n".join(_artefacts({"export": verify, "entries": [], "run_dir": out.parent}, _Lang("en")))
    assert all(f"| export/grammar/{t}.gbnf |" in card for t in TASKS)  # the bundle card's artefact list
