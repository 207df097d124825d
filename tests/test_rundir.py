"""The run-directory contract, one copy for the trainer and jobs.*: atomic fsync'd writes,
reads of missing and torn files, and which rank a process is."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from grpo_core import distributed, launchenv, rundir
from grpo_core.exitcodes import EXIT_BAD_INPUT
from grpo_core.rundir import RunFileError, read_json, write_json_atomic
from jobs import compare, launch, runs


def test_one_copy_for_jobs_and_the_trainer() -> None:
    assert runs.read_json is rundir.read_json and not hasattr(runs, "write_json_atomic")  # one copy, in grpo_core
    assert compare.read_json is rundir.read_json
    assert launch.env_rank is distributed.env_rank is launchenv.env_rank


def test_write_is_fsynced_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_json_atomic(tmp_path / "run.json", {"b": 1, "a": [2]})
    # the file's data, then the rename, then the directory entry
    assert events == ["fsync", "replace", "fsync"]
    assert (tmp_path / "run.json").read_text() == '{\n "a": [\n  2\n ],\n "b": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "status.json"
    write_json_atomic(path, {"step": 1})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        write_json_atomic(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "run.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == 0o640  # 0666 & ~027: others on the cluster may read it


def test_read_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_json(tmp_path / "nope.json") == {} and read_json(tmp_path / "nope.json", strict=False) == {}


@pytest.mark.parametrize("text", ['{"state": "runn', "", "[1, 2]", "\xff\xfe"])
def test_read_of_a_torn_or_foreign_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "status.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(RunFileError) as info:
        read_json(path)
    assert str(info.value).startswith(f"{path}: unreadable (") and "\n" not in str(info.value)
    assert info.value.code == EXIT_BAD_INPUT
    assert read_json(path, strict=False) == {}
    assert runs.read_status(tmp_path) == {}  # jobs.status shows the run without the trainer's view


def test_write_status_replaces_a_torn_status(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text('{"state": "runn')
    rundir.write_status(tmp_path, state="running", step=3)
    status = read_json(tmp_path / "status.json")
    assert status["state"] == "running" and status["step"] == 3 and "updated" in status


RANK_ENV = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "SLURM_LOCALID", "WORLD_SIZE", "SLURM_NTASKS")


@pytest.mark.parametrize("env, rank, local, world", [
    ({}, 0, 0, 1),
    ({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}, 3, 1, 4),
    # torchrun inside an allocation: one Slurm task, its workers told apart by torchrun's variables
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "RANK": "2", "LOCAL_RANK": "2",
      "WORLD_SIZE": "4"}, 2, 2, 4),
    ({"RANK": " ", "SLURM_PROCID": "1"}, 1, 0, 1),  # blank is unset
])
def test_rank_precedence(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], rank: int, local: int, world: int) -> None:
    for name in RANK_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert (launchenv.env_rank(), launchenv.env_local_rank(), launchenv.env_world_size()) == (rank, local, world)
