"""GSM8K loading, prompts, synthetic task, resumable sampler."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo_core.data import (
    DataError,
    Example,
    PromptSampler,
    load_gsm8k,
    synthetic_arithmetic,
)
from tests.conftest import GSM8K_DIR as DATA


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- loading

def test_load_real_test_split() -> None:
    examples = load_gsm8k(str(DATA / "test.jsonl"), "test")
    assert len(examples) == 1319
    assert examples[0].answer == "18"  # Janet's ducks
    assert examples[0].question.startswith("Janet")
    assert all("," not in e.answer and e.answer for e in examples)
    # a directory works too: <dir>/<split>.jsonl
    assert load_gsm8k(str(DATA), "test") == examples


def test_answer_is_normalised(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "work\n#### 1,234"}])
    assert load_gsm8k(str(f), "train") == [Example("q", "1234")]


def one_line_error(path: str, split: str = "train") -> str:
    with pytest.raises(DataError) as info:
        load_gsm8k(path, split)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    good = {"question": "q", "answer": "#### 1"}
    f = write_jsonl(tmp_path / "bad.jsonl", [good, good, "{not json"])
    assert f"{f}:3:" in one_line_error(str(f))


def test_a_line_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    """Was a UnicodeDecodeError traceback (exit 1)."""
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"question": "1+1", "answer": "#### 2"}\n{"question": "\xff", "answer": "#### 3"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not UTF-8 text \(invalid start byte at byte 14 of the line\)$"):
        load_gsm8k(str(path), "train")


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q"}])
    message = one_line_error(str(f))
    assert f"{f}:2:" in message and "'answer'" in message


def test_answer_without_final_marker_and_non_object(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "just 5"}])
    assert f"{f}:1:" in one_line_error(str(f))
    g = write_jsonl(tmp_path / "b.jsonl", [[1, 2]])
    assert f"{g}:1:" in one_line_error(str(g))


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert str(empty) in one_line_error(str(empty)) and "empty" in one_line_error(str(empty))
    missing = tmp_path / "nope.jsonl"
    assert str(missing) in one_line_error(str(missing))
    assert "test.jsonl" in one_line_error(str(tmp_path), "test")  # dir without the split
    other = tmp_path / "d.csv"
    other.write_text("x")
    assert ".csv" in one_line_error(str(other))


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"question": "a?", "answer": "x\n#### 1,000"}, {"question": "b?", "answer": "#### -2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    expected = [Example("a?", "1000"), Example("b?", "-2")]
    assert load_gsm8k(str(tmp_path / "train.parquet"), "train") == expected
    assert load_gsm8k(str(tmp_path), "train") == expected
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), tmp_path / "bad.parquet")
    message = one_line_error(str(tmp_path / "bad.parquet"))
    assert "bad.parquet row 1" in message and "'answer'" in message


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_and_correct() -> None:
    a = synthetic_arithmetic(200, 4, seed=3)
    assert a == synthetic_arithmetic(200, 4, seed=3)
    assert a != synthetic_arithmetic(200, 4, seed=4)
    for ex in a:
        x, y = (int(v) for v in ex.question.split(" + "))
        assert x >= 0 and y >= 0 and x + y <= 4 and ex.answer == str(x + y)
    # every pair with a sum <= 4 occurs (15 of them), and the sums are near uniform
    assert {ex.question for ex in a} == {f"{x} + {s - x}" for s in range(5) for x in range(s + 1)}
    counts = [sum(ex.answer == str(s) for ex in a) for s in range(5)]
    assert min(counts) >= 25, counts  # 40 expected each out of 200


# ---------------------------------------------------------------- sampler

def take(sampler: PromptSampler, k: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(k)]


def test_sampler_epochs_are_permutations_and_deterministic() -> None:
    s = PromptSampler(10, 5, seed=7, shuffle=True)
    batches = take(s, 4)  # exactly two epochs
    assert sorted(batches[0] + batches[1]) == list(range(10))
    assert sorted(batches[2] + batches[3]) == list(range(10))
    assert batches[0] + batches[1] != batches[2] + batches[3]  # a fresh order each epoch
    assert take(PromptSampler(10, 5, seed=7, shuffle=True), 4) == batches
    assert take(PromptSampler(10, 5, seed=8, shuffle=True), 4) != batches
    assert s.state_dict() == {"epoch": 1, "cursor": 10}


def test_sampler_no_shuffle_wraps_across_epochs() -> None:
    s = PromptSampler(5, 3, seed=0, shuffle=False)
    assert take(s, 3) == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]
    assert s.state_dict() == {"epoch": 1, "cursor": 4}
    assert PromptSampler(2, 5, seed=0, shuffle=False).next_batch() == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 7])
def test_sampler_resume_gives_the_same_batches(cut: int) -> None:
    reference = take(PromptSampler(7, 3, seed=11, shuffle=True), 12)
    first = PromptSampler(7, 3, seed=11, shuffle=True)
    take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    resumed = PromptSampler(7, 3, seed=11, shuffle=True)
    resumed.load_state_dict(state)
    assert take(resumed, 12 - cut) == reference[cut:]


def test_sampler_rejects_bad_state() -> None:
    s = PromptSampler(7, 3, seed=0, shuffle=True)
    with pytest.raises(DataError):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(DataError):
        s.load_state_dict({"epoch": 0, "cursor": 8})


def test_hub_path_calls_datasets_and_wraps_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name: str, config: str, split: str) -> list:
        calls.append((name, config, split))
        if split == "bad":
            raise ConnectionError("offline\nsecond line")
        return [{"question": "q", "answer": "#### 3"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_gsm8k("", "test") == [Example("q", "3")]
    assert calls == [("openai/gsm8k", "main", "test")]
    message = one_line_error("", "bad")
    assert "openai/gsm8k" in message and "offline" in message
