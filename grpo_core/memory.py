"""Per-GPU memory plan of one colocated GRPO step (vLLM rollouts + FSDP2 update).

Pure arithmetic: no torch, no GPU. Every part is a formula over the model
shape and the TrainConfig; the calibration constants below are the only
guesses, named so that measured H200 peaks can correct them.

Stages of a step (per GPU): rollout (vLLM awake) -> reference logprobs ->
update (forward/backward over micro-batches) -> optimizer step -> sync
(trainer weights into vLLM) -> next rollout.

Assumptions the trainer must keep true (else recalibrate):
- grpo_core.policy: FSDP2 `fully_shard` on every decoder layer plus the root,
  over all `gpus`; MixedPrecisionPolicy(param_dtype=model.dtype, reduce fp32);
  full FT keeps fp32 master weights (so fp32 grads, AdamW states and the
  reference copy); LoRA keeps the frozen base in model.dtype and the adapter
  in fp32; param_offload = CPUOffloadPolicy (state on host, CPU optimizer step).
- One in-process vLLM engine per rank (tensor_parallel_size 1 whenever there are several ranks:
  grpo_core.config.check_layout), in model.dtype, holding the full weights.
- Log-probs come from the LM head `head_chunk_tokens` tokens at a time
  (grpo_core.algorithm.lm_head_logprobs: no [tokens, vocab] logits, each
  chunk recomputed in backward, entropy from the same chunk). head_chunk_tokens=0
  models the full-logits path (logits built, then log-softmax in
  `logprob_chunk` positions), which the H200 calibration peaks were measured on.
Trainer-side parts were fitted to peaks measured on an H200 (FSDP2 LoRA-14B
and full-FT 1.5B/3B steps, tests/test_memory.py): within 1.5%. The vLLM,
context, NCCL and fragmentation parts are not calibrated yet.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import check_layout
from .constants import HEAD_CHUNK_TOKENS, LOGPROB_CHUNK

GIB = 1024**3

# ---- calibration constants (fit these to measured H200 peaks)
CUDA_CONTEXT_GIB = 0.75  # per process: CUDA context + cuBLAS workspaces, outside torch's allocator
NCCL_GIB = 0.5  # NCCL communicator buffers once a process group spans >1 GPU
FRAGMENTATION = 0.10  # reserved/allocated overhead on the trainer's GPU parts (H200, no expandable_segments: 4-23%)
# Advice (suggested changes, the KV-cache note) keeps the peak at or below this share of the GPU:
# the model is within a few percent of measured peaks, and an allocator spike beyond it is an OOM.
SUGGEST_HEADROOM = 0.95
VLLM_OVERHEAD_GIB = 1.0  # CUDA graphs + non-torch memory inside vLLM's budget
VLLM_MAX_BATCHED_TOKENS = 16384  # vLLM's profiling forward sets its activation reserve
VLLM_SLEEP_RESIDUAL_GIB = 0.5  # what a sleeping engine keeps (graph pools, non-cumem buffers)
BACKWARD_WORKSPACE = 0.5  # a layer's activation grads during its backward, as a fraction of its activations
ADAM_TEMP = 1.0  # foreach AdamW temporaries, as a fraction of the trainable shard (0 for fused)
LOGITS_FP32_BYTES = 14  # per chunk token x vocab: fp32 upcast, log-softmax, their grads (recomputed chunk)
ENTROPY_BYTES = 17  # per token x vocab: entropy over all logits (not chunked); measured the same with and without grad
HOST_PROCESS_GIB = 6.0  # host RSS of one rank (python, torch, vLLM) besides offloaded state
# A checkpoint gathers the full trainable weights and both AdamW states (fp32) on rank 0's host
# (torch.distributed.checkpoint full_state_dict + cpu_offload), and torch.load brings them back at
# resume: 3 fp32 copies of the trainable parameters, unsharded, besides the resident state.
CHECKPOINT_FP32_COPIES = 3
STAGES = ("rollout", "reference logprobs", "update", "update (end of backward)", "optimizer step", "sync")
ACT = 2  # bytes per activation element in bf16 compute (4 when model.dtype=float32: no mixed precision)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    head_dim: int = 0  # 0 -> hidden // heads

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear in a Qwen2 decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        weights = sum(a * b for a, b in self.linears().values())
        return weights + self.q_dim + 2 * self.kv_dim + 2 * self.hidden  # q/k/v biases, two RMSNorms

    def root_params(self) -> int:
        """Embedding, lm_head (unless tied) and the final norm: FSDP's root group."""
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()


KNOWN_SHAPES: dict[str, ModelShape] = {
    "Qwen2.5-0.5B": ModelShape(896, 24, 14, 2, 4864, 151936, True),
    "Qwen2.5-1.5B": ModelShape(1536, 28, 12, 2, 8960, 151936, True),
    "Qwen2.5-3B": ModelShape(2048, 36, 16, 2, 11008, 151936, True),
    "Qwen2.5-7B": ModelShape(3584, 28, 28, 4, 18944, 152064, False),
    "Qwen2.5-14B": ModelShape(5120, 48, 40, 8, 13824, 152064, False),
    "Qwen2.5-32B": ModelShape(5120, 64, 40, 8, 27648, 152064, False),
}


def shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    heads = int(cfg["num_attention_heads"])
    return ModelShape(
        hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]), heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads), intermediate=int(cfg["intermediate_size"]),
        vocab=int(cfg["vocab_size"]), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=int(cfg.get("head_dim") or 0))


def _known_name(model_path: str) -> str | None:
    sizes = set(re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)b(?![a-z0-9])", model_path.lower()))
    hits = [name for name in KNOWN_SHAPES if name.split("-")[1][:-1] in sizes]
    return hits[0] if len(hits) == 1 else None


def shape_name(model_path: str) -> str:
    """A display name: the known Qwen2.5 size named in the path, else the path's last part."""
    return _known_name(model_path) or Path(model_path).name or model_path


def shape_for(model_path: str) -> ModelShape:
    """From a local HF dir's config.json, else the one known Qwen2.5 size in the name ("...14B...")."""
    cfg_file = Path(model_path) / "config.json"
    if cfg_file.is_file():
        return shape_from_config(json.loads(cfg_file.read_text()))
    name = _known_name(model_path)
    if name is None:
        raise ValueError(f"cannot tell the model shape of {model_path!r}: not a local dir with config.json and "
                         f"not one known size; known: {', '.join(KNOWN_SHAPES)}")
    return KNOWN_SHAPES[name]


