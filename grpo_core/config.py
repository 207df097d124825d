"""Typed, frozen configuration for a GRPO run: the only place defaults live.

A config is built from plain data (YAML) by `build`, which rejects unknown
keys and wrong types with one line that names the valid keys. Dotted
`key=value` overrides are parsed against the field's declared type, so
`rollout.n=8` is an int and `model.path=123` stays a string.
"""
from __future__ import annotations

import dataclasses
import re
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .constants import DTYPES, KL_ESTIMATORS, LOSS_AGG_MODES
from .reward import REWARD_MODES


class ConfigError(ValueError):
    """A user-facing configuration mistake; its message is one line."""


# The dotted key a message starts with ("unknown key 'a.b'", "a.b: expected", "a.b=3 must"),
# to point at its line in the YAML file it came from.
_MESSAGE_KEY = re.compile(r"^(?:unknown key ')?([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)+)")


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # HF model dir (or hub id); required
    tiny: bool = False  # build a tiny random-init Qwen2 + offline tokenizer at `path` if absent
    tiny_hidden: int = 64  # the tiny model's hidden size (model.tiny)
    tiny_layers: int = 2  # the tiny model's layer count (model.tiny)
    dtype: str = "float32"  # weights and compute of trainer and vLLM (LoRA adapters stay fp32)
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: int = 32  # LoRA scaling is lora_alpha / lora_rank
    lora_target_modules: str = "all-linear"  # or comma-separated module names
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute
    # with gradient_checkpointing: only the first N decoder layers recompute (0: all), the others keep their
    # activations (faster; jobs.plan --tune: the fewest that fit)
    recompute_layers: int = 0
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


# ---------------------------------------------------------------- building

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if typing.get_origin(tp) is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp))


INT_MAX = 2**31 - 1  # every int key reaches a C int somewhere (torch threads, numpy seeds, vLLM lengths)
_SHOWN_MAX = 80  # characters of a bad value echoed in a message


def _shown(value: Any) -> str:
    """repr(value), cut: a 5000-digit number is named, not echoed."""
    text = repr(value)
    return text if len(text) <= _SHOWN_MAX else f"{text[:_SHOWN_MAX]}... ({len(text)} characters)"


def _check_value(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {sorted(_field_types(tp))}, got {value!r}")
        return build(tp, value, where + ".")
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):  # one item, commas and all (a setup line may hold commas)
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, _ellipsis) = typing.get_args(tp)
        return tuple(_check_value(inner, v, where) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {_shown(value)}")
    return value


def build(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data, strictly."""
    data = dict(data or {})
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'; valid keys under '{prefix.rstrip('.') or '<top>'}': "
            + ", ".join(sorted(types))
        )
    kwargs = {name: _check_value(types[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _parse_scalar(tp: Any, text: str, key: str) -> Any:
    if tp is str:
        return text
    if typing.get_origin(tp) is tuple:
        return _parse_list(text, key)
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected bool (true/false), got {_shown(text)}")
    try:
        return tp(text) if tp is not int else int(text, 10)
    except ValueError:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_shown(text)}") from None


def _parse_list(text: str, key: str) -> list[Any]:
    """A list override: `[...]` is a YAML/JSON list (quote items that hold commas:
    `["export A=x,y", "module load cuda"]`); any other text is one item, commas and all."""
    if not text.strip().startswith("["):
        return [text] if text.strip() else []
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: a value starting with '[' is a YAML list, and this one is not "
                          f"({str(exc).splitlines()[0]}); write [\"a, b\", \"c\"], or {key}+=LINE for one item") from None
    if not isinstance(value, list):
        raise ConfigError(f"{key}: a value starting with '[' is a YAML list like [\"a\", \"b\"]; got {text!r} "
                          f"(one item: {key}+=LINE)")
    return value


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `data` with dotted `key=value` overrides applied.

    Values are parsed against the field type declared in `cls`, so the same
    text means the same thing on the command line and in YAML. A list key
    takes `key=[...]` (a YAML list), `key=ITEM` (a one-item list) or
    `key+=ITEM` (appended to the list so far).
    """
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        append = key.endswith("+")
        key = key[:-1] if append else key
        parts = key.strip().split(".")
        tp: Any = cls
        node = out
        for depth, part in enumerate(parts):
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"override {key!r}: '{'.'.join(parts[:depth])}' is not a section")
            types = _field_types(tp)
            if part not in types:
                where = ".".join(parts[:depth]) or "<top>"
                raise ConfigError(f"unknown key '{key}'; valid keys under '{where}': " + ", ".join(sorted(types)))
            tp = types[part]
            if depth == len(parts) - 1:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"override {key!r} names a section; use one of: " + ", ".join(sorted(_field_types(tp))))
                if append:  # one item, verbatim (a shell line may start with `[`)
                    if typing.get_origin(tp) is not tuple:
                        raise ConfigError(f"override {key}+=...: '+=' appends to a list key; {key} is {_type_name(tp)}")
                    before = node.get(part, [])
                    node[part] = [*([before] if isinstance(before, str) else before), text]
                else:
                    node[part] = _parse_scalar(tp, text, key)
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {key!r}: '{part}' is not a section")
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return ConfigError(f"{where}: not valid YAML: {problem}")


