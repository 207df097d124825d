"""Typed, frozen configuration for a GRPO run: the only place defaults live.

A config is built from plain data (YAML) by grpo_core.strictconf, which
rejects unknown keys and wrong types with one line that names the valid
keys. Dotted `key=value` overrides are parsed against the field's declared
type, so `rollout.n=8` is an int and `model.path=123` stays a string. Here:
the fields and their defaults, the cross-field checks (`validate`), `load`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .constants import DTYPES, KL_ESTIMATORS, LOSS_AGG_MODES
from .reward import REWARD_MODES
from .strictconf import apply_overrides, build, check_text, ConfigError, flatten, INT_MAX, locate, read_yaml, shown, to_dict


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # HF model dir (or hub id); required
    tiny: bool = False  # build a tiny random-init Qwen2 + offline tokenizer at `path` if absent
    tiny_hidden: int = 64  # the tiny model's hidden size (model.tiny)
    tiny_layers: int = 2  # the tiny model's layer count (model.tiny)
    # the tiny model's init std (HF's initializer_range); larger gives a frozen random head sharper logits (LoRA)
    tiny_init_std: float = 0.02
    dtype: str = "float32"  # weights and compute of trainer and vLLM (LoRA adapters stay fp32)
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: int = 32  # LoRA scaling is lora_alpha / lora_rank
    lora_target_modules: str = "all-linear"  # or comma-separated module names
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute
    # with gradient_checkpointing: only the first N decoder layers recompute (0: all), the others keep their
    # activations (faster; jobs.plan --tune: the fewest that fit)
    recompute_layers: int = 0
    # torch.compile each decoder layer of the trainer's model (fused norms, rotary, SiLU and LoRA adds; the first
    # passes of each shape compile, then shapes stay dynamic)
    compile: bool = False
    attn_implementation: str = "sdpa"  # the HF trainer model's attention (transformers' attn_implementation)
    load_format: str = "auto"  # vLLM's; "dummy" = random weights (benchmarks)
    # LoRA on CUDA: the frozen base is vLLM's own weights (views), not a second copy
    share_base_weights: bool = False

    def recomputed(self, layers: int) -> int:
        """How many of the model's `layers` decoder layers (the first ones) recompute in backward."""
        if self.recompute_layers > layers:
            raise ConfigError(f"model.recompute_layers={self.recompute_layers} > the model's {layers} decoder layers")
        return (self.recompute_layers or layers) if self.gradient_checkpointing else 0


@dataclass(frozen=True)
class DataConfig:
    # gsm8k | synthetic | module:function (a factory (DataConfig, seed) -> grpo_core.tasks.Task)
    task: str = "gsm8k"
    # "" = the task's own score; module:function = a (response, ground_truth) -> float reward
    reward: str = ""
    reward_mode: str = "strict"  # GSM8K scoring: strict (after ####) | flexible (last number)
    format_score: float = 0.0  # reward of a wrong answer in the right format (built-in tasks)
    train_path: str = ""  # local .jsonl/.parquet; "" -> datasets hub openai/gsm8k
    test_path: str = ""  # like train_path, for validation; "" -> the hub's test split
    hub_name: str = "openai/gsm8k"  # datasets hub id used when a path is ""
    max_prompt_tokens: int = 512  # longer prompts are dropped; also sizes vLLM's max_model_len
    synthetic_max_sum: int = 4  # synthetic task: largest sum asked
    synthetic_train_size: int = 2000  # synthetic task: training prompts
    synthetic_test_size: int = 64  # synthetic task: validation prompts
    shuffle: bool = True  # reshuffle the training prompts every epoch (seeded by trainer.seed)


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "vllm"  # vllm | module:factory (another grpo_core.engine.Engine, e.g. tests.fake_engine:FakeEngine)
    n: int = 5  # samples per prompt: the GRPO group
    temperature: float = 1.0  # sampling temperature of training rollouts (validation is greedy)
    top_p: float = 1.0  # nucleus sampling of training rollouts
    max_tokens: int = 1024  # response tokens per sample; longer ones are cut (response_clip_ratio)
    val_max_tokens: int = 1024  # response tokens per validation answer
    gpu_memory_utilization: float = 0.25  # vLLM's share of the GPU: weights + KV cache
    cpu_kv_cache_gib: float = 0.25  # VLLM_CPU_KVCACHE_SPACE on CPU
    max_num_seqs: int = 256  # vLLM's concurrent sequences
    tensor_parallel_size: int = 1  # GPUs per vLLM engine (1: one engine per rank)
    enforce_eager: bool = False  # vLLM without CUDA graphs (slower, starts faster)
    enable_prefix_caching: bool = True  # vLLM reuses the KV of a prompt shared by the n samples
    # 0: engine stays awake; 1/2: KV cache released during the update and the
    # weights offloaded to host (1) or dropped and re-sent (2); with a shared
    # base only the KV cache is released
    sleep_level: int = 0


