"""The shape of a decoder-only Qwen2 model, as the memory planner needs it:
from a local HF config.json, or the one known Qwen2.5 size a model name
names. Pure arithmetic: no torch."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
