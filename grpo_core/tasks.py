"""Tasks: where a run's prompts and ground truths come from, and how a
response is scored.

A task is any object with `rows(split)` and `score(response, ground_truth)`
(the `Task` protocol below). `data.task` picks one: a built-in name
(`gsm8k`, `synthetic`) or `module:function`, a factory called as
`function(data: DataConfig, seed: int)` that returns a user's task.
`data.reward=module:function`, a `(response, ground_truth) -> float`,
replaces the task's score as the reward; accuracy stays the task's own
(score == 1). Both are resolved before the run directory is touched, and
every problem is one line (ConfigError / DataError).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

from .config import ConfigError, DataConfig
from .data import PROMPT_SUFFIX, DataError, load_gsm8k, synthetic_arithmetic
from .reward import gsm8k_score

Reward = Callable[[str, str], float]
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Row:
    """One prompt as chat messages, and what a correct response must say."""

    messages: tuple[dict[str, str], ...]
    ground_truth: str


@runtime_checkable
class Task(Protocol):
    def rows(self, split: str) -> Sequence[Row]:
        """The rows of split "train" or "test" (an empty test split: no validation)."""

    def score(self, response: str, ground_truth: str) -> float:
        """The reward of one response; 1.0 means correct."""


def user_turn(text: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": text},)


class GSM8K:
    """verl's GSM8K task: question + "think step by step ... ####" as one user
    turn; strict (after ####) or flexible (last number) scoring."""

    def __init__(self, data: DataConfig, seed: int) -> None:
        self.mode, self.format_score = data.reward_mode, data.format_score
        self._splits = {"train": load_gsm8k(data.train_path, "train", data.hub_name)}
        wants_test = bool(data.test_path) or not data.train_path  # the hub has both
        self._splits["test"] = load_gsm8k(data.test_path, "test", data.hub_name) if wants_test else []

    def rows(self, split: str) -> Sequence[Row]:
        return [Row(user_turn(f"{ex.question} {PROMPT_SUFFIX}"), ex.answer) for ex in self._splits[split]]

    def score(self, response: str, ground_truth: str) -> float:
        return gsm8k_score(response, ground_truth, mode=self.mode, format_score=self.format_score)


class SyntheticArithmetic:
    """"a + b" with uniform sums, answered "#### s": learnable by a random-init
    tiny model. No instruction suffix: the operands sit right before the answer."""

    def __init__(self, data: DataConfig, seed: int) -> None:
        self._splits = {
            "train": synthetic_arithmetic(data.synthetic_train_size, data.synthetic_max_sum, seed),
            "test": synthetic_arithmetic(data.synthetic_test_size, data.synthetic_max_sum, seed + 1),
        }
        self.format_score = data.format_score

    def rows(self, split: str) -> Sequence[Row]:
        return [Row(user_turn(ex.question), ex.answer) for ex in self._splits[split]]

    def score(self, response: str, ground_truth: str) -> float:
        return gsm8k_score(response, ground_truth, format_score=self.format_score)


_BUILTIN = {"gsm8k": GSM8K, "synthetic": SyntheticArithmetic}
BUILTIN_TASKS = tuple(_BUILTIN)  # data.task's names


def load_callable(spec: str, key: str) -> Callable:
    """`module:function` -> the callable, or a one-line ConfigError."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}={spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's module
        raise ConfigError(f"{key}={spec!r}: cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{key}={spec!r}: module {module_name} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"{key}={spec!r}: {attr} is a {type(fn).__name__}, not callable")
    return fn


def check_plugins(data: DataConfig) -> None:
    """Config-time check of data.task / data.reward: importable and callable,
    a reward taking (response, ground_truth)."""
    if data.task not in BUILTIN_TASKS:
        load_callable(data.task, "data.task")
    if data.reward:
        fn = load_callable(data.reward, "data.reward")
        try:
            inspect.signature(fn).bind("response", "ground truth")
        except TypeError:
            raise ConfigError(f"data.reward={data.reward!r}: must take (response, ground_truth)") from None
        except ValueError:
            pass  # builtins without a signature: trust them


def make_task(data: DataConfig, seed: int) -> Task:
    factory = _BUILTIN.get(data.task) or load_callable(data.task, "data.task")
    task = factory(data, seed)
    if not isinstance(task, Task):
        raise ConfigError(f"data.task={data.task!r} returned a {type(task).__name__}, which has no rows(split) and score(response, ground_truth)")
    return task


def make_reward(data: DataConfig, task: Task) -> Reward:
    return load_callable(data.reward, "data.reward") if data.reward else task.score


@dataclass
class Prompts:
    """A task's rows as token ids for the engine, with their ground truths."""

    train: list[list[int]] = field(default_factory=list)
    train_truths: list[str] = field(default_factory=list)
    test: list[list[int]] = field(default_factory=list)
    test_truths: list[str] = field(default_factory=list)


def _check_rows(rows: Sequence[Row], where: str) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, Row):
            raise DataError(f"{where} row {i}: expected grpo_core.tasks.Row, got {type(row).__name__}")


def tokenize(task: Task, tokenizer, max_prompt_tokens: int, name: str) -> Prompts:
    """Chat-template and tokenize; prompts longer than the limit are dropped
    (as verl's filter_overlong_prompts does) rather than cut."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat_template; prompts are chat messages")
    out = Prompts()
    for split in SPLITS:
        rows = task.rows(split)
        _check_rows(rows, f"data.task={name} {split}")
        ids, truths = (out.train, out.train_truths) if split == "train" else (out.test, out.test_truths)
        for row in rows:
            text = tokenizer.apply_chat_template(list(row.messages), tokenize=False, add_generation_prompt=True)
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(tokens) <= max_prompt_tokens:
                ids.append(tokens)
                truths.append(row.ground_truth)
    if not out.train:
        raise DataError(f"no training prompt of data.task={name} fits data.max_prompt_tokens={max_prompt_tokens}"
                        if task.rows("train") else f"the training set of data.task={name} is empty")
    return out