@dataclass(frozen=True)
class AlgorithmConfig:
    adv_eps: float = 1e-6  # added to the group std before dividing
    norm_adv_by_std: bool = True  # False = Dr.GRPO
    clip_low: float = 0.2  # PPO ratio clip below 1 (1 - clip_low)
    clip_high: float = 0.2  # PPO ratio clip above 1 (1 + clip_high)
    kl_coef: float = 0.001  # KL-to-reference loss weight; 0 = no reference pass
    kl_estimator: str = "k3"  # Schulman's KL estimators; k3 = low-variance, non-negative
    entropy_coef: float = 0.0  # entropy bonus weight
    loss_agg: str = "token-mean"  # how token losses are averaged (verl's names): over all tokens, or per sequence first


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6  # AdamW learning rate (constant after warmup)
    weight_decay: float = 0.01  # AdamW
    beta1: float = 0.9  # AdamW
    beta2: float = 0.999  # AdamW
    eps: float = 1e-8  # AdamW
    grad_clip: float = 1.0  # max global grad norm
    warmup_steps: int = 0  # linear LR warmup over this many optimizer steps


@dataclass(frozen=True)
class TrainerConfig:
    run_dir: str = "runs/default"  # checkpoints, metrics and status; a run always resumes from here
    total_steps: int = 10  # GRPO steps (one rollout batch each)
    prompts_per_step: int = 116  # prompts per rollout batch (x rollout.n samples)
    mini_batch_prompts: int = 116  # one optimizer step per mini-batch
    micro_batch_size: int = 8  # sequences per forward/backward
    # sequences per no-grad log-prob forward (reference, old policy); 0 = micro_batch_size.
    # It keeps no activations, so it can be larger, and short rows then make larger GEMMs.
    logprob_micro_batch_size: int = 0
    # a micro-batch's rows as one sequence (positions restart per row, attention stays within a row): no padding
    # slots. On a GPU pair it with model.attn_implementation=flex_attention (sdpa computes the whole packed square)
    pack_sequences: bool = False
    # each prompt's rollout.n responses as one sequence behind a single copy of the prompt (a mask keeps the
    # responses apart): the prompt's tokens are computed once per group, not n times, in the log-prob passes and
    # the update. The cut's units are then groups: micro_batch_tokens counts groups x the longest group,
    # micro_batch_size rows make micro_batch_size // n groups (at least one)
    share_prompts: bool = False
    # token slots per forward/backward instead of micro_batch_size rows (0: rows): rows longest first, binned so
    # each pass holds at most this many (padded: rows x the longest; packed: their tokens); a longer row runs alone
    micro_batch_tokens: int = 0
    # the same for the no-grad log-prob passes (0: logprob_micro_batch_size rows)
    logprob_micro_batch_tokens: int = 0
    ppo_epochs: int = 1  # passes over each rollout batch
    seed: int = 0  # data order, sampling and init
    val_every: int = 0  # 0 = never
    val_prompts: int = 0  # 0 = the whole test split
    device: str = "auto"  # auto: cuda when a GPU is visible, else cpu
    num_threads: int = 0  # torch intra-op threads; 0 = leave as is
    param_offload: bool = False  # FSDP2 keeps parameters on the host between uses
    optimizer_offload: bool = False  # optimizer state on the host (the step runs on CPU)

    @property
    def logprob_micro(self) -> int:
        """Rows per no-grad log-prob forward (logprob_micro_batch_size, or micro_batch_size when 0)."""
        return self.logprob_micro_batch_size or self.micro_batch_size


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # steps; 0 = only on preemption and at the end
    keep: int = 2  # complete checkpoints kept (older ones deleted)
    save_final: bool = True  # a checkpoint after the last step
    start_over: bool = False  # when checkpoints exist but none loads: start from step 0 instead of refusing
    # Save and requeue when the next step plus a checkpoint plus this margin would
    # pass the Slurm job's time limit (grpo_core/walltime.py); needs no --signal.
    walltime_save: bool = True
    walltime_margin_s: float = 30.0


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True  # log to MLflow
    experiment: str = "grpo"  # MLflow experiment name
    run_name: str = ""  # "" = the run dir's name
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite next to the run dir
    system_metrics: bool = False  # MLflow system metrics: CPU, host memory, GPU (psutil, NVML)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# The allowed values of the keys that take one of a few (validate checks them, --help lists them).
