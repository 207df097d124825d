"""The one vLLM adapter: generation, weight/LoRA sync, sleep/wake.

Only this module imports vllm. The engine lives in the training process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so new weights reach it by reference,
without a second copy or a restart.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from torch import Tensor

from .config import RolloutConfig


@dataclass(frozen=True)
class Sample:
    token_ids: tuple[int, ...]
    text: str
    truncated: bool  # stopped by max_tokens, not by EOS


def _prepare_env(cfg: RolloutConfig, on_cpu: bool) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if on_cpu:
        # vLLM's CPU backend otherwise takes ~90% of RAM for KV cache and
        # reserves a core for itself (we have two).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.cpu_kv_cache_gib))))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _load_weights_in_place(worker, weights: Iterator[tuple[str, Tensor]]) -> None:
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    model.load_weights(weights)


class RolloutEngine:
    def __init__(
        self, model_path: str, cfg: RolloutConfig, *, dtype: str, seed: int, max_model_len: int,
        lora_rank: int = 0, on_cpu: bool = True, load_format: str = "auto",
    ) -> None:
        _prepare_env(cfg, on_cpu)
        from vllm import LLM

        self.cfg = cfg
        self.on_cpu = on_cpu
        self.lora_rank = lora_rank
        self._asleep = self._weights_awake = False
        self._lora_version = 0
        self._lora_path: str | None = None
        kwargs = dict(
            model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
            enforce_eager=cfg.enforce_eager or on_cpu, max_num_seqs=cfg.max_num_seqs,
            enable_prefix_caching=cfg.enable_prefix_caching, tensor_parallel_size=cfg.tensor_parallel_size,
            load_format=load_format,
            # A budget that fits a whole step's prefills avoids chunked
            # prefill, whose token discards the CPU sampler cannot rewind.
            max_num_batched_tokens=max(8192, min(cfg.max_num_seqs, 256) * max_model_len) if on_cpu else None,
        )
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = cfg.sleep_level > 0
        if lora_rank > 0:
            kwargs.update(enable_lora=True, max_lora_rank=max(8, lora_rank), max_loras=1)
        self.llm = LLM(**{k: v for k, v in kwargs.items() if v is not None})

    # ------------------------------------------------------------ generate
    def _lora_request(self):
        if self.lora_rank <= 0 or self._lora_path is None:
            return None
        from vllm.lora.request import LoRARequest

        # A new id per synced version: vLLM loads each adapter once, at its first
        # request (max_loras=1 evicts the previous one). load_inplace=True would
        # reload it from disk at every engine step (vLLM's WorkerLoRAManager.
        # add_adapter runs per step); reusing an id without it serves the old one.
        return LoRARequest(f"policy-v{self._lora_version}", self._lora_version, self._lora_path)

    def generate(
        self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float, max_tokens: int | list[int],
        seeds: list[int] | None, ignore_eos: bool = False,
    ) -> list[list[Sample]]:
        """n samples per prompt; a per-prompt seed makes a step replayable.
        A list of max_tokens (one per prompt) and ignore_eos serve benchmarks
        whose dummy weights never emit EOS."""
        from vllm import SamplingParams

        limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        params = [
            SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=limits[i], ignore_eos=ignore_eos,
                seed=None if seeds is None else seeds[i], detokenize=True,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=self._lora_request()
        )
        return [
            [Sample(tuple(c.token_ids), c.text, c.finish_reason == "length") for c in out.outputs] for out in outputs
        ]

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[Sample]:
        return [s[0] for s in self.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, seeds=None)]

    def sequence_logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        """The engine's log-probs of `response` after `prompt` (the sync check)."""
        from vllm import SamplingParams

        ids = list(prompt) + list(response)
        out = self.llm.generate(
            [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
            use_tqdm=False, lora_request=self._lora_request(),
        )[0]
        entries = out.prompt_logprobs[len(prompt):]
        return [entry[tok].logprob for entry, tok in zip(entries, response)]

    # ------------------------------------------------------------ sync
    def load_full_weights(self, weights: Iterable[tuple[str, Tensor]]) -> float:
        """Replace every weight in place; returns seconds taken."""
        start = time.perf_counter()
        self.wake_weights()
        if self.on_cpu:
            # vLLM's CPU backend repacks weights after loading, so only its
            # reload path (which redoes the repacking) is correct there.
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        else:
            # On GPU, reload_weights (0.26) rebuilt layers on the meta device
            # and broke the KV cache; the model's own load_weights is in place.
            self.llm.collective_rpc(_load_weights_in_place, args=(iter(weights),))
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def load_lora(self, adapter_dir: Path) -> float:
        start = time.perf_counter()
        self._lora_path = str(adapter_dir)
        self._lora_version += 1
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def close(self) -> None:
        """Shut the engine down while the process group it joined still exists."""
        self.llm.llm_engine.engine_core.shutdown()

    # ------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Release the KV cache (and weights) for the update."""
        if self.cfg.sleep_level and not self.on_cpu and not self._asleep:
            self.llm.sleep(level=self.cfg.sleep_level)
            self._asleep, self._weights_awake = True, False

    @property
    def discards_weights(self) -> bool:
        return self.cfg.sleep_level == 2 and not self.on_cpu

    def wake_weights(self) -> None:
        """Weights only, before a sync writes into them; the KV cache stays
        released until the next rollout."""
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None)
            self._asleep = self._weights_awake = False
