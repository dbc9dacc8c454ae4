"""Memory planner: will a fine-tuning run fit on a GPU, and with which settings?

:func:`estimate` counts, from a model's ``config.json`` alone, the bytes PyTorch's allocator holds at the
peak of one training step of banklm's trainer (finetune/sft.py: TRL ``SFTTrainer`` + PEFT, packed rows,
fused AdamW), component by component; :func:`propose` finds settings that fit a card; :func:`plan_cards`
does it for 8 / 12 / 16 / 24 GB cards. The formulas, what each term stands for and how they were checked
against measured CPU training steps and published figures are in docs/memory.md.

What is modelled (one micro-step, steady state: optimizer states exist):

* weights: bf16/fp16 (LoRA), fp32 master weights (full; banklm trains full fine-tuning in fp32 with bf16
  autocast), NF4 with double quantisation (QLoRA: 0.5 byte per weight + absmax/quant-state), and the fp32
  upcast of embeddings, norms and LM head that ``prepare_model_for_kbit_training`` does for QLoRA;
* LoRA parameters, their gradients and AdamW states (fp32 adapters for LoRA, bf16 for QLoRA as TRL casts them);
* activations saved for backward, per decoder layer (norms, q/k/v/o inputs, attention, MLP, LoRA dropout
  copies), with or without activation checkpointing; the attention mask copies of sdpa; eager attention's
  score matrices;
* the loss: TRL's fused LM head (tiles of 4096 tokens x 32768 vocabulary; never the full logits) or the full
  logits plus their fp32 upcast (``loss="full"``: plain transformers ``Trainer``, LLaMA-Factory);
* logit distillation with a live teacher (``teacher_weight_bytes``/``teacher_vocab``): the teacher's frozen
  weights, both models' logits and ``kd_loss``'s fp32 temporaries (forward KL, every position scored);
* on CUDA: CUDA context and caching-allocator overhead.

``device="cpu", precision="fp32"`` gives the same formulas for an fp32 CPU run, without CUDA overheads:
that is how the planner is validated against measured peaks (tests/test_plan.py).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .known_configs import KNOWN_CONFIGS, known_config, lookup

GIB = 1024**3
CARDS_GB = (8, 12, 16, 24)
METHODS = ("lora", "qlora", "full", "cpt")
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# TRL's fused LM head (trl/kernels/chunked_logprob.py): tiles of TOKEN_CHUNK_SIZE x CHUNK vocabulary columns
FUSED_TOKENS, FUSED_VOCAB = 4096, 32768
# the torch fallback of its fold kernel (no Triton: CPU) holds this many bytes of fp32 temporaries per tile element
CPU_FOLD_FWD_BYTES, CPU_FOLD_BWD_BYTES = 13, 29
# NF4: 4 bits per weight; blocks of 64 share an absmax, which double quantisation stores as 8-bit with one
# fp32 second-level absmax per 256 blocks (bitsandbytes defaults)
NF4_BLOCK, NF4_BLOCK2 = 64, 256
# CUDA: context + cuBLAS/cuDNN workspaces (not visible to torch.cuda.max_memory_allocated), caching-allocator
# fragmentation on top of the tensor peak, and what the driver/display keeps of the card
CUDA_CONTEXT_GIB = 0.45
ALLOCATOR_OVERHEAD = 0.08
CARD_RESERVE_GIB = 0.25


class PlanError(ValueError):
    """A config or setting the planner cannot use (message names the file or option)."""


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    """The config values memory depends on (Llama / Mistral / Qwen2-like decoder)."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each decoder-layer linear."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def shape_from_config(cfg: dict, name: str = "model", source: str = "config") -> ModelShape:
    """Read a Hugging Face ``config.json`` dict; PlanError naming ``source`` and the key when it cannot."""
    if not isinstance(cfg, dict):
        raise PlanError(f"{source}: not a JSON object")
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_TYPES:
        raise PlanError(f"{source}: model_type {mtype!r} is not supported by the planner "
                        f"(supported: {', '.join(SUPPORTED_TYPES)}-like decoders)")

    def need(key: str) -> int:
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise PlanError(f"{source}: '{key}' must be a positive integer (got {v!r})")
        return v

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise PlanError(f"{source}: 'num_key_value_heads' {kv!r} must divide num_attention_heads {heads}")
    head_dim = cfg.get("head_dim") or hidden // heads
    return ModelShape(
        name=name, model_type=mtype, hidden=hidden, layers=need("num_hidden_layers"), heads=heads, kv_heads=kv,
        head_dim=int(head_dim), intermediate=need("intermediate_size"), vocab=need("vocab_size"),
        tied=bool(cfg.get("tie_word_embeddings", False)),   # the Llama/Mistral/Qwen2 config classes default to untied
        qkv_bias=mtype == "qwen2" or bool(cfg.get("attention_bias", False)))


