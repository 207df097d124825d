"""Bad input to `python -m grpo_core.train`: one line on stderr, exit 2,
and no run directory left behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, config: str, *overrides: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "grpo_core.train", "--config", str(cfg), f"trainer.run_dir={tmp_path / 'run'}", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    for needle in needles:
        assert needle in lines[0], lines[0]


GOOD_DATA = '{"question": "1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD_DATA * 4)
    return path


def base_config(tmp_path: Path, train_path: Path | str) -> str:
    return (
        f"model: {{path: {tmp_path / 'model'}, tiny: true}}\n"
        f"data: {{task: gsm8k, train_path: {train_path}, test_path: {train_path}}}\n"
        "trainer: {total_steps: 1, prompts_per_step: 2, mini_batch_prompts: 2}\n"
    )


def test_unknown_key_names_valid_keys(tmp_path, data_file):
    proc = run(tmp_path, base_config(tmp_path, data_file), "rollout.nn=3")
    assert_one_line_error(proc, "unknown key 'rollout.nn'", "max_tokens", "temperature")
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_yaml(tmp_path, data_file):
    proc = run(tmp_path, base_config(tmp_path, data_file) + "optim: {learning_rate: 1}\n")
    assert_one_line_error(proc, "unknown key 'optim.learning_rate'", "lr")
    assert not (tmp_path / "run").exists()


def test_wrong_type(tmp_path, data_file):
    proc = run(tmp_path, base_config(tmp_path, data_file), "rollout.n=five")
    assert_one_line_error(proc, "rollout.n", "expected int")
    proc = run(tmp_path, base_config(tmp_path, data_file) + "optim: {lr: fast}\n")
    assert_one_line_error(proc, "optim.lr", "expected float")
    assert not (tmp_path / "run").exists()


def test_missing_model_path(tmp_path, data_file):
    cfg = base_config(tmp_path, data_file).replace("tiny: true", "tiny: false")
    proc = run(tmp_path, cfg)
    assert_one_line_error(proc, "model.path", "does not exist")
    assert not (tmp_path / "run").exists()


def test_missing_data_file(tmp_path):
    proc = run(tmp_path, base_config(tmp_path, tmp_path / "nope.jsonl"))
    assert_one_line_error(proc, "nope.jsonl")
    assert not (tmp_path / "run").exists()


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD_DATA + "{not json\n" + GOOD_DATA)
    proc = run(tmp_path, base_config(tmp_path, bad))
    assert_one_line_error(proc, "bad.jsonl", ":2")
    assert not (tmp_path / "run").exists()


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run(tmp_path, base_config(tmp_path, empty))
    assert_one_line_error(proc, "empty.jsonl", "empty")
    assert not (tmp_path / "run").exists()


def test_mini_batch_must_divide_batch(tmp_path, data_file):
    proc = run(tmp_path, base_config(tmp_path, data_file), "trainer.prompts_per_step=6", "trainer.mini_batch_prompts=4")
    assert_one_line_error(proc, "mini_batch_prompts=4", "prompts_per_step=6")
    assert not (tmp_path / "run").exists()


def test_help_lists_options():
    proc = subprocess.run([sys.executable, "-m", "grpo_core.train", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--config" in proc.stdout and "rollout.n=8" in proc.stdout
