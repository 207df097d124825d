"""The per-step progress line: step/total, elapsed, ETA, tokens/s, reward, the slowest stage.

One pure function makes the line (the trainer prints it, `jobs.status
--follow` prints the same line from metrics.jsonl). On a terminal the trainer
shows a live tqdm bar instead; in a Slurm log (not a terminal) it prints one
plain line per step, which greps and tails well.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from typing import IO, Any, Mapping, Sequence

from .stages import STAGES as STEP_STAGES

STAGES = (*STEP_STAGES, "validation")  # metrics time_<stage>
ETA_WINDOW = 10  # recent steps the ETA averages over


def hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def eta_s(step: int, total: int, recent_step_s: Sequence[float]) -> float | None:
    """Seconds to the last step at the mean pace of the recent steps."""
    if not recent_step_s:
        return None
    return max(0, total - step) * sum(recent_step_s) / len(recent_step_s)


def slowest_stage(metrics: Mapping[str, Any]) -> tuple[str, float] | None:
    times = [(name, float(metrics[f"time_{name}"])) for name in STAGES if isinstance(metrics.get(f"time_{name}"), (int, float))]
    return max(times, key=lambda item: item[1]) if times else None


def step_seconds(metrics: Mapping[str, Any]) -> float:
    """A step's wall time, validation included."""
    return float(metrics.get("time_step", 0.0)) + float(metrics.get("time_validation", 0.0))


def stats(metrics: Mapping[str, Any]) -> str:
    """Everything after step/elapsed/ETA: tokens/s, reward, the slowest stage, and a few more."""
    parts = []
    if isinstance(metrics.get("tokens_per_s"), (int, float)):
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    if isinstance(metrics.get("reward_mean"), (int, float)):
        parts.append(f"reward {metrics['reward_mean']:.3f}")
    if isinstance(metrics.get("accuracy"), (int, float)):
        parts.append(f"acc {metrics['accuracy']:.3f}")
    if isinstance(metrics.get("policy_loss"), (int, float)):
        parts.append(f"loss {metrics['policy_loss']:+.4f}")
    slow = slowest_stage(metrics)
    if slow is not None:
        parts.append(f"slowest {slow[0]} {slow[1]:.2f}s")
    if isinstance(metrics.get("val_accuracy"), (int, float)):
        parts.append(f"val_acc {metrics['val_accuracy']:.3f}")
    return " | ".join(parts)


def progress_line(step: int, total: int, elapsed: float | None, eta: float | None, metrics: Mapping[str, Any]) -> str:
    width = len(str(total))
    pct = 100.0 * step / total if total else 0.0
    head = f"[grpo] step {step:>{width}}/{total} ({pct:3.0f}%) elapsed {hms(elapsed)} eta {hms(eta)}"
    rest = stats(metrics)
    return f"{head} | {rest}" if rest else head


class Progress:
    """Prints one line per step, or drives a tqdm bar when `stream` is a terminal.

    Elapsed is this job's wall time since the loop began; the ETA is the mean
    of the recent steps' wall times times the steps left."""

    def __init__(self, total: int, start_step: int, stream: IO[str] | None = None, live: bool | None = None) -> None:
        self.total, self.stream = total, stream or sys.stdout
        self.recent: deque[float] = deque(maxlen=ETA_WINDOW)
        self._start = self._last = time.monotonic()
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.bar = None
        if isatty() if live is None else live:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True,
                            bar_format="step {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def step(self, step: int, metrics: Mapping[str, Any]) -> str:
        """Record step `step`: wall time since the previous call (checkpoints and logging included)."""
        now = time.monotonic()
        self.recent.append(now - self._last)
        self._last = now
        line = progress_line(step, self.total, now - self._start, eta_s(step, self.total, list(self.recent)), metrics)
        if self.bar is not None:
            self.bar.set_postfix_str(stats(metrics), refresh=False)
            self.bar.update(step - self.bar.n)
        else:
            print(line, file=self.stream, flush=True)
        return line

    def eta(self, step: int) -> float | None:
        return eta_s(step, self.total, list(self.recent))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