def load_shape(spec: str | os.PathLike) -> tuple[ModelShape, str]:
    """A model folder, a ``config.json`` or a bundled name (``qwen2.5-7b``) -> (shape, where it came from)."""
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise PlanError(f"{spec}: no config.json in this folder")
    if p.is_file():
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise PlanError(f"{p}: invalid JSON ({e})") from None
        name = p.parent.name if p.name == "config.json" else p.stem
        return shape_from_config(cfg, name=name, source=str(p)), str(p)
    key = lookup(str(spec))
    if key is not None:
        cfg = known_config(key)
        where = f"bundled config {key}" + (f"; {spec} is not on this machine" if os.sep in str(spec) else "")
        return shape_from_config(cfg, name=key, source=f"bundled config {key}"), where
    raise PlanError(f"{spec}: not a model folder, a config.json or a bundled model name "
                    f"({', '.join(KNOWN_CONFIGS)})")


def resolve_base(path: str | None = None, config_name: str | None = None,
                 config: dict | None = None, name: str = "model") -> tuple[ModelShape, str]:
    """The shape to plan a recipe's base with: a config dict (``base.build``), the folder's config.json when
    the folder exists here, else a bundled config (``plan.config``, or matched by the folder's basename)."""
    if config is not None:
        return shape_from_config(config, name=name, source=name), "built from the recipe's base.build"
    if path is not None and Path(path).expanduser().is_dir():
        return load_shape(Path(path).expanduser())
    wanted = config_name or (lookup(path) if path else None)
    if wanted is None:
        raise PlanError(f"base.path {path}: folder not found here and no bundled config matches its name; "
                        f"set plan.config to one of {', '.join(KNOWN_CONFIGS)} or point base.path at the folder")
    key = lookup(wanted)
    if key is None:
        raise PlanError(f"plan.config {wanted!r}: unknown (known: {', '.join(KNOWN_CONFIGS)})")
    shape, _ = load_shape(key)
    where = f"bundled config {key}" + (f" (base.path {path} is not on this machine)" if path else "")
    return shape, where