CHOICES: dict[str, tuple[Any, ...]] = {
    "model.dtype": DTYPES,
    "rollout.sleep_level": (0, 1, 2),
    "algorithm.kl_estimator": KL_ESTIMATORS,
    "algorithm.loss_agg": LOSS_AGG_MODES,
    "data.reward_mode": REWARD_MODES,
    "trainer.device": ("auto", "cpu", "cuda"),
}


def validate(cfg: TrainConfig) -> TrainConfig:
    """Cross-field checks that types alone cannot express."""
    t, a = cfg.trainer, cfg.algorithm
    check_text(to_dict(cfg))
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}; valid values: {', '.join(map(str, allowed))}")
    if not cfg.model.path:
        raise ConfigError("model.path is required")
    if not t.run_dir.strip():
        raise ConfigError("trainer.run_dir is required (an empty one would be the current directory)")
    from .tasks import BUILTIN_TASKS, check_plugins  # tasks imports this module

    if cfg.data.task not in BUILTIN_TASKS and ":" not in cfg.data.task:
        raise ConfigError(f"data.task={cfg.data.task!r}; valid values: {', '.join(BUILTIN_TASKS)}, or module:function")
    check_plugins(cfg.data)
    if cfg.rollout.engine != "vllm":
        from .tasks import load_callable

        load_callable(cfg.rollout.engine, "rollout.engine")
    positive = {
        "trainer.total_steps": t.total_steps, "trainer.prompts_per_step": t.prompts_per_step,
        "trainer.mini_batch_prompts": t.mini_batch_prompts, "trainer.micro_batch_size": t.micro_batch_size,
        "trainer.ppo_epochs": t.ppo_epochs, "rollout.n": cfg.rollout.n, "rollout.max_tokens": cfg.rollout.max_tokens,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if cfg.checkpoint.walltime_margin_s < 0:
        raise ConfigError(f"checkpoint.walltime_margin_s={cfg.checkpoint.walltime_margin_s} must be >= 0")
    r, o, m, d, c = cfg.rollout, cfg.optim, cfg.model, cfg.data, cfg.checkpoint
    for key, value in flatten(to_dict(cfg)).items():
        if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}={value} must be a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
            raise ConfigError(f"{key}={shown(value)} must be at most {INT_MAX} in size")
    at_least = {  # key: (value, lowest allowed)
        "rollout.val_max_tokens": (r.val_max_tokens, 1), "rollout.max_num_seqs": (r.max_num_seqs, 1),
        "rollout.tensor_parallel_size": (r.tensor_parallel_size, 1), "data.max_prompt_tokens": (d.max_prompt_tokens, 1),
        "data.synthetic_max_sum": (d.synthetic_max_sum, 1), "data.synthetic_train_size": (d.synthetic_train_size, 1),
        "data.synthetic_test_size": (d.synthetic_test_size, 1), "model.tiny_hidden": (m.tiny_hidden, 1),
        "model.tiny_layers": (m.tiny_layers, 1), "model.lora_rank": (m.lora_rank, 0),
        "model.lora_alpha": (m.lora_alpha, 1), "model.recompute_layers": (m.recompute_layers, 0), "checkpoint.every": (c.every, 0), "checkpoint.keep": (c.keep, 1),
        "trainer.val_every": (t.val_every, 0), "trainer.val_prompts": (t.val_prompts, 0),
        "trainer.num_threads": (t.num_threads, 0), "trainer.micro_batch_tokens": (t.micro_batch_tokens, 0),
        "trainer.logprob_micro_batch_tokens": (t.logprob_micro_batch_tokens, 0), "trainer.seed": (t.seed, 0), "optim.warmup_steps": (o.warmup_steps, 0),
        "optim.weight_decay": (o.weight_decay, 0), "optim.grad_clip": (o.grad_clip, 0),
        "algorithm.clip_low": (a.clip_low, 0), "algorithm.clip_high": (a.clip_high, 0),
        "algorithm.kl_coef": (a.kl_coef, 0), "algorithm.entropy_coef": (a.entropy_coef, 0),
    }
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key}={value} must be >= {low}")
    above_zero = {"optim.lr": o.lr, "optim.eps": o.eps, "rollout.temperature": r.temperature,
                  "rollout.cpu_kv_cache_gib": r.cpu_kv_cache_gib, "algorithm.adv_eps": a.adv_eps}
    for key, value in above_zero.items():
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    fractions = {"model.tiny_init_std": (m.tiny_init_std, False), "rollout.top_p": (r.top_p, False), "rollout.gpu_memory_utilization": (r.gpu_memory_utilization, False),
                 "optim.beta1": (o.beta1, True), "optim.beta2": (o.beta2, True)}
    for key, (value, zero_ok) in fractions.items():
        if not ((0 <= value if zero_ok else 0 < value) and (value < 1 if zero_ok else value <= 1)):
            raise ConfigError(f"{key}={value} must be in {'[0, 1)' if zero_ok else '(0, 1]'}")
    if t.logprob_micro_batch_size < 0:
        raise ConfigError(f"trainer.logprob_micro_batch_size={t.logprob_micro_batch_size} must be >= 0 "
                          "(0: the same as trainer.micro_batch_size)")
    if m.recompute_layers and not m.gradient_checkpointing:
        raise ConfigError(f"model.recompute_layers={m.recompute_layers} needs model.gradient_checkpointing=true")
    if t.prompts_per_step % t.mini_batch_prompts:
        raise ConfigError(
            f"trainer.mini_batch_prompts={t.mini_batch_prompts} does not divide trainer.prompts_per_step={t.prompts_per_step}"
        )
    if t.share_prompts and t.pack_sequences:
        raise ConfigError("trainer.share_prompts=true and trainer.pack_sequences=true are two layouts of the same "
                          "rows; choose one")
    if t.share_prompts and m.attn_implementation != "sdpa":
        raise ConfigError(f"trainer.share_prompts=true needs model.attn_implementation=sdpa (its per-group mask), "
                          f"not {m.attn_implementation}")
    if cfg.model.share_base_weights:
        conflicts = {
            "model.lora_rank=0 (full fine-tuning updates the base)": cfg.model.lora_rank == 0,
            "trainer.device=cpu (vLLM's CPU backend repacks its weights)": t.device == "cpu",
            f"rollout.tensor_parallel_size={cfg.rollout.tensor_parallel_size} (each rank needs the whole base)":
                cfg.rollout.tensor_parallel_size != 1,
            "trainer.param_offload=true (the shared base stays on the GPU)": t.param_offload,
        }
        for reason, bad in conflicts.items():
            if bad:
                raise ConfigError(f"model.share_base_weights=true does not work with {reason}")
    return cfg


