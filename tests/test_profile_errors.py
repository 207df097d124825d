"""Malformed and inconsistent profiles, configs and overrides: one line that says what and where."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grpo_core.config import ConfigError, load
from jobs.profiles import load_profile

REPO = Path(__file__).resolve().parent.parent


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BASE = "extends: local\ntrain:\n  trainer:\n    total_steps: 3\n"


@pytest.mark.parametrize("body, where, needle", [
    ("cluster:\n  partition: [a\n", 3, "not valid YAML"),                       # unclosed flow list
    ("cluster:\n  launcher: local\n   bad: 1\n", 3, "not valid YAML"),          # bad indentation
    ("train:\n\tmodel: {}\n", 2, "not valid YAML"),                             # a tab
    ("cluster:\n  partiton: gpu\n", 2, "unknown key 'cluster.partiton'"),
    ("extends: local\ntrain:\n  rollout:\n    nn: 5\n", 4, "unknown key 'train.rollout.nn'"),
    ("extends: local\ntrain:\n  rollout:\n    n: five\n", 4, "train.rollout.n: expected int"),
    ("extends: local\ntrain:\n  rollout:\n    n: 0\n", 4, "train.rollout.n=0 must be >= 1"),
    ("extends: local\ntrain:\n  optim:\n    lr: -1.0e-5\n", 4, "optim.lr=-1e-05 must be > 0"),
    ("extends: local\ntrain:\n  trainer:\n    prompts_per_step: 10\n    mini_batch_prompts: 3\n", 5,
     "does not divide"),
    ("extends: local\ncluster:\n  time: 0\n", 3, "cluster.time: '0': a job needs a time limit above 0"),
    ("extends: local\ncluster:\n  time: 2-25\n", 3, "cluster.time: '2-25': hours after 'D-' go up to 23"),
    ("extends: local\ncluster:\n  env: [1, 2]\n", None, "cluster.env"),
    ("extends: local\ntrainx: {}\n", 2, "unknown key 'trainx'"),
])
def test_profile_file_errors_name_file_and_line(body: str, where: int | None, needle: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.yaml", body)
    with pytest.raises(ConfigError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert "\n" not in message and needle in message, message
    if where is not None:
        assert f"{path}:{where}" in message, message


def test_error_in_a_parent_names_the_parent_s_line(tmp_path: Path) -> None:
    parent = _write(tmp_path / "parent.yaml", "extends: local\ntrain:\n  rollout:\n    n: -2\n")
    child = _write(tmp_path / "child.yaml", "extends: parent.yaml\ncluster:\n  time_min: 30\n")
    with pytest.raises(ConfigError, match=rf"{parent}:4: train.rollout.n=-2 must be >= 1"):
        load_profile(str(child))


def test_override_errors_say_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"override: train.rollout.n=0 must be >= 1"):
        load_profile("local", ["train.rollout.n=0"])


def test_extends_cycle(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "extends: b.yaml\n")
    _write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"extends cycle: a -> b -> a"):
        load_profile(str(tmp_path / "a.yaml"))
    _write(tmp_path / "self.yaml", "extends: self.yaml\n")
    with pytest.raises(ConfigError, match="extends cycle"):
        load_profile(str(tmp_path / "self.yaml"))


@pytest.mark.parametrize("override, needle", [
    ("train.rollout.n=0", "rollout.n=0 must be >= 1"),
    ("train.rollout.temperature=0", "rollout.temperature=0.0 must be > 0"),
    ("train.rollout.top_p=1.5", "rollout.top_p=1.5 must be in (0, 1]"),
    ("train.rollout.gpu_memory_utilization=0", "gpu_memory_utilization=0.0 must be in (0, 1]"),
    ("train.optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("train.optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("train.optim.beta2=1", "optim.beta2=1.0 must be in [0, 1)"),
    ("train.optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
    ("train.checkpoint.keep=0", "checkpoint.keep=0 must be >= 1"),
    ("train.checkpoint.every=-5", "checkpoint.every=-5 must be >= 0"),
    ("train.trainer.total_steps=-1", "trainer.total_steps=-1 must be >= 1"),
    ("train.trainer.micro_batch_size=0", "trainer.micro_batch_size=0 must be >= 1"),
    ("train.trainer.val_every=-1", "trainer.val_every=-1 must be >= 0"),
    ("train.trainer.mini_batch_prompts=7", "does not divide"),
    ("train.algorithm.kl_coef=-0.1", "algorithm.kl_coef=-0.1 must be >= 0"),
    ("train.algorithm.clip_low=-1", "algorithm.clip_low=-1.0 must be >= 0"),
    ("train.model.lora_rank=-8", "model.lora_rank=-8 must be >= 0"),
    ("train.data.max_prompt_tokens=0", "data.max_prompt_tokens=0 must be >= 1"),
    ("cluster.nodes=0", "cluster.nodes=0 must be >= 1"),
    ("cluster.gpus_per_node=-1", "cluster.gpus_per_node=-1 must be >= 0"),
    ("cluster.time=abc", "cluster.time: 'abc' is not a Slurm time; use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    ("cluster.time=1:60", "minutes and seconds after ':' go up to 59"),
    ("train.rollout.n=5.5", "rollout.n: expected int"),
    ("train.trainer.shuffle=1", "unknown key"),
    ("train.trainer=3", "names a section"),
    ("cluster.launcher=pbs", "valid values: slurm, local"),
    ("nonsense", "keys start with 'cluster.' or 'train.'"),
    ("train.rollout.n", "not of the form key=value"),
])
def test_out_of_range_and_inconsistent_overrides(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_profile("local", [override])
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_train_config_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    cfg = _write(tmp_path / "t.yaml", "model:\n  path: x\nrollout:\n  n: 0\n")
    with pytest.raises(ConfigError, match=rf"{cfg}:4: rollout.n=0 must be >= 1"):
        load(cfg)
    bad = _write(tmp_path / "b.yaml", "model:\n  path: x\n rollout: 3\n")
    with pytest.raises(ConfigError, match=rf"{bad}:3:\d+: not valid YAML"):
        load(bad)


@pytest.mark.parametrize("args", [
    ["--config", "missing.yaml"],
    ["--config", "{bad}"],
    ["model.path=x", "rollout.n=0"],
    ["--bogus-flag"],
    ["model.path=x", "rollout.n"],
])
def test_train_cli_bad_input_is_at_most_three_lines(args: list[str], tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.yaml", "rollout: [1,\n")
    args = [a.replace("{bad}", str(bad)) for a in args]
    out = subprocess.run([sys.executable, "-m", "grpo_core.train", *args], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and 1 <= len(lines) <= 3 and "Traceback" not in out.stderr, out.stderr
    assert lines[-1].startswith("error: "), out.stderr


@pytest.mark.parametrize("files, start, cycle", [
    ({"selfn": "extends: selfn\n"}, "selfn", "selfn -> selfn"),
    ({"a": "extends: b\n", "b": "extends: a\n"}, "a", "a -> b -> a"),
    ({"a": "extends: b\n", "b": "extends: c\n", "c": "extends: b\n"}, "a", "a -> b -> c -> b"),
])
def test_extends_cycle_by_name(files: dict, start: str, cycle: str, tmp_path: Path, monkeypatch) -> None:
    """By name a profile never finds itself (a user's local.yaml may extend the shipped local), so a
    name only the chain has is a cycle, said as one, not 'unknown profile' listing that very name."""
    for name, text in files.items():
        _write(tmp_path / f"{name}.yaml", text)
    monkeypatch.setenv("GRPO_PROFILES_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"extends cycle: {cycle} \(no other profile named"):
        load_profile(start)
    _write(tmp_path / "local.yaml", "extends: local\ncluster: {time_min: 50}\n")  # the shipped one: no cycle
    assert load_profile("local").cluster.time_min == 50