def count_params(shape: ModelShape) -> dict[str, int]:
    """Parameters per component, as ``model.parameters()`` counts them (tied LM head counted once)."""
    h, L = shape.hidden, shape.layers
    lin = shape.linear_shapes()
    attn = sum(i * o for k, (i, o) in lin.items() if k in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if shape.qkv_bias:
        attn += shape.q_dim + 2 * shape.kv_dim
    mlp = sum(i * o for k, (i, o) in lin.items() if k in ("gate_proj", "up_proj", "down_proj"))
    out = {
        "embed": shape.vocab * h,
        "attention": L * attn,
        "mlp": L * mlp,
        "norms": L * 2 * h + h,
        "lm_head": 0 if shape.tied else shape.vocab * h,
    }
    out["linear"] = L * sum(i * o for i, o in lin.values())  # what 4-bit quantisation applies to
    out["bias"] = L * (shape.q_dim + 2 * shape.kv_dim) if shape.qkv_bias else 0
    out["total"] = out["embed"] + out["attention"] + out["mlp"] + out["norms"] + out["lm_head"]
    return out


def lora_params(shape: ModelShape, r: int, dora: bool = False) -> int:
    """LoRA A and B (r x in, out x r) on every decoder linear ('all-linear'), plus DoRA's magnitude vectors."""
    n = sum(r * (i + o) + (o if dora else 0) for i, o in shape.linear_shapes().values())
    return shape.layers * n


def int8_bytes(shape: ModelShape) -> float:
    """Bytes of the decoder linears stored by bitsandbytes LLM.int8: one byte per weight + an fp32 scale per row."""
    lin = shape.linear_shapes().values()
    return shape.layers * sum(i * o + 4 * o for i, o in lin)


def nf4_bytes(n: int, double_quant: bool = True) -> float:
    """Bytes of ``n`` weights stored by bitsandbytes NF4 (packed 4-bit + absmax, optionally double-quantised)."""
    blocks = n / NF4_BLOCK
    if double_quant:
        return n / 2 + blocks * 1 + blocks / NF4_BLOCK2 * 4
    return n / 2 + blocks * 4


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setup:
    """One training configuration. ``batch_size`` is the micro-batch (rows of ``seq_len`` tokens)."""

    method: str = "qlora"
    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 1
    lora_r: int = 16
    lora_dropout: float = 0.0         # the recipe default (banklm/recipe.py), as PEFT and torchtune
    dora: bool = False
    grad_ckpt: bool = False
    packing: bool = True        # rows with a block-diagonal mask (sdpa; the validation probe's batches); banklm builds none
    attn: str = "sdpa"          # sdpa | flash (flash_attention_2: no mask, GQA native) | eager
    device: str = "cuda"        # cuda | cpu
    precision: str = "bf16"     # bf16 | fp16 (autocast) | fp32
    loss: str = "fused"         # fused: TRL's chunked LM head | full: logits + fp32 upcast (plain Trainer)
    bits: int = 4               # QLoRA base: 4 (NF4, double quantisation) or 8 (LLM.int8; weights only, see docs)
    kbit_upcast: bool = True    # QLoRA: prepare_model_for_kbit_training casts embeddings/norms/LM head to fp32
    lora_dtype: str | None = None  # adapter dtype; None: fp32 for LoRA (PEFT), bf16 for QLoRA (TRL)
    # distillation with a live teacher (distill.kd.top_k null): its frozen weights share the card, and the
    # loss is distill.losses.kd_loss on both models' full logits (_kd_loss_workspace, measured on CPU)
    teacher_weight_bytes: float = 0.0
    teacher_vocab: int = 0

    def check(self) -> None:
        for name, allowed in (("method", METHODS), ("attn", ("sdpa", "flash", "eager")), ("device", ("cuda", "cpu")),
                              ("precision", ("bf16", "fp16", "fp32")), ("loss", ("fused", "full"))):
            if getattr(self, name) not in allowed:
                raise PlanError(f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        for name in ("seq_len", "batch_size", "grad_accum", "lora_r"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.bits not in (4, 8):
            raise PlanError(f"bits must be 4 or 8 (got {self.bits})")
        if not 0 <= self.lora_dropout < 1:
            raise PlanError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")

    @property
    def kind(self) -> str:
        """'full' for full and cpt (CPT trains every parameter by default, like the recipe's cpt section)."""
        return "full" if self.method in ("full", "cpt") else self.method


def training_setup(config) -> dict:
    """The :class:`Setup` fields a run's :class:`banklm.finetune.config.TrainConfig` decides (the planner's own
    names from the recipe's: ``max_length`` -> ``seq_len``, ``lora.r`` -> ``lora_r``, ``gradient_checkpointing``
    -> ``grad_ckpt``, ...); the rest (device, precision, attention, loss) is the planner's to choose."""
    return {"method": config.method, "seq_len": config.max_length, "batch_size": config.batch_size,
            "grad_accum": config.grad_accum, "lora_r": config.lora.r, "lora_dropout": config.lora.dropout,
            "dora": config.lora.dora, "grad_ckpt": config.gradient_checkpointing}


@dataclass(frozen=True)
class _Dtypes:
    """Bytes per element of each tensor family for a setup (see docs/memory.md, 'Precision regimes')."""

    mixed: bool      # autocast to 16-bit compute
    compute: int     # linear/attention compute dtype under autocast (2) or fp32 (4)
    resid: int       # residual stream (embedding output, norm inputs/outputs)
    mlp: int         # MLP intermediate (gate/up outputs, SiLU, product)
    lora: int        # LoRA adapter weights (and their gradients and AdamW states)
    base: int        # non-quantised base weights (embeddings, norms, LM head, and linears unless 4-bit)
    lm_head: int     # LM head weight as the loss sees it


def _dtypes(s: Setup) -> _Dtypes:
    mixed = s.precision != "fp32"
    c = 2 if mixed else 4
    if not mixed:
        return _Dtypes(False, 4, 4, 4, 4, 4, 4)
    lora = {"fp32": 4, "bf16": 2, "fp16": 2}.get(s.lora_dtype or "", 2 if s.kind == "qlora" else 4)
    if s.kind == "full":     # fp32 master weights, autocast: linear outputs 16-bit, residual stream fp32
        return _Dtypes(True, c, 4, c, lora, 4, 4)
    if s.kind == "lora":     # 16-bit base, fp32 adapters (PEFT autocast_adapter_dtype)
        return _Dtypes(True, c, 2, 2, lora, 2, 2)
    up = 4 if s.kbit_upcast else 2  # QLoRA: fp32 embeddings/norms -> fp32 residual; 4-bit linears return it
    return _Dtypes(True, c, up, up, lora, up, up)


# --------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    """Bytes by component at the peak phase, the peak of each phase, and the totals."""

    shape: ModelShape
    setup: Setup
    params: dict[str, int]
    trainable_params: int
    components: dict[str, float]           # at the peak phase
    phases: dict[str, float]               # tensor bytes at the peak of each phase
    peak_phase: str
    tensor_peak: float                     # what torch.cuda.max_memory_allocated would report
    overhead: float                        # CUDA context + allocator (0 on CPU)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.tensor_peak + self.overhead

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def to_dict(self) -> dict:
        return {"model": self.shape.name, "setup": asdict(self.setup), "params": self.params,
                "trainable_params": self.trainable_params,
                "components_gib": {k: round(v / GIB, 4) for k, v in self.components.items()},
                "phases_gib": {k: round(v / GIB, 4) for k, v in self.phases.items()},
                "peak_phase": self.peak_phase, "tensor_peak_gib": round(self.tensor_peak / GIB, 4),
                "overhead_gib": round(self.overhead / GIB, 4), "total_gib": round(self.total_gib, 4),
                "notes": self.notes}


def _linear_inputs(n: float, x: int, modules: int, s: Setup, d: _Dtypes, already_saved: bool = False) -> float:
    """Bytes saved for backward by ``modules`` linears that read one input of ``n`` elements of ``x`` bytes.

    Full fine-tuning saves the input for the weight gradient (under autocast: one 16-bit copy per module
    unless the input is already 16-bit). LoRA saves what ``lora_A`` reads: with dropout > 0 the dropout
    output (or its autocast copy) and the dropout mask per module (CUDA: 1-byte mask; CPU: the noise
    tensor in the adapter dtype), else the input cast to the adapter/compute dtype (shared when no cast is
    needed). Frozen base linears (bf16 or 4-bit) save no activation.
    """
    saved, shared = 0.0, False
    if s.kind == "full":
        if d.mixed and x != d.compute:
            saved += modules * n * d.compute
        else:
            shared = True
    else:
        lora_dt = d.compute if d.mixed else d.lora
        if s.lora_dropout > 0:   # CUDA: native_dropout keeps a bool mask; CPU: a float noise tensor
            saved += modules * n * (lora_dt + (1 if s.device == "cuda" else d.lora))
        elif x == d.lora == lora_dt:
            shared = True
        else:
            saved += modules * n * lora_dt
    if shared and not already_saved:
        saved += n * x
    return saved


def layer_activations(shape: ModelShape, s: Setup) -> dict[str, float]:
    """Bytes one decoder layer saves for backward, by part (no checkpointing)."""
    d = _dtypes(s)
    b, L = s.batch_size, s.seq_len
    T = b * L
    h, qd, inter = shape.hidden, shape.q_dim, shape.intermediate
    mask = s.packing and s.attn != "flash"   # packed rows: a block-diagonal mask (grouped batches: none)
    kv = shape.kv_dim if (s.attn == "flash" or shape.kv_heads == shape.heads or not mask) else qd  # repeat_kv
    a = d.compute                            # sdpa inputs (autocast casts q/k/v to 16-bit)
    full = s.kind == "full"
    out: dict[str, float] = {}
    # RMSNorm (x2): the fp32 input (or its fp32 copy), and the normalised values when the norm weight trains
    out["norms"] = 2 * T * h * (4 + (4 if full else 0))
    out["qkv_inputs"] = _linear_inputs(T * h, d.resid, 3, s, d)
    # q (after RoPE), k, v, output (shared with o_proj's input), logsumexp
    out["attention"] = T * (2 * qd + 2 * kv) * a + T * shape.heads * 4
    if mask and s.attn == "sdpa":
        out["attention"] += b * L * L * a    # sdpa converts the boolean mask to an additive one per call
    if s.attn == "eager":                    # softmax probabilities in fp32 (+ their 16-bit copy)
        out["attention"] += b * shape.heads * L * L * (4 + (2 if d.mixed else 0)) + T * qd * a
    out["o_input"] = _linear_inputs(T * qd, a, 1, s, d, already_saved=s.attn != "eager")
    out["mlp_inputs"] = _linear_inputs(T * h, d.resid, 2, s, d)
    out["mlp"] = 3 * T * inter * d.mlp           # gate output (SiLU input), SiLU output, up output
    out["down_input"] = _linear_inputs(T * inter, d.mlp, 1, s, d)
    if s.kind != "full":                     # lora_A outputs, read by lora_B
        out["lora"] = len(LORA_MODULES) * T * s.lora_r * (d.compute if d.mixed else d.lora)
    return out


def _layer_backward_transient(shape: ModelShape, s: Setup) -> float:
    """Gradient buffers alive while the top layer back-propagates: about one MLP-wide and two hidden-wide
    tensors (fitted to measured CPU steps, within 3%; see docs/memory.md)."""
    d = _dtypes(s)
    T = s.batch_size * s.seq_len
    return T * shape.intermediate * d.mlp + 2 * T * shape.hidden * 4


def _loss_workspace(shape: ModelShape, s: Setup, d: _Dtypes, lm_trainable: bool) -> tuple[float, float, float]:
    """(saved for backward, forward workspace, backward workspace) of the LM head + loss."""
    b, L, h, V = s.batch_size, s.seq_len, shape.hidden, shape.vocab
    N = b * (L - 1)                           # scored positions (CUDA scores only label tokens: <= N)
    if s.loss == "full":                      # logits [N, V] in compute dtype, fp32 upcast, log_softmax output
        c = d.compute
        saved = N * V * 4
        fwd = N * V * (c + (4 if c != 4 else 0))
        bwd = N * V * 8 + N * V * c + (V * h * 4 if lm_trainable else 0)
        return saved, fwd, bwd
    ct = d.compute                            # autocast dtype, else the hidden states' dtype
    nt, vt = min(N, FUSED_TOKENS), min(V, FUSED_VOCAB)
    mm_buf = nt * FUSED_VOCAB * ct            # allocated at full chunk width whatever the vocabulary
    copies = (nt * h * ct if d.resid != ct else 0) + (vt * h * ct if d.lm_head != ct else 0)  # .to(compute dtype)
    vectors = 8 * N * 4
    cpu = s.device == "cpu"
    saved = N * h * d.resid                   # the flattened hidden states (a copy of the [:, :-1] slice)
    fwd = mm_buf + copies + vectors + (CPU_FOLD_FWD_BYTES * nt * vt if cpu else 0)
    bwd = (N * h * 4 + (N * h * d.resid if d.resid != 4 else 0) + mm_buf + copies
           + (CPU_FOLD_BWD_BYTES * nt * vt if cpu else 0)
           + (V * h * 4 if lm_trainable else 0))
    return saved, fwd, bwd


def _kd_loss_workspace(shape: ModelShape, s: Setup, d: _Dtypes, lm_trainable: bool) -> tuple[float, float, float]:
    """(saved, forward workspace, backward workspace) of logit KD with a live teacher: the student's and the
    teacher's full logits (``banklm.distill.logit`` ``compute_loss``) and ``banklm.distill.losses.kd_loss`` (forward KL,
    0 < alpha).

    Measured on CPU (scripts/measure_train_memory.py --kd-teacher-layers, docs/memory.md): both models'
    logits ``[B, s, V]`` in compute dtype live until compute_loss returns; kd_loss gathers the scored positions
    (planned as all ``N = B*(s-1)``; completion-only labels score fewer) and at its forward peak (``_kl``'s
    ``torch.where``) holds per position x vocabulary: the student's fp32 logits, the cross-entropy's
    log-softmax, the teacher's gathered logits (compute dtype), student and teacher fp32 log-probs, the
    teacher's probabilities, the ``p > 0`` mask (1 byte), ``t - s``, ``zeros_like`` and the result:
    ``33 + c`` bytes. Autograd keeps 13 (CE log-softmax, student log-probs, teacher probabilities, mask); the
    teacher's logits are gone before the backward, which adds one fp32 gradient (17 in all), and later the
    student logits' gradient (index + slice backward: two ``[B, s, V]`` in compute dtype) with the LM head's
    weight gradient.
    """
    b, L, h = s.batch_size, s.seq_len, shape.hidden
    T, N = b * L, b * (L - 1)
    vs, vt = shape.vocab, s.teacher_vocab
    v, c = min(vs, vt), d.compute
    saved = N * v * 13
    fwd = T * (vs + vt) * c + N * v * (20 + c)
    bwd = max(N * v * 4, 2 * T * vs * c + (vs * h * 4 if lm_trainable else 0) - saved)
    return saved, fwd, bwd


def cuda_overhead(tensor_bytes: float) -> float:
    """The caching allocator's slack on top of ``tensor_bytes``, plus the CUDA context and workspaces."""
    return tensor_bytes * ALLOCATOR_OVERHEAD + CUDA_CONTEXT_GIB * GIB


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """Peak allocator bytes of one training step of ``setup`` on ``shape`` (see the module docstring)."""
    setup.check()
    s, d = setup, _dtypes(setup)
    params = count_params(shape)
    notes: list[str] = []
    P, Lyr = params["total"], shape.layers
    T = s.batch_size * s.seq_len

    # ---- weights, trainable parameters, gradients, optimizer states
    comp: dict[str, float] = {}
    if s.kind == "qlora":
        linear = params["linear"]
        comp["weights"] = (nf4_bytes(linear) if s.bits == 4 else int8_bytes(shape)) + (P - linear) * d.base
        if s.bits == 8:
            notes.append("8-bit base: weights exact; activations planned as for 4-bit (not measured)")
        if s.kbit_upcast and d.mixed:
            notes.append("QLoRA: prepare_model_for_kbit_training keeps embeddings, norms and LM head in fp32")
    else:
        comp["weights"] = P * d.base
    if s.teacher_weight_bytes:
        comp["teacher_weights"] = s.teacher_weight_bytes
    casts = 0.0
    if s.kind == "full":
        trainable = P
        comp["lora_params"] = 0.0
        if d.mixed:   # autocast caches a 16-bit copy of every linear weight while the forward runs
            casts = params["linear"] * d.compute + (shape.vocab * shape.hidden * d.compute if s.loss == "full" else 0)
        grad_bytes = P * 4
        lm_trainable = True
    else:
        trainable = lora_params(shape, s.lora_r, s.dora)
        comp["lora_params"] = trainable * d.lora
        grad_bytes = trainable * d.lora
        lm_trainable = False
    comp["optimizer_states"] = 2 * trainable * (4 if s.kind == "full" else d.lora)   # AdamW exp_avg, exp_avg_sq
    accumulated = grad_bytes if s.grad_accum > 1 else 0.0   # gradients persist across micro-steps

    # ---- activations
    per_layer = layer_activations(shape, s)
    layer = sum(per_layer.values())
    # rotary cos/sin (batch, seq, head_dim) x2, the boolean block-diagonal mask
    shared = 2 * T * shape.head_dim * d.resid + (s.batch_size * s.seq_len**2 if s.packing and s.attn != "flash" else 0)
    final_norm = T * shape.hidden * (4 + (4 if s.kind == "full" else 0))
    if s.teacher_vocab:   # live-teacher KD: distill.losses.kd_loss instead of the Trainer's loss
        loss_saved, loss_fwd, loss_bwd = _kd_loss_workspace(shape, s, d, lm_trainable)
    else:
        loss_saved, loss_fwd, loss_bwd = _loss_workspace(shape, s, d, lm_trainable)
    if s.grad_ckpt:
        acts = Lyr * T * shape.hidden * d.resid   # each layer keeps only its input; backward recomputes one layer
        recompute = layer
        # the autocast cache is dropped when the forward's autocast region ends; only the copies of the layer
        # being recomputed come back
        casts_kept = casts / max(1, Lyr)
    else:
        acts, recompute = Lyr * layer, 0.0
        casts_kept = casts   # each linear saved its 16-bit weight copy for the input gradient
        if s.kind != "full":  # frozen embeddings: nothing before layer 0's q/k/v LoRA needs a gradient
            acts -= T * shape.hidden * (4 + (3 * (1 if s.device == "cuda" else d.lora) if s.lora_dropout > 0 else 0))
    transient = _layer_backward_transient(shape, s)
    layer_grads = grad_bytes / max(1, Lyr) if s.kind == "full" else 0.0
    lm_grad = shape.vocab * shape.hidden * 4 if s.kind == "full" else 0.0

    def phase(grads=0.0, activations=0.0, logits_loss=0.0, buffers=0.0, cast=0.0) -> dict[str, float]:
        return {**comp, "autocast_weight_copies": cast, "gradients": grads, "activations": activations,
                "logits_loss": logits_loss, "backward_buffers": buffers}

    held = acts + shared + final_norm
    phases_c = {
        "forward": phase(accumulated, held, loss_saved + loss_fwd, cast=casts),
        "loss_backward": phase(accumulated, held, loss_saved + loss_bwd, cast=casts_kept),
        # top layer: its activations still held (recomputed with checkpointing), its gradient buffers
        "layer_backward": phase(accumulated + lm_grad + layer_grads, acts + shared + recompute, 0.0, transient,
                                cast=casts_kept),
        # all gradients exist, activations are gone
        "optimizer": phase(grad_bytes),
    }
    if s.kind == "full":
        # near the bottom: (almost) every gradient exists, one layer's activations are left (recomputed with
        # checkpointing); at the very end the embedding's dense gradient is allocated before it is accumulated
        last = (T * shape.hidden * d.resid + recompute) if s.grad_ckpt else layer
        bottom = phase(grad_bytes, last + shared, 0.0, max(transient, shape.vocab * shape.hidden * 4 - last - shared),
                       cast=casts / max(1, Lyr))
        if sum(bottom.values()) > sum(phases_c["layer_backward"].values()):
            phases_c["layer_backward"] = bottom
    phases = {k: sum(v.values()) for k, v in phases_c.items()}
    peak_phase = max(phases, key=phases.get)
    tensor_peak = phases[peak_phase]
    comp = {k: v for k, v in phases_c[peak_phase].items() if v > 0 or k in ("weights",)}

    overhead = 0.0
    if s.device == "cuda":
        overhead = cuda_overhead(tensor_peak)
        comp["cuda_context_allocator"] = overhead
    if s.loss == "fused" and shape.vocab > 100_000:
        n_scored = s.batch_size * (s.seq_len - 1)
        notes.append(f"vocabulary {shape.vocab:,}: the full logits would need "
                     f"{(12 + d.compute) * n_scored * shape.vocab / GIB:.1f} GiB in the loss (fp32 upcast, "
                     "--loss full); TRL's fused LM head computes it in 4096 x 32768 tiles instead")
    return Estimate(shape=shape, setup=s, params=params, trainable_params=int(trainable), components=comp,
                    phases=phases, peak_phase=peak_phase, tensor_peak=tensor_peak, overhead=overhead, notes=notes)


# --------------------------------------------------------------------------- distillation's teacher


def teacher_weight_bytes(shape: ModelShape, bits: int | None, device: str = "cuda") -> float:
    """A frozen teacher's weights: NF4 (4) or LLM.int8 (8) linears with 16-bit embeddings, norms and LM head,
    else 16-bit on CUDA (fp32 on CPU)."""
    params = count_params(shape)
    P, linear = params["total"], params["linear"]
    if bits == 4:
        return nf4_bytes(linear) + (P - linear) * 2
    if bits == 8:
        return int8_bytes(shape) + (P - linear) * 2
    return P * (2 if device == "cuda" else 4)


def teacher_pass_bytes(shape: ModelShape, bits: int | None, batch_size: int, seq_len: int,
                       device: str = "cuda", generate: bool = False) -> float:
    """Peak of the teacher's own pass before the student trains: weights, one layer's inference temporaries
    and either every position's logits (top-k cache fill; compute dtype + fp32 log-softmax) or, when it
    ``generate``s sequence-level answers, the KV cache and the last position's logits; plus the CUDA context
    and allocator slack on CUDA."""
    T = batch_size * seq_len
    width = 2 if device == "cuda" else 4
    if generate:
        logits = batch_size * shape.vocab * (width + 4) + 2 * shape.layers * T * shape.kv_dim * width
    else:
        logits = T * shape.vocab * (width + 4)
    tensors = (teacher_weight_bytes(shape, bits, device) + logits
               + T * (4 * shape.hidden + 3 * shape.intermediate) * width)
    return tensors + (cuda_overhead(tensors) if device == "cuda" else 0.0)


# --------------------------------------------------------------------------- fitting a card


def card_budget(gpu_gib: float) -> float:
    """Bytes a training run may use on a card of ``gpu_gib`` GiB (the driver and display keep some)."""
    return (gpu_gib - CARD_RESERVE_GIB) * GIB


def parse_gpu_mem(text: str | float | int) -> float:
    """``12GB``, ``12 GiB``, ``12G`` or ``12`` -> 12.0 (GiB: a '12 GB' card has 12 GiB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g)?\s*", str(text).lower())
        if not m:
            raise PlanError(f"--gpu-mem {text!r}: expected a size like 12GB")
        value = float(m.group(1))
    if not 1 <= value <= 1024:
        raise PlanError(f"--gpu-mem {text!r}: expected between 1 and 1024 GB")
    return value


@dataclass
class Proposal:
    """Settings that fit a card (or None when nothing does), and how they differ from the request."""

    gpu_gib: float
    requested: Estimate
    fits_as_requested: bool
    setup: Setup | None
    estimate: Estimate | None
    changes: list[str]

    def to_dict(self) -> dict:
        return {"gpu_gib": self.gpu_gib, "fits_as_requested": self.fits_as_requested,
                "requested_total_gib": round(self.requested.total_gib, 3),
                "proposed": None if self.setup is None else {
                    "batch_size": self.setup.batch_size, "grad_accum": self.setup.grad_accum,
                    "grad_ckpt": self.setup.grad_ckpt, "seq_len": self.setup.seq_len,
                    "total_gib": round(self.estimate.total_gib, 3)},
                "changes": self.changes}


def _micro_batches(global_batch: int) -> list[int]:
    """Micro-batch candidates, largest first: the global batch, then halvings down to 1."""
    out, m = [], global_batch
    while m >= 1:
        out.append(m)
        m //= 2
    return out if out[-1] == 1 else [*out, 1]


def propose(shape: ModelShape, setup: Setup, gpu_gib: float) -> Proposal:
    """Settings for a card of ``gpu_gib`` GiB that keep the global batch (micro-batch x accumulation).

    Order of preference: the request as it is; a smaller micro-batch with more accumulation (same
    checkpointing); activation checkpointing with the largest micro-batch that fits (recomputation costs
    about a third more time, so it comes only when a micro-batch of at least min(4, requested) does not
    fit without it); then shorter sequences, halving down to 256 tokens.
    """
    budget = card_budget(gpu_gib)
    requested = estimate(shape, setup)
    if requested.total <= budget:
        return Proposal(gpu_gib, requested, True, setup, requested, [])
    global_batch = setup.batch_size * setup.grad_accum

    def largest(ckpt: bool, seq_len: int) -> tuple[Setup, Estimate] | None:
        for m in _micro_batches(setup.batch_size):
            cand = replace(setup, batch_size=m, grad_accum=max(1, math.ceil(global_batch / m)), grad_ckpt=ckpt,
                           seq_len=seq_len)
            est = estimate(shape, cand)
            if est.total <= budget:
                return cand, est
        return None

    seq = setup.seq_len
    while True:
        plain = largest(setup.grad_ckpt, seq)
        ckpt = largest(True, seq) if not setup.grad_ckpt else None
        choice = plain
        if ckpt is not None and (plain is None or plain[0].batch_size < min(4, setup.batch_size)):
            choice = ckpt
        if choice is not None:
            cand, est = choice
            changes = []
            if cand.batch_size != setup.batch_size:
                changes.append(f"micro-batch {setup.batch_size} -> {cand.batch_size}, "
                               f"grad_accum {setup.grad_accum} -> {cand.grad_accum}")
            if cand.grad_ckpt != setup.grad_ckpt:
                changes.append("activation checkpointing on")
            if cand.seq_len != setup.seq_len:
                changes.append(f"max length {setup.seq_len} -> {cand.seq_len}")
            return Proposal(gpu_gib, requested, False, cand, est, changes)
        if seq <= 256:
            return Proposal(gpu_gib, requested, False, None, None,
                            ["does not fit even at micro-batch 1, checkpointing and 256 tokens: "
                             + ("use method qlora or " if setup.kind != "qlora" else "") + "a larger card"])
        seq = max(256, seq // 2)


def plan_cards(shape: ModelShape, setup: Setup, cards=CARDS_GB) -> list[Proposal]:
    return [propose(shape, setup, float(c)) for c in cards]


# --------------------------------------------------------------------------- time (an estimate, not measured)

# RTX 4090: 165 TFLOPS dense bf16 (fp32 accumulate). The assumed utilisation is a conservative round figure for
# consumer cards and small models (short matmuls, bitsandbytes and PEFT kernels), not a measurement. For scale:
# torchtune's published 3,083 tokens/s for Llama-3.1-8B LoRA on a 4090 (compiled, checkpointing) is ~0.9 of peak
# by this FLOP count, so for large compiled models the estimate errs long. Its QLoRA run gave 0.78x its LoRA speed.
GPU_TFLOPS = {"rtx4090": 165.0}
ASSUMED_MFU = 0.35
QLORA_SPEED = 0.78


def tokens_per_second(shape: ModelShape, setup: Setup, gpu: str = "rtx4090", mfu: float = ASSUMED_MFU) -> float:
    """Estimated training tokens/s (not measured): FLOPs per token = 2N forward + 2N input gradients
    (+ 2N weight gradients for full fine-tuning, + 2N recomputation with checkpointing) + attention
    (12 * layers * hidden * seq_len / 2, causal), at ``mfu`` of the card's bf16 peak; QLoRA x0.78."""
    P = count_params(shape)["total"]
    flops = 4 * P + (2 * P if setup.kind == "full" else 0) + (2 * P if setup.grad_ckpt else 0)
    flops += 6 * shape.layers * shape.hidden * setup.seq_len
    tps = GPU_TFLOPS[gpu] * 1e12 * mfu / flops
    return tps * (QLORA_SPEED if setup.kind == "qlora" else 1.0)


# --------------------------------------------------------------------------- text output


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


COMPONENT_LABELS = {
    "weights": "base weights",
    "lora_params": "LoRA parameters",
    "autocast_weight_copies": "16-bit weight copies (autocast)",
    "optimizer_states": "AdamW states",
    "gradients": "gradients",
    "activations": "activations",
    "logits_loss": "LM head + loss",
    "backward_buffers": "backward buffers",
    "teacher_weights": "teacher weights (live KD)",
    "cuda_context_allocator": "CUDA context + allocator",
}


def format_plan(est: Estimate, proposals: list[Proposal], source: str, gpu_gib: float | None = None) -> str:
    """The human-readable plan: model, settings, breakdown at the peak, and the card table."""
    s = est.setup
    p = est.params
    lines = [f"model: {est.shape.name} ({source}): {p['total'] / 1e9:.2f}B parameters, "
             f"trainable {est.trainable_params / 1e6:.1f}M",
             f"setup: {s.method}, seq_len {s.seq_len}, micro-batch {s.batch_size} x grad_accum {s.grad_accum}, "
             f"checkpointing {'on' if s.grad_ckpt else 'off'}"
             + (f", LoRA r={s.lora_r} dropout {s.lora_dropout}" if s.kind != "full" else "")
             + f", {s.precision} on {s.device}, attention {s.attn}, loss {s.loss}",
             "",
             f"estimated peak ({est.peak_phase.replace('_', ' ')}):"]
    width = max(len(v) for v in COMPONENT_LABELS.values())
    for k, v in est.components.items():
        if v > 0:
            lines.append(f"  {COMPONENT_LABELS.get(k, k):<{width}}  {_gib(v):>7} GiB")
    lines.append(f"  {'total':<{width}}  {est.total_gib:>7.2f} GiB")
    for n in est.notes:
        lines.append(f"  note: {n}")
    lines.append("")
    head = f"{'card':>6}  {'as asked':>9}  {'fits?':<5}  {'proposal (micro-batch x accum, ckpt, seq_len)':<46}  {'GiB':>6}"
    lines += [head, "-" * len(head)]
    for pr in proposals:
        if pr.setup is None:
            prop, gib = "does not fit", ""
        else:
            ps = pr.setup
            prop = f"{ps.batch_size} x {ps.grad_accum}, ckpt {'on' if ps.grad_ckpt else 'off'}, {ps.seq_len}"
            gib = f"{pr.estimate.total_gib:.2f}"
        mark = " <" if gpu_gib is not None and abs(pr.gpu_gib - gpu_gib) < 1e-9 else ""
        lines.append(f"{pr.gpu_gib:>4.0f}GB  {pr.requested.total_gib:>9.2f}  "
                     f"{'yes' if pr.fits_as_requested else 'no':<5}  {prop:<46}  {gib:>6}{mark}")
    tps = tokens_per_second(est.shape, s) if s.device == "cuda" else None
    if tps:
        lines += ["", f"speed: about {tps:,.0f} tokens/s on an RTX 4090 (an estimate, not a measurement: "
                      f"{ASSUMED_MFU:.0%} of its 165 bf16 TFLOPS; docs/memory.md)"]
    return "\n".join(lines)

