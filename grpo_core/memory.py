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
import math
from dataclasses import dataclass, field
from typing import Any

from .config import check_layout
from .constants import HEAD_CHUNK_TOKENS, LOGPROB_CHUNK
from .modelshape import ModelShape, lora_params, lora_targets

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


def build(name: str, shape: ModelShape, cfg: Any, gpus: int, gpu_mem_gib: float, k: Knobs) -> Plan:
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
    # a pass's unit: a row, or with share_prompts a prompt group (its prompt once, then n responses)
    unit, per_pass = (cfg.data.max_prompt_tokens + r.n * r.max_tokens, r.n) if t.share_prompts else (seq, 1)
    tokens = pass_tokens(t.micro_batch_tokens, max(1, t.micro_batch_size // per_pass) * per_pass, seq, unit)
    ref_tokens = pass_tokens(t.logprob_micro_batch_tokens, max(1, t.logprob_micro // per_pass) * per_pass, seq,
                             unit)  # the no-grad log-prob passes
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
    # prompt groups: one additive bf16 mask per pass, made once (grpo_core.policy), not a bias per layer
    span = lambda n: n if t.pack_sequences else 0 if t.share_prompts else seq  # noqa: E731
    group_mask = (lambda n: Part(f"prompt-group attention mask ({m.dtype}, [groups, {unit}, {unit}] at most)",
                                 _gib(act * n * unit), "gpu")) if t.share_prompts else None
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
            return [fsdp, Part(big[0], _gib(big[1]), "gpu", f"the larger; {big[2]}")] + (
                [group_mask(ref_tokens)] if group_mask else [])
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
                    Part(big[0], _gib(big[1]), "gpu", f"the larger; {big[2]}")] + ([group_mask(tokens)] if group_mask else [])
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


def pass_tokens(budget: int, rows: int, seq: int, unit: int | None = None) -> int:
    """A pass's most token slots: its token budget (a longer unit, a row of `seq` or a prompt group of
    `unit`, runs alone), else `rows` rows of `seq`."""
    return max(budget, unit or seq) if budget else rows * seq
