"""What a run needs before its first step: the task's data and the model.

Everything here fails with one-line errors and before the run directory is
touched, so bad input leaves nothing half-written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import distributed
from .config import TrainConfig
from .data import PROMPT_SUFFIX, DataError, Example, build_prompt, load_gsm8k, synthetic_arithmetic
from .distributed import DistInfo


class ModelPathError(ValueError):
    """The model cannot be found; one-line message."""


@dataclass
class Task:
    train: list[Example]
    test: list[Example]
    train_prompts: list[list[int]] = field(default_factory=list)
    test_prompts: list[list[int]] = field(default_factory=list)
    train_answers: list[str] = field(default_factory=list)
    test_answers: list[str] = field(default_factory=list)
    dropped: int = 0

    suffix: str = PROMPT_SUFFIX

    def tokenize(self, tokenizer, max_prompt_tokens: int) -> None:
        """Chat-template and tokenize; drop prompts longer than the limit
        (as verl's filter_overlong_prompts does) rather than cut them."""
        def encode(examples: list[Example]) -> tuple[list[list[int]], list[str]]:
            ids, answers = [], []
            for ex in examples:
                tokens = tokenizer(build_prompt(ex.question, tokenizer, self.suffix), add_special_tokens=False)["input_ids"]
                if len(tokens) <= max_prompt_tokens:
                    ids.append(tokens)
                    answers.append(ex.answer)
            return ids, answers

        self.train_prompts, self.train_answers = encode(self.train)
        self.test_prompts, self.test_answers = encode(self.test)
        self.dropped = len(self.train) - len(self.train_prompts)
        if not self.train_prompts:
            raise DataError(f"every training prompt is longer than data.max_prompt_tokens={max_prompt_tokens}")


def load_task(cfg: TrainConfig) -> Task:
    d = cfg.data
    if d.source == "synthetic":
        train = synthetic_arithmetic(d.synthetic_train_size, d.synthetic_max_sum, cfg.trainer.seed)
        test = synthetic_arithmetic(d.synthetic_test_size, d.synthetic_max_sum, cfg.trainer.seed + 1)
    else:
        train = load_gsm8k(d.train_path, "train", d.hub_name)
        test = load_gsm8k(d.test_path, "test", d.hub_name) if (d.test_path or not d.train_path) else []
    if not train:
        raise DataError(f"the training set is empty (data.source={d.source})")
    return Task(train=train, test=test, suffix="" if d.source == "synthetic" else PROMPT_SUFFIX)


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path).exists()


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

            gsm8k = cfg.data.source == "gsm8k"
            corpus = [f"user\n{ex.question} {task.suffix}\nassistant\n#### {ex.answer}" for ex in task.train[:3000]]
            build_tiny_model(
                path, corpus, hidden=m.tiny_hidden, layers=m.tiny_layers, seed=0,
                vocab_size=512 if gsm8k else 64, full_byte_alphabet=gsm8k,
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
