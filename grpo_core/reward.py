"""GSM8K answer extraction and scoring (pure Python, no torch, no config).

Strict mode follows verl's GSM8K recipe: the model must write its final
answer after "####". Unlike a bare regex match, answers are normalised the
way a careful human grader would: "#### $1,234." is right for 1234 and
"5.0" is right for 5.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["REWARD_MODES", "extract_gsm8k_answer", "gsm8k_score", "normalize_number"]

REWARD_MODES = ("strict", "flexible")  # data.reward_mode

# A number as people write it: optional sign and "$" (in either order),
# digits with optional thousands commas, optional decimals.
_NUMBER = r"[-+]?\s*\$?\s*[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)"
# Strict: the number must come right after "####" (markdown bold allowed) and
# must not run into a word ("#### 18abc" is not a well-formed answer).
_STRICT = re.compile(r"\s*\**\s*(" + _NUMBER + r")(?![\w.,]*\w)")
# Flexible: every number in the text; the last one wins. Commas only count as
# thousands separators ("3,4" in running text is two numbers in practice).
_FLEX = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_CANONICAL = re.compile(r"-?\d+(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """Strip what graders ignore: whitespace, commas, "$", a trailing "."."""
    s = text.strip().replace(",", "").replace(" ", "")
    s = s.rstrip(".")
    # "-$5", "$-5" and "$5" all mean the same number.
    sign = ""
    while s[:1] in ("-", "+", "$"):
        if s[0] == "-":
            sign = "-" if not sign else ""
        s = s[1:]
    if s.startswith("."):  # ".5" -> "0.5"
        s = "0" + s
    return sign + s


def _to_decimal(text: str) -> Decimal | None:
    if not _CANONICAL.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex already guards this
        return None


def _same(answer: str, ground_truth: str) -> bool:
    a, g = _to_decimal(answer), _to_decimal(ground_truth)
    if a is not None and g is not None:
        return a == g  # exact decimal equality: "5.0" == "5", no float fuzz
    return answer == ground_truth


def extract_gsm8k_answer(solution: str) -> str:
    """Ground truth from a GSM8K gold solution: the text after the last "####"."""
    if "####" not in solution:
        raise ValueError("gold solution has no '####' final answer")
    return normalize_number(solution.rsplit("####", 1)[1])


def _strict_answer(response: str) -> str | None:
    if "####" not in response:
        return None
    match = _STRICT.match(response.rsplit("####", 1)[1])
    return normalize_number(match.group(1)) if match else None


def _flexible_answer(response: str) -> str | None:
    found = _FLEX.findall(response)
    return normalize_number(found[-1]) if found else None


def gsm8k_score(response: str, ground_truth: str, *, mode: str = "strict", format_score: float = 0.0) -> float:
    """1.0 if correct; `format_score` if an answer is there but wrong; else 0.0.

    strict: the number right after the LAST "####" in `response`.
    flexible: the last number anywhere in `response`.
    """
    if mode == "strict":
        answer = _strict_answer(response)
    elif mode == "flexible":
        answer = _flexible_answer(response)
    else:
        raise ValueError(f"unknown reward mode {mode!r}; valid: {', '.join(REWARD_MODES)}")
    if answer is None or _to_decimal(answer) is None:
        return 0.0
    return 1.0 if _same(answer, normalize_number(ground_truth)) else format_score
