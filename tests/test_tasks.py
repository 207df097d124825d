"""Tasks and rewards as plug-ins: the built-in tasks through the same
interface as a user's, config-time checks with one-line errors."""
from __future__ import annotations

import pytest

from grpo_core import config
from grpo_core.config import ConfigError, DataConfig
from grpo_core.data import PROMPT_SUFFIX, DataError, synthetic_arithmetic
from grpo_core.tasks import GSM8K, Row, SyntheticArithmetic, Task, make_reward, make_task, tokenize, user_turn
from tests import plugins
from tests.conftest import GSM8K_DIR


def load(*overrides: str) -> config.TrainConfig:
    return config.load(None, ["model.path=some/model", *overrides])


def chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "double", "<|user|>", "<|assistant|>"] + [str(k) for k in range(20)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}<|assistant|>"
    return tok


def test_synthetic_task_is_the_arithmetic_data_as_one_user_turn() -> None:
    task = make_task(DataConfig(task="synthetic", synthetic_train_size=30, synthetic_test_size=5), seed=7)
    assert isinstance(task, SyntheticArithmetic) and isinstance(task, Task)
    expected = synthetic_arithmetic(30, 4, 7)
    assert task.rows("train") == [Row(({"role": "user", "content": ex.question},), ex.answer) for ex in expected]
    assert [r.ground_truth for r in task.rows("test")] == [ex.answer for ex in synthetic_arithmetic(5, 4, 8)]
    assert task.score("#### 3", "3") == 1.0 and task.score("#### 4", "3") == 0.0


def test_gsm8k_task_asks_verls_question_and_scores_after_the_hashes() -> None:
    test_file = str(GSM8K_DIR / "test.jsonl")
    task = make_task(DataConfig(task="gsm8k", train_path=test_file, test_path=test_file), seed=0)
    assert isinstance(task, GSM8K)
    first = task.rows("train")[0]
    assert first.messages[0]["content"].startswith("Janet") and first.messages[0]["content"].endswith(PROMPT_SUFFIX)
    assert first.ground_truth == "18" and len(task.rows("test")) == 1319
    assert task.score("so #### 18", "18") == 1.0 and task.score("the answer is 18", "18") == 0.0
    flexible = make_task(DataConfig(train_path=test_file, test_path=test_file, reward_mode="flexible"), seed=0)
    assert flexible.score("the answer is 18", "18") == 1.0
    only_train = make_task(DataConfig(train_path=test_file), seed=0)
    assert only_train.rows("test") == []  # no test file: no validation, never the hub


def test_a_users_task_and_reward_load_from_module_function() -> None:
    cfg = load("data.task=tests.plugins:doubling", "data.reward=tests.plugins:wrong_answer_reward")
    task = make_task(cfg.data, cfg.trainer.seed)
    assert isinstance(task, plugins.Doubling)
    assert make_reward(cfg.data, task) is plugins.wrong_answer_reward
    assert make_reward(load("data.task=tests.plugins:doubling").data, task) == task.score


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.task=math"], "data.task='math'; valid values: gsm8k, synthetic, or module:function"),
    (["data.task=tests.no_such_module:task"], "cannot import tests.no_such_module"),
    (["data.task=tests.plugins:missing"], "module tests.plugins has no attribute 'missing'"),
    (["data.task=tests.plugins:NOT_CALLABLE"], "NOT_CALLABLE is a int, not callable"),
    (["data.task=tests.plugins:"], "expected module:function"),
    (["data.reward=tests.plugins:reward_of_one_argument"], "must take (response, ground_truth)"),
    (["data.reward=tests.plugins:nothing"], "module tests.plugins has no attribute 'nothing'"),
])
def test_bad_plugins_are_rejected_at_config_time_in_one_line(overrides, message) -> None:
    with pytest.raises(ConfigError) as err:
        load(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_factory_that_returns_no_task_is_named() -> None:
    cfg = load("data.task=tests.plugins:not_a_task")
    with pytest.raises(ConfigError, match="returned a int, which has no rows"):
        make_task(cfg.data, 0)


def test_tokenize_applies_the_chat_template_and_drops_overlong_prompts() -> None:
    tok = chat_tokenizer()

    class Mixed(plugins.Doubling):
        def rows(self, split):
            return [Row(user_turn("double 3"), "6"), Row(user_turn("double 3 4 5"), "x"), Row(user_turn("double 4"), "8")]

    short = tok("<|user|> double 3 <|assistant|>", add_special_tokens=False)["input_ids"]
    prompts = tokenize(Mixed(), tok, max_prompt_tokens=len(short), name="mixed")
    assert prompts.train == [short, tok("<|user|> double 4 <|assistant|>", add_special_tokens=False)["input_ids"]]
    assert prompts.train_truths == ["6", "8"] and prompts.test_truths == ["6", "8"]
    every = tokenize(Mixed(), tok, max_prompt_tokens=len(short) + 2, name="mixed")
    assert every.train_truths == ["6", "x", "8"]


def test_tokenize_refuses_an_empty_or_overlong_training_split() -> None:
    tok = chat_tokenizer()
    with pytest.raises(DataError, match="no training prompt of data.task=doubling fits data.max_prompt_tokens=1"):
        tokenize(plugins.Doubling(), tok, max_prompt_tokens=1, name="doubling")

    class Empty(plugins.Doubling):
        def rows(self, split):
            return []

    with pytest.raises(DataError, match="the training set of data.task=empty is empty"):
        tokenize(Empty(), tok, max_prompt_tokens=10, name="empty")

    class Strings(plugins.Doubling):
        def rows(self, split):
            return ["double 1"]

    with pytest.raises(DataError, match="row 0: expected grpo_core.tasks.Row, got str"):
        tokenize(Strings(), tok, max_prompt_tokens=10, name="strings")
    assert user_turn("x") == ({"role": "user", "content": "x"},)
