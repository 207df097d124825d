"""Where the run's model comes from: a local Hugging Face directory, a hub
id, or a tiny random-init test model built first (grpo_core.tiny).

Fails with one-line errors before the run directory is touched.
"""
from __future__ import annotations

from pathlib import Path

from . import distributed
from .config import TrainConfig
from .distributed import DistInfo
from .tasks import SyntheticArithmetic, Task


class ModelPathError(ValueError):
    """The model cannot be found; one-line message."""


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).exists()


def _tiny_corpus(task: Task, small: bool, limit: int = 3000) -> list[str]:
    """The text a tiny model's tokenizer learns: prompts and `#### answer`s.
    The synthetic lines keep the space before the newline that the tuned
    tiny recipe's vocabulary was learned with (its token " \\n"): without it
    the vocabulary, and the learning curve, change."""
    rows = list(task.rows("train"))[:limit]
    pad = " " if small else ""
    return [f"{m['role']}\n{m['content']}{pad}\nassistant\n#### {row.ground_truth}" for row in rows for m in row.messages]


def resolve_model(cfg: TrainConfig, task: Task, info: DistInfo) -> str:
    """A local model dir (built first for a tiny model) or a hub id."""
    m = cfg.model
    path = Path(m.path).expanduser()
    if m.tiny:
        # Rank 0 builds; every rank waits at the same barrier either way (a
        # rank that skipped it because the model had just appeared would
        # leave the others waiting forever).
        if info.is_main and not (path / "config.json").exists():
            from .tiny import build_tiny_model

            # The synthetic task's few characters keep the vocabulary (the
            # action space of RL from scratch) small; any other task's text
            # needs every byte.
            small = isinstance(task, SyntheticArithmetic)
            build_tiny_model(
                path, _tiny_corpus(task, small), hidden=m.tiny_hidden, layers=m.tiny_layers, init_std=m.tiny_init_std, seed=0,
                vocab_size=64 if small else 512, full_byte_alphabet=not small,
            )
        distributed.barrier()
        return str(path.resolve())
    if (path / "config.json").is_file():
        return str(path.resolve())
    if path.exists():
        raise ModelPathError(f"model.path={m.path} has no config.json (not a Hugging Face model directory)")
    if _looks_like_hub_id(m.path):
        return m.path
    raise ModelPathError(f"model.path={m.path} does not exist (set model.tiny=true to build a tiny test model there)")
