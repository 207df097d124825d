"""Walltime-aware saves: stop in time even when no signal comes.

Not every cluster sends USR2 before the time limit, and a fixed lead is a
guess. The trainer knows how long its steps and checkpoints take and when
the job ends (SLURM_JOB_END_TIME, else squeue's %e), so at each step
boundary it asks: would the next step plus a checkpoint still end before
the limit? If not, it saves now and the job requeues itself, the same way
as on a USR2 warning (grpo_core.preemption.WALLTIME).

`must_stop` is the decision, a pure function; `WalltimeGuard` feeds it the
measured times. `parse_time_limit` reads a time limit as sbatch --time
writes it (cluster.time), the one place those forms are known.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import re
import subprocess
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

EMA_WEIGHT = 0.3  # of the newest step: a slower step moves the estimate at once
RECENT_STEPS = 5  # the estimate is never below the slowest of these

# sbatch --time's forms (man sbatch); a bare number is minutes.
TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_TIME_RE = re.compile(r"(?:([0-9]+)-)?([0-9]+(?::[0-9]+){0,2})")


def parse_time_limit(text: str) -> int:
    """A time limit in one of sbatch's --time forms -> seconds (> 0).

    Without days, 1, 2 or 3 fields are MM, MM:SS, HH:MM:SS; with days,
    D-HH, D-HH:MM, D-HH:MM:SS. The leading field may be as large as you like
    (90, 90:00 and 36:00:00 are fine); the others are clock fields. No limit
    (0, UNLIMITED) is refused: the trainer plans its last save before the end.
    ValueError's message is one line that names the accepted forms."""
    match = _TIME_RE.fullmatch(str(text).strip())
    if not match:
        raise ValueError(f"{text!r} is not a Slurm time; use {TIME_FORMS} (e.g. 90, 4:00:00, 2-00:00:00)")
    days, clock = match.group(1), [int(f) for f in match.group(2).split(":")]
    if days is None:
        units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(clock)]
    else:
        units = (3600, 60, 1)[: len(clock)]
        if clock[0] > 23:
            raise ValueError(f"{text!r}: hours after 'D-' go up to 23; use {TIME_FORMS}")
    if any(f > 59 for f in clock[1:]):  # minutes and seconds after the leading field
        raise ValueError(f"{text!r}: minutes and seconds after ':' go up to 59; use {TIME_FORMS}")
    seconds = int(days or 0) * 86400 + sum(f * u for f, u in zip(clock, units))
    if seconds <= 0:
        raise ValueError(f"{text!r}: a job needs a time limit above 0; use {TIME_FORMS}")
    return seconds


def limit_minutes(seconds: int) -> int:
    """What Slurm applies: whole minutes, rounded up (it rounds --time=1:30 up to 2 minutes)."""
    return math.ceil(seconds / 60)


def step_estimate(recent: Sequence[float], ema: float | None) -> float | None:
    """Seconds the next step may take: the EMA, or the slowest recent step if that is longer."""
    if not recent and ema is None:
        return None
    return max([*recent, ema if ema is not None else 0.0])


def must_stop(now: float, end: float | None, step_s: float | None, checkpoint_s: float | None,
              margin_s: float) -> bool:
    """True when the next step and then a checkpoint would not fit before `end` (epoch seconds).

    Unknown end or step time: never. An unmeasured checkpoint is taken to be
    as long as a step (the first save has not happened yet)."""
    if end is None or step_s is None:
        return False
    save_s = step_s if checkpoint_s is None else checkpoint_s
    return now + step_s + save_s + margin_s > end


def parse_end_time(text: str) -> float | None:
    """SLURM_JOB_END_TIME (epoch seconds) or squeue's %e (local ISO time); None for N/A, Unknown, ''."""
    text = text.strip()
    if not text:
        return None
    if text.isdigit():
        return float(text) if int(text) > 0 else None
    try:
        return dt.datetime.fromisoformat(text).timestamp()  # naive: local time, as squeue prints it
    except ValueError:
        return None  # "N/A", "Unknown", "NONE": no limit known


def job_end_time(env: Mapping[str, str] | None = None,
                 run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> float | None:
    """When this Slurm job's time limit runs out (epoch seconds), or None outside Slurm / unknown."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_END_TIME"):
        return parse_end_time(env["SLURM_JOB_END_TIME"])
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        out = run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    lines = out.stdout.strip().splitlines()
    return parse_end_time(lines[0]) if lines else None


@dataclass
class WalltimeGuard:
    """Measured step and checkpoint times against the job's end."""

    end: float | None
    margin_s: float
    ema: float | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    checkpoint_s: float | None = None

    def observe_step(self, seconds: float) -> None:
        self.recent.append(seconds)
        self.ema = seconds if self.ema is None else EMA_WEIGHT * seconds + (1 - EMA_WEIGHT) * self.ema

    def observe_checkpoint(self, seconds: float) -> None:
        self.checkpoint_s = seconds

    def should_stop(self, now: float) -> bool:
        return must_stop(now, self.end, step_estimate(list(self.recent), self.ema), self.checkpoint_s, self.margin_s)

    def left_s(self, now: float) -> float | None:
        return None if self.end is None else self.end - now
