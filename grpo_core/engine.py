"""The rollout engine's contract: what the trainer asks of whatever
generates its samples (vLLM by default, grpo_core.rollout.RolloutEngine).

`rollout.engine` picks one: "vllm", or `module:factory` for another engine,
called with the same arguments as RolloutEngine (model_path, RolloutConfig,
and the keywords of `make_engine` below) and returning an `Engine`. The
tests' FakeEngine (tests/fake_engine.py, pure torch) comes in this way.
Weights reach an engine only through grpo_core.weightsync.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

from torch import Tensor

from .config import ConfigError, RolloutConfig

@dataclass(frozen=True)
class Sample:
    token_ids: tuple[int, ...]
    text: str
    truncated: bool  # stopped by max_tokens, not by EOS


@runtime_checkable
class Engine(Protocol):
    def generate(
        self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float, max_tokens: int | list[int],
        seeds: list[int] | None, ignore_eos: bool = False,
    ) -> list[list[Sample]]:
        """n samples per prompt; seeds[i] makes prompt i's samples replayable."""

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[Sample]:
        """One temperature-0 sample per prompt (validation)."""

    def sequence_logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        """The engine's log-probs of `response` after `prompt` (the sync check)."""

    def load_full_weights(self, weights: Iterable[tuple[str, Tensor]]) -> float:
        """Replace every weight (HF names, the engine's dtype); seconds taken."""

    def load_lora(self, adapter_dir: Path) -> float:
        """Serve the adapter in `adapter_dir` (peft's layout) from the next request."""

    @property
    def discards_weights(self) -> bool:
        """Whether sleep() drops the weights (the next sync must send them all)."""

    def sleep(self) -> None:
        """Free memory for the update (a no-op where nothing can be freed)."""

    def wake_up(self) -> None:
        """Undo sleep(); generate() calls it itself."""

    def close(self) -> None:
        """Shut down while the process group it joined still exists."""


def make_engine(
    model_path: str, cfg: RolloutConfig, *, dtype: str, seed: int, max_model_len: int, lora_rank: int,
    on_cpu: bool, load_format: str,
) -> Engine:
    kwargs = dict(dtype=dtype, seed=seed, max_model_len=max_model_len, lora_rank=lora_rank, on_cpu=on_cpu,
                  load_format=load_format)
    if cfg.engine == "vllm":
        from .rollout import RolloutEngine

        return RolloutEngine(model_path, cfg, **kwargs)
    from .tasks import load_callable

    engine = load_callable(cfg.engine, "rollout.engine")(model_path, cfg, **kwargs)
    if not isinstance(engine, Engine):
        missing = [m for m in ("generate", "greedy", "sequence_logprobs", "load_full_weights", "load_lora",
                               "discards_weights", "sleep", "wake_up", "close") if not hasattr(engine, m)]
        raise ConfigError(f"rollout.engine={cfg.engine!r} made a {type(engine).__name__} without {', '.join(missing)}")
    return engine
