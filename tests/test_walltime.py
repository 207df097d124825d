"""Walltime-aware saves: the decision by hand, the job-end lookup, the guard's estimate.

The end-to-end proof (a Slurm job with a short --time and no --signal saves,
requeues itself and finishes) is in tests/test_slurm_sweeps.py.
"""
from __future__ import annotations

import datetime as dt
import subprocess

import pytest

from grpo_core.preemption import WALLTIME, Preemption
from grpo_core.walltime import (WalltimeGuard, job_end_time, limit_minutes, must_stop, parse_end_time, parse_time_limit,
                                step_estimate)


def test_must_stop_by_hand() -> None:
    # 100 s left; a step 40 s, a checkpoint 30 s, margin 20 s: 90 s needed -> go on.
    assert not must_stop(now=1000, end=1100, step_s=40, checkpoint_s=30, margin_s=20)
    # 89 s left: the same step would end the job in the middle of its checkpoint -> stop.
    assert must_stop(now=1011, end=1100, step_s=40, checkpoint_s=30, margin_s=20)
    # exactly enough is enough
    assert not must_stop(now=1010, end=1100, step_s=40, checkpoint_s=30, margin_s=20)
    # unknown end (no Slurm, no limit) or no step measured yet: never
    assert not must_stop(now=1e12, end=None, step_s=40, checkpoint_s=30, margin_s=20)
    assert not must_stop(now=1099, end=1100, step_s=None, checkpoint_s=None, margin_s=0)
    # no checkpoint measured yet: it counts as long as a step (40 + 40 + 20 > 99)
    assert must_stop(now=1001, end=1100, step_s=40, checkpoint_s=None, margin_s=20)
    assert not must_stop(now=1000, end=1100, step_s=40, checkpoint_s=None, margin_s=20)


def test_step_estimate_is_the_ema_or_the_slowest_recent_step() -> None:
    assert step_estimate([], None) is None
    assert step_estimate([3.0, 9.0, 4.0], 5.0) == 9.0
    assert step_estimate([3.0, 4.0], 5.0) == 5.0


def test_guard_follows_measured_times() -> None:
    guard = WalltimeGuard(end=1000.0, margin_s=5.0)
    assert not guard.should_stop(0.0)  # nothing measured
    for seconds in (10.0, 10.0, 10.0):
        guard.observe_step(seconds)
    assert guard.ema == pytest.approx(10.0)
    guard.observe_checkpoint(2.0)
    assert not guard.should_stop(983.0)  # 983 + 10 + 2 + 5 = 1000
    assert guard.should_stop(983.5)
    guard.observe_step(30.0)  # one slow step (validation, a straggler) counts at once
    assert guard.ema == pytest.approx(16.0)
    assert guard.should_stop(1000 - 30 - 2 - 5 + 0.5) and not guard.should_stop(1000 - 30 - 2 - 5 - 0.5)
    assert guard.left_s(990.0) == 10.0 and WalltimeGuard(None, 5.0).left_s(1.0) is None


def test_parse_end_time() -> None:
    assert parse_end_time("1767225600") == 1767225600.0
    local = dt.datetime(2026, 12, 3, 7, 30, 0)
    assert parse_end_time("2026-12-03T07:30:00") == local.timestamp()  # squeue prints local time
    for unknown in ("", "N/A", "Unknown", "NONE", "0"):
        assert parse_end_time(unknown) is None


def _fake_squeue(stdout: str, returncode: int = 0, calls: list | None = None):
    def run(cmd, **_kw):
        if calls is not None:
            calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr="")
    return run


def test_job_end_time_sources() -> None:
    calls: list = []
    # The environment wins: no squeue call.
    assert job_end_time({"SLURM_JOB_END_TIME": "2000", "SLURM_JOB_ID": "7"}, _fake_squeue("x", calls=calls)) == 2000.0
    assert calls == []
    # Else squeue's %e for this job.
    end = job_end_time({"SLURM_JOB_ID": "7"}, _fake_squeue("2026-12-03T07:30:00\n", calls=calls))
    assert end == dt.datetime(2026, 12, 3, 7, 30).timestamp()
    assert calls == [["squeue", "-h", "-j", "7", "-o", "%e"]]
    # squeue fails, is missing, or there is no job: unknown.
    assert job_end_time({"SLURM_JOB_ID": "7"}, _fake_squeue("", returncode=1)) is None

    def missing(cmd, **_kw):
        raise FileNotFoundError(cmd[0])
    assert job_end_time({"SLURM_JOB_ID": "7"}, missing) is None
    assert job_end_time({}, _fake_squeue("2026-12-03T07:30:00")) is None


