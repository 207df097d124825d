"""The LoRA adapter on disk, as the rollout engine loads it (peft's layout:
adapter_model.safetensors + adapter_config.json).

vLLM (0.26 and later) takes an adapter only from a directory. At each new
adapter id it reads adapter_config.json (small), opens the safetensors file,
casts every tensor to its LoRA dtype (a full copy unless the file already is
in it) and multiplies every lora_B by lora_alpha/r (skipped when that is 1).
What is written here avoids both: the tensors are in the engine's dtype and
lora_B already carries peft's scaling, with the config saying lora_alpha == r
(the same adapter for peft and vLLM alike).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import Tensor

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
