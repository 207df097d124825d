"""Weight sync, end to end: what the trainer's weights become for the
rollout engine, and the push itself.

- Full fine-tuning (and a LoRA base the engine dropped at sleep level 2):
  HF-named full tensors, gathered from FSDP2 shards one at a time, in the
  engine's dtype -> Engine.load_full_weights.
- LoRA: the adapter in peft's on-disk layout, in the engine's dtype, with
  peft's scaling folded into lora_B -> a directory -> Engine.load_lora.
- A base shared with the engine (model.share_base_weights) is the engine's
  own tensors: nothing of it is sent.

The engine side (how vLLM takes these) is grpo_core.rollout's; the contract
between the two is grpo_core.engine.Engine.

vLLM (0.26 and later) takes an adapter only from a directory. At each new
adapter id it reads adapter_config.json (small), opens the safetensors file,
casts every tensor to its LoRA dtype (a full copy unless the file already is
in it) and multiplies every lora_B by lora_alpha/r (skipped when that is 1).
What is written here avoids both: the tensors are in the engine's dtype and
lora_B already carries peft's scaling, with the config saying lora_alpha == r
(the same adapter for peft and vLLM alike).
"""
from __future__ import annotations

import functools
import json
import struct
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from .engine import Engine
from .policy import DTYPES, Policy

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` (contiguous, on the CPU) in the safetensors format;
    returns the file's size in bytes.

    An existing file is overwritten in place rather than replaced: on tmpfs
    that reuses its pages, about twice as fast as filling a new file. vLLM
    reads the file only while loading a new adapter id, so no reader sees it
    half-written.
    """
    header: dict[str, dict] = {}
    offset = 0
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name}: only contiguous CPU tensors can be written")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does it
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy())
        f.truncate()
    return 8 + len(blob) + offset


def engine_config(peft_config: dict, scaling_folded: bool) -> dict:
    """peft's adapter_config for the written tensors: with the scaling folded
    into lora_B, lora_alpha == r (scaling 1, no rescale in vLLM)."""
    config = dict(peft_config)
    targets = config.get("target_modules")
    if isinstance(targets, (set, list, tuple)):
        config["target_modules"] = sorted(targets)
    if scaling_folded:
        config.update(lora_alpha=config["r"], use_rslora=False)
    return config


def write_adapter(directory: Path, tensors: dict[str, Tensor], config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "adapter_model.safetensors", tensors, {"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=1, default=str))


class WeightSync:
    """The policy's weights as the engine takes them; `push` sends them.
    Holds the adapter's layout and its host buffer between steps."""

    def __init__(self, policy: Policy, adapter_dir: Path) -> None:
        self.policy = policy
        self.adapter_dir = adapter_dir

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.policy.cfg.dtype]

    def push(self, engine: Engine) -> float:
        """Send the current weights; returns seconds taken. Collective when
        world_size > 1 (every rank has its own engine)."""
        start = time.perf_counter()
        if self.policy.is_lora:
            if engine.discards_weights:  # sleep level 2 dropped the base weights too
                engine.load_full_weights(self.full_weights(self.dtype))
            # In the engine's dtype, cast on the device, one copy to the host;
            # the engine loads it at the next request.
            self.save_adapter(self.adapter_dir, self.dtype)
            engine.load_lora(self.adapter_dir)
        else:
            engine.load_full_weights(self.full_weights(self.dtype))
        return time.perf_counter() - start

    def full_weights(self, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
        """HF-named full weights, one tensor at a time (gathered from shards
        as they go, so no rank ever holds the whole model twice)."""
        for name, param in self.policy.model.named_parameters():
            if self.policy.is_lora:  # the frozen base, under its Hugging Face name
                if "lora_" in name:
                    continue
                name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            if isinstance(param, DTensor) and param.device != self.policy.info.device:
                # CPU-offloaded shards (CPUOffloadPolicy): gather on the device (NCCL takes no
                # CPU tensors) and cast there (fast), not on the host.
                param = param.detach().to(self.policy.info.device)
            full = param.full_tensor() if hasattr(param, "full_tensor") else param.data
            yield name, full.detach().to(dtype)

    # ------------------------------------------------------------ the adapter
    @functools.cached_property
    def _adapter_plan(self) -> tuple[list[tuple[str, str, float]], bool]:
        """(name in peft's file, parameter name, factor) per adapter tensor, in
        parameter order (the same on every rank), and whether peft's scaling
        (lora_alpha/r) is folded into lora_B (the factor), so vLLM need not
        rescale."""
        from peft import get_peft_model_state_dict

        params = {n: p for n, p in self.policy.model.named_parameters() if p.requires_grad}
        # peft's own naming, once: its default save_embedding_layers="auto"
        # re-reads the base model's config (or asks the Hub) at every call. It is
        # given shape-only stand-ins, not the parameters: peft >= 0.22 gathers
        # DTensors (FSDP2) into new tensors, a collective whose results could no
        # longer be traced back to their parameters by identity.
        stand_ins = {n: torch.empty(p.shape, device="meta") for n, p in params.items()}
        owner = {id(t): n for n, t in stand_ins.items()}
        named = get_peft_model_state_dict(self.policy.model, state_dict=stand_ins, save_embedding_layers=False)
        config = self.policy.model.peft_config["default"]
        # Plain per-module A/B pairs only; anything else keeps vLLM's own scaling.
        fold = not (config.rank_pattern or config.alpha_pattern) and all(
            ".lora_A." in n or ".lora_B." in n for n in params)
        modules = dict(self.policy.model.named_modules())
        layout = []
        for file_name, param in named.items():
            name = owner[id(param)]
            factor = float(modules[name.split(".lora_B.")[0]].scaling["default"]) if fold and ".lora_B." in name else 1.0
            layout.append((file_name, name, factor))
        return layout, fold

    def adapter_tensors(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The full adapter under peft's names, in `dtype`, lora_B scaled (see
        _adapter_plan), on the CPU: views of one host buffer (pinned on CUDA)
        that the next call overwrites. Each tensor is cast where it lives (on
        the GPU: half the bytes to copy) and copied to the host once; over
        several ranks it is all-gathered on the device first, already cast, and
        every rank gets the whole adapter. Collective when world_size > 1."""
        layout, _ = self._adapter_plan
        params = dict(self.policy.model.named_parameters())
        total = sum(params[name].numel() for _, name, _ in layout)
        on_cuda = self.policy.info.device.type == "cuda"
        host = getattr(self, "_adapter_host", None)
        if host is None or host.numel() != total or host.dtype != dtype:
            host = self._adapter_host = None  # free the old buffer first
            host = self._adapter_host = torch.empty(total, dtype=dtype, pin_memory=on_cuda)
        out: dict[str, Tensor] = {}
        offset = 0
        with torch.no_grad():
            for file_name, name, factor in layout:
                param = params[name]
                local = (param.to_local() if isinstance(param, DTensor) else param).detach()
                if factor != 1.0:
                    local = local * factor
                if isinstance(param, DTensor) and param.device_mesh.size() > 1:
                    local = local.to(self.policy.info.device, dtype)
                    full = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                              shape=param.shape, stride=param.stride()).full_tensor()
                elif local.device.type != "cpu":
                    full = local.to(dtype)
                else:
                    full = local  # copy_ casts on the way
                view = host[offset : offset + full.numel()].view(full.shape)
                view.copy_(full, non_blocking=True)
                out[file_name] = view
                offset += full.numel()
        if on_cuda:
            torch.cuda.current_stream(self.policy.info.device).synchronize()  # the non-blocking copies have landed
        return out

    def save_adapter(self, directory: Path, dtype: torch.dtype | None = None) -> None:
        """Write the adapter as vLLM loads it (peft's format, see write_adapter),
        in `dtype` (default: the engine's, model.dtype). Every rank writes its
        own directory, for its own engine (collective when world_size > 1).
        Checkpoints keep the fp32 master weights (trainable_state_dict)."""
        tensors = self.adapter_tensors(dtype or DTYPES[self.policy.cfg.dtype])
        config = engine_config(self.policy.model.peft_config["default"].to_dict(), self._adapter_plan[1])
        write_adapter(directory, tensors, config)