def check_layout(cfg: TrainConfig, ranks: int) -> None:
    """The rollout layout for `ranks` training ranks. Each rank drives its own in-process engine, so
    with N > 1 ranks a tensor-parallel engine would mean N engines of tensor_parallel_size GPUs each
    over the same GPUs (and vLLM 0.26's TP=2 crashed in CUDA-graph capture on 2 H200s anyway). The
    layout that works is data parallel: one TP-1 engine per GPU, the full weights synced into each
    (every rank gathers them). Tensor parallelism is left to one-rank jobs."""
    t = cfg.trainer
    if t.share_prompts and (t.prompts_per_step % ranks or t.mini_batch_prompts % ranks):
        raise ConfigError(f"trainer.share_prompts=true needs trainer.prompts_per_step={t.prompts_per_step} and "
                          f"trainer.mini_batch_prompts={t.mini_batch_prompts} divisible by the {ranks} ranks "
                          "(each rank's mini-batches hold whole prompt groups)")
    tp = cfg.rollout.tensor_parallel_size
    if tp > 1 and ranks > 1:
        raise ConfigError(f"rollout.tensor_parallel_size={tp} with {ranks} training ranks: each rank would start its "
                          f"own {tp}-GPU engine on the same GPUs; use rollout.tensor_parallel_size=1 "
                          "(one engine per GPU, the full weights synced into each)")


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file (or nothing) + overrides -> validated TrainConfig."""
    data = read_yaml(path) if path else {}
    try:
        return validate(build(TrainConfig, apply_overrides(TrainConfig, data, overrides)))
    except ConfigError as exc:
        keys = [item.partition("=")[0].strip() for item in overrides]
        raise ConfigError(locate(str(exc), [(path, "")] if path else [], keys)) from None