class _Loader(yaml.SafeLoader):
    """SafeLoader, except that YAML 1.1's base-60 numbers stay text: `time: 4:00:00` is a Slurm
    time (not the int 14400), the same value as `cluster.time=4:00:00` on the command line."""


_Loader.yaml_implicit_resolvers = {  # int and float resolvers that do not match text with a ':'
    first: [(tag, re.compile("^(?!.*:)" + rx.pattern.removeprefix("^"), rx.flags)
             if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") else rx) for tag, rx in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    except ValueError as exc:  # a number with more digits than Python converts (int's 4300-digit limit)
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0][:200]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def yaml_lines(path: str | Path) -> dict[str, int]:
    """Dotted key -> its 1-based line in the file ({} if unreadable)."""
    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}{key.value}"
                lines.setdefault(name, key.start_mark.line + 1)
                walk(value, name + ".")

    walk(root, "")
    return lines


def locate(message: str, files: Sequence[tuple[str | Path, str]], overridden: Sequence[str] = ()) -> str:
    """`message` prefixed with "file:line: " of the key it names, if a file sets that key
    (or with "override: " when the command line set it).

    `files`: (path, prefix its keys get), most specific first (a profile before what it extends).
    """
    match = _MESSAGE_KEY.match(message)
    if not match:
        return message
    key = match.group(1)
    if any(key == o or key.startswith(o + ".") or o.startswith(key + ".") for o in overridden):
        return f"override: {message}"
    for path, prefix in files:
        lines = yaml_lines(path)
        for candidate in (key, key.rsplit(".", 1)[0]):
            if prefix + candidate in lines or (not prefix and candidate in lines):
                return f"{path}:{lines[prefix + candidate]}: {message}"
    return message


def has_control_chars(text: str) -> bool:
    """Newlines, tabs, escapes, other control/format characters: never part of a value."""
    return any(unicodedata.category(ch)[0] == "C" for ch in text)


def check_text(data: Mapping[str, Any], prefix: str = "") -> None:
    """Reject control characters in every string value: a newline would end a line
    of the job script (a new command, a new #SBATCH directive)."""
    for key, value in flatten(data).items():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, str) and has_control_chars(item):
                raise ConfigError(f"{prefix}{key}={item!r}: control characters (newline, tab, ...) are not allowed")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for MLflow params and diffs."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
            raise ConfigError(f"{key}={_shown(value)} must be at most {INT_MAX} in size")
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
    fractions = {"rollout.top_p": (r.top_p, False), "rollout.gpu_memory_utilization": (r.gpu_memory_utilization, False),
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
