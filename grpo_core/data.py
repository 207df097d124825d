"""GSM8K loading, a synthetic task a tiny model can learn, prompts, and a
resumable prompt sampler (its state goes into the checkpoint).

Every loading problem raises DataError with a one-line message that names
the file (and line/row), so the CLI can print it as is and exit 2.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from grpo_core.reward import extract_gsm8k_answer

__all__ = [
    "DataError",
    "Example",
    "PROMPT_SUFFIX",
    "PromptSampler",
    "load_gsm8k",
    "synthetic_arithmetic",
]

PROMPT_SUFFIX = 'Let\'s think step by step and output the final answer after "####".'


class DataError(ValueError):
    """A user-facing data problem; its message is one line."""


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # normalised ground truth, e.g. "1234" (not the gold solution)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _example(row: Any, where: str) -> Example:
    """One raw record -> Example; `where` is "file:line" or "file row N"."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("question", "answer"):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}' (need 'question' and 'answer')")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(row[key]).__name__}")
    try:
        answer = extract_gsm8k_answer(row["answer"])
    except ValueError:
        raise DataError(f"{where}: field 'answer' has no '####' final answer") from None
    return Example(question=row["question"], answer=answer)


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:  # by line, so the message can say which
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)") from None
            if not line.strip():
                continue  # tolerate blank lines, e.g. a trailing newline
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON line: {exc.msg}") from None
            examples.append(_example(row, f"{path}:{lineno}"))
    return examples


def _from_rows(rows: Iterable[Any], name: str) -> list[Example]:
    return [_example(row, f"{name} row {i}") for i, row in enumerate(rows, start=1)]


def _read_parquet(path: Path) -> list[Example]:
    import pyarrow.parquet as pq  # a dependency of datasets; imported lazily

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise DataError(f"{path}: cannot read parquet: {_one_line(exc)}") from None
    return _from_rows(rows, str(path))


def _resolve(path: Path, split: str) -> Path:
    """A file, or a directory holding `<split>.jsonl` / `<split>.parquet`."""
    if path.is_dir():
        for suffix in (".jsonl", ".parquet"):
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return candidate
        raise DataError(f"data directory {path} has no {split}.jsonl or {split}.parquet")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def load_gsm8k(path: str, split: str, hub_name: str = "openai/gsm8k") -> list[Example]:
    """GSM8K examples from a local .jsonl/.parquet, or from the hub when path is ""."""
    if not path:
        return _load_hub(hub_name, split)
    file = _resolve(Path(path), split)
    if file.suffix == ".jsonl":
        examples = _read_jsonl(file)
    elif file.suffix == ".parquet":
        examples = _read_parquet(file)
    else:
        raise DataError(f"{file}: unsupported data file type {file.suffix!r}; use .jsonl or .parquet")
    if not examples:
        raise DataError(f"{file}: dataset is empty")
    return examples


def _load_hub(hub_name: str, split: str) -> list[Example]:
    import datasets  # heavy; only needed for the hub path

    # huggingface_hub warns once per retry (5 of them, two lines each, when offline); the
    # one-line error below says why it failed.
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        ds = datasets.load_dataset(hub_name, "main", split=split)
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown split...
        raise DataError(f"cannot load {hub_name} (main, split {split!r}) from the hub: {_one_line(exc)}") from None
    finally:
        hub_log.setLevel(level)
    examples = _from_rows(ds, f"{hub_name}:{split}")
    if not examples:
        raise DataError(f"{hub_name}:{split}: dataset is empty")
    return examples


def synthetic_arithmetic(size: int, max_sum: int, seed: int) -> list[Example]:
    """Questions "a + b" whose sums are uniform over 0..max_sum; answer str(a + b).

    Deliberately tiny so a randomly initialised model can learn it by RL
    alone. Uniform answers matter: with a skewed answer distribution the
    policy first collapses onto the most common answer, and the group
    advantages of a collapsed group are all zero.
    random.Random is seeded locally: determinism independent of global state.
    """
    if size < 0 or max_sum < 0:
        raise DataError(f"synthetic_arithmetic needs size >= 0 and max_sum >= 0, got {size}, {max_sum}")
    rng = random.Random(seed)
    examples = []
    for _ in range(size):
        total = rng.randint(0, max_sum)
        a = rng.randint(0, total)
        examples.append(Example(question=f"{a} + {total - a}", answer=str(total)))
    return examples


class PromptSampler:
    """Batches of example indices, epoch by epoch, resumable exactly.

    Epoch e uses a permutation drawn from a generator seeded with seed + e,
    so the state is just (epoch, cursor): nothing else needs saving.
    A batch that crosses an epoch end continues into the next epoch.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        if num_examples < 1 or batch_size < 1:
            raise DataError(f"PromptSampler needs num_examples >= 1 and batch_size >= 1, got {num_examples}, {batch_size}")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=gen).tolist()

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self.cursor >= self.num_examples:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), self.num_examples - self.cursor)
            batch.extend(self._order[self.cursor : self.cursor + take])
            self.cursor += take
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        try:
            epoch, cursor = int(state["epoch"]), int(state["cursor"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"bad sampler state {state!r}; expected {{'epoch': int, 'cursor': int}}") from None
        if epoch < 0 or not 0 <= cursor <= self.num_examples:
            raise DataError(f"sampler state {state!r} out of range for {self.num_examples} examples")
        self.epoch, self.cursor = epoch, cursor
        self._order = self._permutation(epoch)
