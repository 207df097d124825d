"""GSM8K answer extraction and scoring."""
from __future__ import annotations

import json

import pytest

from grpo_core.reward import extract_gsm8k_answer, gsm8k_score, normalize_number
from tests.conftest import GSM8K_DIR as DATA


def test_every_gold_solution_of_the_test_set_scores_one() -> None:
    lines = (DATA / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1319
    for line in lines:
        gold = json.loads(line)["answer"]
        truth = extract_gsm8k_answer(gold)
        assert "," not in truth and not truth.startswith("$")
        assert gsm8k_score(gold, truth) == 1.0, gold
        assert gsm8k_score(gold, truth, mode="flexible") == 1.0, gold


def test_extract_normalises_gold() -> None:
    assert extract_gsm8k_answer("so 1,000 + 234\n#### 1,234") == "1234"
    assert extract_gsm8k_answer("#### -3") == "-3"
    assert extract_gsm8k_answer("a #### 1\n#### 2 ") == "2"
    with pytest.raises(ValueError):
        extract_gsm8k_answer("no final answer")


@pytest.mark.parametrize(
    "text, expected",
    [("1,234", "1234"), ("$1,234", "1234"), (" 18. ", "18"), ("-$5", "-5"), ("$-5", "-5"), (".5", "0.5")],
)
def test_normalize_number(text: str, expected: str) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "response, truth",
    [
        ("The total is 11232 dollars.\n#### $11232", "11232"),
        ("#### $1,234", "1234"),
        ("####1234", "1234"),
        ("#### 1234.", "1234"),
        ("#### 1,234.", "1234"),
        ("#### 18 dollars", "18"),
        ("**#### 18**", "18"),
        ("####\n18", "18"),
        ("#### 5.0", "5"),
        ("#### 5", "5.00"),
        ("#### -3", "-3"),
        ("#### -$3", "-3"),
        ("#### 2.5", "2.5"),
        ("#### 0.50", ".5"),
        ("#### 7\nthen a rethink\n#### 8", "8"),  # the LAST #### counts
        ("#### 1234", "1,234"),  # ground truth is normalised too
    ],
)
def test_strict_correct(response: str, truth: str) -> None:
    assert gsm8k_score(response, truth) == 1.0


@pytest.mark.parametrize(
    "response, truth",
    [
        ("#### 8\nactually no\n#### 7", "8"),  # only the last #### counts
        ("#### 3", "-3"),
        ("#### 2.51", "2.5"),
        ("#### 12", "1234"),
    ],
)
def test_strict_wrong_number_gets_format_score(response: str, truth: str) -> None:
    assert gsm8k_score(response, truth) == 0.0
    assert gsm8k_score(response, truth, format_score=0.1) == 0.1


@pytest.mark.parametrize(
    "response",
    [
        "The answer is 18.",  # no #### at all
        "",
        "#### eighteen",  # not a number
        "#### 18abc",  # number runs into a word
        "#### 18\n####",  # last #### is empty
        "#### the answer is 18",  # strict wants the number right after ####
    ],
)
def test_strict_no_answer_scores_zero_even_with_format_score(response: str) -> None:
    assert gsm8k_score(response, "18", format_score=0.1) == 0.0


@pytest.mark.parametrize(
    "response, truth, expected",
    [
        ("3 + 4 = 7", "7", 1.0),
        ("I get 1,234 apples, so the answer is 1,234.", "1234", 1.0),
        ("costs $5 and -3 more: -3", "-3", 1.0),
        ("it is 2.5", "2.5", 1.0),
        ("it is 2.50.", "2.5", 1.0),
        ("#### the answer is 18", "18", 1.0),  # flexible ignores ####
        ("first 18, then 19", "18", 0.1),  # the last number counts
        ("no numbers here", "18", 0.0),
    ],
)
def test_flexible(response: str, truth: str, expected: float) -> None:
    assert gsm8k_score(response, truth, mode="flexible", format_score=0.1) == expected


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="strict, flexible"):
        gsm8k_score("#### 1", "1", mode="fuzzy")
