"""Every numeric key of the trainer config (grpo_core/config.py, enumerated,
so a new key is covered the day it is added) with 0, -1, nan, +-inf and a
huge value, through both entry points: `grpo_core.train --config FILE` and
`jobs.submit --profile local --dry-run train.KEY=V`. An invalid value is one
line naming the key (file:line for the YAML file), exit 2, no run dir; a
valid one passes. Which values are valid is the table below, by hand."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from grpo_core import train
from grpo_core.config import TrainConfig
from grpo_core.strictconf import yaml_lines
from grpo_core.exitcodes import EXIT_BAD_INPUT
from jobs import submit

# label: (override text, YAML text)
VALUES = {"0": ("0", "0"), "-1": ("-1", "-1"), "nan": ("nan", ".nan"), "inf": ("inf", ".inf"),
          "-inf": ("-inf", "-.inf"), "huge": (str(10**40), str(10**40))}

ZERO_OK = {  # 0 means "off" or "none", or is a legal setting
    "model.lora_rank", "model.recompute_layers", "data.format_score", "algorithm.clip_low", "algorithm.clip_high", "algorithm.kl_coef",
    "algorithm.entropy_coef", "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.grad_clip",
    "optim.warmup_steps", "trainer.logprob_micro_batch_size", "trainer.micro_batch_tokens",
    "trainer.logprob_micro_batch_tokens", "trainer.seed", "trainer.val_every", "trainer.val_prompts",
    "trainer.num_threads", "checkpoint.every", "checkpoint.walltime_margin_s", "rollout.sleep_level",
}
NEGATIVE_OK = {"data.format_score"}  # a penalty for a wrong answer in the right format
# Floats with no natural upper bound. Ints never take 10**40: each reaches a C int (config.INT_MAX).
HUGE_OK = {
    "data.format_score", "rollout.temperature", "rollout.cpu_kv_cache_gib", "algorithm.adv_eps",
    "algorithm.clip_low", "algorithm.clip_high", "algorithm.kl_coef", "algorithm.entropy_coef", "optim.lr",
    "optim.weight_decay", "optim.eps", "optim.grad_clip", "checkpoint.walltime_margin_s",
}


def numeric_keys() -> list[str]:
    keys = []
    for section in dataclasses.fields(TrainConfig):
        cls = typing.get_type_hints(TrainConfig)[section.name]
        for name, tp in typing.get_type_hints(cls).items():
            if tp in (int, float):
                keys.append(f"{section.name}.{name}")
    return keys


CASES = [(key, label) for key in numeric_keys() for label in VALUES]


def valid(key: str, label: str) -> bool:
    return (label == "0" and key in ZERO_OK) or (label == "-1" and key in NEGATIVE_OK) or (
        label == "huge" and key in HUGE_OK)


def test_the_table_names_only_real_keys() -> None:
    assert ZERO_OK | NEGATIVE_OK | HUGE_OK <= set(numeric_keys())
    assert len(numeric_keys()) > 40  # the enumeration found the config


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert len(lines[0]) < 300, lines[0]  # a huge value is not echoed in full
    return lines[0]


@pytest.mark.parametrize("key, label", CASES)
def test_train_config_file(key: str, label: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    section, name = key.split(".")
    sections = {"model": {"path": "x"}, "data": {"task": "synthetic"}, "trainer": {"run_dir": str(tmp_path / "run")}}
    sections.setdefault(section, {})[name] = VALUES[label][1]  # YAML text: .nan, .inf
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{s}:\n" + "".join(f"  {k}: {v}\n" for k, v in body.items())
                            for s, body in sections.items()))
    code = train.main(["--config", str(path), "--show-config"])
    if valid(key, label):
        assert code == 0, capsys.readouterr().err
        return
    line = _error_line(capsys)
    assert code == EXIT_BAD_INPUT, line
    assert line.startswith(f"error: {path}:{yaml_lines(path)[key]}: {key}"), line  # the key's own line
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("key, label", CASES)
def test_submit_dry_run(key: str, label: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--profile", "local", "--name", "r", "--runs-dir", str(tmp_path / "runs"), "--dry-run",
            f"train.{key}={VALUES[label][0]}"]
    if valid(key, label):
        assert submit.main(argv) == 0, capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as info:
            submit.main(argv)
        line = _error_line(capsys)
        assert info.value.code == EXIT_BAD_INPUT, line
        assert line.startswith(f"error: profile local: override: train.{key}"), line
    assert not list(tmp_path.iterdir())  # nothing created either way


def test_a_number_too_long_to_read(tmp_path: Path, capsys, monkeypatch) -> None:
    """Past Python's 4300-digit int limit, from YAML (was a ValueError traceback) and an override."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{path: x}}\ntrainer: {{seed: {'9' * 5000}}}\n")
    assert train.main(["--config", str(path), "--show-config"]) == EXIT_BAD_INPUT
    assert _error_line(capsys).startswith(f"error: {path}: not valid YAML: Exceeds the limit")
    assert train.main(["model.path=x", f"trainer.seed={'9' * 5000}", "--show-config"]) == EXIT_BAD_INPUT
    assert _error_line(capsys).endswith("... (5002 characters)")
    assert list(tmp_path.iterdir()) == [path]


# The cluster's counts (jobs/profiles.py), through jobs.submit: label -> accepted.
CLUSTER_ZERO_OK = {"gpus_per_node", "cpus_per_task", "max_requeues"}


@pytest.mark.parametrize("key", ["nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "signal_lead_s",
                                 "max_requeues"])
@pytest.mark.parametrize("label", list(VALUES))
def test_cluster_counts(key: str, label: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--profile", "slurm-cpu", "--name", "r", "--runs-dir", str(tmp_path / "runs"), "--dry-run",
            f"cluster.{key}={VALUES[label][0]}"]
    if label == "0" and key in CLUSTER_ZERO_OK:
        assert submit.main(argv) == 0, capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as info:
            submit.main(argv)
        line = _error_line(capsys)
        assert info.value.code == EXIT_BAD_INPUT and f"cluster.{key}" in line, line
    assert not list(tmp_path.iterdir())
