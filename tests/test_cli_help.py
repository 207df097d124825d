"""--help lists every key (type, default, allowed values, the field's comment
from the source); --show-config prints the resolved config that a run would use."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from grpo_core import config, keyref
from grpo_core.config import TrainConfig, build
from jobs import submit
from jobs.profiles import ClusterConfig, load_profile, load_resolved
from tests.conftest import REPO


@dataclass(frozen=True)
class _Sample:
    plain: int = 1
    trailing: str = "x"  # the trailing comment
    # a block above,
    # two lines long
    above: float = 0.5  # and a tail
    # separated from its field by a blank line: not its comment

    after_blank: bool = True
    nested: tuple[str, ...] = ("a,b",)  # a list


def test_comments_are_read_from_the_source() -> None:
    assert keyref.field_comments(_Sample) == {
        "plain": "", "trailing": "the trailing comment", "above": "a block above, two lines long and a tail",
        "after_blank": "", "nested": "a list"}
    by_name = {k.name: k for k in keyref.keys(_Sample, "s.", {"plain": (1, 2)})}
    assert by_name["s.plain"].choices == ("1", "2") and by_name["s.nested"].default == '["a,b"]'
    assert by_name["s.trailing"].type == "str" and by_name["s.after_blank"].default == "true"


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        out += _leaf_keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return out


def _help(module: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_train_help_lists_every_key_with_type_default_choices_and_comment() -> None:
    text = _help("grpo_core.train")
    for key in _leaf_keys(TrainConfig):
        assert f"\n  {key} = " in text, key
    assert "  rollout.sleep_level = 0  (int; one of: 0, 1, 2)\n" in text
    assert "      0: engine stays awake; 1/2: KV cache released" in text  # the comment in config.py
    assert "  model.dtype = float32  (str; one of: float32, bfloat16)\n" in text
    assert "  trainer.logprob_micro_batch_size = 0  (int)\n      sequences per no-grad log-prob forward" in text
    assert "  algorithm.loss_agg = token-mean  (str; one of: token-mean, seq-mean-token-sum," in text


def test_submit_help_lists_cluster_and_train_keys() -> None:
    text = _help("jobs.submit")
    for f in dataclasses.fields(ClusterConfig):
        assert f"\n  cluster.{f.name} = " in text, f.name
    for key in _leaf_keys(TrainConfig):
        assert f"\n  train.{key} = " in text, key
    assert "  cluster.launcher = slurm  (str; one of: slurm, local)\n" in text
    assert "  cluster.setup = []  (list of str)\n      shell lines run before the trainer" in text


def test_train_show_config_prints_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from grpo_core.train import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {path: m}\nrollout: {n: 3}\n")
    assert main(["--config", str(cfg_file), "optim.lr=2e-5", "--show-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert build(TrainConfig, printed) == config.load(cfg_file, ["optim.lr=2e-5"])
    assert printed["rollout"]["n"] == 3 and printed["optim"]["lr"] == 2e-5 and printed["rollout"]["top_p"] == 1.0
    assert not (tmp_path / "runs").exists()
    assert main(["--config", str(cfg_file), "rollout.n=x", "--show-config"]) == 2
    assert capsys.readouterr().err.startswith("error: override: rollout.n: expected int")


def test_submit_show_config_is_the_profile_the_run_gets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--profile", "h100x2", "--runs-dir", str(tmp_path), "--name", "r1", "train.rollout.n=8",
            "cluster.partition=big"]
    assert submit.main([*args, "--show-config"]) == 0
    out = capsys.readouterr().out
    (tmp_path / "p.yaml").write_text(out)
    shown = load_resolved(tmp_path / "p.yaml")
    assert shown.cluster.partition == "big" and shown.train.rollout.n == 8
    assert shown.train.trainer.run_dir == str(tmp_path / "r1")  # bound to the run, as submitted
    assert shown.train == submit.prepare(load_profile("h100x2", args[6:]), "r1", tmp_path)[0].train
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]  # nothing created


def test_dry_run_prints_the_script_and_the_training_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert submit.main(["--profile", "slurm-cpu", "--runs-dir", str(tmp_path), "--name", "d", "--dry-run",
                        "train.optim.lr=0.001"]) == 0
    captured = capsys.readouterr()
    script, sep, rest = captured.out.partition(f"# ---- {tmp_path / 'd' / 'train.yaml'}: the resolved training config")
    assert sep and script.startswith("#!/bin/bash\n") and "#SBATCH" in script
    commented = rest.split("\n", 1)[1].splitlines()
    assert all(line.startswith("# ") for line in commented)  # the output stays a valid script
    train = yaml.safe_load("\n".join(line[2:] for line in commented))
    assert build(TrainConfig, train) == submit.prepare(load_profile("slurm-cpu", ["train.optim.lr=0.001"]), "d",
                                                       tmp_path)[0].train
    assert "note: no --partition in the script" in captured.err
    assert "#SBATCH --partition" not in script
    assert not list(tmp_path.iterdir())
    assert submit.main(["--profile", "slurm-cpu", "--runs-dir", str(tmp_path), "--dry-run",
                        "cluster.partition=cpu"]) == 0
    captured = capsys.readouterr()
    assert "#SBATCH --partition=cpu\n" in captured.out and "no --partition" not in captured.err
