"""A user's task and reward, as a user would write them (data.task /
data.reward point here in the tests)."""
from __future__ import annotations

from grpo_core.reward import gsm8k_score
from grpo_core.tasks import Row, user_turn


class Doubling:
    """"double 3" -> "#### 6"."""

    def rows(self, split):
        numbers = range(10) if split == "train" else range(10, 13)
        return [Row(user_turn(f"double {k}"), str(2 * k)) for k in numbers]

    def score(self, response, ground_truth):
        return gsm8k_score(response, ground_truth)


def doubling(data, seed):
    return Doubling()


def wrong_answer_reward(response: str, ground_truth: str) -> float:
    """1 for anything but the correct answer: a run that learns from it must
    get worse at the task."""
    return 1.0 - gsm8k_score(response, ground_truth)


def not_a_task(data, seed):
    return 42


NOT_CALLABLE = 3


def reward_of_one_argument(response):
    return 0.0
