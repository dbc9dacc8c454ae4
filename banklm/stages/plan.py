"""`banklm plan`: the recipe's training settings as a memory-plan request (banklm.finetune.plan)."""

from __future__ import annotations

from banklm.distill.student import pick_layers
from banklm.distill.teacher_cache import CACHE_BATCH_ROWS
from banklm.finetune.plan import (
    PlanError,
    resolve_base,
    teacher_pass_bytes,
    teacher_weight_bytes,
    training_setup,
)
from banklm.recipe import Recipe


def _build_config(b, vocab_size: int) -> dict:
    return {"model_type": b.arch, "hidden_size": b.hidden_size, "num_hidden_layers": b.num_layers,
            "num_attention_heads": b.num_heads, "num_key_value_heads": b.num_kv_heads,
            "intermediate_size": b.intermediate_size, "vocab_size": vocab_size,
            "tie_word_embeddings": b.tie_word_embeddings}


def plan_request(r: Recipe, section: str | None = None) -> dict:
    """What ``banklm plan RECIPE`` plans, as plain values: the model, the section's settings (``train`` by
    default, ``cpt`` when only it is enabled, or ``distill``: the student's training) and the recipe's target
    card (``plan.gpu_mem``). For ``distill`` also the teacher: its model, bits, and whether it runs live next
    to the student (logit KD without a top-k cache) or in a pass of its own before the student trains."""
    section = section or ("cpt" if r.cpt.enabled and not r.train.enabled else "train")
    if section == "distill" and not r.distill.enabled:
        raise ValueError("--section distill: the recipe's distill.enabled is false")
    p = r.distill.train if section == "distill" else getattr(r, section)
    if r.base.build is not None:
        model = {"config": _build_config(r.base.build, r.tokenizer.vocab_size), "name": f"{r.name} base.build"}
    else:
        model = {"path": r.base.path, "config_name": r.plan.config}
    # no batch layout builds a mask: flat rows use varlen attention, padded rows plain causal
    setup = {**training_setup(p.to_config()), "packing": False}
    req = {"section": section, "model": model, "setup": setup, "gpu_mem": r.plan.gpu_mem}
    if section == "distill":
        d = r.distill
        teacher = {"path": d.teacher.path, "config_name": None} if d.teacher.path else model
        st = d.student
        if st.from_ == "path":
            student = {"path": st.path, "config_name": r.plan.student_config}
        elif st.from_ == "build":
            student = {"config": _build_config(st.build, 0), "name": f"{r.name} distill.student.build",
                       "vocab_from_teacher": True}
        else:
            student = {"from_teacher": {"every": st.every, "layers": st.layers,
                                        "intermediate_size": st.intermediate_size}}

        live = d.method == "logit" and d.kd.top_k is None
        if d.method == "logit":   # KD compares whole distributions: the student's full logits, no fused head
            setup["loss"] = "full"
        bits = {"4bit": 4, "8bit": 8}.get(d.teacher.quantization or "")
        req.update(model=student, teacher={"model": teacher, "bits": bits, "live": live,
                                           "pass_batch": d.seq.batch_size if d.method == "seq" else CACHE_BATCH_ROWS,
                                           "pass_seq": p.max_length, "generate": d.method == "seq"})
    return req


def _resolve_model(spec: dict, name: str):
    """``banklm.finetune.plan.resolve_base`` of a model spec from :func:`plan_request` -> (shape, source)."""

    return resolve_base(path=spec.get("path"), config_name=spec.get("config_name"), config=spec.get("config"),
                        name=spec.get("name", name))


def plan_shape(req: dict):
    """The shape ``banklm plan`` plans for a recipe section: the base, or for ``distill`` the student."""
    from dataclasses import replace


    m = req["model"]
    teacher = req.get("teacher")
    if teacher is None:
        return _resolve_model(m, "model")
    t_shape, t_source = _resolve_model(teacher["model"], "teacher")
    if "from_teacher" in m:

        f = m["from_teacher"]
        try:
            kept = len(pick_layers(t_shape.layers, f["every"], f["layers"]))
        except ValueError as e:
            raise PlanError(f"distill.student: {e}") from None
        shape = replace(t_shape, name=f"student: {kept} of {t_shape.name}'s {t_shape.layers} layers",
                        layers=kept, intermediate=f["intermediate_size"] or t_shape.intermediate)
        return shape, f"teacher {t_source}"
    if m.get("vocab_from_teacher"):
        m = {**m, "config": {**m["config"], "vocab_size": t_shape.vocab}}
    shape, source = _resolve_model(m, "student")
    return replace(shape, name=f"student {shape.name}"), source


def plan_teacher(teacher: dict, setup):
    """(setup with a live teacher's weights and logits, or the teacher's own pass: (bytes, what it is))."""
    from dataclasses import replace


    shape, _ = _resolve_model(teacher["model"], "teacher")
    if teacher["live"]:
        return replace(setup, teacher_weight_bytes=teacher_weight_bytes(shape, teacher["bits"], setup.device),
                       teacher_vocab=shape.vocab), None
    what = "sequence-level answers" if teacher["generate"] else "top-k cache fill"
    return setup, (teacher_pass_bytes(shape, teacher["bits"], teacher["pass_batch"], teacher["pass_seq"],
                                      setup.device, generate=teacher["generate"]), what)