def test_job_end_time_from_a_real_squeue_like_line_of_no_limit() -> None:
    assert job_end_time({"SLURM_JOB_ID": "7"}, _fake_squeue("N/A\n")) is None


def test_walltime_request_requeues_like_usr2() -> None:
    for reason, again in ((WALLTIME, True), ("SIGUSR2", True), ("SIGTERM", False)):
        flag = Preemption()
        flag.request(reason)
        assert flag.requested and flag.requeue_self is again
    assert Preemption().requeue_self is False


def test_trainer_saves_before_the_job_end(tmp_path) -> None:
    """The trainer in a job whose end is (already) too near: it saves after its
    first step and exits 75; with time enough it resumes and finishes."""
    import json
    import os
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "grpo_core.train", "--config", str(repo / "tests" / "recipes" / "tiny_synthetic.yaml"),
           f"model.path={tmp_path / 'model'}", f"trainer.run_dir={run_dir}", "trainer.total_steps=3",
           "tracking.enabled=false", "checkpoint.every=0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    near = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**env, "SLURM_JOB_END_TIME": str(int(time.time()))})
    assert near.returncode == 75, near.stdout[-2000:] + near.stderr[-2000:]
    assert "left before the time limit" in near.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["step"] == 1
    assert status["latest_checkpoint"].endswith("step_000001")
    far = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600,
                         env={**env, "SLURM_JOB_END_TIME": str(int(time.time()) + 3600)})
    assert far.returncode == 0, far.stdout[-2000:] + far.stderr[-2000:]
    assert "resuming from" in far.stdout and "time limit" not in far.stderr
    # Not a terminal: one plain progress line per step, ETA included.
    lines = [line for line in far.stdout.splitlines() if line.startswith("[grpo] step")]
    assert [line.split(" (")[0] for line in lines] == ["[grpo] step 2/3", "[grpo] step 3/3"], far.stdout
    assert " eta 0:00:00 | " in lines[-1] and "tok/s | reward " in lines[-1] and "| slowest " in lines[-1]
    assert json.loads((run_dir / "status.json").read_text())["step"] == 3


@pytest.mark.parametrize("text, seconds", [
    ("90", 90 * 60),                            # MM: a bare number is minutes
    ("0:45", 45),                               # MM:SS
    ("90:30", 90 * 60 + 30),                    # MM:SS, minutes past the hour are fine
    ("4:00:00", 4 * 3600),                      # HH:MM:SS
    ("36:15:07", 36 * 3600 + 15 * 60 + 7),      # HH:MM:SS, hours past a day are fine
    ("2-12", 2 * 86400 + 12 * 3600),            # D-HH
    ("1-00:30", 86400 + 30 * 60),               # D-HH:MM
    ("2-00:00:00", 2 * 86400),                  # D-HH:MM:SS
    ("0-00:00:01", 1),
    (" 3-04:05:06 ", 3 * 86400 + 4 * 3600 + 5 * 60 + 6),
])
def test_parse_time_limit_by_hand(text: str, seconds: int) -> None:
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize("text, needle", [
    ("", "is not a Slurm time"), ("abc", "is not a Slurm time"), ("1h", "is not a Slurm time"),
    ("-5", "is not a Slurm time"), ("1:2:3:4", "is not a Slurm time"), ("1-", "is not a Slurm time"),
    ("1.5", "is not a Slurm time"), ("UNLIMITED", "is not a Slurm time"), ("\u0661\u0662", "is not a Slurm time"),
    ("0", "above 0"), ("0-00:00:00", "above 0"),
    ("1:60", "go up to 59"), ("1:60:00", "go up to 59"), ("1-02:03:60", "go up to 59"), ("1-24", "up to 23"),
])
def test_parse_time_limit_refuses_in_one_line_naming_the_forms(text: str, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_time_limit(text)
    message = str(info.value)
    assert needle in message and "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS" in message
    assert "\n" not in message


def test_limit_minutes_rounds_up_as_slurm_does() -> None:
    assert [limit_minutes(s) for s in (1, 59, 60, 61, 90, 5400, 2 * 86400)] == [1, 1, 1, 2, 2, 90, 2880]
