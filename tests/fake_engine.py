"""A rollout engine in pure torch, for loop, resume and preemption tests
that need no vLLM (`rollout.engine=tests.fake_engine:FakeEngine`).

It holds its own copy of the checkpoint's HF model and takes weights only
through the Engine contract (grpo_core.engine): full HF-named tensors, or a
LoRA adapter directory in peft's layout, merged into its base. Sampling is
plain ancestral sampling with one torch.Generator per prompt seed, so a
replayed step samples the same tokens, as with vLLM's per-request seeds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from grpo_core.config import RolloutConfig
from grpo_core.engine import Sample


class FakeEngine:
    def __init__(self, model_path: str, cfg: RolloutConfig, *, dtype: str, seed: int, max_model_len: int,
                 lora_rank: int, on_cpu: bool, load_format: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos = self.tokenizer.eos_token_id
        self.base = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.max_model_len = max_model_len
        self.unseeded = torch.Generator().manual_seed(seed)
        self.calls = {"full": 0, "lora": 0, "sleep": 0}

    # ------------------------------------------------------------ generate
    @torch.no_grad()
    def _sample(self, prompt: list[int], n: int, temperature: float, max_tokens: int, generator: torch.Generator,
                ignore_eos: bool) -> list[Sample]:
        ids = torch.tensor([prompt] * n)
        done = torch.zeros(n, dtype=torch.bool)
        out: list[list[int]] = [[] for _ in range(n)]
        for _ in range(max_tokens):
            logits = self.model(input_ids=ids).logits[:, -1].float()
            if temperature == 0.0:
                nxt = logits.argmax(dim=-1)
            else:
                nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)[:, 0]
            for i in range(n):
                if not done[i]:
                    out[i].append(int(nxt[i]))
                    done[i] = int(nxt[i]) == self.eos and not ignore_eos
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return [Sample(tuple(t), self.tokenizer.decode(t, skip_special_tokens=True),
                       truncated=not (t and t[-1] == self.eos and not ignore_eos)) for t in out]

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_tokens: int | list[int], seeds: list[int] | None, ignore_eos: bool = False) -> list[list[Sample]]:
        if top_p != 1.0:
            raise NotImplementedError("FakeEngine samples without nucleus truncation (top_p=1)")
        limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        return [
            self._sample(p, n, temperature, limits[i],
                         self.unseeded if seeds is None else torch.Generator().manual_seed(seeds[i]), ignore_eos)
            for i, p in enumerate(prompts)
        ]

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[Sample]:
        return [s[0] for s in self.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, seeds=None)]

    @torch.no_grad()
    def sequence_logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        ids = torch.tensor([list(prompt) + list(response)])
        logprobs = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        positions = range(len(prompt) - 1, ids.shape[1] - 1)
        return [float(logprobs[t, ids[0, t + 1]]) for t in positions]

    # ------------------------------------------------------------ sync
    @torch.no_grad()
    def load_full_weights(self, weights: Iterable[tuple[str, Tensor]]) -> float:
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            self.base[name] = tensor.detach().float().clone()
            params[name].copy_(tensor)
        self.calls["full"] += 1
        return 0.0

    @torch.no_grad()
    def load_lora(self, adapter_dir: Path) -> float:
        """W = W_base + (alpha / r) * B @ A for every adapted module."""
        from safetensors.torch import load_file

        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
        params = dict(self.model.named_parameters())
        for name, base in self.base.items():
            params[name].copy_(base)
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            params[f"{module}.weight"].add_(scale * (b.float() @ a.float()))
        self.calls["lora"] += 1
        return 0.0

    # ------------------------------------------------------------ memory
    @property
    def discards_weights(self) -> bool:
        return False

    def sleep(self) -> None:
        self.calls["sleep"] += 1

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        pass
