"""Preemption: a signal sets a flag; the trainer acts on it at a step boundary.

The handler does no work itself (a checkpoint written from inside a signal
handler could interleave with a half-done optimizer step). Ranks agree on
the flag with one all-reduce in the trainer, so every rank saves together.
"""
from __future__ import annotations

import signal
import sys
from types import FrameType

DEFAULT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
# The trainer's own request when the time limit is near (grpo_core.walltime).
WALLTIME = "walltime"
# Reasons after which nobody else brings the job back: the job requeues itself.
# (SIGTERM comes from Slurm, which requeues or cancels as it decided.)
SELF_REQUEUE = ("SIGUSR2", WALLTIME)


class Preemption:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def requeue_self(self) -> bool:
        return self.signal_name in SELF_REQUEUE

    def request(self, reason: str) -> None:
        if self.signal_name is None:
            self.signal_name = reason
            print(f"[grpo] {reason} received: will checkpoint at the end of this step and stop", file=sys.stderr, flush=True)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.request(signal.Signals(signum).name)

    @classmethod
    def install(cls, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> "Preemption":
        """Replace the handlers of `signals` (submitit's included) with the flag."""
        flag = cls()
        for sig in signals:
            signal.signal(sig, flag._handle)
        return flag