def shape_for_model(model: Any) -> ModelShape:
    """shape_for(model.path), or for a `model.tiny` not built yet, the shape grpo_core.tiny will build."""
    try:
        return shape_for(model.path)
    except ValueError:
        if not model.tiny:
            raise
    heads = max(1, model.tiny_hidden // 32)  # as grpo_core.tiny.build_tiny_model; vocab ~ its default 64
    return ModelShape(model.tiny_hidden, model.tiny_layers, heads, max(1, heads // 2), 2 * model.tiny_hidden, 64, False)


def lora_targets(shape: ModelShape, targets: str = "all-linear") -> list[str]:
    names = list(shape.linears())
    if targets == "all-linear":  # peft's all-linear: every linear except lm_head
        return names
    chosen = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in names]
    if unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r}; valid: all-linear or {', '.join(names)}")
    return chosen


def lora_params(shape: ModelShape, rank: int, targets: str = "all-linear") -> int:
    """A (r x in) + B (out x r) for each targeted linear of each layer."""
    lin = shape.linears()
    return shape.layers * sum(rank * (lin[t][0] + lin[t][1]) for t in lora_targets(shape, targets))


def layer_activation_bytes(shape: ModelShape, seq: int, *, full: bool, targets: list[str], rank: int,
                           attn: str, act: int = ACT) -> int:
    """Bytes one Qwen2 decoder layer saves for backward, per token (bf16 compute).

    Korthikanti et al. 2022's accounting (what autograd saves) redone for
    Qwen2: RMSNorm upcasts its input to fp32 and saves it (4h, +2h for the
    normalized input when its weight trains); a linear saves its input only
    when its weight (full) or its LoRA A trains; SwiGLU saves gate, silu(gate)
    and up (6I) and down's input (2I); no dropout. Attention saves q, k, v,
    output and fp32 logsumexp, with no s^2 term, except: HF's sdpa path with a
    padding mask repeats k/v to all heads and torch turns the bool mask into a
    bf16 bias per call (2s per token; packed rows: s is the whole pass); eager
    keeps the fp32 and bf16 probs.
    Checked on an H200 (14B-wide layers, peak allocated): within 1%.
    """
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    trains = set(shape.linears()) if full else set(targets)
    b = 2 * (4 * h + (act * h if full else 0))  # the two RMSNorms
    b += act * h * bool(trains & {"q_proj", "k_proj", "v_proj"}) + act * h * bool(trains & {"gate_proj", "up_proj"})
    b += act * i * ("down_proj" in trains) + act * 3 * i  # down's input; gate, silu(gate), up
    if attn == "eager":
        b += act * (2 * q + 2 * q) + shape.heads * seq * (4 + act) + act * q  # q, k/v repeated, probs, out copy
    elif attn.startswith("flash") or attn == "flex_attention":  # flex: a block mask, k/v not repeated
        b += act * (2 * q + 2 * kv) + 4 * shape.heads
    else:  # sdpa, padded batch: repeated k/v + per-layer bf16 mask bias
        b += act * 4 * q + 4 * shape.heads + act * seq
    if not full:
        b += act * rank * len(targets)  # each LoRA A output, saved by B
    return b


@dataclass(frozen=True)
class Part:
    name: str
    gib: float
    where: str  # gpu | host
    note: str = ""


@dataclass(frozen=True)
class Stage:
    name: str
    parts: tuple[Part, ...]

    def total(self, where: str = "gpu") -> float:
        return sum(p.gib for p in self.parts if p.where == where)


@dataclass(frozen=True)
class Knobs:
    """What the planner cannot read from TrainConfig."""
    head_chunk_tokens: int = HEAD_CHUNK_TOKENS  # tokens per LM-head chunk (the trainer's); 0 = full logits
    logprob_chunk: int = LOGPROB_CHUNK  # full logits only: positions per log-prob chunk; 0 = unchunked
    offload_style: str = "fsdp2"  # fsdp2: offloaded state stays on host, CPU optimizer step; swap: verl-style moves
    vllm_in_process: bool = True  # False: the engine core is another process with its own CUDA context
    entropy_metric: bool = True  # grpo_core.train logs entropy every micro-batch, even with entropy_coef=0
    gpus_per_node: int = 0  # for the host total per node; 0 = all gpus on one node
    host_mem_gib: float = 0.0  # host memory per node to check against; 0 = do not check


@dataclass
class Plan:
    model: str
    params: int
    trainable: int
    gpus: int
    gpu_mem_gib: float
    seq_len: int
    kv_tokens: int
    stages: list[Stage]
    host_per_node_gib: float
    knobs: Knobs
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    fixes: list[tuple[tuple[str, ...], float]] = field(default_factory=list)  # the suggestions: (changes, peak GiB)
    checkpoint_host_gib: float = 0.0  # rank 0's host, on top of its sync-stage host state, while saving/loading

    @property
    def peak_stage(self) -> Stage:
        return max(self.stages, key=lambda s: s.total("gpu"))

    @property
    def peak_gib(self) -> float:
        return self.peak_stage.total("gpu")

    @property
    def host_peak_gib(self) -> float:  # per GPU (rank)
        return max(s.total("host") for s in self.stages)

    @property
    def fits(self) -> bool:
        return not self.problems

    def parts_by_name(self) -> list[dict[str, Any]]:
        """Each part once, with the stages it is present in."""
        seen: dict[tuple[str, str, float], list[str]] = {}
        for s in self.stages:
            for p in s.parts:
                seen.setdefault((p.name, p.where, round(p.gib, 3)), []).append(s.name)
        return [{"name": n, "where": w, "gib": g, "stages": st} for (n, w, g), st in seen.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "params": self.params, "trainable": self.trainable, "gpus": self.gpus,
                "gpu_mem_gib": self.gpu_mem_gib, "seq_len": self.seq_len, "kv_tokens": self.kv_tokens,
                "peak_gib": round(self.peak_gib, 3), "peak_stage": self.peak_stage.name,
                "host_peak_gib_per_gpu": round(self.host_peak_gib, 3),
                "host_per_node_gib": round(self.host_per_node_gib, 3),
                "checkpoint_host_gib": round(self.checkpoint_host_gib, 3), "fits": self.fits,
                "problems": self.problems, "suggestions": self.suggestions, "notes": self.notes,
                "knobs": dataclasses.asdict(self.knobs),
                "constants": {k: v for k, v in globals().items() if k.isupper() and isinstance(v, (int, float))},
                "parts": self.parts_by_name(),
                "stages": [{"name": s.name, "gpu_gib": round(s.total("gpu"), 3), "host_gib": round(s.total("host"), 3),
                            "parts": [dataclasses.asdict(p) | {"gib": round(p.gib, 3)} for p in s.parts]}
                           for s in self.stages]}


def _gib(n: float) -> float:
    return n / GIB


def _build(name: str, shape: ModelShape, cfg: Any, gpus: int, gpu_mem_gib: float, k: Knobs) -> Plan:
    m, r, t = cfg.model, cfg.rollout, cfg.trainer
    tp, w = r.tensor_parallel_size, gpus
    if gpus < 1 or tp < 1 or gpus % tp:
        raise ValueError(f"gpus={gpus} must be a positive multiple of rollout.tensor_parallel_size={tp}")
    check_layout(cfg, gpus)  # one TP-1 engine per rank when there are several ranks
    lora = m.lora_rank > 0
    targets = lora_targets(shape, m.lora_target_modules) if lora else []
    P, L = shape.params(), (lora_params(shape, m.lora_rank, m.lora_target_modules) if lora else 0)
    trainable = L if lora else P
    dbytes = 4 if m.dtype == "float32" else 2  # LoRA's frozen base and the compute dtype (mixed precision)
    act = ACT if m.dtype == "bfloat16" else 4
    tbytes = 4  # fp32: full FT master weights (grpo_core.policy loads fp32), peft adapters; grads and Adam alike
    seq = cfg.data.max_prompt_tokens + r.max_tokens
    tokens = pass_tokens(t.micro_batch_tokens, t.micro_batch_size, seq)
    ref_tokens = pass_tokens(t.logprob_micro_batch_tokens, t.logprob_micro, seq)  # the no-grad log-prob passes
    recomputed = m.recomputed(shape.layers)  # the first layers recompute in backward
    notes: list[str] = []

    # ---- where trainer state lives in each stage
    def params_at(stage: str) -> str:
        if not t.param_offload:
            return "gpu"
        return "host" if k.offload_style == "fsdp2" or stage == "rollout" else "gpu"

    def optim_at(stage: str) -> str:
        if k.offload_style == "fsdp2":  # CPUOffloadPolicy steps on CPU: params offloaded => optimizer too
            return "host" if (t.optimizer_offload or t.param_offload) else "gpu"
        return "gpu" if not t.optimizer_offload or stage == "optimizer step" else "host"

    if t.optimizer_offload and not t.param_offload and k.offload_style == "fsdp2":
        notes.append("optimizer_offload without param_offload is modeled as host AdamW states with a CPU step;"
                     " grpo_core.policy offloads only through param_offload (CPUOffloadPolicy)")
    share = lora and m.share_base_weights
    if share:
        notes.append("base weights shared with vLLM: counted once, as vLLM's")
    elif lora:
        notes.append("model.share_base_weights=false: trainer and vLLM each hold the base weights")
    # ---- vLLM (per GPU)
    kv_heads_gpu = max(1, math.ceil(shape.kv_heads / tp))
    kv_per_token = 2 * shape.layers * kv_heads_gpu * shape.head_dim * dbytes  # vLLM serves model.dtype
    v_weights = _gib((P + L) * dbytes / tp)  # + LoRA slots (max_loras=1)
    v_act = VLLM_MAX_BATCHED_TOKENS * dbytes * (3 * shape.hidden + shape.q_dim * 2 + 2 * shape.kv_dim + 3 * shape.intermediate)
    v_work = VLLM_OVERHEAD_GIB + _gib(v_act / tp + r.max_num_seqs * shape.vocab * 8)  # + sampler fp32 logits/probs
    budget = r.gpu_memory_utilization * gpu_mem_gib
    kv_gib = budget - v_weights - v_work
    kv_tokens = max(0, int(kv_gib * GIB // kv_per_token))
    vw = Part(f"vLLM weights ({m.dtype}" + (" + LoRA slots" if lora else "") + f", /TP {tp})", v_weights, "gpu")
    vk = Part(f"vLLM KV cache ({kv_tokens} tokens)", max(kv_gib, 0.0), "gpu", "rest of gpu_memory_utilization")
    vx = Part("vLLM activations + CUDA graphs + sampler", v_work, "gpu")
    residual = Part(f"vLLM asleep (level {r.sleep_level}) residual", VLLM_SLEEP_RESIDUAL_GIB, "gpu")
    asleep = [residual]
    if r.sleep_level == 1:
        asleep.append(Part("vLLM weights backed up (sleep level 1)", v_weights, "host", "pinned"))
    if share:  # the trainer needs the shared base, so sleeping frees only the KV cache
        asleep = [vw, residual]
    vllm = {"rollout": [vw, vx, vk]}
    for s in STAGES[1:-1]:
        vllm[s] = [vw, vx, vk] if r.sleep_level == 0 else asleep
    vllm["sync"] = [vw, vx, vk] if r.sleep_level == 0 else [vw, residual]  # weights woken first, KV after sync

    # ---- trainer state (sharded over w GPUs)
    def state(stage: str) -> list[Part]:
        out: list[Part] = []
        pw = params_at(stage)
        if lora:
            if not share:
                out.append(Part(f"base weights ({m.dtype}, frozen, /{w})", _gib(P * dbytes / w), pw))
            out.append(Part(f"LoRA adapter (fp32, /{w})", _gib(L * 4 / w), pw))
        else:
            out.append(Part(f"weights (fp32 master, /{w})", _gib(P * 4 / w), pw))
            if cfg.algorithm.kl_coef > 0:  # a frozen copy of the master; "swap" brings it in for its stage only
                rw = pw if k.offload_style == "fsdp2" or not t.param_offload else (
                    "gpu" if stage == "reference logprobs" else "host")
                out.append(Part(f"reference model (fp32 copy, /{w})", _gib(P * 4 / w), rw))
        if stage.startswith("update") or stage == "optimizer step":  # grads of earlier micro-batches accumulate
            out.append(Part(f"{'LoRA ' if lora else ''}gradients (fp32, /{w})", _gib(trainable * tbytes / w), pw))
        ow = optim_at(stage)
        out.append(Part(f"AdamW states (2 x fp32, /{w})", _gib(2 * trainable * tbytes / w), ow))
        if stage == "optimizer step":
            if ow == "gpu":
                out.append(Part("AdamW foreach temporaries", ADAM_TEMP * _gib(trainable * tbytes / w), "gpu"))
            elif pw == "gpu":
                out.append(Part("gradients copied to host for the CPU step", _gib(trainable * tbytes / w), "host"))
        return out

    # ---- transient compute (GPU). Measured on an H200, the update peaks at the start of backward
    # (activations + logits + their grad + one recomputed log-prob chunk), a layer's recompute and
    # backward come later (logits freed), and full FT's root reduce-scatter at the end (activations freed).
    # packed rows are one sequence: sdpa's and eager's [s, s] terms span the pass
    span = lambda n: n if t.pack_sequences else seq  # noqa: E731
    act_layer, act_ref = (layer_activation_bytes(shape, span(n), full=not lora, targets=targets, rank=m.lora_rank,
                                                 attn=m.attn_implementation, act=act) for n in (tokens, ref_tokens))
    final = 4 * shape.hidden + (2 * act * shape.hidden if not lora else 0)  # final norm (+ weight, lm_head input)
    chunk_per_row = min(k.logprob_chunk, seq) if k.logprob_chunk else seq  # full-logits path: log-softmax positions
    # a token budget's rows may all be short ones: every position in the log-softmax chunk at worst
    chunk_tokens = tokens if t.micro_batch_tokens else t.micro_batch_size * chunk_per_row
    ref_chunk_tokens = ref_tokens if t.logprob_micro_batch_tokens else t.logprob_micro * chunk_per_row
    root = shape.root_params()
    # A shared base stays out of FSDP2: nothing of it is all-gathered.
    fsdp_root = Part(f"FSDP root all-gathered (embed + lm_head, {m.dtype})", 0.0 if share else _gib(root * dbytes), "gpu")
    fsdp = Part(f"FSDP all-gathered: root + 2 layers ({m.dtype})",  # the layer in use + the prefetched one
                0.0 if share else _gib((root + 2 * shape.layer_params()) * dbytes), "gpu")
    layer_grads = 0 if lora else shape.layer_params() * (act + 4)  # unsharded grads + their fp32 reduce-scatter input

    def compute(stage: str) -> list[Part]:
        if stage == "reference logprobs":
            if k.head_chunk_tokens:  # one chunk's logits and their fp32 upcast/log-softmax
                logits = shape.vocab * min(k.head_chunk_tokens, ref_tokens) * (act + 8)
            else:  # all logits + a chunk's fp32 upcast/log-softmax
                logits = shape.vocab * (act * ref_tokens + 8 * ref_chunk_tokens)
            layer = act_ref * ref_tokens
            big = (("logits + fp32 log-softmax chunk", logits, f"layer forward {_gib(layer):.1f} GiB")
                   if logits >= layer else ("layer forward (1 layer)", layer, f"logits {_gib(logits):.1f} GiB"))
            return [fsdp, Part(big[0], _gib(big[1]), "gpu", f"the larger; {big[2]}")]
        if stage == "update":
            ckpt = (shape.layers * act * shape.hidden + final) * tokens  # checkpointed layer inputs
            no_ckpt = (shape.layers * act_layer + final) * tokens
            # recomputed layers keep their input only, the others all they save
            a = (recomputed * act * shape.hidden + (shape.layers - recomputed) * act_layer + final) * tokens
            what, alt = (("checkpointed layer inputs", f"{_gib(no_ckpt):.1f} GiB without checkpointing")
                         if recomputed == shape.layers else
                         ("all layers", f"{_gib(ckpt):.1f} GiB with checkpointing") if not recomputed else
                         (f"the first {recomputed} of {shape.layers} layers recomputed",
                          f"{_gib(ckpt):.1f} GiB all recomputed, {_gib(no_ckpt):.1f} GiB none"))
            ent = ENTROPY_BYTES * tokens if cfg.algorithm.entropy_coef > 0 or k.entropy_metric else 0
            if k.head_chunk_tokens:  # one recomputed chunk: logits, fp32 log-softmax and grads, entropy from it
                logits = shape.vocab * min(k.head_chunk_tokens, tokens) * (
                    2 * act + LOGITS_FP32_BYTES + (8 if ent else 0))
            else:
                logits = shape.vocab * (2 * act * tokens + LOGITS_FP32_BYTES * chunk_tokens + ent)
            # A recomputed layer's activations exist again during its backward. The first layers' backward
            # comes last, when the later layers' activations are freed: only when the last layer recomputes
            # too does its recompute coincide with everything else held.
            layer = (act_layer * tokens if recomputed == shape.layers else 0) + BACKWARD_WORKSPACE * act_layer * tokens
            layer += layer_grads
            big = (("logits + grad + fp32 chunk" + (" + entropy" if ent else ""), logits, f"layer backward {_gib(layer):.1f} GiB")
                   if logits >= layer else ("layer recompute + backward", layer, f"logits {_gib(logits):.1f} GiB"))
            return [fsdp, Part(f"activations ({what}, {tokens} tokens)", _gib(a), "gpu", alt),
                    Part(big[0], _gib(big[1]), "gpu", f"the larger; {big[2]}")]
        if stage == "update (end of backward)":  # root grads' fp32 reduce-scatter input (its output is the grad shard)
            return [fsdp_root, Part("root grads reduce-scatter input (fp32)", _gib(root * 4) if not lora else 0.0, "gpu")]
        if stage == "sync":  # full FT: WeightSync.full_weights gathers one fp32 tensor + its copy at a time; LoRA: adapter file
            biggest = max(shape.vocab, shape.intermediate) * shape.hidden * (4 + dbytes) if not lora else L * 4 / shape.layers
            return [Part("gathered weight in flight to vLLM", _gib(biggest), "gpu")]
        return []

    fixed = [Part("CUDA context", CUDA_CONTEXT_GIB * (1 if k.vllm_in_process else 2), "gpu")]
    if gpus > 1:
        fixed.append(Part("NCCL buffers", NCCL_GIB, "gpu"))
    stages = []
    for s in STAGES:
        trainer = state(s) + compute(s)
        frag = FRAGMENTATION * sum(p.gib for p in trainer if p.where == "gpu")
        parts = fixed + vllm[s] + trainer + [Part("allocator fragmentation (trainer)", frag, "gpu")]
        parts.append(Part("process host memory", HOST_PROCESS_GIB, "host"))
        stages.append(Stage(s, tuple(p for p in parts if p.gib > 0)))
    per_node = min(gpus, k.gpus_per_node or gpus)
    plan = Plan(name, P, trainable, gpus, gpu_mem_gib, seq, kv_tokens, stages, 0.0, k, notes)
    # Offloaded state is pinned host memory (CPUOffloadPolicy pins the shards): it counts in RSS.
    plan.checkpoint_host_gib = _gib(CHECKPOINT_FP32_COPIES * trainable * tbytes)
    at_save = {s.name: s for s in stages}["sync"].total("host") * per_node + plan.checkpoint_host_gib
    plan.host_per_node_gib = max(plan.host_peak_gib * per_node, at_save)
    if plan.peak_gib > gpu_mem_gib:
        plan.problems.append(f"peak {plan.peak_gib:.1f} GiB per GPU at '{plan.peak_stage.name}' > {gpu_mem_gib:g} GiB")
    if seq <= kv_tokens < seq * r.max_num_seqs:
        notes.append(f"KV cache holds {kv_tokens // seq} full-length sequences < max_num_seqs={r.max_num_seqs}: "
                     "rollouts run below full concurrency")
    if kv_tokens < seq:
        plan.problems.append(f"vLLM KV cache holds {kv_tokens} tokens < one sequence of {seq} "
                             f"(weights+workspace {v_weights + v_work:.1f} of {budget:.1f} GiB budget)")
    if k.host_mem_gib and plan.host_per_node_gib > k.host_mem_gib:
        plan.problems.append(f"host memory {plan.host_per_node_gib:.1f} GiB per node > {k.host_mem_gib:g} GiB")
    return plan


def pass_tokens(budget: int, rows: int, seq: int) -> int:
    """A pass's most token slots: its token budget (a longer row runs alone), else `rows` rows of `seq`."""
    return max(budget, seq) if budget else rows * seq


def largest_budget(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs,
                   key: str, step: int = 256) -> tuple[int, float] | None:
    """The largest token budget for `key` (trainer.micro_batch_tokens or trainer.logprob_micro_batch_tokens)
    whose plan keeps SUGGEST_HEADROOM, and its peak: a multiple of `step` tokens (or one sequence), at
    most a rank's whole mini-batch (the update) or batch (the no-grad passes). None: not even one sequence."""
    t, seq = cfg.trainer, cfg.data.max_prompt_tokens + cfg.rollout.max_tokens
    prompts = t.mini_batch_prompts if key == "trainer.micro_batch_tokens" else t.prompts_per_step
    most = -(-prompts * cfg.rollout.n // gpus) * seq
    sizes = [seq] + list(range(-(-seq // step) * step, most, step)) + [most]
    sizes = sorted(set(x for x in sizes if seq <= x <= most))
    peak = lambda i: _build(name, shape, _with(cfg, key, sizes[i]), gpus, mem, k)  # noqa: E731
    lo, hi, best = 0, len(sizes) - 1, None  # the peak grows with the budget: bisect
    while lo <= hi:
        mid = (lo + hi) // 2
        q = peak(mid)
        if _roomy(q):
            best, lo = (sizes[mid], q.peak_gib), mid + 1
        else:
            hi = mid - 1
    return best


def fewest_recomputed(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs,
                      above: int = 0) -> tuple[int, float] | None:
    """The fewest recomputed layers (the first ones; more than `above`, fewer than all, which is
    gradient_checkpointing's own) whose plan keeps SUGGEST_HEADROOM, and its peak; None if none does."""
    ckpt = _with(cfg, "model.gradient_checkpointing", True)
    lo, hi, best = above + 1, shape.layers - 1, None
    while lo <= hi:  # the peak falls with each recomputed layer: bisect
        mid = (lo + hi) // 2
        q = _build(name, shape, _with(ckpt, "model.recompute_layers", mid), gpus, mem, k)
        if _roomy(q):
            best, hi = (mid, q.peak_gib), mid - 1
        else:
            lo = mid + 1
    return best


def _roomy(p: Plan) -> bool:
    """Fits with SUGGEST_HEADROOM: what advice may propose."""
    return p.fits and p.peak_gib <= SUGGEST_HEADROOM * p.gpu_mem_gib


def _with(cfg: Any, key: str, value: Any) -> Any:
    section, name = key.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def _excess(p: Plan) -> float:
    """How far a plan is from fitting (0 = fits), for ranking partial fixes."""
    host = max(0.0, p.host_per_node_gib - p.knobs.host_mem_gib) if p.knobs.host_mem_gib else 0.0
    return max(0.0, p.peak_gib - SUGGEST_HEADROOM * p.gpu_mem_gib) + host + (1000.0 if p.kv_tokens < p.seq_len else 0.0)


def _single_changes(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs) -> list[tuple[str, Any, int]]:
    """Candidate one-key changes, in order of preference; searched ones (micro-batch, utilization) only if they fit."""
    m, r, t = cfg.model, cfg.rollout, cfg.trainer
    c: list[tuple[str, Any, int]] = []
    some = fewest_recomputed(name, shape, cfg, gpus, mem, k, m.recompute_layers if m.gradient_checkpointing else 0)
    if some is not None:  # recomputing only the first layers, before recomputing all of them
        c2 = _with(_with(cfg, "model.gradient_checkpointing", True), "model.recompute_layers", some[0])
        switch = "" if m.gradient_checkpointing else "model.gradient_checkpointing=true + "
        c.append((f"{switch}model.recompute_layers={some[0]}", c2, gpus))
    if not m.gradient_checkpointing:
        c.append(("model.gradient_checkpointing=true", _with(cfg, "model.gradient_checkpointing", True), gpus))
    elif m.recompute_layers:
        c.append(("model.recompute_layers=0", _with(cfg, "model.recompute_layers", 0), gpus))
    for key in ("trainer.micro_batch_tokens", "trainer.logprob_micro_batch_tokens"):  # a budget set: a smaller one
        size = largest_budget(name, shape, cfg, gpus, mem, k, key) if getattr(t, key[8:]) else None
        if size is not None and size[0] < getattr(t, key[8:]):
            c.append((f"{key}={size[0]}", _with(cfg, key, size[0]), gpus))
    # the largest micro-batch that fits; the log-prob one only when set apart (0 follows the update's)
    for key, current in (("trainer.micro_batch_size", t.micro_batch_size),
                         ("trainer.logprob_micro_batch_size", t.logprob_micro_batch_size)):
        for mb in range(current - 1, 0, -1):
            c2 = _with(cfg, key, mb)
            if _roomy(_build(name, shape, c2, gpus, mem, k)):
                c.append((f"{key}={mb}", c2, gpus))
                break
    if r.sleep_level == 0:
        c.append(("rollout.sleep_level=1", _with(cfg, "rollout.sleep_level", 1), gpus))
    for key in ("trainer.optimizer_offload", "trainer.param_offload"):  # on: GPU -> host; off: host -> GPU
        c.append((f"{key}={str(not getattr(t, key[8:])).lower()}", _with(cfg, key, not getattr(t, key[8:])), gpus))
    if r.sleep_level == 1:  # no host backup of vLLM's weights; sync rewrites them anyway
        c.append(("rollout.sleep_level=2", _with(cfg, "rollout.sleep_level", 2), gpus))
    for u in sorted((u / 100 for u in range(5, 96)), key=lambda u: abs(u - r.gpu_memory_utilization)):
        c2 = _with(cfg, "rollout.gpu_memory_utilization", u)
        if u != r.gpu_memory_utilization and _roomy(_build(name, shape, c2, gpus, mem, k)):
            c.append((f"rollout.gpu_memory_utilization={u:.2f}", c2, gpus))  # the nearest that fits
            break
    return c + [(f"use {g} GPUs", cfg, g) for g in (2 * gpus, 4 * gpus, 8 * gpus)]


def _partial_changes(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs) -> list[tuple[str, Any, int]]:
    """Single changes plus steps that only help: half the micro-batch; the least utilization that holds a sequence."""
    c = _single_changes(name, shape, cfg, gpus, mem, k)
    if cfg.trainer.micro_batch_size > 1:
        mb = cfg.trainer.micro_batch_size // 2
        c.append((f"trainer.micro_batch_size={mb}", _with(cfg, "trainer.micro_batch_size", mb), gpus))
    for u in range(round(cfg.rollout.gpu_memory_utilization * 100) + 1, 96):
        c2 = _with(cfg, "rollout.gpu_memory_utilization", u / 100)
        q = _build(name, shape, c2, gpus, mem, k)
        if q.kv_tokens >= q.seq_len:
            c.append((f"rollout.gpu_memory_utilization={u / 100:.2f}", c2, gpus))
            break
    return c


def _fitting(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for label, c2, g in _single_changes(name, shape, cfg, gpus, mem, k):
        q = _build(name, shape, c2, g, mem, k)
        group = label.split("=")[0].split(" ")[0]  # only the smallest TP / GPU count that fits
        if _roomy(q) and not any(f.startswith(group) for f, _ in out):
            out.append((label, q.peak_gib))
    return out


def _sizing_notes(name: str, shape: ModelShape, cfg: Any, gpus: int, mem: float, k: Knobs, tune: bool) -> list[str]:
    """The largest token budgets and the fewest recomputed layers that fit, for the keys set (or all: tune)."""
    notes = []
    for key, what in (("trainer.micro_batch_tokens", "update"), ("trainer.logprob_micro_batch_tokens", "no-grad log-prob")):
        if tune or getattr(cfg.trainer, key[8:]):
            size = largest_budget(name, shape, cfg, gpus, mem, k, key)
            notes.append(f"{key}={size[0]} fits (peak {size[1]:.1f} GiB): the largest {what} token budget at "
                         f"<= {SUGGEST_HEADROOM:.0%} of the GPU" if size else f"{key}: not even one sequence fits")
    m = cfg.model
    if m.gradient_checkpointing and (tune or m.recompute_layers):
        some = fewest_recomputed(name, shape, cfg, gpus, mem, k)
        if some is not None:
            notes.append(f"model.recompute_layers={some[0]} fits (peak {some[1]:.1f} GiB): the fewest recomputed "
                         f"layers of {shape.layers} at <= {SUGGEST_HEADROOM:.0%} of the GPU")
    return notes


def plan(shape: ModelShape, cfg: Any, gpus: int, gpu_mem_gib: float, knobs: Knobs = Knobs(), name: str = "",
         tune: bool = False) -> Plan:
    """The memory plan; if it does not fit, `suggestions` lists changes (one, else two) that make it fit.
    A fitting plan's notes size the token budgets and recomputed layers that are set (tune: all of them)."""
    p = _build(name, shape, cfg, gpus, gpu_mem_gib, knobs)
    r = cfg.rollout
    if p.fits:
        p.notes += _sizing_notes(name, shape, cfg, gpus, gpu_mem_gib, knobs, tune)
        if not _roomy(p):
            p.notes.append(f"the peak is {100 * p.peak_gib / gpu_mem_gib:.1f}% of the GPU: less than "
                           f"{100 * (1 - SUGGEST_HEADROOM):.0f}% headroom for allocator spikes the model does not see")
        if p.kv_tokens < p.seq_len * r.max_num_seqs:  # headroom could go to the KV cache (rollout throughput)
            for u in range(95, round(r.gpu_memory_utilization * 100), -1):
                q = _build(name, shape, _with(cfg, "rollout.gpu_memory_utilization", u / 100), gpus, gpu_mem_gib, knobs)
                if _roomy(q):
                    p.notes.append(f"rollout.gpu_memory_utilization={u / 100:.2f} still fits (peak {q.peak_gib:.1f} GiB):"
                                   f" KV cache for {q.kv_tokens // q.seq_len} full-length sequences")
                    break
        return p
    found = _fitting(name, shape, cfg, gpus, gpu_mem_gib, knobs)
    singles = {label for label, _ in found}
    for label, c2, g in _single_changes(name, shape, cfg, gpus, gpu_mem_gib, knobs):
        if len(found) >= 4 or label.startswith("use "):
            break
        if label in singles or _excess(_build(name, shape, c2, g, gpu_mem_gib, knobs)) >= _excess(p):
            continue  # pairs start with a change that helps but is not enough
        more = [(m, pk) for m, pk in _fitting(name, shape, c2, g, gpu_mem_gib, knobs)
                if m not in singles and not m.startswith(("use ", label.split("=")[0]))]
        if more and f"{label} + {more[0][0]}" not in {f for f, _ in found}:  # a pair may repeat a two-key single
            found.append((f"{label} + {more[0][0]}", more[0][1]))
    if not found:  # greedy: take the change that helps most, a few times, until one more change fits
        c2, g, combo = cfg, gpus, []
        for _ in range(5):
            fit = _fitting(name, shape, c2, g, gpu_mem_gib, knobs)
            if fit:
                last = {label.split("=")[0].split(" ")[0]: label for label in combo + [fit[0][0]]}  # later wins
                found = [(" + ".join(last.values()), fit[0][1])]
                break
            now = _excess(_build(name, shape, c2, g, gpu_mem_gib, knobs))
            tried = [(_excess(_build(name, shape, c3, g3, gpu_mem_gib, knobs)), n, label, c3, g3)
                     for n, (label, c3, g3) in enumerate(_partial_changes(name, shape, c2, g, gpu_mem_gib, knobs))]
            best = min(tried, key=lambda x: (x[0], x[1]), default=None)
            if best is None or best[0] >= now:
                break
            c2, g, combo = best[3], best[4], combo + [best[2]]
    p.suggestions = [f"{label} (peak -> {pk:.1f} GiB)" for label, pk in found]
    p.fixes = [(tuple(label.split(" + ")), pk) for label, pk in found]
    return p

